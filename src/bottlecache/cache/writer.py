"""Writing a cache's rows: decode a window of images, run the engine, commit the window (its
reuse plan, skipped images and augmented views included), and the reports a build returns.

``build`` drives it for one process; ``shards`` and ``ray_build`` for one shard at a time.
"""

from __future__ import annotations

import contextlib
import json
import platform
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..core.options import DEFAULT_MODEL, ENGINES, MAX_BATCH_SIZE, check_choice, check_positive
from ..core.records import DECODE_FAST
from ..data.augment import mirrored_features, parse_spec, view_features
from ..data.sources import describe_failure, image_dataset
from .reuse import ReuseReport
from .settings import ResolvedCache
from .store import COMMIT_ROWS, VIEWS_SPLIT, Cache, PartialCache, Rows

# Decoding and the engine take turns instead of overlapping: images are decoded DECODE_BLOCK at a
# time (tf.data's threads on every core), then run through the engine with nothing else under way,
# because XNNPACK's threads wait for each other at every layer and one losing its core stalls all
# (measurements: docs/engines.md, "Where the build's time goes").
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


def check_build_options(engine: str, batch_size: int | None) -> None:
    check_choice("engine", engine, ENGINES)
    if batch_size is not None:
        check_positive("batch_size", batch_size, maximum=MAX_BATCH_SIZE)


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


def window_rows(batch_size: int) -> int:
    """Rows per commit: whole chunks (a batch smaller than a chunk would make HDF5 decompress,
    recompress and checksum the same chunk again at every batch), at least one batch."""
    return -(-max(batch_size, COMMIT_ROWS) // COMMIT_ROWS) * COMMIT_ROWS


def run_split(committer, engine, resolved: ResolvedCache, name: str, rows: range, batch_size, progress,
              offset: int = 0, on_window=None, plan=None) -> tuple[int, int]:
    """Run input ``rows`` (a ``range`` of indices) of split ``name`` through ``engine`` window by window and
    hand each window to ``committer`` (its commit record counts ``n_done`` from ``offset``);
    ``on_window()`` runs as each window's decoded images arrive; images are decoded as many at once
    as the engine has threads (a Ray actor's one), else the usable cores. With a reuse ``plan``
    (``bottlecache.cache.reuse``), the rows it copies are not read and are merged into their windows.

    Windows are aligned to absolute indices, so any ``rows`` starting and ending on window boundaries runs
    exactly the batches the whole split runs. Returns the input rows run and the rows copied.
    """
    source, image_size = resolved.source, resolved.settings.image_size
    start, stop = rows.start, rows.stop
    size = batch_size or engine.batch_size
    fast = resolved.config["decode"] == DECODE_FAST
    views = resolved.config.get("views") or {}
    only = None if plan is None else plan.compute_mask(name)
    n_processed = n_reused = 0
    held: list = []  # computed windows, committed while the next images decode (see DECODE_BLOCK)

    def release():
        if held:
            committer.submit(Rows.joined(held))
            held.clear()

    windows = _windows(source, name, image_size, start, stop, window_rows(size), fast, only, resolved.settings.model,
                       before_decode=release, decode_threads=getattr(engine, "threads", None))
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
    if views and name == VIEWS_SPLIT:  # K augmented views of each train image (bottlecache.data.augment)
        augmented = view_features(engine, images, keys, views["k"], parse_spec(views["augment"]),
                                  views["seed"], size, dtype)
    elif resolved.config.get("tta") == "flip" and name != VIEWS_SPLIT and len(images):  # each image's mirror, as its one view
        augmented = mirrored_features(engine, images, size, dtype)
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

    def submit(self, rows: Rows) -> None:
        """Commit a window's rows (``PartialCache.append``) after the ones before it."""
        self.call(self.partial.append, rows)

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
             before_decode=None, decode_threads=None):
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
                           model=model, parallel=decode_threads)
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
