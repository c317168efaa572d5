"""``bottlecache predict``: class and probability per image, from a model or a head folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._common import JsonOpt, WeightsOpt, handle_errors, out, print_json, table


@handle_errors
def predict(
    model: Annotated[Path, typer.Argument(help="A fine-tuned model folder or a head folder.")],
    images: Annotated[list[Path], typer.Argument(help="Image files or folders (searched recursively).")],
    weights: WeightsOpt = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    as_json: JsonOpt = False,
):
    """Predict the class of each image; unreadable images get a row that says so."""
    from ..config import check_positive
    from ..finetune import expand_images, load_model

    check_positive("batch_size", batch_size)
    paths = expand_images(images)
    predictor = load_model(model, weights=weights)
    rows = predictor.predict(paths, batch_size=batch_size)
    if as_json:
        print_json(rows)
        return
    out.print(table(
        f"{predictor.kind} {model}",
        ["image", "class", "probability"],
        [[r["path"], r.get("label", "-"), f"{r['probability']:.4f}" if "probability" in r else f"error: {r['error']}"]
         for r in rows],
    ))
