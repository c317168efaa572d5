"""The frozen base: resolving its weights and building it (which bases exist: ``backbones``).

``--weights imagenet`` (the default for users who are online) uses Keras's own download and
cache; a path uses a local weights file. Either way the file's sha256 becomes part of every
cache's identity, so caches built from different weights never mix.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import BottlecacheError, reason
from ..core.fingerprint import sha256_file
from ..core.options import DEFAULT_IMAGE_SIZE, check_image_size
from ..core.registry import DEFAULT_MODEL, Backbone, check_model_size, get_backbone
from ..core.tf import import_keras, import_tf

_SHA_MEMO: dict[tuple, str] = {}


@dataclass(frozen=True)
class WeightsRef:
    """A resolved weights file: what the user asked for, where it is, and its sha256."""

    spec: str  # "imagenet" or the path as given
    path: str
    sha256: str
    model: str = DEFAULT_MODEL  # the registry entry these weights are for (bottlecache.core.registry)

    @property
    def backbone(self) -> Backbone:
        return get_backbone(self.model)


def imagenet_weights_name(image_size: int, model: str = DEFAULT_MODEL) -> str:
    return get_backbone(model).imagenet_file(image_size)[0]


def _describe(entry: Backbone) -> str:
    """How a weights file for ``entry`` is named in messages: 'a Keras Xception (no top) weights file'."""
    alpha = f"alpha {entry.alpha}, " if entry.alpha is not None else ""
    return f"a Keras {entry.constructor} ({alpha}no top) weights file"


def _sha256_memo(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA_MEMO:
        _SHA_MEMO[key] = sha256_file(path)
    return _SHA_MEMO[key]


def resolve_weights(weights: str | os.PathLike | None = None, image_size: int = DEFAULT_IMAGE_SIZE,
                    model: str = DEFAULT_MODEL) -> WeightsRef:
    """``weights`` or ``$BOTTLECACHE_WEIGHTS`` or ``"imagenet"`` → a local file for ``model`` and its sha256.

    Raises
    ------
    BottlecacheError
        The path does not exist, or ``imagenet`` is not cached and cannot be downloaded.
    """
    check_image_size(image_size)
    entry = check_model_size(model, image_size)
    spec = str(weights) if weights is not None else os.environ.get("BOTTLECACHE_WEIGHTS") or "imagenet"
    if spec == "imagenet":
        name, url = entry.imagenet_file(image_size)
        keras_home = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))
        cached = keras_home / "models" / name
        if not cached.is_file():
            keras = import_keras()
            chatter = io.StringIO()  # Keras prints its download progress to stdout: keep stdout for --json
            try:
                with contextlib.redirect_stdout(chatter):
                    cached = Path(keras.utils.get_file(name, url, cache_subdir="models",
                                                       cache_dir=str(keras_home)))
                sys.stderr.write(chatter.getvalue())
            except Exception:
                raise BottlecacheError(
                    f"Could not download the ImageNet weights of {entry.constructor} ({name}; no internet?): "
                    "pass --weights PATH to a local weights file, or set BOTTLECACHE_WEIGHTS to one."
                ) from None
        return WeightsRef("imagenet", str(cached), _sha256_memo(cached), model)
    path = Path(spec).expanduser()
    if not path.is_file():
        what = "is empty" if not spec.strip() else "is a folder" if path.is_dir() else "does not exist"
        raise BottlecacheError(f"The 'weights' option must be 'imagenet' or a weights file. Got {spec!r}, which {what}.")
    import h5py

    try:
        is_hdf5 = h5py.is_hdf5(path)
        digest = _sha256_memo(path)
    except OSError as error:
        raise BottlecacheError(f"The 'weights' file {spec!r} cannot be read ({reason(error)}).") from None
    if not is_hdf5:
        kind = "a .keras model archive" if path.suffix == ".keras" else "not an HDF5 file"
        raise BottlecacheError(
            f"The 'weights' file {spec!r} is {kind}; pass {_describe(entry)} (.weights.h5 or .h5) or 'imagenet'."
        )
    return WeightsRef(spec, str(path.resolve()), digest, model)


# Frozen bases already built in this process, by (weights file, sha256, model, size), the newest
# last: building one costs seconds (MobileNetV2: 1.5 s; DenseNet121: 4 s), and a session that builds,
# predicts and exports (a notebook, a sweep, the test suite) needs the same one again and again.
_LOADED: OrderedDict = OrderedDict()
_TRACED: dict = {}  # id of a shared base → its traced inference call (a trace costs about a second)
LOADED_KEPT = 2


def load_backbone(weights: WeightsRef, image_size: int, *, fresh: bool = False):
    """The base of ``weights.model`` (``include_top=False``) with the given weights, frozen.

    For inference the base is shared: the same model object for the same file, model and size (the
    last ``LOADED_KEPT`` kept), so never change it. ``fresh``: a model of its own, for training
    (fine-tuning makes layers trainable and changes their weights)."""
    key = (weights.path, weights.sha256, weights.model, image_size)
    if not fresh and key in _LOADED:
        _LOADED.move_to_end(key)
        return _LOADED[key]
    model = _build_backbone(weights, image_size)
    if not fresh:
        _LOADED[key] = model
        while len(_LOADED) > LOADED_KEPT:
            _TRACED.pop(id(_LOADED.popitem(last=False)[1]), None)
    return model


def forget_loaded_backbones() -> None:
    """Drop the shared bases: the next load builds its base as a fresh process would (the benchmark
    suite does this before each case, so that no case's start-up is another case's)."""
    _LOADED.clear()
    _TRACED.clear()


def inference_call(model):
    """``model(images, training=False)`` traced as one function (any batch size); a shared base's
    is traced once per process, not once per build."""
    tf = import_tf()
    shared = any(model is loaded for loaded in _LOADED.values())
    if shared and id(model) in _TRACED:
        return _TRACED[id(model)]
    call = tf.function(lambda images: model(images, training=False), reduce_retracing=True)
    if shared:
        _TRACED[id(model)] = call
    return call


def _build_backbone(weights: WeightsRef, image_size: int):
    keras = import_keras()
    entry = weights.backbone
    chatter = io.StringIO()  # Keras warns at length about a file that does not fit: the one line below says it
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            warnings.simplefilter("ignore")
            model = getattr(keras.applications, entry.constructor)(
                input_shape=(image_size, image_size, 3), include_top=False, weights=weights.path, **entry.kwargs
            )
    except Exception as error:
        raise BottlecacheError(
            f"The 'weights' file {weights.spec!r} could not be loaded into {entry.constructor} ({reason(error)}); "
            f"pass 'imagenet' or {_describe(entry)}."
        ) from None
    model.trainable = False
    return model


def backbone_record(weights: WeightsRef, image_size: int) -> dict:
    """What identifies a backbone in caches, heads and models (the preprocessing included)."""
    return {**weights.backbone.record(), "image_size": image_size, "weights_sha256": weights.sha256}
