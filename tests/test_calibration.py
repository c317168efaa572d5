"""Calibrated probabilities (issue 27): temperature scaling fitted on validation, stored with the
head, applied wherever the head predicts; the expected calibration error before and after."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import error_line, invoke

from bottlecache.train.calibration import expected_calibration_error, fit_temperature, probabilities_from_logits
from bottlecache.train.heads import load_head, train_head


def test_the_expected_calibration_error_by_hand():
    labels = np.array([0, 0, 1, 1])
    proba = np.array([[0.95, 0.05], [0.65, 0.35], [0.45, 0.55], [0.62, 0.38]])
    # bins (10 equal): 0.9-1.0 holds 1 image (right, confidence 0.95), 0.6-0.7 holds 2 (one right,
    # mean confidence 0.635), 0.5-0.6 holds 1 (right, 0.55)
    expected = 0.25 * abs(1 - 0.95) + 0.5 * abs(0.5 - 0.635) + 0.25 * abs(1 - 0.55)
    assert expected_calibration_error(labels, proba) == pytest.approx(expected)
    assert expected_calibration_error(labels[:0], proba[:0]) == 0.0


@pytest.mark.parametrize("true_temperature", [0.5, 2.0])
def test_the_fitted_temperature_is_the_one_the_labels_were_drawn_with(true_temperature):
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 3.0, (20_000, 1))
    labels = (rng.random(20_000) < probabilities_from_logits(logits / true_temperature)[:, 1]).astype(int)
    fitted = fit_temperature(logits, labels)
    assert fitted == pytest.approx(true_temperature, rel=0.05)
    three = rng.normal(0.0, 2.0, (5_000, 3))
    drawn = np.array([rng.choice(3, p=p) for p in probabilities_from_logits(three / true_temperature)])
    assert fit_temperature(three, drawn) == pytest.approx(true_temperature, rel=0.1)


@pytest.mark.parametrize("kind", ["sklearn", "keras"])
def test_a_calibrated_head_keeps_its_predictions_and_records_its_temperature(small_cache, kind, tmp_path):
    options = {"epochs": 5} if kind == "keras" else {}
    plain = train_head(small_cache.path, kind, out=tmp_path / "plain", **options)
    calibrated = train_head(small_cache.path, kind, calibrate=True, out=tmp_path / "calibrated", **options)
    params = calibrated.params
    assert params["temperature"] > 0 and params["temperature"] != 1.0
    record = params["calibration"]
    assert record["split"] == "validation" and record["method"] == "temperature"
    assert record["log_loss_after"] <= record["log_loss_before"] + 1e-9  # the fitted T minimises it (T = 1 was allowed)
    validation = calibrated.metrics["validation"]
    assert validation["ece"] == pytest.approx(record["ece_after"], abs=1e-9)
    assert plain.metrics["validation"]["ece"] == pytest.approx(record["ece_before"], abs=1e-9)
    assert validation["accuracy"] == plain.metrics["validation"]["accuracy"]  # the same predictions
    assert validation["confusion_matrix"] == plain.metrics["validation"]["confusion_matrix"]

    # stored with the head, applied when it is loaded (predict, report and export load it)
    loaded = load_head(tmp_path / "calibrated")
    from bottlecache.cache.store import Cache

    with Cache(small_cache.path) as cache:
        features = cache.features("validation") if kind == "keras" else cache.pooled("validation")
    logits = loaded.head.logits(features)
    assert loaded.head.temperature == pytest.approx(params["temperature"])
    assert np.allclose(loaded.predict_proba(features), probabilities_from_logits(logits / params["temperature"]))
    assert json.loads((tmp_path / "calibrated" / "head.json").read_text())["params"]["temperature"] == params["temperature"]


def test_the_exported_logistic_regression_carries_the_temperature(small_cache, tmp_path):
    from bottlecache.core.tf import import_keras
    from bottlecache.serve.export import sklearn_as_keras

    head = train_head(small_cache.path, "sklearn", calibrate=True, save=False).head
    rng = np.random.default_rng(0)
    features = rng.uniform(0.0, 6.0, (8, 5, 5, 1280)).astype(np.float32)
    keras = import_keras()
    inputs = keras.Input((5, 5, 1280))
    model = keras.Model(inputs, sklearn_as_keras(head, inputs, 2))
    assert np.allclose(np.asarray(model(features)), head.predict_proba(features), atol=1e-5)


def test_calibrating_needs_a_validation_split_and_a_sane_temperature(float32_train_cache, small_cache, tmp_path):
    result = invoke(["cache", "train-head", str(float32_train_cache.path), "--calibrate"])
    assert result.exit_code == 2 and "Calibrating fits a temperature on a 'validation' split" in error_line(result)
    train_head(small_cache.path, "sklearn", calibrate=True, out=tmp_path / "h")
    record = json.loads((tmp_path / "h" / "head.json").read_text())
    record["params"]["temperature"] = -1.0  # edited by hand
    (tmp_path / "h" / "head.json").write_text(json.dumps(record))
    result = invoke(["predict", str(tmp_path / "h"), str(small_cache.path)])
    assert result.exit_code == 2 and "temperature" in error_line(result)


def test_the_table_shows_the_calibration(small_cache, tmp_path):
    result = invoke(["cache", "train-head", str(small_cache.path), "--calibrate", "--out", str(tmp_path / "h")])
    assert result.exit_code == 0, result.output
    header = next(line for line in result.stdout.splitlines() if line.startswith("split\t"))
    assert "ECE" in header.split("\t")
    assert "calibrated: temperature " in result.stdout and "expected calibration error" in result.stdout
