"""Chunks encoded outside HDF5 (cache/chunks.py) are exactly what HDF5's deflate + fletcher32 read back."""

import struct
import zlib

import h5py
import numpy as np
import pytest

from bottlecache.cache import chunks
from bottlecache.cache.chunks import (
    decode_chunk,
    encode_rows,
    encodes_directly,
    fletcher32,
    fletcher32_numpy,
    stored_checksum_ok,
    write_chunks,
)

CHECKED = dict(compression="gzip", compression_opts=1, fletcher32=True)


def _dataset(f, name, dtype, row_shape, chunk_rows=32, **filters):
    return f.create_dataset(name, (0, *row_shape), dtype=dtype, maxshape=(None, *row_shape),
                            chunks=(chunk_rows, *row_shape), **(filters or CHECKED))


@pytest.mark.parametrize("size", [0, 1, 2, 3, 359 * 2, 360 * 2, 361 * 2 + 1, 5000, 65537])
@pytest.mark.parametrize("fill", ["random", "ones", "zeros"])
def test_fletcher32_equals_hdf5s_own(tmp_path, size, fill):
    """HDF5 writes a chunk (its fletcher32 appended); ours of the same stored body must match it."""
    rng = np.random.default_rng(size)
    data = {"random": rng.integers(0, 256, size, dtype=np.uint8), "ones": np.full(size, 255, np.uint8),
            "zeros": np.zeros(size, np.uint8)}[fill]
    with h5py.File(tmp_path / "x.h5", "w") as f:
        d = f.create_dataset("x", data=data if size else np.zeros(1, np.uint8), chunks=(max(size, 1),),
                             fletcher32=True)  # no compression: the checksum covers the raw bytes
        _, stored = d.id.read_direct_chunk((0,))
    body, checksum = stored[:-4], struct.unpack("<I", stored[-4:])[0]
    assert fletcher32(body) == checksum
    assert fletcher32_numpy(body) == checksum  # the fallback where HDF5's own function is not found


def test_hdf5s_own_fletcher32_is_found():
    """h5py's wheels bundle libhdf5: the build and incremental copies use its checksum function."""
    assert chunks._HDF5_FLETCHER32 is not None


@pytest.mark.parametrize("dtype,row_shape", [("float16", (5, 5, 64)), ("float32", (1280,)), ("int64", ())])
def test_direct_chunks_read_back_through_plain_h5py(tmp_path, dtype, row_shape):
    rng = np.random.default_rng(0)
    values = (rng.standard_normal((75, *row_shape)) * 100).astype(dtype)
    values[rng.random(values.shape) < 0.7] = 0  # as sparse as real bottleneck features
    path = tmp_path / "c.h5"
    with h5py.File(path, "w") as f:
        d = _dataset(f, "x", dtype, row_shape)
        for start in (0, 64):  # a full window of 64 rows, then 11 rows: an edge chunk
            part = values[start : start + 64]
            chunks = encode_rows(d, start, part)
            assert chunks is not None and len(chunks) == -(-len(part) // 32)
            d.resize(start + len(part), axis=0)
            write_chunks(d, chunks)
        d.resize(80, axis=0)  # the edge chunk's padding reads as the fill value, like HDF5's own
    with h5py.File(path) as f:
        out = f["x"][:]
    np.testing.assert_array_equal(out[:75], values)
    assert not out[75:].any()


def test_a_damaged_direct_chunk_fails_hdf5s_checksum(tmp_path):
    path = tmp_path / "c.h5"
    with h5py.File(path, "w") as f:
        d = _dataset(f, "x", "float32", (16,))
        d.resize(32, axis=0)
        ((offset, data),) = encode_rows(d, 0, np.arange(32 * 16, dtype=np.float32).reshape(32, 16))
        broken = bytearray(data)
        broken[len(broken) // 2] ^= 0x01
        d.id.write_direct_chunk(offset, bytes(broken), filter_mask=0)
    with h5py.File(path) as f, pytest.raises(OSError):
        f["x"][:]


def test_direct_chunks_are_standard_zlib_streams(tmp_path):
    with h5py.File(tmp_path / "c.h5", "w") as f:
        d = _dataset(f, "x", "float32", (8,))
        values = np.arange(64, dtype=np.float32).reshape(8, 8)
        ((_, data),) = encode_rows(d, 0, values)
    raw = zlib.decompress(data[:-4])
    np.testing.assert_array_equal(np.frombuffer(raw, "<f4")[:64].reshape(8, 8), values)


def test_other_layouts_go_through_hdf5(tmp_path):
    with h5py.File(tmp_path / "c.h5", "w") as f:
        plain = _dataset(f, "plain", "float32", (8,), fletcher32=True)
        shuffled = _dataset(f, "shuffled", "float32", (8,), shuffle=True, **CHECKED)
        checked = _dataset(f, "checked", "float32", (8,))
        assert encodes_directly(plain) is None and encodes_directly(shuffled) is None
        assert encodes_directly(checked) == (1, 32)
        assert encode_rows(checked, 5, np.zeros((3, 8), np.float32)) is None  # starts inside a chunk


def test_rows_copied_as_stored_read_back_and_a_damaged_one_is_caught(tmp_path):
    """One-row chunks of one file written into another as they are (an incremental build's copy),
    between rows encoded here: plain h5py reads every value back; a flipped byte fails the check."""
    rng = np.random.default_rng(3)
    old = (rng.standard_normal((6, 5, 5, 8)) * 10).astype("float16")
    new = (rng.standard_normal((2, 5, 5, 8)) * 10).astype("float16")
    with h5py.File(tmp_path / "a.h5", "w") as f:
        a = _dataset(f, "x", "float16", (5, 5, 8), chunk_rows=1)
        a.resize(6, axis=0)
        write_chunks(a, encode_rows(a, 0, old))
        stored = {i: a.id.read_direct_chunk((i, 0, 0, 0))[1] for i in range(6)}
    assert all(stored_checksum_ok(data) for data in stored.values())
    assert np.array_equal(decode_chunk(stored[4], "float16", (1, 5, 5, 8))[0], old[4])
    damaged = bytearray(stored[2])
    damaged[len(damaged) // 2] ^= 0xFF
    assert not stored_checksum_ok(bytes(damaged))

    # rows 0, 2 copied as stored from old rows 5 and 1; rows 1, 3 encoded from ``new``
    with h5py.File(tmp_path / "b.h5", "w") as f:
        b = _dataset(f, "x", "float16", (5, 5, 8), chunk_rows=1)
        b.resize(4, axis=0)
        write_chunks(b, encode_rows(b, 0, new, {0: stored[5], 2: stored[1]}))
    with h5py.File(tmp_path / "b.h5", "r") as f:
        assert np.array_equal(f["x"][:], np.stack([old[5], new[0], old[1], new[1]]))


def test_stored_rows_need_one_row_chunks(tmp_path):
    with h5py.File(tmp_path / "c.h5", "w") as f:
        d = _dataset(f, "x", "float32", (4,))
        d.resize(32, axis=0)
        with pytest.raises(ValueError, match="one row per chunk"):
            encode_rows(d, 0, np.zeros((31, 4), np.float32), {0: b"x"})
