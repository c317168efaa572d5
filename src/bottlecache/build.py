"""``build_cache``: run the frozen base once over each split into a fingerprinted HDF5 cache.

The flow: resolve the source and the weights → fingerprint the configuration → a finished file
with that name is a cache hit → else take the build lock, open (or resume) the ``.partial``
file, run each split batch by batch, commit each batch, and rename the file when all are done.
"""

from __future__ import annotations

import contextlib
import json
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .backbone import load_backbone
from .engines import checked_engine
from .config import DEFAULT_DATA, DEFAULT_DTYPE, DEFAULT_ENGINE, DEFAULT_IMAGE_SIZE, DEFAULT_MODEL, ENGINES, \
    MAX_BATCH_SIZE, CacheSettings, ResolvedCache, check_choice, check_positive
from .cut import check_engine, feature_shape_of, lower_model
from .data import describe_failure, image_dataset
from .errors import BottlecacheError
from .files import ensure_cache_dir, write_error
from .progress import NullProgress
from .records import DECODE_FAST
from .augment import parse_spec, view_features
from .reuse import ReuseReport, engine_from_source, expected_engine, plan_reuse
from .store import COMMIT_ROWS, VIEWS_SPLIT, Cache, PartialCache, build_lock, root_attrs


# Decoding and the engine take turns instead of overlapping: images are decoded DECODE_BLOCK at a
# time (tf.data's threads on every core, the last block's commit beside them), then run through
# the engine with nothing else under way: XNNPACK's threads wait for each other at every layer, so
# one of them losing its core stalls both. Overlapped (two windows prefetched), the forward pass
# ran at 225 images/s inside the build against 325 alone, and the build reached 0.75-0.77 of the
# forward + decode bound; taking turns, 0.79-0.83; with one commit per block and the float16 cast
# in the commit thread, 0.86-0.95, 0.88 in the full suite (docs/engines.md, "Where the build's time goes").
DECODE_BLOCK = 64  # no prefetching: decoding ahead would run beside the engine again
# An incremental build commits up to this many rows at once (the commit's fixed cost, about 10 ms
# with its two fsyncs, would otherwise be most of the time of a row copied as stored)
COPY_WINDOW_ROWS = 1024


@dataclass
class SplitReport:
    name: str
    n_images: int
    n_skipped: int
    n_processed: int  # examples run in this call (0 on a hit; fewer than all after a resume)
    seconds: float
    nbytes: int
    skipped: list = field(default_factory=list)
    n_reused: int = 0  # of n_processed, rows copied from an earlier cache (reuse.py)

    @property
    def images_per_second(self) -> float:
        return self.n_processed / self.seconds if self.seconds > 0 else 0.0


@dataclass
class BuildReport:
    path: Path
    fingerprint: str
    hit: bool
    resumed: bool
    splits: list[SplitReport]
    engine: str
    file_size: int
    config: dict
    startup_seconds: float | None = None  # from the call to the first decoded images (None on a hit)
    reuse: ReuseReport | None = None  # None on a hit

    def to_dict(self) -> dict:
        out = asdict(self)
        out["path"] = str(self.path)
        for split, report in zip(out["splits"], self.splits):
            split["images_per_second"] = round(report.images_per_second, 2)
            split["skipped"] = [list(s) for s in report.skipped]
        return out


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("bottlecache", "tensorflow", "keras", "tensorflow-datasets", "h5py", "numpy", "ai-edge-litert"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def build_cache(
    data=DEFAULT_DATA,
    splits=None,
    *,
    image_size: int = DEFAULT_IMAGE_SIZE,
    weights=None,
    cache_dir=None,
    dtype: str = DEFAULT_DTYPE,
    batch_size: int | None = None,
    engine: str = DEFAULT_ENGINE,
    tfds_data_dir=None,
    wait: bool = True,
    fast_decode: bool = False,
    reuse: bool = True,
    cut: int | None = None,
    views: int = 0,
    augment: str | None = None,
    seed: int = 0,
    progress=None,
    executor: str = "local",
    ray_address: str | None = None,
    shard_size: int | None = None,
    model: str = DEFAULT_MODEL,
) -> BuildReport:
    """Build (or find) the cache of ``data`` through a frozen base (MobileNetV2 by default).

    Parameters
    ----------
    data : str or path
        A local image folder, ``tfds:NAME`` or a TensorFlow Datasets name.
    splits : list of str, optional
        Split specs (``"validation=train[80%:90%]"``); see ``bottlecache.data.open_source``.
    image_size : int
        Input side: 96, 128, 160 (default), 192 or 224.
    weights : str or path, optional
        ``"imagenet"`` or a weights file; default ``$BOTTLECACHE_WEIGHTS`` or ``"imagenet"``.
    cache_dir : str or path, optional
        Default ``$BOTTLECACHE_CACHE_DIR`` or ``./cache``.
    dtype : {"float16", "float32"}
        Storage type of ``features`` (``pooled`` is always float32).
    batch_size : int, optional
        Images per forward pass (the engine's best by default). Not part of the fingerprint.
    engine : {"auto", "keras", "litert"}
        What runs the base. Not part of the fingerprint (see docs/engines.md).
    wait : bool
        If another process is building the same cache, wait for it (default) or stop.
    fast_decode : bool
        Decode large JPEGs at 1/2, 1/4 or 1/8 scale in the DCT domain (part of the fingerprint).
    reuse : bool
        Copy the rows of unchanged files from the newest compatible cache in the cache dir and
        compute only the rest (default); False computes every row (docs/cache-format.md). A cache
        with views is never a reuse source or target: its rows are all computed.
    cut : int, optional
        A fine-tune layer index: store the activation at the cut below it instead of the
        bottleneck (``bottlecache.cut``; the cut layer's name is part of the fingerprint).
    views, augment, seed : int, str, int
        ``views`` augmented views of each train image, made by the ``augment`` spec (default
        ``tutorial``; ``bottlecache.augment``) and seeded by key, view and ``seed``; all three
        are part of the fingerprint.
    progress : bottlecache.progress.Progress, optional
    executor : {"local", "ray"}
        ``ray``: build shard by shard on a Ray cluster (``bottlecache.ray_build``; docs/scaling-out.md).
    ray_address : str, optional
        ray: ``auto`` or ``HOST:PORT`` of a running cluster (default: start a local Ray).
    shard_size : int, optional
        ray: input rows per shard, a multiple of the commit window (default 32768).
    model : str
        The base: a name of ``bottlecache.backbones.BACKBONES`` (``bottlecache models``); the
        weights must be that model's. Part of the fingerprint, with its preprocessing.

    Returns
    -------
    BuildReport
    """
    settings = CacheSettings(data, None if splits is None else tuple(splits), image_size, weights, dtype,
                             fast_decode, tfds_data_dir, cache_dir, model, cut, views, augment, seed)
    check_build_options(engine, batch_size)
    check_choice("executor", executor, ("local", "ray"))
    if executor == "ray" and (cut is not None or views):
        raise BottlecacheError("The ray executor builds bottleneck caches only; build a --cut or --views cache "
                               "with --executor local.")
    if executor == "ray":
        from .ray_build import build_ray, import_ray
        from .shards import DEFAULT_SHARD_SIZE

        import_ray()  # before anything is resolved: without Ray, say how to install it
        return build_ray(settings.resolve(), batch_size=batch_size, engine=engine, wait=wait, progress=progress,
                         address=ray_address, shard_size=DEFAULT_SHARD_SIZE if shard_size is None else shard_size)
    for name, value in (("ray_address", ray_address), ("shard_size", shard_size)):
        if value is not None:
            raise BottlecacheError(f"The '{name}' option applies to the ray executor only; add --executor ray.")
    return build_resolved(settings.resolve(), batch_size=batch_size, engine=engine, wait=wait, reuse=reuse,
                          progress=progress)


def check_build_options(engine: str, batch_size: int | None) -> None:
    check_choice("engine", engine, ENGINES)
    if batch_size is not None:
        check_positive("batch_size", batch_size, maximum=MAX_BATCH_SIZE)


def build_resolved(resolved: ResolvedCache, *, batch_size: int | None = None, engine: str = DEFAULT_ENGINE,
                   wait: bool = True, reuse: bool = True, progress=None) -> BuildReport:
    """``build_cache`` for settings already resolved (``CacheSettings.resolve()``)."""
    check_build_options(engine, batch_size)
    progress = progress or NullProgress()
    called = time.perf_counter()
    final_path = resolved.path
    if final_path.exists():
        return hit_report(resolved, final_path)
    # A cut cache runs the Keras base up to the cut (bottlecache.cut), never a whole-base flatbuffer;
    # a cache with views computes every row (their views are not copied: docs/cache-format.md).
    cut = resolved.settings.cut is not None
    engine_name = check_engine(resolved.config, engine)
    plan = plan_reuse(resolved, expected_engine(engine_name), reuse=reuse and not resolved.settings.views,
                      progress=progress)  # reads, writes nothing
    try:
        # A build that copies every row needs no engine, and a flatbuffer an earlier build converted
        # and checked needs no Keras base; otherwise the weights load before anything is written:
        # a file that does not load leaves nothing behind.
        ready = engine_from_source(plan) or (None if cut else checked_engine(
            engine, resolved.weights, resolved.settings.image_size, cache_dir=final_path.parent))
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
    finally:
        plan.close()


def split_reports(file, processed: dict[str, tuple[int, float]] | None = None) -> list[SplitReport]:
    """The per-split report of an open cache file (h5py), with what this call processed."""
    processed = processed or {}
    reports = []
    for name in json.loads(file.attrs["splits"]):
        group = file[name]
        n_processed, seconds = processed.get(name, (0, 0.0))
        reports.append(SplitReport(
            name, int(group["labels"].shape[0]), int(group["skipped"].shape[0]), n_processed, seconds,
            sum(group[k].id.get_storage_size() for k in group),
            [(k.decode("utf-8"), r.decode("utf-8")) for k, r in group["skipped"][:]],
        ))
    return reports


def hit_report(resolved: ResolvedCache, path: Path) -> BuildReport:
    with Cache(path) as cache:  # validates the file under the final name before calling it a hit
        reports = split_reports(cache.file)
        engine_name = cache.build_info.get("engine", "")
    return BuildReport(path, resolved.fingerprint, True, False, reports, engine_name, path.stat().st_size,
                       resolved.config)


def _build_locked(resolved: ResolvedCache, base, engine, batch_size, engine_name, progress, called, plan):
    from .engines import make_engine

    source, weights_ref, config, fp = resolved.source, resolved.weights, resolved.config, resolved.fingerprint
    final_path, dtype, image_size = resolved.path, resolved.settings.dtype, resolved.settings.image_size
    versions = library_versions()
    # Check the engine before the partial file is written: an engine that fails must not leave a
    # .partial behind (the next run would "resume" it).
    if engine is None:
        engine = make_engine(check_engine(config, engine_name), base, weights_ref, image_size,
                             cache_dir=final_path.parent, probe=(source, next(iter(source.splits))))
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
    views = config.get("views") or {}
    partial.open(attrs, split_attrs, feature_shape_of(config), dtype, views.get("k", 0))
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
                n_processed, n_reused = run_split(committer, engine, resolved, name, done, split.n_examples,
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
            "batch_size": batch_size or engine.batch_size,
            "threads": getattr(engine, "threads", None),
            "startup_seconds": None if startup_seconds is None else round(startup_seconds, 3),
            "weights": weights_ref.spec,
            "machine": platform.machine(),
        }
        path = partial.finalize({"build": json.dumps(build_info)})
    except OSError as error:  # a failed write; with a full disk, nothing committed is lost (PartialCache._reserve)
        raise write_error(partial.path, error, "the partial file is kept with every finished batch; "
                                               "run the same command again to resume") from None
    finally:
        committer.close()  # a commit under way finishes before the file is closed
        partial.close()
        plan.close()  # (a plan made again above; build_resolved closes its own)
    return BuildReport(path, fp, False, partial.resumed, reports, build_info["engine"], path.stat().st_size, config,
                       startup_seconds, plan.report)


def window_rows(batch_size: int) -> int:
    """Rows per commit: whole chunks (a batch smaller than a chunk would make HDF5 decompress,
    recompress and checksum the same chunk again at every batch), at least one batch."""
    return -(-max(batch_size, COMMIT_ROWS) // COMMIT_ROWS) * COMMIT_ROWS


def run_split(committer, engine, resolved: ResolvedCache, name: str, start: int, stop: int, batch_size, progress,
              offset: int = 0, on_window=None, plan=None) -> tuple[int, int]:
    """Run input rows ``[start, stop)`` of split ``name`` through ``engine`` window by window and
    hand each window to ``committer`` (its commit record counts ``n_done`` from ``offset``);
    ``on_window()`` runs as each window's decoded images arrive. With a reuse ``plan``
    (``bottlecache.reuse``), the rows it copies are not read and are merged into their windows.

    Windows are aligned to absolute indices, so any ``[start, stop)`` on window boundaries runs
    exactly the batches the whole split runs. Returns the input rows run and the rows copied.
    """
    source, image_size = resolved.source, resolved.settings.image_size
    size = batch_size or engine.batch_size
    fast = resolved.config["decode"] == DECODE_FAST
    views = resolved.config.get("views") or {}
    only = None if plan is None else plan.compute_mask(name)
    n_processed = n_reused = 0
    held: list = []  # computed windows, committed while the next images decode (see DECODE_BLOCK)

    def release():
        if held:
            committer.submit(*Rows.joined(held))
            held.clear()

    windows = _windows(source, name, image_size, start, stop, window_rows(size), fast, only, resolved.settings.model,
                       before_decode=release)
    if only is not None:  # an incremental build: copied rows need no engine, so commit more of them at once
        windows = _merged(windows, COPY_WINDOW_ROWS, window_rows(size))
    try:
        for window in windows:
            n_done, n_copied = _run_window(window, committer, engine, resolved, name, size, offset, on_window,
                                           plan, held, release, views)
            n_processed += n_done
            n_reused += n_copied
            progress.advance(name, n_done)
    except BaseException:
        with contextlib.suppress(Exception):  # (a failed commit is the error being raised)
            release()  # computed windows are committed: an interrupted build resumes after them
        raise
    release()
    return n_processed, n_reused


def _run_window(window, committer, engine, resolved, name, size, offset, on_window, plan, held, release, views):
    """Run one window through the engine, merge the rows a reuse plan copies, and hold it for its
    commit. Returns the input rows it covers and the rows copied."""
    source, dtype = resolved.source, resolved.settings.dtype
    if on_window is not None:
        on_window()
    lo, hi, indices, keys, labels, images = window
    if len(images):
        committer.wait()  # the engine runs alone: its threads wait for each other at every layer
        features = np.concatenate([engine(images[i : i + size]) for i in range(0, len(images), size)])
        pooled = features.mean(axis=(1, 2), dtype=np.float32)
    else:
        features = pooled = None
    augmented = None
    if views and name == VIEWS_SPLIT:  # K augmented views of each train image (bottlecache.augment)
        augmented = view_features(engine, images, keys, views["k"], parse_spec(views["augment"]),
                                  views["seed"], size, dtype)
    contents = stats = stored = None
    n_copied = 0
    if plan is not None:  # (a build with views copies nothing: the keys above are the window's)
        indices, keys, labels, features, pooled, contents, stats, stored, n_copied = plan.fill(
            name, lo, hi, indices, features, pooled)
    skipped = _skipped(source, name, lo, hi, indices)
    held.append(Rows(name, features, pooled, labels, keys, skipped, hi - offset, augmented, contents, stats, stored))
    if not len(images):  # nothing decodes for it: commit it now
        release()
    return hi - lo, n_copied


class Rows(NamedTuple):
    """A computed window's rows: ``PartialCache.append``'s arguments, in its order."""

    split: str
    features: np.ndarray | None  # float32 as computed; the commit casts them to the cache's dtype
    pooled: np.ndarray | None
    labels: np.ndarray
    keys: list
    skipped: list
    n_done: int
    views: tuple | None = None
    contents: np.ndarray | None = None
    stats: np.ndarray | None = None
    stored: dict | None = None

    @staticmethod
    def joined(windows: list["Rows"]) -> "Rows":
        """Consecutive windows of one split as one commit: a decoded block's windows are committed
        together, one commit's fixed cost (two fsyncs, the attribute writes) for all of them.
        Their rows and the last one's ``n_done`` are what committing them one by one would leave."""
        if len(windows) == 1:
            return windows[0]
        offsets = np.cumsum([0, *(len(w.labels) for w in windows)])

        def arrays(field: str):
            given = [getattr(w, field) for w in windows if getattr(w, field) is not None]
            parts = [part for part in given if len(part)]
            return np.concatenate(parts) if parts else next(iter(given), None)

        with_views = [w.views for w in windows if w.views is not None]
        stored = {offset + row: data for w, offset in zip(windows, offsets) for row, data in (w.stored or {}).items()}
        return Rows(
            windows[0].split, arrays("features"), arrays("pooled"), np.concatenate([w.labels for w in windows]),
            [k for w in windows for k in w.keys], [s for w in windows for s in w.skipped], windows[-1].n_done,
            tuple(np.concatenate(parts) for parts in zip(*with_views)) if with_views else None,
            arrays("contents"), arrays("stats"), stored or None,
        )


class Committer:
    """Commits windows in a background thread, in order, at most ``depth`` waiting.

    Casting, compressing, checksumming and syncing a block's rows then overlaps decoding the next
    block instead of holding up the engine; in an incremental build,
    reading the next copied rows overlaps writing and syncing the last. A failed commit raises in
    the build's thread at the next ``submit`` or ``wait``, and no commit queued after it runs (its
    rows would land where the failed one's belong); the commit protocol itself
    (``PartialCache.append``) is unchanged, so a killed build loses at most the windows whose
    commit had not finished, and runs them again on resume.
    """

    def __init__(self, partial: PartialCache, depth: int = 2):
        self.partial = partial
        self.depth = depth
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="bottlecache-commit")
        self._pending: list = []
        self._failed = False

    def submit(self, *args) -> None:
        """Commit a window (``PartialCache.append``'s arguments) after the ones before it."""
        self.call(self.partial.append, *args)

    def call(self, function, *args) -> None:
        """Run ``function(*args)`` in the commit thread after what was submitted before."""
        while len(self._pending) >= self.depth:
            self._pending.pop(0).result()
        self._pending.append(self._pool.submit(self._run, function, args))

    def _run(self, function, args):
        if self._failed:
            raise RuntimeError("an earlier commit failed")  # (never raised: the earlier error is)
        try:
            return function(*args)
        except BaseException:
            self._failed = True
            raise

    def wait(self) -> None:
        """Wait for every commit submitted; raise the first that failed."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def close(self) -> None:
        """Let the commits under way finish (on the way out of an error: that error is the one raised)."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.exception()
        self._pool.shutdown()


def _windows(source, split, image_size, start, stop, size, fast_decode=False, only=None, model=DEFAULT_MODEL,
             before_decode=None):
    """Group decoded images into windows of input indices ``[lo, hi)`` aligned to ``size``.

    A window holds the examples that decoded; the rest of its indices were skipped (or, outside
    the mask ``only``, not read: an incremental build copies them). Windows depend only on
    indices, so a resumed build runs exactly the batches a clean build runs. Images are decoded
    ``DECODE_BLOCK`` at a time; ``before_decode()`` runs before each block is asked for.
    """
    if only is not None and not any(only[start:stop]):
        batches = ()  # every row is copied: no input pipeline (building one costs about a second)
    else:
        ordered = source.examples(split, start, only)
        # a shard stops before the split's end (only=None there); an incremental build runs to it
        ordered = ordered.take(stop - start) if only is None else ordered.filter(lambda i, k, y, e: i < stop)
        ds = image_dataset(source, split, image_size, ordered=ordered, fast_decode=fast_decode,
                           model=model)
        block = max(size, DECODE_BLOCK)
        batches = ds.batch(block).as_numpy_iterator()
    lo, hi = start, min((start // size + 1) * size, stop)
    pending: list = []  # (index, key, label, decoded block, row in it)

    def emit():
        indices = [p[0] for p in pending]
        keys = [p[1] for p in pending]
        labels = np.array([p[2] for p in pending], dtype=np.int64)
        if not pending:
            images = np.zeros((0, image_size, image_size, 3), np.float32)
        elif all(p[3] is pending[0][3] for p in pending) and pending[-1][4] - pending[0][4] == len(pending) - 1:
            images = pending[0][3][pending[0][4] : pending[-1][4] + 1]  # rows of one block: a view, no copy
        else:
            images = np.stack([p[3][p[4]] for p in pending])
        return lo, hi, indices, keys, labels, images

    batches = iter(batches)
    while True:
        if before_decode is not None:
            before_decode()
        try:
            indices, keys, labels, images = next(batches)
        except StopIteration:
            break
        for j, index in enumerate(indices):
            while index >= hi:
                yield emit()
                pending, lo, hi = [], hi, min(hi + size, stop)
            pending.append((int(index), keys[j].decode("utf-8"), int(labels[j]), images, j))
    while lo < stop:
        yield emit()
        pending, lo, hi = [], hi, min(hi + size, stop)


def _merged(windows, max_rows: int, max_images: int):
    """Consecutive windows joined while they span fewer than ``max_rows`` indices and hold fewer
    than ``max_images`` decoded images (the same joins for the same windows: a resumed
    incremental build commits the same rows together)."""
    group: list = []
    for window in windows:
        if group and (window[1] - group[0][0] > max_rows or
                      sum(len(w[2]) for w in group) + len(window[2]) > max_images):
            yield _join(group)
            group = []
        group.append(window)
    if group:
        yield _join(group)


def _join(group):
    if len(group) == 1:
        return group[0]
    images = [w[5] for w in group if len(w[5])]
    return (group[0][0], group[-1][1], [i for w in group for i in w[2]], [k for w in group for k in w[3]],
            np.concatenate([w[4] for w in group]), np.concatenate(images) if images else group[0][5])


def _skipped(source, split, lo, hi, indices) -> list[tuple[str, str]]:
    """``(key, reason)`` for each index of ``[lo, hi)`` that did not decode."""
    missing = sorted(set(range(lo, hi)) - set(indices))
    out = []
    for index in missing:
        key, _, raw = source.example(split, index)
        out.append((key, describe_failure(raw)))
    return out
