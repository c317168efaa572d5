"""Allowed values and boundary checks shared by the library and the command line.

Messages follow one form: what was expected, what was received, and (where useful) what to do.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path

from .errors import BottlecacheError

# The input sizes every registered base accepts (Keras ships MobileNetV2's ImageNet checkpoints for each).
IMAGE_SIZES = (96, 128, 160, 192, 224)
# A base's native size (the one it was trained at) beyond those: EfficientNet B1-B3 240, 260, 300;
# Xception 299 (bottlecache.core.registry: each base's ``native_size``). `--image-size native` picks it.
NATIVE_ONLY_SIZES = (240, 260, 299, 300)
ALL_IMAGE_SIZES = IMAGE_SIZES + NATIVE_ONLY_SIZES
NATIVE = "native"
DTYPES = ("float16", "float32")
ENGINES = ("auto", "keras", "litert")
# What the base computes in: float32 (Keras or its exact LiteRT copy), or int8 (a LiteRT copy
# quantised to full integer, calibrated on a sample of the cached images: docs/engines.md, "int8")
PRECISIONS = ("float32", "int8")
DEFAULT_PRECISION = "float32"
# Test-time augmentation: "flip", the mean of the logits of the image and its mirror (for a head on
# pooled features, the head on the mean of the two images' features: the head is linear after pooling)
TTAS = ("none", "flip")
DEFAULT_CALIBRATION_IMAGES = 64  # 64 and 256 gave the same head accuracy and feature error (docs/engines.md)
MAX_CALIBRATION_IMAGES = 4096
DEFAULT_DATA = "cats_vs_dogs"
DEFAULT_IMAGE_SIZE = 160
DEFAULT_DTYPE = "float16"
DEFAULT_ENGINE = "auto"
DEFAULT_CACHE_DIR = "cache"
DEFAULT_MODEL = "mobilenet_v2"  # a key of the registry (bottlecache.core.registry.BACKBONES)
SEED_LIMIT = 2**32  # numpy's and Keras's seeds lie in [0, 2**32)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), which may be fewer than the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        choices = ", ".join(str(a) for a in allowed)
        raise BottlecacheError(f"The '{name}' option must be one of {choices}. Got {value!r} instead.")


def check_image_size(image_size) -> int:
    """One of the sizes some base accepts (``check_model_size`` then checks the base's own)."""
    allowed = f"one of {', '.join(map(str, IMAGE_SIZES))}, a base's native size ({', '.join(map(str, NATIVE_ONLY_SIZES))})"
    if isinstance(image_size, bool) or not isinstance(image_size, int):
        raise BottlecacheError(f"The 'image_size' option must be an integer, {allowed}, or {NATIVE}. "
                               f"Got {image_size!r} instead.")
    if image_size not in ALL_IMAGE_SIZES:
        raise BottlecacheError(f"The 'image_size' option must be {allowed}, or {NATIVE}. Got {image_size!r} instead.")
    return image_size


def parse_image_size(text):
    """A command line's ``--image-size``: ``native`` as it is, else an integer (checked later)."""
    if isinstance(text, str):
        text = text.strip()
        if text == NATIVE:
            return NATIVE
        try:
            return int(text)
        except ValueError:
            raise BottlecacheError(f"The 'image_size' option must be an integer or {NATIVE}. Got {text!r} instead.") from None
    return text


def _number(name: str, value, kind):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        what = "an integer" if kind is int else "a number"
        raise BottlecacheError(f"The '{name}' option must be {what}. Got {value!r} instead.")
    if not math.isfinite(value):
        raise BottlecacheError(f"The '{name}' option must be a finite number. Got {value!r} instead.")
    return value


def check_positive(name: str, value, kind=int, *, maximum=None):
    """A positive (finite) int or float, at most ``maximum`` if given."""
    _number(name, value, kind)
    if not value > 0:
        raise BottlecacheError(f"The '{name}' option must be positive. Got {value!r} instead.")
    if maximum is not None and value > maximum:
        raise BottlecacheError(f"The '{name}' option must be at most {maximum:g}. Got {value!r} instead.")
    return value


def check_range(name: str, value, low, high, kind=int, *, high_open: bool = True):
    """``low <= value < high`` (or ``<= high`` with ``high_open=False``)."""
    _number(name, value, kind)
    if not (low <= value and (value < high if high_open else value <= high)):
        upper = ")" if high_open else "]"
        raise BottlecacheError(f"The '{name}' option must be in [{low:g}, {high:g}{upper}. Got {value!r} instead.")
    return value


_SIZE = re.compile(r"^(\d+(?:\.\d+)?)([kmgt]?)(?:i?b)?$", re.IGNORECASE)
MAX_MEMORY = 1 << 50  # a pebibyte: more than any machine here, less than a float's rounding


def parse_size(name: str, value) -> int:
    """A memory size: bytes as an int, or text such as ``16M``, ``2G``, ``512k``, ``1.5GiB`` (powers of 1024)."""
    if isinstance(value, bool):
        raise BottlecacheError(f"The '{name}' option must be a size such as 16M or 2G. Got {value!r} instead.")
    if isinstance(value, (int, float)):
        return int(check_positive(name, value, type(value), maximum=MAX_MEMORY))
    match = _SIZE.match(str(value).strip()) if isinstance(value, str) else None
    if not match:
        raise BottlecacheError(f"The '{name}' option must be a size such as 16M or 2G. Got {value!r} instead.")
    number = float(match.group(1)) * 1024 ** "_kmgt".index(match.group(2).lower() or "_")
    if not 1 <= number <= MAX_MEMORY:
        raise BottlecacheError(f"The '{name}' option must be between 1 byte and 1P. Got {value!r} instead.")
    return int(number)


def check_seed(seed) -> int:
    return check_range("seed", seed, 0, SEED_LIMIT)


def check_fraction(name: str, value, *, inclusive_one: bool = False) -> float:
    return float(check_range(name, value, 0, 1, float, high_open=not inclusive_one))


def check_folder_option(name: str, folder) -> Path:
    """A folder option: an existing folder, or a path where one can be made (not a file, not below a
    file, not a dangling link)."""
    if isinstance(folder, str) and not folder.strip():  # Path("") would be ".", the current folder
        raise BottlecacheError(f"The '{name}' option must be a folder. Got an empty value.")
    path = Path(folder).expanduser()
    if path.is_symlink() and not path.exists():
        raise BottlecacheError(f"The '{name}' option must be a folder. Got {str(path)!r}, a link to nothing.")
    if path.exists() and not path.is_dir():
        raise BottlecacheError(f"The '{name}' option must be a folder. Got the file {str(path)!r} instead.")
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise BottlecacheError(
                    f"The '{name}' option must be a folder. Got {str(path)!r}, below the file {str(parent)!r}."
                )
            break
    return path


def resolve_cache_dir(cache_dir=None) -> Path:
    """``cache_dir``, else ``$BOTTLECACHE_CACHE_DIR``, else ``./cache``."""
    chosen = cache_dir or os.environ.get("BOTTLECACHE_CACHE_DIR") or DEFAULT_CACHE_DIR
    return check_folder_option("cache_dir", chosen)


MAX_BATCH_SIZE = 65536
MAX_EPOCHS = 100_000
MAX_VIEWS = 64


def given_fields(overrides: dict, **values) -> dict:
    """``overrides`` and each of ``values`` that is not None: the arguments a function takes by
    position (``data``, ``splits``) that are also fields of its settings."""
    return overrides | {name: value for name, value in values.items() if value is not None}


def settings_with(function: str, given: dict, overrides: dict, aliases: dict | None = None) -> list:
    """The settings objects ``function`` runs with: each of ``given`` (settings class → an instance
    or None), with the keyword ``overrides`` that name its fields applied (``dataclasses.replace``,
    so every check runs again), or made from them. ``aliases`` maps a keyword to its field's name.

    A keyword no class has is a TypeError, as Python says it for any function."""
    aliases = aliases or {}
    owners = {f.name: cls for cls in given for f in dataclasses.fields(cls)}
    picked = {cls: {} for cls in given}
    for cls, obj in given.items():
        if obj is not None and not isinstance(obj, cls):
            raise TypeError(f"{function}() takes a {cls.__name__} there, not {type(obj).__name__}")
    for key, value in overrides.items():
        name = aliases.get(key, key)
        if name not in owners:
            allowed = ", ".join(sorted(set(owners) - set(aliases.values()) | set(aliases)))
            raise TypeError(f"{function}() got an unexpected keyword argument {key!r}; its settings are: {allowed}")
        picked[owners[name]][name] = value
    return [dataclasses.replace(obj, **picked[cls]) if obj is not None and picked[cls] else
            obj if obj is not None else cls(**picked[cls]) for cls, obj in given.items()]
