"""Whole HDF5 chunks encoded outside HDF5: deflate and fletcher32, as HDF5's own filters store them.

A cache's numeric datasets use HDF5's standard ``deflate`` + ``fletcher32`` pipeline, so plain
h5py reads them. HDF5 runs that pipeline inside ``dataset[...] = values`` while h5py holds the
GIL: during a build the commit thread compressed for about as long as the engine ran, and the
engine's thread, which needs the GIL between forward passes, waited (docs/engines.md, "Where
the build's time goes"). Here the build encodes each whole chunk itself and hands the bytes to
``write_direct_chunk``:

- deflate by ISA-L (``isal``; the standard zlib format, read by any zlib), about 5× zlib's
  level-1 speed on these features and slightly smaller, with the GIL released; ``zlib`` (also
  GIL-free) where ``isal`` is not installed;
- fletcher32 exactly as HDF5 computes it (``H5_checksum_fletcher32``: big-endian 16-bit words,
  sums folded every 360 words, appended little-endian), so HDF5 verifies every chunk on read.

The stored arrays are the same values as before; only the compressed bytes differ.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
from h5py._objects import phil  # the lock h5py holds around every HDF5 call

try:  # ISA-L's deflate: same format, several times faster (see the module docstring)
    from isal import isal_zlib as _deflate

    DEFLATE = "isal"
except ImportError:  # pragma: no cover - isal has wheels for every platform TensorFlow runs on
    _deflate = zlib
    DEFLATE = "zlib"

DEFLATE_FILTER, FLETCHER32_FILTER = 1, 3  # H5Z_FILTER_DEFLATE, H5Z_FILTER_FLETCHER32
_BLOCK = 360  # words between folds in H5_checksum_fletcher32


def _hdf5_fletcher32():
    """HDF5's own ``H5_checksum_fletcher32`` from the library h5py loaded (about 10x faster than
    NumPy on a 20 KB chunk), or ``None`` where it cannot be found."""
    import ctypes
    import glob
    import os

    import h5py

    candidates = sorted(glob.glob(os.path.join(os.path.dirname(h5py.__file__), os.pardir, "h5py.libs", "libhdf5-*.so*")))
    try:
        with open("/proc/self/maps") as maps:  # an h5py built on the system's HDF5
            candidates += sorted({line.split()[-1] for line in maps if "/libhdf5." in line or "/libhdf5-" in line})
    except OSError:
        pass
    for path in candidates:
        try:
            function = ctypes.CDLL(path).H5_checksum_fletcher32
        except (OSError, AttributeError):
            continue
        function.restype, function.argtypes = ctypes.c_uint32, [ctypes.c_char_p, ctypes.c_size_t]
        return function
    return None


_HDF5_FLETCHER32 = _hdf5_fletcher32()


def fletcher32(data: bytes) -> int:
    """HDF5's fletcher32 of ``data``: HDF5's own function where found, else ``fletcher32_numpy``."""
    if _HDF5_FLETCHER32 is not None:
        return int(_HDF5_FLETCHER32(bytes(data), len(data)))
    return fletcher32_numpy(data)


def fletcher32_numpy(data: bytes) -> int:
    """HDF5's fletcher32 of ``data`` (``H5_checksum_fletcher32``), bit for bit, uint32 overflow included."""
    n_words = len(data) // 2
    words = np.frombuffer(data, dtype=">u2", count=n_words).astype(np.uint64)
    n_full = n_words // _BLOCK
    full = words[: n_full * _BLOCK].reshape(n_full, _BLOCK)
    # Per block of t words: sum1 grows by the words' sum, sum2 by t·sum1 plus the words weighted t, t-1, … 1.
    block_sums = full.sum(axis=1).tolist()
    weighted = (full @ np.arange(_BLOCK, 0, -1, dtype=np.uint64)).tolist()
    tail = words[n_full * _BLOCK :]
    if len(tail):
        block_sums.append(int(tail.sum()))
        weighted.append(int(tail @ np.arange(len(tail), 0, -1, dtype=np.uint64)))
    sizes = [_BLOCK] * n_full + ([len(tail)] if len(tail) else [])
    sum1 = sum2 = 0
    for size, block_sum, block_weighted in zip(sizes, block_sums, weighted):
        sum2 = (sum2 + size * sum1 + block_weighted) & 0xFFFFFFFF
        sum1 = (sum1 + block_sum) & 0xFFFFFFFF
        sum1 = (sum1 & 0xFFFF) + (sum1 >> 16)
        sum2 = (sum2 & 0xFFFF) + (sum2 >> 16)
    if len(data) % 2:
        sum1 += data[-1] << 8
        sum2 += sum1
        sum1 = (sum1 & 0xFFFF) + (sum1 >> 16)
        sum2 = (sum2 & 0xFFFF) + (sum2 >> 16)
    sum1 = (sum1 & 0xFFFF) + (sum1 >> 16)
    sum2 = (sum2 & 0xFFFF) + (sum2 >> 16)
    return (sum2 << 16) | sum1


def encodes_directly(dataset) -> tuple[int, int] | None:
    """``(deflate level, rows per chunk)`` when ``dataset``'s filters are exactly deflate then
    fletcher32 and it is chunked along its first axis only; else ``None`` (write through HDF5)."""
    plist = dataset.id.get_create_plist()
    filters = [plist.get_filter(i) for i in range(plist.get_nfilters())]
    if [f[0] for f in filters] != [DEFLATE_FILTER, FLETCHER32_FILTER]:
        return None
    if dataset.chunks is None or tuple(dataset.chunks[1:]) != tuple(dataset.shape[1:]):
        return None
    options = filters[0][2]
    return (int(options[0]) if options else 6), int(dataset.chunks[0])


def encode_chunk(rows: np.ndarray, chunk_rows: int, level: int) -> bytes:
    """One stored chunk: ``rows`` (at most ``chunk_rows``, zero-padded as HDF5 pads an edge chunk),
    deflated, then its fletcher32 appended."""
    if len(rows) < chunk_rows:
        padded = np.zeros((chunk_rows, *rows.shape[1:]), dtype=rows.dtype)
        padded[: len(rows)] = rows
        rows = padded
    # HDF5 stores the values in the file's byte order (little-endian for the types h5py creates).
    raw = np.ascontiguousarray(rows, dtype=rows.dtype.newbyteorder("<")).tobytes()
    body = _deflate.compress(raw, level)
    return body + struct.pack("<I", fletcher32(body))


def encode_rows(dataset, first_row: int, values, stored: dict[int, bytes] | None = None, *,
                layout: tuple[int, int] | None | str = "find") -> list[tuple[tuple, bytes]] | None:
    """The chunks that store ``values`` at rows ``first_row…`` of ``dataset``, encoded, or ``None``
    when they cannot be written directly (another filter pipeline, or a start inside a chunk).

    ``stored``: rows already encoded as one-row chunks of this layout (row → bytes, copied from
    a dataset with the same dtype, shape and filters), used as they are; ``values`` then holds
    the other rows, in order. ``layout``: ``encodes_directly(dataset)`` when the caller knows it.
    """
    layout = encodes_directly(dataset) if layout == "find" else layout
    if layout is None:
        if stored:
            raise ValueError("stored chunks need a dataset whose chunks are written directly")
        return None
    level, chunk_rows = layout
    if first_row % chunk_rows or (stored and chunk_rows != 1):
        if stored:
            raise ValueError("stored chunks need one row per chunk")
        return None
    values = np.asarray(values, dtype=dataset.dtype)
    zeros = (0,) * (dataset.ndim - 1)
    if stored:
        n, left = len(values) + len(stored), iter(values)
        return [((first_row + i, *zeros), stored[i] if i in stored else encode_chunk(next(left)[None], 1, level))
                for i in range(n)]
    return [
        ((first_row + i, *zeros), encode_chunk(values[i : i + chunk_rows], chunk_rows, level))
        for i in range(0, len(values), chunk_rows)
    ]


def decode_chunk(data: bytes, dtype, chunk_shape) -> np.ndarray:
    """The values of a stored chunk (deflated body, fletcher32 appended; see ``encode_chunk``)."""
    raw = _deflate.decompress(data[:-4])
    return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).reshape(chunk_shape)


def stored_checksum_ok(data: bytes) -> bool:
    """Whether a stored chunk (deflated body, then its fletcher32) passes the check HDF5 makes on reading it."""
    return len(data) >= 4 and fletcher32(data[:-4]) == struct.unpack("<I", data[-4:])[0]


def write_chunks(dataset, chunks: list[tuple[tuple, bytes]]) -> None:
    """Store encoded chunks (``encode_rows``); the dataset must already extend over them.

    h5py before 3.15 calls ``write_direct_chunk`` without its lock (h5py/h5py#2764, #2778), and
    HDF5 is not thread-safe: with the build's commit thread writing chunks while the main thread
    read a source cache, HDF5 failed at random ("Unspecified error in H5Dwrite_chunk"). The
    writes therefore take h5py's lock here.
    """
    with phil:
        for offset, data in chunks:
            dataset.id.write_direct_chunk(offset, data, filter_mask=0)
