"""The content identity of each example: what lets a later build reuse a row wherever its file went.

For a folder it is the sha256 of the file's bytes (a rename, a move to another class or split
folder, or a copy of the whole folder keeps it; an edit changes it). For TensorFlow Datasets it
is the sha256 of the data set's name, version and the example's ``tfds_id``. Each is 32 bytes,
stored per row in ``/<split>/content`` beside ``keys`` (checksummed like the features).
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..core.options import usable_cores

DIGEST_SIZE = 32
HASH_THREADS = 8  # hashlib and file reads release the GIL: a few threads keep the disk and a core busy
_CHUNK = 1 << 20


def file_digest(path: str | os.PathLike) -> bytes:
    """sha256 of a file's bytes, streamed; a file that cannot be read gets the digest of its
    error-free absence (all zeros), so it never matches a stored row (it will be skipped anyway)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    except OSError:
        return bytes(DIGEST_SIZE)
    return digest.digest()


def tfds_digest(name: str, version: str, tfds_id: str) -> bytes:
    return hashlib.sha256(f"tfds\0{name}\0{version}\0{tfds_id}".encode("utf-8")).digest()


def digests_of_keys(source, keys) -> np.ndarray:
    """(N, 32) uint8 content digests of ``keys`` of a tfds source (folder sources use ``split_digests``)."""
    name, version = source.identity["name"], source.identity["version"]
    return as_array([tfds_digest(name, version, key) for key in keys])


NO_STAT = (-1, -1)  # the (size, mtime_ns) of a row that is not a file (tfds) or could not be listed


@dataclass
class SplitContent:
    """Every example of a split, in its order: content digests (n, 32) uint8, keys, labels, and
    for folders each file's (size, mtime_ns) as listed, (n, 2) int64 (``NO_STAT`` rows otherwise).
    ``n_hashed``: the files whose bytes were read (the others had a known digest)."""

    digests: np.ndarray
    keys: list[str]
    labels: list[int]
    stats: np.ndarray
    n_hashed: int = 0


def split_content(source, split: str, known: dict | None = None) -> SplitContent:
    """The content digest, key and label of every example of ``split``.

    Folders: the files are hashed in parallel threads (keys and labels are known), except those
    whose key, size and modification time (to the nanosecond) match a row of an earlier cache:
    ``known`` maps ``(key, size, mtime_ns)`` to that row's digest, and the file is unchanged since
    it was hashed (the check ``git status`` and ``rsync`` make). tfds: the split's records are
    listed (read, not decoded) for their ids and labels.
    """
    entry = source.split(split)
    if source.kind == "folder":
        stats = entry.stats or [NO_STAT] * entry.n_examples
        found = [None if s == NO_STAT else (known or {}).get((k, *s)) for k, s in zip(entry.keys, stats)]
        todo = [entry.paths[i] for i, digest in enumerate(found) if digest is None]
        with ThreadPoolExecutor(min(HASH_THREADS, max(2, 2 * usable_cores()))) as pool:
            hashed = iter(pool.map(file_digest, todo))
        digests = as_array([digest if digest is not None else next(hashed) for digest in found])
        return SplitContent(digests, list(entry.keys), list(entry.labels), np.array(stats, np.int64).reshape(-1, 2),
                            len(todo))
    keys, labels = [], []
    for _, key, label, _ in source.examples(split).as_numpy_iterator():
        keys.append(key.decode("utf-8"))
        labels.append(int(label))
    return SplitContent(digests_of_keys(source, keys), keys, labels, np.full((len(keys), 2), NO_STAT, np.int64),
                        len(keys))


def as_array(digests: list[bytes]) -> np.ndarray:
    if not digests:
        return np.zeros((0, DIGEST_SIZE), np.uint8)
    return np.frombuffer(b"".join(digests), np.uint8).reshape(len(digests), DIGEST_SIZE).copy()
