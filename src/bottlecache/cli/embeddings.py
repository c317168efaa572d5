"""``bottlecache cache neighbors`` and ``cache duplicates``: the pooled features as embeddings."""

from __future__ import annotations

from typing import Annotated

import typer

from ..serve.embeddings import DEFAULT_K, DEFAULT_THRESHOLD, EXACT_MAX_ROWS
from ._common import CacheDirOpt, JsonOpt, RichProgress, WeightsOpt, err, handle_errors, out, print_json, table

MAX_ROWS_SHOWN = 50


@handle_errors(interrupted="interrupted; nothing was written")
def neighbors(
    cache: Annotated[str, typer.Argument(help="Cache file or fingerprint prefix.")],
    query: Annotated[str, typer.Argument(help="An image file (run through the cache's backbone) or a cached key.")],
    k: Annotated[int, typer.Option("-k", "--k", help="How many neighbours.")] = DEFAULT_K,
    weights: WeightsOpt = None,
    cache_dir: CacheDirOpt = None,
    as_json: JsonOpt = False,
):
    """The cached images nearest to an image or a cached key (cosine of the pooled features)."""
    from ..serve.embeddings import neighbors as find_neighbors

    result = find_neighbors(cache, query, k, weights=weights, cache_dir=cache_dir)
    if as_json:
        print_json(result.to_dict())
        return
    rows = [[n["rank"], n["split"], n["key"], n["label"], f"{n['cosine']:.4f}"] for n in result.neighbors]
    title = result.query.get("image") or f"{result.query['split']}/{result.query['key']} ({result.query['label']})"
    out.print(table(f"nearest to {title}", ["rank", "split", "key", "class", "cosine"], rows))


@handle_errors(interrupted="interrupted; nothing was written")
def duplicates(
    cache: Annotated[str, typer.Argument(help="Cache file or fingerprint prefix.")],
    threshold: Annotated[float, typer.Option(help="Cosine of the pooled features at or above which two images are near-duplicates.")] = DEFAULT_THRESHOLD,
    search: Annotated[str, typer.Option(help=f"exact (every pair: quadratic), approximate (an index's candidates checked exactly; needs faiss: pip install 'bottlecache[faiss]'), or auto: exact up to {EXACT_MAX_ROWS:,} images.")] = "auto",
    cache_dir: CacheDirOpt = None,
    as_json: JsonOpt = False,
):
    """Near-duplicate pairs within and across splits; a pair across splits is reported as leakage."""
    from ..serve.embeddings import duplicates as find_duplicates

    with RichProgress(quiet=as_json) as progress:
        result = find_duplicates(cache, threshold, search=search, cache_dir=cache_dir, progress=progress)
    if as_json:
        print_json(result.to_dict())
        return
    rows = [[("LEAKAGE " if p["leakage"] else "") + (p["a"]["split"] if not p["leakage"] else f"{p['a']['split']}-{p['b']['split']}"),
             p["a"]["key"], p["b"]["key"], f"{p['cosine']:.4f}", "" if p["same_label"] else "labels differ"]
            for p in result.pairs[:MAX_ROWS_SHOWN]]
    if rows:
        out.print(table(f"near-duplicates (cosine ≥ {result.threshold:g})", ["where", "a", "b", "cosine", "note"], rows))
    if len(result.pairs) > MAX_ROWS_SHOWN:
        err.print(f"(the first {MAX_ROWS_SHOWN} of {len(result.pairs)} pairs; --json lists all)", markup=False)
    counts = ", ".join(f"{where} {n}" for where, n in sorted(result.counts.items())) or "none"
    out.print(f"{len(result.pairs)} pair(s) among {result.n_images} images in {result.seconds:.2f} s, {result.search} "
              f"search ({counts}); "
              f"{len(result.leakage)} across splits (leakage)", markup=False)
