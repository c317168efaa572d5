"""Several caches of the same photos as one: their pooled features joined per key.

A head trained on a stack sees, for each image, the spatial means of every member's bottleneck side
by side (MobileNetV2 at 224 px and Xception at 299 px: 1280 + 2048 values). ``StackedCache`` offers
what heads read from a ``Cache`` (splits, labels, keys, pooled features, the mirrored ones of a
``--tta flip`` cache), with the rows in the first member's order; its "bottleneck" is the joined
vector as a 1 × 1 map, so the Keras head (global pooling → dropout → dense) runs on it unchanged.

The members must hold the same classes, the same splits and the same keys in each split, with the
same labels, decoded the same way; the first difference is refused in one line. A stack is named by the fingerprints of
its members, in order (``core.fingerprint.stack_fingerprint``).
"""

from __future__ import annotations

import numpy as np

from ..core.errors import BottlecacheError
from ..core.fingerprint import stack_fingerprint
from ..core.tf import import_tf
from .store import Cache, open_cache

MAX_STACK = 8


class StackedCache:
    """Member caches (two or more) of the same photos, read as one cache of joined pooled features."""

    def __init__(self, members: list[Cache]):
        if len(members) < 2:
            raise BottlecacheError(f"A stack needs at least two caches; got {len(members)}.")
        if len(members) > MAX_STACK:
            raise BottlecacheError(f"A stack joins at most {MAX_STACK} caches; got {len(members)}.")
        self.members = list(members)
        first = self.members[0]
        self.path = first.path
        self.class_names = first.class_names
        self.splits = list(first.splits)
        self.fingerprint = stack_fingerprint([m.fingerprint for m in self.members])
        self.config = first.config
        self.build_info = first.build_info
        self._order: dict[tuple[int, str], np.ndarray] = {}
        self._read: dict[tuple[str, str], np.ndarray] = {}
        self._check()

    def _check(self) -> None:
        first = self.members[0]
        seen = {}
        for i, member in enumerate(self.members):
            name = member.path.name
            if member.fingerprint in seen:
                raise BottlecacheError(f"{name} is in the stack twice (as caches {seen[member.fingerprint] + 1} and "
                                       f"{i + 1}); stack different caches of the same photos.")
            seen[member.fingerprint] = i
            if member.config.get("cut"):
                raise BottlecacheError(f"{name} holds the activations at a cut (for fine-tuning); a stack joins "
                                       "bottleneck caches.")
            if i == 0:
                continue
            if member.class_names != first.class_names:
                raise BottlecacheError(f"{name} has the classes {member.class_names}, {first.path.name} "
                                       f"{first.class_names}; a stack joins caches of the same photos.")
            if member.config.get("decode") != first.config.get("decode"):
                raise BottlecacheError(f"{name} was decoded {member.config.get('decode')!r}, {first.path.name} "
                                       f"{first.config.get('decode')!r}; a stack's bases take each photo decoded the "
                                       "same way (build both with or both without --fast-decode).")
            if sorted(member.splits) != sorted(first.splits):
                raise BottlecacheError(f"{name} has the splits {', '.join(member.splits)}, {first.path.name} "
                                       f"{', '.join(first.splits)}; a stack joins caches of the same photos.")
            for split in self.splits:
                self._order[(i, split)] = self._join(first, member, split)

    @staticmethod
    def _join(first: Cache, member: Cache, split: str) -> np.ndarray:
        """The member's row of each of the first member's keys in ``split``, checked (keys and labels)."""
        keys, theirs = first.keys(split), member.keys(split)
        where = {key: row for row, key in enumerate(theirs)}
        missing = next((key for key in keys if key not in where), None)
        extra = next((key for key in theirs if key not in set(keys)), None) if len(theirs) != len(keys) else None
        if missing is not None or extra is not None:
            key, has, lacks = (missing, first, member) if missing is not None else (extra, member, first)
            raise BottlecacheError(f"The {split!r} split of {has.path.name} has the image {key!r}, which "
                                   f"{lacks.path.name} lacks; a stack joins caches of the same photos (build them from "
                                   "the same data and splits).")
        order = np.array([where[key] for key in keys], dtype=np.int64)
        differs = np.flatnonzero(member.labels(split)[order] != first.labels(split))
        if len(differs):
            raise BottlecacheError(f"The image {keys[differs[0]]!r} of the {split!r} split is labelled differently in "
                                   f"{first.path.name} and {member.path.name}; a stack joins caches of the same photos.")
        return order

    # -- what heads read ----------------------------------------------------------------------
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        for member in self.members:
            member.close()

    def __repr__(self) -> str:
        return f"StackedCache({', '.join(m.path.name for m in self.members)})"

    @property
    def n_channels(self) -> int:
        return sum(m.feature_shape[-1] for m in self.members)

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        return (1, 1, self.n_channels)

    n_views = 0  # a stack's heads train on the clean rows

    @property
    def tta(self) -> str:
        """``flip`` if every member holds its images' mirrors, else ``none``."""
        return "flip" if all(m.tta == "flip" for m in self.members) else "none"

    def n_examples(self, split: str) -> int:
        return self.members[0].n_examples(split)

    def labels(self, split: str) -> np.ndarray:
        return self.members[0].labels(split)

    def keys(self, split: str) -> list[str]:
        return self.members[0].keys(split)

    def _joined(self, split: str, what: str) -> np.ndarray:
        """The members' ``what`` (pooled or mirrored pooled) of ``split`` side by side, read once
        (a block read asks for it again)."""
        if (split, what) not in self._read:
            parts = []
            for i, member in enumerate(self.members):
                values = getattr(member, what)(split)
                parts.append(values if i == 0 else values[self._order[(i, split)]])
            self._read[(split, what)] = np.concatenate(parts, axis=1).astype(np.float32)
        return self._read[(split, what)]

    def pooled(self, split: str, rows: slice | None = None) -> np.ndarray:
        joined = self._joined(split, "pooled")
        return joined if rows is None else joined[rows]

    def features(self, split: str, rows: slice | None = None) -> np.ndarray:
        pooled = self.pooled(split, rows)
        return pooled.reshape(len(pooled), 1, 1, -1)

    def mirrored_pooled(self, split: str, rows: slice | None = None) -> np.ndarray:
        joined = self._joined(split, "mirrored_pooled")
        return joined if rows is None else joined[rows]

    def mirrored_features(self, split: str, rows: slice | None = None) -> np.ndarray:
        pooled = self.mirrored_pooled(split, rows)
        return pooled.reshape(len(pooled), 1, 1, -1)

    def dataset(self, split: str, what: str = "features", batch_size: int | None = None, keep=None):
        """As ``Cache.dataset``: ``(x, label)`` pairs (the joined rows are small enough to hold)."""
        tf = import_tf()
        x = self.features(split) if what == "features" else self.pooled(split)
        y = self.labels(split)
        if keep is not None:
            x, y = x[np.asarray(keep, bool)], y[np.asarray(keep, bool)]
        ds = tf.data.Dataset.from_tensor_slices((x, y))
        return ds.batch(batch_size).prefetch(2) if batch_size else ds

    def record(self) -> dict:
        """What a head trained on the stack records of it (``head.json``'s ``stack``)."""
        return {"fingerprint": self.fingerprint, "members": [
            {"cache": {"path": str(m.path.resolve()), "fingerprint": m.fingerprint, "config": m.config},
             "weights": m.build_info.get("weights_path") or m.build_info.get("weights"),
             "data": m.build_info.get("data")} for m in self.members]}


def open_stack(specs, cache_dir=None) -> StackedCache:
    """Open each of ``specs`` (cache files or fingerprint prefixes) and join them; a failure closes
    what was opened."""
    opened = []
    try:
        for spec in specs:
            opened.append(spec if isinstance(spec, Cache) else open_cache(spec, cache_dir))
        return StackedCache(opened)
    except BaseException:
        for cache in opened:
            if not any(cache is s for s in specs):
                cache.close()
        raise
