"""``bottlecache finetune run``: the tutorial's second phase, warm-started from a cached head."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..core.options import DEFAULT_DATA, DEFAULT_DTYPE, DEFAULT_IMAGE_SIZE, DEFAULT_MODEL, parse_image_size
from ._common import (
    CacheDirOpt,
    ImageSizeOpt,
    JsonOpt,
    ModelOpt,
    RichProgress,
    SplitOpt,
    TfdsDirOpt,
    WeightsOpt,
    handle_errors,
    out,
    print_json,
    render_metrics,
)

app = typer.Typer(help="Fine-tune the top of the frozen base end to end, warm-started from a cached head.", no_args_is_help=True)


@app.command("run")
@handle_errors(interrupted="interrupted; finished epochs are kept; run the same command with --resume to continue")
def run(
    data: Annotated[Optional[str], typer.Option("--data", help="Image folder, tfds:NAME or a tfds name (default: with --head, where its cache found its data; else cats_vs_dogs).")] = None,
    split: SplitOpt = None,
    image_size: ImageSizeOpt = str(DEFAULT_IMAGE_SIZE),
    model: ModelOpt = DEFAULT_MODEL,
    weights: WeightsOpt = None,
    cache_dir: CacheDirOpt = None,
    tfds_data_dir: TfdsDirOpt = None,
    head: Annotated[Optional[Path], typer.Option(help="Keras head folder from `cache train-head --kind keras` (default: cache and train one first).")] = None,
    head_epochs: Annotated[int, typer.Option(help="Epochs of the head trained first when --head is not given.")] = 10,
    fine_tune_at: Annotated[Optional[int], typer.Option(help="Layers of the base before this index stay frozen (default: the model's top part, `bottlecache models`).")] = None,
    epochs: Annotated[int, typer.Option(help="Fine-tuning epochs.")] = 10,
    learning_rate: Annotated[float, typer.Option(help="RMSprop learning rate (the tutorial's: 10x below the head's).")] = 1e-5,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 32,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    augment: Annotated[bool, typer.Option("--augment/--no-augment", help="Random horizontal flip and small rotation.")] = False,
    early_stopping: Annotated[Optional[int], typer.Option(help="Stop after this many epochs without a better validation loss.")] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Folder for model.keras (default: under the cache dir).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from its last finished epoch.")] = False,
    from_cache: Annotated[bool, typer.Option("--from-cache", help="Train above the cut below --fine-tune-at on cached activations (built if missing); see docs/heads-and-finetuning.md.")] = False,
    views: Annotated[Optional[int], typer.Option(help="With --from-cache --augment: augmented views of each train image in the cut cache (default 8).")] = None,
    dtype: Annotated[str, typer.Option(help="Storage type of the caches this run builds: float16 or float32.")] = DEFAULT_DTYPE,
    cut_cache: Annotated[Optional[str], typer.Option(help="With --from-cache: a cut cache file (`cache build --cut L`) to use.")] = None,
    exclude: Annotated[Optional[Path], typer.Option("--exclude", help="A file of keys, one a line, of train images to leave out (cache audit writes exclude.txt).")] = None,
    as_json: JsonOpt = False,
):
    """Unfreeze the base (--model) from --fine-tune-at on and train it with the head on the images."""
    from ..cache.settings import CacheSettings
    from ..train.finetune import FinetuneSettings, finetune
    from ..train.heads import recorded_inputs

    recorded = recorded_inputs(head) if head is not None else {}  # the head's own data and weights, unless told
    data = data if data is not None else recorded.get("data", DEFAULT_DATA)
    weights = weights if weights is not None else recorded.get("weights")
    tfds_data_dir = tfds_data_dir if tfds_data_dir is not None else recorded.get("tfds_data_dir")
    cache = CacheSettings(data, None if split is None else tuple(split), image_size=parse_image_size(image_size),
                          weights=weights,
                          dtype=dtype, tfds_data_dir=tfds_data_dir, cache_dir=cache_dir, model=model)
    settings = FinetuneSettings(
        fine_tune_at=fine_tune_at, epochs=epochs, learning_rate=learning_rate, batch_size=batch_size, seed=seed,
        augment=augment, early_stopping=early_stopping, head_epochs=head_epochs, from_cache=from_cache, views=views,
        exclude=exclude,
    )
    with RichProgress() as progress:
        result = finetune(settings=settings, cache=cache, head=head, out=out_dir, resume=resume, cut_cache=cut_cache,
                          progress=progress)
    record = result.to_dict()
    if as_json:
        print_json(record)
        return
    render_metrics(
        f"fine-tuned: {result.epochs_run} epochs, {result.seconds_per_epoch:.1f} s per epoch, best epoch {result.best_epoch}",
        record,
    )
    before = (result.head_metrics.get("validation") or {}).get("accuracy")
    after = result.metrics.get("validation", {}).get("accuracy")
    if before is not None and after is not None:
        out.print(f"validation accuracy: head {before:.4f} → fine-tuned {after:.4f}")
    out.print(f"saved to {result.path}")
