"""``audit``: what is wrong with the data, found from its cache, without running the backbone.

- **Label issues.** Out-of-fold class probabilities for every image of every split: k-fold
  logistic-regression heads (``SklearnHead``) on the pooled features, each image predicted by the
  head that did not see it. cleanlab's confident learning (``cleanlab.filter.find_label_issues``)
  picks the images whose given label the others contradict, ranked by its label quality score
  (the out-of-fold probability of the given label: lowest first). A well-kept library, an
  optional extra: ``pip install 'bottlecache[audit]'``.
- **Outliers.** The mean cosine distance of each image to its ``neighbors`` nearest cached images:
  the largest are photos unlike the rest (neither class, a blank, a text).
- **Near-duplicates and leakage.** ``cache duplicates``'s pairs, the ones across splits (the
  same photo on both sides of an evaluation) and the ones whose labels disagree marked.
- **Class balance** per split.

The result is a table, JSON and one HTML page with thumbnails (the report's style); the keys of
the label issues go to ``exclude.txt``, which ``cache train-head``, ``finetune run`` and ``sweep``
take as ``--exclude`` to train without them. See docs/audit.md.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..cache.store import Cache, open_cache
from ..core.errors import BottlecacheError
from ..core.files import free_folder, staged_folder, write_error
from ..core.options import (
    check_folder_option,
    check_positive,
    check_range,
    check_seed,
    parse_size,
    resolve_cache_dir,
    settings_with,
)
from ..data.sources import open_source
from ..train.heads import MAX_C, SklearnHead, check_new_folder, fits_in_memory, memory_budget, rows_per_block
from ..train.linear import kept_blocks
from .embeddings import (
    DEFAULT_THRESHOLD,
    DuplicatesResult,
    Embeddings,
    PooledRows,
    duplicate_pairs,
    load_embeddings,
    mean_nearest_cosine,
)
from .report import CSS, _h, thumbnails

DEFAULT_FOLDS = 10
MAX_FOLDS = 100
# Measured on the shared photos with 40 train labels flipped (docs/audit.md): C = 0.1 with 10 folds
# ranked 37-38 of the 40 among the first 60 issues over three random flips; C = 1 or 5 folds, 35-37.
DEFAULT_C = 0.1
DEFAULT_NEIGHBORS = 10
DEFAULT_TOP = 20
MAX_TOP = 10_000
EXCLUDE_FILE = "exclude.txt"


@dataclass(frozen=True)
class AuditSettings:
    """How an audit looks, checked once: ``folds`` out-of-fold heads of inverse regularisation ``C``
    (the folds drawn with ``seed``), outliers by the mean distance to ``neighbors`` nearest images
    (the ``top`` farthest listed), near-duplicates at a cosine of ``threshold`` or more.
    ``max_memory`` (bytes, or ``"16M"``, ``"2G"``; default a quarter of the free memory): above it
    the out-of-fold heads fit out of core, from blocks of rows, as ``cache train-head`` does."""

    folds: int = DEFAULT_FOLDS
    C: float = DEFAULT_C
    neighbors: int = DEFAULT_NEIGHBORS
    top: int = DEFAULT_TOP
    threshold: float = DEFAULT_THRESHOLD
    seed: int = 0
    max_memory: int | str | None = None

    def __post_init__(self):
        if self.max_memory is not None:
            object.__setattr__(self, "max_memory", parse_size("max_memory", self.max_memory))
        check_range("folds", self.folds, 2, MAX_FOLDS, high_open=False)
        check_positive("C", self.C, float, maximum=MAX_C)
        check_positive("neighbors", self.neighbors, maximum=MAX_TOP)
        check_positive("top", self.top, maximum=MAX_TOP)
        check_range("threshold", self.threshold, 0.0, 1.0, float, high_open=False)
        check_seed(self.seed)


@dataclass
class AuditResult:
    cache: Path
    settings: AuditSettings
    n_images: int
    folds: int  # as run (fewer than asked when a class has fewer images)
    out_of_fold_accuracy: float
    label_issues: list[dict]  # key, split, given, suggested, score, … ranked: most likely wrong first
    outliers: list[dict]
    duplicates: DuplicatesResult
    class_balance: dict[str, dict[str, int]]
    seconds: dict[str, float] = field(default_factory=dict)
    path: Path | None = None  # the folder written (audit.json, audit.html, exclude.txt)

    def to_dict(self) -> dict:
        return {
            "cache": str(self.cache), "n_images": self.n_images, "folds": self.folds,
            "C": self.settings.C, "neighbors": self.settings.neighbors, "seed": self.settings.seed,
            "out_of_fold_accuracy": self.out_of_fold_accuracy,
            "label_issues": self.label_issues, "outliers": self.outliers,
            "duplicates": self.duplicates.to_dict(), "class_balance": self.class_balance,
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "path": str(self.path) if self.path else None,
        }


def audit(cache, *, settings: AuditSettings | None = None, out=None, write: bool = True, data=None,
          cache_dir=None, progress=None, **overrides) -> AuditResult:
    """Audit a cache: label issues, outliers, near-duplicates and leakage, class balance.

    Parameters
    ----------
    cache : Cache or str or path
        An open ``Cache``, a cache file, or a fingerprint prefix in ``cache_dir``.
    settings : AuditSettings, optional
        Folds, C, neighbours, how many outliers, the duplicate threshold, the seed; keywords
        name its fields and override them.
    out : path, optional
        A new folder for ``audit.json``, ``audit.html`` (thumbnails) and ``exclude.txt`` (the
        label issues' keys, one a line); default ``<cache dir>/audits/<cache name>`` (``-2``, … if
        taken). ``write=False``: nothing is written.
    data : str or path, optional
        The images, for the page's thumbnails; default where the cache's build found them.
    progress : bottlecache.core.progress.Progress, optional
    """
    (settings,) = settings_with("audit", {AuditSettings: settings}, overrides)
    resolve_cache_dir(cache_dir)
    if out is not None:
        out = check_folder_option("out", out)
        check_new_folder(out)
    cleanlab = _import_cleanlab()
    opened = not isinstance(cache, Cache)
    cache = open_cache(cache, cache_dir) if opened else cache
    try:
        # the images of the thumbnails first: a bad --data is refused before the work
        source = _thumbnail_source(data, cache.build_info.get("data") or {}, cache.config) if write else None
        result = _audit(cache.path, load_embeddings(cache), PooledRows(cache), settings, cleanlab, progress)
    finally:
        if opened:
            cache.close()
    if write:
        if out is None:
            out = free_folder(Path(result.cache).parent / "audits" / Path(result.cache).stem)
        result.path = write_audit(result, Path(out), source)
    return result


def _import_cleanlab():
    try:
        import cleanlab.filter
        import cleanlab.rank
    except ImportError:
        raise BottlecacheError("The audit ranks label issues with cleanlab, an optional extra: "
                               "pip install 'bottlecache[audit]' (or pip install cleanlab).") from None
    return cleanlab


def _audit(path, emb: Embeddings, raw: PooledRows, settings: AuditSettings, cleanlab, progress) -> AuditResult:
    labels = emb.labels.astype(np.int64)
    counts = np.bincount(labels, minlength=len(emb.class_names))
    present = counts[counts > 0]
    if len(present) < 2:
        raise BottlecacheError("The audit needs images of at least two classes; this cache has "
                               f"{', '.join(emb.class_names[i] for i in np.flatnonzero(counts)) or 'none'}.")
    folds = int(min(settings.folds, present.min()))
    if folds < 2:
        rare = emb.class_names[int(np.flatnonzero(counts == present.min())[0])]
        raise BottlecacheError(f"The class {rare!r} has one image; out-of-fold predictions need at least two "
                               "of every class.")
    seconds = {}
    started = time.perf_counter()
    proba = out_of_fold(raw, labels, len(emb.class_names), folds, settings.C, settings.seed, progress,
                        settings.max_memory or memory_budget())
    seconds["out_of_fold"] = time.perf_counter() - started

    started = time.perf_counter()
    ranked = cleanlab.filter.find_label_issues(labels, proba, return_indices_ranked_by="self_confidence")
    quality = cleanlab.rank.get_label_quality_scores(labels, proba, method="self_confidence")
    issues = [_issue(emb, proba, quality, int(i)) for i in ranked]
    seconds["label_issues"] = time.perf_counter() - started

    started = time.perf_counter()
    outliers = _outliers(emb, settings.neighbors, settings.top, progress)
    seconds["outliers"] = time.perf_counter() - started

    duplicates = duplicate_pairs(emb, settings.threshold, progress)
    seconds["duplicates"] = duplicates.seconds
    balance = {}
    for split, label in zip(emb.splits, labels):
        per_split = balance.setdefault(split, {name: 0 for name in emb.class_names})
        per_split[emb.class_names[label]] += 1
    accuracy = float((proba.argmax(axis=1) == labels).mean())
    seconds["total"] = sum(seconds.values())
    return AuditResult(Path(path), settings, len(labels), folds, accuracy, issues, outliers, duplicates, balance,
                       seconds)


def out_of_fold(x, labels: np.ndarray, n_classes: int, folds: int, C: float, seed: int, progress=None,
                max_memory: int | None = None) -> np.ndarray:
    """(N, n_classes) probabilities, each row from the head fitted on the other folds (stratified,
    shuffled with ``seed``). ``x``: the rows (an array, or ``PooledRows`` read in blocks); when they
    do not fit ``max_memory``, each head fits out of core (``SklearnHead.fit_blocks``, the same
    objective) and predicts its fold block by block."""
    from sklearn.model_selection import StratifiedKFold

    n, d = len(labels), x.shape[1]
    in_memory = fits_in_memory(n, d, max_memory)
    if in_memory and not isinstance(x, np.ndarray):
        x = x[0:n]
    block = rows_per_block(max_memory, d) if not in_memory else n
    proba = np.zeros((n, n_classes))
    if progress is not None:
        progress.start_split("folds", folds, 0)
    for train, held in StratifiedKFold(folds, shuffle=True, random_state=seed).split(np.zeros((n, 1)), labels):
        head = SklearnHead(C=C)
        if in_memory:
            head.fit(x[train], labels[train], n_classes=n_classes)
            proba[held] = head.predict_proba(x[held])
        else:
            is_held = np.zeros(n, bool)
            is_held[held] = True
            head.fit_blocks(kept_blocks(lambda lo, hi: x[lo:hi], n, ~is_held, block), labels[train], d,
                            n_classes=n_classes)
            for lo in range(0, n, block):
                mine = np.flatnonzero(is_held[lo : lo + block])
                if len(mine):
                    proba[lo + mine] = head.predict_proba(x[lo : lo + block][mine])
        if progress is not None:
            progress.advance("folds", 1)
    if progress is not None:
        progress.end_split("folds")
    return proba


def _issue(emb: Embeddings, proba: np.ndarray, quality: np.ndarray, i: int) -> dict:
    given, suggested = int(emb.labels[i]), int(proba[i].argmax())
    return {"key": emb.keys[i], "split": emb.splits[i], "given": emb.class_names[given],
            "suggested": emb.class_names[suggested], "score": float(quality[i]),
            "given_probability": float(proba[i, given]), "suggested_probability": float(proba[i, suggested])}


def _outliers(emb: Embeddings, neighbors: int, top: int, progress=None) -> list[dict]:
    """The ``top`` images farthest (mean cosine distance) from their ``neighbors`` nearest images:
    exact up to ``EXACT_MAX_ROWS`` images, from the approximate index above (``embeddings``)."""
    if len(emb.keys) < 2:
        return []
    score = 1.0 - mean_nearest_cosine(emb.vectors, neighbors, progress)
    order = np.argsort(-score, kind="stable")[:top]
    percentile = (np.argsort(np.argsort(score, kind="stable"), kind="stable") + 1) / len(score)
    return [{**emb.row(int(i)), "distance": float(score[i]), "percentile": float(percentile[i])} for i in order]


# ---------------------------------------------------------------------------------------------
# Writing it


def write_audit(result: AuditResult, out: Path, source) -> Path:
    """``audit.json``, ``audit.html`` and ``exclude.txt`` in the new folder ``out`` (all or none)."""
    check_new_folder(out)
    try:
        with staged_folder(out) as staging:
            (staging / EXCLUDE_FILE).write_text("".join(f"{issue['key']}\n" for issue in result.label_issues),
                                                encoding="utf-8")
            (staging / "audit.html").write_text(render(result, source), encoding="utf-8")
            record = result.to_dict() | {"path": str(out)}
            (staging / "audit.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
    except OSError as error:
        raise write_error(out, error, "nothing was written") from None
    return out


def _thumbnail_source(data, locations: dict, config: dict):
    """The opened data for thumbnails: ``data``, else where the build found it; None if neither is there."""
    where = data if data is not None else locations.get("path")
    if where is None or (data is None and not Path(where).is_dir()):
        return None
    return open_source(where, list(config["splits"].values()), tfds_data_dir=locations.get("tfds_data_dir"))


def render(result: AuditResult, source) -> str:
    """The page: summary, class balance, label issues, outliers, near-duplicates (thumbnails where
    the images are found)."""
    shown = result.label_issues[: max(result.settings.top, 60)]
    pairs = result.duplicates.pairs[: result.settings.top]
    wanted: dict[str, list[str]] = {}
    for row in [*shown, *result.outliers, *(p[s] for p in pairs for s in ("a", "b"))]:
        wanted.setdefault(row["split"], []).append(row["key"])
    pictures = {}
    if source is not None:
        for split, keys in wanted.items():
            pictures.update({(split, k): v for k, v in thumbnails(source, split, keys).items()})

    def picture(row) -> str:
        jpeg = pictures.get((row["split"], row["key"]))
        return f"<img src='data:image/jpeg;base64,{jpeg}' alt='{_h(row['key'])}'>" if jpeg else ""

    issue_cards = "".join(
        f"<figure class='issue'>{picture(r)}<figcaption><b>{_h(r['key'])}</b> ({_h(r['split'])})<br>given "
        f"<span class='wrong'>{_h(r['given'])}</span> ({r['given_probability']:.3f}), suggested {_h(r['suggested'])}"
        f"<br>label quality {r['score']:.4f}</figcaption></figure>" for r in shown)
    outlier_cards = "".join(
        f"<figure class='outlier'>{picture(r)}<figcaption><b>{_h(r['key'])}</b> ({_h(r['split'])}, {_h(r['label'])})"
        f"<br>mean distance {r['distance']:.4f}</figcaption></figure>" for r in result.outliers)
    pair_rows = "".join(
        f"<tr><td>{picture(p['a'])}{_h(p['a']['key'])} ({_h(p['a']['split'])}, {_h(p['a']['label'])})</td>"
        f"<td>{picture(p['b'])}{_h(p['b']['key'])} ({_h(p['b']['split'])}, {_h(p['b']['label'])})</td>"
        f"<td>{p['cosine']:.4f}</td><td>{'leakage' if p['leakage'] else ''}"
        f"{'' if p['same_label'] else ' labels differ'}</td></tr>" for p in pairs)
    splits = list(result.class_balance)
    classes = list(next(iter(result.class_balance.values()))) if splits else []
    balance = "<table><tr><th>split</th>" + "".join(f"<th>{_h(c)}</th>" for c in classes) + "</tr>" + "".join(
        f"<tr><td>{_h(s)}</td>" + "".join(f"<td>{result.class_balance[s][c]}</td>" for c in classes) + "</tr>"
        for s in splits) + "</table>"
    summary = [
        ("cache", str(result.cache)), ("images", f"{result.n_images}"),
        ("out-of-fold heads", f"{result.folds} folds, logistic regression C={result.settings.C:g}: "
                              f"{result.out_of_fold_accuracy:.4f} accuracy"),
        ("label issues", f"{len(result.label_issues)} (cleanlab, ranked by label quality; keys in {EXCLUDE_FILE})"),
        ("near-duplicate pairs", f"{len(result.duplicates.pairs)} at cosine ≥ {result.settings.threshold:g}, "
                                 f"{len(result.duplicates.leakage)} across splits"),
        ("seconds", f"{result.seconds.get('total', 0.0):.1f}"),
    ]
    note = "" if source is not None else ("<p class='note'>Thumbnails need the images: pass --data with the folder the "
                                          "cache was built from.</p>")
    sections = [
        f"<h1>Data audit: {_h(Path(result.cache).name)}</h1>",
        "<table class='summary'>" + "".join(f"<tr><th>{_h(a)}</th><td>{_h(b)}</td></tr>" for a, b in summary) + "</table>",
        note, "<h2>Class balance</h2>", balance,
        f"<h2>Label issues ({len(shown)} of {len(result.label_issues)}, most likely wrong first)</h2>",
        f"<div class='mistakes'>{issue_cards}</div>" if issue_cards else "<p>No label issue found.</p>",
        f"<h2>Outliers ({len(result.outliers)} farthest from their {result.settings.neighbors} nearest images)</h2>",
        f"<div class='mistakes'>{outlier_cards}</div>",
        f"<h2>Near-duplicates ({len(pairs)} of {len(result.duplicates.pairs)})</h2>",
        f"<table class='pairs'><tr><th>a</th><th>b</th><th>cosine</th><th></th></tr>{pair_rows}</table>" if pair_rows
        else "<p>No near-duplicate pair.</p>",
    ]
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>bottlecache audit: "
            f"{_h(Path(result.cache).name)}</title><style>{CSS}.pairs img {{ max-width: 120px; }}</style></head><body>"
            + "\n".join(sections) + "</body></html>\n")
