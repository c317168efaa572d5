"""Every record bottlecache writes and reads back, declared once and checked on load.

A record is JSON (``head.json``, ``model.json``, ``metrics.json``, a fine-tune checkpoint's
``state.json``) or the root attributes of a cache file. Each has a schema here: its format name
and version, its fields with their types and ranges, and the rules between fields. ``read_json``
and ``validate`` turn any fault into one ``BottlecacheError`` line that names the file, the field
and what was expected, and says what to do. Nothing is trusted because bottlecache wrote it: a
file can be truncated, edited, swapped or written by another version.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, Json, ValidationError, model_validator

from .errors import BottlecacheError, reason
from .fingerprint import FORMAT_NAME, fingerprint, stack_fingerprint
from .options import ALL_IMAGE_SIZES, DTYPES, SEED_LIMIT
from .registry import BACKBONES, PREPROCESSINGS, bottleneck_shape

HEAD_FORMAT = "bottlecache-head"
MODEL_FORMAT = "bottlecache-model"
EXPORT_FORMAT = "bottlecache-export"
RECORD_VERSION = 1  # head.json, model.json
DECODE_FULL, DECODE_FAST = "full", "dct-downscale"  # the cache config's "decode": how JPEGs were decoded

T = TypeVar("T", bound=BaseModel)
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
ClassNames = Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=2)]
Count = Annotated[int, Field(ge=0)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class Record(BaseModel):
    """Strict types (``"1"`` is not an int), unknown fields kept (newer writers may add some)."""

    model_config = ConfigDict(strict=True, extra="allow", frozen=True)


def _unique(names: list[str], field: str) -> None:
    if len(set(names)) != len(names):
        raise ValueError(f"'{field}' must not repeat a name")


ModelName = Literal[tuple(BACKBONES)]  # type: ignore[valid-type]
PreprocessName = Literal[tuple(PREPROCESSINGS)]  # type: ignore[valid-type]


def _check_backbone_fields(record) -> None:
    """The model's alpha and preprocessing as its registry entry has them (absent: the legacy ones)."""
    entry = BACKBONES[record.model]
    if record.image_size not in entry.image_sizes:
        raise ValueError(f"'image_size' {record.image_size} is not one of {record.model}'s "
                         f"({', '.join(map(str, entry.image_sizes))})")
    if record.alpha != entry.alpha:
        raise ValueError(f"'alpha' {record.alpha} is not {record.model}'s ({entry.alpha})")
    if (record.preprocess or "scale_pm1") != entry.preprocessing:
        raise ValueError(f"'preprocess' {record.preprocess!r} is not {record.model}'s ({entry.preprocessing!r})")


class BackboneRecord(Record):
    model: ModelName
    alpha: FiniteFloat | None = Field(default=None, gt=0)
    preprocess: PreprocessName | None = None  # None: scale_pm1 (records made before the registry)
    image_size: Literal[ALL_IMAGE_SIZES]  # type: ignore[valid-type]
    weights_sha256: Sha256
    preprocess_version: int = Field(ge=1)

    @model_validator(mode="after")
    def _rules(self):
        _check_backbone_fields(self)
        return self


class CutRecord(Record):
    """A cut cache's cut (``bottlecache.models.cut``): the layer whose output it stores, and that output's shape."""

    layer: str = Field(min_length=1)
    shape: Annotated[list[Annotated[int, Field(gt=0)]], Field(min_length=3, max_length=3)]


class ViewsRecord(Record):
    """A cache's augmented views of the train split (``bottlecache.data.augment``): how many, how made, the seed."""

    k: int = Field(gt=0)
    augment: str = Field(min_length=1)
    seed: int = Field(ge=0, lt=SEED_LIMIT)


class CalibrationRecord(Record):
    """The images an int8 cache's base was calibrated on (``bottlecache.data.calibration``)."""

    split: str = Field(min_length=1)
    images: int = Field(gt=0)
    rule: Literal["smallest-key-hash", "first"]
    content_sha256: Sha256


class PrecisionRecord(Record):
    """An int8 cache's precision: the base quantised to full integer, and its calibration."""

    kind: Literal["int8"]
    calibration: CalibrationRecord


class CacheConfig(Record):
    """The cache's configuration: everything that determines its content (see ``fingerprint``)."""

    decode: Literal[DECODE_FULL, DECODE_FAST]  # type: ignore[valid-type]
    data: dict[str, Any]
    splits: dict[str, str]
    class_names: ClassNames
    model: ModelName
    alpha: FiniteFloat | None = Field(default=None, gt=0)
    preprocess: PreprocessName | None = None
    image_size: Literal[ALL_IMAGE_SIZES]  # type: ignore[valid-type]
    weights_sha256: Sha256
    preprocess_version: int = Field(ge=1)
    dtype: Literal[DTYPES]  # type: ignore[valid-type]
    cut: CutRecord | None = None
    views: ViewsRecord | None = None
    precision: PrecisionRecord | None = None  # None: float32
    tta: Literal["flip"] | None = None  # flip: the splits but train hold each image's mirror as one view

    @model_validator(mode="after")
    def _rules(self):
        _unique(self.class_names, "class_names")
        _check_backbone_fields(self)
        if self.precision is not None and self.cut is not None:
            raise ValueError("'precision' int8 and 'cut' do not go together (a cut cache is float32)")
        if self.tta is not None and self.cut is not None:
            raise ValueError("'tta' and 'cut' do not go together (a cut cache is for fine-tuning)")
        if not self.splits:
            raise ValueError("'splits' must name at least one split")
        return self


class CacheAttrs(Record):
    """The root attributes of a finished cache file."""

    format: Literal[FORMAT_NAME]  # type: ignore[valid-type]
    format_version: int
    fingerprint: Sha256
    config: Json[CacheConfig]
    class_names: Json[ClassNames]
    splits: Json[Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]]
    complete: bool
    build: Json[dict[str, Any]] = Field(default_factory=dict)
    versions: Json[dict[str, Any]] = Field(default_factory=dict)
    created: str = ""

    @model_validator(mode="after")
    def _rules(self):
        if self.class_names != self.config.class_names:
            raise ValueError("'class_names' differs from config.class_names")
        if sorted(self.splits) != sorted(self.config.splits):
            raise ValueError("'splits' differs from the splits of the config")
        if len(set(self.splits)) != len(self.splits):
            raise ValueError("'splits' must not repeat a name")
        return self


class CacheRef(Record):
    """The cache a head was trained on. Its fingerprint must be the hash of its config, as a cache
    file's must: an edited record is refused by every command, not trusted by some."""

    path: str
    fingerprint: Sha256
    config: CacheConfig

    @model_validator(mode="before")
    @classmethod
    def _hashes_its_config(cls, data):
        if isinstance(data, dict) and isinstance(data.get("config"), dict) and isinstance(data.get("fingerprint"), str):
            try:
                matches = fingerprint(data["config"]) == data["fingerprint"]
            except (TypeError, ValueError):
                return data  # values that cannot be hashed: the fields say which
            if not matches:
                raise ValueError("'fingerprint' is not the hash of 'config' (edited after training?)")
        return data


class StackMember(Record):
    """One cache of a stacked head: the cache (its config says the base), where its weights and data were."""

    cache: CacheRef
    weights: str | None = None
    data: dict[str, Any] | None = None


class StackRecord(Record):
    """A head trained on a stack of caches (``bottlecache.cache.stack``): the members, in the order
    their pooled features are joined, and the stack's fingerprint (the hash of theirs)."""

    fingerprint: Sha256
    members: Annotated[list[StackMember], Field(min_length=2, max_length=8)]

    @model_validator(mode="after")
    def _rules(self):
        prints = [m.cache.fingerprint for m in self.members]
        if len(set(prints)) != len(prints):
            raise ValueError("'members' must not repeat a cache")
        if stack_fingerprint(prints) != self.fingerprint:
            raise ValueError("'fingerprint' is not the hash of the members' fingerprints (edited after training?)")
        return self


class HeadRecord(Record):
    """``head.json``: what a head is and what it was trained on (``stack``: on several caches joined;
    ``backbone``, ``weights``, ``cache`` and ``data`` are then its first member's)."""

    format: Literal[HEAD_FORMAT]  # type: ignore[valid-type]
    format_version: int
    kind: Literal["sklearn", "keras"]
    class_names: ClassNames
    feature_shape: Annotated[list[Annotated[int, Field(gt=0)]], Field(min_length=3, max_length=3)]
    params: dict[str, Any]
    backbone: BackboneRecord
    weights: str | None
    cache: CacheRef
    created: str
    data: dict[str, Any] | None = None  # where the cache's data was: {"given", "path", "tfds_data_dir"}
    stack: StackRecord | None = None

    @model_validator(mode="after")
    def _rules(self):
        _unique(self.class_names, "class_names")
        expected = bottleneck_shape(self.backbone.image_size, self.backbone.model)
        if self.stack is not None:
            if self.stack.members[0].cache.fingerprint != self.cache.fingerprint:
                raise ValueError("'cache' is not the stack's first member")
            if any(m.cache.config.class_names != self.class_names for m in self.stack.members):
                raise ValueError("'class_names' differs from the classes of a cache of the stack")
            if any(m.cache.config.cut is not None for m in self.stack.members):
                raise ValueError("a stack joins bottleneck caches, not a cut cache")
            expected = (1, 1, sum(bottleneck_shape(m.cache.config.image_size, m.cache.config.model)[-1]
                                  for m in self.stack.members))
        if tuple(self.feature_shape) != expected:
            raise ValueError(f"'feature_shape' {list(self.feature_shape)} is not the bottleneck {list(expected)} "
                             f"of image size {self.backbone.image_size}")
        if self.cache.config.class_names != self.class_names:
            raise ValueError("'class_names' differs from the classes of the cache it was trained on")
        temperature = self.params.get("temperature", 1.0)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
                math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"'params.temperature' must be a positive number (a calibrated head's), not {temperature!r}")
        if self.params.get("tta", "none") not in ("none", "flip"):
            raise ValueError(f"'params.tta' must be none or flip, not {self.params.get('tta')!r}")
        for key in ("image_size", "weights_sha256", "preprocess_version", "model", "alpha", "preprocess"):
            if getattr(self.cache.config, key) != getattr(self.backbone, key):
                raise ValueError(f"backbone.{key} differs from the cache's {key}")
        return self


class FinetuneParams(Record):
    fine_tune_at: Count
    epochs: int = Field(gt=0)
    learning_rate: FiniteFloat = Field(gt=0)
    batch_size: int = Field(gt=0)
    seed: int = Field(ge=0, lt=SEED_LIMIT)
    augment: bool
    early_stopping: int | None = Field(default=None, gt=0)
    from_cache: bool = False


class ModelRecord(Record):
    """``model.json``: a fine-tuned model's classes, backbone and training settings."""

    format: Literal[MODEL_FORMAT]  # type: ignore[valid-type]
    format_version: int
    class_names: ClassNames
    backbone: BackboneRecord
    weights: str
    head: str
    params: FinetuneParams
    created: str

    @model_validator(mode="after")
    def _rules(self):
        _unique(self.class_names, "class_names")
        return self


class ExportRecord(Record):
    """``export.json``: an exported artifact (uint8 RGB images in, class probabilities out)."""

    format: Literal[EXPORT_FORMAT]  # type: ignore[valid-type]
    format_version: int
    artifact_format: Literal["keras", "saved_model", "litert"]
    quantize: Literal["none", "float16", "dynamic", "int8"]
    artifact: str = Field(min_length=1)
    class_names: ClassNames
    image_size: Literal[ALL_IMAGE_SIZES]  # type: ignore[valid-type]
    decode: Literal[DECODE_FULL, DECODE_FAST]  # type: ignore[valid-type]
    source: str
    evaluation: dict[str, Any] = Field(default_factory=dict)
    tta: Literal["none", "flip"] = "none"  # flips inside the artifact (exports written before it: none)
    created: str

    @model_validator(mode="after")
    def _rules(self):
        _unique(self.class_names, "class_names")
        if "/" in self.artifact or self.artifact.startswith("."):
            raise ValueError("'artifact' must be a name inside the export folder")
        return self


class SplitMetrics(Record):
    n: Count
    accuracy: float = Field(ge=0, le=1)
    balanced_accuracy: float | None = Field(default=None, ge=0, le=1)  # absent in metrics written before it
    log_loss: float = Field(ge=0)
    per_class: dict[str, dict[str, Any]] = Field(default_factory=dict)
    confusion_matrix: list[list[Count]] = Field(default_factory=list)


class MetricsRecord(Record):
    """A head's ``metrics.json`` (what ``cache heads`` lists)."""

    kind: Literal["sklearn", "keras"]
    path: str
    train_seconds: float = Field(ge=0)
    params: dict[str, Any]
    selection: list[dict[str, Any]]
    metrics: dict[str, SplitMetrics]
    history: dict[str, list[float | None]]


class CheckpointState(Record):
    """A fine-tune checkpoint's ``state.json``: where an interrupted run stands."""

    epoch: Count
    best_epoch: Count
    best: FiniteFloat  # validation loss of the best epoch so far (epoch 0: the warm start's)
    history: dict[str, list[float | None]]
    config: str  # the run's canonical configuration, compared on resume

    @model_validator(mode="after")
    def _rules(self):
        if self.best_epoch > self.epoch:
            raise ValueError(f"'best_epoch' {self.best_epoch} is after 'epoch' {self.epoch}")
        try:
            json.loads(self.config)
        except ValueError:
            raise ValueError("'config' is not JSON") from None
        return self


# ---------------------------------------------------------------------------------------------
# Reading


def _shown(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_format(data: Any, where: str, fmt: str | None, version: int | None, advice: str) -> None:
    if not isinstance(data, dict):
        kind = {list: "a list", str: "a string", type(None): "null"}.get(type(data), type(data).__name__)
        raise BottlecacheError(f"{where} must hold a JSON object, but holds {kind}; {advice}")
    if fmt is None:
        return
    if data.get("format") != fmt:
        raise BottlecacheError(
            f"{where} is not a {fmt} record (its 'format' is {_shown(data.get('format'))}, expected {fmt!r}); {advice}"
        )
    got = data.get("format_version")
    if isinstance(got, bool) or not isinstance(got, int):
        raise BottlecacheError(
            f"{where}: field 'format_version' must be an integer, got {_shown(got)}; {advice}"
        )
    if got != version:
        newer = "a newer" if got > version else "an older"
        raise BottlecacheError(
            f"{where} has format version {got}, written by {newer} bottlecache; this one reads version {version}. "
            f"{advice[0].upper() + advice[1:]}"
        )


def validate(data: Any, schema: type[T], where: str, advice: str, *, fmt: str | None = None,
             version: int | None = None) -> T:
    """``data`` checked against ``schema``; any fault is one line naming ``where`` and the field."""
    _check_format(data, where, fmt, version, advice)
    try:
        return schema.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "missing":
            raise BottlecacheError(f"{where}: field '{field}' is missing; {advice}") from None
        got = "" if first["type"] == "value_error" else f", got {_shown(first.get('input'))}"
        where_field = f"field '{field}'" if field else "its fields"
        raise BottlecacheError(f"{where}: {where_field}: {message}{got}; {advice}") from None


def _no_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


def read_json(path: Path, schema: type[T], advice: str, *, fmt: str | None = None, version: int | None = None) -> T:
    """Read and validate one JSON record file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BottlecacheError(f"{path} is missing; {advice}") from None
    except IsADirectoryError:
        raise BottlecacheError(f"{path} is a folder, not a record file; {advice}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise BottlecacheError(f"{path} cannot be read ({reason(error)}); {advice}") from None
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except ValueError as error:
        detail = f"{error.msg} at line {error.lineno}" if isinstance(error, json.JSONDecodeError) else reason(error)
        raise BottlecacheError(f"{path} is not valid JSON ({detail}); {advice}") from None
    return validate(data, schema, str(path), advice, fmt=fmt, version=version)


def differences(stored: dict, expected: dict, stored_as: str) -> str:
    """``key: <stored_as> has X, expected Y`` for each key of ``expected`` (None: any) that differs."""
    return "; ".join(
        f"{key}: {stored_as} has {stored.get(key)!r}, expected {value!r}"
        for key, value in expected.items()
        if value is not None and stored.get(key) != value
    )


def python_value(value: Any) -> Any:
    """An HDF5 attribute as a plain Python value (numpy scalars → int, float, bool, str)."""
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def to_json(record: BaseModel | dict) -> str:
    """Standard JSON of a record: a float that is not finite (a diverged loss) is written as null."""
    data = record.model_dump(mode="json") if isinstance(record, BaseModel) else record
    return json.dumps(_finite(data), indent=2, allow_nan=False, default=str)
