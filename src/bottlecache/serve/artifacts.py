"""Export artifacts: their files, the runtime that runs each format as a deployment would, and
an export loaded back as a Predictor (what predict runs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.errors import BottlecacheError, reason
from ..core.records import DECODE_FAST, EXPORT_FORMAT, RECORD_VERSION, ExportRecord, read_json
from ..core.tf import import_tf
from ..models.engines import LiteRTRunner
from ..train.heads import load_keras_file
from .predictor import Predictor

FORMATS = ("keras", "saved_model", "litert")
QUANTIZATIONS = ("none", "float16", "dynamic", "int8")
ARTIFACTS = {"keras": "model.keras", "saved_model": "saved_model", "litert": "model.tflite"}
LABELS_FILE = "labels.txt"
RECORD_FILE = "export.json"
EXPORT_ADVICE = "export it again with `bottlecache export`"


# ---------------------------------------------------------------------------------------------
# Images: the cache's data, decoded and resized by the shared pipeline, as uint8


def to_uint8(images) -> np.ndarray:
    """Preprocessed images (``data.preprocess``: [-1, 1]) → the uint8 pixels they stand for."""
    return np.clip(np.rint((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Runtimes: each artifact run as a deployment would run it


class KerasRuntime:
    def __init__(self, path: Path):
        tf = import_tf()
        self.model = load_keras_file(path, advice=EXPORT_ADVICE)  # safe mode
        self._call = tf.function(lambda x: self.model(x, training=False), reduce_retracing=True)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self._call(np.asarray(images, np.uint8)))

    def input_size(self):
        return _height_width(self.model.input_shape)


class SavedModelRuntime:
    def __init__(self, path: Path):
        tf = import_tf()
        try:
            self.loaded = tf.saved_model.load(str(path))
            self._serve = self.loaded.signatures["serve"] if "serve" in self.loaded.signatures else self.loaded.serve
        except Exception as error:
            raise BottlecacheError(f"{path} cannot be loaded as a SavedModel ({reason(error)}); {EXPORT_ADVICE}.") from None
        self._tf = tf

    def __call__(self, images: np.ndarray) -> np.ndarray:
        out = self._serve(self._tf.constant(np.asarray(images, np.uint8)))
        if isinstance(out, dict):
            out = next(iter(out.values()))
        return np.asarray(out)

    def input_size(self):
        args, kwargs = self._serve.structured_input_signature
        specs = [*args, *kwargs.values()]
        return _height_width(specs[0].shape.as_list()) if specs else None


def _height_width(shape):
    """(height, width) of an image batch's shape, or None where the artifact does not fix them."""
    if shape is None or len(shape) != 4 or shape[1] is None or shape[2] is None or min(shape[1], shape[2]) < 1:
        return None
    return int(shape[1]), int(shape[2])


class LiteRTRuntime(LiteRTRunner):
    """An exported flatbuffer: class probabilities, as float64 rows that sum to 1."""

    def __init__(self, path: Path, threads: int | None = None):
        super().__init__(path, threads, EXPORT_ADVICE)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        proba = super().__call__(images).astype(np.float64)
        # an int8 softmax gives multiples of 1/256 that may miss a sum of 1 by a step: renormalised
        return proba / np.maximum(proba.sum(axis=1, keepdims=True), 1e-12)

    def input_size(self):
        return _height_width(list(self._input.get("shape_signature", self._input["shape"])))


RUNTIMES = {"keras": KerasRuntime, "saved_model": SavedModelRuntime, "litert": LiteRTRuntime}


def artifact_size(path: Path) -> int:
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


# ---------------------------------------------------------------------------------------------
# Loading an export back (``predict``)


def is_export(path) -> bool:
    """An export folder, or the artifact inside one."""
    path = Path(path)
    return (path / RECORD_FILE).is_file() or (path.parent / RECORD_FILE).is_file() and path.name in ARTIFACTS.values()


def read_export(path) -> tuple[Path, ExportRecord]:
    path = Path(path)
    folder = path if (path / RECORD_FILE).is_file() else path.parent
    record = read_json(folder / RECORD_FILE, ExportRecord, EXPORT_ADVICE, fmt=EXPORT_FORMAT, version=RECORD_VERSION)
    labels = folder / LABELS_FILE
    try:
        names = labels.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise BottlecacheError(f"{labels} cannot be read ({reason(error)}); {EXPORT_ADVICE}.") from None
    if names != list(record.class_names):
        raise BottlecacheError(f"{labels} does not match {folder / RECORD_FILE}'s classes; {EXPORT_ADVICE}.")
    return folder, record


def load_export(path):
    """An export folder (or its artifact) → ``predict.Predictor`` running the artifact's runtime."""

    folder, record = read_export(path)
    artifact = folder / record.artifact
    if not artifact.exists():
        raise BottlecacheError(f"{artifact} is missing; {EXPORT_ADVICE}.")
    runtime = RUNTIMES[record.artifact_format](artifact)
    size = runtime.input_size()
    if size is not None and size != (record.image_size, record.image_size):
        raise BottlecacheError(f"{folder / RECORD_FILE} says image_size {record.image_size}, but {artifact.name} takes "
                               f"{size[0]}x{size[1]} images; {EXPORT_ADVICE}.")
    n = len(record.class_names)

    def predict_batch(images):
        proba = np.asarray(runtime(to_uint8(images)), np.float64)
        if proba.ndim != 2 or proba.shape[1] != n:
            raise BottlecacheError(f"{artifact} gives outputs of shape {list(proba.shape)}, not {n} class "
                                   f"probabilities; {EXPORT_ADVICE}.")
        return proba

    return Predictor(folder, f"export {record.artifact_format}", list(record.class_names), record.image_size,
                     predict_batch, record.decode == DECODE_FAST)
