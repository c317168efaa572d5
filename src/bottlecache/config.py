"""Allowed values and boundary checks shared by the library and the command line.

Messages follow one form: what was expected, what was received, and (where useful) what to do.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import BottlecacheError

MODEL_NAME = "mobilenet_v2"
ALPHA = 1.0
# The input sizes Keras ships ImageNet checkpoints for (the bottleneck is ceil(size / 32) square).
IMAGE_SIZES = (96, 128, 160, 192, 224)
DTYPES = ("float16", "float32")
ENGINES = ("auto", "keras", "litert")
DEFAULT_DATA = "cats_vs_dogs"
DEFAULT_IMAGE_SIZE = 160
DEFAULT_CACHE_DIR = "cache"
N_CHANNELS = 1280


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), which may be fewer than the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def bottleneck_shape(image_size: int) -> tuple[int, int, int]:
    side = -(-image_size // 32)
    return (side, side, N_CHANNELS)


def check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        choices = ", ".join(str(a) for a in allowed)
        raise BottlecacheError(f"The '{name}' option must be one of {choices}. Got {value!r} instead.")


def check_image_size(image_size) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int):
        raise BottlecacheError(
            f"The 'image_size' option must be an integer, one of {', '.join(map(str, IMAGE_SIZES))}. "
            f"Got {image_size!r} instead."
        )
    check_choice("image_size", image_size, IMAGE_SIZES)
    return image_size


def check_positive(name: str, value, kind=int):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise BottlecacheError(f"The '{name}' option must be a positive {kind.__name__}. Got {value!r} instead.")
    if not value > 0:
        raise BottlecacheError(f"The '{name}' option must be positive. Got {value!r} instead.")
    return value


def check_fraction(name: str, value, *, inclusive_one: bool = False) -> float:
    ok = isinstance(value, (int, float)) and 0 <= value < 1 or (inclusive_one and value == 1)
    if not ok:
        upper = "1]" if inclusive_one else "1)"
        raise BottlecacheError(f"The '{name}' option must be in [0, {upper}. Got {value!r} instead.")
    return float(value)


def resolve_cache_dir(cache_dir=None) -> Path:
    """``cache_dir``, else ``$BOTTLECACHE_CACHE_DIR``, else ``./cache``."""
    chosen = cache_dir or os.environ.get("BOTTLECACHE_CACHE_DIR") or DEFAULT_CACHE_DIR
    path = Path(chosen).expanduser()
    if path.exists() and not path.is_dir():
        raise BottlecacheError(f"The 'cache_dir' option must be a folder. Got the file {str(path)!r} instead.")
    return path
