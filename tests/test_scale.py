"""Heads on caches larger than memory (issue 29): the scikit-learn head fitted out of core from blocks
of rows, with the in-memory head's objective; a cache of many rows made from a small one (HDF5
virtual datasets); the memory a head takes does not grow with the rows."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import error_line, invoke

from bottlecache.cache.store import Cache
from bottlecache.cache.virtual import repeat_cache
from bottlecache.core.errors import BottlecacheError
from bottlecache.train.heads import train_head
from bottlecache.train.linear import fit_blocks


@pytest.mark.parametrize("k, class_weight", [(2, "none"), (3, "none"), (2, "balanced")])
def test_the_block_fit_is_scikit_learns_logistic_regression(k, class_weight):
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(k)
    centres = rng.normal(0, 1, (k, 20))
    y = rng.choice(k, 900, p=np.linspace(1, 2, k) / np.linspace(1, 2, k).sum())
    x = (centres[y] + rng.normal(0, 2.0, (900, 20))).astype(np.float32)

    def blocks():
        for lo in range(0, len(x), 128):
            yield slice(lo, lo + 128), x[lo : lo + 128]

    found = fit_blocks(blocks, y, 20, C=0.5, class_weight=class_weight)
    reference = LogisticRegression(C=0.5, max_iter=2000, class_weight=None if class_weight == "none" else "balanced")
    reference.fit(x, y)
    assert found.converged and found.passes > 1
    assert np.allclose(found.coef, reference.coef_, atol=2e-3 * np.abs(reference.coef_).max())
    assert np.allclose(found.intercept, reference.intercept_, atol=2e-3 * max(1.0, np.abs(reference.intercept_).max()))
    mine = np.argmax(x @ found.coef.T + found.intercept, axis=1) if k > 2 else (x @ found.coef[0] + found.intercept[0] > 0)
    assert np.mean(mine == reference.predict(x)) >= 0.995


def test_a_small_memory_budget_fits_out_of_core_with_the_same_accuracy(small_cache, tmp_path):
    inside = train_head(small_cache.path, "sklearn", save=False)
    outside = train_head(small_cache.path, "sklearn", max_memory="256K", out=tmp_path / "head")
    assert inside.params["in_memory"] is True and outside.params["in_memory"] is False
    assert outside.params["passes"] > 1 and outside.params["converged"] is True
    gap = abs(inside.metrics["validation"]["accuracy"] - outside.metrics["validation"]["accuracy"])
    assert 100 * gap <= 0.3
    assert np.allclose(outside.head.coef_, inside.head.coef_, atol=1e-2 * np.abs(inside.head.coef_).max())
    result = invoke(["cache", "train-head", str(small_cache.path), "--max-memory", "1M", "--out", str(tmp_path / "cli"),
                     "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["params"]["in_memory"] is False
    result = invoke(["cache", "train-head", str(small_cache.path), "--max-memory", "lots", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "'max_memory'" in error_line(result) and "16M" in error_line(result)


def test_the_audits_out_of_fold_heads_out_of_core_are_the_in_memory_ones(small_cache, monkeypatch):
    """Over the memory budget, each fold's head fits from blocks of 16 rows of every split and
    predicts its fold block by block: the probabilities of the heads fitted in memory."""
    from bottlecache.serve import audit
    from bottlecache.serve.embeddings import PooledRows

    with Cache(small_cache.path) as cache:
        rows = PooledRows(cache)
        labels = np.concatenate([cache.labels(s) for s in cache.splits]).astype(np.int64)
        inside = audit.out_of_fold(rows[0 : len(rows)], labels, 2, 5, 0.1, 0)
        monkeypatch.setattr(audit, "rows_per_block", lambda max_memory, n_features: 16)
        outside = audit.out_of_fold(rows, labels, 2, 5, 0.1, 0, max_memory=1)
    assert np.allclose(outside, inside, atol=1e-3) and np.allclose(outside.sum(axis=1), 1.0)
    assert np.array_equal(outside.argmax(axis=1), inside.argmax(axis=1))


def test_out_of_core_leaves_out_the_excluded_rows(small_cache, tmp_path):
    with Cache(small_cache.path) as cache:
        left_out = cache.keys("train")[:10]
    keys = tmp_path / "keys.txt"
    keys.write_text("".join(f"{k}\n" for k in left_out))
    inside = train_head(small_cache.path, "sklearn", exclude=keys, save=False)
    outside = train_head(small_cache.path, "sklearn", exclude=keys, max_memory="64K", save=False)
    assert outside.params["in_memory"] is False
    assert np.allclose(outside.head.coef_, inside.head.coef_, atol=1e-2 * np.abs(inside.head.coef_).max())


def test_a_repeated_cache_is_a_cache_of_unique_keys_over_the_same_rows(small_cache, tmp_path):
    path = repeat_cache(small_cache.path, tmp_path / "big", {"train": 250, "validation": 48})
    assert path.stat().st_size < small_cache.path.stat().st_size  # the rows are not copied
    with Cache(small_cache.path) as source, Cache(path) as big:
        assert big.n_examples("train") == 250 and big.fingerprint != source.fingerprint
        keys = big.keys("train")
        assert len(set(keys)) == 250 and keys[:96] == source.keys("train") and keys[96].startswith("copy000001/")
        assert np.array_equal(big.pooled("train")[96:192], source.pooled("train"))
        assert np.array_equal(big.features("train", slice(240, 250)), source.features("train", slice(48, 58)))
        assert np.array_equal(big.labels("train")[192:], source.labels("train")[: 250 - 192])
    result = train_head(path, "sklearn", max_memory="64K", save=False)
    assert result.params["in_memory"] is False and result.metrics["validation"]["n"] == 48
    with pytest.raises(BottlecacheError, match="itself virtual"):
        repeat_cache(path, tmp_path / "bigger", {"train": 1000})
    with pytest.raises(BottlecacheError, match="whole number"):
        repeat_cache(small_cache.path, tmp_path / "none", {"train": 0})
    assert invoke(["cache", "verify", str(path)]).exit_code == 0
    with pytest.raises(BottlecacheError, match="exists"):
        repeat_cache(small_cache.path, tmp_path / "big", {"train": 250, "validation": 48})


def _peak_mib(cache, kind: str, out) -> float:
    code = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True); "
            "assert r.returncode == 0, r.stderr[-500:]; print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    command = [sys.executable, "-m", "bottlecache", "cache", "train-head", str(cache), "--kind", kind, "--max-memory",
               "64M", "--out", str(out)] + (["--epochs", "1"] if kind == "keras" else [])
    return int(subprocess.run([sys.executable, "-c", code, *command], check=True, capture_output=True,
                              text=True).stdout) / 1024


@pytest.mark.slow
def test_a_head_on_many_rows_takes_no_more_memory_than_on_a_few(small_cache, tmp_path):
    """40,000 train rows of pooled features are 195 MiB as float32 (390 MiB more as scikit-learn's float64
    copy): the out-of-core head's peak resident memory stays within 100 MiB of its peak on 2,000 rows."""
    few = repeat_cache(small_cache.path, tmp_path / "few", {"train": 2_000, "validation": 48})
    many = repeat_cache(small_cache.path, tmp_path / "many", {"train": 40_000, "validation": 48})
    growth = _peak_mib(many, "sklearn", tmp_path / "h2") - _peak_mib(few, "sklearn", tmp_path / "h1")
    assert growth < 100, growth
