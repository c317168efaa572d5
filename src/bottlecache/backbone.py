"""The frozen MobileNetV2 base: resolving its weights and building it.

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
from dataclasses import dataclass
from pathlib import Path

from ._tf import import_keras
from .config import ALPHA, DEFAULT_IMAGE_SIZE, MODEL_NAME, check_image_size
from .errors import BottlecacheError, reason
from .fingerprint import PREPROCESS_VERSION, sha256_file

IMAGENET_BASE_URL = "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/"
_SHA_MEMO: dict[tuple, str] = {}


@dataclass(frozen=True)
class WeightsRef:
    """A resolved weights file: what the user asked for, where it is, and its sha256."""

    spec: str  # "imagenet" or the path as given
    path: str
    sha256: str


def imagenet_weights_name(image_size: int) -> str:
    return f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{ALPHA}_{image_size}_no_top.h5"


def _sha256_memo(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA_MEMO:
        _SHA_MEMO[key] = sha256_file(path)
    return _SHA_MEMO[key]


def resolve_weights(weights: str | os.PathLike | None = None, image_size: int = DEFAULT_IMAGE_SIZE) -> WeightsRef:
    """``weights`` or ``$BOTTLECACHE_WEIGHTS`` or ``"imagenet"`` → a local file and its sha256.

    Raises
    ------
    BottlecacheError
        The path does not exist, or ``imagenet`` is not cached and cannot be downloaded.
    """
    check_image_size(image_size)
    spec = str(weights) if weights is not None else os.environ.get("BOTTLECACHE_WEIGHTS") or "imagenet"
    if spec == "imagenet":
        name = imagenet_weights_name(image_size)
        keras_home = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))
        cached = keras_home / "models" / name
        if not cached.is_file():
            keras = import_keras()
            chatter = io.StringIO()  # Keras prints its download progress to stdout: keep stdout for --json
            try:
                with contextlib.redirect_stdout(chatter):
                    cached = Path(keras.utils.get_file(name, IMAGENET_BASE_URL + name, cache_subdir="models",
                                                       cache_dir=str(keras_home)))
                sys.stderr.write(chatter.getvalue())
            except Exception:
                raise BottlecacheError(
                    "Could not download the ImageNet weights of MobileNetV2 (no internet?): pass "
                    "--weights PATH to a local weights file, or set BOTTLECACHE_WEIGHTS to one."
                ) from None
        return WeightsRef("imagenet", str(cached), _sha256_memo(cached))
    path = Path(spec).expanduser()
    if not path.is_file():
        raise BottlecacheError(
            f"The 'weights' option must be 'imagenet' or a weights file. Got {spec!r}, which "
            f"{'is a folder' if path.is_dir() else 'does not exist'}."
        )
    import h5py

    try:
        is_hdf5 = h5py.is_hdf5(path)
        digest = _sha256_memo(path)
    except OSError as error:
        raise BottlecacheError(f"The 'weights' file {spec!r} cannot be read ({reason(error)}).") from None
    if not is_hdf5:
        kind = "a .keras model archive" if path.suffix == ".keras" else "not an HDF5 file"
        raise BottlecacheError(
            f"The 'weights' file {spec!r} is {kind}; pass a Keras MobileNetV2 (alpha 1.0, no top) "
            "weights file (.weights.h5 or .h5) or 'imagenet'."
        )
    return WeightsRef(spec, str(path.resolve()), digest)


def load_backbone(weights: WeightsRef, image_size: int):
    """The MobileNetV2 base (``include_top=False``) with the given weights, frozen."""
    keras = import_keras()
    chatter = io.StringIO()  # Keras warns at length about a file that does not fit: the one line below says it
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            warnings.simplefilter("ignore")
            model = keras.applications.MobileNetV2(
                input_shape=(image_size, image_size, 3), alpha=ALPHA, include_top=False, weights=weights.path
            )
    except Exception as error:
        raise BottlecacheError(
            f"The 'weights' file {weights.spec!r} could not be loaded into MobileNetV2 ({reason(error)}); "
            "pass 'imagenet' or a Keras MobileNetV2 (alpha 1.0, no top) weights file."
        ) from None
    model.trainable = False
    return model


def backbone_record(weights: WeightsRef, image_size: int) -> dict:
    """What identifies a backbone in caches, heads and models (the preprocessing included)."""
    return {"model": MODEL_NAME, "alpha": ALPHA, "image_size": image_size, "weights_sha256": weights.sha256,
            "preprocess_version": PREPROCESS_VERSION}
