"""Fine-tuning and prediction on real photos with the real weights (small slices, one epoch)."""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import POLL_SECONDS, wait_until
from typer.testing import CliRunner

FT_SPLITS = ["train=train[:32]", "validation=validation[:16]"]


@pytest.fixture(scope="module")
def keras_head(small_cache, tmp_path_factory):
    from bottlecache.train.heads import train_head

    out = tmp_path_factory.mktemp("heads") / "keras-head"
    return train_head(small_cache.path, "keras", epochs=3, out=out).path


@pytest.fixture(scope="module")
def finetuned(keras_head, cats_dogs, weights_path, tmp_path_factory):
    from bottlecache.train.finetune import finetune

    out = tmp_path_factory.mktemp("models") / "ft"
    return finetune(cats_dogs, FT_SPLITS, weights=weights_path, head=keras_head, epochs=1, out=out,
                    cache_dir=tmp_path_factory.mktemp("ft-cache"))


def test_every_path_uses_the_one_preprocessing_function(monkeypatch, cats_dogs):
    import bottlecache.data.sources as data
    import bottlecache.serve.predictor as predictor_module
    import bottlecache.train.finetune as finetune_module
    from bottlecache.cache.writer import _windows

    calls = []
    original = data.preprocess

    def recording(image, image_size, model="mobilenet_v2"):
        calls.append(image_size)
        return original(image, image_size, model)

    monkeypatch.setattr(data, "preprocess", recording)
    source = data.open_source(cats_dogs, ["train=train[:4]"])
    list(_windows(source, "train", 96, 0, 4, 4))  # cache build's input pipeline
    assert calls, "cache build did not call data.preprocess"
    calls.clear()
    next(iter(data.training_dataset(source, "train", 96, 2)))  # fine-tuning's input pipeline
    assert calls, "fine-tuning did not call data.preprocess"
    calls.clear()
    data.load_image(source.split("train").paths[0], 96)  # prediction
    assert calls, "prediction did not call data.preprocess"
    # and nothing holds a private copy of it
    assert predictor_module.load_image is data.load_image
    assert finetune_module.training_dataset is data.training_dataset


def test_head_on_the_base_predicts_like_the_head_on_cached_features(small_cache, keras_head, weights_path):
    from conftest import CATS_DOGS

    from bottlecache.cache.store import Cache
    from bottlecache.serve.predict import load_model
    from bottlecache.train.heads import load_head

    head = load_head(keras_head)
    with Cache(small_cache.path) as cache:
        keys = cache.keys("validation")[:12]
        from_cache = head.predict_proba(cache.features("validation", slice(0, 12)))
    predictor = load_model(keras_head, weights=weights_path)
    rows = predictor.predict([CATS_DOGS / k for k in keys])
    from_images = np.array([[r["probabilities"][c] for c in head.class_names] for r in rows])
    # the cache stores float16 features: the only difference is that rounding
    np.testing.assert_allclose(from_images, from_cache, atol=2e-3)


@pytest.mark.slow
def test_finetune_keeps_frozen_batchnorm_statistics_and_trains_the_top(finetuned, weights_path):
    import keras

    from bottlecache.models.backbone import load_backbone, resolve_weights
    from bottlecache.train.heads import load_keras_file

    model = load_keras_file(finetuned.path / "model.keras")
    tuned = model.get_layer("frozen_bn_base").layer
    original = load_backbone(resolve_weights(weights_path, 160), 160)
    n_bn, changed_top, changed_bottom = 0, 0, 0
    for index, (a, b) in enumerate(zip(original.layers, tuned.layers)):
        if isinstance(a, keras.layers.BatchNormalization):
            n_bn += 1
            np.testing.assert_array_equal(a.moving_mean.numpy(), b.moving_mean.numpy())
            np.testing.assert_array_equal(a.moving_variance.numpy(), b.moving_variance.numpy())
        for wa, wb in zip(a.weights, b.weights):
            if not np.array_equal(wa.numpy(), wb.numpy()):
                changed_top += index >= 100
                changed_bottom += index < 100
    assert n_bn > 40
    assert changed_bottom == 0, "layers below fine_tune_at changed"
    assert finetuned.best_epoch in (0, 1) and finetuned.epochs_run == 1 and len(finetuned.history["loss"]) == 1
    if finetuned.best_epoch == 1:  # the trained epoch was kept: the unfrozen top moved
        assert changed_top > 0, "fine-tuning changed no layer of the unfrozen top"
    else:  # the warm start was better: it is what was saved, the trained epoch's weights are not
        assert changed_top == 0, "best epoch 0 (the warm start) but the saved base is not the warm start's"


@pytest.mark.slow
def test_finetune_artifacts_and_metrics(finetuned):
    files = {p.name for p in finetuned.path.iterdir()}
    assert {"model.keras", "model.json", "metrics.json", "history.json"} <= files
    assert ".checkpoint" not in files
    metrics = json.loads((finetuned.path / "metrics.json").read_text())
    assert metrics["epochs_run"] == 1 and metrics["seconds_per_epoch"] > 0
    validation = metrics["metrics"]["validation"]
    assert validation["n"] == 16 and 0 <= validation["accuracy"] <= 1
    assert metrics["head_metrics"]["validation"]["n"] == 16
    # the best epoch by validation loss is kept, and the warm start counts as epoch 0
    assert validation["log_loss"] <= metrics["head_metrics"]["validation"]["log_loss"] + 1e-3


@pytest.mark.slow
def test_predict_on_model_and_head_folders(finetuned, keras_head, cats_dogs, weights_path, tmp_path):
    from bottlecache.cli import app

    images = tmp_path / "images"
    images.mkdir()
    for name in ("cats/cat.2000.jpg", "dogs/dog.2000.jpg"):
        (images / Path(name).name).write_bytes((cats_dogs / "validation" / name).read_bytes())
    (images / "broken.jpg").write_bytes(b"not an image")
    runner = CliRunner()
    for folder, weights in ((finetuned.path, []), (keras_head, ["--weights", str(weights_path)])):
        result = runner.invoke(app, ["predict", str(folder), str(images), *weights, "--json"])
        # one image could not be read: the others are predicted, the exit code says so in one line
        assert result.exit_code == 1, result.output
        assert "1 of 3 image(s) could not be read" in result.stderr and len(result.stderr.strip().splitlines()) == 1
        rows = json.loads(result.stdout)
        by_name = {Path(r["path"]).name: r for r in rows}
        assert set(by_name) == {"cat.2000.jpg", "dog.2000.jpg", "broken.jpg"}
        assert by_name["broken.jpg"]["error"].startswith("not a decodable image")
        assert "{{function_node" not in by_name["broken.jpg"]["error"] and "[Op:" not in by_name["broken.jpg"]["error"]
        for name in ("cat.2000.jpg", "dog.2000.jpg"):
            assert by_name[name]["label"] in ("cats", "dogs") and 0.5 <= by_name[name]["probability"] <= 1
        # the head was trained on real features: it gets these two clear photos right
        if folder == keras_head:
            assert by_name["cat.2000.jpg"]["label"] == "cats" and by_name["dog.2000.jpg"]["label"] == "dogs"


@pytest.mark.parametrize(
    "args, needle",
    [
        (["finetune", "run", "--fine-tune-at", "999", "--epochs", "1"], "fine_tune_at"),
        (["finetune", "run", "--epochs", "0"], "epochs"),
        (["finetune", "run", "--head", "/nonexistent/head"], "head"),
        (["finetune", "run", "--image-size", "150"], "image_size"),
        (["predict", "/nonexistent/model", "x.jpg"], "does not exist"),
    ],
)
def test_bad_finetune_and_predict_input_is_one_line(args, needle, cats_dogs, weights_path, keras_head, tmp_path):
    from bottlecache.cli import app

    common = ["--data", str(cats_dogs), "--weights", str(weights_path), "--cache-dir", str(tmp_path)]
    if args[0] == "finetune":
        args = args + common + [a for s in FT_SPLITS for a in ("--split", s)]
        if "--head" not in args:
            args += ["--head", str(keras_head)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    text = result.output.strip()
    assert needle in text and "Traceback" not in text and len(text.splitlines()) == 1, text


def test_head_with_other_weights_or_kind_is_refused(small_cache, keras_head, cats_dogs, weights_path, tmp_path):
    from bottlecache.core.errors import BottlecacheError
    from bottlecache.train.finetune import finetune
    from bottlecache.train.heads import train_head

    sklearn_head = train_head(small_cache.path, "sklearn", out=tmp_path / "sk").path
    with pytest.raises(BottlecacheError, match="Keras head"):
        finetune(cats_dogs, FT_SPLITS, weights=weights_path, head=sklearn_head, epochs=1, out=tmp_path / "a")
    other_weights = tmp_path / "copy.weights.h5"
    other_weights.write_bytes(weights_path.read_bytes() + b"\0")  # another sha256
    with pytest.raises(BottlecacheError, match="weights_sha256"):
        finetune(cats_dogs, FT_SPLITS, weights=other_weights, head=keras_head, epochs=1, out=tmp_path / "b")
    with pytest.raises(BottlecacheError, match="image_size"):
        finetune(cats_dogs, FT_SPLITS, weights=weights_path, image_size=128, head=keras_head, epochs=1,
                 out=tmp_path / "c")


@pytest.mark.slow
@pytest.mark.faults
def test_finetune_killed_mid_run_resumes_from_last_finished_epoch(finetuned, keras_head, cats_dogs, weights_path,
                                                                    launcher, tmp_path):
    """Killed as soon as a look sees its first finished epoch, a run resumes from its last finished
    epoch. The kill point is observed progress, never a time; the run gets enough epochs after the
    first that the kill lands before the last, at the epoch time the ``finetuned`` run measured
    (which includes the first epoch's one-off tracing, so later epochs are shorter: hence 20
    looks' worth of epochs, not one)."""
    begun = time.monotonic()
    json.loads((finetuned.path / "history.json").read_text())
    look = POLL_SECONDS + time.monotonic() - begun  # a look reads a small JSON file
    epochs = 1 + max(1, math.ceil(20 * look / finetuned.seconds_per_epoch))
    figures = f"{epochs} epochs of {finetuned.seconds_per_epoch:.2f} s measured, a look every {look:.3f} s"
    out = tmp_path / "run"
    # no --data, no --weights: the head's cache recorded where both were (issue 25)
    command = ["finetune", "run", "--head", str(keras_head), "--epochs", str(epochs), "--out", str(out),
               "--cache-dir", str(tmp_path / "c"), "--json"]
    command += [a for s in FT_SPLITS for a in ("--split", s)]
    process = launcher.start(command, stdout=tmp_path / "run.log")  # forked: TensorFlow imported already
    state_path = out / ".checkpoint" / "state.json"

    def an_epoch_finished():
        try:
            return json.loads(state_path.read_text())["epoch"] >= 1
        except (FileNotFoundError, ValueError):  # not written yet (it is replaced atomically)
            return False

    try:
        wait_until(an_epoch_finished, what=f"the run finishing an epoch before it ended ({figures})",
                   processes=[process], timeout=300)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    first = json.loads(state_path.read_text())["history"]
    assert 1 <= len(first["loss"]) < epochs, f"the kill landed after the last epoch ({figures})"
    assert not (out / "model.keras").exists()

    again = launcher.start(command, stdout=tmp_path / "again.out", stderr=tmp_path / "again.err")
    assert again.wait(timeout=300) == 2 and "--resume" in (tmp_path / "again.err").read_text()  # no silent restart
    resumed = launcher.start(command + ["--resume"], stdout=tmp_path / "resumed.out", stderr=tmp_path / "resumed.err")
    assert resumed.wait(timeout=600) == 0, (tmp_path / "resumed.err").read_text()[-2000:]
    history = json.loads((out / "history.json").read_text())
    assert len(history["loss"]) == epochs
    head = json.loads((keras_head / "head.json").read_text())
    assert json.loads((out / "model.json").read_text())["backbone"]["weights_sha256"] == \
        head["backbone"]["weights_sha256"] and Path(head["data"]["path"]) == cats_dogs.resolve()
    assert history["loss"][: len(first["loss"])] == first["loss"]  # finished epochs were kept, not rerun
    assert (out / "model.keras").exists()


@pytest.mark.slow
@pytest.mark.faults
def test_resume_with_other_settings_is_refused_and_epochs_may_grow(keras_head, cats_dogs, weights_path, tmp_path):
    """An interrupted run is resumed only with its own settings: a changed --learning-rate or
    --augment is refused in one line naming each; more --epochs is honoured."""
    from bottlecache.core.errors import BottlecacheError
    from bottlecache.core.progress import NullProgress
    from bottlecache.train.finetune import finetune

    class StopAfterFirstEpoch(NullProgress):  # Ctrl-C once the first epoch's checkpoint is written
        def message(self, text):
            if text.startswith("epoch 1:"):
                raise KeyboardInterrupt

    out = tmp_path / "run"
    common = dict(weights=weights_path, head=keras_head, out=out, cache_dir=tmp_path / "c")
    with pytest.raises(KeyboardInterrupt):
        finetune(cats_dogs, FT_SPLITS, epochs=1, progress=StopAfterFirstEpoch(), **common)
    state = json.loads((out / ".checkpoint" / "state.json").read_text())
    assert state["epoch"] == 1 and not (out / "model.keras").exists()

    with pytest.raises(BottlecacheError) as refused:
        finetune(cats_dogs, FT_SPLITS, epochs=1, learning_rate=1e-3, augment=True, resume=True, **common)
    message = str(refused.value)
    assert "--learning-rate 1e-05 -> 0.001" in message and "--augment False -> True" in message
    assert "\n" not in message and not (out / "model.keras").exists()
    assert json.loads((out / ".checkpoint" / "state.json").read_text()) == state  # nothing changed
    with pytest.raises(BottlecacheError, match="holds an interrupted run; pass --resume"):
        finetune(cats_dogs, FT_SPLITS, epochs=1, **common)

    result = finetune(cats_dogs, FT_SPLITS, epochs=2, resume=True, **common)  # one more epoch: honoured
    assert result.epochs_run == 2 and len(result.history["loss"]) == 2
    assert result.history["loss"][0] == state["history"]["loss"][0]
    record = json.loads((out / "model.json").read_text())
    assert record["params"]["epochs"] == 2 and record["backbone"]["preprocess_version"] >= 1

