"""Export a head or a fine-tuned model as one deployable artifact, and check it through its own runtime.

The artifact takes RGB uint8 images at the model's size, (N, size, size, 3), and returns class
probabilities, (N, classes): the preprocessing (``layers.Preprocess``, which calls the project's
one ``data.preprocess``) and the backbone are inside it. Formats: a Keras ``.keras`` file, a
TensorFlow SavedModel (signature ``serve``), or a LiteRT flatbuffer, optionally quantized
(float16 weights, dynamic-range int8 weights, or full int8 calibrated on a sample of the cache's
train split).

The export folder holds the artifact, ``labels.txt`` (one class name a line, in output order) and
``export.json`` (what it is, and how it scored). It is written under a temporary name and renamed
into place only after the artifact, run by its own runtime (Keras, ``tf.saved_model``, the LiteRT
interpreter), was evaluated on the test split (else validation) and its accuracy is within
``tolerance`` points of the source model's on the same images.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.errors import BottlecacheError
from ..core.files import ensure_cache_dir, free_folder, staged_folder, write_error
from ..core.options import (
    DEFAULT_DATA,
    DEFAULT_MODEL,
    MAX_BATCH_SIZE,
    TTAS,
    check_choice,
    check_folder_option,
    check_positive,
    check_range,
    resolve_cache_dir,
    settings_with,
)
from ..core.progress import NullProgress
from ..core.records import (
    DECODE_FAST,
    DECODE_FULL,
    EXPORT_FORMAT,
    MODEL_FORMAT,
    RECORD_VERSION,
    ModelRecord,
    read_json,
    to_json,
)
from ..core.tf import import_keras, import_tf
from ..data.sources import image_dataset, open_source, preprocess
from ..models.engines import litert_converter
from ..train.heads import check_new_folder, compute_metrics, read_head_record
from .artifacts import (
    ARTIFACTS,
    FORMATS,
    LABELS_FILE,
    QUANTIZATIONS,
    RECORD_FILE,
    RUNTIMES,
    artifact_size,
    is_export,
    to_uint8,
)
from .predict import MODEL_ADVICE, load_model

DEFAULT_TOLERANCE = 1.0
DEFAULT_CALIBRATION = 200
MAX_CALIBRATION = 10_000


@dataclass
class SourceModel:
    """A head or fine-tuned model folder, loaded: the uint8 → probabilities Keras model built from
    it, and the ``Predictor`` that scores the source itself."""

    path: Path
    kind: str  # "head" or "model"
    class_names: list[str]
    image_size: int
    decode: str
    keras_model: object
    predictor: object
    cache_splits: dict | None = None  # a head: its cache's split specs and data identity
    cache_data: dict | None = None
    data_location: dict | None = None  # a head: where its cache's data was found (head.json "data")


@dataclass
class ExportResult:
    path: Path
    artifact: Path
    format: str
    quantize: str
    class_names: list[str]
    split: str
    n_images: int
    accuracy: float
    source_accuracy: float
    size_bytes: int
    source_size_bytes: int
    ms_per_image: float
    source_ms_per_image: float
    batch_size: int
    export_seconds: float
    evaluation: dict = field(default_factory=dict)

    @property
    def drop_points(self) -> float:
        return 100.0 * (self.source_accuracy - self.accuracy)

    def to_dict(self) -> dict:
        return {
            "path": str(self.path), "artifact": str(self.artifact), "format": self.format, "quantize": self.quantize,
            "class_names": self.class_names, "split": self.split, "n_images": self.n_images,
            "accuracy": self.accuracy, "source_accuracy": self.source_accuracy, "drop_points": self.drop_points,
            "size_bytes": self.size_bytes, "source_size_bytes": self.source_size_bytes,
            "size_ratio": self.size_bytes / self.source_size_bytes, "ms_per_image": self.ms_per_image,
            "source_ms_per_image": self.source_ms_per_image, "batch_size": self.batch_size,
            "export_seconds": round(self.export_seconds, 3),
        }


# ---------------------------------------------------------------------------------------------
# The source: a head or a fine-tuned model → one Keras model, uint8 images in, probabilities out


def probabilities_layer(logits, n_classes: int):
    """Logits → probabilities with built-in layers only: softmax over K logits; one binary logit z
    becomes [-z/2, z/2] first, whose softmax is exactly [1 - sigmoid(z), sigmoid(z)]."""
    keras = import_keras()
    if n_classes == 2 and logits.shape[-1] == 1:
        split = keras.layers.Dense(2, name="binary_to_two", trainable=False)
        logits = split(logits)
        split.set_weights([np.array([[-0.5, 0.5]], np.float32), np.zeros(2, np.float32)])
    return keras.layers.Softmax(name="probabilities")(logits)


def sklearn_as_keras(head, features, n_classes: int):
    """A fitted ``SklearnHead`` (logistic regression on the pooled features) as Keras layers on the
    base's output: the spatial mean, the same linear map, then probabilities over every class."""
    keras = import_keras()
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(features)
    linear = keras.layers.Dense(head.coef_.shape[0], name="logistic_regression", trainable=False)
    logits = linear(pooled)
    scale = 1.0 / head.temperature  # a calibrated head: its logits divided by its temperature
    linear.set_weights([(head.coef_.T * scale).astype(np.float32), (head.intercept_ * scale).astype(np.float32)])
    present = len(head.classes_)
    proba = probabilities_layer(logits, 2 if present == 2 else present)
    if present == n_classes and np.array_equal(head.classes_, np.arange(n_classes)):
        return proba
    scatter = keras.layers.Dense(n_classes, use_bias=False, name="to_all_classes", trainable=False)
    out = scatter(proba)  # a class absent from the training labels gets probability 0, as predict_proba gives it
    matrix = np.zeros((present, n_classes), np.float32)
    matrix[np.arange(present), head.classes_] = 1.0
    scatter.set_weights([matrix])
    return out


def uint8_model(network, image_size: int, n_classes: int, *, sklearn_head=None, model: str = DEFAULT_MODEL,
                temperature: float = 1.0):
    """uint8 images → ``Preprocess`` → ``network`` (logits, or the base's features for a scikit-learn
    head) → class probabilities; a calibrated Keras head's logits divided by its ``temperature``."""
    keras = import_keras()
    from ..models.layers import Preprocess

    inputs = keras.Input(shape=(image_size, image_size, 3), dtype="uint8", name="image")
    x = Preprocess(image_size, model, name="preprocess")(inputs)
    y = network(x, training=False)
    if sklearn_head is None and temperature != 1.0:
        y = keras.layers.Rescaling(1.0 / temperature, name="temperature")(y)
    proba = sklearn_as_keras(sklearn_head, y, n_classes) if sklearn_head is not None else probabilities_layer(y, n_classes)
    return keras.Model(inputs, proba, name="bottlecache_export")


def uint8_head_model(bases, specs, image_size: int, n_classes: int, loaded, tta: str = "none"):
    """uint8 images at ``image_size`` → each base at its own size and preprocessing (``specs``: one
    ``(size, model)`` per base) → the head: what ``predict.head_input`` computes, as one Keras model.
    A stack's bases give their pooled features side by side; ``tta`` ``flip`` averages each base's
    features of the image and of its mirror (``layers.Mirror``)."""
    keras = import_keras()
    from ..models.layers import Mirror, Preprocess

    inputs = keras.Input(shape=(image_size, image_size, 3), dtype="uint8", name="image")
    outputs = []
    for i, (base, (size, model)) in enumerate(zip(bases, specs)):
        if len(bases) > 1:
            base.name = f"base_{i}_{base.name}"  # two bases of one kind would share a layer name
        x = Preprocess(size, model, name=f"preprocess_{i}")(inputs)
        y = base(x, training=False)
        if tta == "flip":
            y = keras.layers.Average(name=f"mean_with_mirror_{i}")([y, base(Mirror(name=f"mirror_{i}")(x), training=False)])
        outputs.append(y)
    if len(outputs) > 1:
        pooled = [keras.layers.GlobalAveragePooling2D(name=f"pool_{i}")(y) for i, y in enumerate(outputs)]
        joined = keras.layers.Concatenate(name="stack")(pooled)
        features = keras.layers.Reshape((1, 1, joined.shape[-1]), name="as_map")(joined)
    else:
        features = outputs[0]
    head = loaded.head
    if loaded.kind == "sklearn":
        proba = sklearn_as_keras(head, features, n_classes)
    else:
        logits = head.model(features, training=False)
        if head.temperature != 1.0:
            logits = keras.layers.Rescaling(1.0 / head.temperature, name="temperature")(logits)
        proba = probabilities_layer(logits, n_classes)
    return keras.Model(inputs, proba, name="bottlecache_export")


def describe_source(path) -> SourceModel:
    """What a head or fine-tuned model folder is, from its records alone (nothing loaded yet): its
    classes, image size, decoding, and a head's cache's splits and data identity."""

    folder = Path(path)
    if is_export(folder):
        raise BottlecacheError(f"{folder} is already an export; pass the head or fine-tuned model folder it came from.")
    if folder.is_dir() and ((folder / "model.json").exists() or (folder / "model.keras").exists()):
        record = read_json(folder / "model.json", ModelRecord, MODEL_ADVICE, fmt=MODEL_FORMAT, version=RECORD_VERSION)
        return SourceModel(folder, "model", list(record.class_names), record.backbone.image_size, DECODE_FULL,
                           None, None)
    if folder.is_dir() and not (folder / "head.json").exists():
        raise BottlecacheError(
            f"{folder} is neither a fine-tuned model folder (model.json, model.keras) nor a head folder (head.json)."
        )
    record = read_head_record(folder)  # says what is wrong with a missing folder or a file, too
    config = record.cache.config
    # a stack's export takes the images at its largest base's size; each base resizes them to its own
    size = max(m.cache.config.image_size for m in record.stack.members) if record.stack else record.backbone.image_size
    return SourceModel(folder, "head", list(record.class_names), size, config.decode, None, None,
                       cache_splits=dict(config.splits), cache_data=dict(config.data), data_location=record.data)


def load_source(source: SourceModel, weights=None, tta: str | None = None) -> SourceModel:
    """Load what ``describe_source`` described: the source's ``Predictor`` (checked as ``predict``
    checks it) and the uint8 → probabilities Keras model built from the same files (``tta``: as
    ``predict.load_model`` takes it)."""

    predictor = load_model(source.path, weights=weights, tta=tta)  # the same networks, loaded once
    n, base_name = len(source.class_names), predictor.model
    if source.kind == "model":
        if predictor.tta != "none":
            raise BottlecacheError("The 'tta' option applies to heads only in an export; export the fine-tuned model "
                                   "without --tta.")
        model = uint8_model(predictor.parts["network"], source.image_size, n, model=base_name)
    elif len(predictor.parts["bases"]) > 1 or predictor.tta != "none":
        specs = [(size, name) for size, _, name in predictor.input_specs]
        model = uint8_head_model(predictor.parts["bases"], specs, source.image_size, n, predictor.parts["head"],
                                 predictor.tta)
    else:
        base, loaded = predictor.parts["bases"][0], predictor.parts["head"]
        if loaded.kind == "keras":
            keras = import_keras()
            model = uint8_model(keras.Sequential([base, loaded.head.model], name="base_and_head"), source.image_size, n,
                                model=base_name, temperature=loaded.head.temperature)
        else:
            model = uint8_model(base, source.image_size, n, sklearn_head=loaded.head, model=base_name)
    source.keras_model, source.predictor = model, predictor
    return source


def source_size_bytes(source: SourceModel) -> int:
    """The float32 bytes of the source's weights (backbone and head): what an unquantized copy needs."""
    return int(sum(int(np.prod(w.shape)) * 4 for w in source.keras_model.weights))


def default_data(source: SourceModel, data, tfds_data_dir=None) -> tuple:
    """``data`` as given; else, for a head, where its cache's build found the data (refused in one
    line if it is no longer there); else the default data set."""
    if data is not None or source.kind != "head" or not source.data_location:
        return (DEFAULT_DATA if data is None else data), tfds_data_dir
    where = source.data_location
    data = where.get("path") or where.get("given")
    if where.get("path") and not Path(where["path"]).is_dir():
        raise BottlecacheError(f"The head's data was at {where['path']} when its cache was built and is not there "
                               "now; pass --data with where it is.")
    return data, tfds_data_dir if tfds_data_dir is not None else where.get("tfds_data_dir")


def open_data(source: SourceModel, data, tfds_data_dir=None):
    """The image source: a head's cache's own splits (its data must be the cache's, checked by
    identity); a fine-tuned model's data with its own default splits."""

    splits = list(source.cache_splits.values()) if source.cache_splits else None
    opened = open_source(data, splits, tfds_data_dir=tfds_data_dir)
    if source.cache_data is not None and opened.identity != source.cache_data:
        raise BottlecacheError(
            f"The 'data' option {str(data)!r} is not the data the head's cache was built from (cache: "
            f"{source.cache_data.get('name')!r} with {source.cache_data.get('n_files', '?')} files; given: "
            f"{opened.identity.get('name')!r} with {opened.identity.get('n_files', '?')}); pass the --data given to "
            "`cache build`."
        )
    if opened.class_names != source.class_names:
        raise BottlecacheError(
            f"The 'data' option {str(data)!r} has the classes {opened.class_names}, the model {source.class_names}; "
            "pass the data the model was trained on."
        )
    return opened


def split_images(data_source, split: str, image_size: int, fast_decode: bool, *, model: str = DEFAULT_MODEL,
                 limit: int | None = None,
                 seed: int = 0, progress=None) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, size, size, 3) and labels of a split; ``limit``: a seeded random sample of it."""
    tf = import_tf()

    n = data_source.split(split).n_examples
    ordered = None
    if limit is not None and limit < n:
        chosen = tf.constant(np.sort(np.random.default_rng(seed).choice(n, limit, replace=False)), tf.int64)
        ordered = data_source.examples(split).filter(lambda i, k, y, e: tf.reduce_any(tf.equal(tf.cast(i, tf.int64), chosen)))
        n = limit
    ds = image_dataset(data_source, split, image_size, ordered=ordered, fast_decode=fast_decode, model=model).batch(32)
    images, labels = [], []
    progress = progress or NullProgress()
    progress.start_split(split, n, 0)
    for _, _, y, x in ds.as_numpy_iterator():
        images.append(to_uint8(x))
        labels.append(y)
        progress.advance(split, len(y))
    progress.end_split(split)
    if not images:
        raise BottlecacheError(f"No image of the split {split!r} decodes; nothing to evaluate on.")
    return np.concatenate(images), np.concatenate(labels).astype(np.int64)


def evaluation_split(data_source) -> str:
    for split in ("test", "validation"):
        if split in data_source.splits:
            return split
    raise BottlecacheError(
        f"The data has no 'test' or 'validation' split to evaluate the export on (it has "
        f"{', '.join(data_source.splits)}); build the cache with one."
    )


# ---------------------------------------------------------------------------------------------
# Writing each format


def write_artifact(model, fmt: str, quantize: str, folder: Path, calibration: np.ndarray | None) -> Path:
    target = folder / ARTIFACTS[fmt]
    if fmt == "keras":
        model.save(target)
    elif fmt == "saved_model":
        model.export(str(target), format="tf_saved_model", verbose=False)
    else:
        target.write_bytes(litert_flatbuffer(model, quantize, calibration))
    return target


def litert_flatbuffer(model, quantize: str, calibration: np.ndarray | None) -> bytes:
    tf = import_tf()
    converter = litert_converter(model)
    if quantize != "none":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == "float16":
        converter.target_spec.supported_types = [tf.float16]
    elif quantize == "int8":
        def representative():
            for image in calibration:
                yield [image[None]]

        converter.representative_dataset = representative
    return converter.convert()


def run_batches(runtime, images: np.ndarray, batch_size: int, progress=None, label: str = "evaluate"):
    """Probabilities of every image and the milliseconds per image of the timed batches (the first
    batch, which traces or allocates, is run again and not timed)."""
    progress = progress or NullProgress()
    runtime(images[:batch_size])  # warm-up: tracing, tensor allocation
    outputs, seconds = [], 0.0
    progress.start_split(label, len(images), 0)
    for lo in range(0, len(images), batch_size):
        batch = images[lo : lo + batch_size]
        started = time.perf_counter()
        outputs.append(np.asarray(runtime(batch), np.float64))
        seconds += time.perf_counter() - started
        progress.advance(label, len(batch))
    progress.end_split(label)
    proba = np.concatenate(outputs)  # float32 outputs (and int8 steps) may miss a sum of 1 by rounding
    return proba / np.maximum(proba.sum(axis=1, keepdims=True), 1e-12), 1000.0 * seconds / len(images)


# ---------------------------------------------------------------------------------------------
# The export


def check_export_options(fmt, quantize, tolerance, calibration, batch_size) -> None:
    check_choice("format", fmt, FORMATS)
    check_choice("quantize", quantize, QUANTIZATIONS)
    if fmt != "litert" and quantize != "none":
        raise BottlecacheError(
            f"The 'quantize' option applies to --format litert only. Got {quantize!r} with --format {fmt}; "
            "leave --quantize out or pass --format litert."
        )
    check_range("tolerance", tolerance, 0.0, 100.0, float, high_open=False)
    check_positive("calibration", calibration, maximum=MAX_CALIBRATION)
    check_positive("batch_size", batch_size, maximum=MAX_BATCH_SIZE)


def default_out(source: SourceModel, fmt: str, quantize: str, cache_dir=None) -> Path:
    base = ensure_cache_dir(resolve_cache_dir(cache_dir)) / "exports"
    name = f"{source.path.resolve().name}-{fmt}" + (f"-{quantize}" if quantize != "none" else "")
    return free_folder(base / name)


@dataclass(frozen=True)
class ExportSettings:
    """What an export writes and how it is checked, validated once on creation.

    ``format`` ``keras``, ``saved_model`` or ``litert``; ``quantize`` (LiteRT only) ``none``,
    ``float16``, ``dynamic`` or ``int8`` (calibrated on ``calibration`` train images sampled with
    ``seed``). ``tta``: ``flip`` puts test-time flips inside the artifact (the mean of the logits of
    each image and its mirror), ``none`` leaves them out; None: as the head was trained. The artifact is evaluated against the source model on ``data`` (a head: the data its
    cache was built from, checked; by default where that build found it; a fine-tuned model:
    ``cats_vs_dogs`` by default; ``tfds_data_dir`` for a tfds name), ``batch_size`` images at a
    time, and refused if it loses more than ``tolerance`` accuracy points. ``weights``: where a
    head's base weights are found (their sha256 must match the head's record).
    """

    format: str = "litert"
    quantize: str = "none"
    data: str | None = None
    tfds_data_dir: str | None = None
    weights: str | None = None
    tolerance: float = DEFAULT_TOLERANCE
    calibration: int = DEFAULT_CALIBRATION
    batch_size: int = 32
    seed: int = 0
    tta: str | None = None

    def __post_init__(self):
        check_export_options(self.format, self.quantize, self.tolerance, self.calibration, self.batch_size)
        if self.tta is not None:
            check_choice("tta", self.tta, TTAS)
        if self.tfds_data_dir is not None:
            object.__setattr__(self, "tfds_data_dir", str(check_folder_option("tfds_data_dir", self.tfds_data_dir)))


def export_model(model, format: str | None = None, quantize: str | None = None, *,
                 settings: ExportSettings | None = None, out=None, cache_dir=None, progress=None,
                 **overrides) -> ExportResult:
    """Export a head or fine-tuned model folder as one artifact, evaluated through its own runtime.

    Parameters
    ----------
    model : path
        A head folder (``cache train-head``) or a fine-tuned model folder (``finetune run``).
    format, quantize : str, optional
        ``settings.format`` (default ``litert``) and ``settings.quantize`` (default ``none``).
    settings : ExportSettings, optional
        The format, the evaluation data, the tolerance (``ExportSettings``); keywords name its
        fields and override them.
    out : path, optional
        A new (or empty) folder; default ``<cache dir>/exports/<model folder>-<format>[-<quantize>]``.
    cache_dir : path, optional
    progress : bottlecache.core.progress.Progress, optional
    **overrides
        Fields of ``ExportSettings`` by name.

    Returns
    -------
    ExportResult
        Raises ``BottlecacheError`` (and writes nothing) if the artifact lost more than ``tolerance``.
    """

    for name, value in (("format", format), ("quantize", quantize)):
        if value is not None:
            overrides[name] = value
    (settings,) = settings_with("export_model", {ExportSettings: settings}, overrides)
    format, quantize, data, weights = settings.format, settings.quantize, settings.data, settings.weights
    resolve_cache_dir(cache_dir)
    if out is not None:
        out = check_folder_option("out", out)
        check_new_folder(out)
    progress = progress or NullProgress()
    started = time.perf_counter()
    source = describe_source(model)
    data, tfds_data_dir = default_data(source, data, settings.tfds_data_dir)
    data_source = open_data(source, data, tfds_data_dir)  # bad data is refused before anything loads
    load_source(source, weights, settings.tta)
    fast = source.decode == DECODE_FAST
    split = evaluation_split(data_source)
    calibration_images = None
    if quantize == "int8":
        if "train" not in data_source.splits:
            raise BottlecacheError("int8 calibration needs a 'train' split; the data has "
                                   f"{', '.join(data_source.splits)}. Use --quantize dynamic instead.")
        calibration_images, _ = split_images(data_source, "train", source.image_size, fast, model=source.predictor.model,
                                             limit=settings.calibration, seed=settings.seed, progress=progress)
    images, labels = split_images(data_source, split, source.image_size, fast, model=source.predictor.model,
                                   progress=progress)
    out = Path(out) if out is not None else default_out(source, format, quantize, cache_dir)
    try:
        with staged_folder(out) as staging:
            progress.message(f"exporting {format}" + (f" ({quantize})" if quantize != "none" else ""))
            artifact = write_artifact(source.keras_model, format, quantize, staging, calibration_images)
            export_seconds = time.perf_counter() - started
            result = _evaluate(source, format, quantize, artifact, images, labels, split, settings.batch_size,
                               progress)
            result.export_seconds = export_seconds
            if result.drop_points > settings.tolerance:
                raise BottlecacheError(
                    f"The {format} export{'' if quantize == 'none' else f' ({quantize})'} lost "
                    f"{result.drop_points:.2f} accuracy points on the {split} split ({100 * result.accuracy:.2f}% "
                    f"against the source's {100 * result.source_accuracy:.2f}%), more than --tolerance "
                    f"{settings.tolerance:g}; nothing was written."
                )
            _write_record(staging, source, format, quantize, result)
    except OSError as error:
        raise write_error(out, error, "nothing was written") from None
    result.path, result.artifact = out, out / ARTIFACTS[format]
    return result


def _evaluate(source, fmt, quantize, artifact, images, labels, split, batch_size, progress) -> ExportResult:
    def source_batch(x):  # each base's input from the same uint8 images the export gets
        inputs = [np.asarray(preprocess(x, size, model)) for size, _, model in source.predictor.input_specs]
        return source.predictor._predict_batch(inputs if source.predictor.inputs else inputs[0])

    source_proba, source_ms = run_batches(source_batch, images, batch_size, progress, "source model")
    proba, ms = run_batches(RUNTIMES[fmt](artifact), images, batch_size, progress, f"{fmt} export")
    metrics = compute_metrics(labels, proba, source.class_names)
    source_metrics = compute_metrics(labels, source_proba, source.class_names)
    agreement = float((proba.argmax(1) == source_proba.argmax(1)).mean())
    evaluation = {"split": split, "metrics": metrics, "source_metrics": source_metrics,
                  "agreement": agreement, "max_abs_diff": float(np.max(np.abs(proba - source_proba)))}
    return ExportResult(
        artifact, artifact, fmt, quantize, source.class_names, split, len(labels), metrics["accuracy"],
        source_metrics["accuracy"], artifact_size(artifact), source_size_bytes(source), ms, source_ms,
        batch_size, 0.0, evaluation,
    )


def _write_record(folder: Path, source: SourceModel, fmt: str, quantize: str, result: ExportResult) -> None:
    (folder / LABELS_FILE).write_text("".join(f"{name}\n" for name in source.class_names), encoding="utf-8")
    record = {
        "format": EXPORT_FORMAT, "format_version": RECORD_VERSION, "artifact_format": fmt, "quantize": quantize,
        "artifact": ARTIFACTS[fmt], "class_names": source.class_names, "image_size": source.image_size,
        "decode": source.decode, "source": str(source.path.resolve()), "tta": source.predictor.tta,
        "bases": [{"model": model, "image_size": size} for size, _, model in source.predictor.input_specs],
        "evaluation": result.to_dict() | {k: v for k, v in result.evaluation.items() if k != "split"},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for key in ("path", "artifact"):
        record["evaluation"].pop(key, None)
    (folder / RECORD_FILE).write_text(to_json(record), encoding="utf-8")
