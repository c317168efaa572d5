"""Cached augmented views (``cache build --views K --augment SPEC --seed``; ``bottlecache.data.augment``):
deterministic, train only, in the fingerprint, and what the heads do with them (real photos, real
weights, small slices)."""

from __future__ import annotations

import numpy as np
import pytest

from bottlecache.core.errors import BottlecacheError

VIEW_SPLITS = ["train=train[:40]", "validation=validation[:8]"]


def test_spec_parsing_and_its_one_spelling():
    from bottlecache.data.augment import canonical_spec, parse_spec

    assert canonical_spec("tutorial") == "flip,rotate=0.2"
    assert canonical_spec(" zoom=0.10, flip ,rotate=0.2") == "flip,rotate=0.2,zoom=0.1"
    assert parse_spec("flip,zoom=0.1") == {"flip": True, "zoom": 0.1}
    for bad, needle in [("", "empty"), ("flip,flip", "twice"), ("shear=0.1", "'shear'"), ("rotate=x", "number"),
                        ("rotate=0", "out of range"), ("zoom=2", "out of range"), ("flip=vertical", "no value")]:
        with pytest.raises(BottlecacheError, match=needle):
            parse_spec(bad)


def test_a_view_is_a_function_of_image_key_view_and_seed():
    from bottlecache.data.augment import parse_spec, view_batch

    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (3, 32, 32, 3)).astype(np.float32)
    ops = parse_spec("flip,rotate=0.2,zoom=0.1")
    keys = ["cats/a.jpg", "cats/b.jpg", "dogs/c.jpg"]
    first = view_batch(images, keys, 0, ops, seed=0)
    np.testing.assert_array_equal(first, view_batch(images, keys, 0, ops, seed=0))
    np.testing.assert_array_equal(first[1:], view_batch(images[1:], keys[1:], 0, ops, seed=0))  # batch-independent
    assert not np.allclose(first, view_batch(images, keys, 1, ops, seed=0))
    assert not np.allclose(first, view_batch(images, keys, 0, ops, seed=1))
    assert not np.allclose(first, images)


def test_the_fingerprint_changes_with_spec_k_and_seed(cats_dogs, weights_path, tmp_path):
    from bottlecache.cache.settings import CacheSettings

    def fp(**kw):
        return CacheSettings(cats_dogs, tuple(VIEW_SPLITS), weights=weights_path, cache_dir=tmp_path, **kw).resolve().fingerprint

    prints = [fp(), fp(views=2), fp(views=3), fp(views=2, augment="flip"), fp(views=2, view_seed=1)]
    assert len(set(prints)) == len(prints)
    assert fp(views=2) == fp(views=2, augment="tutorial") == fp(views=2, augment="rotate=0.2,flip")


class _StopAfterFirstWindow:
    """A progress sink that interrupts the build once the first train window was handed to the committer."""

    def start_split(self, split, total, done): ...
    def end_split(self, split): ...
    def message(self, text): ...

    def advance(self, split, n):
        if split == "train":
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def views_cache(tmp_path_factory, cats_dogs, weights_path):
    from bottlecache import build_cache

    return build_cache(cats_dogs, VIEW_SPLITS, weights=weights_path, cache_dir=tmp_path_factory.mktemp("views"),
                       dtype="float32", engine="keras", views=2, augment="flip,rotate=0.2,zoom=0.1", seed=3)


def test_views_are_stored_for_train_only_and_differ(views_cache):
    from bottlecache.cache.store import Cache, verify_cache

    with Cache(views_cache.path) as cache:
        assert cache.n_views == 2
        views, clean = cache.view_features(), cache.features("train")
        assert views.shape == (40, 2, 5, 5, 1280) and views.dtype == clean.dtype
        assert cache.view_pooled().shape == (40, 2, 1280)
        np.testing.assert_allclose(cache.view_pooled(), views.mean(axis=(2, 3)), rtol=1e-5, atol=1e-6)
        assert "view_features" not in cache.file["validation"]
        assert not np.allclose(views[:, 0], views[:, 1]) and not np.allclose(views[:, 0], clean)
    assert verify_cache(views_cache.path).ok


def test_a_resumed_and_a_repeated_build_store_the_same_views(views_cache, cats_dogs, weights_path, tmp_path):
    from bottlecache import build_cache
    from bottlecache.cache.store import Cache

    options = dict(weights=weights_path, cache_dir=tmp_path, dtype="float32", engine="keras", views=2,
                   augment="flip,rotate=0.2,zoom=0.1", seed=3)
    with pytest.raises(KeyboardInterrupt):
        build_cache(cats_dogs, VIEW_SPLITS, progress=_StopAfterFirstWindow(), **options)
    assert list(tmp_path.glob("*.partial"))
    resumed = build_cache(cats_dogs, VIEW_SPLITS, **options)
    assert resumed.resumed and resumed.fingerprint == views_cache.fingerprint
    with Cache(resumed.path) as again, Cache(views_cache.path) as first:
        np.testing.assert_array_equal(again.view_features(), first.view_features())
        np.testing.assert_array_equal(again.view_pooled(), first.view_pooled())
        np.testing.assert_array_equal(again.keys("train"), first.keys("train"))


def test_the_keras_head_draws_one_view_per_image_per_epoch(views_cache):
    from bottlecache.cache.store import Cache
    from bottlecache.train.views import ViewEpochs

    with Cache(views_cache.path) as cache:
        epochs = ViewEpochs(cache, 16, seed=0)
        views, labels = cache.view_features(), cache.labels("train")
        draws = []
        for _ in range(2):
            rows = [(x, y) for xb, yb in epochs.batches() for x, y in zip(xb, yb)]
            assert len(rows) == 40
            drawn = []
            for x, y in rows:  # each row is one view of one image, every image once
                match = np.argwhere(np.all(views == x, axis=(2, 3, 4)))
                assert len(match) == 1 and labels[match[0][0]] == y
                drawn.append(tuple(match[0]))
            assert sorted(i for i, _ in drawn) == list(range(40))
            draws.append(dict(drawn))
        assert draws[0] != draws[1]  # a new draw each epoch


@pytest.mark.parametrize("kind", ["sklearn", "keras"])
def test_heads_train_on_views(views_cache, kind, tmp_path):
    from bottlecache.train.heads import train_head

    result = train_head(views_cache.path, kind, views=True, epochs=2, out=tmp_path / kind)
    assert result.params["views"] == 2
    assert result.metrics["validation"]["n"] == 8
    if kind == "keras":
        assert len(result.history["loss"]) == 2


def test_train_head_views_on_a_cache_without_views_is_one_line(views_cache, cats_dogs, weights_path, tmp_path):
    from conftest import error_line, invoke

    from bottlecache import build_cache

    plain = build_cache(cats_dogs, ["train=train[:8]", "validation=validation[:4]"], weights=weights_path,
                        cache_dir=tmp_path, engine="keras")
    result = invoke(["cache", "train-head", str(plain.path), "--views", "--out", str(tmp_path / "h")])
    assert result.exit_code != 0
    assert "holds no augmented views" in error_line(result)
