"""End-to-end fine-tuning (the tutorial's second phase) and prediction from images.

The flow: resolve the data and the weights exactly as ``cache build`` does → take a Keras head
trained on the cache (or train one on the cache first) → put it on the frozen base, called with
``training=False`` so BatchNorm stays in inference mode → unfreeze the layers from
``fine_tune_at`` on → train at a small learning rate on images preprocessed by the shared
function → keep the best epoch by validation loss → save ``model.keras`` with its record.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._tf import import_keras, import_tf
from .backbone import backbone_record, load_backbone, resolve_weights
from .config import check_image_size, check_positive, resolve_cache_dir
from .data import IMAGE_EXTENSIONS, image_dataset, load_image, open_source, preprocess, training_dataset
from .errors import BottlecacheError
from .fingerprint import canonical_json, fingerprint
from .heads import compile_for, compute_metrics, load_head, load_keras_file, probabilities_from_logits

MODEL_FORMAT = "bottlecache-model"
CHECKPOINT_DIR = ".checkpoint"


@dataclass
class FinetuneResult:
    path: Path
    metrics: dict  # split → metrics after fine-tuning
    head_metrics: dict  # split → metrics of the warm start (head on the frozen base), same images
    history: dict
    seconds_per_epoch: float
    train_seconds: float
    epochs_run: int
    best_epoch: int
    head_path: Path | None = None
    params: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "kind": "finetune",
            "path": str(self.path),
            "head": str(self.head_path) if self.head_path else None,
            "train_seconds": round(self.train_seconds, 3),
            "seconds_per_epoch": round(self.seconds_per_epoch, 3),
            "epochs_run": self.epochs_run,
            "best_epoch": self.best_epoch,
            "params": self.params,
            "head_metrics": self.head_metrics,
            "metrics": self.metrics,
        }


def augmentation():
    """Random horizontal flip and a small rotation; active only while training."""
    keras = import_keras()
    return keras.Sequential(
        [keras.layers.RandomFlip("horizontal"), keras.layers.RandomRotation(0.05)], name="augmentation"
    )


def attach_head(base, head_model, image_size: int, augment: bool = False):
    """Images (preprocessed by ``data.preprocess``) → [augmentation] → base(training=False) → head."""
    keras = import_keras()
    inputs = keras.Input(shape=(image_size, image_size, 3), name="image")
    x = augmentation()(inputs) if augment else inputs
    from .layers import InferenceMode

    # BatchNorm in inference mode, also once the base is trainable (see layers.InferenceMode)
    x = InferenceMode(base, name="frozen_bn_base")(x, training=False)
    outputs = head_model(x)
    return keras.Model(inputs, outputs, name="bottlecache_finetune")


def unfreeze(base, fine_tune_at: int) -> int:
    """Make the base's layers from ``fine_tune_at`` on trainable; return how many are."""
    if not 0 <= fine_tune_at <= len(base.layers):
        raise BottlecacheError(
            f"The 'fine_tune_at' option must be between 0 and {len(base.layers)} (the base's layers). "
            f"Got {fine_tune_at} instead."
        )
    base.trainable = True
    for layer in base.layers[:fine_tune_at]:
        layer.trainable = False
    return sum(1 for layer in base.layers if layer.trainable)


def epoch_checkpoint(folder: Path, state: dict, patience, progress, n_images: int, batch_size: int,
                     monitor: str = "val_loss"):
    """A Keras callback that, per epoch, keeps the best weights by ``monitor``, writes a resumable
    checkpoint (model with optimizer state, and ``state.json``), stops early after ``patience``
    epochs without gain, and drives a progress bar."""
    keras = import_keras()

    class EpochCheckpoint(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started, self.seen = time.perf_counter(), 0
            progress.start_split(f"epoch {epoch + 1}", n_images, 0)

        def on_train_batch_end(self, batch, logs=None):
            step = min(batch_size, n_images - self.seen)
            self.seen += step
            progress.advance(f"epoch {state['epoch'] + 1}", step)

        def on_epoch_end(self, epoch, logs=None):
            logs = {k: float(v) for k, v in (logs or {}).items()}
            seconds = time.perf_counter() - self.started
            for key, value in logs.items():
                state["history"].setdefault(key, []).append(value)
            state["history"].setdefault("seconds", []).append(seconds)
            if logs.get(monitor, float("inf")) < state["best"]:
                state["best"], state["best_epoch"] = logs[monitor], epoch + 1
                _atomic_save_weights(self.model, folder / "best.weights.h5")
            state["epoch"] = epoch + 1
            _atomic_save_model(self.model, folder / "last.keras")
            _atomic_write(folder / "state.json", json.dumps(state))
            progress.end_split(f"epoch {epoch + 1}")
            shown = ", ".join(f"{k} {v:.4f}" for k, v in logs.items())
            progress.message(f"epoch {epoch + 1}: {shown} ({seconds:.1f} s)")
            if patience and epoch + 1 - state["best_epoch"] >= patience:
                self.model.stop_training = True

    return EpochCheckpoint()


def _atomic_write(path: Path, text: str) -> None:
    staged = path.with_name(path.name + ".tmp")
    staged.write_text(text)
    os.replace(staged, path)


def _atomic_save_model(model, path: Path) -> None:
    staged = path.with_name("staged-" + path.name)
    model.save(staged)
    os.replace(staged, path)


def _atomic_save_weights(model, path: Path) -> None:
    staged = path.with_name("staged-" + path.name)
    model.save_weights(staged)
    os.replace(staged, path)


def _evaluate(model, source, split: str, image_size: int, batch_size: int) -> dict:
    ds = image_dataset(source, split, image_size).map(lambda i, k, y, x: (x, y)).batch(batch_size)
    logits, labels = [], []
    for x, y in ds:
        logits.append(np.asarray(model(x, training=False)))
        labels.append(y.numpy())
    proba = probabilities_from_logits(np.concatenate(logits))
    return compute_metrics(np.concatenate(labels), proba, source.class_names)


def finetune(
    data="cats_vs_dogs",
    splits=None,
    *,
    image_size: int = 160,
    weights=None,
    cache_dir=None,
    head=None,
    head_epochs: int = 10,
    fine_tune_at: int = 100,
    epochs: int = 10,
    learning_rate: float = 1e-5,
    batch_size: int = 32,
    seed: int = 0,
    augment: bool = False,
    early_stopping: int | None = None,
    out=None,
    resume: bool = False,
    tfds_data_dir=None,
    progress=None,
) -> FinetuneResult:
    """Fine-tune MobileNetV2 from ``fine_tune_at`` on, warm-started from a cached Keras head.

    Parameters
    ----------
    data, splits, image_size, weights, cache_dir, tfds_data_dir
        As for ``build_cache`` (the same code resolves them).
    head : path, optional
        A Keras head folder from ``train_head``. Without it, the cache is built (or found) and a
        head is trained on it for ``head_epochs`` first: the tutorial's two phases.
    fine_tune_at : int
        Layers of the base before this index stay frozen (default 100, as in the tutorial).
    epochs, learning_rate, batch_size, seed, augment, early_stopping
        Training settings (RMSprop, as in the tutorial). The best epoch by validation loss is kept.
    out : path, optional
        Folder for ``model.keras``; default ``<cache dir>/models/finetune-<fingerprint12>``.
    resume : bool
        Continue an interrupted run in ``out`` from its last finished epoch.

    Returns
    -------
    FinetuneResult
    """
    from .build import NullProgress, build_cache
    from .heads import train_head

    check_image_size(image_size)
    for name, value in (("epochs", epochs), ("head_epochs", head_epochs), ("batch_size", batch_size)):
        check_positive(name, value)
    check_positive("learning_rate", learning_rate, float)
    if early_stopping is not None:
        check_positive("early_stopping", early_stopping)
    progress = progress or NullProgress()
    cache_dir = resolve_cache_dir(cache_dir)
    source = open_source(data, splits, tfds_data_dir=tfds_data_dir)
    if "train" not in source.splits or "validation" not in source.splits:
        raise BottlecacheError(
            f"Fine-tuning needs 'train' and 'validation' splits; the data has {', '.join(source.splits)}. "
            "Name them with --split train=... --split validation=...."
        )
    weights_ref = resolve_weights(weights, image_size)
    record = backbone_record(weights_ref, image_size)

    if head is None:
        progress.message(f"phase 1: caching features and training a Keras head for {head_epochs} epochs")
        report = build_cache(data, splits, image_size=image_size, weights=weights, cache_dir=cache_dir,
                             tfds_data_dir=tfds_data_dir, progress=progress)
        head = train_head(report.path, "keras", epochs=head_epochs, batch_size=batch_size, seed=seed,
                          cache_dir=cache_dir).path
    loaded = load_head(head)
    if loaded.kind != "keras":
        raise BottlecacheError(f"The 'head' option needs a Keras head (cache train-head --kind keras); {head} is {loaded.kind}.")
    loaded.check_backbone(**record)
    if loaded.class_names != source.class_names:
        raise BottlecacheError(
            f"The head's classes {loaded.class_names} differ from the data's {source.class_names}."
        )

    params = {"fine_tune_at": fine_tune_at, "epochs": epochs, "learning_rate": learning_rate,
              "batch_size": batch_size, "seed": seed, "augment": augment, "early_stopping": early_stopping}
    run_config = {"data": source.identity, "splits": {n: str(s.spec) for n, s in source.splits.items()},
                  "backbone": record, "params": params,
                  "head": {"path": str(Path(head).resolve()),
                           "cache_fingerprint": loaded.record.get("cache", {}).get("fingerprint", "")}}
    out = Path(out) if out else cache_dir / "models" / f"finetune-{fingerprint(run_config)[:12]}"
    checkpoint = out / CHECKPOINT_DIR
    if (out / "model.keras").exists():
        raise BottlecacheError(f"{out} already holds a finished model; pass another --out.")
    if (checkpoint / "state.json").exists() and not resume:
        raise BottlecacheError(
            f"{out} holds an interrupted run; pass --resume to continue it, or another --out to start over."
        )

    keras = import_keras()
    import_tf()
    keras.utils.set_random_seed(seed)
    n_classes = len(source.class_names)
    state = {"epoch": 0, "history": {}, "best": float("inf"), "best_epoch": 0, "config": canonical_json(run_config)}
    if resume and (checkpoint / "state.json").exists():
        state = json.loads((checkpoint / "state.json").read_text())
        model = load_keras_file(checkpoint / "last.keras", compile=True)  # with its optimizer state
        head_metrics = json.loads((checkpoint / "head_metrics.json").read_text())
        progress.message(f"resuming {out} after epoch {state['epoch']}")
    else:
        base = load_backbone(weights_ref, image_size)
        model = attach_head(base, loaded.head.model, image_size, augment)
        head_metrics = {"validation": _evaluate(model, source, "validation", image_size, batch_size)}
        unfreeze(base, fine_tune_at)
        compile_for(model, n_classes, learning_rate)
        checkpoint.mkdir(parents=True, exist_ok=True)
        # The warm start is epoch 0: fine-tuning keeps it unless an epoch beats its validation loss.
        state["best"] = head_metrics["validation"]["log_loss"]
        _atomic_save_weights(model, checkpoint / "best.weights.h5")
        _atomic_write(checkpoint / "head_metrics.json", json.dumps(head_metrics))
    train = training_dataset(source, "train", image_size, batch_size, shuffle=True, seed=seed)
    validation = training_dataset(source, "validation", image_size, batch_size)
    callback = epoch_checkpoint(checkpoint, state, early_stopping, progress, source.split("train").n_examples,
                                batch_size)
    started = time.perf_counter()
    if state["epoch"] < epochs and not (early_stopping and state["epoch"] - state["best_epoch"] >= early_stopping):
        with warnings.catch_warnings():  # tf.data of unknown length: Keras warns at each epoch's end
            warnings.filterwarnings("ignore", message=".*ran out of data.*")
            model.fit(train, validation_data=validation, epochs=epochs, initial_epoch=state["epoch"],
                      callbacks=[callback], shuffle=False, verbose=0)
    train_seconds = time.perf_counter() - started
    if (checkpoint / "best.weights.h5").exists():
        model.load_weights(checkpoint / "best.weights.h5")
    metrics = {split: _evaluate(model, source, split, image_size, batch_size)
               for split in source.splits if split != "train"}
    for split in metrics:
        if split not in head_metrics:
            head_metrics[split] = None
    seconds = state["history"].get("seconds", [])
    result = FinetuneResult(
        out, metrics, head_metrics, state["history"], float(np.mean(seconds)) if seconds else 0.0,
        train_seconds, state["epoch"], state["best_epoch"], Path(head), params,
    )
    model_record = {
        "format": MODEL_FORMAT, "format_version": 1, "class_names": source.class_names, "backbone": record,
        "weights": weights_ref.spec, "head": str(Path(head).resolve()), "params": params,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _atomic_write(out / "model.json", json.dumps(model_record, indent=2))
    _atomic_write(out / "history.json", json.dumps(state["history"], indent=2))
    _atomic_write(out / "metrics.json", json.dumps(result.to_dict(), indent=2))
    _atomic_save_model(model, out / "model.keras")  # last: its presence marks the run finished
    shutil.rmtree(checkpoint, ignore_errors=True)
    return result


# ---------------------------------------------------------------------------------------------
# Prediction


@dataclass
class Predictor:
    """Images → class probabilities, from a fine-tuned model folder or a head folder."""

    path: Path
    kind: str  # "model" or "head"
    class_names: list[str]
    image_size: int
    _predict_batch: object = field(repr=False)
    fast_decode: bool = False  # as the cache the head was trained on was decoded

    def predict(self, items, batch_size: int = 32) -> list[dict]:
        """One dict per item (a path or a uint8 (H, W, 3) array): path, label, probability,
        probabilities; or path and error for an image that could not be read."""
        rows, images, slots = [], [], []
        for item in items:
            name = str(item) if isinstance(item, (str, os.PathLike)) else f"<array {len(rows)}>"
            try:
                if isinstance(item, (str, os.PathLike)):
                    image = load_image(item, self.image_size, self.fast_decode)
                else:
                    image = preprocess(np.asarray(item), self.image_size)
                images.append(np.asarray(image))
                slots.append(len(rows))
                rows.append({"path": name})
            except Exception as error:
                message = getattr(error, "message", None) or str(error)
                rows.append({"path": name, "error": " ".join(message.split())[:200] or type(error).__name__})
        for lo in range(0, len(images), batch_size):
            proba = self._predict_batch(np.stack(images[lo : lo + batch_size]))
            for slot, p in zip(slots[lo : lo + batch_size], proba):
                best = int(np.argmax(p))
                rows[slot].update(label=self.class_names[best], probability=float(p[best]),
                                  probabilities={c: float(v) for c, v in zip(self.class_names, p)})
        return rows


def load_model(path, weights=None) -> Predictor:
    """A fine-tuned model folder (``model.keras``) or a head folder (``head.json``) → ``Predictor``.

    A head runs on top of the frozen backbone its record names; ``weights`` overrides where that
    backbone's weights file is found (its sha256 must match the record).
    """
    folder = Path(path)
    if (folder / "model.keras").is_file() and (folder / "model.json").is_file():
        record = json.loads((folder / "model.json").read_text())
        model = load_keras_file(folder / "model.keras")
        size = int(record["backbone"]["image_size"])
        return Predictor(folder, "model", record["class_names"], size,
                         lambda x: probabilities_from_logits(np.asarray(model(x, training=False))))
    if (folder / "head.json").is_file():
        loaded = load_head(folder)
        size = int(loaded.backbone["image_size"])
        weights_ref = resolve_weights(weights if weights is not None else loaded.record.get("weights"), size)
        loaded.check_backbone(weights_sha256=weights_ref.sha256)
        base = load_backbone(weights_ref, size)

        def predict_batch(x):
            return loaded.predict_proba(np.asarray(base(x, training=False)))

        fast = loaded.record.get("cache", {}).get("config", {}).get("decode") == "dct-downscale"
        return Predictor(folder, "head", loaded.class_names, size, predict_batch, fast)
    raise BottlecacheError(
        f"{folder} is neither a fine-tuned model folder (model.keras) nor a head folder (head.json)."
    )


def expand_images(items) -> list[Path]:
    """Files as given; folders → their image files, recursively, sorted."""
    out = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            out += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and not p.is_dir())
        else:
            out.append(path)
    return out
