"""Whole HDF5 chunks encoded outside HDF5: deflate and fletcher32, as HDF5's own filters store them.

A cache's numeric datasets use HDF5's standard ``deflate`` + ``fletcher32`` pipeline, so plain
h5py reads them. HDF5 runs that pipeline inside ``dataset[...] = values`` while h5py holds the
GIL: during a build the commit thread compressed for about as long as the engine ran, and the
engine's thread, which needs the GIL between forward passes, waited (docs/benchmarks.md, "Where
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

try:  # ISA-L's deflate: same format, several times faster (see the module docstring)
    from isal import isal_zlib as _deflate

    DEFLATE = "isal"
except ImportError:  # pragma: no cover - isal has wheels for every platform TensorFlow runs on
    _deflate = zlib
    DEFLATE = "zlib"

DEFLATE_FILTER, FLETCHER32_FILTER = 1, 3  # H5Z_FILTER_DEFLATE, H5Z_FILTER_FLETCHER32
_BLOCK = 360  # words between folds in H5_checksum_fletcher32


def fletcher32(data: bytes) -> int:
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


def encode_rows(dataset, first_row: int, values) -> list[tuple[tuple, bytes]] | None:
    """The chunks that store ``values`` at rows ``first_row…`` of ``dataset``, encoded, or ``None``
    when they cannot be written directly (another filter pipeline, or a start inside a chunk)."""
    layout = encodes_directly(dataset)
    if layout is None:
        return None
    level, chunk_rows = layout
    if first_row % chunk_rows:
        return None
    values = np.asarray(values, dtype=dataset.dtype)
    zeros = (0,) * (dataset.ndim - 1)
    return [
        ((first_row + i, *zeros), encode_chunk(values[i : i + chunk_rows], chunk_rows, level))
        for i in range(0, len(values), chunk_rows)
    ]


def write_chunks(dataset, chunks: list[tuple[tuple, bytes]]) -> None:
    """Store encoded chunks (``encode_rows``); the dataset must already extend over them."""
    for offset, data in chunks:
        dataset.id.write_direct_chunk(offset, data, filter_mask=0)
