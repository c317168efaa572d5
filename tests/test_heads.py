"""Heads on cached features (issue 3): metrics, saved artifacts, several classes, the exact
equivalence with training through the frozen base, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import write_images

from bottlecache import build_cache, open_cache
from bottlecache.core.errors import BottlecacheError, CacheMismatchError
from bottlecache.train.heads import (
    BACKBONE_KEYS,
    best_weights_callback,
    build_head_model,
    class_weights,
    compile_for,
    load_head,
    train_head,
)


@pytest.fixture(scope="module")
def heads_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("heads")


@pytest.fixture(scope="module")
def sklearn_result(small_cache, heads_dir):
    return train_head(small_cache.path, "sklearn", C=[1.0, 0.01], out=heads_dir / "sklearn")


@pytest.fixture(scope="module")
def keras_result(small_cache, heads_dir):
    return train_head(small_cache.path, "keras", epochs=3, learning_rate=1e-3, out=heads_dir / "keras")


@pytest.fixture(scope="module")
def three_classes(tmp_path_factory, weights_path):
    """A generated 3-class folder (train/validation folders), built at 96 px with the real weights."""
    root = tmp_path_factory.mktemp("three")
    layout = {f"{split}/{c}": n for split, n in (("train", 12), ("validation", 4)) for c in ("ant", "bee", "cat")}
    write_images(root / "insects", layout, size=(48, 40))
    report = build_cache(root / "insects", image_size=96, weights=weights_path, cache_dir=root / "cache", engine="keras")
    return report


def _check_metrics(m: dict, n: int, class_names: list[str]) -> None:
    k = len(class_names)
    assert m["n"] == n
    assert 0.0 <= m["accuracy"] <= 1.0 and np.isfinite(m["log_loss"]) and m["log_loss"] > 0
    assert list(m["per_class"]) == class_names
    for values in m["per_class"].values():
        assert set(values) == {"precision", "recall", "f1", "support"}
        assert all(0.0 <= values[key] <= 1.0 for key in ("precision", "recall", "f1"))
    cm = np.array(m["confusion_matrix"])
    assert cm.shape == (k, k) and cm.sum() == n
    assert m["accuracy"] == pytest.approx(np.trace(cm) / n)
    present = cm.sum(axis=1) > 0
    assert m["balanced_accuracy"] == pytest.approx((np.diag(cm)[present] / cm.sum(axis=1)[present]).mean())
    assert [v["support"] for v in m["per_class"].values()] == cm.sum(axis=1).tolist()
    if k == 2:
        assert 0.0 <= m["roc_auc"] <= 1.0
    else:
        assert "roc_auc" not in m


# ---------------------------------------------------------------------------------------------
# Two classes, on the small cache


@pytest.mark.parametrize("kind", ["sklearn", "keras"])
def test_head_reports_validation_metrics(kind, sklearn_result, keras_result, small_cache):
    from sklearn.metrics import log_loss

    result = sklearn_result if kind == "sklearn" else keras_result
    assert result.kind == kind and result.train_seconds > 0
    assert list(result.metrics) == ["validation"]  # every split but train
    m = result.metrics["validation"]
    _check_metrics(m, 48, ["cats", "dogs"])
    with open_cache(small_cache.path) as cache:
        x = cache.pooled("validation") if kind == "sklearn" else cache.features("validation")
        y = cache.labels("validation")
    proba = result.head.predict_proba(x)
    assert proba.shape == (48, 2)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-6)
    assert m["accuracy"] == pytest.approx(float((proba.argmax(axis=1) == y).mean()))
    assert m["log_loss"] == pytest.approx(log_loss(y, proba, labels=[0, 1]), rel=1e-5)
    if kind == "sklearn":
        # ImageNet features separate cats from dogs even with 96 training images
        assert m["accuracy"] >= 0.85 and m["roc_auc"] >= 0.9
        assert [s["C"] for s in result.selection] == [0.01, 1.0]
        best = max(result.selection, key=lambda s: (s["validation_accuracy"], -s["C"]))
        assert result.params["C"] == best["C"]
    else:
        assert result.params["epochs_run"] == 3 and result.params["in_memory"]
        assert len(result.history["val_loss"]) == 3


@pytest.mark.parametrize("kind", ["sklearn", "keras"])
def test_saved_head_loads_and_predicts_the_same(kind, sklearn_result, keras_result, small_cache, heads_dir):
    result = sklearn_result if kind == "sklearn" else keras_result
    assert result.path == heads_dir / kind and result.path.is_dir()
    loaded = load_head(result.path)
    assert loaded.kind == kind and loaded.class_names == ["cats", "dogs"]
    record = json.loads((result.path / "head.json").read_text())
    assert record["cache"]["fingerprint"] == small_cache.fingerprint
    # a default MobileNetV2 cache keeps its old config keys (its fingerprint unchanged): no 'preprocess' key
    assert record["backbone"] == {key: loaded.backbone[key] for key in BACKBONE_KEYS if key in record["backbone"]}
    assert all(loaded.backbone[key] is None for key in BACKBONE_KEYS if key not in record["backbone"])
    assert record["backbone"]["image_size"] == 160 and record["feature_shape"] == [5, 5, 1280]
    saved_metrics = json.loads((result.path / "metrics.json").read_text())
    assert saved_metrics["metrics"] == json.loads(json.dumps(result.metrics))
    with open_cache(small_cache.path) as cache:
        loaded.check_cache(cache)  # the same backbone: no error
        features, pooled = cache.features("validation"), cache.pooled("validation")
    if kind == "sklearn":
        assert sorted(p.name for p in result.path.iterdir()) == ["head.json", "head.npz", "metrics.json"]
        with np.load(result.path / "head.npz", allow_pickle=False) as arrays:  # no pickle anywhere
            assert {name: arrays[name].dtype.kind for name in arrays.files} == {
                "coef": "f", "intercept": "f", "classes": "i", "C": "f", "n_classes": "i"
            }
            assert arrays["coef"].shape == (1, 1280)
        np.testing.assert_array_equal(loaded.predict_proba(pooled), result.head.predict_proba(pooled))
        # the full bottleneck is pooled the same way (its float16 mean, so close, not equal)
        np.testing.assert_allclose(loaded.predict_proba(features), result.head.predict_proba(pooled), atol=1e-3)
    else:
        assert sorted(p.name for p in result.path.iterdir()) == ["head.json", "head.keras", "metrics.json"]
        np.testing.assert_allclose(loaded.predict_proba(features), result.head.predict_proba(features), rtol=1e-6, atol=1e-7)
    assert loaded.predict(features if kind == "keras" else pooled)[:5] == [
        ["cats", "dogs"][i] for i in result.head.predict_proba(features if kind == "keras" else pooled).argmax(axis=1)[:5]
    ]


def test_loaded_head_refuses_another_backbone(sklearn_result, three_classes):
    loaded = load_head(sklearn_result.path)
    with open_cache(three_classes.path) as other:  # 96 px
        with pytest.raises(CacheMismatchError, match="image_size: head has 160, expected 96"):
            loaded.check_cache(other)
    with pytest.raises(CacheMismatchError, match="weights_sha256"):
        loaded.check_backbone(weights_sha256="0" * 64)
    with pytest.raises(CacheMismatchError, match="image_size") as caught:
        loaded.check_backbone(image_size=224, model="mobilenet_v2")
    assert "model" not in str(caught.value).split("backbone:")[1]
    loaded.check_backbone(image_size=160, model="mobilenet_v2", weights_sha256=loaded.backbone["weights_sha256"])


def test_load_head_errors(tmp_path, sklearn_result):
    with pytest.raises(BottlecacheError, match="no head.json"):
        load_head(tmp_path)
    (tmp_path / "head.json").write_text("{not json")
    with pytest.raises(BottlecacheError, match="not valid JSON"):
        load_head(tmp_path)
    (tmp_path / "head.json").write_text(json.dumps({"format": "other", "kind": "sklearn"}))
    with pytest.raises(BottlecacheError, match="is not a bottlecache-head record"):
        load_head(tmp_path)
    from bottlecache.train.heads import save_head

    with open_cache(json.loads((sklearn_result.path / "head.json").read_text())["cache"]["path"]) as cache:
        with pytest.raises(BottlecacheError, match="exists and is not empty"):
            save_head(sklearn_result, cache, out=sklearn_result.path)


# ---------------------------------------------------------------------------------------------
# Several classes


@pytest.mark.parametrize("kind", ["sklearn", "keras"])
def test_three_classes(kind, three_classes, tmp_path):
    assert [s.n_images for s in three_classes.splits] == [36, 12]
    result = train_head(three_classes.path, kind, epochs=2, out=tmp_path / "head")
    _check_metrics(result.metrics["validation"], 12, ["ant", "bee", "cat"])
    loaded = load_head(result.path)
    with open_cache(three_classes.path) as cache:
        assert cache.class_names == ["ant", "bee", "cat"] and cache.feature_shape == (3, 3, 1280)
        x = cache.pooled("validation") if kind == "sklearn" else cache.features("validation")
    proba = loaded.predict_proba(x)
    assert proba.shape == (12, 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(proba, result.head.predict_proba(x), rtol=1e-6, atol=1e-7)
    assert set(loaded.predict(x)) <= {"ant", "bee", "cat"}
    if kind == "keras":
        assert loaded.head.model.output_shape == (None, 3)
    else:
        assert loaded.head.coef_.shape == (3, 1280)


@pytest.fixture(scope="module")
def lopsided(tmp_path_factory, weights_path):
    """3 classes, but every train image of the last class is unreadable (skipped at build)."""
    root = tmp_path_factory.mktemp("lopsided")
    folder = write_images(root / "insects", {"train/ant": 6, "train/bee": 6, **{f"validation/{c}": 3 for c in ("ant", "bee", "cat")}})
    (folder / "train/cat").mkdir()
    for i in range(2):
        (folder / f"train/cat/broken{i}.jpg").write_text("not an image")
    return folder, build_cache(folder, image_size=96, weights=weights_path, cache_dir=root / "cache", engine="keras")


@pytest.mark.parametrize("kind", ["sklearn", "keras"])
def test_class_missing_from_train_split(kind, lopsided, tmp_path):
    """A class the train split lacks still has its column (probability 0 for scikit-learn)."""
    _, lopsided = lopsided
    assert [(s.n_images, s.n_skipped) for s in lopsided.splits] == [(12, 2), (9, 0)]
    result = train_head(lopsided.path, kind, epochs=1, out=tmp_path / "head")
    _check_metrics(result.metrics["validation"], 9, ["ant", "bee", "cat"])
    with open_cache(lopsided.path) as cache:
        x = cache.pooled("validation") if kind == "sklearn" else cache.features("validation")
    proba = load_head(result.path).predict_proba(x)
    assert proba.shape == (9, 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-6)
    if kind == "sklearn":
        assert (proba[:, 2] == 0).all()


def test_one_class_train_split_is_refused(lopsided, weights_path, tmp_path):
    folder, _ = lopsided
    report = build_cache(folder, ["train=train[:1]", "validation"], image_size=96, weights=weights_path,
                         cache_dir=tmp_path, engine="keras")
    assert report.splits[0].n_images + report.splits[0].n_skipped == 1
    for kind in ("sklearn", "keras"):
        with pytest.raises(BottlecacheError, match="fewer than two classes"):
            train_head(report.path, kind, save=False)


def test_streamed_training_equals_in_memory(small_cache):
    """Above ``max_memory`` the Keras head streams from the file: the same batches, the same weights."""
    settings = dict(epochs=2, batch_size=16, dropout=0.0, shuffle=False, seed=3, save=False)
    in_memory = train_head(small_cache.path, "keras", **settings)
    streamed = train_head(small_cache.path, "keras", max_memory=1, **settings)
    assert in_memory.params["in_memory"] and not streamed.params["in_memory"]
    for a, b in zip(in_memory.head.model.get_weights(), streamed.head.model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    np.testing.assert_allclose(in_memory.history["val_loss"], streamed.history["val_loss"], rtol=1e-5)
    assert streamed.metrics["validation"]["accuracy"] == in_memory.metrics["validation"]["accuracy"]


# ---------------------------------------------------------------------------------------------
# The key one: a head on the cache == the same head trained through the frozen base


@pytest.mark.slow
def test_keras_head_on_cache_equals_end_to_end_training(float32_train_cache, weights_path, cats_dogs):
    """Same seed, no dropout, no shuffling, the same batches: the same weights after 2 epochs.

    The cache has only a train split, so ``train_head`` keeps the best epoch by training loss;
    the end-to-end side uses the same callback, so both keep the same epoch.
    """
    import keras

    from bottlecache.data.sources import load_image
    from bottlecache.models.backbone import load_backbone, resolve_weights

    settings = dict(epochs=2, batch_size=16, learning_rate=1e-4, optimizer="rmsprop")
    result = train_head(float32_train_cache.path, "keras", dropout=0.0, shuffle=False, seed=0, save=False, **settings)
    assert result.metrics == {} and result.params["epochs_run"] == 2

    with open_cache(float32_train_cache.path) as cache:
        assert cache.splits == ["train"] and cache.config["dtype"] == "float32"
        keys, labels, cached = cache.keys("train"), cache.labels("train"), cache.features("train")
    images = np.stack([load_image(cats_dogs / key, 160).numpy() for key in keys])  # the cache's order

    base = load_backbone(resolve_weights(weights_path, 160), 160)  # built before seeding: its draws don't count
    keras.utils.set_random_seed(0)
    head = build_head_model(base.output_shape[1:], 2, dropout=0.0)
    initial = head.get_weights()
    inputs = keras.Input((160, 160, 3))
    model = keras.Model(inputs, head(base(inputs, training=False)))
    compile_for(model, 2, settings["learning_rate"], settings["optimizer"])
    history = model.fit(
        images, labels, batch_size=16, epochs=2, shuffle=False, callbacks=[best_weights_callback("loss")], verbose=0
    )
    assert len(model.trainable_weights) == 2  # only the head's Dense learns

    # the float32 cache holds what the base gives these images (up to float32 noise: the build ran
    # other batch shapes, and the CPU kernels sum in another order)
    np.testing.assert_allclose(cached, base.predict(images, batch_size=16, verbose=0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(result.history["loss"], history.history["loss"], rtol=1e-5)
    trained = result.head.model.get_weights()
    for name, a, b, start in zip(("kernel", "bias"), trained, head.get_weights(), initial):
        assert a.shape == b.shape
        assert np.abs(a - start).max() > 5e-4, f"{name} barely moved: the comparison would prove nothing"
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5, err_msg=name)


# ---------------------------------------------------------------------------------------------
# Errors


def test_train_head_errors(small_cache, float32_train_cache, tmp_path):
    with pytest.raises(BottlecacheError, match="No cache file"):
        train_head(tmp_path / "missing.h5")
    with pytest.raises(BottlecacheError, match="'kind' option must be one of sklearn, keras"):
        train_head(small_cache.path, "forest")
    with pytest.raises(BottlecacheError, match="'C' option must be positive"):
        train_head(small_cache.path, C=0.0)
    with pytest.raises(BottlecacheError, match="'epochs' option must be positive"):
        train_head(small_cache.path, "keras", epochs=0)
    with pytest.raises(BottlecacheError, match="'dropout' option"):
        train_head(small_cache.path, "keras", dropout=1.0)
    with pytest.raises(BottlecacheError, match="needs a 'validation' split"):
        train_head(float32_train_cache.path, "sklearn", C=[0.1, 1.0])
    with pytest.raises(BottlecacheError, match="no 'test' split to train on"):
        train_head(small_cache.path, train_split="test")
    # one C without a validation split is fine: nothing to evaluate on, so no metrics
    result = train_head(float32_train_cache.path, "sklearn", C=0.5, save=False)
    assert result.metrics == {} and result.params["C"] == 0.5 and result.path is None


# ---------------------------------------------------------------------------------------------
# Imbalanced classes: --class-weight balanced


def test_balanced_class_weights():
    assert class_weights(np.array([0] * 6 + [1] * 2), 2) == {0: pytest.approx(8 / 12), 1: pytest.approx(8 / 4)}
    assert class_weights(np.array([0, 0, 2]), 3) == {0: pytest.approx(0.75), 2: pytest.approx(1.5)}  # 1 is absent


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory, weights_path, cats_dogs):
    """Real photos, 32 cats and 4 dogs to train on, 8 + 8 to validate: built at 96 px."""
    import shutil

    root = tmp_path_factory.mktemp("imbalanced")
    for split, counts in (("train", {"cats": 32, "dogs": 4}), ("validation", {"cats": 8, "dogs": 8})):
        for name, n in counts.items():
            (root / "data" / split / name).mkdir(parents=True)
            for photo in sorted((cats_dogs / split / name).iterdir())[:n]:
                shutil.copy(photo, root / "data" / split / name / photo.name)
    return build_cache(root / "data", image_size=96, weights=weights_path, cache_dir=root / "cache", engine="keras")


@pytest.mark.parametrize("kind", ["sklearn", "keras"])
def test_balanced_class_weight_favours_the_rare_class(kind, imbalanced):
    """Weighting the 4 dogs 8 times the 32 cats moves probability towards dogs on the validation split."""
    settings = dict(epochs=5, learning_rate=1e-3, seed=1, save=False)
    plain = train_head(imbalanced.path, kind, **settings)
    balanced = train_head(imbalanced.path, kind, class_weight="balanced", **settings)
    assert plain.params["class_weight"] == "none" and balanced.params["class_weight"] == "balanced"
    with open_cache(imbalanced.path) as cache:
        x = cache.pooled("validation") if kind == "sklearn" else cache.features("validation")
    p_dog = [r.head.predict_proba(x)[:, 1].mean() for r in (plain, balanced)]
    assert p_dog[1] > p_dog[0] + 0.01, p_dog
    for result in (plain, balanced):
        _check_metrics(result.metrics["validation"], 16, ["cats", "dogs"])


def test_class_weight_is_checked(small_cache):
    with pytest.raises(BottlecacheError, match="'class_weight'.*balanced"):
        train_head(small_cache.path, "sklearn", class_weight="auto", save=False)
