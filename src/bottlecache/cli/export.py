"""``bottlecache export``: one deployable artifact from a head or a fine-tuned model, checked on real images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._common import (
    CacheDirOpt,
    JsonOpt,
    RichProgress,
    TfdsDirOpt,
    WeightsOpt,
    handle_errors,
    human_bytes,
    out,
    print_json,
    table,
)


@handle_errors(interrupted="interrupted; nothing was written")
def export(
    model: Annotated[Path, typer.Argument(help="A head folder (cache train-head) or a fine-tuned model folder.")],
    format: Annotated[str, typer.Option("--format", help="keras, saved_model or litert.")] = "litert",
    quantize: Annotated[str, typer.Option("--quantize", help="LiteRT only: none, float16, dynamic or int8 (calibrated on the train split).")] = "none",
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="New folder for the export. Default: <cache dir>/exports/<model>-<format>[-<quantize>].")] = None,
    data: Annotated[Optional[str], typer.Option("--data", help="The images the model was trained on (a head: default where its cache's build found them, checked; a fine-tuned model: default cats_vs_dogs).")] = None,
    tolerance: Annotated[float, typer.Option("--tolerance", help="Accuracy points the export may lose against the source model.")] = 1.0,
    calibration: Annotated[int, typer.Option("--calibration", help="int8: train images sampled for calibration.")] = 200,
    batch_size: Annotated[int, typer.Option(help="Images per evaluation batch.")] = 32,
    weights: WeightsOpt = None,
    cache_dir: CacheDirOpt = None,
    tfds_data_dir: TfdsDirOpt = None,
    tta: Annotated[Optional[str], typer.Option("--tta", help="Heads: none, or flip: the artifact averages the logits of each image and its mirror (default: as the head was trained).")] = None,
    as_json: JsonOpt = False,
):
    """Export MODEL as one artifact (uint8 RGB images in, class probabilities out; labels.txt beside it),
    then evaluate it through its own runtime on the test split (else validation).

    Stops with one line, writing nothing, if it lost more than --tolerance accuracy points.
    """
    from ..serve.export import ExportSettings, export_model

    settings = ExportSettings(format, quantize, data=data, tfds_data_dir=tfds_data_dir, weights=weights,
                              tolerance=tolerance, calibration=calibration, batch_size=batch_size, tta=tta)
    with RichProgress(quiet=as_json) as progress:
        result = export_model(model, settings=settings, out=out_dir, cache_dir=cache_dir, progress=progress)
    summary = result.to_dict()
    if as_json:
        print_json(summary)
        return
    name = format + ("" if quantize == "none" else f" ({quantize})")
    out.print(table(
        f"export {result.path} ({result.n_images} {result.split} images, batches of {result.batch_size})",
        ["model", "accuracy", "size", "ms/image"],
        [["source", f"{100 * result.source_accuracy:.2f}%", f"{human_bytes(result.source_size_bytes)} (float32 weights)",
          f"{result.source_ms_per_image:.1f}"],
         [name, f"{100 * result.accuracy:.2f}%",
          f"{human_bytes(result.size_bytes)} ({100 * result.size_bytes / result.source_size_bytes:.0f}%)",
          f"{result.ms_per_image:.1f}"]],
    ))
    out.print(f"artifact: {result.artifact}; labels: {result.path / 'labels.txt'}")
