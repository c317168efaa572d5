"""``bottlecache cache audit``: label issues, outliers, near-duplicates and class balance of a cache."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..serve.audit import DEFAULT_C, DEFAULT_FOLDS, DEFAULT_NEIGHBORS, DEFAULT_TOP, EXCLUDE_FILE
from ..serve.embeddings import DEFAULT_THRESHOLD
from ._common import CacheDirOpt, JsonOpt, RichProgress, handle_errors, out, print_json, table

ISSUES_SHOWN = 30


@handle_errors(interrupted="interrupted; nothing was written")
def audit(
    cache: Annotated[str, typer.Argument(help="Cache file or fingerprint prefix.")],
    folds: Annotated[int, typer.Option(help="Out-of-fold heads (k-fold logistic regression), 2-100.")] = DEFAULT_FOLDS,
    c: Annotated[float, typer.Option("--C", help="Inverse regularisation of the out-of-fold heads.")] = DEFAULT_C,
    neighbors: Annotated[int, typer.Option(help="Outliers: nearest images each one's mean distance is taken to.")] = DEFAULT_NEIGHBORS,
    top: Annotated[int, typer.Option(help="How many outliers (and near-duplicate pairs) to list.")] = DEFAULT_TOP,
    threshold: Annotated[float, typer.Option(help="Cosine at or above which two images are near-duplicates.")] = DEFAULT_THRESHOLD,
    seed: Annotated[int, typer.Option(help="Seed of the folds.")] = 0,
    max_memory: Annotated[Optional[str], typer.Option("--max-memory", help="Memory the features may take, e.g. 16M or 2G (default: a quarter of the free memory); above it the out-of-fold heads fit out of core.")] = None,
    data: Annotated[Optional[str], typer.Option("--data", help="The images, for the page's thumbnails (default: where the cache's build found them).")] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help=f"A new folder for audit.json, audit.html and {EXCLUDE_FILE} (default: <cache dir>/audits/<cache name>).")] = None,
    cache_dir: CacheDirOpt = None,
    as_json: JsonOpt = False,
):
    """Find what is wrong with the data: label issues (cleanlab on out-of-fold predictions), outliers,
    near-duplicates and leakage, class balance. Writes a page with thumbnails and the issues' keys
    (train without them: --exclude FILE on cache train-head, finetune run, sweep)."""
    from ..serve.audit import AuditSettings
    from ..serve.audit import audit as run_audit

    settings = AuditSettings(folds=folds, C=c, neighbors=neighbors, top=top, threshold=threshold, seed=seed,
                             max_memory=max_memory)
    with RichProgress(quiet=as_json) as progress:
        result = run_audit(cache, settings=settings, out=out_dir, data=data, cache_dir=cache_dir, progress=progress)
    if as_json:
        print_json(result.to_dict())
        return
    rows = [[i, r["split"], r["key"], r["given"], r["suggested"], f"{r['score']:.4f}"]
            for i, r in enumerate(result.label_issues[:ISSUES_SHOWN], 1)]
    if rows:
        out.print(table(f"label issues ({len(result.label_issues)}, most likely wrong first)",
                        ["#", "split", "key", "given", "suggested", "label quality"], rows))
    rows = [[r["split"], r["key"], r["label"], f"{r['distance']:.4f}"] for r in result.outliers]
    out.print(table(f"outliers (the {len(rows)} farthest from their {result.settings.neighbors} nearest images)",
                    ["split", "key", "class", "mean distance"], rows))
    balance = "; ".join(f"{split} " + ", ".join(f"{name} {n}" for name, n in counts.items())
                        for split, counts in result.class_balance.items())
    dup = result.duplicates
    out.print(f"{len(result.label_issues)} label issue(s) among {result.n_images} images (out-of-fold accuracy "
              f"{result.out_of_fold_accuracy:.4f}, {result.folds} folds); {len(dup.pairs)} near-duplicate pair(s), "
              f"{len(dup.leakage)} across splits; classes: {balance}; {result.seconds['total']:.1f} s", markup=False)
    out.print(f"wrote {result.path} (audit.html, audit.json, {EXCLUDE_FILE})", markup=False)
