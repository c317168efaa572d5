"""``bottlecache cache …``: build, inspect and verify feature caches; train heads on them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..core.errors import BottlecacheError, reason
from ..core.options import (
    DEFAULT_DATA,
    DEFAULT_DTYPE,
    DEFAULT_ENGINE,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_MODEL,
    DEFAULT_PRECISION,
    parse_image_size,
)
from ._common import (
    CacheDirOpt,
    DataOpt,
    ImageSizeOpt,
    JsonOpt,
    ModelOpt,
    RichProgress,
    SplitOpt,
    TfdsDirOpt,
    WeightsOpt,
    err,
    fail,
    handle_errors,
    human_bytes,
    out,
    print_json,
    render_metrics,
    table,
)

app = typer.Typer(help="Build, inspect and verify bottleneck-feature caches; train heads on them.", no_args_is_help=True)


@app.command("build")
@handle_errors(interrupted="interrupted; what was finished is kept; run the same command again to resume")
def build(
    data: DataOpt = DEFAULT_DATA,
    split: SplitOpt = None,
    image_size: ImageSizeOpt = str(DEFAULT_IMAGE_SIZE),
    model: ModelOpt = DEFAULT_MODEL,
    weights: WeightsOpt = None,
    cache_dir: CacheDirOpt = None,
    dtype: Annotated[str, typer.Option(help="Storage type of the features: float16 or float32.")] = DEFAULT_DTYPE,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per forward pass (default: the engine's best).")] = None,
    engine: Annotated[str, typer.Option(help="auto (fastest that passes the check against Keras), keras or litert.")] = DEFAULT_ENGINE,
    tfds_data_dir: TfdsDirOpt = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="If the same cache is being built, wait for it.")] = True,
    fast_decode: Annotated[bool, typer.Option("--fast-decode", help="Decode large JPEGs at 1/2-1/8 scale in the DCT domain (see docs/engines.md).")] = False,
    reuse: Annotated[bool, typer.Option("--reuse/--no-reuse", help="Copy the rows of unchanged files from the newest compatible cache (see docs/cache-format.md).")] = True,
    executor: Annotated[str, typer.Option(help="local (this process) or ray (shard by shard on a Ray cluster; see docs/scaling-out.md).")] = "local",
    ray_address: Annotated[Optional[str], typer.Option(help="ray: auto or HOST:PORT of a running cluster (default: start a local Ray).")] = None,
    shard_size: Annotated[Optional[int], typer.Option(help="ray: input rows per shard, a multiple of the commit window (default 32768).")] = None,
    cut: Annotated[Optional[int], typer.Option(help="Store the activation at the cut below this fine-tune layer instead of the bottleneck (for `finetune run --from-cache`).")] = None,
    views: Annotated[int, typer.Option(help="Augmented views of each train image to store beside its features (0: none).")] = 0,
    augment: Annotated[Optional[str], typer.Option(help="How views are made: 'tutorial' (default; flip,rotate=0.2) or e.g. flip,rotate=0.2,zoom=0.1.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the views (with the image key and the view index).")] = 0,
    precision: Annotated[str, typer.Option(help="float32, or int8: the base quantised to full integer and run by LiteRT (a different cache; see docs/engines.md).")] = DEFAULT_PRECISION,
    calibration_images: Annotated[Optional[int], typer.Option(help="int8: train images that calibrate the quantisation (default 64).")] = None,
    tta: Annotated[str, typer.Option("--tta", help="none, or flip: also store the features of each image's mirror in the splits but train (for test-time flips).")] = "none",
    as_json: JsonOpt = False,
):
    """Run the frozen base (--model) once over each split and store the features in an HDF5 cache."""
    from ..cache.build import build_cache
    from ..cache.settings import BuildOptions, CacheSettings

    if model == "list":
        print_models(as_json)
        return
    settings = CacheSettings(
        data, None if split is None else tuple(split), image_size=parse_image_size(image_size), weights=weights,
        dtype=dtype,
        fast_decode=fast_decode, tfds_data_dir=tfds_data_dir, cache_dir=cache_dir, model=model, cut=cut, views=views,
        augment=augment, view_seed=seed, precision=precision, calibration_images=calibration_images,
        tta=tta,
    )
    options = BuildOptions(engine=engine, batch_size=batch_size, wait=wait, reuse=reuse, executor=executor,
                           ray_address=ray_address, shard_size=shard_size)
    with RichProgress(quiet=False) as progress:
        report = build_cache(settings=settings, options=options, progress=progress)
    if as_json:
        print_json(report.to_dict())
        return
    state = "cache hit: nothing recomputed" if report.hit else ("resumed and completed" if report.resumed else "built")
    rows = [
        [s.name, s.n_images, s.n_skipped, s.n_reused, f"{s.seconds:.1f}", f"{s.images_per_second:.1f}",
         human_bytes(s.nbytes)]
        for s in report.splits
    ]
    out.print(table(f"{report.path} ({state})", ["split", "images", "skipped", "reused", "seconds", "images/s", "size"],
                    rows))
    if report.reuse is not None:
        r = report.reuse
        origin = f" from {Path(r.source).name}" if r.source else " (no compatible cache to reuse)" if reuse else ""
        unreadable = f"; {r.unreadable} rows failed their checksums and were computed" if r.unreadable else ""
        out.print(f"reused {r.reused}, computed {r.computed}, dropped {r.dropped}{origin}{unreadable}; "
                  f"{r.hashed} files hashed", markup=False)
    n_skipped = sum(s.n_skipped for s in report.splits)
    engine_text = f", engine {report.engine}" if report.engine else ""
    if report.startup_seconds is not None:
        engine_text += f", first images after {report.startup_seconds:.1f} s"
    out.print(f"fingerprint {report.fingerprint[:12]}, {human_bytes(report.file_size)}{engine_text}, {n_skipped} skipped")
    if getattr(report, "n_shards", 0):
        out.print(f"{report.n_shards} shards ({report.n_reused} from an earlier run), {report.workers} Ray workers, "
                  f"Ray start-up {report.ray_startup_seconds:.1f} s")
    for s in report.splits:
        for key, why in s.skipped[:20]:
            # a folder's keys are paths from the data's root, which name the split folder already
            where = key if key.startswith(f"{s.name}/") else f"{key} (split {s.name})"
            err.print(f"  skipped {where}: {why}", markup=False)


@app.command("ls")
@handle_errors(interrupted="interrupted")
def ls(cache_dir: CacheDirOpt = None, as_json: JsonOpt = False):
    """List the caches in the cache folder, newest first (a damaged one as a row with its reason)."""
    from ..cache.store import Cache, list_caches

    rows, records = [], []
    for path in list_caches(cache_dir):
        try:
            with Cache(path) as cache:
                counts = {s: cache.n_examples(s) for s in cache.splits}
                record = {
                    "path": str(path), "fingerprint": cache.fingerprint, "data": cache.config["data"].get("name", "?"),
                    "image_size": cache.image_size, "dtype": cache.config["dtype"],
                    "precision": precision_of(cache.config), "splits": counts,
                    "size": path.stat().st_size, "created": cache.created,
                }
        except (BottlecacheError, OSError) as error:  # one bad file must not hide the others
            record = {"path": str(path), "error": reason(error, 300)}
        records.append(record)
        if "error" in record:
            rows.append([path.name, "?", "", "", "", record["error"]])
        else:
            splits = ", ".join(f"{s} {n}" for s, n in record["splits"].items())
            rows.append([path.name, record["data"], record["precision"], splits, human_bytes(record["size"]),
                         record["created"], ""])
    if as_json:
        print_json(records)
    elif not rows:
        out.print("no caches")
    else:
        out.print(table("caches", ["file", "data", "precision", "splits", "size", "created", "note"], rows))


def precision_of(config: dict) -> str:
    return (config.get("precision") or {}).get("kind", "float32")


def precision_line(config: dict, build: dict) -> str:
    """``cache info``'s line on what the base computed in (and, for int8, on what it was calibrated)."""
    precision = config.get("precision")
    if not precision:
        return "precision float32"
    calibration = precision["calibration"]
    error = build.get("engine_relative_error")
    return (f"precision int8: calibrated on {calibration['images']} {calibration['split']} images "
            f"({calibration['rule']}, content {calibration['content_sha256'][:12]})"
            + (f"; pooled features {error:.3f} of their norm from float32 on the probe images"
               if isinstance(error, (int, float)) else ""))


@app.command("info")
@handle_errors(interrupted="interrupted")
def info(cache: Annotated[str, typer.Argument(help="Cache file or fingerprint prefix.")], cache_dir: CacheDirOpt = None, as_json: JsonOpt = False):
    """Show a cache's configuration and per-split counts."""
    from ..cache.store import open_cache

    with open_cache(cache, cache_dir) as c:
        record = {
            "path": str(c.path), "fingerprint": c.fingerprint, "config": c.config, "build": c.build_info,
            "versions": c.versions, "created": c.created,
            "splits": {s: {"images": c.n_examples(s), "skipped": len(c.skipped(s)), "bytes": c.nbytes(s)} for s in c.splits},
        }
    if as_json:
        print_json(record)
        return
    out.print(f"[bold]{record['path']}[/]")
    out.print(precision_line(record["config"], record["build"]), markup=False)
    if record["config"].get("tta") == "flip":
        out.print("test-time flips: every split but train also holds each image's mirror (cache build --tta flip)",
                  markup=False)
    out.print(json.dumps({k: record[k] for k in ("fingerprint", "config", "build", "created")}, indent=2))
    rows = [[s, v["images"], v["skipped"], human_bytes(v["bytes"])] for s, v in record["splits"].items()]
    out.print(table("splits", ["split", "images", "skipped", "size"], rows))


@app.command("verify")
@handle_errors(interrupted="interrupted; nothing was changed")
def verify(cache: Annotated[str, typer.Argument(help="Cache file or fingerprint prefix.")], cache_dir: CacheDirOpt = None, as_json: JsonOpt = False):
    """Read every chunk and check checksums, shapes, counts and the fingerprint; exit 1 on any fault."""
    from ..cache.store import DAMAGED_ADVICE, find_cache, verify_cache

    report = verify_cache(find_cache(cache, cache_dir))
    if as_json:
        print_json({"path": str(report.path), "ok": report.ok, "problems": report.problems, "counts": report.counts,
                    "bytes_read": report.bytes_read, "seconds": round(report.seconds, 3)})
    elif report.ok:
        counts = ", ".join(f"{s} {n}" for s, n in report.counts.items())
        out.print(f"ok: {report.path} ({counts}; {human_bytes(report.bytes_read)} read in {report.seconds:.1f} s)")
    if not report.ok:
        if not as_json:
            for problem in report.problems:
                out.print(f"fault: {problem}", markup=False)
        first = report.problems[0]
        first = first if first.startswith(str(report.path)) else f"{report.path}: {first}"
        more = f" (and {len(report.problems) - 1} more fault(s))" if len(report.problems) > 1 else ""
        fail(first + more if DAMAGED_ADVICE in first else f"{first}{more}; {DAMAGED_ADVICE}", 1)


@app.command("consolidate")
@handle_errors(interrupted="interrupted; the cache and its shards are unchanged")
def consolidate(
    cache: Annotated[str, typer.Argument(help="Cache file or fingerprint prefix.")],
    keep_shards: Annotated[bool, typer.Option("--keep-shards", help="Keep the shard folder afterwards.")] = False,
    cache_dir: CacheDirOpt = None,
):
    """Rewrite a cache built with --executor ray (which reads its shard files) as one standalone file."""
    from ..cache.shards import consolidate_cache
    from ..cache.store import find_cache

    path = find_cache(cache, cache_dir)
    with RichProgress(quiet=False) as progress:
        consolidate_cache(path, keep_shards=keep_shards, progress=progress)
    out.print(f"{path}: standalone ({human_bytes(path.stat().st_size)})")


@app.command("train-head")
@handle_errors(interrupted="interrupted; no head was saved")
def train_head_command(
    cache: Annotated[Optional[list[str]], typer.Argument(help="Cache file or fingerprint prefix (default: the newest cache); several: a stack of caches of the same photos, their pooled features joined.")] = None,
    kind: Annotated[str, typer.Option(help="sklearn (logistic regression on pooled features) or keras (the tutorial's head).")] = "sklearn",
    c: Annotated[Optional[list[float]], typer.Option("--C", help="sklearn: inverse regularisation; repeat to choose by validation accuracy.")] = None,
    epochs: Annotated[int, typer.Option(help="keras: epochs.")] = 10,
    batch_size: Annotated[int, typer.Option(help="keras: batch size.")] = 32,
    learning_rate: Annotated[float, typer.Option(help="keras: learning rate.")] = 1e-4,
    optimizer: Annotated[str, typer.Option(help="keras: rmsprop (the tutorial's) or adam.")] = "rmsprop",
    dropout: Annotated[float, typer.Option(help="keras: dropout rate before the Dense layer.")] = 0.2,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    early_stopping: Annotated[Optional[int], typer.Option(help="keras: stop after this many epochs without a better validation loss.")] = None,
    class_weight: Annotated[str, typer.Option(help="none, or balanced: weigh each class by the inverse of its train frequency (both kinds).")] = "none",
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Folder for the trained head (default: under the cache dir).")] = None,
    cache_dir: CacheDirOpt = None,
    views: Annotated[bool, typer.Option("--views", help="Train on the cache's augmented views (cache build --views K).")] = False,
    exclude: Annotated[Optional[Path], typer.Option("--exclude", help="A file of keys, one a line, to leave out of training (cache audit writes exclude.txt).")] = None,
    calibrate: Annotated[bool, typer.Option("--calibrate", help="Fit a temperature on the validation split: calibrated probabilities, the same predictions.")] = False,
    tta: Annotated[str, typer.Option("--tta", help="none, or flip: measure the head on the mean of each image's and its mirror's logits (a cache built with --tta flip); predict, report and export do the same.")] = "none",
    max_memory: Annotated[Optional[str], typer.Option("--max-memory", help="Memory the features may take, e.g. 16M or 2G (default: a quarter of the free memory); above it the sklearn head fits out of core and the keras head streams.")] = None,
    as_json: JsonOpt = False,
):
    """Train a head on a cache's features (or on a stack of caches) and report its metrics on the other splits."""
    from ..cache.store import find_cache
    from ..train.heads import HeadSettings, train_head

    settings = HeadSettings(
        kind, C=c or (1.0,), epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, optimizer=optimizer,
        dropout=dropout, seed=seed, early_stopping=early_stopping, class_weight=class_weight, views=views,
        exclude=exclude, calibrate=calibrate, tta=tta, max_memory=max_memory,
    )
    paths = [find_cache(spec, cache_dir) for spec in (cache or [None])]
    if cache is None and not as_json:
        err.print(f"using the newest cache: {paths[0]}", markup=False)
    with RichProgress(quiet=False) as progress:
        result = train_head(paths, settings=settings, out=out_dir, cache_dir=cache_dir, progress=progress)
    record = result.to_dict()
    if as_json:
        print_json(record)
        return
    what = " + ".join(p.name for p in paths)
    render_metrics(f"{kind} head on {what}: {result.train_seconds:.2f} s of training"
                   + (" (test-time flips)" if tta != "none" else ""), record)
    if "calibration" in result.params:
        cal = result.params["calibration"]
        out.print(f"calibrated: temperature {result.params['temperature']:.3f} fitted on validation; expected "
                  f"calibration error {cal['ece_before']:.4f} → {cal['ece_after']:.4f}, log loss "
                  f"{cal['log_loss_before']:.4f} → {cal['log_loss_after']:.4f}", markup=False)
    if "exclude" in result.params:
        left = result.params["exclude"]
        out.print(f"left out of training: {left['n_excluded']} image(s) of the {left['n_keys']} keys in {exclude}",
                  markup=False)
    if result.selection and len(result.selection) > 1:
        out.print("C selection: " + ", ".join(f"C={s['C']:g} → {s['validation_accuracy']:.4f}" for s in result.selection)
                  + f"; kept C={result.params['C']:g}")
    out.print(f"saved to {result.path}")


@app.command("heads")
@handle_errors(interrupted="interrupted")
def heads(cache_dir: CacheDirOpt = None, as_json: JsonOpt = False):
    """List the trained heads in the cache folder with their validation accuracy (a damaged one as a
    row with its reason)."""
    from ..train.heads import list_heads

    records = []
    for folder, metrics in list_heads(cache_dir):
        if "error" in metrics:
            records.append({"path": str(folder), "error": metrics["error"]})
            continue
        validation = metrics.get("metrics", {}).get("validation") or {}
        records.append({"path": str(folder), "kind": metrics.get("kind"), "train_seconds": metrics.get("train_seconds"),
                        "validation_accuracy": validation.get("accuracy"), "validation_log_loss": validation.get("log_loss")})
    if as_json:
        print_json(records)
    elif not records:
        out.print("no heads")
    else:
        rows = [[r["path"], r.get("kind", "?"), _fmt(r.get("validation_accuracy")), _fmt(r.get("validation_log_loss")),
                 _fmt(r.get("train_seconds"), 2), r.get("error", "")] for r in records]
        out.print(table("heads", ["folder", "kind", "val accuracy", "val log loss", "train s", "note"], rows))


def _fmt(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_models(as_json: bool = False) -> None:
    """The registry of bases (``bottlecache models``, ``cache build --model list``)."""
    from ..core.registry import table_rows

    rows = table_rows()
    if as_json:
        print_json(rows)
        return
    t = table("models (--model)", ["model", "preprocessing", "at 160 px", "layers", "cut", "engines"], [
        [r["model"], r["preprocessing"], "x".join(map(str, r["bottleneck_160"])), r["layers"], r["fine_tune_at"],
         r["engines"].replace(", ", "+")] for r in rows
    ])
    out.print(t)
    for r in rows:
        if r["keras_only_reason"]:
            out.print(f"{r['model']}: Keras only: {r['keras_only_reason']}", markup=False)
    out.print("image sizes: " + ", ".join(map(str, rows[0]["image_sizes"])) + " for every model")
