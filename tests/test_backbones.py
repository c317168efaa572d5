"""The registry of bases (bottlecache.core.registry): every registered model through the whole
pipeline with random weights, and Xception with its real ImageNet weights.

Random weights are each model's Keras initialization, saved to a weights file so the models go
through the same ``--weights FILE`` path as real ones (sha256 in the fingerprint included).
The per-model test runs at 96 px on 8 + 4 real photos: each step runs once, nothing is timed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import CATS_DOGS, SHARED, _need, copy_engines, error_line, invoke, made_once

from bottlecache.core.registry import BACKBONES, DEFAULT_MODEL, PREPROCESSINGS, get_backbone

SIZE = 96
TINY_SPLITS = ["train=train[:8]", "validation=validation[:4]"]
XCEPTION_WEIGHTS = SHARED / "weights" / "xception_imagenet_no_top.weights.h5"


def _weights_file(name: str, folder):
    return folder / f"{name}-random.weights.h5"


def _random_weights(name: str, folder, size: int = SIZE, save: bool = True):
    """The model's own random initialization (seeded), written as a Keras weights file; and the model."""
    from bottlecache.core.tf import import_keras

    keras = import_keras()
    entry = get_backbone(name)
    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, entry.constructor)(
        input_shape=(size, size, 3), include_top=False, weights=None, **entry.kwargs
    )
    path = _weights_file(name, folder)
    if save:
        model.save_weights(path)
    return path, model


@pytest.fixture(scope="session")
def random_weights(tmp_path_factory):
    """A model's random weights file, written once per run (any xdist worker): the whole-path test
    reuses the file its registry test wrote, so the network is built once per model, not twice.
    ``random_weights.make(name)`` builds the network (the registry test needs it) and writes the
    file if no one has."""

    def make(name: str):
        with made_once(tmp_path_factory, f"random-weights-{name}") as (folder, done):
            path, model = _random_weights(name, folder, save=not done)
            return path, model

    def get(name: str):
        with made_once(tmp_path_factory, f"random-weights-{name}") as (folder, done):
            return _weights_file(name, folder) if done else _random_weights(name, folder)[0]

    get.make = make
    return get


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BACKBONES))
def test_registry_numbers_match_the_network(name, random_weights):
    """Layers, the fine-tune cut (index and layer name) and the bottleneck, as built by Keras."""
    entry = get_backbone(name)
    _, model = random_weights.make(name)
    assert len(model.layers) == entry.n_layers
    assert model.layers[entry.fine_tune_at].name == entry.fine_tune_layer
    assert entry.n_layers * 0.45 <= entry.fine_tune_at < entry.n_layers, "the default cut must leave the top part"
    assert tuple(model.output_shape[1:]) == entry.bottleneck_shape(SIZE)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_preprocessing_is_the_models_own(name):
    """Ours equals ``keras.applications.<module>.preprocess_input`` of the same resized pixels."""
    import importlib

    from bottlecache.core.tf import import_keras
    from bottlecache.data.sources import preprocess

    import_keras()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    ours = preprocess(image, SIZE, name).numpy()
    resized = preprocess(image, SIZE, "efficientnet_b0").numpy()  # "none": resized pixels, 0-255
    module = importlib.import_module(f"keras.applications.{get_backbone(name).module}")
    theirs = np.asarray(module.preprocess_input(resized.copy()))
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_every_model_and_preprocessing_is_in_the_fingerprint(tmp_path):
    """One weights file, every model: the configs differ in model (and alpha / preprocessing), so
    do the fingerprints; the default model's config is the one caches had before the registry."""
    from conftest import write_images

    from bottlecache.cache.settings import CacheSettings

    data = write_images(tmp_path / "data", {"train/cats": 2, "train/dogs": 2})
    weights = tmp_path / "any.weights.h5"
    import h5py

    with h5py.File(weights, "w") as f:
        f.attrs["x"] = 1
    resolved = {name: CacheSettings(str(data), weights=str(weights), cache_dir=tmp_path / "c", model=name).resolve()
                for name in BACKBONES}
    assert len({r.fingerprint for r in resolved.values()}) == len(BACKBONES)
    default = resolved[DEFAULT_MODEL].config
    assert {k: default[k] for k in ("model", "alpha", "preprocess_version")} == \
        {"model": "mobilenet_v2", "alpha": 1.0, "preprocess_version": 2}
    assert "preprocess" not in default  # the pre-registry config, key for key
    for name, r in resolved.items():
        entry = get_backbone(name)
        assert r.config["preprocess_version"] == PREPROCESSINGS[entry.preprocessing].version
        assert r.config.get("preprocess", "scale_pm1") == entry.preprocessing
        assert r.path.name.split("-")[1] == name


# The whole path (build, two heads, a fine-tuning step, prediction, a LiteRT conversion) for one
# model of each preprocessing function and family of layers: MobileNetV3 (preprocessing inside the
# model), EfficientNet (inside, with its own rescaling layers), ResNet50V2 (scale to [-1, 1], like
# MobileNetV2, whose path every other test file runs with real weights), DenseNet121 ('torch'
# normalisation). Xception runs it with its real weights below. The other entries share one of
# these constructors' modules and code paths, and their numbers are checked against their built
# networks above; the whole path costs one to several minutes per model on these 2 cores, and all
# twenty would take CI past its time limit.
PIPELINE_MODELS = ["mobilenet_v3_small", "efficientnet_b0", "resnet50_v2", "densenet121"]


@pytest.mark.slow
# Each model's whole path is a unit of its own under pytest-xdist: the longest tests of the suite,
# spread over the workers rather than queued behind one another.
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xdist_group(f"pipeline-{n}"))
                                  for n in PIPELINE_MODELS])
def test_every_model_caches_trains_finetunes_and_predicts(name, random_weights, tmp_path, cats_dogs):
    from bottlecache import build_cache
    from bottlecache.cache.store import Cache
    from bottlecache.models.backbone import resolve_weights
    from bottlecache.models.engines import make_engine, probe_images
    from bottlecache.serve.predict import load_model
    from bottlecache.train.finetune import finetune
    from bottlecache.train.heads import load_head, train_head

    entry = get_backbone(name)
    weights = random_weights(name)
    cache_dir = tmp_path / "cache"
    report = build_cache(cats_dogs, TINY_SPLITS, image_size=SIZE, weights=weights, cache_dir=cache_dir,
                         dtype="float32", engine="keras", model=name)
    assert report.config["model"] == name and f"-{name}-{SIZE}-" in report.path.name
    with Cache(report.path) as cache:
        assert cache.feature_shape == entry.bottleneck_shape(SIZE)
        keys = cache.keys("validation")
        features = cache.features("validation", slice(0, len(keys)))
    sklearn_head = train_head(report.path, "sklearn", out=tmp_path / "sk")
    keras_head = train_head(report.path, "keras", epochs=1, batch_size=4, out=tmp_path / "ke")
    head, keras_loaded = load_head(sklearn_head.path), load_head(keras_head.path)
    assert head.backbone["model"] == name == keras_loaded.backbone["model"]

    # the head on the base predicts what it predicts on the cached features: the same preprocessing
    predictor = load_model(sklearn_head.path, weights=weights)
    rows = predictor.predict([cats_dogs / k for k in keys])
    expected = head.predict_proba(features)
    got = np.array([[r["probabilities"][c] for c in head.class_names] for r in rows])
    np.testing.assert_allclose(got, expected, atol=1e-3)

    result = finetune(cats_dogs, TINY_SPLITS, image_size=SIZE, weights=weights, cache_dir=cache_dir,
                      head=keras_head.path, epochs=1, batch_size=4, out=tmp_path / "ft", model=name)
    assert result.params["fine_tune_at"] == entry.fine_tune_at and result.epochs_run == 1
    assert json.loads((tmp_path / "ft" / "model.json").read_text())["backbone"]["model"] == name
    rows = load_model(tmp_path / "ft").predict([cats_dogs / keys[0]])
    assert set(rows[0]["probabilities"]) == set(head.class_names)

    # LiteRT: one conversion per architecture (a conversion takes minutes on 2 loaded cores; the
    # alphas and B0-B3 sizes of one family share its layers), checked by the engine against Keras
    # on the build's photos. Random weights give small outputs, so the relative difference is checked too.
    if name not in LITERT_CHECKED:
        return
    ref = resolve_weights(weights, SIZE, name)
    base = predictor.parts["bases"][0]  # the base the head predicted on above, loaded from the same file
    images = probe_images(*_source_and_split(cats_dogs), SIZE, model=name)
    if entry.litert:
        engine = make_engine("litert", base, ref, SIZE, cache_dir=cache_dir, images=images)
        assert engine.name == "litert" and engine.max_abs_diff <= 1e-3
        # Keras's output on these images is what the float32 Keras build stored for them (the split's
        # first rows; other images would differ far beyond the bound below)
        keras_out = features[: len(images)]
        assert np.max(np.abs(engine(images) - keras_out)) <= 1e-4 * np.max(np.abs(keras_out))
    else:
        assert make_engine("auto", base, ref, SIZE, cache_dir=cache_dir, images=images).name == "keras"


# The first registered model of each keras.applications module, except those whose LiteRT engine
# is checked with real weights: MobileNetV2 (tests/test_engines.py) and Xception (below).
LITERT_CHECKED = [next(n for n, e in BACKBONES.items() if e.module == module)
                  for module in dict.fromkeys(e.module for e in BACKBONES.values())
                  if module not in ("mobilenet_v2", "xception")]


def _source_and_split(cats_dogs):
    from bottlecache.data.sources import open_source

    return open_source(cats_dogs, TINY_SPLITS), "validation"


def test_unknown_model_and_wrong_weights_are_one_line(tmp_path, weights_path):
    result = invoke(["cache", "build", "--data", str(tmp_path), "--model", "resnet9000"])
    line = error_line(result)
    assert "'model'" in line and "resnet9000" in line and "xception" in line and result.exit_code != 0
    from bottlecache.core.errors import BottlecacheError
    from bottlecache.models.backbone import load_backbone, resolve_weights

    # MobileNetV2's weights file into Xception: refused in one line naming the model and the file to pass
    with pytest.raises(BottlecacheError, match="could not be loaded into Xception.*Keras Xception"):
        load_backbone(resolve_weights(weights_path, SIZE, "xception"), SIZE)


def test_imagenet_offline_error_names_the_models_file(tmp_path, monkeypatch):
    from bottlecache.core.errors import BottlecacheError
    from bottlecache.models.backbone import resolve_weights

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))
    from bottlecache.models import backbone

    def no_network(*args, **kwargs):
        raise OSError("no network")

    import keras

    monkeypatch.setattr(keras.utils, "get_file", no_network)
    with pytest.raises(BottlecacheError, match=r"Xception \(xception_weights_tf_dim_ordering_tf_kernels_notop.h5; "
                                               r"no internet\?\): pass --weights PATH"):
        resolve_weights("imagenet", 160, "xception")
    assert backbone.imagenet_weights_name(160, "mobilenet_v2_0.5") == \
        "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.5_160_no_top.h5"


def test_models_command_lists_the_registry():
    result = invoke(["models", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["model"] for r in rows] == list(BACKBONES)
    xception = next(r for r in rows if r["model"] == "xception")
    assert xception["bottleneck_160"] == [5, 5, 2048] and xception["preprocessing"] == "scale_pm1 v2"
    listed = invoke(["cache", "build", "--model", "list"])
    assert listed.exit_code == 0 and "convnext_tiny" in listed.stdout


# ---------------------------------------------------------------------------------------------
# Xception with its real ImageNet weights


@pytest.fixture(scope="module")
def xception_weights():
    return _need(XCEPTION_WEIGHTS)


@pytest.fixture(scope="module")
def xception_cache(xception_weights, tmp_path_factory):
    from bottlecache import build_cache

    _need(CATS_DOGS)
    splits = ["train=train[:300]", "validation=validation[:200]"]
    # the default engine: Xception is converted to LiteRT once, checked against Keras on the build's
    # photos, and the LiteRT test below checks that same flatbuffer again
    return build_cache(CATS_DOGS, splits, image_size=160, weights=xception_weights, model="xception",
                       cache_dir=tmp_path_factory.mktemp("xception-cache"))


@pytest.mark.slow
@pytest.mark.xdist_group("xception")
def test_xception_cache_and_sklearn_head_on_real_photos(xception_cache):
    from bottlecache.cache.store import Cache
    from bottlecache.train.heads import train_head

    assert xception_cache.engine == "litert"
    with Cache(xception_cache.path) as cache:
        assert cache.feature_shape == (5, 5, 2048)
        assert cache.config["model"] == "xception" and cache.n_examples("train") == 300
    head = train_head(xception_cache.path, "sklearn", save=False)
    assert head.metrics["validation"]["accuracy"] > 0.97, head.metrics["validation"]


@pytest.mark.slow
@pytest.mark.xdist_group("xception")
def test_xception_litert_matches_keras_on_real_photos(xception_weights, xception_cache, tmp_path):
    from bottlecache.data.sources import open_source
    from bottlecache.models.backbone import load_backbone, resolve_weights
    from bottlecache.models.engines import make_engine, probe_images

    if not get_backbone("xception").litert:
        pytest.fail("xception is registered Keras-only, but its LiteRT engine passes (docs/backbones.md)")
    ref = resolve_weights(xception_weights, 160, "xception")
    images = probe_images(open_source(_need(CATS_DOGS), ["validation=validation[:8]"]), "validation", 160,
                          model="xception")
    cache_dir = copy_engines(xception_cache.path.parent, tmp_path)  # the cache's conversion
    engine = make_engine("litert", load_backbone(ref, 160), ref, 160, cache_dir=cache_dir, images=images)
    assert engine.name == "litert" and engine.max_abs_diff <= 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("name", ["xception", "efficientnet_b3"])
def test_a_base_takes_its_native_size_and_its_bottleneck_is_the_networks(name, tmp_path):
    """Each base accepts the size it was trained at (`--image-size native`), beside the common ones:
    the registry's bottleneck at that size is the one Keras builds (Xception's is a table, not a
    division); the other bases refuse it in one line; the default caches keep their sizes."""
    from bottlecache.cache.settings import CacheSettings
    from bottlecache.core.errors import BottlecacheError
    from bottlecache.core.options import IMAGE_SIZES
    from bottlecache.core.tf import import_keras

    entry = get_backbone(name)
    size = entry.native_size
    assert size not in IMAGE_SIZES and size in entry.image_sizes
    model = getattr(import_keras().applications, entry.constructor)(input_shape=(size, size, 3), include_top=False,
                                                                     weights=None)
    assert tuple(model.output_shape[1:]) == entry.bottleneck_shape(size)
    data = str(tmp_path)
    assert CacheSettings(data, image_size="native", model=name, cache_dir=tmp_path).image_size == size
    assert CacheSettings(data, image_size="native", cache_dir=tmp_path).image_size == 224  # MobileNetV2's own
    with pytest.raises(BottlecacheError, match=f"must be one of 96, 128, 160, 192, 224 for the model mobilenet_v2. "
                                               f"Got {size}"):
        CacheSettings(data, image_size=size, cache_dir=tmp_path)


@pytest.mark.slow
@pytest.mark.xdist_group("xception")
def test_xception_at_its_native_size_on_real_photos(xception_weights, tmp_path):
    result = invoke(["cache", "build", "--data", _need(CATS_DOGS), "--split", "train=train[:8]", "--split",
                     "validation=validation[:8]", "--model", "xception", "--image-size", "native", "--weights",
                     xception_weights, "--engine", "keras", "--cache-dir", tmp_path, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["config"]["image_size"] == 299 and "xception-299-" in report["path"]
    from bottlecache.cache.store import Cache

    with Cache(report["path"]) as cache:
        assert cache.feature_shape == (10, 10, 2048) and cache.features("train").shape == (8, 10, 10, 2048)
    bad = invoke(["cache", "build", "--image-size", "natve", "--cache-dir", tmp_path])
    assert bad.exit_code == 2 and "The 'image_size' option must be an integer or native. Got 'natve'" in error_line(bad)
