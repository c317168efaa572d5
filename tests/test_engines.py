"""The LiteRT engine against Keras on real photos with the real weights, and its flatbuffer cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import SMALL_SPLITS, copy_engines

pytest.importorskip("ai_edge_litert", reason="ai-edge-litert is a dependency; install the project")


@pytest.fixture(scope="module")
def base_and_images(weights_path, cats_dogs):
    from bottlecache.data.sources import open_source
    from bottlecache.models.backbone import load_backbone, resolve_weights
    from bottlecache.models.engines import probe_images

    weights = resolve_weights(weights_path, 160)
    source = open_source(cats_dogs, ["validation=validation[:24]"])
    return load_backbone(weights, 160), weights, probe_images(source, "validation", 160, n=24)


@pytest.fixture(scope="module")
def engines_dir(converted, tmp_path_factory):
    """A cache dir holding the converted flatbuffer (a conversion takes 10-20 s: the run's one,
    copied; tests/test_engines.py::test_flatbuffer_is_reused_and_a_corrupted_one_rebuilt converts)."""
    return copy_engines(converted(160), tmp_path_factory.mktemp("engines-cache"))


@pytest.mark.slow
def test_litert_matches_keras_on_real_images(base_and_images, engines_dir):
    from bottlecache.models.engines import MAX_ABS_DIFF, KerasEngine, make_engine

    model, weights, images = base_and_images
    engine = make_engine("litert", model, weights, 160, cache_dir=engines_dir, images=images[:8])
    assert engine.name == "litert" and 0 < engine.max_abs_diff <= MAX_ABS_DIFF
    reference = KerasEngine(model)(images)
    out = np.concatenate([engine(images[i : i + 8]) for i in range(0, 24, 8)])
    assert out.shape == reference.shape == (24, 5, 5, 1280)
    assert np.abs(out - reference).max() <= MAX_ABS_DIFF
    # a batch of another size (a split's last batch) gives the same rows
    np.testing.assert_allclose(engine(images[:3]), out[:3], atol=1e-5)


@pytest.mark.slow
def test_flatbuffer_is_reused_and_a_corrupted_one_rebuilt(base_and_images, engines_dir, tmp_path):
    from bottlecache.models.engines import LiteRTEngine, convert_to_flatbuffer, flatbuffer_path

    model, weights, images = base_and_images
    copy_engines(engines_dir, tmp_path)
    path = flatbuffer_path(tmp_path, weights.sha256, 160)
    first = path.stat()
    assert convert_to_flatbuffer(model, path) == path
    second = path.stat()
    assert (second.st_ino, second.st_mtime_ns) == (first.st_ino, first.st_mtime_ns), "reconverted a good file"

    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the weights
    path.write_bytes(bytes(data))
    convert_to_flatbuffer(model, path)
    record = json.loads(path.with_suffix(".json").read_text())
    import hashlib

    assert hashlib.sha256(path.read_bytes()).hexdigest() == record["sha256"]
    assert path.read_bytes() != bytes(data)
    assert LiteRTEngine(path)(images[:2]).shape == (2, 5, 5, 1280)


@pytest.mark.slow
def test_auto_build_records_the_engine_and_its_difference(weights_path, cats_dogs, tmp_path, small_cache, engines_dir):
    from bottlecache import build_cache
    from bottlecache.cache.store import Cache

    copy_engines(engines_dir, tmp_path)
    report = build_cache(cats_dogs, SMALL_SPLITS, weights=weights_path, cache_dir=tmp_path, engine="auto")
    assert report.engine == "litert"
    flatbuffers = list((tmp_path / "engines").glob("*.tflite"))
    assert len(flatbuffers) == 1
    with Cache(report.path) as litert_cache, Cache(small_cache.path) as keras_cache:
        assert litert_cache.build_info["engine"] == "litert"
        assert 0 < litert_cache.build_info["engine_max_abs_diff"] <= 1e-3
        # same configuration, same fingerprint: the engine is not part of the cache's identity
        assert litert_cache.fingerprint == keras_cache.fingerprint
        a = litert_cache.features("validation").astype(np.float32)
        b = keras_cache.features("validation").astype(np.float32)
        assert np.abs(a - b).max() <= 5e-3  # 1e-3 engine bound + float16 rounding of values up to 6
        np.testing.assert_allclose(litert_cache.pooled("validation"), keras_cache.pooled("validation"), atol=1e-3)
    # a second build with the same cache dir reuses the flatbuffer
    mtime = flatbuffers[0].stat().st_mtime_ns
    build_cache(cats_dogs, ["train=train[:8]"], weights=weights_path, cache_dir=tmp_path, engine="litert")
    assert flatbuffers[0].stat().st_mtime_ns == mtime


def test_fast_decode_is_part_of_the_fingerprint_and_close_to_full_decode(weights_path, cats_dogs, tmp_path):
    from bottlecache import build_cache
    from bottlecache.cache.store import Cache

    splits = ["validation=validation[:16]"]
    full = build_cache(cats_dogs, splits, weights=weights_path, cache_dir=tmp_path, engine="keras")
    fast = build_cache(cats_dogs, splits, weights=weights_path, cache_dir=tmp_path, engine="keras", fast_decode=True)
    assert full.fingerprint != fast.fingerprint and not fast.hit
    with Cache(full.path) as a, Cache(fast.path) as b:
        assert b.config["decode"] == "dct-downscale" and a.config["decode"] == "full"
        pa, pb = a.pooled("validation"), b.pooled("validation")
        cosine = (pa * pb).sum(1) / np.linalg.norm(pa, axis=1) / np.linalg.norm(pb, axis=1)
        # the same images, decoded a little differently (on the 1,000 validation photos: mean 0.98, min 0.88)
        assert cosine.mean() > 0.95 and cosine.min() > 0.8
        assert not np.array_equal(pa, pb)


@pytest.mark.slow
def test_a_checked_flatbuffer_starts_the_next_build_without_keras(weights_path, cats_dogs, tmp_path, engines_dir,
                                                                   monkeypatch):
    """The first build checks the flatbuffer against Keras and records it; the next build reuses
    that check and never loads the Keras base; a changed flatbuffer or record is checked again."""
    import bottlecache.cache.build as build_module
    from bottlecache import build_cache
    from bottlecache.cache.store import Cache
    from bottlecache.models.backbone import resolve_weights
    from bottlecache.models.engines import flatbuffer_path

    copy_engines(engines_dir, tmp_path)
    path = flatbuffer_path(tmp_path, resolve_weights(weights_path, 160).sha256, 160)
    unchecked = json.loads(path.with_suffix(".json").read_text())
    unchecked.pop("check", None)  # as converted, before any build checked it (other tests here check it)
    path.with_suffix(".json").write_text(json.dumps(unchecked))
    first = build_cache(cats_dogs, ["validation=validation[:8]"], weights=weights_path, cache_dir=tmp_path)
    record = json.loads(path.with_suffix(".json").read_text())
    with Cache(first.path) as cache:
        assert cache.build_info["engine_check"] == "probe"
        assert record["check"]["max_abs_diff"] == cache.build_info["engine_max_abs_diff"]
    assert record["check"]["images"] == 8 and first.startup_seconds > 0

    loads = []
    real_load = build_module.load_backbone
    monkeypatch.setattr(build_module, "load_backbone", lambda *a: loads.append(a) or real_load(*a))
    second = build_cache(cats_dogs, ["validation=validation[8:16]"], weights=weights_path, cache_dir=tmp_path)
    with Cache(second.path) as cache:
        assert cache.build_info["engine"] == "litert" and cache.build_info["engine_check"] == "recorded"
        assert cache.build_info["engine_max_abs_diff"] == record["check"]["max_abs_diff"]
    assert loads == [], "the Keras base was loaded although the flatbuffer's check was recorded"

    # a record from another LiteRT version is not trusted: the next build checks again
    record["check"]["litert"] = "0.0"
    path.with_suffix(".json").write_text(json.dumps(record))
    third = build_cache(cats_dogs, ["validation=validation[16:24]"], weights=weights_path, cache_dir=tmp_path)
    with Cache(third.path) as cache:
        assert cache.build_info["engine_check"] == "probe"
    assert len(loads) == 1
    # a flatbuffer whose bytes no longer match its record is converted and checked again
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    fourth = build_cache(cats_dogs, ["validation=validation[24:32]"], weights=weights_path, cache_dir=tmp_path)
    with Cache(fourth.path) as cache:
        assert cache.build_info["engine_check"] == "probe"
    assert path.read_bytes() != bytes(data)


def test_a_base_is_built_once_for_inference_and_fresh_for_training(weights_path):
    """The frozen base is shared in a process (the same object and traced call for the same file,
    model and size) unless asked for fresh, as fine-tuning does; forgetting starts over."""
    from bottlecache.models.backbone import forget_loaded_backbones, inference_call, load_backbone, resolve_weights

    ref = resolve_weights(weights_path, 96)
    shared = load_backbone(ref, 96)
    assert load_backbone(ref, 96) is shared and inference_call(shared) is inference_call(shared)
    fresh = load_backbone(ref, 96, fresh=True)
    assert fresh is not shared and load_backbone(ref, 96) is shared and inference_call(fresh) is not inference_call(fresh)
    assert not shared.trainable and not fresh.trainable
    forget_loaded_backbones()
    assert load_backbone(ref, 96) is not shared
