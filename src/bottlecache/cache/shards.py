"""A cache built in shards: planning them, writing one, checking it, joining them, consolidating.

Shard ``i`` of a split covers its input rows ``[i·S, min((i+1)·S, N))`` in the key order of the
single-process build; ``S`` is a multiple of the commit window, so every batch holds the images it
holds in a single-process build. A shard is written by the same resumable, checksummed writer as a
cache (``PartialCache``: ``shard-NNNNN.h5.partial`` → ``shard-NNNNN.h5``) into the folder
``<cache stem>.shards`` beside the cache. The joined cache file reads ``features`` and ``pooled``
from the shards through HDF5 virtual datasets with relative source paths (the folder can move);
``labels``, ``keys`` and ``skipped`` are copied in. ``consolidate`` writes a standalone file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np

from ..core.errors import BottlecacheError, reason
from ..core.files import staged_file, write_error
from ..core.options import check_positive
from ..core.registry import bottleneck_shape
from .store import (
    COMMIT_ROWS,
    COMPRESSION,
    COMPRESSION_LEVEL,
    FEATURE_CHUNK_ROWS,
    PARTIAL_SUFFIX,
    POOLED_CHUNK_ROWS,
    Cache,
    PartialCache,
    build_lock,
    root_attrs,
)
from .writer import Committer, run_split

# Rows per shard. At 160 px a float16 row is 64 KB raw, about 21 KB stored (docs/cache-format.md,
# "Storage"); 32,768 rows make a shard file of about 0.7 GB (1.3 GB at 224 px), and 10 M images
# about 300 shards, 14 M about 430 (docs/scaling-out.md).
DEFAULT_SHARD_SIZE = 32768
MAX_SHARD_SIZE = 1 << 24
SHARD_PATTERN = re.compile(r"shard-(\d{5,})\.h5")


@dataclass(frozen=True)
class ShardSpec:
    """What a worker is sent: shard ``id`` covers input rows ``[lo, hi)`` of ``split``."""

    id: int
    split: str
    lo: int
    hi: int

    @property
    def file_name(self) -> str:
        return f"shard-{self.id:05d}.h5"


def shard_folder(final_path: Path) -> Path:
    return Path(final_path).with_name(Path(final_path).stem + ".shards")


def check_shard_size(shard_size, window: int) -> int:
    check_positive("shard_size", shard_size, maximum=MAX_SHARD_SIZE)
    if shard_size % window:
        raise BottlecacheError(
            f"The 'shard_size' option must be a multiple of {window} (the rows a build commits at once, a whole "
            f"number of engine batches). Got {shard_size!r} instead."
        )
    return shard_size


def plan_shards(source, shard_size: int) -> list[ShardSpec]:
    specs = []
    for name, split in source.splits.items():
        for lo in range(0, split.n_examples, shard_size):
            specs.append(ShardSpec(len(specs), name, lo, min(lo + shard_size, split.n_examples)))
    return specs


# ---------------------------------------------------------------------------------------------
# Writing one shard (in a worker)


def write_shard(resolved, spec: ShardSpec, engine, batch_size, folder: Path, *, versions: dict, progress) -> dict:
    """Write (or resume, or find complete) one shard; return its manifest row."""

    final = Path(folder) / spec.file_name
    with build_lock(final, wait=True):  # a worker of a killed driver may still be writing it
        if final.exists():
            return shard_row(final, spec, resolved.fingerprint)
        partial = PartialCache(final, resolved.fingerprint)
        attrs = {**root_attrs(resolved.config, resolved.fingerprint, versions), **shard_attrs(spec)}
        split_attrs = {spec.split: {"spec": str(resolved.source.splits[spec.split].spec),
                                    "n_examples": spec.hi - spec.lo}}
        partial.open(attrs, split_attrs, bottleneck_shape(resolved.settings.image_size, resolved.settings.model),
                     resolved.settings.dtype)
        committer = Committer(partial)
        try:
            if partial.file.attrs.get("shard") != json.dumps(asdict(spec)):  # resumed from another plan
                partial.close()
                partial.path.unlink()
                partial.open(attrs, split_attrs, bottleneck_shape(resolved.settings.image_size, resolved.settings.model),
                             resolved.settings.dtype)
            partial.file.attrs["writer_pid"] = os.getpid()  # tests kill the writer by it
            partial.file.flush()
            done, complete = partial.progress(spec.split)
            started = time.perf_counter()
            if not complete:
                run_split(committer, engine, resolved, spec.split, range(spec.lo + done, spec.hi), batch_size, progress,
                          offset=spec.lo)
                committer.wait()
                partial.complete_split(spec.split, time.perf_counter() - started)
            partial.finalize({"build": json.dumps({"engine": engine.name, "batch_size": batch_size or engine.batch_size,
                                                   "engine_check": getattr(engine, "checked", "")})})
        except OSError as error:
            raise write_error(partial.path, error, "the shard keeps every finished batch") from None
        finally:
            committer.close()
            partial.close()
        return shard_row(final, spec, resolved.fingerprint)


def shard_attrs(spec: ShardSpec) -> dict:
    return {"shard": json.dumps(asdict(spec))}


def keys_hash(keys) -> str:
    digest = hashlib.sha256()
    for key in keys:
        digest.update((key.decode("utf-8") if isinstance(key, bytes) else str(key)).encode("utf-8") + b"\n")
    return digest.hexdigest()


def shard_row(path: Path, spec: ShardSpec, fp: str) -> dict:
    """The manifest row of a complete shard file, checked against its spec and the fingerprint."""
    try:
        with h5py.File(path, "r") as f:
            where = f"shard {path.name}"
            if f.attrs.get("fingerprint") != fp:
                raise BottlecacheError(f"{where} belongs to another cache (fingerprint)")
            if f.attrs.get("shard") != json.dumps(asdict(spec)) or not f.attrs.get("complete"):
                raise BottlecacheError(f"{where} covers other rows or is incomplete")
            group = f[spec.split]
            rows, n_skipped = group["labels"].shape[0], group["skipped"].shape[0]
            if rows != int(group.attrs["n_rows"]) or rows + n_skipped != spec.hi - spec.lo or \
                    any(group[k].shape[0] != rows for k in ("features", "pooled", "keys")):
                raise BottlecacheError(f"{where}: {rows} rows + {n_skipped} skipped, not {spec.hi - spec.lo}")
            return {"shard": spec.id, "split": spec.split, "lo": spec.lo, "hi": spec.hi, "rows": rows,
                    "skipped": n_skipped, "fingerprint": fp, "keys_sha256": keys_hash(group["keys"][:]),
                    "bytes": path.stat().st_size}
    except (OSError, KeyError, ValueError) as error:
        if isinstance(error, BottlecacheError):
            raise
        raise BottlecacheError(f"shard {path.name} is unreadable ({reason(error, 120)})") from None


def complete_shard_row(folder: Path, spec: ShardSpec, fp: str) -> dict | None:
    """The row of a shard finished by an earlier run, or None (and the file removed) if it is not usable."""
    path = Path(folder) / spec.file_name
    if not path.exists():
        return None
    try:
        return shard_row(path, spec, fp)
    except BottlecacheError:
        path.unlink()
        return None


def clean_orphans(folder: Path, specs: list[ShardSpec]) -> list[Path]:
    """Remove what no planned shard will use: files of other shard plans, a writer's temporary
    files. A shard's partial file stays (its worker resumes it) unless its lock is held."""
    planned = {s.file_name for s in specs}
    removed = []
    for path in sorted(Path(folder).iterdir()):
        name = path.name
        if name.startswith("."):  # locks (removed by their holder) and temporary names
            if name.endswith(".lock"):
                continue
            base = name[1:].split(".tmp-")[0]
        else:
            base = name[: -len(PARTIAL_SUFFIX)] if name.endswith(PARTIAL_SUFFIX) else name
            if base in planned:
                continue
        with contextlib.suppress(BottlecacheError), build_lock(Path(folder) / base, wait=False):
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                path.unlink()
                removed.append(path)
    return removed


# ---------------------------------------------------------------------------------------------
# Joining


def check_manifest(folder: Path, specs: list[ShardSpec], rows: dict[int, dict], resolved) -> None:
    """Every planned shard: present, complete, its row count, fingerprint and key hash as its
    worker reported, and (for a folder source) exactly the keys of its rows."""
    for spec in specs:
        reported = rows.get(spec.id)
        if reported is None:
            raise BottlecacheError(f"shard {spec.file_name} ({spec.split} rows {spec.lo}-{spec.hi - 1}) was not written")
        found = shard_row(Path(folder) / spec.file_name, spec, resolved.fingerprint)
        for key in ("rows", "skipped", "fingerprint", "keys_sha256"):
            if found[key] != reported[key]:
                raise BottlecacheError(f"shard {spec.file_name}: its {key} is not what its worker reported")
        split = resolved.source.splits[spec.split]
        if split.keys is not None:
            with h5py.File(Path(folder) / spec.file_name, "r") as f:
                group = f[spec.split]
                stored = [k.decode("utf-8") for k in group["keys"][:]] + [k.decode("utf-8") for k in group["skipped"][:, 0]]
            if sorted(stored) != sorted(split.keys[spec.lo : spec.hi]):
                raise BottlecacheError(f"shard {spec.file_name} holds other keys than rows {spec.lo}-{spec.hi - 1} "
                                       f"of {spec.split}")


def join_shards(resolved, specs: list[ShardSpec], folder: Path, versions: dict, build_info: dict,
                seconds: dict[str, float]) -> Path:
    """Write the cache file over the shards (virtual ``features`` and ``pooled``) and rename it into place."""
    final = resolved.path
    shape = bottleneck_shape(resolved.settings.image_size, resolved.settings.model)
    try:
        with staged_file(final) as staged, h5py.File(staged, "w", libver=("v110", "latest")) as f:  # 1.10: virtual datasets
            for key, value in root_attrs(resolved.config, resolved.fingerprint, versions).items():
                f.attrs[key] = value
            f.attrs["splits"] = json.dumps(list(resolved.source.splits))
            f.attrs["build"] = json.dumps(build_info)
            for name, split in resolved.source.splits.items():
                _join_split(f.create_group(name), name, [s for s in specs if s.split == name], folder, shape,
                            resolved.settings.dtype)
                f[name].attrs.update(spec=str(split.spec), n_examples=split.n_examples, n_done=split.n_examples,
                                     complete=True, seconds=seconds.get(name, 0.0))
            f.attrs["complete"] = True
    except OSError as error:
        raise write_error(final, error, "every shard is kept; run the same command again to join them") from None
    return final


def _join_split(group, split: str, specs, folder: Path, shape, dtype) -> None:
    counts, labels, keys, skipped = [], [], [], []
    for spec in specs:
        with h5py.File(Path(folder) / spec.file_name, "r") as f:
            g = f[split]
            counts.append(g["labels"].shape[0])
            labels.append(g["labels"][:])
            keys.extend(g["keys"][:])
            skipped.extend(g["skipped"][:])
    n = sum(counts)
    for name, row_shape, kind in (("features", shape, dtype), ("pooled", (shape[-1],), "float32")):
        layout = h5py.VirtualLayout((n, *row_shape), dtype=kind)
        at = 0
        for spec, count in zip(specs, counts):
            if count:
                relative = f"{Path(folder).name}/{spec.file_name}"
                layout[at : at + count] = h5py.VirtualSource(relative, f"{split}/{name}", (count, *row_shape))
            at += count
        group.create_virtual_dataset(name, layout, fillvalue=np.nan)
    checked = dict(compression=COMPRESSION, compression_opts=COMPRESSION_LEVEL, fletcher32=True)
    group.create_dataset("labels", data=np.concatenate(labels) if labels else np.zeros(0, np.int64),
                         dtype="int64", maxshape=(None,), chunks=(COMMIT_ROWS,), **checked)
    text = h5py.string_dtype("utf-8")
    group.create_dataset("keys", data=np.array(keys, dtype=object), dtype=text, maxshape=(None,), chunks=(4096,))
    group.create_dataset("skipped", data=np.array(skipped, dtype=object).reshape(-1, 2), dtype=text,
                         maxshape=(None, 2), chunks=(256, 2))
    group.attrs.update(n_rows=n, n_skipped=len(skipped))


# ---------------------------------------------------------------------------------------------
# Consolidating


def consolidate_cache(path, *, keep_shards: bool = False, progress=None) -> Path:
    """Rewrite a cache joined from shards as one standalone file under the same name (atomic), then
    remove its shard folder (unless ``keep_shards``). A standalone cache is left as it is."""
    path = Path(path)
    with Cache(path) as cache:  # checks every shard is there
        virtual = any(cache.file[s][k].is_virtual for s in cache.splits for k in ("features", "pooled"))
        folders = {Path(src.file_name).parent for s in cache.splits for k in ("features", "pooled")
                   if cache.file[s][k].is_virtual for src in cache.file[s][k].virtual_sources()}
    if not virtual:
        return path
    with build_lock(path, wait=False):
        try:
            with staged_file(path) as staged:
                with Cache(path) as cache, h5py.File(staged, "w", libver=("v108", "latest")) as out:
                    for key, value in cache.file.attrs.items():
                        out.attrs[key] = value
                    for split in cache.splits:
                        _copy_split(cache, split, out.create_group(split), progress)
        except OSError as error:
            raise write_error(path, error, "the cache and its shards are unchanged") from None
    if not keep_shards:
        import shutil

        for folder in folders:
            if str(folder) not in ("", "."):
                shutil.rmtree(path.parent / folder, ignore_errors=True)
    return path


def _copy_split(cache: Cache, split: str, group, progress) -> None:
    source = cache.file[split]
    checked = dict(compression=COMPRESSION, compression_opts=COMPRESSION_LEVEL, fletcher32=True)
    n = source["labels"].shape[0]
    if progress is not None:
        progress.start_split(split, n, 0)
    for name, chunk in (("features", FEATURE_CHUNK_ROWS), ("pooled", POOLED_CHUNK_ROWS)):
        data = source[name]
        target = group.create_dataset(name, data.shape, dtype=data.dtype, maxshape=(None, *data.shape[1:]),
                                      chunks=(chunk, *data.shape[1:]), **checked)
        step = COMMIT_ROWS * 32
        for lo in range(0, n, step):
            target[lo : lo + step] = cache._read(split, name, slice(lo, lo + step))
            if progress is not None and name == "features":
                progress.advance(split, min(step, n - lo))
    for name in ("labels", "keys", "skipped"):
        data = source[name]
        group.create_dataset(name, data=data[()], dtype=data.dtype, maxshape=(None, *data.shape[1:]),
                             chunks=data.chunks, compression=data.compression, compression_opts=data.compression_opts,
                             fletcher32=data.fletcher32)
    for key, value in source.attrs.items():
        group.attrs[key] = value
    if progress is not None:
        progress.end_split(split)
