"""The settings that define a cache, validated once, and the same settings resolved (source and
weights opened, configuration fingerprinted): what every build path takes."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import BottlecacheError
from ..core.fingerprint import fingerprint
from ..core.options import (
    DEFAULT_CALIBRATION_IMAGES,
    DEFAULT_DATA,
    DEFAULT_DTYPE,
    DEFAULT_ENGINE,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_MODEL,
    DEFAULT_PRECISION,
    DTYPES,
    ENGINES,
    MAX_BATCH_SIZE,
    MAX_CALIBRATION_IMAGES,
    MAX_VIEWS,
    PRECISIONS,
    TTAS,
    check_choice,
    check_folder_option,
    check_image_size,
    check_positive,
    check_range,
    check_seed,
    resolve_cache_dir,
)
from ..core.records import DECODE_FAST, DECODE_FULL
from ..core.registry import BACKBONES, check_model_size, resolve_image_size
from ..data.augment import canonical_spec
from ..data.calibration import CalibrationSample, calibration_images, calibration_sample
from ..data.sources import open_source, parse_splits, split_config
from ..models.backbone import backbone_record, resolve_weights
from ..models.cut import check_cut, cut_record
from ..models.engines import Int8Calibration
from .store import cache_file_name

EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class CacheSettings:
    """What defines a cache, validated once on creation and passed down unchanged.

    ``data`` (a folder, ``tfds:NAME`` or a tfds name), ``splits`` (specs such as
    ``"validation=train[80%:90%]"``; None: the source's own), the backbone (``model``, a name of
    ``bottlecache.core.registry.BACKBONES``), its ``image_size`` (``"native"``: the base's own) and
    ``weights`` (``"imagenet"``, a weights file, or None: ``$BOTTLECACHE_WEIGHTS`` or imagenet),
    the storage ``dtype``, ``fast_decode``, and where it lives (``cache_dir``). ``cut``: a
    fine-tune layer index; the cache then holds the activation at the cut below it instead of
    the bottleneck (``bottlecache.models.cut``). ``views`` augmented views of each train image, made by
    ``augment`` (a spec, ``bottlecache.data.augment``; default ``tutorial``) seeded by the image's key,
    the view's index and ``view_seed``. ``tta`` ``flip``: every split but train also holds the
    features of each image's mirror (as one view per row), for test-time flips. ``precision``
    ``float32`` or ``int8``: the base quantised to full integer, calibrated on ``calibration_images`` of the images being cached (default
    64; ``bottlecache.data.calibration`` says which), run by LiteRT. Settings that do not change a
    cache's content (engine, batch size) are not here.

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
    precision: str = DEFAULT_PRECISION
    calibration_images: int | None = None
    tta: str = "none"

    def __post_init__(self):
        set_ = object.__setattr__
        if not isinstance(self.data, (str, os.PathLike)) or not str(self.data).strip():
            raise BottlecacheError(f"The 'data' option must be a folder or a tfds name. Got {self.data!r} instead.")
        set_(self, "data", str(self.data))
        if self.splits is not None:
            if isinstance(self.splits, str):
                set_(self, "splits", (self.splits,))

            parse_splits(self.splits)  # raises on a malformed or repeated spec
            set_(self, "splits", tuple(str(s) for s in self.splits))
        set_(self, "image_size", resolve_image_size(self.model, self.image_size))  # "native": the base's own
        check_image_size(self.image_size)

        check_model_size(self.model, self.image_size)
        check_choice("dtype", self.dtype, DTYPES)
        if self.weights is not None:
            set_(self, "weights", str(self.weights))
        if self.tfds_data_dir is not None:
            set_(self, "tfds_data_dir", str(check_folder_option("tfds_data_dir", self.tfds_data_dir)))
        set_(self, "fast_decode", bool(self.fast_decode))
        set_(self, "cache_dir", resolve_cache_dir(self.cache_dir))
        if self.cut is not None:
            check_cut(self.cut, self.model)
        check_range("views", self.views, 0, MAX_VIEWS, high_open=False)
        check_seed(self.view_seed)

        augment = canonical_spec(self.augment if self.augment is not None else "tutorial")  # a bad spec first
        if self.augment is not None and not self.views:
            raise BottlecacheError("The 'augment' option needs --views K (K augmented views of each train image).")
        set_(self, "augment", augment if self.views else None)
        self._check_precision()
        check_choice("tta", self.tta, TTAS)
        if self.tta != "none" and self.cut is not None:
            raise BottlecacheError("The 'tta' option caches the mirrored bottleneck for heads; a --cut cache is for "
                                   "fine-tuning (leave out --tta or --cut).")

    def _check_precision(self) -> None:
        check_choice("precision", self.precision, PRECISIONS)
        if self.precision != "int8":
            if self.calibration_images is not None:
                raise BottlecacheError("The 'calibration_images' option applies to --precision int8 only.")
            return
        if self.calibration_images is None:
            object.__setattr__(self, "calibration_images", DEFAULT_CALIBRATION_IMAGES)
        check_positive("calibration_images", self.calibration_images, maximum=MAX_CALIBRATION_IMAGES)
        if self.cut is not None:
            raise BottlecacheError("The 'precision' option int8 quantises the whole base; a --cut cache is float32 "
                                   "(leave out --precision or --cut).")
        entry = BACKBONES[self.model]
        if not entry.litert:
            raise BottlecacheError(f"The 'precision' option int8 runs on LiteRT, which does not run {self.model} "
                                   f"({entry.keras_only_reason}); use --precision float32.")

    def resolve(self) -> "ResolvedCache":
        """Open the source and the weights, and compute the configuration and its fingerprint."""

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
            config["cut"] = cut_record(self.image_size, self.cut, self.model)  # the layer's name: --cut 99 and 100 share
        if self.views:
            config["views"] = {"k": self.views, "augment": self.augment, "seed": self.view_seed}
        calibration = None
        if self.precision == "int8":  # float32 caches have no "precision": their fingerprints stay as they were
            calibration = calibration_sample(source, self.calibration_images)
            config["precision"] = {"kind": "int8", "calibration": calibration.record()}
        if self.tta != "none":  # caches without it keep their fingerprints
            config["tta"] = self.tta
        return ResolvedCache(self, source, weights, config, fingerprint(config), calibration)


@dataclass(frozen=True)
class ResolvedCache:
    """A ``CacheSettings`` resolved: the opened source, the weights file, config and fingerprint."""

    settings: CacheSettings
    source: object = field(repr=False)
    weights: object
    config: dict = field(repr=False)
    fingerprint: str
    calibration: CalibrationSample | None = None  # an int8 cache's calibration sample

    def locations(self) -> dict:
        """Where the data and the weights were found (not part of the fingerprint; the cache's
        ``build`` record keeps them so that heads and exports need neither option again)."""
        data = Path(self.settings.data).expanduser()
        return {
            "data": {"given": self.settings.data, "path": str(data.resolve()) if data.is_dir() else None,
                     "tfds_data_dir": self.settings.tfds_data_dir},
            "weights_path": str(Path(self.weights.path).resolve()),
        }

    def int8(self) -> Int8Calibration | None:
        """An int8 cache's calibration, as the engine takes it (its images decoded when first asked
        for, as the cache's rows are); None for a float32 cache."""
        sample, settings = self.calibration, self.settings
        if sample is None:
            return None
        # the flatbuffer's name: the sample's content and how its images became the base's input
        inputs = {"content_sha256": sample.content_sha256, "decode": self.config["decode"],
                  "preprocess": self.config.get("preprocess"), "preprocess_version": self.config["preprocess_version"]}
        return Int8Calibration(fingerprint(inputs), lambda: calibration_images(
            self.source, sample, settings.image_size, fast_decode=settings.fast_decode, model=settings.model))

    @property
    def path(self) -> Path:
        return self.settings.cache_dir / cache_file_name(
            self.source.name, self.config["model"], self.settings.image_size, self.fingerprint
        )


@dataclass(frozen=True)
class BuildOptions:
    """How a cache is built, checked once on creation: none of it changes the cache's content, so
    none of it is in the fingerprint.

    ``engine`` runs the base (docs/engines.md) ``batch_size`` images at a time (None: the engine's
    best); ``wait`` for another process building the same cache, or stop; ``reuse`` the rows an
    earlier cache holds (docs/cache-format.md); ``executor`` ``local`` or ``ray``, with the Ray
    cluster's ``ray_address`` and the ``shard_size`` in rows (docs/scaling-out.md).
    """

    engine: str = DEFAULT_ENGINE
    batch_size: int | None = None
    wait: bool = True
    reuse: bool = True
    executor: str = "local"
    ray_address: str | None = None
    shard_size: int | None = None

    def __post_init__(self):
        check_choice("engine", self.engine, ENGINES)
        if self.batch_size is not None:
            check_positive("batch_size", self.batch_size, maximum=MAX_BATCH_SIZE)
        check_choice("executor", self.executor, EXECUTORS)
        if self.executor != "ray":
            for name in ("ray_address", "shard_size"):
                if getattr(self, name) is not None:
                    raise BottlecacheError(f"The '{name}' option applies to the ray executor only; add --executor ray.")
