"""The command line (issues 2 and 3): one-line errors with exit 2, the offline failure paths,
``cache ls / info / verify / train-head / heads``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import error_line, flip_byte_in_chunk, invoke

# ---------------------------------------------------------------------------------------------
# `cache build`: bad input


def test_build_missing_data_folder(tmp_path, weights_path):
    result = invoke(["cache", "build", "--data", tmp_path / "no-such-folder", "--weights", weights_path,
                     "--cache-dir", tmp_path / "cache"])
    assert result.exit_code == 2
    line = error_line(result)
    assert "'data' option" in line and "no-such-folder" in line and "does not exist" in line
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("weights, expected", [("missing.h5", "does not exist"), (".", "is a folder")])
def test_build_missing_weights(weights, expected, tmp_path, cats_dogs):
    result = invoke(["cache", "build", "--data", cats_dogs, "--split", "train=train[:8]", "--weights",
                     tmp_path / weights, "--cache-dir", tmp_path / "cache"])
    assert result.exit_code == 2
    line = error_line(result)
    assert "'weights' option must be 'imagenet' or a weights file" in line and expected in line


def test_build_non_weights_file(tmp_path, cats_dogs):
    weights = tmp_path / "notes.weights.h5"
    weights.write_text("these are not weights")
    result = invoke(["cache", "build", "--data", cats_dogs, "--split", "train=train[:8]", "--weights", weights,
                     "--cache-dir", tmp_path / "cache", "--engine", "keras"])
    assert result.exit_code == 2
    line = error_line(result)
    assert "is not an HDF5 file" in line and "notes.weights.h5" in line


def test_build_bad_image_size(tmp_path, cats_dogs, weights_path):
    result = invoke(["cache", "build", "--data", cats_dogs, "--image-size", 150, "--weights", weights_path,
                     "--cache-dir", tmp_path / "cache"])
    assert result.exit_code == 2
    line = error_line(result)
    assert "'image_size' option must be one of 96, 128, 160, 192, 224, a base's native size (240, 260, 299, 300), or native. Got 150" in line


@pytest.mark.parametrize(
    "option, value, expected",
    [
        ("--dtype", "float64", "'dtype' option must be one of float16, float32"),
        ("--engine", "gpu", "'engine' option must be one of auto, keras, litert"),
        ("--split", "train[a:b]", "'split' option must look like"),
        ("--batch-size", "0", "'batch_size' option must be positive"),
    ],
)
def test_build_bad_options(option, value, expected, tmp_path, cats_dogs, weights_path):
    result = invoke(["cache", "build", "--data", cats_dogs, "--weights", weights_path, "--cache-dir", tmp_path,
                     option, value])
    assert result.exit_code == 2
    assert expected in error_line(result)


# ---------------------------------------------------------------------------------------------
# Offline: there is no internet here, so these are the real failures


def test_build_imagenet_weights_offline(tmp_path, monkeypatch, cats_dogs):
    from bottlecache.models.backbone import imagenet_weights_name

    if (Path.home() / ".keras" / "models" / imagenet_weights_name(160)).exists():
        pytest.skip("the ImageNet weights are in ~/.keras, where Keras finds them without downloading")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))
    result = invoke(["cache", "build", "--data", cats_dogs, "--split", "train=train[:8]", "--weights", "imagenet",
                     "--cache-dir", tmp_path / "cache"])
    assert result.exit_code == 2
    line = error_line(result)
    assert "Could not download the ImageNet weights" in line
    assert "--weights" in line and "BOTTLECACHE_WEIGHTS" in line


def test_build_tfds_offline(tmp_path, weights_path):
    empty = tmp_path / "tfds"
    empty.mkdir()
    result = invoke(["cache", "build", "--data", "cats_vs_dogs", "--tfds-data-dir", empty, "--weights", weights_path,
                     "--cache-dir", tmp_path / "cache"])
    assert result.exit_code == 2
    line = error_line(result)
    assert "Could not download the tfds data set 'cats_vs_dogs'" in line
    assert "pass --data PATH to a local folder" in line


def test_build_unknown_tfds_name(tmp_path, weights_path):
    result = invoke(["cache", "build", "--data", "no_such_dataset_xyz", "--tfds-data-dir", tmp_path,
                     "--weights", weights_path, "--cache-dir", tmp_path / "cache"])
    assert result.exit_code == 2
    assert "neither a local folder nor a TensorFlow Datasets name" in error_line(result)


# ---------------------------------------------------------------------------------------------
# Inspecting caches


@pytest.fixture
def wide_tables():
    """Rich tables at 250 columns, so that a file name is not wrapped across lines."""
    from bottlecache.cli._common import out

    saved = out._width
    out.width = 250
    yield
    out._width = saved


def test_build_cache_hit_on_the_command_line(small_cache, cats_dogs, weights_path):
    from conftest import SMALL_SPLITS

    args = ["cache", "build", "--data", cats_dogs, "--weights", weights_path, "--cache-dir", small_cache.path.parent]
    for spec in SMALL_SPLITS:
        args += ["--split", spec]
    result = invoke(args)
    assert result.exit_code == 0, result.output
    assert "cache hit: nothing recomputed" in result.stdout and small_cache.fingerprint[:12] in result.stdout
    result = invoke(args + ["--json"])
    record = json.loads(result.stdout)
    assert record["hit"] and record["path"] == str(small_cache.path)
    assert [(s["name"], s["n_images"], s["n_processed"]) for s in record["splits"]] == [
        ("train", 96, 0), ("validation", 48, 0)
    ]


def test_ls_info_verify(small_cache, wide_tables):
    folder = small_cache.path.parent
    result = invoke(["cache", "ls", "--cache-dir", folder, "--json"])
    assert result.exit_code == 0, result.output
    (record,) = json.loads(result.stdout)
    assert record["path"] == str(small_cache.path) and record["fingerprint"] == small_cache.fingerprint
    assert record["splits"] == {"train": 96, "validation": 48}
    assert record["image_size"] == 160 and record["dtype"] == "float16" and record["data"] == "cats_and_dogs_filtered"
    result = invoke(["cache", "ls", "--cache-dir", folder])
    assert result.exit_code == 0 and small_cache.path.name in result.stdout and "train 96, validation 48" in result.stdout

    result = invoke(["cache", "info", small_cache.fingerprint[:10], "--cache-dir", folder, "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["fingerprint"] == small_cache.fingerprint and info["config"]["image_size"] == 160
    assert {s: v["images"] for s, v in info["splits"].items()} == {"train": 96, "validation": 48}
    assert info["build"]["engine"] == "keras"
    result = invoke(["cache", "info", small_cache.path])
    assert result.exit_code == 0 and small_cache.fingerprint in result.stdout

    result = invoke(["cache", "verify", small_cache.path])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("ok: ") and "train 96, validation 48" in result.stdout
    result = invoke(["cache", "verify", small_cache.path, "--json"])
    assert json.loads(result.stdout)["ok"] is True


def test_ls_empty_and_info_errors(tmp_path):
    result = invoke(["cache", "ls", "--cache-dir", tmp_path])
    assert result.exit_code == 0 and "no caches" in result.stdout
    result = invoke(["cache", "info", "abc123", "--cache-dir", tmp_path])
    assert result.exit_code == 2
    assert "unique fingerprint prefix" in error_line(result)


def test_verify_flipped_byte_exits_1(small_cache, tmp_path):
    copy = tmp_path / small_cache.path.name
    shutil.copy(small_cache.path, copy)
    first, last = flip_byte_in_chunk(copy, "validation", 0)
    assert (first, last) == (0, 0)  # one row per features chunk
    result = invoke(["cache", "verify", copy])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    faults = [line for line in result.stdout.splitlines() if line.startswith("fault: ")]
    assert len(faults) == 1 and "split 'validation': features row 0 fails to read" in faults[0]
    line = error_line(result)  # one line on stderr: the fault, and what to do
    assert "split 'validation': features row 0 fails to read" in line and "delete or move the file" in line
    record = json.loads(invoke(["cache", "verify", copy, "--json"]).stdout)
    assert record["ok"] is False and record["problems"] == [faults[0][len("fault: "):]]


# ---------------------------------------------------------------------------------------------
# Heads


def test_train_head_json_and_heads_list(small_cache, tmp_path, wide_tables):
    cache_dir = tmp_path / "cache-dir"
    records = {}
    for kind, extra in (("sklearn", ["--C", "0.1", "--C", "1"]), ("keras", ["--epochs", "2"])):
        result = invoke(["cache", "train-head", small_cache.path, "--kind", kind, "--cache-dir", cache_dir, "--json",
                         *extra])
        assert result.exit_code == 0, result.output
        record = json.loads(result.stdout)
        assert record["kind"] == kind and record["train_seconds"] > 0
        validation = record["metrics"]["validation"]
        assert 0 <= validation["accuracy"] <= 1 and validation["log_loss"] > 0
        assert set(validation) >= {"per_class", "confusion_matrix", "roc_auc", "n"}
        head_dir = tmp_path / "cache-dir" / "heads"
        assert record["path"].startswith(str(head_dir)) and Path(record["path"]).is_dir()
        records[kind] = record
    assert records["sklearn"]["params"]["Cs"] == [0.1, 1.0] and len(records["sklearn"]["selection"]) == 2
    assert records["keras"]["params"]["epochs"] == 2

    result = invoke(["cache", "heads", "--cache-dir", cache_dir, "--json"])
    assert result.exit_code == 0, result.output
    listed = {r["path"]: r for r in json.loads(result.stdout)}
    assert set(listed) == {records["sklearn"]["path"], records["keras"]["path"]}, listed
    for record in records.values():
        row = listed[record["path"]]
        assert row["kind"] == record["kind"]
        assert row["validation_accuracy"] == record["metrics"]["validation"]["accuracy"]
    result = invoke(["cache", "heads", "--cache-dir", cache_dir])
    assert result.exit_code == 0 and "sklearn" in result.stdout and "keras" in result.stdout

    # the table form of train-head
    result = invoke(["cache", "train-head", small_cache.path, "--cache-dir", cache_dir])
    assert result.exit_code == 0, result.output
    assert "validation" in result.stdout and "confusion matrix" in result.stdout and "saved to" in result.stdout
    assert len(json.loads(invoke(["cache", "heads", "--cache-dir", cache_dir, "--json"]).stdout)) == 3
    result = invoke(["cache", "heads", "--cache-dir", tmp_path / "nothing"])
    assert result.exit_code == 0 and "no heads" in result.stdout


def test_train_head_errors(small_cache, float32_train_cache, tmp_path):
    partial = tmp_path / (small_cache.path.name + ".partial")
    shutil.copy(small_cache.path, partial)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = np.arange(3)
    cases = [
        ([tmp_path / "missing.h5"], "No cache file"),
        ([partial], "partial cache"),
        ([other], "not a bottlecache cache"),
        ([float32_train_cache.path, "--C", "0.1", "--C", "1"], "needs a 'validation' split"),
        ([small_cache.path, "--kind", "forest"], "'kind' option must be one of sklearn, keras"),
        ([small_cache.path, "--C", "0"], "'C' option must be positive"),
        ([small_cache.path, "--kind", "keras", "--epochs", "0"], "'epochs' option must be positive"),
        ([small_cache.path, "--kind", "keras", "--optimizer", "sgd"], "'optimizer' option must be one of"),
    ]
    for args, expected in cases:
        result = invoke(["cache", "train-head", *args, "--cache-dir", tmp_path / "heads-dir"])
        assert result.exit_code == 2, (args, result.output)
        assert expected in error_line(result), (args, result.stderr)
    assert not (tmp_path / "heads-dir").exists()  # nothing was saved
    result = invoke(["cache", "train-head", "--cache-dir", tmp_path / "empty"])
    assert result.exit_code == 2 and "No cache in" in error_line(result)


# ---------------------------------------------------------------------------------------------
# Quiet by default, a cache folder that explains itself


@pytest.mark.slow
def test_tensorflow_start_up_lines_are_quiet_unless_verbose(tmp_path):
    """A command that imports TensorFlow prints only its own line; --verbose lets TensorFlow's
    start-up lines through (whatever this machine's TensorFlow prints at import)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "BOTTLECACHE_VERBOSE")}
    raw = subprocess.run([sys.executable, "-c", "import tensorflow"], capture_output=True, text=True, env=env)
    command = [sys.executable, "-m", "bottlecache", "cache", "build", "--data", "tfds:no_such_dataset_here",
               "--cache-dir", str(tmp_path)]
    quiet = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in quiet.stderr.splitlines() if line.strip()]
    assert quiet.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), quiet.stderr
    loud = subprocess.run([sys.executable, "-m", "bottlecache", "--verbose", *command[3:]], capture_output=True,
                          text=True, env=env)
    assert loud.returncode == 2 and loud.stderr.rstrip().splitlines()[-1] == lines[0]
    tf_lines = [line for line in raw.stderr.splitlines() if line.strip()]
    if tf_lines:  # TensorFlow does print at import here: --verbose shows it, the default does not
        assert len(loud.stderr.strip().splitlines()) > 1, loud.stderr


@pytest.mark.slow
@pytest.mark.parametrize("level", ["2", "3"])
def test_a_users_quiet_log_level_prints_no_native_line(level, tmp_path, converted, cats_dogs, weights_path):
    """TF_CPP_MIN_LOG_LEVEL=2 or 3, as users silence TensorFlow: a LiteRT build prints its progress
    bar and nothing else (no absl, oneDNN, CUDA or XNNPACK delegate line); 0 lets them through."""
    import os
    import subprocess
    import sys

    from conftest import copy_engines

    copy_engines(converted(96), tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "BOTTLECACHE_VERBOSE"} | {"TF_CPP_MIN_LOG_LEVEL": level}
    command = [sys.executable, "-m", "bottlecache", "cache", "build", "--data", str(cats_dogs), "--split",
               "train=train[:4]", "--image-size", "96", "--weights", str(weights_path), "--engine", "litert",
               "--cache-dir", str(tmp_path), "--json"]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    other = [line for line in done.stderr.splitlines() if line.strip() and "━" not in line]
    assert not other, other
    assert json.loads(done.stdout)["engine"] == "litert"


def test_a_new_cache_folder_gets_a_gitignore(small_cache, tmp_path):
    from bottlecache.core.files import GITIGNORE_TEXT, ensure_cache_dir

    folder = ensure_cache_dir(tmp_path / "custom" / "cache")
    assert (folder / ".gitignore").read_text() == GITIGNORE_TEXT and "\n*\n" in GITIGNORE_TEXT
    assert (small_cache.path.parent / ".gitignore").read_text() == GITIGNORE_TEXT  # written by a build
    (folder / ".gitignore").write_text("mine\n")  # never overwritten
    ensure_cache_dir(folder)
    assert (folder / ".gitignore").read_text() == "mine\n"


def test_tables_are_plain_lines_when_piped_and_fold_on_a_terminal(small_cache, monkeypatch):
    """Piped (CliRunner's output is not a terminal): a '#' title, tab-separated columns, every path
    whole. On a narrow terminal: boxed, and a long path folded onto more lines, never cut."""
    import io

    from rich.console import Console

    import bottlecache.cli._common as common

    result = invoke(["cache", "ls", "--cache-dir", small_cache.path.parent])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "# caches" and lines[1].split("\t")[:4] == ["file", "data", "precision", "splits"]
    assert any(line.split("\t")[0] == small_cache.path.name for line in lines[2:]), lines

    screen = io.StringIO()
    monkeypatch.setattr(common, "out", Console(file=screen, force_terminal=True, width=40, color_system=None))
    long_path = "/a/very/long/folder/name/that/goes/on/and/on/head-0123456789abcdef"
    common.out.print(common.table("heads", ["folder", "kind"], [[long_path, "sklearn [x]"]]))
    text = screen.getvalue()
    assert "…" not in text and "sklearn [x]" in text
    cells = "".join(line.split("│")[1].strip() for line in text.splitlines() if line.count("│") >= 2)
    assert long_path in cells


def test_a_file_that_is_not_hdf5_given_as_a_cache_is_not_called_damaged(tmp_path):
    """A .tflite (or any file that is not HDF5 and not named .h5) passed where a cache goes: one
    line saying it is not a cache, not advice to delete a damaged one."""
    other = tmp_path / "model.tflite"
    other.write_bytes(b"TFL3" + bytes(200))
    for argv in (["cache", "train-head", other], ["cache", "info", other], ["cache", "verify", other]):
        result = invoke(argv)
        line = error_line(result)
        assert result.exit_code == 2 and "is not a cache (not an HDF5 file)" in line and "delete" not in line, line
    assert other.read_bytes() == b"TFL3" + bytes(200)
