"""A large cache without a large disk: an existing cache's rows repeated to N rows per split.

``repeat_cache`` writes a cache file (named as any cache, by its fingerprint) whose ``features`` and ``pooled`` are HDF5 virtual datasets
mapping the source cache's rows again and again (the source file is read, never copied), with real
labels and keys (each repetition's keys prefixed ``copy000001/``…, so every key is unique). It is
a cache like any other (``Cache`` opens it, its fingerprint is the hash of its config), made to
measure what scale does to memory and speed (tests, the benchmark case ``heads-at-scale``): a
million rows of MobileNetV2 features cost 40 MB of labels and keys on disk instead of 50 GB.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import numpy as np

from ..core.errors import BottlecacheError
from ..core.files import staged_file, write_error
from ..core.fingerprint import fingerprint
from .store import COMMIT_ROWS, Cache, cache_file_name, root_attrs

MAX_ROWS = 1 << 31


def repeat_cache(source, folder, rows: dict[str, int]) -> Path:
    """Write, in ``folder``, the source cache's splits named in ``rows``, each repeated to that many rows;
    the file is named as every cache is, by its data, model, size and fingerprint. Returns its path.

    Parameters
    ----------
    source : path
        A finished cache (not itself virtual: the copies read its file directly).
    folder : path
        Where the new cache goes (refused if that cache exists there).
    rows : dict
        split → rows in the new cache (a split not named is left out).
    """
    source, folder = Path(source), Path(folder)
    with Cache(source) as cache:
        unknown = [s for s in rows if s not in cache.splits]
        if unknown:
            raise BottlecacheError(f"{source.name} has no split {unknown[0]!r}; it has {', '.join(cache.splits)}.")
        for split, n in rows.items():
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_ROWS:
                raise BottlecacheError(f"The rows of split {split!r} must be a whole number from 1 to {MAX_ROWS}. "
                                       f"Got {n!r} instead.")
            if cache.n_examples(split) == 0:
                raise BottlecacheError(f"The {split!r} split of {source.name} has no rows to repeat.")
            if cache.file[split]["features"].is_virtual:
                raise BottlecacheError(f"{source.name} is itself virtual; repeat a standalone cache (`cache consolidate`).")
        config = {k: v for k, v in cache.config.items() if k not in ("views", "tta")}  # the copies hold no views
        config["data"] = {"name": f"{cache.config['data'].get('name', 'data')}-repeated",
                          "repeats": cache.fingerprint, "rows": dict(rows)}
        config["splits"] = {split: f"{cache.config['splits'][split]} repeated to {n} rows" for split, n in rows.items()}
        fp = fingerprint(config)
        out = folder / cache_file_name(config["data"]["name"], config["model"], int(config["image_size"]), fp)
        if out.exists():
            raise BottlecacheError(f"{out} exists: the same repetition of the same cache.")
        folder.mkdir(parents=True, exist_ok=True)
        try:
            with staged_file(out) as staged, h5py.File(staged, "w", libver=("v110", "latest")) as f:
                for key, value in root_attrs(config, fp, cache.versions).items():
                    f.attrs[key] = value
                f.attrs["splits"] = json.dumps(list(rows))
                f.attrs["build"] = json.dumps({"repeated_from": str(source.resolve())})
                for split, n in rows.items():
                    _repeat_split(f.create_group(split), cache, split, n, source, out)
                f.attrs["complete"] = True
        except OSError as error:
            raise write_error(out, error, "nothing was written") from None
    return out


def _repeat_split(group, cache: Cache, split: str, n: int, source: Path, out: Path) -> None:
    count = cache.n_examples(split)
    copies = math.ceil(n / count)
    where = str(source.resolve()) if source.resolve().parent != out.resolve().parent else source.name
    for name in ("features", "pooled"):
        stored = cache.file[split][name]
        layout = h5py.VirtualLayout((n, *stored.shape[1:]), dtype=stored.dtype)
        for copy in range(copies):
            lo, take = copy * count, min(count, n - copy * count)
            layout[lo : lo + take] = h5py.VirtualSource(where, f"{split}/{name}", stored.shape)[:take]
        group.create_virtual_dataset(name, layout, fillvalue=np.nan)
    labels = np.resize(cache.labels(split), n)
    keys = cache.keys(split)
    text = h5py.string_dtype("utf-8")
    group.create_dataset("labels", data=labels.astype(np.int64), chunks=(min(n, COMMIT_ROWS * 1024),))
    group.create_dataset("keys", data=np.array([keys[i % count] if i < count else f"copy{i // count:06d}/{keys[i % count]}"
                                                for i in range(n)], dtype=object), dtype=text)
    group.create_dataset("skipped", (0, 2), dtype=text, maxshape=(None, 2))
    group.attrs.update(spec=f"{split} repeated", n_examples=n, n_done=n, n_rows=n, n_skipped=0, complete=True,
                       seconds=0.0)
