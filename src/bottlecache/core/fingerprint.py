"""Canonical configuration → fingerprint.

A cache is named by a hash of everything that determines its content, in canonical JSON form
(sorted keys, with each value's type so ``1`` and ``"1"`` differ) plus the format version.
Settings that cannot change the content (batch size, progress bars) are never part of it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

FORMAT_NAME = "bottlecache"
FORMAT_VERSION = 1
# Each base's preprocessing has its own name and version (bottlecache.core.registry.PREPROCESSINGS),
# bumped whenever that function changes what it outputs; both are in every cache's config.


def _typed(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _typed(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return ["list", [_typed(v) for v in value]]
    if isinstance(value, bool):
        return ["bool", value]
    if isinstance(value, int):
        return ["int", value]
    if isinstance(value, float):
        return ["float", repr(value)]
    if isinstance(value, str):
        return ["str", value]
    if value is None:
        return ["none", None]
    raise TypeError(f"cannot fingerprint a value of type {type(value).__name__}: {value!r}")


def canonical_json(config: dict) -> str:
    """The configuration as compact JSON with sorted keys (what is stored in the cache)."""
    return json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def fingerprint(config: dict) -> str:
    """The sha256 hex digest of the typed, canonical form of ``config`` and the format version."""
    payload = json.dumps(
        {"format": [FORMAT_NAME, FORMAT_VERSION], "config": _typed(config)},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def stack_fingerprint(fingerprints: list[str]) -> str:
    """A stack of caches (``bottlecache.cache.stack``) is named by its members' fingerprints, in order."""
    return fingerprint({"stack": list(fingerprints)})


def sha256_file(path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
