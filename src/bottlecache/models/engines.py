"""Inference engines for the frozen base: Keras (exact), LiteRT (XNNPACK, converted once), and
LiteRT int8 (the base quantised to full integer, calibrated on a sample of the cached images).

Before a build writes anything, ``make_engine`` checks the chosen engine against Keras on a
probe batch of the build's own images; a maximum absolute difference above ``MAX_ABS_DIFF``
stops the build. ``auto`` picks LiteRT when it is installed and passes, else Keras. An int8
engine cannot match Keras to 1e-3 (that is not what it is for): its check is the relative error of
the pooled features, which must stay under ``INT8_MAX_RELATIVE_ERROR``.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.errors import BottlecacheError, reason
from ..core.files import atomic_write_text
from ..core.fingerprint import sha256_file
from ..core.options import DEFAULT_MODEL, usable_cores
from ..core.tf import import_tf, native_logs_silenced
from ..data.sources import image_dataset
from .backbone import inference_call

MAX_ABS_DIFF = 1e-3
PROBE_IMAGES = 8
# The int8 base's pooled features differ from Keras's by about 0.19 of their norm (MobileNetV2,
# 160 px, measured on 1,000 photos; heads trained on them score as the float ones do:
# docs/engines.md, "int8"). A quantisation gone wrong (a range that clips most activations)
# is several times that.
INT8_MAX_RELATIVE_ERROR = 0.5
INT8_ENGINE = "litert-int8"


@dataclass(frozen=True)
class Int8Calibration:
    """What an int8 engine is calibrated on: an identity of the sample's images as the base sees
    them (it names the flatbuffer) and how to get them (called only when the flatbuffer is converted)."""

    identity: str
    images: Callable[[], np.ndarray]


class KerasEngine:
    """Runs the Keras base with ``training=False`` (BatchNorm in inference mode); exact."""

    name = "keras"
    batch_size = 32

    def __init__(self, model):
        self.model = model
        self._call = inference_call(model)
        self.max_abs_diff = 0.0

    def __call__(self, images):
        return self._call(images).numpy()


def litert_available() -> bool:
    try:
        from ai_edge_litert.interpreter import Interpreter  # noqa: F401
    except ImportError:
        return False
    return True


def flatbuffer_path(cache_dir: Path, weights_sha256: str, image_size: int, model: str = DEFAULT_MODEL,
                    calibration: str | None = None) -> Path:
    """Where the base's flatbuffer is kept: named by the base, its size, its weights, the int8
    calibration sample (``calibration``: its content sha256) if quantised, and TensorFlow's version."""
    tf = import_tf()
    int8 = f"-int8-{calibration[:12]}" if calibration else ""
    return Path(cache_dir) / "engines" / f"{model}-{image_size}-{weights_sha256[:12]}{int8}-tf{tf.__version__}.tflite"


def litert_converter(model):
    """A LiteRT converter for the Keras ``model``: its call traced once (any batch size), with the
    model's variables tracked beside it so that the converter folds their values in.

    Not through a SavedModel written to disk and read back: that costs five times as long (12 s
    against 2-4 s for MobileNetV2 at 160 px on 2 cores, measured) for the same flatbuffer (outputs
    equal bit for bit). The flatbuffer keeps a ``serving_default`` signature (input ``inputs``)."""
    tf = import_tf()
    tracked = tf.Module()
    tracked.weights = [getattr(v, "value", v) for v in model.weights]  # Keras variables → their tf.Variable
    spec = tf.TensorSpec((None, *model.input_shape[1:]), model.inputs[0].dtype, name="inputs")
    call = tf.function(lambda inputs: model(inputs, training=False), input_signature=[spec])
    return tf.lite.TFLiteConverter.from_concrete_functions([call.get_concrete_function()], tracked)


def int8_converter(model, calibration_images: np.ndarray):
    """``litert_converter`` quantising every operation to int8 (weights and activations), the
    activations' ranges set by running ``calibration_images`` through the float model. Input and
    output stay float32, so the engine takes and gives what the others do."""
    tf = import_tf()
    converter = litert_converter(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([image[None]] for image in calibration_images)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return converter


def convert_to_flatbuffer(model, path: Path, calibration: Int8Calibration | None = None) -> Path:
    """Convert the Keras base (weights included) once, quantised to int8 with a ``calibration``;
    reuse it while its checksum holds.

    The flatbuffer's sha256 is kept beside it; a file that no longer matches (corrupted,
    truncated) is converted again.
    """
    path = Path(path)
    record = path.with_suffix(".json")
    if _record(path) is not None:
        return path
    tf = import_tf()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        converter = litert_converter(model) if calibration is None else int8_converter(model, calibration.images())
        with native_logs_silenced():  # the quantiser prints its settings on stderr
            flatbuffer = converter.convert()
        staged = Path(tmp) / "engine.tflite"
        staged.write_bytes(flatbuffer)
        os.replace(staged, path)
    import hashlib

    atomic_write_text(record, json.dumps({"sha256": hashlib.sha256(flatbuffer).hexdigest(),
                                          "tensorflow": tf.__version__,
                                          "precision": "float32" if calibration is None else "int8"}))
    return path


def _record(path: Path) -> dict | None:
    """The flatbuffer's record if it still describes the file beside it (same sha256), else None."""
    record = Path(path).with_suffix(".json")
    try:
        data = json.loads(record.read_text())
        return data if path.is_file() and data["sha256"] == sha256_file(path) else None
    except (ValueError, KeyError, TypeError, OSError):
        return None


def record_check(path: Path, max_abs_diff: float, n_images: int, relative_error: float | None = None) -> None:
    """Keep the probe check's result beside the flatbuffer it checked."""
    data = _record(path)
    if data is not None:
        data["check"] = {"max_abs_diff": max_abs_diff, "images": n_images, "litert": _litert_version()}
        if relative_error is not None:
            data["check"]["relative_error"] = relative_error
        atomic_write_text(Path(path).with_suffix(".json"), json.dumps(data))


def checked_engine(name: str, weights, image_size: int, *, cache_dir, int8: Int8Calibration | None = None,
                   threads: int | None = None) -> "LiteRTEngine | None":
    """The LiteRT engine (int8 with a calibration), ready, when an earlier build converted and
    checked this very flatbuffer.

    A flatbuffer is named by image size, weights sha256, calibration and TensorFlow version and
    carries its own sha256; when its record also holds a passed probe check (from the same LiteRT
    version), checking it again would only repeat that result. The build then needs neither the
    Keras base nor a probe batch: it starts on the first image seconds sooner (docs/engines.md).
    """
    if name not in ("auto", "litert") or not weights.backbone.litert or not litert_available():
        return None
    path = flatbuffer_path(cache_dir, weights.sha256, image_size, weights.model,
                           int8.identity if int8 else None)
    check = (_record(path) or {}).get("check")
    if not isinstance(check, dict) or check.get("litert") != _litert_version():
        return None
    diff, error = check.get("max_abs_diff"), check.get("relative_error")
    if not isinstance(diff, (int, float)) or not (int8 is not None or diff <= MAX_ABS_DIFF):
        return None
    if int8 is not None and (not isinstance(error, (int, float)) or not error <= INT8_MAX_RELATIVE_ERROR):
        return None
    engine = (Int8Engine if int8 else LiteRTEngine)(path, threads)
    engine.max_abs_diff = float(diff)
    engine.relative_error = None if error is None else float(error)
    engine.checked = "recorded"
    return engine


def _litert_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ai-edge-litert")
    except PackageNotFoundError:
        return ""


class LiteRTRunner:
    """A flatbuffer in the ai-edge-litert interpreter (XNNPACK kernels), its input resized to each
    batch's shape: what runs the base's flatbuffer in a build and an exported model in ``predict``."""

    def __init__(self, path: Path, threads: int | None = None, advice: str = ""):
        try:
            from ai_edge_litert.interpreter import Interpreter  # optional on some platforms
        except ImportError:
            raise BottlecacheError("Running LiteRT needs the package ai-edge-litert: pip install ai-edge-litert.") from None
        self.threads = threads or usable_cores()
        try:
            self.interpreter = Interpreter(model_path=str(path), num_threads=self.threads)
        except (ValueError, RuntimeError) as error:
            raise BottlecacheError(f"LiteRT could not load {path} ({reason(error)}); {advice}.") from None
        self._input = self.interpreter.get_input_details()[0]
        self._output = self.interpreter.get_output_details()[0]["index"]
        self._shape = None

    def __call__(self, images) -> np.ndarray:
        images = np.ascontiguousarray(images, dtype=self._input["dtype"])
        if self._shape != images.shape:
            self.interpreter.resize_tensor_input(self._input["index"], images.shape, strict=False)
            # the first allocation applies the XNNPACK delegate, which says so on stderr
            with native_logs_silenced() if self._shape is None else contextlib.nullcontext():
                self.interpreter.allocate_tensors()
            self._shape = images.shape
        self.interpreter.set_tensor(self._input["index"], images)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self._output).copy()


class LiteRTEngine(LiteRTRunner):
    """The base as a LiteRT flatbuffer run by the XNNPACK CPU kernels."""

    name = "litert"
    batch_size = 4  # measured: python -m benchmarks.profile_build --engine-grid (docs/engines.md, "Batch size and threads")

    def __init__(self, flatbuffer: Path, threads: int | None = None):
        super().__init__(flatbuffer, threads, "delete it to convert again, or use --engine keras")
        self.max_abs_diff = 0.0
        self.relative_error: float | None = None  # of the pooled features (int8 engines)
        self.checked = ""  # "probe": checked against Keras in this build; "recorded": by the build that converted it


class Int8Engine(LiteRTEngine):
    """The base quantised to full integer (int8 weights and activations, float32 in and out), run by
    XNNPACK's 8-bit kernels."""

    name = INT8_ENGINE
    batch_size = 16  # measured: python -m benchmarks.profile_build --engine-grid --precision int8 (docs/engines.md)


def pooled_relative_error(features: np.ndarray, reference: np.ndarray) -> float:
    """The mean over images of |pooled - reference pooled| / |reference pooled|: how far an int8
    engine's features (what the heads read) are from Keras's."""
    pooled, ref = features.mean(axis=(1, 2)), reference.mean(axis=(1, 2))
    return float(np.mean(np.linalg.norm(pooled - ref, axis=1) / np.maximum(np.linalg.norm(ref, axis=1), 1e-12)))


def probe_images(source, split: str, image_size: int, n: int = PROBE_IMAGES, model: str = DEFAULT_MODEL) -> np.ndarray:
    images = [x for _, _, _, x in image_dataset(source, split, image_size, model=model).take(n).as_numpy_iterator()]
    if not images:
        raise BottlecacheError(f"No image of the split {split!r} decodes; nothing to build.")
    return np.stack(images)


def make_engine(name: str, model, weights, image_size: int, *, cache_dir, probe=None, images=None, threads=None,
                int8: Int8Calibration | None = None):
    """The engine ``name`` (``auto``, ``keras``, ``litert``) for a loaded Keras base; with ``int8``,
    the base quantised to int8 with that calibration (``auto`` or ``litert`` only).

    ``probe`` is ``(source, split)`` whose first images check the engine against Keras (or pass
    ``images`` directly). The measured difference is kept as ``engine.max_abs_diff``. ``threads``:
    LiteRT's threads (default: the usable cores; Keras's are TensorFlow's, set before it starts). A base the
    registry marks Keras-only (``bottlecache.core.registry``) gets Keras under ``auto``, and an error
    naming the reason under ``litert``.
    """
    keras_engine = KerasEngine(model)
    entry = weights.backbone
    if int8 is not None:
        return _int8_engine(name, keras_engine, weights, image_size, cache_dir, probe, images, threads, int8)
    if name == "keras" or (name == "auto" and (not litert_available() or not entry.litert)):
        return keras_engine
    if not entry.litert:
        raise BottlecacheError(
            f"The 'litert' engine does not run {entry.name} ({entry.keras_only_reason}); use --engine keras or auto."
        )
    if not litert_available():
        raise BottlecacheError("The 'litert' engine needs the package ai-edge-litert: pip install ai-edge-litert.")
    path = convert_to_flatbuffer(model, flatbuffer_path(cache_dir, weights.sha256, image_size, entry.name))
    engine = LiteRTEngine(path, threads)
    if images is None:
        images = probe_images(*probe, image_size, model=entry.name)
    diff = float(np.max(np.abs(engine(images) - keras_engine(images))))
    engine.max_abs_diff = diff
    engine.checked = "probe"
    record_check(path, diff, len(images))
    if not diff <= MAX_ABS_DIFF:
        if name == "auto":
            return keras_engine
        raise BottlecacheError(
            f"The litert engine differs from Keras by {diff:.2e} on the probe images (allowed {MAX_ABS_DIFF:g}); "
            "use --engine keras."
        )
    return engine


def _int8_engine(name, keras_engine, weights, image_size, cache_dir, probe, images, threads, int8):
    """``make_engine`` for an int8 cache: convert (once) with the calibration, then check the pooled
    features against Keras's on the probe images."""
    if name == "keras":
        raise BottlecacheError("The 'engine' option keras computes in float32; an int8 cache is built by LiteRT: "
                               "use --engine auto or litert, or --precision float32.")
    if not litert_available():
        raise BottlecacheError("The int8 precision runs on LiteRT and needs the package ai-edge-litert: "
                               "pip install ai-edge-litert.")
    path = convert_to_flatbuffer(keras_engine.model, flatbuffer_path(
        cache_dir, weights.sha256, image_size, weights.backbone.name, int8.identity), int8)
    engine = Int8Engine(path, threads)
    if images is None:
        images = probe_images(*probe, image_size, model=weights.backbone.name)
    features, reference = engine(images), keras_engine(images)
    engine.max_abs_diff = float(np.max(np.abs(features - reference)))
    engine.relative_error = pooled_relative_error(features, reference)
    engine.checked = "probe"
    record_check(path, engine.max_abs_diff, len(images), engine.relative_error)
    if not engine.relative_error <= INT8_MAX_RELATIVE_ERROR:
        raise BottlecacheError(
            f"The int8 engine's pooled features differ from Keras's by {engine.relative_error:.2f} of their norm on "
            f"the probe images (allowed {INT8_MAX_RELATIVE_ERROR:g}): this base does not quantise well; "
            "use --precision float32."
        )
    return engine
