"""Rows left out of training by key (``--exclude FILE``, e.g. the ``exclude.txt`` of ``cache audit``):
the cache is not rebuilt and the photos are not touched; the head or model records what it left out."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np

from ..core.errors import BottlecacheError
from ..core.files import read_key_file


@dataclass(frozen=True)
class Exclusion:
    """The keys to leave out, sorted and each once, and the file they came from (if any)."""

    keys: tuple[str, ...]
    file: str | None = None

    @classmethod
    def of(cls, value) -> "Exclusion | None":
        """None, an ``Exclusion``, a key file (path), or the keys themselves."""
        if value is None or isinstance(value, Exclusion):
            return value
        if isinstance(value, (str, os.PathLike)):
            return cls(read_key_file("exclude", value), str(value))
        if isinstance(value, bytes) or not all(isinstance(k, str) for k in value):
            raise BottlecacheError(f"The 'exclude' option must be a file of keys or a list of keys. Got {value!r}.")
        keys = tuple(sorted({k for k in value if k.strip()}))
        if not keys:
            raise BottlecacheError("The 'exclude' option holds no key; pass a file of keys, one a line.")
        return cls(keys)

    @property
    def sha256(self) -> str:
        return hashlib.sha256("\n".join(self.keys).encode("utf-8")).hexdigest()

    @property
    def where(self) -> str:
        return self.file if self.file else f"the {len(self.keys)} keys given"

    def check_source(self, source) -> None:
        """Before anything is built or loaded: a list none of whose keys is an image of the data (a
        folder's keys are known up front; a tfds split's are not, and are checked on its cache)."""
        if source.kind != "folder":
            return
        if not any(set(self.keys) & set(split.keys or ()) for split in source.splits.values()):
            raise BottlecacheError(f"None of the {len(self.keys)} keys of {self.where} is an image of {source.name} "
                                   f"(for example {self.keys[0]!r}); is it the list of another cache?")

    def rows_kept(self, cache, split: str) -> tuple[np.ndarray, list[str]]:
        """A mask of ``split``'s rows to train on, and the keys it leaves out. A list none of whose
        keys is in the cache (the audit of another cache?) is refused, as is one that leaves nothing."""
        keys = cache.keys(split)
        left_out = np.isin(np.asarray(keys, dtype=object), np.asarray(self.keys, dtype=object))
        if not left_out.any() and not any(set(self.keys) & set(cache.keys(s)) for s in cache.splits if s != split):
            raise BottlecacheError(f"None of the {len(self.keys)} keys of {self.where} is a key of {cache.path.name} "
                                   f"(for example {self.keys[0]!r}); is it the list of another cache?")
        if left_out.all():
            raise BottlecacheError(f"{self.where} leaves out every image of the {split!r} split; nothing to train on.")
        return ~left_out, [k for k, out in zip(keys, left_out) if out]

    def record(self, excluded: list[str]) -> dict:
        """What a head or model records: where the list came from, its hash, and the rows left out."""
        return {"file": self.file, "sha256": self.sha256, "n_keys": len(self.keys), "n_excluded": len(excluded),
                "excluded": excluded}
