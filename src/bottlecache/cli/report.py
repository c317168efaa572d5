"""``bottlecache report``: an error report for a head or a fine-tuned model, as one HTML file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..serve.report import DEFAULT_BINS, DEFAULT_TOP
from ._common import JsonOpt, RichProgress, TfdsDirOpt, handle_errors, out, print_json


@handle_errors(interrupted="interrupted; nothing was written")
def report(
    model: Annotated[Path, typer.Argument(help="A head folder (evaluated on its cache) or a fine-tuned model folder.")],
    split: Annotated[Optional[str], typer.Option(help="Split to report on (default: test, else validation).")] = None,
    out_file: Annotated[Optional[Path], typer.Option("--out", help="The HTML file, a new one unless --overwrite (default: ./report-<folder>-<split>.html, or -2, -3… beside an earlier one).")] = None,
    data: Annotated[Optional[str], typer.Option("--data", help="The image folder or tfds name the cache was built from: thumbnails of the mistakes (needed for a fine-tuned model).")] = None,
    top: Annotated[int, typer.Option(help="How many of the most confidently wrong images to show.")] = DEFAULT_TOP,
    bins: Annotated[int, typer.Option(help="Confidence bins of the reliability diagram (2-100).")] = DEFAULT_BINS,
    tfds_data_dir: TfdsDirOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the --out file if it exists (never the model's own files).")] = False,
    tta: Annotated[Optional[str], typer.Option("--tta", help="none, or flip: the mean of the logits of each image and its mirror (default: as the head was trained; none for a fine-tuned model).")] = None,
    as_json: JsonOpt = False,
):
    """Write a self-contained HTML error report: per-class metrics, confusion matrix, the most
    confidently wrong images, reliability diagram and calibration error, accuracy against the threshold."""
    from ..serve.report import write_report

    with RichProgress(quiet=as_json) as progress:
        result = write_report(model, split, out_file, data=data, top=top, bins=bins,
                              tfds_data_dir=tfds_data_dir, overwrite=overwrite, progress=progress, tta=tta)
    if as_json:
        print_json(result.to_dict())
        return
    out.print(f"{result.split}: accuracy {result.metrics['accuracy']:.4f}, balanced accuracy "
              f"{result.metrics['balanced_accuracy']:.4f}, ECE {result.ece:.4f}, {result.n_wrong} of "
              f"{result.metrics['n']} wrong ({result.n_thumbnails} thumbnails)", markup=False)
    out.print(f"wrote {result.path}", markup=False)
