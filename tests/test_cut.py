"""The cached cut (``bottlecache.models.cut``): where it lies, what the cut cache holds, and that training
from it is training end to end (real photos, real weights, small slices)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import copy_engines

CUT_SPLITS = ["train=train[:16]", "validation=validation[:8]"]


def test_cut_index_is_the_last_single_tensor_point():
    from bottlecache.models.cut import cut_index

    # 0 → 1 → 2 → 3(add of 1 and 2) → 4: layer 2 is no single-tensor point (3 still reads 1)
    inbound = [[], [0], [1], [1, 2], [3]]
    assert cut_index(inbound, 3) == 1
    assert cut_index(inbound, 4) == 3
    assert cut_index(inbound, 5) == 4
    assert cut_index(inbound, 2) == 1
    assert cut_index(inbound, 1) == 0


def test_cut_below_mobilenet_layer_100_is_block_10_project_bn():
    from bottlecache.models.cut import cut_record

    assert cut_record(160, 100) == {"layer": "block_10_project_BN", "shape": [10, 10, 96]}
    assert cut_record(160, 99) == cut_record(160, 100)  # the same cut: one cache
    assert cut_record(160, 107)["layer"] == "block_11_add"
    assert cut_record(224, 100)["shape"] == [14, 14, 96]


def test_cut_follows_the_registry_entry_and_refuses_other_models():
    from bottlecache.core.errors import BottlecacheError
    from bottlecache.models.cut import check_cut, cut_record

    # another MobileNetV2 of the registry: the same layer names, its own channels
    assert cut_record(160, 100, "mobilenet_v2_0.5") == {"layer": "block_10_project_BN", "shape": [10, 10, 48]}
    with pytest.raises(BottlecacheError, match=r"MobileNetV2 models only \(mobilenet_v2, .*got --model xception"):
        check_cut(100, "xception")
    with pytest.raises(BottlecacheError, match="'cut'"):
        check_cut(155, "mobilenet_v2")  # past its 154 layers


@pytest.mark.parametrize("option", [{"cut": 100}, {"views": 2}])
def test_the_ray_executor_refuses_cut_and_views_in_one_line(option, cats_dogs, tmp_path):
    from bottlecache import build_cache
    from bottlecache.core.errors import BottlecacheError

    with pytest.raises(BottlecacheError, match="ray executor builds bottleneck caches only") as raised:
        build_cache(cats_dogs, CUT_SPLITS, cache_dir=tmp_path, executor="ray", **option)
    assert "\n" not in str(raised.value)
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.fixture(scope="module")
def float32_cut(tmp_path_factory, cats_dogs, weights_path):
    from bottlecache import build_cache

    return build_cache(cats_dogs, CUT_SPLITS, weights=weights_path, cache_dir=tmp_path_factory.mktemp("cut"),
                       dtype="float32", engine="keras", cut=100)


def test_cut_cache_holds_the_activation_and_the_layer_is_in_the_fingerprint(float32_cut, cats_dogs, weights_path):
    from bottlecache import build_cache
    from bottlecache.cache.settings import CacheSettings
    from bottlecache.cache.store import Cache, verify_cache

    assert float32_cut.config["cut"] == {"layer": "block_10_project_BN", "shape": [10, 10, 96]}
    with Cache(float32_cut.path) as cache:
        assert cache.features("train").shape == (16, 10, 10, 96)
        assert cache.pooled("train").shape == (16, 96)
    assert verify_cache(float32_cut.path).ok
    plain = CacheSettings(cats_dogs, tuple(CUT_SPLITS), weights=weights_path, dtype="float32",
                          cache_dir=float32_cut.path.parent).resolve()
    assert plain.fingerprint != float32_cut.fingerprint
    again = build_cache(cats_dogs, CUT_SPLITS, weights=weights_path, cache_dir=float32_cut.path.parent,
                        dtype="float32", engine="keras", cut=99)
    assert again.hit and again.path == float32_cut.path  # --cut 99 is the same cut


def _images(cats_dogs, splits, n):
    from bottlecache.data.sources import image_dataset, open_source

    source = open_source(cats_dogs, splits)
    rows = list(image_dataset(source, "train", 160).take(n).as_numpy_iterator())
    return np.stack([r[3] for r in rows]), np.asarray([r[2] for r in rows])


@pytest.mark.slow
def test_one_step_from_the_float32_cut_equals_one_end_to_end_step(float32_cut, cats_dogs, weights_path):
    import keras

    from bottlecache.cache.store import Cache
    from bottlecache.models.backbone import load_backbone, resolve_weights
    from bottlecache.models.cut import cut_model, full_model
    from bottlecache.models.network import attach_head, unfreeze
    from bottlecache.train.heads import build_head_model, compile_for

    images, labels = _images(cats_dogs, CUT_SPLITS, 16)
    with Cache(float32_cut.path) as cache:
        activations, cached_labels = cache.features("train"), cache.labels("train")
    np.testing.assert_array_equal(labels, cached_labels)
    weights = resolve_weights(str(weights_path), 160)
    keras.utils.set_random_seed(0)
    head_a = build_head_model((5, 5, 1280), 2, dropout=0.0)
    head_b = build_head_model((5, 5, 1280), 2, dropout=0.0)
    head_b.set_weights(head_a.get_weights())
    base_a, base_b = load_backbone(weights, 160, fresh=True), load_backbone(weights, 160, fresh=True)  # trained
    end_to_end = attach_head(base_a, head_a, 160)
    from_cut = cut_model(base_b, head_b, "block_10_project_BN")
    for model, base in ((end_to_end, base_a), (from_cut, base_b)):
        unfreeze(base, 100)
        compile_for(model, 2, 1e-3)
    assert len(end_to_end.trainable_weights) == len(from_cut.trainable_weights) > 2
    before = {w.path: w.numpy() for w in base_a.weights}
    loss_a = end_to_end.train_on_batch(images, labels)
    loss_b = from_cut.train_on_batch(activations, labels)
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-4)
    for layer in (layer for layer in base_a.layers if layer.weights):
        for a, b in zip(layer.weights, base_b.get_layer(layer.name).weights):
            np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5, rtol=0, err_msg=a.path)
    for a, b in zip(head_a.weights, head_b.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5, rtol=0)
    # the step moved the trained layers by far more than the tolerance, and left the frozen ones alone
    changed = {w.path: float(np.max(np.abs(w.numpy() - before[w.path]))) for w in base_a.weights}
    assert max(changed.values()) > 1e-3
    frozen = {layer.name for layer in base_a.layers[:100]}
    assert all(v == 0.0 for path, v in changed.items() if path.split("/")[0] in frozen)
    # the model saved from a cut run is the usual one: images in, same outputs as the end-to-end model
    rebuilt = full_model(from_cut, load_backbone(weights, 160, fresh=True), 100, 160)
    np.testing.assert_allclose(np.asarray(rebuilt(images, training=False)),
                               np.asarray(end_to_end(images, training=False)), atol=1e-4)


@pytest.mark.slow
def test_finetune_from_cache_builds_the_cut_and_saves_the_usual_model(cats_dogs, weights_path, converted, tmp_path):
    from bottlecache.cache.store import Cache, list_caches
    from bottlecache.serve.predict import load_model
    from bottlecache.train.finetune import finetune

    cache_dir = copy_engines(converted(160), tmp_path / "cache")  # the head's cache: the run's conversion
    result = finetune(cats_dogs, CUT_SPLITS, weights=weights_path, cache_dir=cache_dir, head_epochs=1, epochs=2,
                      from_cache=True, dtype="float32", out=tmp_path / "ft", batch_size=8)
    cuts = []
    for path in list_caches(cache_dir):
        with Cache(path) as cache:
            cuts.append(cache.config.get("cut"))
    assert {"layer": "block_10_project_BN", "shape": [10, 10, 96]} in cuts and None in cuts  # the head's and the cut's
    assert result.params["from_cache"] is True and result.epochs_run == 2
    with Cache(result.cut_cache) as cache:  # the result names the cut cache it trained on (benchmarks read it)
        assert cache.config["cut"]["layer"] == "block_10_project_BN" and cache.config["dtype"] == "float32"
    assert result.metrics["validation"]["n"] == 8 and 0 <= result.metrics["validation"]["accuracy"] <= 1
    predictor = load_model(result.path)  # checks that model.keras takes 160 px images
    assert predictor.kind == "model" and predictor.image_size == 160
    photo = next((cats_dogs / "validation" / "cats").glob("*.jpg"))
    assert predictor.predict([photo])[0]["label"] in ("cats", "dogs")


def test_a_cut_cache_that_holds_another_cut_is_refused_in_one_line(float32_cut, cats_dogs, weights_path, tmp_path):
    from conftest import error_line, invoke

    args = ["finetune", "run", "--data", str(cats_dogs), "--weights", str(weights_path), "--dtype", "float32",
            "--cache-dir", str(float32_cut.path.parent), "--out", str(tmp_path / "ft"), "--from-cache",
            "--fine-tune-at", "120", "--cut-cache", str(float32_cut.path), "--head-epochs", "1"]
    for split in CUT_SPLITS:
        args += ["--split", split]
    result = invoke(args)
    assert result.exit_code != 0
    line = error_line(result)
    assert "block_10_project_BN" in line and "--cut 120" in line, line


def test_a_head_on_a_cut_cache_is_refused_in_one_line(float32_cut, tmp_path):
    from conftest import error_line, invoke

    result = invoke(["cache", "train-head", str(float32_cut.path), "--out", str(tmp_path / "h")])
    assert result.exit_code != 0
    assert "block_10_project_BN" in error_line(result)
