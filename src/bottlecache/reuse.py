"""Incremental builds: copy the rows an earlier cache already holds, compute only the rest.

When ``cache build`` finds no cache under its fingerprint, ``plan_reuse`` looks in the cache dir
for the newest compatible cache: every setting that determines a row's values is the same (the
whole configuration but the data's identity, its splits and class names) and it was built by the
same engine. Each example whose content digest (content.py) is stored there is copied from it,
wherever its file lives now; the others are computed. A row's key and label always come from the
new source, so a photo moved to another class folder keeps its features and takes its new label.

Rows are copied only from chunks that pass their checksums: before the build writes anything,
every chunk the copy will read is read once; rows in a chunk that fails are computed instead
(and the build says how many). Digests that do not read back make no match at all.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from .content import SplitContent, split_content
from .errors import BottlecacheError
from .store import CONTENT, Cache, list_caches

# Settings that say where the rows came from, not what a row's values are: anything else in the
# configuration (model, weights, image size, preprocessing, decoding, dtype, and whatever is
# added later) must match for a row to be copied.
NOT_ROW_SETTINGS = ("data", "splits", "class_names")
READ_CACHE_BYTES = 64 << 20  # chunk cache of the source file: windows read neighbouring rows


@dataclass
class ReuseReport:
    """What an incremental build took from an earlier cache (counts over the whole new cache)."""

    source: str | None  # the cache rows were copied from (None: none was compatible, or --no-reuse)
    reused: int = 0  # rows copied (this call: see SplitReport.n_reused)
    computed: int = 0  # examples run through the engine (undecodable ones included)
    dropped: int = 0  # rows of the source whose content is no longer in the data (removed or changed files)
    unreadable: int = 0  # rows that matched but failed their checksums: computed instead
    hash_seconds: float = 0.0  # hashing the data's files (every build does it, to store the digests)
    check_seconds: float = 0.0  # finding the source and reading its chunks once before copying


def expected_engine(requested: str) -> str:
    """The engine a build will run: ``auto`` is LiteRT where it is installed (it falls back to Keras
    only if LiteRT fails its check, and then the build plans again)."""
    from .engines import litert_available

    return ("litert" if litert_available() else "keras") if requested == "auto" else requested


class CopyOnlyEngine:
    """The engine of a build that copies every row: named after the source's, never called."""

    def __init__(self, build: dict):
        self.name = build.get("engine", "")
        self.batch_size = int(build.get("batch_size") or 32)
        self.max_abs_diff = float(build.get("engine_max_abs_diff") or 0.0)

    def __call__(self, images):
        raise RuntimeError("an incremental build planned to copy every row was asked to compute one")


def engine_from_source(plan) -> CopyOnlyEngine | None:
    """The engine of a build that copies every row (none is loaded), or None: a build that computes
    some rows makes its engine as any build does (engines.checked_engine, make_engine)."""
    if plan.file is None or plan.report.computed:
        return None
    return CopyOnlyEngine(plan.source_build)


def row_settings(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in NOT_ROW_SETTINGS}


def is_compatible(cache: Cache, config: dict, engine: str) -> bool:
    return (row_settings(cache.config) == row_settings(config)
            and cache.config["data"].get("kind") == config["data"].get("kind")
            and cache.build_info.get("engine") == engine
            and cache.has_contents())


def find_source(cache_dir: Path, config: dict, engine: str, exclude: Path) -> Path | None:
    """The newest finished cache in ``cache_dir`` whose rows this build may copy, if any."""
    for path in list_caches(cache_dir):
        if path == exclude or not path.is_file():
            continue
        try:
            with Cache(path) as cache:
                if is_compatible(cache, config, engine):
                    return path
        except (BottlecacheError, OSError):  # a damaged or foreign file is never a source
            continue
    return None


@dataclass
class ReusePlan:
    """For each example of each split: compute it, or copy row ``row`` of split ``where`` of the
    source file."""

    content: dict[str, SplitContent]
    report: ReuseReport
    engine: str = ""  # the engine whose rows may be copied
    reuse: bool = True
    source_build: dict = field(default_factory=dict)  # the source's build record (engine, batch size…)
    source_splits: list[str] = field(default_factory=list)
    where: dict[str, np.ndarray] = field(default_factory=dict)  # split → source split index, -1: compute
    row: dict[str, np.ndarray] = field(default_factory=dict)
    file: h5py.File | None = None

    def compute_mask(self, split: str) -> np.ndarray | None:
        """True where ``split``'s example is computed (None: every example is)."""
        return None if self.file is None else self.where[split] < 0

    def fill(self, split: str, lo: int, hi: int, indices, features, pooled):
        """The rows of window ``[lo, hi)`` in index order: the computed ones (``indices``, with
        their ``features`` and ``pooled``, None if none) merged with the copied ones.

        Returns ``(indices, keys, labels, features, pooled, contents, n_reused)``.
        """
        content = self.content[split]
        copied = [] if self.file is None else [i for i in range(lo, hi) if self.where[split][i] >= 0]
        if copied:
            copied_features, copied_pooled = self._read(split, np.array(copied))
            if features is None:
                features, pooled = copied_features, copied_pooled
            else:
                features = np.concatenate([features, copied_features.astype(features.dtype)])
                pooled = np.concatenate([pooled, copied_pooled])
            order = np.argsort(np.array(list(indices) + copied), kind="stable")
            indices = list(np.array(list(indices) + copied)[order])
            features, pooled = features[order], pooled[order]
        indices = [int(i) for i in indices]
        keys = [content.keys[i] for i in indices]
        labels = np.array([content.labels[i] for i in indices], dtype=np.int64)
        return indices, keys, labels, features, pooled, content.digests[indices], len(copied)

    def _read(self, split: str, new_indices: np.ndarray):
        where, rows = self.where[split][new_indices], self.row[split][new_indices]
        features = pooled = None
        for s in np.unique(where):
            picked = np.nonzero(where == s)[0]
            unique, inverse = np.unique(rows[picked], return_inverse=True)
            group = self.file[self.source_splits[s]]
            span = slice(int(unique[0]), int(unique[-1]) + 1) if unique[-1] - unique[0] + 1 == len(unique) else unique
            f, p = group["features"][span][inverse], group["pooled"][span][inverse]
            if features is None:
                features = np.empty((len(new_indices), *f.shape[1:]), f.dtype)
                pooled = np.empty((len(new_indices), *p.shape[1:]), p.dtype)
            features[picked], pooled[picked] = f, p
        return features, pooled

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def plan_reuse(resolved, engine: str, *, reuse: bool = True, progress=None) -> ReusePlan:
    """Hash the data, then (with ``reuse``) find a source cache and decide what to copy from it."""
    source = resolved.source
    started = time.perf_counter()
    content = {name: split_content(source, name) for name in source.splits}
    report = ReuseReport(None, computed=sum(len(c.keys) for c in content.values()),
                         hash_seconds=time.perf_counter() - started)
    plan = ReusePlan(content, report, engine, reuse)
    if not reuse:
        return plan
    started = time.perf_counter()
    path = find_source(resolved.settings.cache_dir, resolved.config, engine, resolved.path)
    if path is not None:
        try:
            _match(plan, path, progress)
        except BaseException:
            plan.close()
            raise
    report.check_seconds = time.perf_counter() - started
    return plan


def _match(plan: ReusePlan, path: Path, progress) -> None:
    with Cache(path) as cache:
        source_splits = list(cache.splits)
        plan.source_build = dict(cache.build_info)
    plan.file = h5py.File(path, "r", rdcc_nbytes=READ_CACHE_BYTES)
    plan.source_splits = source_splits
    stored: dict[bytes, tuple[int, int]] = {}
    source_digests: list[bytes] = []
    unreadable = 0
    for s, name in enumerate(source_splits):
        digests, readable = _read_checked(plan.file[name][CONTENT])
        unreadable += int((~readable).sum())
        for row in np.nonzero(readable)[0]:
            digest = digests[row].tobytes()
            stored.setdefault(digest, (s, int(row)))
            source_digests.append(digest)
    wanted = set()
    for name, content in plan.content.items():
        n = len(content.keys)
        where, row = np.full(n, -1, np.int64), np.full(n, -1, np.int64)
        for i in range(n):
            hit = stored.get(content.digests[i].tobytes())
            wanted.add(content.digests[i].tobytes())
            if hit is not None:
                where[i], row[i] = hit
        plan.where[name], plan.row[name] = where, row
    unreadable += _drop_unreadable(plan)
    report = plan.report
    report.source = str(path)
    report.reused = sum(int((w >= 0).sum()) for w in plan.where.values())
    report.computed = sum(len(c.keys) for c in plan.content.values()) - report.reused
    report.dropped = sum(1 for d in source_digests if d not in wanted)
    report.unreadable = unreadable
    if unreadable and progress is not None:
        progress.message(f"{unreadable} rows of {path.name} fail their checksums; computing them instead")
    if progress is not None:
        progress.message(f"reusing {report.reused} rows of {path.name}; computing {report.computed}")


def _read_checked(dataset) -> tuple[np.ndarray, np.ndarray]:
    """A dataset read chunk by chunk, and which rows lie in chunks that passed their checksums."""
    n, step = dataset.shape[0], dataset.chunks[0]
    values = np.zeros(dataset.shape, dataset.dtype)
    readable = np.zeros(n, bool)
    for lo in range(0, n, step):
        try:
            values[lo : lo + step] = dataset[lo : lo + step]
            readable[lo : lo + step] = True
        except OSError:
            continue
    return values, readable


def _drop_unreadable(plan: ReusePlan) -> int:
    """Read once every chunk of features and pooled that the copy will read; examples whose row
    lies in a chunk that fails are computed instead. Returns how many."""
    failed: dict[int, set[int]] = {}  # source split → failing chunk numbers
    for s, name in enumerate(plan.source_splits):
        needed = set()
        for where, row in zip(plan.where.values(), plan.row.values()):
            needed.update(int(r) for r in row[where == s])
        group = plan.file[name]
        for key in ("features", "pooled"):
            step = group[key].chunks[0]
            for chunk in sorted({r // step for r in needed}):
                try:
                    group[key][chunk * step : (chunk + 1) * step]
                except OSError:
                    failed.setdefault(s, set()).add((key, chunk * step, step))
    count = 0
    for where, row in zip(plan.where.values(), plan.row.values()):
        for i in np.nonzero(where >= 0)[0]:
            bad = failed.get(int(where[i]), ())
            if any(lo <= row[i] < lo + step for _, lo, step in bad):
                where[i], row[i] = -1, -1
                count += 1
    return count
