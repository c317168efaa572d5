"""The HDF5 cache file: writing it (``.partial`` → final, resumable), reading it, verifying it.

Layout of ``<dataset>-<model>-<size>-<fingerprint12>.h5``::

    /                 attrs: format, format_version, fingerprint, config (JSON), class_names,
                             versions (JSON), created, complete, build (JSON: engine, batch size…)
    /<split>/features (N, s, s, 1280) float16|float32, chunked along N, compressed, fletcher32
    /<split>/pooled   (N, 1280) float32: mean over the spatial axes of the float32 features
    /<split>/labels   (N,) int64
    /<split>/keys     (N,) UTF-8: relative path or tfds id
    /<split>/content  (N, 32) uint8: sha256 of the file's bytes, or of the tfds id (content.py)
    /<split>/skipped  (M, 2) UTF-8: key, reason
    /train/view_features (N, K, s, s, 1280), /train/view_pooled (N, K, 1280): with ``--views K``
                      only, the K augmented views of each train row (``bottlecache.data.augment``)
              attrs:  spec, n_examples, n_done, n_rows, n_skipped, complete

A split's attributes ``n_rows`` / ``n_skipped`` / ``n_done`` are the commit record: they are
written once the rows of a batch are flushed and fsync'ed, then flushed and fsync'ed in turn.
Rows beyond ``n_rows`` (a batch that was being written when the process died) are cut off on
resume. The disk space a batch may need is claimed before it is written, so that a full disk
stops the build with every committed batch intact.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np

from ..core.errors import BottlecacheError, CacheMismatchError, reason
from ..core.files import fsync_dir, newest_first
from ..core.fingerprint import FORMAT_NAME, FORMAT_VERSION, canonical_json, fingerprint
from ..core.options import resolve_cache_dir
from ..core.records import CacheAttrs, differences, python_value, validate
from ..core.tf import import_tf
from ..models.cut import feature_shape_of
from .chunks import encode_rows, encodes_directly, write_chunks

COMMIT_ROWS = 32  # rows per commit of a build (whole chunks of every dataset below: a commit writes each chunk once)
# One row per features chunk, so that an incremental build copies any row's stored bytes as they
# are wherever an added or removed file shifts the rows (reuse.py); multi-row chunks would be
# decoded and encoded again (sizes and read speeds: docs/cache-format.md, "Storage").
FEATURE_CHUNK_ROWS = 1
POOLED_CHUNK_ROWS = COMMIT_ROWS  # pooled rows are read all at once (heads): one-row chunks read 1.6x slower
# gzip 1: the smallest file that reads back as fast as lzf's (docs/cache-format.md, "Storage").
COMPRESSION, COMPRESSION_LEVEL = "gzip", 1
PARTIAL_SUFFIX = ".partial"
# Room for the chunks a commit touches (a commit's features are 2 MB of float16 at 160 px).
WRITE_CHUNK_CACHE = 32 << 20
_STR = h5py.string_dtype("utf-8")


# What to do with a file under a cache's final name that cannot be used: rebuilding needs the name free.
DAMAGED_ADVICE = ("delete or move the file, then run `bottlecache cache build` with the same options "
                  "to build it again")
SPLIT_DATASETS = ("features", "pooled", "labels", "keys", "skipped")
VIEW_DATASETS = ("view_features", "view_pooled")  # K augmented views of train rows; one mirror of the others'
VIEWS_SPLIT = "train"


def views_of(config: dict, split: str) -> int:
    """Views per row a split of a cache with this config holds: the train split its ``views`` (K
    augmented views), every other split one (each image's mirror) if it was built with ``tta: flip``."""
    if split == VIEWS_SPLIT:
        return int((config.get("views") or {}).get("k", 0))
    return 1 if config.get("tta") == "flip" else 0
CONTENT = "content"  # per-row content digests (content.py); caches written before it lack them
# per-row (size, mtime_ns) of the file the row came from, -1 for none: a later build of the folder
# takes the digest of a file listed the same instead of reading it again (content.py)
FILE_STAT = "file_stat"
ROW_RECORDS = (CONTENT, FILE_STAT)  # per-row records beside the features (optional: older caches lack them)


def cache_file_name(dataset: str, model: str, image_size: int, fp: str) -> str:
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in dataset).strip("._") or "data"
    return f"{safe}-{model}-{image_size}-{fp[:12]}.h5"


# ---------------------------------------------------------------------------------------------
# Writing


@contextlib.contextmanager
def build_lock(final_path: Path, *, wait: bool = True, on_wait=None):
    """An exclusive lock per cache: never two writers. The OS releases it if the process dies.

    The lock file holds the writer's pid, written right after the lock is taken. The holder
    deletes the file before letting go, so no lock file outlives a build (a failed one included);
    a process that took the lock on a file that was deleted meanwhile opens the path again.
    A process that finds the lock held may look a moment before the pid is there (or see the pid
    of a writer that was killed): it looks again for up to a second for a live pid before saying
    "another process".
    """
    lock_path = final_path.with_name("." + final_path.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _lock_holder(fd)
                if not wait:
                    raise BottlecacheError(
                        f"Another build of this cache is running (pid {holder}); wait for it or run again later."
                    ) from None
                if on_wait:
                    on_wait(holder)
                fcntl.flock(fd, fcntl.LOCK_EX)
            if not _same_file(fd, lock_path):  # the holder deleted it as we waited: lock the path anew
                os.close(fd)
                continue
        except BaseException:
            os.close(fd)
            raise
        break
    try:
        os.pwrite(fd, f"{os.getpid():>12}".encode(), 0)  # one fixed-width write: never read half-done
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock_path.unlink()  # while still holding it: a waiter then sees another inode and retries
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _lock_holder(fd: int, patience: float = 1.0) -> str:
    deadline = time.monotonic() + patience
    while True:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        if text.isdigit() and _alive(int(text)):
            return text
        if time.monotonic() > deadline:
            return "another process"
        time.sleep(0.01)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, and another user's
        pass
    return True


class Rows(NamedTuple):
    """A computed window's rows, as ``PartialCache.append`` commits them (``n_done``: the split's
    input rows done once they are)."""

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


class PartialCache:
    """A cache being written: ``<name>.h5.partial``, appended batch by batch, then renamed."""

    def __init__(self, final_path: Path, fp: str):
        self.final_path = Path(final_path)
        self.path = self.final_path.with_name(self.final_path.name + PARTIAL_SUFFIX)
        self.fingerprint = fp
        self.file: h5py.File | None = None
        self.resumed = False
        self._found: dict[str, dict[str, _Column]] = {}  # _columns of the open file

    # -- opening ----------------------------------------------------------------------------
    def open(self, root_attrs: dict, splits: dict[str, dict], feature_shape, dtype: str,
             views: dict | None = None) -> "PartialCache":
        """Resume the partial file if it is ours and readable, else start a new one (``views``: split →
        views per row, ``views_of``)."""
        self.resumed = self.path.exists() and self._try_resume()
        if not self.resumed:
            if self.path.exists():
                self.path.unlink()
            self._create(root_attrs, splits, feature_shape, dtype, views)
        return self

    def _try_resume(self) -> bool:
        try:
            f = h5py.File(self.path, "r+", rdcc_nbytes=WRITE_CHUNK_CACHE)
        except OSError:
            return False
        try:
            if f.attrs.get("fingerprint") != self.fingerprint:
                raise ValueError("fingerprint")
            for name in json.loads(f.attrs["splits"]):
                group = f[name]
                rows, n_skipped = int(group.attrs["n_rows"]), int(group.attrs["n_skipped"])
                for key, n in (("keys", rows), ("skipped", n_skipped)):
                    _clear_strings_from(group[key], n)
                row_keys = ["features", "pooled", "labels", "keys", *(k for k in (*ROW_RECORDS, *VIEW_DATASETS) if k in group)]
                for key in row_keys:
                    group[key].resize(rows, axis=0)
                group["skipped"].resize(n_skipped, axis=0)
                # the last committed rows (in the chunks a batch rewrites) must read back and pass their checksums
                for key in (*row_keys, "skipped"):
                    n = n_skipped if key == "skipped" else rows
                    group[key][max(0, n - group[key].chunks[0]) : n]
            self.file = f
            return True
        except Exception:
            f.close()
            return False

    def _create(self, root_attrs, splits, feature_shape, dtype, views: dict | None = None):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Not libver="latest": its superblock (v3) marks the file open for writing until it is
        # closed, and HDF5 then refuses to reopen a file whose writer was killed, so a resume
        # would silently start over. A v1.8 lower bound keeps the file reopenable.
        f = h5py.File(self.path, "w", libver=("v108", "latest"), rdcc_nbytes=WRITE_CHUNK_CACHE)
        for key, value in root_attrs.items():
            f.attrs[key] = value
        f.attrs["splits"] = json.dumps(list(splits))
        f.attrs["complete"] = False
        for name, attrs in splits.items():
            group = f.create_group(name)
            checked = dict(compression=COMPRESSION, compression_opts=COMPRESSION_LEVEL, fletcher32=True)
            group.create_dataset(
                "features", (0, *feature_shape), dtype=dtype, maxshape=(None, *feature_shape),
                chunks=(FEATURE_CHUNK_ROWS, *feature_shape), **checked,
            )
            n_channels = feature_shape[-1]
            group.create_dataset(
                "pooled", (0, n_channels), dtype="float32", maxshape=(None, n_channels),
                chunks=(POOLED_CHUNK_ROWS, n_channels), **checked,
            )
            # labels in chunks of 32 rows too, as a commit writes them: a commit then rewrites no
            # committed chunk (unless files were skipped); HDF5 may place a rewritten chunk over
            # the committed copy before the commit is on disk, and a kill then loses the partial
            group.create_dataset(
                "labels", (0,), dtype="int64", maxshape=(None,), chunks=(COMMIT_ROWS,), **checked
            )
            k = (views or {}).get(name, 0)
            if k:  # one chunk per view of 32 rows (views are never copied)
                group.create_dataset(
                    "view_features", (0, k, *feature_shape), dtype=dtype, maxshape=(None, k, *feature_shape),
                    chunks=(COMMIT_ROWS, 1, *feature_shape), **checked,
                )
                group.create_dataset(
                    "view_pooled", (0, k, n_channels), dtype="float32", maxshape=(None, k, n_channels),
                    chunks=(POOLED_CHUNK_ROWS, k, n_channels), **checked,
                )
            group.create_dataset("keys", (0,), dtype=_STR, maxshape=(None,), chunks=(4096,))
            group.create_dataset(CONTENT, (0, 32), dtype="uint8", maxshape=(None, 32),
                                 chunks=(COMMIT_ROWS, 32), **checked)
            group.create_dataset(FILE_STAT, (0, 2), dtype="int64", maxshape=(None, 2),
                                 chunks=(COMMIT_ROWS, 2), **checked)
            group.create_dataset("skipped", (0, 2), dtype=_STR, maxshape=(None, 2), chunks=(256, 2))
            for key, value in attrs.items():
                group.attrs[key] = value
            group.attrs.update(n_done=0, n_rows=0, n_skipped=0, complete=False)
        self.file = f
        self._sync()

    # -- writing ----------------------------------------------------------------------------
    def progress(self, split: str) -> tuple[int, bool]:
        group = self.file[split]
        return int(group.attrs["n_done"]), bool(group.attrs["complete"])

    def append(self, rows: Rows) -> None:
        """Write one batch's rows, then commit them (attributes, flush, fsync). ``views``: the rows'
        ``(view_features, view_pooled)`` in a split built with views; ``contents`` and ``stats``:
        the rows' (n, 32) content digests and (n, 2) file sizes and times; ``stored``: features
        rows already encoded as this file stores them (row in the batch → one-row chunk, copied
        from another cache by an incremental build; their rows of ``features`` are not used)."""
        split, features, pooled, labels, keys, skipped, n_done, views, contents, stats, stored = rows
        group, columns_of = self.file[split], self._columns(split)
        view_keys = [k for k in VIEW_DATASETS if k in columns_of]
        records = [k for k in ROW_RECORDS if k in columns_of]
        rows, n = int(group.attrs["n_rows"]), len(labels)
        # every chunk this batch touches, at its raw size, and the strings: the most it can write
        need = sum(len(str(text).encode("utf-8")) + 64 for text in [*keys, *(t for pair in skipped for t in pair)])
        n_skipped = int(group.attrs["n_skipped"])
        for key in ("features", "pooled", "labels", "keys", "skipped", *records, *view_keys):
            first, count = (n_skipped, len(skipped)) if key == "skipped" else (rows, n)
            if count:
                column = columns_of[key]
                touched = (first + count - 1) // column.chunk_rows - first // column.chunk_rows + 1
                need += touched * column.chunk_bytes
        # Whole chunks are compressed and checksummed here, with the GIL released (chunks.py);
        # HDF5 would do it inside the write, holding the GIL the engine's thread needs.
        if features is not None:  # (computed in float32: cast here, in the commit thread, by NumPy)
            features = np.asarray(features, dtype=columns_of["features"].dataset.dtype)
        contents = np.zeros((n, 32), np.uint8) if contents is None else contents
        stats = np.full((n, 2), -1, np.int64) if stats is None else stats
        columns = [("features", features), ("pooled", pooled), ("labels", labels), ("keys", keys)] if n else []
        columns += [(key, value) for key, value in ((CONTENT, contents), (FILE_STAT, stats)) if n and key in records]
        if n and view_keys:
            if views is None:
                raise ValueError(f"split {split!r} holds views: a batch without them cannot be appended")
            columns += list(zip(VIEW_DATASETS, views))
        encoded = {key: encode_rows(columns_of[key].dataset, rows, values, stored if key == "features" else None,
                                    layout=columns_of[key].layout)
                   for key, values in columns if key != "keys"}
        self._reserve(need)
        for key, values in columns:
            dataset = columns_of[key].dataset
            dataset.resize(rows + n, axis=0)
            if encoded.get(key) is not None:
                write_chunks(dataset, encoded[key])
            else:
                dataset[rows:] = values
        if skipped:
            group["skipped"].resize(n_skipped + len(skipped), axis=0)
            group["skipped"][n_skipped:] = np.array(skipped, dtype=object)
        self._sync()  # the rows on disk first: a commit record must never be there before its rows
        group.attrs.update(n_rows=rows + n, n_skipped=n_skipped + len(skipped), n_done=n_done)
        self._sync()

    def _columns(self, split: str) -> dict[str, "_Column"]:
        """The datasets of ``split`` and what ``append`` needs to know of them, looked up once per
        file (each h5py lookup costs about 0.2 ms, with the GIL held: 30 of them per commit)."""
        if self.file is None:
            raise ValueError("the partial cache is not open")
        if split not in self._found:
            group = self.file[split]
            self._found[split] = {key: _Column.of(group[key]) for key in group}
        return self._found[split]

    def complete_split(self, split: str, seconds: float) -> None:
        self._reserve(0)
        self.file[split].attrs.update(complete=True, seconds=seconds)
        self._sync()

    def finalize(self, extra_attrs: dict) -> Path:
        """Mark complete, close, fsync and rename to the final name (atomic)."""
        self._reserve(0)
        for key, value in extra_attrs.items():
            self.file.attrs[key] = value
        self.file.attrs["complete"] = True
        self._sync()
        self.close()
        os.replace(self.path, self.final_path)
        fsync_dir(self.final_path.parent)
        return self.final_path

    def _reserve(self, nbytes: int) -> None:
        """Claim the disk space of the next write (at most ``nbytes`` of chunks, plus 1 MiB for
        metadata) before any of it is written.

        HDF5 rewrites a batch's partly filled chunks in place or at the end of the file, over the
        last committed copy; a write that fails half-way (disk full) would leave the committed rows
        unreadable. With the space claimed first, a full disk fails here, with nothing written since
        the last commit, and the next run resumes from it. ``_sync`` gives back what was not used.
        """
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(self.file.id.get_vfd_handle(), self.file.id.get_filesize(), nbytes + (1 << 20))

    def _sync(self) -> None:
        self.file.flush()
        fd = self.file.id.get_vfd_handle()
        end = self.file.id.get_filesize()  # HDF5's end of file: nothing it wrote or allocated lies beyond
        if os.fstat(fd).st_size > end:
            os.ftruncate(fd, end)  # the unused part of the space _reserve claimed
        os.fsync(fd)

    def close(self) -> None:
        if self.file is not None:
            with contextlib.suppress(Exception):
                self.file.close()
            self.file = None
        self._found = {}


@dataclass(frozen=True)
class _Column:
    """A row dataset of a split being written, with its fixed layout."""

    dataset: h5py.Dataset
    chunk_rows: int
    chunk_bytes: int  # the raw bytes of the chunks holding one chunk's rows (a string: its heap reference)
    layout: tuple[int, int] | None  # chunks.encodes_directly

    @classmethod
    def of(cls, dataset) -> "_Column":
        itemsize = 16 if dataset.dtype.kind == "O" else dataset.dtype.itemsize
        per_row_chunks = int(np.prod(dataset.shape[1:])) // int(np.prod(dataset.chunks[1:]))  # views: K
        return cls(dataset, dataset.chunks[0], per_row_chunks * int(np.prod(dataset.chunks)) * itemsize,
                   encodes_directly(dataset))


def _clear_strings_from(dataset, n: int) -> None:
    """Zero the string entries from row ``n`` on, in place and without freeing what they point to.

    Entries past the commit (from a batch cut off by a kill) can point into heap space that never
    reached the disk; HDF5 frees what an entry points to when the entry is overwritten, and fails
    there ("bad heap index"). The chunks are unfiltered: their raw bytes are the references.
    """
    if dataset.compression or dataset.fletcher32:  # raw bytes would be compressed: not ours to edit
        return
    per_chunk = dataset.chunks[0]
    for lo in range(n - n % per_chunk, max(n, dataset.shape[0]), per_chunk):
        offset = (lo,) + (0,) * (dataset.ndim - 1)
        if dataset.id.get_chunk_info_by_coord(offset).byte_offset is None:
            continue
        mask, raw = dataset.id.read_direct_chunk(offset)
        keep = max(0, n - lo) * (len(raw) // per_chunk)
        if any(raw[keep:]):
            dataset.id.write_direct_chunk(offset, raw[:keep] + bytes(len(raw) - keep), mask)


def _failing_rows(dataset, lo: int, hi: int) -> list[tuple[int, int]]:
    """The row ranges of ``[lo, hi)`` whose chunks fail to read, neighbouring chunks joined (a
    features chunk is one row: verify names the damaged rows, not the block read at once)."""
    step = (dataset.chunks or (hi - lo,))[0]
    ranges: list[list[int]] = []
    for first in range(lo, hi, step):
        last = min(first + step, hi) - 1
        try:
            dataset[first : last + 1]
        except OSError:
            if ranges and ranges[-1][1] == first - 1:
                ranges[-1][1] = last
            else:
                ranges.append([first, last])
    return [(a, b) for a, b in ranges] or [(lo, hi - 1)]


# ---------------------------------------------------------------------------------------------
# Reading


class NotACacheError(BottlecacheError):
    """Another kind of file where a cache was expected: nothing to verify or repair."""


def _is_hdf5(path: Path) -> bool:
    try:
        return h5py.is_hdf5(path)
    except OSError:
        return False


class Cache:
    """A finished cache, open for reading.

    Parameters
    ----------
    path : str or Path
        A ``.h5`` file written by ``build_cache``.

    Raises
    ------
    BottlecacheError
        The file is missing, partial, not HDF5, or not a bottlecache file.
    """

    def __init__(self, path):
        self.path = Path(path)
        if self.path.name.endswith(PARTIAL_SUFFIX):
            raise BottlecacheError(
                f"{self.path} is a partial cache (a build that has not finished); run the same "
                "`cache build` command again to complete it."
            )
        if not self.path.is_file():
            raise BottlecacheError(f"No cache file at {self.path}.")
        if not os.access(self.path, os.R_OK):
            raise BottlecacheError(f"{self.path} cannot be read (permission denied); give this user read access to it.")
        if not self.path.name.endswith(".h5") and not _is_hdf5(self.path):  # a .tflite, a .keras … given as a cache
            raise NotACacheError(f"{self.path} is not a cache (not an HDF5 file); pass a cache file (.h5) or a "
                                 "fingerprint prefix.")
        try:
            self.file = h5py.File(self.path, "r")
        except OSError as error:
            raise BottlecacheError(
                f"{self.path} is not a readable HDF5 file ({reason(error, 80)}); {DAMAGED_ADVICE}"
            ) from None
        try:
            self._load_record()
        except BaseException:
            self.file.close()
            raise

    def _load_record(self) -> None:
        attrs = {key: python_value(self.file.attrs[key]) for key in self.file.attrs}
        where = str(self.path)
        if attrs.get("format") != FORMAT_NAME:
            raise BottlecacheError(f"{where} is an HDF5 file but not a bottlecache cache; {DAMAGED_ADVICE}")
        _check_fingerprint(attrs, where)  # first: a config edited after the build is the likeliest fault
        record = validate(attrs, CacheAttrs, where, DAMAGED_ADVICE, fmt=FORMAT_NAME, version=FORMAT_VERSION)
        if not record.complete:
            raise BottlecacheError(f"{where} is marked incomplete; {DAMAGED_ADVICE}")
        self.record = record
        self.fingerprint: str = record.fingerprint
        self.config: dict = json.loads(attrs["config"])
        self.class_names: list[str] = list(record.class_names)
        self.splits: list[str] = list(record.splits)
        self.build_info: dict = dict(record.build)
        self.created: str = record.created
        self.versions: dict = dict(record.versions)
        expected = feature_shape_of(self.config)
        for split in self.splits:
            group = self.file.get(split)
            if not isinstance(group, h5py.Group):
                raise BottlecacheError(f"{where}: split {split!r} is named in the metadata but missing; {DAMAGED_ADVICE}")
            missing = [k for k in SPLIT_DATASETS if not isinstance(group.get(k), h5py.Dataset)]
            if missing:
                raise BottlecacheError(f"{where}: split {split!r} has no {', '.join(missing)}; {DAMAGED_ADVICE}")
            n = group["labels"].shape[0] if group["labels"].ndim == 1 else -1
            shapes = {"features": (n, *expected), "pooled": (n, expected[-1]), "keys": (n,)}
            k = views_of(self.config, split)
            if k:
                missing = [name for name in VIEW_DATASETS if not isinstance(group.get(name), h5py.Dataset)]
                if missing:
                    raise BottlecacheError(f"{where}: split {split!r} has no {', '.join(missing)}; {DAMAGED_ADVICE}")
                shapes.update(view_features=(n, k, *expected), view_pooled=(n, k, expected[-1]))
            for key, width in ((CONTENT, 32), (FILE_STAT, 2)):
                if key in group:
                    shapes[key] = (n, width)
            wrong = [f"{k} {group[k].shape}" for k, shape in shapes.items() if group[k].shape != shape]
            if n < 0 or wrong or group["skipped"].ndim != 2:
                raise BottlecacheError(
                    f"{where}: split {split!r} has arrays of the wrong shape ({', '.join(wrong) or 'labels'}; "
                    f"expected {n} rows of {expected}); {DAMAGED_ADVICE}"
                )
            self._check_commit_record(split, group, n)
            check_virtual_sources(self.path, split, group)

    def _check_commit_record(self, split: str, group, n_rows: int) -> None:
        """The split's commit record must agree with its arrays: ``n_rows`` rows, ``n_skipped``
        skipped, together the split's ``n_examples``."""
        counts = {key: python_value(group.attrs.get(key)) for key in ("n_rows", "n_skipped", "n_examples")}
        bad = [key for key, value in counts.items() if isinstance(value, bool) or not isinstance(value, int)]
        n_skipped = group["skipped"].shape[0]
        if bad or counts["n_rows"] != n_rows or counts["n_skipped"] != n_skipped \
                or counts["n_examples"] != n_rows + n_skipped:
            detail = (f"attribute {bad[0]} is {counts[bad[0]]!r}, not a count" if bad else
                      f"its record says {counts['n_rows']} rows + {counts['n_skipped']} skipped of "
                      f"{counts['n_examples']}, its arrays hold {n_rows} + {n_skipped}")
            raise BottlecacheError(f"{self.path}: split {split!r}: {detail}; {DAMAGED_ADVICE}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self.file.close()

    def __repr__(self) -> str:
        counts = ", ".join(f"{s}={self.n_examples(s)}" for s in self.splits)
        return f"Cache({self.path.name!r}, {counts})"

    @property
    def image_size(self) -> int:
        return int(self.config["image_size"])

    @property
    def n_views(self) -> int:
        """Augmented views per train row (0: built without ``--views``)."""
        return int((self.config.get("views") or {}).get("k", 0))

    def view_features(self, rows: slice | None = None) -> np.ndarray:
        """The train rows' augmented views of the features: (n, K, s, s, C)."""
        return self._read(VIEWS_SPLIT, "view_features", rows)

    def view_pooled(self, rows: slice | None = None) -> np.ndarray:
        """The train rows' augmented views, pooled: (n, K, C) float32."""
        return self._read(VIEWS_SPLIT, "view_pooled", rows)

    @property
    def tta(self) -> str:
        """``flip`` if the splits but train hold each image's mirror (``cache build --tta flip``), else ``none``."""
        return self.config.get("tta") or "none"

    def mirrored_features(self, split: str, rows: slice | None = None) -> np.ndarray:
        """The features of each image's mirror, (n, s, s, C), in a split other than train of a ``tta`` cache."""
        return self._read(split, "view_features", rows)[:, 0]

    def mirrored_pooled(self, split: str, rows: slice | None = None) -> np.ndarray:
        """The pooled features of each image's mirror, (n, C) float32."""
        return self._read(split, "view_pooled", rows)[:, 0]

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        return tuple(self.file[self.splits[0]]["features"].shape[1:])

    def _group(self, split: str):
        if split not in self.splits:
            raise BottlecacheError(f"The cache has no split {split!r}. It has {', '.join(self.splits)}.")
        return self.file[split]

    def n_examples(self, split: str) -> int:
        return int(self._group(split)["labels"].shape[0])

    def features(self, split: str, rows: slice | None = None) -> np.ndarray:
        return self._read(split, "features", rows)

    def pooled(self, split: str, rows: slice | None = None) -> np.ndarray:
        return self._read(split, "pooled", rows)

    def labels(self, split: str) -> np.ndarray:
        """The split's labels, checked to lie in ``[0, number of classes)``."""
        labels = self._read(split, "labels", None)
        if labels.dtype.kind not in "iu" or (len(labels) and (labels.min() < 0 or labels.max() >= len(self.class_names))):
            raise BottlecacheError(
                f"{self.path}: split {split!r} has labels outside 0-{len(self.class_names) - 1} (its "
                f"{len(self.class_names)} classes); {DAMAGED_ADVICE}"
            )
        return labels

    def keys(self, split: str) -> list[str]:
        return [_text(k) for k in self._read(split, "keys", None)]

    def has_contents(self) -> bool:
        """Whether every split stores its rows' content digests (caches from before them do not)."""
        return all(isinstance(self.file[s].get(CONTENT), h5py.Dataset) for s in self.splits)

    def contents(self, split: str) -> np.ndarray:
        """(N, 32) uint8: each row's content digest (see bottlecache.data.content)."""
        return self._read(split, CONTENT, None)

    def skipped(self, split: str) -> list[tuple[str, str]]:
        return [(_text(k), _text(r)) for k, r in self._read(split, "skipped", None)]

    def _read(self, split: str, name: str, rows):
        dataset = self._group(split)[name]
        try:
            return dataset[rows if rows is not None else slice(None)]
        except OSError as error:
            raise BottlecacheError(
                f"{self.path.name}: split {split!r} {name} failed to read ({reason(error, 120)}); "
                f"run `bottlecache cache verify {self.path}`, then {DAMAGED_ADVICE}"
            ) from None

    def nbytes(self, split: str) -> int:
        group = self._group(split)
        return sum(group[k].id.get_storage_size() for k in (*SPLIT_DATASETS, *ROW_RECORDS, *VIEW_DATASETS) if k in group)

    def dataset(self, split: str, what: str = "features", batch_size: int | None = None, keep=None):
        """A ``tf.data.Dataset`` of ``(x, label)`` streamed from the file chunk by chunk.

        ``what`` is ``"features"`` (float32, (s, s, 1280)) or ``"pooled"`` ((1280,)). ``keep``: a
        boolean mask over the split's rows; the others are left out.
        """

        tf = import_tf()
        if what not in ("features", "pooled"):
            raise BottlecacheError(f"The 'what' option must be one of features, pooled. Got {what!r} instead.")
        n = self.n_examples(split)
        shape = self.feature_shape if what == "features" else (self.feature_shape[-1],)
        step = COMMIT_ROWS * 8 if what == "features" else POOLED_CHUNK_ROWS
        labels = self.labels(split)

        kept = np.ones(n, bool) if keep is None else np.asarray(keep, bool)

        def generate():  # whole blocks: one Python step per block, not per row (tf.data unbatches them)
            for start in range(0, n, step):
                block = self._read(split, what, slice(start, start + step)).astype(np.float32)
                mask = kept[start : start + step]
                yield block[mask], labels[start : start + step][mask]

        ds = tf.data.Dataset.from_generator(
            generate,
            output_signature=(tf.TensorSpec((None, *shape), tf.float32), tf.TensorSpec((None,), tf.int64)),
        ).unbatch()
        ds = ds.apply(tf.data.experimental.assert_cardinality(int(kept.sum())))
        return ds.batch(batch_size).prefetch(2) if batch_size else ds

    def check(self, **expected) -> None:
        """Raise ``CacheMismatchError`` naming every key whose stored value differs.

        Example: ``cache.check(image_size=160, model="mobilenet_v2", weights_sha256=...)``.
        """
        differ = differences(self.config, expected, "cache")
        if differ:
            raise CacheMismatchError(f"{self.path.name} does not match: {differ}.")


def check_virtual_sources(path: Path, split: str, group) -> None:
    """Every file a virtual dataset (a cache joined from shards) reads from must exist: HDF5 reads a
    missing source as fill values, without an error. Relative sources lie beside the cache file."""
    for name in ("features", "pooled"):
        dataset = group[name]
        if not dataset.is_virtual:
            continue
        for source in dataset.virtual_sources():
            if source.file_name == ".":
                continue
            shard = Path(source.file_name)
            shard = shard if shard.is_absolute() else Path(path).parent / shard
            if not shard.is_file():
                raise BottlecacheError(
                    f"{path}: split {split!r} {name} reads from the shard {shard}, which is missing; restore "
                    f"the shard folder beside the cache, or {DAMAGED_ADVICE}"
                )


def _check_fingerprint(attrs: dict, where: str) -> None:
    """The stored config must hash to the stored fingerprint (whatever else is wrong with it)."""
    try:
        config = json.loads(attrs.get("config"))
        stored = attrs.get("fingerprint")
        matches = isinstance(config, dict) and fingerprint(config) == stored
    except (TypeError, ValueError):
        return  # not JSON, or values that cannot be hashed: the schema says which field
    if isinstance(config, dict) and isinstance(stored, str) and not matches:
        raise BottlecacheError(
            f"{where}: the stored config does not match the stored fingerprint (modified after the build?); "
            f"{DAMAGED_ADVICE}"
        )


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def list_caches(cache_dir=None) -> list[Path]:
    """Cache files (``*.h5``) in the cache dir, newest first; a dangling link is listed too (last),
    so that the listing can say what is wrong with it."""
    folder = resolve_cache_dir(cache_dir)
    if not folder.is_dir():
        return []
    try:
        paths = list(folder.glob("*.h5"))
        os.listdir(folder)  # glob hides a folder that cannot be read
    except OSError as error:
        raise BottlecacheError(f"The cache folder {folder} cannot be read ({reason(error)}).") from None

    return newest_first(paths)


def find_cache(spec=None, cache_dir=None) -> Path:
    """A cache file path, a unique fingerprint prefix in the cache dir, or (None) the newest one."""
    if spec is not None and not str(spec).strip():  # Path("") is "."
        raise BottlecacheError("The 'cache' argument is empty; pass a cache file, a fingerprint prefix, or nothing "
                               "for the newest cache.")
    if spec is not None and ("/" in str(spec) or str(spec).endswith((".h5", PARTIAL_SUFFIX)) or Path(spec).exists()):
        if not Path(spec).exists():
            raise BottlecacheError(f"No cache file at {spec}.")
        return Path(spec)
    caches = [p for p in list_caches(cache_dir) if p.is_file()]
    if spec is None:
        if not caches:
            raise BottlecacheError(
                f"No cache in {resolve_cache_dir(cache_dir)}; run `bottlecache cache build` first."
            )
        return caches[0]
    matches = [p for p in caches if p.stem.rsplit("-", 1)[-1].startswith(str(spec).lower())]
    if len(matches) != 1:
        found = "none" if not matches else ", ".join(p.name for p in matches)
        raise BottlecacheError(
            f"The cache {spec!r} must be a cache file or a unique fingerprint prefix in "
            f"{resolve_cache_dir(cache_dir)}. Matches: {found}."
        )
    return matches[0]


def open_cache(spec=None, cache_dir=None, **expected) -> Cache:
    """Open a finished cache (see ``find_cache``) and check it against ``expected`` config values."""
    cache = Cache(find_cache(spec, cache_dir))
    try:
        cache.check(**expected)
    except BottlecacheError:
        cache.close()
        raise
    return cache


# ---------------------------------------------------------------------------------------------
# Verifying


@dataclass
class VerifyReport:
    path: Path
    problems: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    bytes_read: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_cache(path) -> VerifyReport:
    """Read every chunk (checking its fletcher32 checksum), shapes, counts and the fingerprint."""
    start = time.perf_counter()
    report = VerifyReport(Path(path))
    try:
        cache = Cache(path)  # checks the format, completeness and config against the fingerprint
    except NotACacheError:
        raise
    except BottlecacheError as error:
        report.problems.append(str(error))
        return report
    with cache:
        if not cache.path.stem.endswith(cache.fingerprint[:12]):
            report.problems.append("the file name does not carry the cache's fingerprint")
        expected_shape = feature_shape_of(cache.config)
        n_classes = len(cache.class_names)
        for split in cache.splits:
            if split not in cache.file:
                report.problems.append(f"split {split!r}: missing")
                continue
            group = cache.file[split]
            n = group["labels"].shape[0]
            report.counts[split] = n
            lengths = {k: group[k].shape[0] for k in ("features", "pooled", "labels", "keys", *ROW_RECORDS) if k in group}
            if len(set(lengths.values())) != 1 or n != int(group.attrs.get("n_rows", -1)):
                report.problems.append(f"split {split!r}: row counts disagree {lengths}")
            if tuple(group["features"].shape[1:]) != expected_shape:
                report.problems.append(
                    f"split {split!r}: features shape {group['features'].shape[1:]} is not {expected_shape}"
                )
            if n + group["skipped"].shape[0] != int(group.attrs.get("n_examples", -1)):
                report.problems.append(f"split {split!r}: {n} rows + skipped is not the split's n_examples")
            for name in ("features", "pooled", "labels", *ROW_RECORDS, *VIEW_DATASETS):
                if name not in group:
                    continue
                dataset = group[name]
                # whole chunks, at least a commit's rows (a virtual dataset, over shards, has no chunks)
                step = max((dataset.chunks or (COMMIT_ROWS,))[0], COMMIT_ROWS)
                for lo in range(0, dataset.shape[0], step):
                    try:
                        block = dataset[lo : lo + step]
                        report.bytes_read += block.nbytes
                    except OSError as error:
                        for first, last in _failing_rows(dataset, lo, min(lo + step, dataset.shape[0])):
                            rows = f"row {first} fails" if first == last else f"rows {first}-{last} fail"
                            report.problems.append(f"split {split!r}: {name} {rows} to read ({reason(error, 120)})")
                        continue
                    if name == "labels" and (block.min(initial=0) < 0 or block.max(initial=0) >= n_classes):
                        report.problems.append(f"split {split!r}: labels out of range in rows {lo}-{lo + step - 1}")
    report.seconds = time.perf_counter() - start
    return report


def root_attrs(config: dict, fp: str, versions: dict) -> dict:
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "fingerprint": fp,
        "config": canonical_json(config),
        "class_names": json.dumps(config["class_names"]),
        "versions": json.dumps(versions),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
