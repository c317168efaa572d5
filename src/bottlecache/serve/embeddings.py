"""The cache's pooled features as embeddings: nearest neighbours of an image, near-duplicate pairs.

Similarity is the cosine of the pooled (1280,) features, the spatial mean of the bottleneck that
every cache stores. The rows are read from the cache block by block (``UnitRows``), so memory holds
two blocks whatever the cache's size. Neighbours of one image are an exact scan (linear in the
rows: an index would cost more to build than one scan). Near-duplicate pairs are exact (blocks
against blocks, quadratic) up to ``EXACT_MAX_ROWS`` rows, and above it come from an approximate
index (faiss, an optional extra: inverted lists over 8-bit codes) whose candidates are checked
against the exact cosine; both find the same pairs on the shared photos (docs/report.md). A
near-duplicate pair in two different splits is the same photo (or nearly) on both sides of an
evaluation: train/test leakage, reported as such.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..cache.store import Cache, open_cache
from ..core.errors import BottlecacheError
from ..core.options import DEFAULT_MODEL, check_choice, check_positive, check_range, resolve_cache_dir
from ..core.progress import NullProgress
from ..core.records import DECODE_FAST
from ..data.sources import describe_failure, load_image
from ..models.backbone import load_backbone, resolve_weights

DEFAULT_K = 5
MAX_K = 10_000
DEFAULT_THRESHOLD = 0.97  # cosine; see docs/report.md for what it finds on the shared photos
SEARCH_BLOCK = 4096  # rows compared at a time: two blocks of 20 MiB at 1280 features, and their products
SEARCHES = ("auto", "exact", "approximate")
# rows wanted at most SPAN_GAP apart, SPAN_MIN_ROWS or more of them, are read as one span
SPAN_GAP, SPAN_MIN_ROWS = 8, 16
# ``auto`` above this many rows: the approximate index. Exact pairs are quadratic, the index about
# linear; on this 2-core machine they cross between 30,000 and 100,000 rows (docs/report.md).
EXACT_MAX_ROWS = 50_000
FAISS_HINT = "pip install 'bottlecache[faiss]' (or pip install faiss-cpu)"


class PooledRows:
    """The pooled rows of every split of an open cache, in split order, read as they are asked for:
    ``rows[lo:hi]`` (a block), ``rows[i]`` (one row), ``rows.take(indices)``. Nothing is held: each
    read goes to the file (the cache must stay open)."""

    def __init__(self, cache):
        self.cache, self.parts, start = cache, [], 0
        for split in cache.splits:
            n = cache.n_examples(split)
            self.parts.append((split, start, start + n))
            start += n
        self.shape = (start, int(cache.feature_shape[-1]))

    def __len__(self) -> int:
        return self.shape[0]

    def _finish(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float32)

    def __getitem__(self, rows):
        if isinstance(rows, (int, np.integer)):
            return self[int(rows) : int(rows) + 1][0]
        lo, hi, _ = rows.indices(len(self))
        blocks = [self.cache.pooled(split, slice(max(lo, a) - a, min(hi, b) - a))
                  for split, a, b in self.parts if max(lo, a) < min(hi, b)]
        return self._finish(np.concatenate(blocks) if blocks else np.zeros((0, self.shape[1]), np.float32))

    def take(self, indices) -> np.ndarray:
        """The rows at ``indices`` (any order), each split read once at its sorted indices."""
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(indices), self.shape[1]), np.float32)
        for split, a, b in self.parts:
            mine = np.flatnonzero((indices >= a) & (indices < b))
            if len(mine):
                wanted, where = np.unique(indices[mine] - a, return_inverse=True)
                out[mine] = self._finish(self._read(self.cache.file[split]["pooled"], wanted))[where]
        return out

    @staticmethod
    def _read(dataset, wanted: np.ndarray) -> np.ndarray:
        """``dataset[wanted]`` (sorted, unique): h5py selects a list of rows one hyperslab each (tens
        of microseconds a row), so rows close together are read as one span and picked here."""
        gaps = np.flatnonzero(np.diff(wanted) > SPAN_GAP) + 1
        parts = []
        for run in np.split(wanted, gaps):
            if len(run) >= SPAN_MIN_ROWS:
                parts.append(dataset[int(run[0]) : int(run[-1]) + 1][run - run[0]])
            else:
                parts.append(dataset[run])
        return np.concatenate(parts)


class UnitRows(PooledRows):
    """``PooledRows`` scaled to unit length as they are read: the vectors whose products are cosines."""

    def _finish(self, x: np.ndarray) -> np.ndarray:
        return normalise(x)


def take(vectors, indices) -> np.ndarray:
    """Rows of an array or of ``PooledRows`` at ``indices``."""
    return vectors.take(indices) if isinstance(vectors, PooledRows) else np.asarray(vectors)[np.asarray(indices)]


@dataclass
class Embeddings:
    """Every cached row of every split: unit-length pooled features, and where each came from."""

    vectors: UnitRows | np.ndarray  # (N, 1280) float32, L2-normalised; UnitRows reads them from the cache
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
    """All splits of an open ``Cache``, in the cache's split order; the vectors stay in the file
    (``UnitRows``), so the cache must stay open while they are used."""
    splits, keys, labels = [], [], []
    for split in cache.splits:
        keys += cache.keys(split)
        splits += [split] * cache.n_examples(split)
        labels.append(cache.labels(split))
    return Embeddings(UnitRows(cache), splits, keys, np.concatenate(labels), list(cache.class_names))


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
        found = nearest_rows(emb.vectors, vector, k, exclude)
    finally:
        if opened:
            cache.close()
    return NeighborsResult(described, [{"rank": rank, **emb.row(i), "cosine": cosine}
                                       for rank, (i, cosine) in enumerate(found, 1)])


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


def nearest_rows(vectors, vector: np.ndarray, k: int, exclude: int | None = None) -> list[tuple[int, float]]:
    """(row, cosine) of the ``k`` unit ``vectors`` nearest ``vector``, most similar first (ties: the
    lower row), ``exclude`` left out: an exact scan, block by block."""
    best_rows, best_cosines = np.zeros(0, np.int64), np.zeros(0, np.float64)
    for lo in range(0, len(vectors), SEARCH_BLOCK):
        cosines = (vectors[lo : lo + SEARCH_BLOCK] @ vector).astype(np.float64)
        rows = np.arange(lo, lo + len(cosines))
        if exclude is not None and lo <= exclude < lo + len(cosines):
            cosines, rows = np.delete(cosines, exclude - lo), np.delete(rows, exclude - lo)
        best_rows, best_cosines = np.concatenate([best_rows, rows]), np.concatenate([best_cosines, cosines])
        order = np.lexsort((best_rows, -best_cosines))[:k]
        best_rows, best_cosines = best_rows[order], best_cosines[order]
    return [(int(i), float(np.clip(c, -1.0, 1.0))) for i, c in zip(best_rows, best_cosines)]


# ---------------------------------------------------------------------------------------------
# Near-duplicates


@dataclass
class DuplicatesResult:
    threshold: float
    n_images: int
    seconds: float
    pairs: list[dict] = field(default_factory=list)  # a, b (rows), cosine, leakage, same_label
    counts: dict[str, int] = field(default_factory=dict)  # "train" / "train-validation" → pairs
    search: str = "exact"  # or "approximate" (the index's candidates, each checked exactly)

    @property
    def leakage(self) -> list[dict]:
        return [p for p in self.pairs if p["leakage"]]

    def to_dict(self) -> dict:
        return {"threshold": self.threshold, "n_images": self.n_images, "search": self.search,
                "seconds": round(self.seconds, 3), "n_pairs": len(self.pairs), "n_leakage": len(self.leakage),
                "counts": self.counts, "pairs": self.pairs}


def duplicates(cache, threshold: float = DEFAULT_THRESHOLD, *, search: str = "auto", cache_dir=None,
               progress=None) -> DuplicatesResult:
    """Every pair of cached images whose pooled features have a cosine of at least ``threshold``,
    within a split and across splits (leakage), most similar first.

    ``search``: ``exact`` (every pair, block by block: quadratic), ``approximate`` (an index's
    candidates, each checked exactly: faiss, an optional extra), or ``auto`` (exact up to
    ``EXACT_MAX_ROWS`` rows). ``progress`` (optional) gets ``start_split("pairs", n, 0)`` and
    ``advance("pairs", rows)`` (the approximate search first reports its index as ``"index"``).
    """

    check_range("threshold", threshold, 0.0, 1.0, float, high_open=False)
    check_choice("search", search, SEARCHES)
    resolve_cache_dir(cache_dir)
    opened = not isinstance(cache, Cache)
    cache = open_cache(cache, cache_dir) if opened else cache
    try:
        return duplicate_pairs(load_embeddings(cache), threshold, progress, search)
    finally:
        if opened:
            cache.close()


def duplicate_pairs(emb: Embeddings, threshold: float, progress=None, search: str = "auto") -> DuplicatesResult:
    """``duplicates`` over embeddings already loaded (the audit's)."""
    search = resolve_search(search, len(emb.keys))
    started = time.perf_counter()
    found = similar_pairs(emb.vectors, threshold, progress, search)
    seconds = time.perf_counter() - started
    pairs, counts = [], {}
    for i, j, cosine in found:
        a, b = emb.row(i), emb.row(j)
        where = a["split"] if a["split"] == b["split"] else "-".join(sorted((a["split"], b["split"])))
        counts[where] = counts.get(where, 0) + 1
        pairs.append({"a": a, "b": b, "cosine": cosine, "leakage": a["split"] != b["split"],
                      "same_label": a["label"] == b["label"]})
    return DuplicatesResult(float(threshold), len(emb.keys), seconds, pairs, counts, search)


def resolve_search(search: str, n_rows: int) -> str:
    check_choice("search", search, SEARCHES)
    if search == "auto":
        return "exact" if n_rows <= EXACT_MAX_ROWS else "approximate"
    return search


def similar_pairs(vectors, threshold: float, progress=None, search: str = "exact") -> list[tuple[int, int, float]]:
    """(i, j, cosine) with i < j and cosine ≥ ``threshold`` among unit ``vectors`` (an array or
    ``UnitRows``), most similar first. The cosine of every pair found is computed exactly (float64)."""
    search = resolve_search(search, len(vectors))
    progress = progress if progress is not None else NullProgress()
    pairs = _exact_pairs(vectors, threshold, progress) if search == "exact" else \
        _approximate_pairs(vectors, threshold, progress)
    i, j, cosine = pairs
    order = np.lexsort((j, i, -cosine))
    return [(int(i[k]), int(j[k]), float(cosine[k])) for k in order]


# float32 products of unit rows are off by up to ~1e-6 per 1280 terms: candidates are taken this far
# below the threshold and kept if their float64 cosine reaches it (an exact copy: 1 - 1e-7, kept at 1.0)
CANDIDATE_SLACK = 1e-4
THRESHOLD_TOLERANCE = 1e-6


def _later(i: np.ndarray, j: np.ndarray):
    """The pairs with j > i: each pair once, no row with itself."""
    keep = j > i
    return i[keep], j[keep]


def _exact_cosines(i, j, left: np.ndarray, right: np.ndarray, threshold: float):
    """The candidate pairs (i, j), rows ``left`` and ``right``, whose float64 cosine reaches ``threshold``."""
    cosine = np.clip(np.einsum("ij,ij->i", left.astype(np.float64), right.astype(np.float64)), -1.0, 1.0)
    keep = cosine >= threshold - THRESHOLD_TOLERANCE
    return i[keep], j[keep], cosine[keep]


def _exact_pairs(vectors, threshold: float, progress):
    """Every block of rows against itself and every later block: memory holds two blocks."""
    n, found = len(vectors), []
    progress.start_split("pairs", n, 0)
    for lo in range(0, n, SEARCH_BLOCK):
        a = vectors[lo : lo + SEARCH_BLOCK]
        for lo_b in range(lo, n, SEARCH_BLOCK):
            b = a if lo_b == lo else vectors[lo_b : lo_b + SEARCH_BLOCK]
            i, j = np.nonzero(a @ b.T >= threshold - CANDIDATE_SLACK)
            i, j = _later(i + lo, j + lo_b)
            if len(i):
                found.append(_exact_cosines(i, j, a[i - lo], b[j - lo_b], threshold))
        progress.advance("pairs", len(a))
    progress.end_split("pairs")
    return _joined(found)


def _joined(found):
    if not found:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    return tuple(np.concatenate(parts) for parts in zip(*found))


# The approximate index: inverted lists (about 4 √N of them, each trained on at least 39 rows, as
# faiss asks, the sample held in memory: at most TRAINING_MAX_ROWS, so at most 840 lists) over
# 8-bit codes of the rows (1 byte a feature: 1.2 GiB for 1 M rows of 1280); each query scans the
# NPROBE lists nearest it. Codes shift a cosine by about 1e-3, so candidates are
# taken APPROXIMATE_MARGIN below the threshold, then checked against the rows' exact cosine.
NPROBE = 16
APPROXIMATE_MARGIN = 0.02
TRAINING_ROWS_PER_LIST = 64
TRAINING_MAX_ROWS = 32_768  # 160 MiB of 1280 float32 features


def approximate_index(vectors, progress):
    """A faiss index of the unit ``vectors`` (inner products), trained on a seeded sample, the rows
    added block by block; returned with its quantizer, which it does not own."""
    faiss = import_faiss()
    n, d = len(vectors), vectors.shape[1]
    lists = max(1, min(int(4 * np.sqrt(n)), min(n, TRAINING_MAX_ROWS) // 39))
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFScalarQuantizer(quantizer, d, lists, faiss.ScalarQuantizer.QT_8bit,
                                          faiss.METRIC_INNER_PRODUCT)
    size = min(n, lists * TRAINING_ROWS_PER_LIST, TRAINING_MAX_ROWS)
    sample = np.sort(np.random.default_rng(0).choice(n, size, replace=False))
    index.train(np.ascontiguousarray(take(vectors, sample)))
    progress.start_split("index", n, 0)
    for lo in range(0, n, SEARCH_BLOCK):
        block = np.ascontiguousarray(vectors[lo : lo + SEARCH_BLOCK])
        index.add(block)
        progress.advance("index", len(block))
    progress.end_split("index")
    index.nprobe = min(lists, NPROBE)
    return index, quantizer


def _approximate_pairs(vectors, threshold: float, progress):
    n = len(vectors)
    if n < 2:
        return _joined([])
    index, _quantizer = approximate_index(vectors, progress)
    found = []
    progress.start_split("pairs", n, 0)
    for lo in range(0, n, SEARCH_BLOCK):
        a = np.ascontiguousarray(vectors[lo : lo + SEARCH_BLOCK])
        limits, _, rows = index.range_search(a, float(threshold - APPROXIMATE_MARGIN))
        # a pair the index finds from either side counts (its lists are probed per query): each
        # is written low row first, and kept once
        q, r = np.repeat(np.arange(len(a)), np.diff(limits).astype(np.int64)) + lo, rows.astype(np.int64)
        keep = q != r
        found.append(np.unique(np.minimum(q, r)[keep] * n + np.maximum(q, r)[keep]))
        progress.advance("pairs", len(a))
    progress.end_split("pairs")
    codes = np.unique(np.concatenate(found)) if found else np.zeros(0, np.int64)
    return _checked(vectors, codes // n, codes % n, threshold)


def _checked(vectors, i: np.ndarray, j: np.ndarray, threshold: float):
    """The candidate pairs whose exact cosine reaches ``threshold``, read a block of pairs at a time."""
    checked = []
    for lo in range(0, len(i), SEARCH_BLOCK):
        a, b = i[lo : lo + SEARCH_BLOCK], j[lo : lo + SEARCH_BLOCK]
        checked.append(_exact_cosines(a, b, take(vectors, a), take(vectors, b), threshold))
    return _joined(checked)


def import_faiss():
    try:
        import faiss
    except ImportError:
        raise BottlecacheError(f"The approximate search needs faiss, an optional extra: {FAISS_HINT}; or pass "
                               "--search exact (quadratic in the rows).") from None
    return faiss


# ---------------------------------------------------------------------------------------------
# Each row's nearest rows (the audit's outliers)


def mean_nearest_cosine(vectors, k: int, progress=None, search: str = "auto") -> np.ndarray:
    """(N,) the mean cosine of each of the unit ``vectors`` to its ``k`` nearest other rows: exact
    (every block against every block, memory two blocks and the answer) or from the approximate
    index (its 8-bit codes' cosines, about 1e-3 off), as ``resolve_search`` picks."""
    progress = progress if progress is not None else NullProgress()
    n = len(vectors)
    k = min(k, n - 1)
    out = np.zeros(n, np.float64)
    if k < 1:
        return out
    search = resolve_search(search, n)
    index, _quantizer = approximate_index(vectors, progress) if search == "approximate" else (None, None)
    progress.start_split("neighbours", n, 0)
    if index is not None:
        for lo in range(0, n, SEARCH_BLOCK):
            a = np.ascontiguousarray(vectors[lo : lo + SEARCH_BLOCK])
            cosines, rows = index.search(a, k + 1)
            mine = rows == np.arange(lo, lo + len(a))[:, None]
            # itself where the index found it, else its farthest: k of the k + 1 left either way
            drop = np.where(mine.any(axis=1), mine.argmax(axis=1), k)
            keep = np.ones_like(mine)
            keep[np.arange(len(a)), drop] = False
            out[lo : lo + len(a)] = np.where(keep, cosines, 0.0).sum(axis=1) / k
            progress.advance("neighbours", len(a))
    else:
        for lo in range(0, n, SEARCH_BLOCK):
            a = vectors[lo : lo + SEARCH_BLOCK]
            best = np.full((len(a), k), -np.inf, np.float32)
            for lo_b in range(0, n, SEARCH_BLOCK):
                products = a @ (a if lo_b == lo else vectors[lo_b : lo_b + SEARCH_BLOCK]).T
                if lo_b == lo:
                    np.fill_diagonal(products, -np.inf)  # not its own neighbour
                both = np.concatenate([best, products], axis=1)
                best = np.partition(both, both.shape[1] - k, axis=1)[:, -k:]
            out[lo : lo + len(a)] = best.astype(np.float64).mean(axis=1)
            progress.advance("neighbours", len(a))
    progress.end_split("neighbours")
    return np.clip(out, -1.0, 1.0)
