"""``bottlecache sweep`` (issue 18): the winner is chosen on validation only, a rerun builds and trains
nothing, the budget stops new builds, a failing configuration is its row and the sweep goes on.

Real photos, real weights, real builds (96 and 128 px of a few dozen photos, Keras engine), real heads.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import error_line, invoke

SIZES = (96, 128)
CS = (0.01, 1.0)
EPOCHS = 2
N_TRAIN, N_VALIDATION = 24, 12  # per class


@pytest.fixture(scope="module")
def photos(tmp_path_factory, cats_dogs) -> Path:
    """train/validation/test folders of real photos (links). The test split is the validation photos
    with their labels swapped, so each head's test accuracy is 1 minus its validation accuracy: a
    choice that looked at test would pick the head that is worst on validation."""
    root = tmp_path_factory.mktemp("sweep-photos")
    for name, other in (("cats", "dogs"), ("dogs", "cats")):
        train = sorted((cats_dogs / "train" / name).iterdir())[:N_TRAIN]
        validation = sorted((cats_dogs / "validation" / name).iterdir())[:N_VALIDATION]
        for split, files, label in (("train", train, name), ("validation", validation, name), ("test", validation, other)):
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for path in files:
                (folder / path.name).symlink_to(path.resolve())
    return root


def run_sweep(photos, weights, cache_dir, **options):
    from bottlecache.train.sweep import sweep

    options = {"image_sizes": SIZES, "kinds": ("sklearn", "keras"), "Cs": CS, "epochs": EPOCHS, "engine": "keras"} | options
    return sweep(photos, weights=weights, cache_dir=cache_dir, **options)


@pytest.fixture(scope="module")
def first(photos, weights_path, tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("sweep-cache")
    return run_sweep(photos, weights_path, cache_dir), cache_dir


def test_order_is_cheapest_first():
    from bottlecache.train.sweep import Configuration, grid

    assert [p.image_size for p in grid([224, 96, 160])] == [96, 160, 224]
    # the model and the views weigh in: a costlier model at a smaller size comes later
    assert Configuration(160, "xception").relative_cost > Configuration(224).relative_cost
    assert Configuration(160, views=3).relative_cost == 4 * Configuration(160).relative_cost


def _test_accuracy(row) -> float:
    from bottlecache.cache.store import Cache
    from bottlecache.train.heads import load_head

    with Cache(row.cache_path) as cache:
        head = load_head(row.head_path)
        return float((head.predict_proba(cache.features("test")).argmax(axis=1) == cache.labels("test")).mean())


@pytest.mark.slow
def test_winner_is_chosen_on_validation_only(first):
    from bottlecache.train.heads import list_heads, load_head

    board, cache_dir = first
    assert len(board.rows) == len(SIZES) * (len(CS) + 1)
    assert all(r.status == "trained" and r.cache == "built" for r in board.rows), [r.to_dict() for r in board.rows]
    assert board.n_built == len(SIZES) and board.n_trained == len(board.rows)
    keys = [(-r.validation_accuracy, r.validation_log_loss) for r in board.rows]
    assert keys == sorted(keys)
    assert board.winner is board.rows[0]
    # The candidates were measured on validation only: no test figure was there to sway the choice.
    for row in board.rows:
        assert set(json.loads((row.head_path / "metrics.json").read_text())["metrics"]) == {"validation"}
    # Test and validation disagree here (the test labels are swapped): the choice by test would differ.
    test = {id(r): _test_accuracy(r) for r in board.rows}
    assert len({r.validation_accuracy for r in board.rows}) > 1, "the construction needs heads that differ"
    assert test[id(board.winner)] == pytest.approx(1 - board.winner.validation_accuracy)
    assert test[id(board.winner)] < max(test.values())
    # Only the winner is measured on test, and saved like any other head.
    assert board.test["accuracy"] == pytest.approx(test[id(board.winner)])
    assert board.winner_path.parent == cache_dir / "heads"
    saved = json.loads((board.winner_path / "metrics.json").read_text())
    assert set(saved["metrics"]) == {"validation", "test"}
    assert saved["metrics"]["validation"]["accuracy"] == board.winner.validation_accuracy
    assert load_head(board.winner_path).kind == board.winner.head.kind
    assert [(p, m.get("error")) for p, m in list_heads(cache_dir)] == [(board.winner_path, None)]
    record = json.loads(board.json_path.read_text())
    assert record["winner"]["head_path"] == str(board.winner.head_path) and record["selected_on"] == "validation"
    assert [r["validation_accuracy"] for r in record["rows"]] == [r.validation_accuracy for r in board.rows]
    assert board.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _tripwires(monkeypatch):
    """Building a cache or training a head fails loudly (the sweep would report it in the row):
    each function is replaced where the sweep calls it from, and where it is defined."""
    import bottlecache.cache.build
    import bottlecache.train.heads
    import bottlecache.train.sweep

    def tripwire(function):
        @functools.wraps(function)
        def tripped(*args, **kwargs):
            raise AssertionError(f"a rerun must not call {function.__name__}")

        return tripped

    for module, name in ((bottlecache.cache.build, "build_resolved"), (bottlecache.train.sweep, "build_resolved"),
                         (bottlecache.cache.build, "load_backbone"), (bottlecache.train.heads, "train_head"),
                         (bottlecache.train.sweep, "train_head")):
        assert hasattr(module, name), f"{module.__name__} no longer holds {name}: replace it where it is called"
        monkeypatch.setattr(module, name, tripwire(getattr(module, name)))


def _files(folder: Path) -> dict:
    return {p.relative_to(folder): p.stat().st_mtime_ns for p in folder.rglob("*")
            if p.is_file() and not p.name.startswith("leaderboard.")}


@pytest.mark.slow
def test_rerun_reuses_everything(first, photos, weights_path, monkeypatch):
    board, cache_dir = first
    before = _files(cache_dir)
    _tripwires(monkeypatch)
    again = run_sweep(photos, weights_path, cache_dir)
    assert all(r.status == "reused" and r.cache == "hit" for r in again.rows), [r.to_dict() for r in again.rows]
    assert again.n_built == 0 and again.n_trained == 0
    assert [r.to_dict() for r in again.rows] == [r.to_dict() | {"status": "reused", "cache": "hit"} for r in board.rows]
    assert again.winner_path == board.winner_path and again.test == board.test
    assert _files(cache_dir) == before  # nothing written but the leaderboard


@pytest.mark.slow
def test_a_rerun_needs_neither_data_nor_weights(first, photos, weights_path, monkeypatch):
    """Without --data and --weights, the sweep takes where its caches found them (said on stderr):
    the same caches, reused; nothing built, trained or written but the leaderboard."""
    board, cache_dir = first
    before = _files(cache_dir)
    _tripwires(monkeypatch)
    result = invoke(["sweep", "--cache-dir", cache_dir, "--image-size", ",".join(map(str, SIZES)),
                     "--kind", "sklearn,keras", "--C", ",".join(map(str, CS)), "--epochs", EPOCHS,
                     "--engine", "keras", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert len(rows) == len(board.rows) and all(r["status"] == "reused" and r["cache"] == "hit" for r in rows), rows
    assert f"data: {photos.resolve()}" in result.stderr and f"weights of mobilenet_v2: {weights_path.resolve()}" in \
        result.stderr, result.stderr
    assert _files(cache_dir) == before


@pytest.mark.slow
def test_budget_stops_new_builds(first, photos, weights_path, monkeypatch):
    """A budget no build fits in: the existing caches are used, no new one is started."""
    board, cache_dir = first
    _tripwires(monkeypatch)
    result = run_sweep(photos, weights_path, cache_dir, image_sizes=(160, 96, 128), kinds=("sklearn",), Cs=(1.0,),
                       budget="0.001s")
    assert [r.configuration.image_size for r in result.skipped] == [160]
    assert result.skipped[0].error.startswith("budget: the build would take about")
    assert {r.configuration.image_size for r in result.rows if r.status == "reused"} == set(SIZES)
    assert not list(cache_dir.glob("*-160-*"))
    assert result.n_built == 0 and result.winner is not None


@pytest.mark.slow
def test_failing_configuration_is_its_row(first, photos, weights_path, tmp_path, monkeypatch):
    """A damaged cache makes its configuration fail; the sweep goes on with the others."""
    board, cache_dir = first
    copy = tmp_path / "cache"
    shutil.copytree(cache_dir, copy)
    damaged = next(copy.glob("*-96-*.h5"))
    damaged.write_bytes(b"not an HDF5 file" * 64)
    _tripwires(monkeypatch)
    result = run_sweep(photos, weights_path, copy, kinds=("sklearn",), Cs=(1.0,))
    failed = [r for r in result.rows if r.status == "failed"]
    assert [r.configuration.image_size for r in failed] == [96] and failed[0].head is None
    assert damaged.name in failed[0].error
    assert result.winner.configuration.image_size == 128 and result.winner.status == "reused"
    assert result.rows[-1] is failed[0]  # finished rows first
    assert damaged.read_bytes() == b"not an HDF5 file" * 64  # reported, never overwritten


@pytest.mark.slow
def test_missing_weights_of_one_model_is_its_row(first, photos, weights_path, tmp_path, monkeypatch):
    """A model whose weights are missing fails in its row; the others run."""
    board, cache_dir = first
    _tripwires(monkeypatch)
    weights = {"mobilenet_v2": str(weights_path), "xception": str(tmp_path / "missing.weights.h5")}
    result = run_sweep(photos, weights, cache_dir, models=("mobilenet_v2", "xception"), kinds=("sklearn",), Cs=(1.0,))
    failed = [r for r in result.rows if r.status == "failed"]
    assert {r.configuration.model for r in failed} == {"xception"} and "missing.weights.h5" in failed[0].error
    assert result.winner is not None and result.winner.configuration.model == "mobilenet_v2"


# ---------------------------------------------------------------------------------------------
# The command


@pytest.mark.slow
def test_cli_json_and_table(first, photos, weights_path):
    board, cache_dir = first
    common = ["sweep", "--data", photos, "--image-size", "96,128", "--kind", "sklearn,keras", "--C", "0.01,1",
              "--epochs", EPOCHS, "--weights", weights_path, "--cache-dir", cache_dir, "--engine", "keras"]
    result = invoke(common + ["--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["n_built"] == 0 and record["n_trained"] == 0
    assert record["winner_path"] == str(board.winner_path) and record["test"] == board.test
    result = invoke(common)
    assert result.exit_code == 0, result.output
    assert f"saved to {board.winner_path}" in result.stdout
    assert "test accuracy of the winner only" in result.stdout


def test_cli_nothing_finished_exits_1(photos, tmp_path):
    """Weights given per model (MODEL=PATH) are that model's configurations' own: missing, they fail in their rows."""
    result = invoke(["sweep", "--data", photos, "--image-size", "96", "--kind", "sklearn", "--json",
                     "--weights", f"mobilenet_v2={tmp_path / 'missing.weights.h5'}", "--cache-dir", tmp_path / "cache"])
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]  # progress lines, then one error line
    assert [line for line in lines if line.startswith("error:")] == [lines[-1]] and "Traceback" not in result.output
    assert lines[-1] == "error: no configuration finished; each row says why"
    rows = json.loads(result.stdout)["rows"]
    assert [r["status"] for r in rows] == ["failed"] and "missing.weights.h5" in rows[0]["error"]  # the row says why


@pytest.mark.parametrize("args, expected", [
    (["--image-size", "160,abc"], "The 'image_size' option must be a comma-separated list"),
    (["--image-size", "100"], "The 'image_size' option must be one of 96, 128, 160, 192, 224, a base's native size "
                              "(240, 260, 299, 300), or native. Got 100"),
    (["--kind", "sklearn,forest"], "The 'kind' option must be one of sklearn, keras. Got 'forest'"),
    (["--C", "1,-2"], "The 'C' option must be positive. Got -2.0"),
    (["--budget", "ten minutes"], "The 'budget' option must be a duration such as 90s, 10m or 1h30m"),
])
def test_cli_bad_options(args, expected, tmp_path, photos, weights_path):
    result = invoke(["sweep", "--data", photos, "--weights", weights_path, "--cache-dir", tmp_path / "cache", *args])
    assert result.exit_code == 2
    assert expected in error_line(result)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("weights, expected", [
    (["mobilenet_v2={w}", "mobilenet_v2={w}"], "names 'mobilenet_v2' twice"),
    (["mobilenet_v2={w}", "xception={w}"], "names 'xception', which the sweep does not try"),
    (["mobilenet_v2={w}", "no_such_model={w}"], "names 'no_such_model', which the sweep does not try"),
])
def test_cli_weights_per_model_are_checked_up_front(weights, expected, tmp_path, photos, weights_path):
    """--weights MODEL=PATH: a model named twice, or one the sweep does not try (unknown or not in
    --model), is one line before anything is built, not silently the last one or ignored."""
    given = [token for w in weights for token in ("--weights", w.format(w=weights_path))]
    result = invoke(["sweep", "--data", photos, "--image-size", "96", *given, "--cache-dir", tmp_path / "cache"])
    assert result.exit_code == 2 and expected in error_line(result), result.output
    assert not (tmp_path / "cache").exists()


def test_budget_parsing():
    from bottlecache.core.errors import BottlecacheError
    from bottlecache.train.sweep import parse_budget

    assert [parse_budget(t) for t in ("90", "90s", "10m", "1h30m", "1.5h", None)] == [90, 90, 600, 5400, 5400, None]
    for bad in ("0", "-1m", "10 minutes", "m", "1e400"):
        with pytest.raises(BottlecacheError, match="'budget' option"):
            parse_budget(bad)
    assert np.isfinite(parse_budget(30 * 24 * 3600))


def test_calibrate_reports_the_calibration_error_before_and_after(photos, weights_path, tmp_path):
    """--calibrate: every head's temperature fitted on validation; the rows carry the validation
    expected calibration error before and after, the ranking by accuracy is unchanged, and a rerun
    without --calibrate trains its own heads (a calibrated head is another head)."""
    args = ["sweep", "--data", photos, "--weights", weights_path, "--cache-dir", tmp_path / "cache", "--image-size", "96",
            "--kind", "sklearn", "--engine", "keras", "--json"]
    calibrated = json.loads(invoke([*args, "--calibrate"]).stdout)
    row = calibrated["rows"][0]
    assert row["validation_ece"] is not None and row["validation_ece_uncalibrated"] is not None
    head = json.loads((Path(calibrated["winner_path"]) / "head.json").read_text())
    assert head["params"]["temperature"] > 0 and "calibration" in head["params"]
    plain = json.loads(invoke(args).stdout)
    assert plain["n_trained"] == 1 and plain["rows"][0]["validation_ece_uncalibrated"] is None
    assert plain["rows"][0]["validation_accuracy"] == row["validation_accuracy"]
    assert plain["rows"][0]["validation_ece"] == pytest.approx(row["validation_ece_uncalibrated"])


def test_native_is_each_models_own_size_once():
    from bottlecache.train.sweep import grid

    points = grid([160, 224, "native"], ["mobilenet_v2", "xception"])
    assert [(p.model, p.image_size) for p in points] == [
        ("mobilenet_v2", 160), ("mobilenet_v2", 224), ("xception", 160), ("xception", 224), ("xception", 299)]
    assert "xception 299 px" in [p.label for p in points]
