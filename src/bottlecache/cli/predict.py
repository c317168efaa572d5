"""``bottlecache predict``: class and probability per image, from a model, a head or an export."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._common import JsonOpt, RichProgress, WeightsOpt, err, fail, handle_errors, out, print_json, table


@handle_errors(interrupted="interrupted; nothing was written")
def predict(
    model: Annotated[Path, typer.Argument(help="A fine-tuned model folder, a head folder, or an export (its folder or artifact).")],
    images: Annotated[list[Path], typer.Argument(help="Image files or folders (searched recursively).")],
    weights: WeightsOpt = None,
    batch_size: Annotated[int, typer.Option(help="Images decoded and predicted at a time.")] = 32,
    as_json: JsonOpt = False,
    csv_path: Annotated[Optional[Path], typer.Option("--csv", help="Also write the rows to this CSV file (path, label, probability, one column per class, error).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the --csv file if it exists (never an input or a bottlecache file).")] = False,
    tta: Annotated[Optional[str], typer.Option("--tta", help="none, or flip: the mean of the logits of each image and its mirror (default: as the head was trained; none for a fine-tuned model).")] = None,
):
    """Predict the class of each image; an unreadable image gets a row that says why.

    Exit code 0 when every image was predicted, 1 when some could not be read, 2 when none could.
    """
    from ..core.options import MAX_BATCH_SIZE, check_positive
    from ..serve.predict import check_csv_path, expand_images, load_model, write_csv

    check_positive("batch_size", batch_size, maximum=MAX_BATCH_SIZE)
    if csv_path is not None:
        check_csv_path(csv_path, overwrite=overwrite, inputs=[model, *images])
    predictor = load_model(model, weights=weights, tta=tta)
    paths = expand_images(images)
    with RichProgress(quiet=as_json or not err.is_terminal) as progress:  # a bar for a person watching
        rows = predictor.predict(paths, batch_size=batch_size, progress=progress)
    if csv_path is not None:
        write_csv(csv_path, rows, predictor.class_names, overwrite=overwrite)
    if as_json:
        print_json(rows)
    else:
        out.print(table(
            f"{predictor.kind} {model}",
            ["image", "class", "probability"],
            [[r["path"], r.get("label", "-"), f"{r['probability']:.4f}" if "probability" in r else f"error: {r['error']}"]
             for r in rows],
        ))
    failed = [r for r in rows if "error" in r]
    if failed and len(failed) == len(rows):
        fail(f"none of the {len(rows)} image(s) could be read (first: {failed[0]['path']}: {failed[0]['error']})", 2)
    if failed:
        fail(f"{len(failed)} of {len(rows)} image(s) could not be read (first: {failed[0]['path']}: "
             f"{failed[0]['error']}); the others were predicted", 1)
