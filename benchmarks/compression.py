"""How to store the features: ``python -m benchmarks.compression CACHE [--rows 1024]``.

Writes the first ``--rows`` train features of an existing cache with each candidate (HDF5's own
filters; deflate encoded outside HDF5 by zlib, ISA-L and libdeflate where installed; hdf5plugin's
LZ4 and Zstd where installed) and prints CPU milliseconds per image to write and to read back,
and KiB per image on disk. Every candidate must read back equal. The figures behind
docs/cache-format.md, "Storage".
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import zlib
from pathlib import Path

import h5py
import numpy as np


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def through_hdf5(x, folder: Path, name: str, **filters) -> tuple[float, float, float]:
    path = folder / f"{name}.h5"
    started = _cpu()
    with h5py.File(path, "w") as f:
        d = f.create_dataset("x", (0, *x.shape[1:]), x.dtype, maxshape=(None, *x.shape[1:]),
                             chunks=(32, *x.shape[1:]), **filters)
        for i in range(0, len(x), 32):
            d.resize(i + 32, axis=0)
            d[i : i + 32] = x[i : i + 32]
    written = _cpu()
    with h5py.File(path) as f:
        back = f["x"][:]
    read = _cpu()
    if not np.array_equal(back, x):
        raise SystemExit(f"{name}: did not read back equal")
    return written - started, read - written, os.path.getsize(path)


def outside_hdf5(x, compress) -> tuple[float, int]:
    chunks = [x[i : i + 32].tobytes() for i in range(0, len(x), 32)]
    started = _cpu()
    out = [compress(c) for c in chunks]
    seconds = _cpu() - started
    if any(zlib.decompress(o) != c for o, c in zip(out, chunks)):
        raise SystemExit("a deflate stream did not inflate back")
    return seconds, sum(map(len, out))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compression", description=__doc__.split("\n\n")[0])
    parser.add_argument("cache", type=Path)
    parser.add_argument("--rows", type=int, default=1024)
    args = parser.parse_args(argv)
    with h5py.File(args.cache) as f:
        x = f["train/features"][: args.rows]
    n = len(x)
    print(f"{n} rows of {x.shape[1:]} {x.dtype}, {100 * (x == 0).mean():.1f} % zeros")
    print(f"{'candidate':34s} {'write ms/img':>12s} {'read ms/img':>12s} {'KiB/img':>8s}")
    candidates = {"none + fletcher32": dict(fletcher32=True),
                  "gzip 1 + fletcher32 (HDF5)": dict(compression="gzip", compression_opts=1, fletcher32=True),
                  "lzf + fletcher32": dict(compression="lzf", fletcher32=True),
                  "shuffle + gzip 1 + fletcher32": dict(compression="gzip", compression_opts=1, shuffle=True,
                                                        fletcher32=True)}
    try:
        import hdf5plugin

        candidates["hdf5plugin LZ4 + fletcher32"] = dict(**hdf5plugin.LZ4(), fletcher32=True)
        candidates["hdf5plugin Zstd 1 + fletcher32"] = dict(**hdf5plugin.Zstd(clevel=1), fletcher32=True)
    except ImportError:
        print("(hdf5plugin not installed: its codecs left out)")
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, filters) in enumerate(candidates.items()):
            w, r, size = through_hdf5(x, Path(tmp), f"c{i}", **filters)
            print(f"{name:34s} {1e3 * w / n:12.3f} {1e3 * r / n:12.3f} {size / n / 1024:8.1f}")
    deflaters = {"deflate 1 by zlib (outside HDF5)": lambda b: zlib.compress(b, 1)}
    try:
        from isal import isal_zlib

        deflaters["deflate 1 by ISA-L (outside HDF5)"] = lambda b: isal_zlib.compress(b, 1)
    except ImportError:
        pass
    try:
        import deflate

        deflaters["deflate 1 by libdeflate (outside)"] = lambda b: deflate.zlib_compress(b, 1)
    except ImportError:
        pass
    for name, compress in deflaters.items():
        seconds, size = outside_hdf5(x, compress)
        print(f"{name:34s} {1e3 * seconds / n:12.3f} {'':>12s} {size / n / 1024:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
