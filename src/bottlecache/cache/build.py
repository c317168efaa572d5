"""``build_cache``: run the frozen base once over each split into a fingerprinted HDF5 cache.

The flow: resolve the source and the weights → fingerprint the configuration → a finished file
with that name is a cache hit → else take the build lock, open (or resume) the ``.partial``
file, run each split batch by batch, commit each batch, and rename the file when all are done.
"""

from __future__ import annotations

import json
import platform
import time

from ..core.errors import BottlecacheError, note_interrupt
from ..core.files import ensure_cache_dir, write_error
from ..core.options import DEFAULT_ENGINE, given_fields, settings_with
from ..core.progress import NullProgress
from ..models.backbone import load_backbone
from ..models.cut import check_engine, feature_shape_of, lower_model
from ..models.engines import checked_engine, make_engine
from .ray_build import build_ray, import_ray
from .reuse import engine_from_source, expected_engine, plan_reuse
from .settings import BuildOptions, CacheSettings, ResolvedCache
from .shards import DEFAULT_SHARD_SIZE
from .store import PartialCache, build_lock, root_attrs, views_of
from .writer import BuildReport, Committer, check_build_options, hit_report, library_versions, run_split, split_reports


def build_cache(data=None, splits=None, *, settings: CacheSettings | None = None, options: BuildOptions | None = None,
                progress=None, **overrides) -> BuildReport:
    """Build (or find) the cache of ``data`` through a frozen base (MobileNetV2 by default).

    Everything that defines the cache is a ``CacheSettings`` (data, splits, model, image size,
    weights, dtype, fast decoding, cut, views, where it lives); how it is built is a
    ``BuildOptions`` (engine, batch size, waiting, reuse, executor). Pass them whole, or name their
    fields as keywords (``build_cache("photos", image_size=224, engine="keras")``): keywords
    override the objects' fields, and every value is checked before anything is read.

    Parameters
    ----------
    data : str or path, optional
        A local image folder, ``tfds:NAME`` or a TensorFlow Datasets name (default
        ``settings.data``, else ``cats_vs_dogs``).
    splits : list of str, optional
        Split specs (``"validation=train[80%:90%]"``); see ``bottlecache.data.sources.open_source``.
    settings : CacheSettings, optional
        What defines the cache (its fields, and what each means: ``CacheSettings``).
    options : BuildOptions, optional
        How it is built (``BuildOptions``).
    progress : bottlecache.core.progress.Progress, optional
    **overrides
        Fields of either object by name; ``seed`` is ``CacheSettings.view_seed``.

    Returns
    -------
    BuildReport
    """
    overrides = given_fields(overrides, data=data, splits=splits)
    settings, options = settings_with("build_cache", {CacheSettings: settings, BuildOptions: options}, overrides,
                                      aliases={"seed": "view_seed"})
    if options.executor == "ray":
        if settings.cut is not None or settings.views or settings.tta != "none":
            raise BottlecacheError("The ray executor builds bottleneck caches only; build a --cut, --views or --tta "
                                   "cache with --executor local.")
        import_ray()  # before anything is resolved: without Ray, say how to install it
        shard_size = DEFAULT_SHARD_SIZE if options.shard_size is None else options.shard_size
        return build_ray(settings.resolve(), batch_size=options.batch_size, engine=options.engine, wait=options.wait,
                         progress=progress, address=options.ray_address, shard_size=shard_size)
    return build_resolved(settings.resolve(), batch_size=options.batch_size, engine=options.engine,
                          wait=options.wait, reuse=options.reuse, progress=progress)


def build_resolved(resolved: ResolvedCache, *, batch_size: int | None = None, engine: str = DEFAULT_ENGINE,
                   wait: bool = True, reuse: bool = True, progress=None) -> BuildReport:
    """``build_cache`` for settings already resolved (``CacheSettings.resolve()``)."""
    check_build_options(engine, batch_size)
    progress = progress or NullProgress()
    called = time.perf_counter()
    final_path = resolved.path
    if final_path.exists():
        return hit_report(resolved, final_path)
    # A cut cache runs the Keras base up to the cut (bottlecache.models.cut), never a whole-base flatbuffer;
    # a cache with views (or mirrors) computes every row (views are not copied: docs/cache-format.md).
    cut = resolved.settings.cut is not None
    engine_name = check_engine(resolved.config, engine)
    with_views = any(views_of(resolved.config, name) for name in resolved.source.splits)
    plan = plan_reuse(resolved, expected_engine(engine_name, resolved.config), reuse=reuse and not with_views,
                      progress=progress)  # reads, writes nothing
    try:
        # A build that copies every row needs no engine, and a flatbuffer an earlier build converted
        # and checked needs no Keras base; otherwise the weights load before anything is written:
        # a file that does not load leaves nothing behind.
        ready = engine_from_source(plan) or (None if cut else checked_engine(
            engine, resolved.weights, resolved.settings.image_size, cache_dir=final_path.parent, int8=resolved.int8()))
        base = None if ready else load_backbone(resolved.weights, resolved.settings.image_size)
        if base is not None and cut:
            base = lower_model(base, resolved.config["cut"]["layer"])
        ensure_cache_dir(final_path.parent)
        with build_lock(final_path, wait=wait, on_wait=lambda pid: progress.message(
            f"another build of this cache is running (pid {pid}); waiting for it to finish"
        )):
            if final_path.exists():  # the other build finished it while we waited
                return hit_report(resolved, final_path)
            return _build_locked(resolved, base, ready, batch_size, engine, progress, called, plan)
    except KeyboardInterrupt as stop:
        note_interrupt(stop, "interrupted before the first image was stored; nothing was written")
        raise
    finally:
        plan.close()


def kept_after_interrupt(partial: PartialCache, splits) -> str:
    """The last line of an interrupted build: the images its partial file holds, or that it holds none."""
    n_done = sum(partial.progress(name)[0] for name in splits)
    if not n_done:
        return (f"interrupted before the first batch was stored; {partial.path.name} holds no image yet; run the "
                "same command again to start over")
    return f"interrupted; {n_done} finished images are kept in {partial.path.name}; run the same command again to resume"


def _build_locked(resolved: ResolvedCache, base, engine, batch_size, engine_name, progress, called, plan):
    source, weights_ref, config, fp = resolved.source, resolved.weights, resolved.config, resolved.fingerprint
    final_path, dtype, image_size = resolved.path, resolved.settings.dtype, resolved.settings.image_size
    versions = library_versions()
    # Check the engine before the partial file is written: an engine that fails must not leave a
    # .partial behind (the next run would "resume" it).
    if engine is None:
        engine = make_engine(check_engine(config, engine_name), base, weights_ref, image_size,
                             cache_dir=final_path.parent, probe=(source, next(iter(source.splits))),
                             int8=resolved.int8())
    if engine.name != plan.engine:  # auto chose Keras after all: rows of a LiteRT cache are not its rows
        plan.close()
        plan = plan_reuse(resolved, engine.name, reuse=plan.reuse, progress=progress)
    startup_seconds = None

    def first_window():  # the first decoded images are here: start-up is over
        nonlocal startup_seconds
        if startup_seconds is None:
            startup_seconds = time.perf_counter() - called

    partial = PartialCache(final_path, fp)
    split_attrs = {
        name: {"spec": str(split.spec), "n_examples": split.n_examples} for name, split in source.splits.items()
    }
    attrs = root_attrs(config, fp, versions)
    existed = partial.path.exists()
    partial.open(attrs, split_attrs, feature_shape_of(config), dtype, {name: views_of(config, name) for name in split_attrs})
    if partial.resumed:
        progress.message(f"resuming the partial build in {partial.path.name}")
    elif existed:
        progress.message(f"the partial build in {partial.path.name} could not be resumed (unreadable or damaged); "
                         "starting over")
    processed, reused = {}, {}
    committer = Committer(partial)
    try:
        for name, split in source.splits.items():
            done, complete = partial.progress(name)
            started = time.perf_counter()
            n_processed = n_reused = 0
            if not complete:
                progress.start_split(name, split.n_examples, done)
                n_processed, n_reused = run_split(committer, engine, resolved, name, range(done, split.n_examples),
                                                  batch_size, progress, on_window=first_window, plan=plan)
                # after the split's last commit, in the commit thread: the next split starts meanwhile
                committer.call(partial.complete_split, name, time.perf_counter() - started)
                progress.end_split(name)
            processed[name] = (n_processed, time.perf_counter() - started if n_processed else 0.0)
            reused[name] = n_reused
        committer.wait()
        reports = split_reports(partial.file, processed)
        for report in reports:
            report.n_reused = reused.get(report.name, 0)
        build_info = {
            "engine": engine.name,
            "engine_max_abs_diff": getattr(engine, "max_abs_diff", 0.0),
            "engine_check": getattr(engine, "checked", ""),
            "engine_relative_error": getattr(engine, "relative_error", None),
            "batch_size": batch_size or engine.batch_size,
            "threads": getattr(engine, "threads", None),
            "startup_seconds": None if startup_seconds is None else round(startup_seconds, 3),
            "weights": weights_ref.spec,
            "machine": platform.machine(),
            **resolved.locations(),
        }
        path = partial.finalize({"build": json.dumps(build_info)})
    except OSError as error:  # a failed write; with a full disk, nothing committed is lost (PartialCache._reserve)
        raise write_error(partial.path, error, "the partial file is kept with every finished batch; "
                                               "run the same command again to resume") from None
    except KeyboardInterrupt as stop:
        committer.close()  # the commit under way finishes: it is part of what is kept
        note_interrupt(stop, kept_after_interrupt(partial, source.splits))
        raise
    finally:
        committer.close()  # a commit under way finishes before the file is closed
        partial.close()
        plan.close()  # (a plan made again above; build_resolved closes its own)
    return BuildReport(path, fp, False, partial.resumed, reports, build_info["engine"], path.stat().st_size, config,
                       startup_seconds, plan.report)

