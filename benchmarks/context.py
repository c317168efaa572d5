"""What the cases of one run share: the data, the weights, a fresh work folder, and the things
worth making once (the Keras base, the LiteRT flatbuffer, one cache build per engine).

Every cache is built in its own folder under the run's temporary work folder, so each build is
real (never a hit of an earlier run), and builds with different engines never find each other's
file (the engine is not part of a cache's fingerprint).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from bottlecache.models.backbone import WeightsRef


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far, every thread counted."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Build:
    """One real cache build: its report, the wall seconds of ``build_cache``, and its folder."""

    report: object  # bottlecache.cache.build.BuildReport
    seconds: float
    cache_dir: Path
    cpu_seconds: float = 0.0  # user + system time of this process (every thread) during the build


@dataclass
class Run:
    data: str
    splits: list[str] | None
    weights: WeightsRef
    image_size: int
    epochs: int
    finetune_epochs: int
    seed: int
    engine: str  # of the plain "cache-build" case and of the cached-* cases
    quick: bool
    work_dir: Path
    results: dict = field(default_factory=dict)  # case name → its result, filled in as cases finish
    keras_head_path: Path | None = None  # set by cached-keras; the warm start of finetune
    export_head_path: Path | None = None  # the scikit-learn head every export-* case exports
    flatbuffer_seconds: float | None = None
    int8_flatbuffer_seconds: float | None = None
    _source: object = None
    _base: object = None
    _flatbuffer: Path | None = None
    _int8: tuple | None = None  # (flatbuffer, its calibration's content sha256)
    _builds: dict = field(default_factory=dict)

    def source(self):
        if self._source is None:
            from bottlecache.data.sources import open_source

            self._source = open_source(self.data, self.splits)
        return self._source

    def base(self):
        """The frozen Keras base, loaded once for the forward-limit cases and the conversion."""
        if self._base is None:
            from bottlecache.models.backbone import load_backbone

            self._base = load_backbone(self.weights, self.image_size)
        return self._base

    def flatbuffer(self) -> Path:
        """The LiteRT flatbuffer of the base, converted once per run (its seconds are kept)."""
        if self._flatbuffer is None:
            from bottlecache.models.engines import convert_to_flatbuffer, flatbuffer_path

            started = time.perf_counter()
            path = flatbuffer_path(self.work_dir / "converted", self.weights.sha256, self.image_size, self.weights.model)
            self._flatbuffer = convert_to_flatbuffer(self.base(), path)
            self.flatbuffer_seconds = time.perf_counter() - started
        return self._flatbuffer

    def int8_flatbuffer(self) -> Path:
        """The base quantised to int8, calibrated as ``cache build --precision int8`` calibrates it on
        the run's data (default sample), converted once per run (its seconds are kept)."""
        if self._int8 is None:
            from bottlecache.cache.settings import CacheSettings
            from bottlecache.models.engines import convert_to_flatbuffer, flatbuffer_path

            started = time.perf_counter()
            resolved = CacheSettings(self.data, self.splits and tuple(self.splits), image_size=self.image_size,
                                     weights=self.weights.path, model=self.weights.model, precision="int8",
                                     cache_dir=self.work_dir / "converted").resolve()
            int8 = resolved.int8()
            path = flatbuffer_path(self.work_dir / "converted", self.weights.sha256, self.image_size,
                                   self.weights.model, int8.identity)
            self._int8 = (convert_to_flatbuffer(self.base(), path, int8), int8.identity)
            self.int8_flatbuffer_seconds = time.perf_counter() - started
        return self._int8[0]

    def give_flatbuffer(self, cache_dir: Path, engine: str, precision: str = "float32") -> None:
        """Put the run's converted flatbuffer in ``cache_dir`` (for an engine that may use it)."""
        from bottlecache.models.engines import flatbuffer_path, litert_available

        if engine != "keras" and litert_available():
            converted = self.flatbuffer() if precision == "float32" else self.int8_flatbuffer()
            calibration = None if precision == "float32" else self._int8[1]
            target = flatbuffer_path(cache_dir, self.weights.sha256, self.image_size, self.weights.model, calibration)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(converted, target)
            shutil.copy2(converted.with_suffix(".json"), target.with_suffix(".json"))

    def build(self, engine: str, fast_decode: bool = False, executor: str = "local", shard_size=None,
              precision: str = "float32") -> Build:
        """Build the cache with ``engine`` (and ``precision``) in a fresh folder, once per engine per run.

        The folder is given the run's converted flatbuffer first, as a user's second build would
        find it: the conversion is timed once, in forward-limit-litert(-int8), not in every build.
        """
        key = (engine, fast_decode, executor, precision)
        if key not in self._builds:
            from bottlecache.cache.build import build_cache

            cache_dir = self.work_dir / (f"cache-{engine}{'-fast-decode' if fast_decode else ''}"
                                         f"{'' if executor == 'local' else '-' + executor}"
                                         f"{'' if precision == 'float32' else '-' + precision}")
            self.give_flatbuffer(cache_dir, engine, precision)
            started, cpu_started = time.perf_counter(), cpu_seconds()
            report = build_cache(self.data, self.splits, image_size=self.image_size, weights=self.weights.path,
                                 cache_dir=cache_dir, engine=engine, fast_decode=fast_decode, executor=executor,
                                 shard_size=shard_size, model=self.weights.model, precision=precision)
            seconds = time.perf_counter() - started
            if report.hit:
                raise RuntimeError(f"the {engine} build in the fresh folder {cache_dir} was a cache hit")
            self._builds[key] = Build(report, seconds, cache_dir, cpu_seconds() - cpu_started)
        return self._builds[key]


def available_weights(image_size: int) -> dict:
    """Each registered base → its real weights here (``WeightsRef``), or why there are none.

    Real weights are a file of ``SHARED_WEIGHTS`` under ../shared/weights, or ImageNet weights
    Keras has already downloaded (``~/.keras/models``); nothing is downloaded here.
    """
    import os

    from bottlecache.core.registry import BACKBONES
    from bottlecache.models.backbone import resolve_weights

    from .suite import SHARED

    keras_models = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"
    out = {}
    for name, entry in BACKBONES.items():
        shared = SHARED / "weights" / SHARED_WEIGHTS.get(name, "-")
        if shared.is_file():
            out[name] = resolve_weights(shared, image_size, name)
        elif (keras_models / entry.imagenet_file(image_size)[0]).is_file():
            out[name] = resolve_weights("imagenet", image_size, name)
        else:
            out[name] = f"no weights file here (../shared/weights or {keras_models})"
    return out


# The real weights under ../shared/weights, by model (README there).
SHARED_WEIGHTS = {"mobilenet_v2": "mobilenet_v2_1.0_224_imagenet_no_top.weights.h5",
                  "xception": "xception_imagenet_no_top.weights.h5"}
