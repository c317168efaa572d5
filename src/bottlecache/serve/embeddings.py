"""The cache's pooled features as embeddings: nearest neighbours of an image, near-duplicate pairs.

Similarity is the cosine of the pooled (1280,) features, the spatial mean of the bottleneck that
every cache stores. Both searches use scikit-learn's ``NearestNeighbors`` (brute force, metric
``cosine``: distance = 1 - cosine); on the 3,000 shared photos that was as fast as a blocked
NumPy matrix product and 2-3x faster than the Euclidean metric on unit vectors (docs/report.md),
so no other library is used. A near-duplicate pair in two different splits is the same photo (or nearly) on
both sides of an evaluation: train/test leakage, reported as such. See docs/report.md.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..cache.store import Cache, open_cache
from ..core.errors import BottlecacheError
from ..core.options import DEFAULT_MODEL, check_positive, check_range, resolve_cache_dir
from ..core.records import DECODE_FAST
from ..data.sources import describe_failure, load_image
from ..models.backbone import load_backbone, resolve_weights

DEFAULT_K = 5
MAX_K = 10_000
DEFAULT_THRESHOLD = 0.97  # cosine; see docs/report.md for what it finds on the shared photos
QUERY_BLOCK = 1024  # rows per radius query: bounds memory, and steps the progress bar


@dataclass
class Embeddings:
    """Every cached row of every split: unit-length pooled features, and where each came from."""

    vectors: np.ndarray  # (N, 1280) float32, L2-normalised
    splits: list[str]  # per row
    keys: list[str]
    labels: np.ndarray
    class_names: list[str]

    def row(self, i: int) -> dict:
        return {"split": self.splits[i], "key": self.keys[i], "label": self.class_names[int(self.labels[i])]}


def normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero: it is similar to nothing)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def load_embeddings(cache) -> Embeddings:
    """All splits of an open ``Cache``, in the cache's split order."""
    vectors, splits, keys, labels = [], [], [], []
    for split in cache.splits:
        vectors.append(cache.pooled(split))
        keys += cache.keys(split)
        splits += [split] * cache.n_examples(split)
        labels.append(cache.labels(split))
    return Embeddings(normalise(np.concatenate(vectors)), splits, keys, np.concatenate(labels), list(cache.class_names))


# ---------------------------------------------------------------------------------------------
# Neighbours


@dataclass
class NeighborsResult:
    query: dict  # {"image": path} or the row of a cached key
    neighbors: list[dict] = field(default_factory=list)  # rank, split, key, label, cosine

    def to_dict(self) -> dict:
        return {"query": self.query, "neighbors": self.neighbors}


def neighbors(cache, query, k: int = DEFAULT_K, *, weights=None, cache_dir=None) -> NeighborsResult:
    """The ``k`` cached images nearest to ``query`` by cosine of the pooled features.

    Parameters
    ----------
    cache : Cache or str or path
        An open ``Cache``, a cache file, or a fingerprint prefix in ``cache_dir``.
    query : str or path
        An image file (run through the cache's backbone, with its preprocessing and decoding), or
        the key of a cached image (``cache info`` / ``report`` show keys); a key is not its own
        neighbour.
    weights : str or path, optional
        Where the backbone's weights file is (default: as the cache was built); its sha256 must
        match the cache's.
    """

    check_positive("k", k, maximum=MAX_K)
    resolve_cache_dir(cache_dir)  # a bad --cache-dir is refused even where a cache path makes it unused
    opened = not isinstance(cache, Cache)
    cache = open_cache(cache, cache_dir) if opened else cache
    try:
        emb = load_embeddings(cache)
        path = Path(str(query))
        if path.is_file():
            vector, exclude, described = normalise(image_pooled(cache, path, weights))[0], None, {"image": str(path)}
        else:
            exclude = find_key(emb, str(query), cache.path)
            vector, described = emb.vectors[exclude], emb.row(exclude)
    finally:
        if opened:
            cache.close()
    return NeighborsResult(described, _nearest(emb, vector, k, exclude))


def find_key(emb: Embeddings, key: str, where) -> int:
    """The row of ``key`` (its first split, if several splits hold it)."""
    try:
        return emb.keys.index(key)
    except ValueError:
        example = f" (keys look like {emb.keys[0]!r})" if emb.keys else ""
        raise BottlecacheError(
            f"The query {key!r} is neither an image file nor a key of the cache {where}{example}; pass an image "
            "path or a cached key."
        ) from None


def image_pooled(cache, path: Path, weights=None) -> np.ndarray:
    """An image's (1, channels) pooled features from the cache's backbone, decoded as the cache was."""

    model = cache.config.get("model", DEFAULT_MODEL)
    ref = resolve_weights(weights if weights is not None else cache.build_info.get("weights"), cache.image_size, model)
    if ref.sha256 != cache.config["weights_sha256"]:
        raise BottlecacheError(
            f"The weights {ref.spec} are not the ones the cache was built with (sha256 {ref.sha256[:12]}, the cache "
            f"{cache.config['weights_sha256'][:12]}); pass the cache's weights file with --weights."
        )
    try:
        image = load_image(path, cache.image_size, cache.config["decode"] == DECODE_FAST, model)
    except Exception:  # the decoder's reason, in one line
        raise BottlecacheError(f"The image {path} cannot be read: {describe_failure(path)}.") from None
    base = load_backbone(ref, cache.image_size)
    features = np.asarray(base(np.asarray(image)[None], training=False), dtype=np.float32)
    return features.mean(axis=(1, 2))


def _nearest(emb: Embeddings, vector: np.ndarray, k: int, exclude: int | None) -> list[dict]:
    from sklearn.neighbors import NearestNeighbors

    n = len(emb.keys)
    wanted = min(n, k + (exclude is not None))
    if wanted == 0:
        return []
    index = NearestNeighbors(n_neighbors=wanted, algorithm="brute", metric="cosine").fit(emb.vectors)
    distances, rows = index.kneighbors(vector[None], return_distance=True)
    out = []
    for distance, row in zip(distances[0], rows[0]):
        if row == exclude or len(out) == k:
            continue
        out.append({"rank": len(out) + 1, **emb.row(int(row)), "cosine": cosine_from_distance(distance)})
    return out


def cosine_from_distance(distance: float) -> float:
    return float(np.clip(1.0 - distance, -1.0, 1.0))


# ---------------------------------------------------------------------------------------------
# Near-duplicates


@dataclass
class DuplicatesResult:
    threshold: float
    n_images: int
    seconds: float
    pairs: list[dict] = field(default_factory=list)  # a, b (rows), cosine, leakage, same_label
    counts: dict[str, int] = field(default_factory=dict)  # "train" / "train-validation" → pairs

    @property
    def leakage(self) -> list[dict]:
        return [p for p in self.pairs if p["leakage"]]

    def to_dict(self) -> dict:
        return {"threshold": self.threshold, "n_images": self.n_images, "seconds": round(self.seconds, 3),
                "n_pairs": len(self.pairs), "n_leakage": len(self.leakage), "counts": self.counts, "pairs": self.pairs}


def duplicates(cache, threshold: float = DEFAULT_THRESHOLD, *, cache_dir=None, progress=None) -> DuplicatesResult:
    """Every pair of cached images whose pooled features have a cosine of at least ``threshold``,
    within a split and across splits (leakage), most similar first.

    ``progress`` (optional) gets ``start_split("pairs", n, 0)`` and ``advance("pairs", rows)``.
    """

    check_range("threshold", threshold, 0.0, 1.0, float, high_open=False)
    resolve_cache_dir(cache_dir)
    opened = not isinstance(cache, Cache)
    cache = open_cache(cache, cache_dir) if opened else cache
    try:
        emb = load_embeddings(cache)
    finally:
        if opened:
            cache.close()
    return duplicate_pairs(emb, threshold, progress)


def duplicate_pairs(emb: Embeddings, threshold: float, progress=None) -> DuplicatesResult:
    """``duplicates`` over embeddings already loaded (the audit's)."""
    import sklearn.neighbors  # noqa: F401  (imported before the clock starts: seconds are the search's)

    started = time.perf_counter()
    found = similar_pairs(emb.vectors, threshold, progress)
    seconds = time.perf_counter() - started
    pairs, counts = [], {}
    for i, j, cosine in found:
        a, b = emb.row(i), emb.row(j)
        where = a["split"] if a["split"] == b["split"] else "-".join(sorted((a["split"], b["split"])))
        counts[where] = counts.get(where, 0) + 1
        pairs.append({"a": a, "b": b, "cosine": cosine, "leakage": a["split"] != b["split"],
                      "same_label": a["label"] == b["label"]})
    return DuplicatesResult(float(threshold), len(emb.keys), seconds, pairs, counts)


def similar_pairs(vectors: np.ndarray, threshold: float, progress=None) -> list[tuple[int, int, float]]:
    """(i, j, cosine) with i < j and cosine ≥ ``threshold`` among unit ``vectors``, most similar first."""
    from sklearn.neighbors import NearestNeighbors

    n = len(vectors)
    radius = 1.0 - threshold + 1e-6  # float32 rounding: an exact copy may be at a distance of ~1e-7
    index = NearestNeighbors(radius=radius, algorithm="brute", metric="cosine").fit(vectors)
    if progress is not None:
        progress.start_split("pairs", n, 0)
    found = []
    for lo in range(0, n, QUERY_BLOCK):
        distances, rows = index.radius_neighbors(vectors[lo : lo + QUERY_BLOCK], return_distance=True)
        for offset, (ds, js) in enumerate(zip(distances, rows)):
            i = lo + offset
            for d, j in zip(ds, js):
                cosine = cosine_from_distance(d)
                if j > i and cosine >= threshold - 1e-6:
                    found.append((i, int(j), cosine))
        if progress is not None:
            progress.advance("pairs", min(QUERY_BLOCK, n - lo))
    return sorted(found, key=lambda p: (-p[2], p[0], p[1]))
