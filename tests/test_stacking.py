"""Stacked caches and test-time flips (issue 27): a head on several caches of the same photos, their
pooled features joined per key; the mirrored features of the evaluation splits cached once
(``cache build --tta flip``) and averaged with the image's in every path that measures or predicts.

Real photos (links to a few dozen of cats_and_dogs_filtered), real weights, real builds (96 and
128 px, Keras engine), real heads.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import error_line, invoke, shared_json

from bottlecache import build_cache
from bottlecache.cache.stack import open_stack
from bottlecache.cache.store import Cache
from bottlecache.core.errors import BottlecacheError
from bottlecache.train.calibration import probabilities_from_logits
from bottlecache.train.heads import SklearnHead, load_head, predict_split, train_head

SIZES = (96, 128)
PER_CLASS = {"train": 16, "validation": 8, "test": 8}


def _photos(root: Path, cats_dogs: Path) -> Path:
    """train / validation / test folders of real photos (links); test: validation photos after the first 8."""
    for name in ("cats", "dogs"):
        train = sorted((cats_dogs / "train" / name).iterdir())[: PER_CLASS["train"]]
        held = sorted((cats_dogs / "validation" / name).iterdir())
        for split, files in (("train", train), ("validation", held[:8]), ("test", held[8:16])):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for path in files:
                (folder / path.name).symlink_to(path.resolve())
    return root


@pytest.fixture(scope="session")
def flip_world(tmp_path_factory, weights_path, cats_dogs) -> dict:
    """The photos and a cache dir holding two ``--tta flip`` caches of them (96 and 128 px), built once per run."""

    def make(folder):
        photos = _photos(folder / "photos", cats_dogs)
        paths = [str(build_cache(photos, weights=weights_path, image_size=size, cache_dir=folder / "caches",
                                 engine="keras", tta="flip").path) for size in SIZES]
        return {"photos": str(photos), "cache_dir": str(folder / "caches"), "caches": paths}

    world = shared_json(tmp_path_factory, "flip-caches", make)
    return {k: [Path(p) for p in v] if isinstance(v, list) else Path(v) for k, v in world.items()}


def test_mirrored_rows_are_the_features_of_the_mirrored_photos(flip_world, weights_path, tmp_path):
    import tensorflow as tf

    mirrored = tmp_path / "mirrored"
    originals = sorted((flip_world["photos"] / "validation" / "cats").iterdir())[:4]
    for path in originals:  # decoded as the cache decodes them, mirrored, stored losslessly
        pixels = tf.io.decode_jpeg(tf.io.read_file(str(path.resolve())), channels=3)
        target = mirrored / "train" / "cats" / (path.stem + ".png")  # (a folder's first split is train)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(tf.io.encode_png(pixels[:, ::-1]).numpy())
    (mirrored / "train" / "dogs").mkdir()
    shutil.copy(mirrored / "train" / "cats" / (originals[0].stem + ".png"), mirrored / "train" / "dogs")
    report = build_cache(mirrored, weights=weights_path, image_size=SIZES[0], cache_dir=tmp_path / "c", engine="keras")
    with Cache(report.path) as plain, Cache(flip_world["caches"][0]) as flipped:
        assert "tta" not in plain.config and flipped.config["tta"] == "flip"
        assert plain.fingerprint != flipped.fingerprint
        assert "view_pooled" not in flipped.file["train"]  # the train split holds no mirror
        keys = flipped.keys("validation")
        rows = [keys.index(f"validation/cats/{p.name}") for p in originals]
        plain_keys = plain.keys("train")
        expected = plain.pooled("train")[[plain_keys.index(f"train/cats/{p.stem}.png") for p in originals]]
        got = flipped.mirrored_pooled("validation")[rows]
        assert np.allclose(got, expected, rtol=1e-3, atol=1e-3), np.abs(got - expected).max()
        assert not np.allclose(flipped.pooled("validation")[rows], expected, rtol=1e-2, atol=1e-2)  # not the photo itself
        assert flipped.mirrored_features("validation").shape == flipped.features("validation").shape


def test_a_stacked_head_is_the_head_on_the_features_joined_per_key(flip_world, tmp_path):
    a, b = flip_world["caches"]
    result = train_head([b, a], "sklearn", out=tmp_path / "stacked")
    with Cache(a) as small, Cache(b) as large:
        order = [small.keys("train").index(k) for k in large.keys("train")]
        x = np.concatenate([large.pooled("train"), small.pooled("train")[order]], axis=1)
        manual = SklearnHead().fit(x, large.labels("train"), n_classes=2)
        v_order = [small.keys("validation").index(k) for k in large.keys("validation")]
        xv = np.concatenate([large.pooled("validation"), small.pooled("validation")[v_order]], axis=1)
        with open_stack([b, a]) as stack:
            assert np.allclose(predict_split(result.head, stack, "validation"), manual.predict_proba(xv), atol=1e-6)
            assert stack.feature_shape == (1, 1, 2560)
    record = json.loads((tmp_path / "stacked" / "head.json").read_text())
    assert record["feature_shape"] == [1, 1, 2560]
    assert [m["cache"]["config"]["image_size"] for m in record["stack"]["members"]] == [128, 96]
    assert record["cache"]["fingerprint"] == record["stack"]["members"][0]["cache"]["fingerprint"]
    assert set(result.metrics) == {"validation", "test"}
    keras = train_head([a, b], "keras", epochs=2, out=tmp_path / "keras")
    assert load_head(keras.path).head.model.input_shape == (None, 1, 1, 2560)


def test_flipped_metrics_are_from_the_mean_of_the_image_and_mirror_logits(flip_world, tmp_path):
    cache_path = flip_world["caches"][1]
    result = train_head(cache_path, "sklearn", tta="flip", calibrate=True, out=tmp_path / "flip")
    head = load_head(result.path)
    assert head.tta == "flip" and result.params["tta"] == "flip"
    with Cache(cache_path) as cache:
        labels = cache.labels("test")
        logits = (head.head.logits(cache.pooled("test")) + head.head.logits(cache.mirrored_pooled("test"))) / 2
    proba = probabilities_from_logits(logits / head.head.temperature)
    assert result.metrics["test"]["accuracy"] == pytest.approx(float((proba.argmax(1) == labels).mean()))
    calibration = result.params["calibration"]  # fitted on the flipped logits: the log loss it minimises
    assert calibration["log_loss_after"] <= calibration["log_loss_before"] + 1e-9


def test_stacks_that_do_not_match_are_refused_in_one_line(flip_world, small_cache, tmp_path):
    a, b = flip_world["caches"]
    result = invoke(["cache", "train-head", str(a), str(small_cache.path), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    line = error_line(result)
    assert "a stack joins caches of the same photos" in line and "split" in line, line
    with pytest.raises(BottlecacheError, match="in the stack twice"):
        open_stack([a, a])
    result = invoke(["cache", "train-head", str(small_cache.path), "--tta", "flip", "--out", str(tmp_path / "y")])
    assert result.exit_code == 2 and "--tta flip" in error_line(result)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.slow
def test_predict_report_and_export_run_every_base_of_a_flipped_stack(flip_world, tmp_path):
    from bottlecache.serve.export import export_model
    from bottlecache.serve.predict import load_model
    from bottlecache.serve.report import write_report

    a, b = flip_world["caches"]
    result = train_head([a, b], "sklearn", tta="flip", out=tmp_path / "head")
    photos = sorted((flip_world["photos"] / "test").rglob("*.jpg"))
    predictor = load_model(result.path)
    assert predictor.tta == "flip" and [s[0] for s in predictor.input_specs] == [96, 128]
    rows = predictor.predict(photos)
    with open_stack([a, b]) as stack:
        keys = stack.keys("test")
        cached = predict_split(result.head, stack, "test", "flip")
    order = [keys.index(str(p.relative_to(flip_world["photos"]))) for p in photos]
    got = np.array([[r["probabilities"][c] for c in ("cats", "dogs")] for r in rows])
    assert np.abs(got - cached[order]).max() < 0.02  # the cache stores float16 bottlenecks
    plain = load_model(result.path, tta="none").predict(photos)
    assert any(abs(p["probability"] - r["probability"]) > 1e-4 for p, r in zip(plain, rows))  # flips change it

    report = write_report(result.path, "test", tmp_path / "r.html")
    assert report.metrics["accuracy"] == pytest.approx(result.metrics["test"]["accuracy"])
    assert "mirror" in (tmp_path / "r.html").read_text()

    exported = export_model(result.path, "keras", out=tmp_path / "export")
    record = json.loads((tmp_path / "export" / "export.json").read_text())
    assert record["tta"] == "flip" and record["image_size"] == 128
    assert [b["image_size"] for b in record["bases"]] == [96, 128]
    assert exported.evaluation["agreement"] == 1.0 and exported.evaluation["max_abs_diff"] < 1e-3
    # the export takes each photo once, at 128 px, and resizes it to 96 for the small base; the head
    # decoded the photo at 96 directly: near, not equal
    through_export = load_model(tmp_path / "export").predict(photos)
    same = sum(e["label"] == r["label"] for e, r in zip(through_export, rows))
    assert same >= len(photos) - 2, (same, len(photos))


def test_sweep_ranks_stacks_and_flips_and_a_rerun_does_nothing(flip_world, weights_path, tmp_path):
    from bottlecache.train.sweep import sweep

    cache_dir = tmp_path / "cache"
    shutil.copytree(flip_world["cache_dir"], cache_dir)  # the caches of this sweep: hits
    options = dict(image_sizes=SIZES, kinds=("sklearn",), stack=2, tta="flip", weights=weights_path,
                   cache_dir=cache_dir, plot=False, calibrate=True)
    board = sweep(flip_world["photos"], **options)
    assert board.n_built == 0
    labels = sorted((r.configuration.label, r.head.tta) for r in board.rows)
    assert labels == sorted([("96 px", "none"), ("96 px", "flip"), ("128 px", "none"), ("128 px", "flip"),
                             ("stack: 128 px + 96 px", "none"), ("stack: 128 px + 96 px", "flip")]) or \
        labels == sorted([("96 px", "none"), ("96 px", "flip"), ("128 px", "none"), ("128 px", "flip"),
                          ("stack: 96 px + 128 px", "none"), ("stack: 96 px + 128 px", "flip")])
    assert all(r.done for r in board.rows) and board.n_trained == 3  # the flip rows measured the same heads again
    winner = load_head(board.winner_path)
    assert winner.tta == board.winner.head.tta and "temperature" in winner.record["params"]
    assert board.test is not None and board.test["n"] == 16
    again = sweep(flip_world["photos"], **options)
    assert (again.n_built, again.n_trained) == (0, 0)
    assert [r.validation_accuracy for r in again.rows] == [r.validation_accuracy for r in board.rows]
    data = board.to_dict()
    stack_rows = [r for r in data["rows"] if "stack" in r["configuration"]]
    assert len(stack_rows) == 2 and all(isinstance(r["cache_path"], list) for r in stack_rows)


def test_an_edited_stack_record_is_refused(flip_world, tmp_path):
    a, b = flip_world["caches"]
    result = train_head([a, b], "sklearn", out=tmp_path / "head")
    path = result.path / "head.json"
    record = json.loads(path.read_text())
    record["stack"]["members"].reverse()
    path.write_text(json.dumps(record))
    with pytest.raises(BottlecacheError, match="stack"):
        load_head(result.path)
    record["stack"]["members"].reverse()
    record["params"]["tta"] = "mirror"
    path.write_text(json.dumps(record))
    with pytest.raises(BottlecacheError, match="tta"):
        load_head(result.path)
