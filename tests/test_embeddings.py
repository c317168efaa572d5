"""The pooled features as embeddings (issue 15): nearest neighbours, near-duplicates and leakage.

A real photo is planted in two splits (train and validation: leakage) and another twice in one
split; the cache is built from real photos with the real weights."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import error_line, invoke

from bottlecache import build_cache, open_cache
from bottlecache.core.errors import BottlecacheError
from bottlecache.serve.embeddings import duplicates, neighbors, normalise, similar_pairs

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
