"""The pooled features as embeddings (issue 15): nearest neighbours, near-duplicates and leakage.

A real photo is planted in two splits (train and validation: leakage) and another twice in one
split; the cache is built from real photos with the real weights."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import error_line, invoke, need_extra

from bottlecache import build_cache, open_cache
from bottlecache.cache.virtual import repeat_cache
from bottlecache.core.errors import BottlecacheError
from bottlecache.serve import embeddings
from bottlecache.serve.embeddings import (
    UnitRows,
    duplicates,
    mean_nearest_cosine,
    nearest_rows,
    neighbors,
    normalise,
    similar_pairs,
)

PLANTED = "validation/cats/planted-copy.jpg"
WITHIN = "train/dogs/second-copy.jpg"


@pytest.fixture(scope="module")
def leaky(tmp_path_factory, weights_path, cats_dogs):
    """8 + 8 photos to train, 4 + 4 to validate, at 96 px; one train cat copied into validation,
    one train dog copied within train."""
    root = tmp_path_factory.mktemp("leaky")
    data = root / "data"
    for split, n in (("train", 8), ("validation", 4)):
        for name in ("cats", "dogs"):
            (data / split / name).mkdir(parents=True)
            for photo in sorted((cats_dogs / split / name).iterdir())[:n]:
                shutil.copy(photo, data / split / name / photo.name)
    cat = sorted((data / "train" / "cats").iterdir())[0]
    dog = sorted((data / "train" / "dogs").iterdir())[0]
    shutil.copy(cat, data / PLANTED)
    shutil.copy(dog, data / WITHIN)
    report = build_cache(data, image_size=96, weights=weights_path, cache_dir=root / "cache", engine="keras")
    return report, data, f"train/cats/{cat.name}", f"train/dogs/{dog.name}"


def test_duplicates_report_the_planted_copy_as_leakage(leaky):
    report, _, original_cat, original_dog = leaky
    result = invoke(["cache", "duplicates", report.path, "--json"])
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)
    pairs = {frozenset((p["a"]["key"], p["b"]["key"])): p for p in found["pairs"]}
    leak = pairs[frozenset((original_cat, PLANTED))]
    assert leak["leakage"] and leak["cosine"] > 0.9999 and leak["same_label"]
    within = pairs[frozenset((original_dog, WITHIN))]
    assert not within["leakage"] and within["a"]["split"] == within["b"]["split"] == "train"
    assert found["n_leakage"] == sum(p["leakage"] for p in found["pairs"]) >= 1
    assert found["n_images"] == 26 and found["counts"]["train-validation"] == found["n_leakage"]
    table = invoke(["cache", "duplicates", report.path])
    assert table.exit_code == 0 and "LEAKAGE" in table.stdout and "(leakage)" in table.stdout


def test_duplicates_are_exactly_the_pairs_above_the_threshold(leaky):
    """Checked against the full cosine matrix, at a threshold low enough to find many pairs."""
    report, *_ = leaky
    with open_cache(report.path) as cache:
        x = normalise(np.concatenate([cache.pooled(s) for s in cache.splits]))
    cosine = x.astype(np.float64) @ x.T.astype(np.float64)
    for threshold in (0.5, 0.8, 0.95, 1.0):
        expected = {(i, j) for i, j in zip(*np.nonzero(np.triu(cosine >= threshold - 1e-6, k=1)))}
        found = similar_pairs(x, threshold)
        assert {(i, j) for i, j, _ in found} == expected, threshold
        assert [c for *_, c in found] == sorted((c for *_, c in found), reverse=True)
    assert len(similar_pairs(x, 0.5)) > 2  # the check above compared more than the planted pairs
    assert duplicates(report.path, 1.0).leakage  # an exact copy is found even at 1.0


def test_neighbors_of_a_key_and_of_an_image(leaky):
    report, data, original_cat, _ = leaky
    by_key = neighbors(report.path, PLANTED, k=3)
    assert [n["rank"] for n in by_key.neighbors] == [1, 2, 3]
    assert by_key.neighbors[0]["key"] == original_cat and by_key.neighbors[0]["cosine"] > 0.9999
    assert PLANTED not in [n["key"] for n in by_key.neighbors]  # a key is not its own neighbour
    cosines = [n["cosine"] for n in by_key.neighbors]
    assert cosines == sorted(cosines, reverse=True)
    result = invoke(["cache", "neighbors", report.path, data / original_cat, "-k", "2", "--json"])
    assert result.exit_code == 0, result.output
    by_image = json.loads(result.stdout)
    assert by_image["query"] == {"image": str(data / original_cat)}
    assert {n["key"] for n in by_image["neighbors"]} == {original_cat, PLANTED}  # the photo and its copy
    assert min(n["cosine"] for n in by_image["neighbors"]) > 0.999
    table = invoke(["cache", "neighbors", report.path, original_cat])
    assert table.exit_code == 0 and PLANTED in table.stdout


def test_bad_queries_are_one_line(leaky, tmp_path):
    report, *_ = leaky
    line = error_line(invoke(["cache", "neighbors", report.path, "no/such/key.jpg"]))
    assert "neither an image file nor a key" in line and "keys look like" in line
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image")
    assert "cannot be read" in error_line(invoke(["cache", "neighbors", report.path, junk]))
    assert "'k'" in error_line(invoke(["cache", "neighbors", report.path, PLANTED, "-k", "0"]))
    assert "'threshold'" in error_line(invoke(["cache", "duplicates", report.path, "--threshold", "1.5"]))
    with pytest.raises(BottlecacheError, match="'threshold'"):
        duplicates(report.path, -0.1)


def _cosines(cache) -> tuple[np.ndarray, np.ndarray]:
    whole = normalise(np.concatenate([cache.pooled(s) for s in cache.splits]))
    return whole, whole.astype(np.float64) @ whole.T.astype(np.float64)


def _pairs_above(cosine: np.ndarray, threshold: float) -> set[tuple[int, int]]:
    return {(int(i), int(j)) for i, j in zip(*np.nonzero(np.triu(cosine >= threshold - 1e-6, k=1)))}


def test_blocks_of_rows_give_the_answers_of_the_whole_matrix(leaky, monkeypatch):
    """Rows read from the file in blocks of 7 (the 26 rows span both splits and four blocks): the
    rows, the nearest rows and the pairs are those of the whole cosine matrix in memory."""
    monkeypatch.setattr(embeddings, "SEARCH_BLOCK", 7)
    report, *_ = leaky
    with open_cache(report.path) as cache:
        whole, cosine = _cosines(cache)
        rows = UnitRows(cache)
        assert rows.shape == whole.shape and np.array_equal(rows[5:20], whole[5:20])
        assert np.array_equal(rows[17], whole[17]) and np.array_equal(rows.take([20, 2, 20, 11]), whole[[20, 2, 20, 11]])
        for query in (0, 13, 25):
            found = nearest_rows(rows, whole[query], 5, exclude=query)
            others = np.delete(np.arange(26), query)
            expected = others[np.argsort(-cosine[query, others], kind="stable")][:5]
            assert np.allclose([c for _, c in found], cosine[query, expected], atol=1e-5)
            assert {i for i, _ in found[:4]} == set(expected[:4].tolist()) and query not in {i for i, _ in found}
        for threshold in (0.5, 0.9):
            assert {(i, j) for i, j, _ in similar_pairs(rows, threshold, search="exact")} == _pairs_above(cosine, threshold)


def test_each_rows_nearest_rows_block_by_block_are_scikit_learns(repeated, monkeypatch):
    """The audit's outliers: the mean cosine of each row to its k nearest others, exact in blocks of 97
    rows, equals scikit-learn's brute-force cosine neighbours; from the faiss index, close to it."""
    from sklearn.neighbors import NearestNeighbors

    monkeypatch.setattr(embeddings, "SEARCH_BLOCK", 97)
    with open_cache(repeated) as cache:
        rows = UnitRows(cache)
        whole = rows[0 : len(rows)]
        for k in (3, 20):  # fewer than each row's 13 copies, and more
            distances, _ = NearestNeighbors(n_neighbors=k + 1, algorithm="brute", metric="cosine").fit(whole).kneighbors(whole)
            expected = 1 - distances[:, 1:].mean(axis=1)
            assert np.allclose(mean_nearest_cosine(rows, k, search="exact"), expected, atol=1e-5)
            if k == 20:
                need_extra("faiss", "faiss")
                assert np.allclose(mean_nearest_cosine(rows, k, search="approximate"), expected, atol=1e-2)
        assert np.array_equal(mean_nearest_cosine(rows[0:1], 5), [0.0])  # no other row: nothing to be near


@pytest.fixture(scope="module")
def repeated(small_cache, tmp_path_factory):
    """The small cache's 144 real rows, each 14 times (2,016 rows): every row has 13 exact copies."""
    with open_cache(small_cache.path) as cache:
        rows = {s: cache.n_examples(s) * 14 for s in cache.splits}
    return repeat_cache(small_cache.path, tmp_path_factory.mktemp("repeated") / "caches", rows)


def test_the_approximate_search_finds_the_exact_searchs_pairs(repeated):
    """faiss's inverted lists (51 lists, 16 probed: most pairs are never compared) over the rows'
    8-bit codes; every pair the exact search finds is found, with the same cosine."""
    need_extra("faiss", "faiss")
    with open_cache(repeated) as cache:
        rows = UnitRows(cache)
        assert len(rows) == 2016
        _, cosine = _cosines(cache)
        for threshold in (0.97, 0.7):
            exact = similar_pairs(rows, threshold, search="exact")
            approximate = similar_pairs(rows, threshold, search="approximate")
            assert {(i, j) for i, j, _ in exact} == _pairs_above(cosine, threshold)
            assert approximate == exact, threshold
        assert len(exact) > 144 * 13 * 14 // 2  # at 0.7: the copies, and pairs of different photos besides
    result = invoke(["cache", "duplicates", repeated, "--search", "approximate", "--json"])
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)
    assert found["search"] == "approximate" and found["n_pairs"] == len(duplicates(repeated, search="exact").pairs)


def test_without_faiss_the_approximate_search_is_one_line(repeated, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "faiss", None)  # an import of faiss fails, as where it is not installed
    line = error_line(invoke(["cache", "duplicates", repeated, "--search", "approximate"]))
    assert "pip install 'bottlecache[faiss]'" in line and "--search exact" in line
    assert duplicates(repeated, search="auto").search == "exact"  # 2,016 rows: below EXACT_MAX_ROWS, no faiss needed
