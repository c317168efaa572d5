"""``bottlecache sweep``: try every cache configuration × head, rank on validation, test only the winner."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..core.errors import BottlecacheError
from ..core.options import DEFAULT_DTYPE, DEFAULT_ENGINE
from ._common import (
    CacheDirOpt,
    JsonOpt,
    RichProgress,
    SplitOpt,
    TfdsDirOpt,
    fail,
    handle_errors,
    out,
    print_json,
    table,
)


def _csv(name: str, text: str | None, convert, what: str):
    """``"160,192"`` → ``[160, 192]``; None → None. A bad item names the option and what is allowed."""
    if text is None:
        return None
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise BottlecacheError(f"The '{name}' option must be a comma-separated list of {what}. Got {text!r} instead.")
    try:
        return [convert(item) for item in items]
    except ValueError:
        raise BottlecacheError(f"The '{name}' option must be a comma-separated list of {what}. Got {text!r} instead.") from None


def _weights(values: list[str] | None):
    """``--weights PATH`` (the one model) or ``--weights MODEL=PATH`` (repeat per model)."""
    if not values:
        return None
    if len(values) == 1 and "=" not in values[0]:
        return values[0]
    mapping = {}
    for value in values:
        model, sep, path = value.partition("=")
        if not sep or not model.strip() or not path.strip():
            raise BottlecacheError(f"The 'weights' option, given more than once, must be MODEL=PATH each time. "
                                   f"Got {value!r} instead.")
        if model.strip() in mapping:
            raise BottlecacheError(f"The 'weights' option names {model.strip()!r} twice ({mapping[model.strip()]!r} and "
                                   f"{path.strip()!r}); give each model's weights once.")
        mapping[model.strip()] = path.strip()
    return mapping


@handle_errors(interrupted="interrupted; every finished cache and head is kept; run the same command again to resume")
def sweep(
    data: Annotated[Optional[str], typer.Option("--data", help="Image folder, tfds:NAME or a tfds name, as for cache build. Default: the folder the newest cache in the cache dir was built from, else cats_vs_dogs.")] = None,
    split: SplitOpt = None,
    image_size: Annotated[str, typer.Option("--image-size", help="Image sizes to try, comma-separated (96, 128, 160, 192, 224; native: each model's own, e.g. Xception 299).")] = "160,192,224",
    model: Annotated[Optional[str], typer.Option("--model", help="Backbones to try, comma-separated (default: the default backbone).")] = None,
    kind: Annotated[str, typer.Option("--kind", help="Heads to train on every cache, comma-separated: sklearn, keras.")] = "sklearn,keras",
    c: Annotated[str, typer.Option("--C", help="sklearn: values of C to try, comma-separated (one head each).")] = "1",
    views: Annotated[Optional[str], typer.Option("--views", help="Views per image to try, comma-separated (default: the cache default).")] = None,
    precision: Annotated[Optional[str], typer.Option("--precision", help="Precisions of the base to try, comma-separated: float32, int8 (default: float32).")] = None,
    epochs: Annotated[int, typer.Option(help="keras: epochs of each Keras head.")] = 10,
    seed: Annotated[int, typer.Option(help="Random seed of the heads.")] = 0,
    budget: Annotated[Optional[str], typer.Option("--budget", help="Start no build that would end after this long, e.g. 90s, 10m, 1h (cheapest first).")] = None,
    weights: Annotated[Optional[list[str]], typer.Option("--weights", help="A weights file, or MODEL=PATH once per model. Default: $BOTTLECACHE_WEIGHTS, else the file a model's newest cache was built with, else imagenet.")] = None,
    cache_dir: CacheDirOpt = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Folder for leaderboard.json and leaderboard.png (default: <cache dir>/sweep).")] = None,
    dtype: Annotated[str, typer.Option(help="Storage type of the features: float16 or float32.")] = DEFAULT_DTYPE,
    engine: Annotated[str, typer.Option(help="auto, keras or litert (what runs the base during builds).")] = DEFAULT_ENGINE,
    tfds_data_dir: TfdsDirOpt = None,
    exclude: Annotated[Optional[Path], typer.Option("--exclude", help="A file of keys, one a line, left out of every head's training (cache audit writes exclude.txt).")] = None,
    calibrate: Annotated[bool, typer.Option("--calibrate", help="Fit each head's temperature on validation (calibrated probabilities; the ranking by accuracy is unchanged).")] = False,
    stack: Annotated[int, typer.Option("--stack", help="Also try stacks of K caches (2-4): the 4 best configurations' caches, K at a time, their pooled features joined (0: none).")] = 0,
    tta: Annotated[str, typer.Option("--tta", help="none, or flip: the caches also hold their evaluation splits' mirrors, and every head is measured with test-time flips too.")] = "none",
    as_json: JsonOpt = False,
):
    """Find the best configuration for your data: build (or reuse) a cache per configuration, train every
    head on each, rank by validation accuracy; only the winner is measured on the test split and saved."""
    from ..train.sweep import SweepSettings
    from ..train.sweep import sweep as run_sweep

    settings = SweepSettings(
        image_sizes=_csv("image_size", image_size, lambda t: t if t == "native" else int(t),
                         "image sizes (96, 128, 160, 192, 224, a base's native size) or native"),
        models=_csv("model", model, str, "model names"),
        views=_csv("views", views, int, "whole numbers of views"),
        precisions=_csv("precision", precision, str, "precisions (float32, int8)"),
        kinds=_csv("kind", kind, str, "head kinds (sklearn, keras)"),
        Cs=_csv("C", c, float, "positive numbers"),
        epochs=epochs, seed=seed, dtype=dtype, engine=engine, budget=budget, exclude=exclude,
        calibrate=calibrate, stack=stack, tta=tta,
    )
    weights = _weights(weights)
    with RichProgress(quiet=False) as progress:
        board = run_sweep(data, split, settings=settings, weights=weights, cache_dir=cache_dir,
                          tfds_data_dir=tfds_data_dir, out=out_dir, progress=progress)
    if as_json:
        print_json(board.to_dict())
    else:
        render(board)
    if board.winner is None:
        fail("no configuration finished; each row says why", 1)


def render(board) -> None:
    rows = []
    for i, row in enumerate(board.rows, 1):
        note = row.error or f"{row.cache}, {row.status}"
        rows.append([
            i if row.done else "-", row.configuration.label, row.head.label if row.head else "-",
            _f(row.validation_accuracy, ".4f"), _f(row.validation_log_loss, ".4f"),
            _f((row.validation or {}).get("ece"), ".4f"),
            _f(None if row.build_seconds_per_image is None else row.build_seconds_per_image * 1000, ".1f"),
            _f(row.head_seconds, ".2f"), _f(None if row.bytes_per_image is None else row.bytes_per_image / 1024, ".1f"), note,
        ])
    title = f"sweep: {board.n_built} cache(s) built, {board.n_trained} head(s) trained in {board.seconds:.0f} s; ranked by validation"
    out.print(table(title, ["#", "configuration", "head", "val acc", "val loss", "val ECE", "build ms/img", "head s", "KiB/img",
                            "cache, head"], rows))
    for row in board.skipped:
        out.print(f"skipped {row.configuration.label}: {row.error}", markup=False)
    if board.winner is not None:
        w = board.winner
        ece = (w.validation or {}).get("ece")
        before = (w.validation or {}).get("ece_before")
        calibration = "" if ece is None else f", expected calibration error {ece:.4f}" + (
            f" (calibrated; {before:.4f} before)" if before is not None else "")
        out.print(f"winner: {w.configuration.label}, {w.head.label}: validation accuracy {w.validation_accuracy:.4f}, "
                  f"log loss {w.validation_log_loss:.4f}{calibration}", markup=False)
        if board.test is not None:
            out.print(f"test accuracy of the winner only: {board.test['accuracy']:.4f} (n {board.test['n']}); "
                      "the choice looked at validation only", markup=False)
        else:
            out.print("no test split: the winner's accuracy on unseen data is not measured (pass --split test=...)",
                      markup=False)
        out.print(f"saved to {board.winner_path}", markup=False)
    out.print(f"leaderboard: {board.json_path}" + (f", plot: {board.plot_path}" if board.plot_path else ""), markup=False)


def _f(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)
