"""``sweep``: try every cache configuration × head setting, rank them on validation, test only the winner.

A cache configuration is what changes the features (image size; the backbone ``model``, the
number of ``views`` and the ``precision`` where ``CacheSettings`` has those fields). Each one's cache is found or built
(``CacheSettings`` → fingerprint, so an existing cache is a hit), every head setting is trained on it
and measured on the validation split only; the best validation accuracy wins (lower validation log
loss breaks a tie, then the cheaper configuration). Only the winner is then measured on the test
split, and saved in ``<cache dir>/heads`` like any other head.

Resumable: candidates are saved in ``<cache dir>/sweep/heads`` and found again by their record
(cache fingerprint, kind, parameters), so a rerun builds nothing and trains nothing already done.

Stacks (``stack`` K): once every configuration is measured, the caches of the ``STACK_CANDIDATES``
best (each by its best head) are joined K at a time (``bottlecache.cache.stack``) and every head
setting is trained on each stack, ranked with the rest. Test-time flips (``tta`` ``flip``): every
cache also holds its evaluation splits' mirrors, and every head is measured without and with flips
(the flip row reuses the head trained without them: the same weights, measured again).

Budget: configurations run cheapest first (estimated from image size², the model and the views);
a build that would end past the budget is not started, and its configuration is reported skipped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..cache.build import build_resolved
from ..cache.settings import CacheSettings
from ..cache.stack import MAX_STACK, open_stack
from ..cache.store import Cache, list_caches
from ..cache.writer import check_build_options
from ..core.errors import BottlecacheError, reason
from ..core.files import atomic_save, atomic_write_text, ensure_cache_dir, free_folder, write_error
from ..core.fingerprint import sha256_file
from ..core.options import (
    DEFAULT_DATA,
    DEFAULT_DTYPE,
    DEFAULT_ENGINE,
    DEFAULT_MODEL,
    DEFAULT_PRECISION,
    MAX_EPOCHS,
    NATIVE,
    PRECISIONS,
    TTAS,
    check_choice,
    check_folder_option,
    check_image_size,
    check_positive,
    check_range,
    check_seed,
    resolve_cache_dir,
    settings_with,
)
from ..core.progress import NullProgress
from ..core.records import MetricsRecord, read_json
from ..core.registry import resolve_image_size
from ..data.sources import open_source
from ..models.backbone import resolve_weights
from .exclusion import Exclusion
from .heads import (
    HEAD_ADVICE,
    KINDS,
    MAX_C,
    HeadResult,
    HeadSettings,
    calibrate,
    compute_metrics,
    load_head,
    predict_split,
    read_head_record,
    save_head,
    train_head,
)

DEFAULT_IMAGE_SIZES = (160, 192, 224)
DEFAULT_KINDS = ("sklearn", "keras")
DEFAULT_CS = (1.0,)
DEFAULT_EPOCHS = 10
SWEEP_FOLDER = "sweep"
# Forward cost per pixel relative to MobileNetV2 (multiply-adds per pixel, Keras's published
# figures: Xception 8.4 G at 299 px, MobileNetV2 0.3 G at 224 px). A model not listed counts as 1.
MODEL_COST = {"mobilenet_v2": 1.0, "xception": 15.7}
PRECISION_COST = {"float32": 1.0, "int8": 0.5}  # the int8 forward pass is about twice as fast (docs/engines.md)
# Before any build of this sweep has been timed: seconds per image of the reference configuration
# (MobileNetV2 at 160 px) and seconds per build (loading the model, preparing the engine). From the
# benchmarks on a loaded 2-core machine (cache-build-keras 65 img/s; litert conversion 20 s).
PRIOR_SECONDS_PER_IMAGE = 1 / 60
PRIOR_SECONDS_PER_BUILD = 20.0
REFERENCE_SIZE = 160
MAX_BUDGET_SECONDS = 30 * 24 * 3600
STACK_CANDIDATES = 4  # `--stack K`: the caches of the 4 best configurations, K at a time (6 pairs)


# ---------------------------------------------------------------------------------------------
# The grid


@dataclass(frozen=True)
class Configuration:
    """One cache configuration; ``model``, ``views`` and ``precision`` None mean ``CacheSettings``'s defaults."""

    image_size: int
    model: str | None = None
    views: int | None = None
    precision: str | None = None

    @property
    def label(self) -> str:
        parts = [f"{self.model} {self.image_size} px" if self.model else f"{self.image_size} px"]
        if self.views:
            parts.append(f"{self.views} views")
        if self.precision:
            parts.append(self.precision)
        return ", ".join(parts)

    @property
    def relative_cost(self) -> float:
        """Forward cost per image relative to MobileNetV2 at 160 px (one view, float32)."""
        model_cost = MODEL_COST.get(self.model or DEFAULT_MODEL, 1.0)
        return ((self.image_size / REFERENCE_SIZE) ** 2 * model_cost * (1 + (self.views or 0))
                * PRECISION_COST[self.precision or DEFAULT_PRECISION])

    def settings_fields(self) -> dict:
        """The ``CacheSettings`` fields this configuration sets (the others keep their defaults)."""
        out = {"image_size": self.image_size}
        for name in ("model", "views", "precision"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    def to_dict(self) -> dict:
        return {"image_size": self.image_size, "model": self.model or DEFAULT_MODEL, "views": self.views or 0,
                "precision": self.precision or DEFAULT_PRECISION}


@dataclass(frozen=True)
class Stack:
    """Configurations whose caches are joined into one head's features (``bottlecache.cache.stack``)."""

    members: tuple[Configuration, ...]

    @property
    def label(self) -> str:
        return "stack: " + " + ".join(m.label for m in self.members)

    @property
    def relative_cost(self) -> float:
        return sum(m.relative_cost for m in self.members)

    def to_dict(self) -> dict:
        return {"stack": [m.to_dict() for m in self.members]}


@dataclass(frozen=True)
class HeadSetting:
    """One head to train on every cache: its kind and the settings that differ between heads."""

    kind: str
    C: float | None = None  # sklearn
    epochs: int | None = None  # keras
    seed: int = 0
    exclude: Exclusion | None = None  # keys left out of training (the same for every head of a sweep)
    calibrate: bool = False  # a temperature fitted on validation (bottlecache.train.calibration)
    tta: str = "none"  # "flip": measured on the mean of the logits of each image and its mirror

    @property
    def label(self) -> str:
        text = f"sklearn C={self.C:g}" if self.kind == "sklearn" else f"keras {self.epochs} ep"
        return text + (", flip" if self.tta == "flip" else "")

    def train_options(self) -> dict:
        options = {"C": [self.C], "seed": self.seed} if self.kind == "sklearn" else {"epochs": self.epochs,
                                                                                     "seed": self.seed}
        return (options | ({"exclude": self.exclude} if self.exclude is not None else {})
                | ({"calibrate": True} if self.calibrate else {}) | ({"tta": self.tta} if self.tta != "none" else {}))

    def matches(self, kind: str, params: dict) -> bool:
        """Whether a saved head's kind and parameters are this setting's (other parameters at their defaults)."""
        if kind != self.kind or params.get("class_weight", "none") != "none":  # a weighted head is another head
            return False
        if (params.get("exclude") or {}).get("sha256") != (self.exclude.sha256 if self.exclude else None):
            return False  # trained without the rows this sweep leaves out, or without others
        if ("calibration" in params) != self.calibrate or params.get("tta", "none") != self.tta:
            return False
        if self.kind == "sklearn":
            return params.get("Cs") == [self.C]

        defaults = {f.name: f.default for f in dataclasses.fields(HeadSettings)}
        expected = {key: defaults[key] for key in ("batch_size", "learning_rate", "optimizer", "dropout",
                                                   "early_stopping")}
        expected |= {"epochs": self.epochs, "seed": self.seed}
        return all(params.get(key) == value for key, value in expected.items())

    def folder_name(self, fingerprint: str) -> str:
        options = self.train_options() | ({"exclude": self.exclude.sha256} if self.exclude else {})
        digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:8]
        return f"{self.kind}-{fingerprint[:12]}-sweep-{digest}"

    def to_dict(self) -> dict:
        return {"kind": self.kind, **({"C": self.C} if self.kind == "sklearn" else {"epochs": self.epochs}),
                "tta": self.tta}


def grid(image_sizes=DEFAULT_IMAGE_SIZES, models=None, views=None, precisions=None) -> list[Configuration]:
    """The cache configurations, cheapest first (the order a budget cuts from the end)."""
    sizes = _list_option("image_size", image_sizes, lambda size: size if size == NATIVE else check_image_size(size))
    model_names = [None] if models is None else _list_option("model", models, _check_model)
    view_counts = [None] if views is None else _list_option("views", views, _check_views)
    kinds = [None] if precisions is None else _list_option(
        "precision", precisions, lambda p: check_choice("precision", p, PRECISIONS) or p)
    points = list(dict.fromkeys(  # "native" is each model's own size; one that is also listed counts once
        Configuration(resolve_image_size(m or DEFAULT_MODEL, s), m, v, p)
        for m in model_names for v in view_counts for p in kinds for s in sizes))
    return sorted(points, key=lambda p: p.relative_cost)  # stable: the given order breaks ties


def head_settings(kinds=DEFAULT_KINDS, Cs=DEFAULT_CS, epochs: int = DEFAULT_EPOCHS, seed: int = 0,
                  exclude=None, calibrate: bool = False, tta: str = "none") -> list[HeadSetting]:
    """Each head to train on every cache; with ``tta`` ``flip``, each also measured with flips (after it)."""
    kinds = _list_option("kind", kinds, lambda k: check_choice("kind", k, KINDS) or k)
    Cs = _list_option("C", Cs, lambda c: float(check_positive("C", c, float, maximum=MAX_C)))
    check_positive("epochs", epochs, maximum=MAX_EPOCHS)
    check_seed(seed)
    check_choice("tta", tta, TTAS)
    exclude = Exclusion.of(exclude)
    out = []
    for kind in kinds:
        if kind == "sklearn":
            out += [HeadSetting("sklearn", C=c, seed=seed, exclude=exclude, calibrate=bool(calibrate)) for c in Cs]
        else:
            out.append(HeadSetting("keras", epochs=epochs, seed=seed, exclude=exclude, calibrate=bool(calibrate)))
    if tta != "none":
        out = [variant for setting in out for variant in (setting, dataclasses.replace(setting, tta=tta))]
    return out


def _list_option(name: str, values, check) -> list:
    if isinstance(values, (str, int, float)):
        values = [values]
    values = list(values)
    if not values:
        raise BottlecacheError(f"The '{name}' option needs at least one value. Got none.")
    out = []
    for value in values:
        checked = check(value)
        if checked not in out:
            out.append(checked)
    return out


def _check_model(model) -> str:
    if not isinstance(model, str) or not model.strip():
        raise BottlecacheError(f"The 'model' option must be a model name. Got {model!r} instead.")
    return model


def _check_views(views) -> int:
    if isinstance(views, bool) or not isinstance(views, int) or views < 0:
        raise BottlecacheError(f"The 'views' option must be a whole number of views, 0 or more. Got {views!r} instead.")
    return views


_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?$")


def parse_budget(text) -> float | None:
    """``"90"``, ``"90s"``, ``"10m"``, ``"1h30m"`` → seconds; None or ``""`` → no budget."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(check_positive("budget", text, float, maximum=MAX_BUDGET_SECONDS))
    match = _DURATION.match(str(text).strip().lower()) if isinstance(text, str) else None
    if not match or not any(match.groups()):
        raise BottlecacheError(f"The 'budget' option must be a duration such as 90s, 10m or 1h30m. Got {text!r} instead.")
    h, m, s = (float(g) if g else 0.0 for g in match.groups())
    return float(check_positive("budget", h * 3600 + m * 60 + s, float, maximum=MAX_BUDGET_SECONDS))


# ---------------------------------------------------------------------------------------------
# The leaderboard


@dataclass
class Row:
    """One configuration × head setting, or one configuration that failed or was skipped (no head)."""

    configuration: Configuration | Stack
    head: HeadSetting | None
    status: str  # "trained", "reused", "failed", "skipped"
    cache: str | None = None  # "built", "resumed", "hit"
    cache_path: Path | list | None = None  # a stack's: its members' paths
    fingerprint: str | None = None
    validation: dict | None = None  # the head's validation metrics
    build_seconds_per_image: float | None = None
    head_seconds: float | None = None
    bytes_per_image: float | None = None
    head_path: Path | None = None
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.status in ("trained", "reused")

    @property
    def validation_accuracy(self) -> float | None:
        return self.validation["accuracy"] if self.validation else None

    @property
    def validation_log_loss(self) -> float | None:
        return self.validation["log_loss"] if self.validation else None

    def to_dict(self) -> dict:
        return {
            "configuration": self.configuration.to_dict(),
            "head": self.head.to_dict() if self.head else None,
            "status": self.status,
            "cache": self.cache,
            "cache_path": ([str(p) for p in self.cache_path] if isinstance(self.cache_path, list)
                           else str(self.cache_path) if self.cache_path else None),
            "fingerprint": self.fingerprint,
            "validation_accuracy": self.validation_accuracy,
            "validation_log_loss": self.validation_log_loss,
            "validation_ece": (self.validation or {}).get("ece"),  # after calibration, when calibrated
            "validation_ece_uncalibrated": (self.validation or {}).get("ece_before"),
            "build_seconds_per_image": self.build_seconds_per_image,
            "head_seconds": self.head_seconds,
            "bytes_per_image": self.bytes_per_image,
            "head_path": str(self.head_path) if self.head_path else None,
            "error": self.error,
        }


@dataclass
class Leaderboard:
    """The sweep's result: rows ranked by validation (finished rows first), the winner and its test."""

    rows: list[Row]
    winner: Row | None
    winner_path: Path | None = None  # the winner saved in <cache dir>/heads
    test: dict | None = None  # the winner's test metrics (None: the cache has no test split)
    seconds: float = 0.0
    budget: float | None = None
    n_built: int = 0
    n_trained: int = 0
    json_path: Path | None = None
    plot_path: Path | None = None

    @property
    def skipped(self) -> list[Row]:
        return [r for r in self.rows if r.status == "skipped"]

    @property
    def failed(self) -> list[Row]:
        return [r for r in self.rows if r.status == "failed"]

    def to_dict(self) -> dict:
        return {
            "selected_on": "validation",
            "test_note": "only the winner is measured on the test split; the choice used validation only",
            "winner": self.winner.to_dict() if self.winner else None,
            "winner_path": str(self.winner_path) if self.winner_path else None,
            "test": self.test,
            "seconds": round(self.seconds, 3),
            "budget_seconds": self.budget,
            "n_built": self.n_built,
            "n_trained": self.n_trained,
            "rows": [r.to_dict() for r in self.rows],
            "json": str(self.json_path) if self.json_path else None,
            "plot": str(self.plot_path) if self.plot_path else None,
        }


def rank(rows: list[Row]) -> list[Row]:
    """Finished rows by validation accuracy (higher first), then validation log loss (lower first),
    then the cheaper configuration; failed and skipped rows after them, in grid order. Nothing but
    validation figures is looked at: rows carry no test figure."""
    done = [r for r in rows if r.done]
    rest = [r for r in rows if not r.done]
    done.sort(key=lambda r: (-r.validation_accuracy, r.validation_log_loss, r.configuration.relative_cost))
    return done + rest


# ---------------------------------------------------------------------------------------------
# Running it


@dataclass
class _Clock:
    """Elapsed time and the build-cost estimate, refined by every build this sweep times."""

    budget: float | None
    started: float = field(default_factory=time.perf_counter)
    seconds_per_image: float = PRIOR_SECONDS_PER_IMAGE
    seconds_per_build: float = PRIOR_SECONDS_PER_BUILD

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def estimate(self, point: Configuration, n_images: int) -> float:
        return self.seconds_per_build + n_images * point.relative_cost * self.seconds_per_image

    def observe(self, point: Configuration, n_images: int, seconds: float) -> None:
        """A timed build: from now on its whole wall time per image is the rate (start-up included)."""
        self.seconds_per_build = 0.0
        self.seconds_per_image = seconds / max(1, n_images * point.relative_cost)

    def refusal(self, point: Configuration, n_images: int) -> str | None:
        """Why a build of ``point`` is not started (None: it fits the budget)."""
        if self.budget is None:
            return None
        estimate, left = self.estimate(point, n_images), self.budget - self.elapsed
        if estimate <= left:
            return None
        return f"budget: the build would take about {estimate:.0f} s and {max(left, 0):.0f} s of {self.budget:.0f} s are left"


@dataclass(frozen=True)
class SweepSettings:
    """What a sweep tries, checked once on creation (each message names the option).

    The cache grid: every combination of ``image_sizes``, ``models``, ``views`` and
    ``precisions`` (``float32``, ``int8``) is one configuration (None keeps ``CacheSettings``'s default), stored as ``dtype``, decoded with
    ``fast_decode``, built by ``engine`` ``batch_size`` images at a time. The head settings: one
    scikit-learn head per C of ``Cs``, one Keras head of ``epochs`` epochs, for each of ``kinds``,
    seeded by ``seed``, each leaving out the keys of ``exclude`` (a key file); ``calibrate``: each
    head's temperature fitted on validation; ``tta`` ``flip``: each head measured with test-time flips
    too; ``stack`` K: stacks of K of the best configurations' caches as candidates too. ``budget`` (seconds or a duration such as ``"10m"``): start no build that
    would end after it (configurations run cheapest first). ``plot``: write ``leaderboard.png``.
    """

    image_sizes: tuple = DEFAULT_IMAGE_SIZES
    models: tuple | None = None
    views: tuple | None = None
    precisions: tuple | None = None
    kinds: tuple = DEFAULT_KINDS
    Cs: tuple = DEFAULT_CS
    epochs: int = DEFAULT_EPOCHS
    seed: int = 0
    dtype: str = DEFAULT_DTYPE
    engine: str = DEFAULT_ENGINE
    batch_size: int | None = None
    fast_decode: bool = False
    budget: object = None
    plot: bool = True
    exclude: object = None  # keys left out of every head's training (bottlecache.train.exclusion)
    calibrate: bool = False  # every head's temperature fitted on validation
    stack: int = 0  # 0: no stacks; K: the caches of the STACK_CANDIDATES best configurations, K at a time
    tta: str = "none"  # "flip": caches hold their evaluation splits' mirrors; each head is measured with them too

    def __post_init__(self):
        points = grid(self.image_sizes, self.models, self.views, self.precisions)
        object.__setattr__(self, "exclude", Exclusion.of(self.exclude))
        head_settings(self.kinds, self.Cs, self.epochs, self.seed, self.exclude, self.calibrate, self.tta)
        if self.stack != 0:
            check_range("stack", self.stack, 2, min(MAX_STACK, STACK_CANDIDATES), high_open=False)
            if len(points) < self.stack:
                raise BottlecacheError(f"The 'stack' option {self.stack} joins {self.stack} caches, and the sweep tries "
                                       f"{len(points)} configuration(s); try more (--image-size, --model) or leave out "
                                       "--stack.")
        if self.tta != "none" and self.views:
            raise BottlecacheError("The 'tta' option and --views do not go together in a sweep yet; leave one out.")
        parse_budget(self.budget)
        check_build_options(self.engine, self.batch_size)
        if "int8" in (self.precisions or ()) and self.engine == "keras":
            raise BottlecacheError("The 'engine' option keras computes in float32; an int8 cache is built by LiteRT: "
                                   "use --engine auto or litert, or leave int8 out of --precision.")


def sweep(data=None, splits=None, *, settings: SweepSettings | None = None, weights=None, cache_dir=None,
          tfds_data_dir=None, out=None, progress=None, **overrides) -> Leaderboard:
    """Find or build the cache of every configuration, train every head setting on it, rank on validation.

    Parameters
    ----------
    data, splits, tfds_data_dir
        As for ``build_cache``. ``data`` None: the folder the newest cache in ``cache_dir`` was
        built from, if it is still there, else the default data set.
    settings : SweepSettings, optional
        The grid, the head settings, the budget; keywords name its fields and override them.
    weights : str, path or dict, optional
        As for ``build_cache``, or a mapping of model names to weights files. None (and no
        ``$BOTTLECACHE_WEIGHTS``): for each model, the file its newest cache in ``cache_dir`` was
        built with, while it still has the sha256 that cache recorded; else ImageNet's.
    cache_dir : path, optional
        Where the caches and heads are found or made.
    out : path, optional
        Where ``leaderboard.json`` and ``leaderboard.png`` go; default ``<cache dir>/sweep``.
    progress : bottlecache.core.progress.Progress, optional
    **overrides
        Fields of ``SweepSettings`` by name.

    Returns
    -------
    Leaderboard
        Ranked rows (validation only), the winner, its test metrics and where it is saved.
    """

    (settings,) = settings_with("sweep", {SweepSettings: settings}, overrides)
    points = grid(settings.image_sizes, settings.models, settings.views, settings.precisions)
    settings_heads = head_settings(settings.kinds, settings.Cs, settings.epochs, settings.seed, settings.exclude,
                                   settings.calibrate, settings.tta)
    clock = _Clock(parse_budget(settings.budget))
    dtype, engine, batch_size, fast_decode = settings.dtype, settings.engine, settings.batch_size, settings.fast_decode
    plot = settings.plot
    cache_dir = resolve_cache_dir(cache_dir)
    out = check_folder_option("out", out) if out is not None else None
    progress = progress or NullProgress()
    data, weights, tfds_data_dir = recorded_defaults(data, weights, tfds_data_dir, cache_dir,
                                                     {p.model or DEFAULT_MODEL for p in points}, progress)
    # Every configuration's settings are made (and so checked) before any work starts, and what they
    # all share (the data, one weights file) is opened once: a bad value of it is one error, not a row each.
    caches = {p: _settings(p, data, splits, weights, dtype, fast_decode, tfds_data_dir, cache_dir, settings.tta)
              for p in points}
    check_shared(caches, weights, settings.exclude)
    if out is None:
        out = ensure_cache_dir(cache_dir) / SWEEP_FOLDER
    board = Leaderboard([], None, budget=clock.budget)
    rows = []
    for i, point in enumerate(points, 1):
        progress.message(f"[{i}/{len(points)}] {point.label}")
        rows += _run_configuration(point, caches[point], settings_heads, clock, board, cache_dir,
                                   dict(engine=engine, batch_size=batch_size, progress=progress), progress)
    if settings.stack:
        rows += _run_stacks(rank(rows), settings.stack, settings_heads, board, cache_dir, progress)
    board.rows = rank(rows)
    board.winner = board.rows[0] if board.rows and board.rows[0].done else None
    if board.winner is not None:
        board.winner_path, board.test = save_winner(board.winner, cache_dir)
    board.seconds = clock.elapsed
    write_outputs(board, out, plot)
    return board


def recorded_defaults(data, weights, tfds_data_dir, cache_dir: Path, models: set, progress):
    """``data`` and ``weights`` as given; where not given (and ``$BOTTLECACHE_WEIGHTS`` unset), where
    the newest caches in ``cache_dir`` found them: the data folder if it is still there, and for
    each swept model a weights file that still has the sha256 its cache was built with. What is
    taken from a cache is said (``progress.message``). Else the usual defaults."""
    data_given, weights_given = data is not None, weights is not None or os.environ.get("BOTTLECACHE_WEIGHTS")
    found_weights = {}
    for path in ([] if data_given and weights_given else list_caches(cache_dir)):
        try:
            with Cache(path) as cache:
                config, build = cache.config, cache.build_info
        except (BottlecacheError, OSError):
            continue  # a damaged cache records nothing usable; `cache ls` says what is wrong with it
        where = build.get("data") or {}
        if data is None and where.get("path") and Path(where["path"]).is_dir():
            data, tfds_data_dir = where["path"], tfds_data_dir or where.get("tfds_data_dir")
            progress.message(f"data: {data} (where the cache {path.name} found it; --data to choose)")
        model, recorded = config.get("model", DEFAULT_MODEL), build.get("weights_path")
        if not weights_given and model in models and model not in found_weights and recorded \
                and Path(recorded).is_file() and sha256_file(recorded) == config.get("weights_sha256"):
            found_weights[model] = recorded
            progress.message(f"weights of {model}: {recorded} (what the cache {path.name} was built with; "
                             "--weights to choose)")
    if not weights_given:
        weights = found_weights or None  # None: the usual default (ImageNet's)
    return (DEFAULT_DATA if data is None else data), weights, tfds_data_dir


def _settings(point: Configuration, data, splits, weights, dtype, fast_decode, tfds_data_dir, cache_dir,
              tta: str = "none"):
    if isinstance(weights, dict):
        weights = weights.get(point.model or DEFAULT_MODEL)
    return CacheSettings(data=data, splits=None if splits is None else tuple(splits), weights=weights, dtype=dtype,
                         fast_decode=fast_decode, tfds_data_dir=tfds_data_dir, cache_dir=cache_dir, tta=tta,
                         **point.settings_fields())


def check_shared(settings: dict, weights, exclude=None) -> None:
    """Open the data (with its splits) and, unless ``weights`` differ per model, the weights at each size;
    the ``exclude`` list against the data. What differs between configurations (a model's own weights
    file) fails in that configuration's row."""

    first = next(iter(settings.values()))
    source = open_source(first.data, first.splits, tfds_data_dir=first.tfds_data_dir)
    if "validation" not in source.splits:
        raise BottlecacheError(f"The sweep ranks on a 'validation' split, and the data has none (it has "
                               f"{', '.join(source.splits)}); pass --split validation=...")
    if exclude is not None:
        exclude.check_source(source)
    if isinstance(weights, dict):
        swept = {s.model for s in settings.values()}
        unused = sorted(set(weights) - swept)
        if unused:
            raise BottlecacheError(f"The 'weights' option names {', '.join(map(repr, unused))}, which the sweep does not "
                               f"try (models: {', '.join(sorted(swept))}); add it to --model or leave its weights out.")
        return
    for model, size in sorted({(getattr(s, "model", None), s.image_size) for s in settings.values()}, key=str):
        resolve_weights(first.weights, size, **({} if model is None else {"model": model}))


def _run_configuration(point, settings, heads_to_train, clock, board, cache_dir, build_options, progress) -> list[Row]:
    """The rows of one configuration: its cache found or built, then each head found or trained.
    A failure is this configuration's row (its reason said); the sweep goes on."""

    try:
        resolved = settings.resolve()
        n_images = sum(s.n_examples for s in resolved.source.splits.values())
        cache_state = "hit"
        if not resolved.path.exists():
            refusal = clock.refusal(point, n_images)
            if refusal:
                progress.message(f"  skipped: {refusal}")
                return [Row(point, None, "skipped", error=refusal)]
            progress.message(f"  building (about {clock.estimate(point, n_images):.0f} s)")
            started = time.perf_counter()
            report = build_resolved(resolved, **build_options)
            if not report.hit:  # another process may have finished it meanwhile
                clock.observe(point, sum(s.n_processed for s in report.splits), time.perf_counter() - started)
                board.n_built += 1
                cache_state = "resumed" if report.resumed else "built"
        cost = cache_costs(resolved.path)
    except KeyboardInterrupt:
        raise
    except Exception as error:  # noqa: BLE001 - one configuration's failure is its row, not the sweep's end
        progress.message(f"  failed: {reason(error, 300)}")
        return [Row(point, None, "failed", error=reason(error, 300))]
    rows = []
    for setting in heads_to_train:
        row = Row(point, setting, "failed", cache_state, resolved.path, resolved.fingerprint, **cost)
        try:
            _find_or_train(row, cache_dir, board, progress)
        except KeyboardInterrupt:
            raise
        except Exception as error:  # noqa: BLE001 - as above, for one head
            row.status, row.error = "failed", reason(error, 300)
            progress.message(f"  {setting.label}: failed: {row.error}")
        rows.append(row)
    return rows


def _run_stacks(ranked: list[Row], k: int, heads_to_train, board, cache_dir, progress) -> list[Row]:
    """The rows of stacks: the caches of the ``STACK_CANDIDATES`` best configurations (each by its best
    head, on validation), ``k`` at a time, in rank order, each with every head setting."""
    best: dict[Configuration, Row] = {}
    for row in ranked:
        if row.done and row.configuration not in best:
            best[row.configuration] = row
    top = list(best.values())[:STACK_CANDIDATES]
    rows = []
    for members in itertools.combinations(top, k):
        stack = Stack(tuple(m.configuration for m in members))
        paths = [m.cache_path for m in members]
        progress.message(f"[stack] {stack.label}")
        try:
            with open_stack(paths) as joined:
                fp = joined.fingerprint
        except KeyboardInterrupt:
            raise
        except Exception as error:  # noqa: BLE001 - one stack's failure is its row
            rows.append(Row(stack, None, "failed", error=reason(error, 300)))
            continue
        cost = {key: sum(getattr(m, key) or 0.0 for m in members) for key in ("build_seconds_per_image", "bytes_per_image")}
        for setting in heads_to_train:
            row = Row(stack, setting, "failed", "hit", paths, fp, **cost)
            try:
                _find_or_train(row, cache_dir, board, progress)
            except KeyboardInterrupt:
                raise
            except Exception as error:  # noqa: BLE001 - as above, for one head
                row.status, row.error = "failed", reason(error, 300)
                progress.message(f"  {setting.label}: failed: {row.error}")
            rows.append(row)
    return rows


def cache_costs(path: Path) -> dict:
    """Build seconds per image (the splits' own recorded times) and bytes per image of a cache file."""

    with Cache(path) as cache:
        n = sum(cache.n_examples(s) for s in cache.splits)
        seconds = sum(float(cache.file[s].attrs.get("seconds", 0.0)) for s in cache.splits)
    return {"build_seconds_per_image": seconds / n if n else None,
            "bytes_per_image": path.stat().st_size / n if n else None}


def candidates_folder(cache_dir: Path) -> Path:
    return Path(cache_dir) / SWEEP_FOLDER / "heads"


def head_fingerprint(record) -> str:
    """What a head was trained on: its cache's fingerprint, or its stack's."""
    return record.stack.fingerprint if record.stack else record.cache.fingerprint


def find_candidate(folder: Path, fingerprint: str, setting: HeadSetting):
    """A saved head in ``folder`` whose record matches (cache fingerprint, kind, parameters) and whose
    metrics read back, as ``(path, metrics)``; None if there is none."""

    if not folder.is_dir():
        return None
    for path in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            record = read_head_record(path)
            if head_fingerprint(record) != fingerprint or not setting.matches(record.kind, record.params):
                continue
            metrics = read_json(path / "metrics.json", MetricsRecord, HEAD_ADVICE)
        except BottlecacheError:
            continue  # a damaged candidate is trained again under another name
        if "validation" in metrics.metrics:
            return path, metrics.model_dump(mode="json")
    return None


def _find_or_train(row: Row, cache_dir: Path, board: Leaderboard, progress) -> None:
    folder = candidates_folder(cache_dir)
    found = find_candidate(folder, row.fingerprint, row.head)
    plain = dataclasses.replace(row.head, tta="none")
    trained = None if row.head.tta == "none" or found else find_candidate(folder, row.fingerprint, plain)
    if found is not None:
        row.head_path, metrics = found
        row.status = "reused"
    elif trained is not None:  # the same head measured with flips: nothing to train
        progress.message(f"  measuring {row.head.label}")
        result = measure_with_tta(trained[0], row.cache_path, row.head.tta,
                                  free_folder(folder / row.head.folder_name(row.fingerprint)))
        row.head_path, metrics = result.path, result.to_dict()
        row.status = "trained"
    else:
        progress.message(f"  training {row.head.label}")
        result = train_head(row.cache_path, row.head.kind, evaluate=["validation"], cache_dir=cache_dir,
                            out=free_folder(folder / row.head.folder_name(row.fingerprint)),
                            **row.head.train_options())
        row.head_path, metrics = result.path, result.to_dict()
        row.status = "trained"
        board.n_trained += 1
    row.validation = {k: metrics["metrics"]["validation"].get(k) for k in ("n", "accuracy", "log_loss", "ece")}
    row.validation["ece_before"] = (metrics["params"].get("calibration") or {}).get("ece_before")
    row.head_seconds = metrics["train_seconds"]


def measure_with_tta(head_path: Path, cache_path, tta: str, out: Path) -> HeadResult:
    """A saved candidate measured again on validation with test-time flips (and calibrated again on
    them if it was calibrated), saved as its own candidate: the same weights, another ``params.tta``."""
    loaded = load_head(head_path)
    candidate = read_json(head_path / "metrics.json", MetricsRecord, HEAD_ADVICE).model_dump(mode="json")
    params = {k: v for k, v in candidate["params"].items() if k not in ("temperature", "calibration")} | {"tta": tta}
    loaded.head.temperature = 1.0
    result = HeadResult(loaded.head, candidate["kind"], {}, candidate["train_seconds"], params,
                        selection=candidate["selection"], history=candidate["history"])
    with _open(cache_path) as cache:
        if "calibration" in candidate["params"]:
            calibrate(result, cache, tta)
        proba = predict_split(loaded.head, cache, "validation", tta)
        result.metrics["validation"] = compute_metrics(cache.labels("validation"), proba, cache.class_names)
        result.path = save_head(result, cache, out)
    return result


def _open(cache_path):
    return open_stack(cache_path) if isinstance(cache_path, list) else Cache(cache_path)


def save_winner(winner: Row, cache_dir: Path) -> tuple[Path, dict | None]:
    """Measure the winner on the test split (if the cache has one) and save it in ``<cache dir>/heads``
    like any other head; a rerun finds it there. Returns its folder and its test metrics."""

    target = Path(cache_dir) / "heads" / winner.head_path.name
    if target.exists():
        try:
            record = read_head_record(target)
            metrics = read_json(target / "metrics.json", MetricsRecord, HEAD_ADVICE).model_dump(mode="json")
            if head_fingerprint(record) == winner.fingerprint and winner.head.matches(record.kind, record.params):
                return target, metrics["metrics"].get("test")
        except BottlecacheError:
            pass
        target = free_folder(target)  # something else (or a damaged head) is there: keep it, save beside it
    loaded = load_head(winner.head_path)
    candidate = read_json(winner.head_path / "metrics.json", MetricsRecord, HEAD_ADVICE).model_dump(mode="json")
    tta = winner.head.tta
    with _open(winner.cache_path) as cache:
        evaluated = {"validation": candidate["metrics"]["validation"]}
        if "test" in cache.splits:
            proba = predict_split(loaded.head, cache, "test", tta)
            evaluated["test"] = compute_metrics(cache.labels("test"), proba, cache.class_names)
        for split in cache.splits:  # any other split but train, as every head is measured on
            if split not in evaluated and split != "train":
                evaluated[split] = compute_metrics(cache.labels(split), predict_split(loaded.head, cache, split, tta),
                                                   cache.class_names)
        result = HeadResult(loaded.head, candidate["kind"], evaluated, candidate["train_seconds"], candidate["params"],
                            selection=candidate["selection"], history=candidate["history"])
        path = save_head(result, cache, target, cache_dir)
    return path, evaluated.get("test")


# ---------------------------------------------------------------------------------------------
# Outputs


def write_outputs(board: Leaderboard, out: Path, plot: bool) -> None:
    """``leaderboard.json`` (and ``leaderboard.png``) in ``out``, each written whole or not at all."""

    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise write_error(out, error, "pass another --out") from None
    board.json_path = out / "leaderboard.json"
    if plot:
        board.plot_path = out / "leaderboard.png"
        plot_leaderboard(board, board.plot_path)
    try:
        atomic_write_text(board.json_path, json.dumps(board.to_dict(), indent=2, default=str) + "\n")
    except OSError as error:
        raise write_error(board.json_path, error) from None


def plot_leaderboard(board: Leaderboard, path: Path) -> None:
    """Validation accuracy against build seconds per image, one point per configuration (its best
    head), the winner marked; written under a temporary name, then renamed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best: dict[Configuration, Row] = {}
    for row in board.rows:  # ranked: the first row of a configuration is its best head
        if row.done and row.configuration not in best and row.build_seconds_per_image is not None:
            best[row.configuration] = row
    figure, axes = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for point, row in best.items():
        is_winner = row is board.winner
        axes.scatter(row.build_seconds_per_image * 1000, row.validation_accuracy * 100, s=120 if is_winner else 40,
                     marker="*" if is_winner else "o", color="tab:red" if is_winner else "tab:blue", zorder=3)
        label = f"{point.label}, {row.head.label}" + (" (winner)" if is_winner else "")
        axes.annotate(label, (row.build_seconds_per_image * 1000, row.validation_accuracy * 100),
                      textcoords="offset points", xytext=(6, 4), fontsize=8)
    axes.set_xlabel("build cost (ms per image)")
    axes.set_ylabel("validation accuracy (%)")
    axes.set_title("bottlecache sweep: best head per configuration")
    axes.grid(True, alpha=0.3)
    axes.margins(x=0.35, y=0.15)  # room for the labels right of the points
    if not best:
        axes.text(0.5, 0.5, "no configuration finished", ha="center", va="center", transform=axes.transAxes)
    figure.tight_layout()
    try:
        atomic_save(path, lambda staged: figure.savefig(staged, format="png"))
    except OSError as error:

        raise write_error(path, error) from None
    finally:
        plt.close(figure)


def fmt_or_dash(value, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)
