"""Allowed values and boundary checks shared by the library and the command line.

Messages follow one form: what was expected, what was received, and (where useful) what to do.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BottlecacheError

# The input sizes every registered base accepts (Keras ships MobileNetV2's ImageNet checkpoints for each).
IMAGE_SIZES = (96, 128, 160, 192, 224)
DTYPES = ("float16", "float32")
ENGINES = ("auto", "keras", "litert")
DEFAULT_DATA = "cats_vs_dogs"
DEFAULT_IMAGE_SIZE = 160
DEFAULT_DTYPE = "float16"
DEFAULT_ENGINE = "auto"
DEFAULT_CACHE_DIR = "cache"
DEFAULT_MODEL = "mobilenet_v2"  # a key of bottlecache.backbones.BACKBONES (its layer counts, cuts, shapes)
SEED_LIMIT = 2**32  # numpy's and Keras's seeds lie in [0, 2**32)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), which may be fewer than the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def bottleneck_shape(image_size: int, model: str = DEFAULT_MODEL) -> tuple[int, int, int]:
    """The features' shape per image: the registry entry ``model``'s (bottlecache.backbones)."""
    from .backbones import bottleneck_shape as shape_of

    return shape_of(image_size, model)


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


def check_seed(seed) -> int:
    return check_range("seed", seed, 0, SEED_LIMIT)


def check_fraction(name: str, value, *, inclusive_one: bool = False) -> float:
    return float(check_range(name, value, 0, 1, float, high_open=not inclusive_one))


def check_folder_option(name: str, folder) -> Path:
    """A folder option: an existing folder, or a path where one can be made (not a file, not below a
    file, not a dangling link)."""
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


@dataclass(frozen=True)
class CacheSettings:
    """What defines a cache, validated once on creation and passed down unchanged.

    ``data`` (a folder, ``tfds:NAME`` or a tfds name), ``splits`` (specs such as
    ``"validation=train[80%:90%]"``; None: the source's own), the backbone (``model``, a name of
    ``bottlecache.backbones.BACKBONES``), its ``image_size`` and
    ``weights`` (``"imagenet"``, a weights file, or None: ``$BOTTLECACHE_WEIGHTS`` or imagenet),
    the storage ``dtype``, ``fast_decode``, and where it lives (``cache_dir``). ``cut``: a
    fine-tune layer index; the cache then holds the activation at the cut below it instead of
    the bottleneck (``bottlecache.cut``). ``views`` augmented views of each train image, made by
    ``augment`` (a spec, ``bottlecache.augment``; default ``tutorial``) seeded by the image's key,
    the view's index and ``view_seed``. Settings that do not change a cache's content (engine,
    batch size) are not here.

    ``resolve()`` opens the source and the weights once; everything downstream takes the result.
    """

    data: str = DEFAULT_DATA
    splits: tuple[str, ...] | None = None
    image_size: int = DEFAULT_IMAGE_SIZE
    weights: str | None = None
    dtype: str = DEFAULT_DTYPE
    fast_decode: bool = False
    tfds_data_dir: str | None = None
    cache_dir: Path = field(default=None)  # type: ignore[assignment]
    model: str = DEFAULT_MODEL
    cut: int | None = None
    views: int = 0
    augment: str | None = None
    view_seed: int = 0

    def __post_init__(self):
        set_ = object.__setattr__
        if not isinstance(self.data, (str, os.PathLike)) or not str(self.data).strip():
            raise BottlecacheError(f"The 'data' option must be a folder or a tfds name. Got {self.data!r} instead.")
        set_(self, "data", str(self.data))
        if self.splits is not None:
            if isinstance(self.splits, str):
                set_(self, "splits", (self.splits,))
            from .data import parse_splits

            parse_splits(self.splits)  # raises on a malformed or repeated spec
            set_(self, "splits", tuple(str(s) for s in self.splits))
        check_image_size(self.image_size)
        from .backbones import check_model_size

        check_model_size(self.model, self.image_size)
        check_choice("dtype", self.dtype, DTYPES)
        if self.weights is not None:
            set_(self, "weights", str(self.weights))
        if self.tfds_data_dir is not None:
            set_(self, "tfds_data_dir", str(check_folder_option("tfds_data_dir", self.tfds_data_dir)))
        set_(self, "fast_decode", bool(self.fast_decode))
        set_(self, "cache_dir", resolve_cache_dir(self.cache_dir))
        if self.cut is not None:
            from .cut import check_cut

            check_cut(self.cut, self.model)
        check_range("views", self.views, 0, MAX_VIEWS, high_open=False)
        check_seed(self.view_seed)
        from .augment import canonical_spec

        augment = canonical_spec(self.augment if self.augment is not None else "tutorial")  # a bad spec first
        if self.augment is not None and not self.views:
            raise BottlecacheError("The 'augment' option needs --views K (K augmented views of each train image).")
        set_(self, "augment", augment if self.views else None)

    def resolve(self) -> "ResolvedCache":
        """Open the source and the weights, and compute the configuration and its fingerprint."""
        from .backbone import backbone_record, resolve_weights
        from .data import open_source, split_config
        from .fingerprint import fingerprint
        from .records import DECODE_FAST, DECODE_FULL

        source = open_source(self.data, self.splits, tfds_data_dir=self.tfds_data_dir)
        weights = resolve_weights(self.weights, self.image_size, self.model)
        config = {
            "decode": DECODE_FAST if self.fast_decode else DECODE_FULL,
            "data": source.identity,
            "splits": split_config(source),
            "class_names": source.class_names,
            **backbone_record(weights, self.image_size),  # the model, its preprocessing's name and version
            "dtype": self.dtype,
        }
        if self.cut is not None:
            from .cut import cut_record

            config["cut"] = cut_record(self.image_size, self.cut, self.model)  # the layer's name: --cut 99 and 100 share
        if self.views:
            config["views"] = {"k": self.views, "augment": self.augment, "seed": self.view_seed}
        return ResolvedCache(self, source, weights, config, fingerprint(config))


@dataclass(frozen=True)
class ResolvedCache:
    """A ``CacheSettings`` resolved: the opened source, the weights file, config and fingerprint."""

    settings: CacheSettings
    source: object = field(repr=False)
    weights: object
    config: dict = field(repr=False)
    fingerprint: str

    @property
    def path(self) -> Path:
        from .store import cache_file_name

        return self.settings.cache_dir / cache_file_name(
            self.source.name, self.config["model"], self.settings.image_size, self.fingerprint
        )
