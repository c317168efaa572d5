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

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
from h5py._objects import phil

from ..core.errors import BottlecacheError
from ..data.content import SplitContent, split_content
from ..models.engines import INT8_ENGINE, litert_available
from .chunks import decode_chunk, encodes_directly, stored_checksum_ok
from .store import CONTENT, FEATURE_CHUNK_ROWS, FILE_STAT, Cache, list_caches

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
    hashed: int = 0  # files read to hash them (the others were listed as the source cache recorded them)
    check_seconds: float = 0.0  # finding the source and reading its chunks once before copying


def expected_engine(requested: str, config: dict | None = None) -> str:
    """The engine a build will run: ``auto`` is LiteRT where it is installed (it falls back to Keras
    only if LiteRT fails its check, and then the build plans again); an int8 cache's is LiteRT int8."""
    if (config or {}).get("precision"):
        return INT8_ENGINE
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
    # (source split index, "features" or "pooled") → its chunks as stored, where they are written
    # as this build writes them (deflate, fletcher32): read and checked without HDF5's calls
    stored: dict[tuple[int, str], "StoredChunks"] = field(default_factory=dict)
    copy_as_stored: set[int] = field(default_factory=set)  # source splits whose features rows are copied as stored
    feature_shape: tuple = ()
    feature_dtype: str = "float16"

    def compute_mask(self, split: str) -> np.ndarray | None:
        """True where ``split``'s example is computed (None: every example is)."""
        return None if self.file is None else self.where[split] < 0

    def fill(self, split: str, lo: int, hi: int, indices, features, pooled):
        """The rows of window ``[lo, hi)`` in index order: the computed ones (``indices``, with
        their ``features`` and ``pooled``, None if none) merged with the copied ones.

        Returns ``(indices, keys, labels, features, pooled, contents, stats, stored, n_reused)``:
        ``stored`` holds the copied features rows that are copied as the source stores them
        (position in the window → one-row chunk) and ``features`` the other rows, in order (see
        ``PartialCache.append``).
        """
        content = self.content[split]
        copied = [] if self.file is None else [i for i in range(lo, hi) if self.where[split][i] >= 0]
        stored = {}
        if copied:
            decoded, copied_pooled, copied_stored = self._read(split, np.array(copied))
            n_computed = len(indices)
            everything = np.array(list(indices) + copied)
            order = np.argsort(everything, kind="stable")
            indices = everything[order]
            pooled = copied_pooled if pooled is None else np.concatenate([pooled, copied_pooled])
            pooled = pooled[order]
            values = []  # (0, row of features) or (1, row of decoded) for each row not stored
            for position, k in enumerate(order):
                if k < n_computed:
                    values.append((0, k))
                elif (k - n_computed) in copied_stored:
                    stored[position] = copied_stored[k - n_computed]
                else:
                    values.append((1, decoded[k - n_computed]))
            rows = [features[j] if where == 0 else j for where, j in values]
            features = np.stack(rows) if rows else np.zeros((0, *self.feature_shape), self.feature_dtype)
        indices = [int(i) for i in indices]
        keys = [content.keys[i] for i in indices]
        labels = np.array([content.labels[i] for i in indices], dtype=np.int64)
        return (indices, keys, labels, features, pooled, content.digests[indices], content.stats[indices], stored,
                len(copied))

    def _read(self, split: str, new_indices: np.ndarray):
        """The copied rows: ``(features, pooled, stored)``, ``features`` a dict position → row
        for the rows decoded, ``stored`` position → one-row chunk for those copied as stored."""
        where, rows = self.where[split][new_indices], self.row[split][new_indices]
        pooled = None
        decoded, stored = {}, {}
        for s in np.unique(where):
            picked = np.nonzero(where == s)[0]
            p = self._values(int(s), "pooled", rows[picked])
            if pooled is None:
                pooled = np.empty((len(new_indices), *p.shape[1:]), p.dtype)
            pooled[picked] = p
            if int(s) in self.copy_as_stored:  # (checked by _drop_unreadable)
                read = self.stored[(int(s), "features")].read
                stored.update((int(position), read(int(row))) for position, row in zip(picked, rows[picked]))
            else:
                f = self._values(int(s), "features", rows[picked])
                decoded.update((int(position), row) for position, row in zip(picked, f))
        return decoded, pooled, stored

    def _values(self, s: int, key: str, rows: np.ndarray) -> np.ndarray:
        chunks = self.stored.get((s, key))
        if chunks is not None:
            return chunks.rows(rows)
        return _rows(self.file[self.source_splits[s]][key], rows)

    def close(self) -> None:
        for chunks in self.stored.values():
            chunks.close()
        self.stored = {}
        if self.file is not None:
            self.file.close()
            self.file = None


def _rows(dataset, rows: np.ndarray) -> np.ndarray:
    """``dataset[rows]`` for rows in any order: one slice over them when they lie close together
    (h5py's reads of a list of rows are much slower than of a slice), else the rows themselves."""
    unique, inverse = np.unique(rows, return_inverse=True)
    lo, hi = int(unique[0]), int(unique[-1]) + 1
    if hi - lo <= 2 * len(unique) + 64:
        return dataset[lo:hi][unique - lo][inverse]
    return dataset[unique][inverse]


class StoredChunks:
    """The chunks of a source cache's dataset (deflate then fletcher32, chunked by rows), read as
    stored straight from the file: where each lies is listed once (``H5Dchunk_iter``), then each
    is one ``pread``, checked as HDF5 checks it (fletcher32) and, where its values are needed,
    inflated by ISA-L, without HDF5's per-call cost and its slower inflate."""

    def __init__(self, dataset):
        self.chunk_rows, self.dtype = dataset.chunks[0], dataset.dtype
        self.chunk_shape = dataset.chunks
        self.where: dict[int, tuple[int, int, int]] = {}
        with phil:
            dataset.id.chunk_iter(lambda info: self.where.__setitem__(
                info.chunk_offset[0] // self.chunk_rows, (info.byte_offset, info.size, info.filter_mask)))
        self.fd = os.open(dataset.file.filename, os.O_RDONLY)
        self._last: tuple[int, np.ndarray] | None = None  # neighbouring windows share a chunk

    def read(self, chunk: int) -> bytes:
        offset, size, _ = self.where[chunk]
        return os.pread(self.fd, size, offset)

    def checked(self, chunk: int) -> bool:
        """Whether chunk ``chunk`` is there, was stored through every filter, and passes its fletcher32."""
        if chunk not in self.where or self.where[chunk][2]:
            return False
        data = self.read(chunk)
        return len(data) == self.where[chunk][1] and stored_checksum_ok(data)

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """The values of ``rows`` (checked by ``_drop_unreadable`` before)."""
        out = np.empty((len(rows), *self.chunk_shape[1:]), self.dtype)
        for chunk in np.unique(rows // self.chunk_rows):
            if self._last is None or self._last[0] != chunk:
                self._last = (int(chunk), decode_chunk(self.read(int(chunk)), self.dtype, self.chunk_shape))
            here = rows // self.chunk_rows == chunk
            out[here] = self._last[1][rows[here] - chunk * self.chunk_rows]
        return out

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def plan_reuse(resolved, engine: str, *, reuse: bool = True, progress=None) -> ReusePlan:
    """Find a source cache (with ``reuse``), hash the data (files listed as the source's rows were
    are not read again), then decide what to copy from it."""
    source = resolved.source
    started = time.perf_counter()
    path = find_source(resolved.settings.cache_dir, resolved.config, engine, resolved.path) if reuse else None
    file = None if path is None else h5py.File(path, "r", rdcc_nbytes=READ_CACHE_BYTES)
    try:
        check_seconds = time.perf_counter() - started
        started = time.perf_counter()
        known = {} if file is None or source.kind != "folder" else _known_digests(file)
        content = {name: split_content(source, name, known) for name in source.splits}
        report = ReuseReport(None, computed=sum(len(c.keys) for c in content.values()),
                             hash_seconds=time.perf_counter() - started,
                             hashed=sum(c.n_hashed for c in content.values()))
        plan = ReusePlan(content, report, engine, reuse)
        if file is not None:
            started = time.perf_counter()
            plan.file, file = file, None
            try:
                _match(plan, path, progress)
            except BaseException:
                plan.close()
                raise
            check_seconds += time.perf_counter() - started
        report.check_seconds = check_seconds
        return plan
    finally:
        if file is not None:
            file.close()


def _known_digests(file: h5py.File) -> dict[tuple[str, int, int], bytes]:
    """``(key, size, mtime_ns)`` → content digest of every row of a source cache that records its
    file's listing, from chunks that pass their checksums."""
    known = {}
    for name in json.loads(file.attrs["splits"]):
        group = file[name]
        if FILE_STAT not in group:
            continue
        digests, readable = _read_checked(group[CONTENT])
        stats, stats_readable = _read_checked(group[FILE_STAT])
        keys = group["keys"][:]
        for row in np.nonzero(readable & stats_readable & (stats[:, 0] >= 0))[0]:
            key = keys[row].decode("utf-8") if isinstance(keys[row], bytes) else str(keys[row])
            known[(key, int(stats[row, 0]), int(stats[row, 1]))] = digests[row].tobytes()
    return known


def _match(plan: ReusePlan, path: Path, progress) -> None:
    with Cache(path) as cache:
        source_splits = list(cache.splits)
        plan.source_build = dict(cache.build_info)
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
        for key in ("features", "pooled"):
            if encodes_directly(plan.file[name][key]) is not None:
                plan.stored[(s, key)] = StoredChunks(plan.file[name][key])
        if copies_as_stored(plan.file[name]["features"]):
            plan.copy_as_stored.add(s)
        plan.feature_shape = plan.file[name]["features"].shape[1:]
        plan.feature_dtype = plan.file[name]["features"].dtype
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


def copies_as_stored(features) -> bool:
    """Whether a source's features rows can be copied as stored into the file this build writes:
    one row per chunk, deflate then fletcher32 (a file written before one-row chunks is decoded)."""
    layout = encodes_directly(features)
    return layout is not None and layout[1] == FEATURE_CHUNK_ROWS == 1


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
    """Check once every chunk of features and pooled that the copy will read; examples whose row
    lies in a chunk that fails are computed instead. Returns how many.

    Chunks are checked as HDF5 checks them on reading (fletcher32 of the stored bytes) without
    inflating them; those of another filter pipeline are read through HDF5."""
    failed: dict[int, list[tuple[int, int]]] = {}  # source split → failing (first row, rows) chunks
    for s, name in enumerate(plan.source_splits):
        needed = set()
        for where, row in zip(plan.where.values(), plan.row.values()):
            needed.update(int(r) for r in row[where == s])
        group = plan.file[name]
        for key in ("features", "pooled"):
            dataset, step = group[key], group[key].chunks[0]
            chunks = sorted({r // step for r in needed})
            if (s, key) in plan.stored:
                bad = [c for c in chunks if not plan.stored[(s, key)].checked(c)]
            else:
                bad = _failing_chunks(dataset, chunks)
            failed.setdefault(s, []).extend((chunk * step, step) for chunk in bad)
    count = 0
    for where, row in zip(plan.where.values(), plan.row.values()):
        for i in np.nonzero(where >= 0)[0]:
            bad = failed.get(int(where[i]), ())
            if any(lo <= row[i] < lo + step for lo, step in bad):
                where[i], row[i] = -1, -1
                count += 1
    return count


def _failing_chunks(dataset, chunks: list[int], together: int = 32) -> list[int]:
    """Which of ``chunks`` fail to read through HDF5 (checksums): runs of up to ``together``
    neighbouring chunks are read at once, and one by one only where a run fails."""
    step, bad = dataset.chunks[0], []
    runs, run = [], []
    for chunk in chunks:
        if run and (chunk != run[-1] + 1 or len(run) == together):
            runs.append(run)
            run = []
        run.append(chunk)
    if run:
        runs.append(run)
    for run in runs:
        try:
            dataset[run[0] * step : (run[-1] + 1) * step]
        except OSError:
            for chunk in run:
                try:
                    dataset[chunk * step : (chunk + 1) * step]
                except OSError:
                    bad.append(chunk)
    return bad
