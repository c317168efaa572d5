"""Inference engines for the frozen base: Keras (exact) and LiteRT (XNNPACK, converted once).

Before a build writes anything, ``make_engine`` checks the chosen engine against Keras on a
probe batch of the build's own images; a maximum absolute difference above ``MAX_ABS_DIFF``
stops the build. ``auto`` picks LiteRT when it is installed and passes, else Keras.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from ..core.errors import BottlecacheError, reason
from ..core.files import atomic_write_text
from ..core.fingerprint import sha256_file
from ..core.options import DEFAULT_MODEL, usable_cores
from ..core.tf import import_tf, native_logs_silenced
from .backbone import inference_call
from ..data.sources import image_dataset

MAX_ABS_DIFF = 1e-3
PROBE_IMAGES = 8


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


def flatbuffer_path(cache_dir: Path, weights_sha256: str, image_size: int, model: str = DEFAULT_MODEL) -> Path:
    tf = import_tf()
    return Path(cache_dir) / "engines" / f"{model}-{image_size}-{weights_sha256[:12]}-tf{tf.__version__}.tflite"


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


def convert_to_flatbuffer(model, path: Path) -> Path:
    """Convert the Keras base (weights included) once; reuse it while its checksum holds.

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
        flatbuffer = litert_converter(model).convert()
        staged = Path(tmp) / "engine.tflite"
        staged.write_bytes(flatbuffer)
        os.replace(staged, path)
    import hashlib

    atomic_write_text(record, json.dumps({"sha256": hashlib.sha256(flatbuffer).hexdigest(),
                                          "tensorflow": tf.__version__}))
    return path


def _record(path: Path) -> dict | None:
    """The flatbuffer's record if it still describes the file beside it (same sha256), else None."""
    record = Path(path).with_suffix(".json")
    try:
        data = json.loads(record.read_text())
        return data if path.is_file() and data["sha256"] == sha256_file(path) else None
    except (ValueError, KeyError, TypeError, OSError):
        return None


def record_check(path: Path, max_abs_diff: float, n_images: int) -> None:
    """Keep the probe check's result beside the flatbuffer it checked."""
    data = _record(path)
    if data is not None:
        data["check"] = {"max_abs_diff": max_abs_diff, "images": n_images, "litert": _litert_version()}
        atomic_write_text(Path(path).with_suffix(".json"), json.dumps(data))


def checked_engine(name: str, weights, image_size: int, *, cache_dir) -> "LiteRTEngine | None":
    """The LiteRT engine, ready, when an earlier build converted and checked this very flatbuffer.

    A flatbuffer is named by image size, weights sha256 and TensorFlow version and carries its
    own sha256; when its record also holds a passed probe check (from the same LiteRT version),
    checking it again would only repeat that result. The build then needs neither the Keras base
    nor a probe batch: it starts on the first image seconds sooner (docs/engines.md).
    """
    if name not in ("auto", "litert") or not weights.backbone.litert or not litert_available():
        return None
    path = flatbuffer_path(cache_dir, weights.sha256, image_size, weights.model)
    check = (_record(path) or {}).get("check")
    if not isinstance(check, dict) or check.get("litert") != _litert_version():
        return None
    diff = check.get("max_abs_diff")
    if not isinstance(diff, (int, float)) or not diff <= MAX_ABS_DIFF:
        return None
    engine = LiteRTEngine(path)
    engine.max_abs_diff = float(diff)
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
        self.checked = ""  # "probe": checked against Keras in this build; "recorded": by the build that converted it


def probe_images(source, split: str, image_size: int, n: int = PROBE_IMAGES, model: str = DEFAULT_MODEL) -> np.ndarray:
    images = [x for _, _, _, x in image_dataset(source, split, image_size, model=model).take(n).as_numpy_iterator()]
    if not images:
        raise BottlecacheError(f"No image of the split {split!r} decodes; nothing to build.")
    return np.stack(images)


def make_engine(name: str, model, weights, image_size: int, *, cache_dir, probe=None, images=None, threads=None):
    """The engine ``name`` (``auto``, ``keras``, ``litert``) for a loaded Keras base.

    ``probe`` is ``(source, split)`` whose first images check the engine against Keras (or pass
    ``images`` directly). The measured difference is kept as ``engine.max_abs_diff``. ``threads``:
    LiteRT's threads (default: the usable cores; Keras's are TensorFlow's, set before it starts). A base the
    registry marks Keras-only (``bottlecache.core.registry``) gets Keras under ``auto``, and an error
    naming the reason under ``litert``.
    """
    keras_engine = KerasEngine(model)
    entry = weights.backbone
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
