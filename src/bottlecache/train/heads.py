"""Heads trained on cached features: logistic regression (scikit-learn) on the pooled features,
and the tutorial's Keras head (GlobalAveragePooling2D → Dropout → Dense) on the full bottleneck.

A head is saved as a folder: ``head.json`` (kind, classes, parameters, the cache's fingerprint
and config), the model (``head.keras``, or ``head.npz`` arrays for scikit-learn: no pickle),
and ``metrics.json``. ``load_head`` reads it back and predicts from features.
"""

from __future__ import annotations

import os
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..cache.stack import StackedCache, open_stack
from ..cache.store import Cache, open_cache
from ..core.errors import BottlecacheError, CacheMismatchError, reason
from ..core.files import ensure_cache_dir, free_folder, newest_first, staged_folder, write_error
from ..core.options import (
    MAX_BATCH_SIZE,
    MAX_EPOCHS,
    TTAS,
    check_choice,
    check_folder_option,
    check_fraction,
    check_positive,
    check_seed,
    parse_size,
    resolve_cache_dir,
    settings_with,
)
from ..core.records import HEAD_FORMAT, RECORD_VERSION, HeadRecord, MetricsRecord, differences, read_json, to_json
from ..core.tf import import_keras
from .calibration import ECE_BINS, expected_calibration_error, fit_temperature, mean_log_loss, probabilities_from_logits
from .exclusion import Exclusion
from .linear import fit_blocks, kept_blocks
from .views import ViewEpochs, check_views, pooled_rows

KINDS = ("sklearn", "keras")
CLASS_WEIGHTS = ("none", "balanced")  # balanced: each class weighted n / (k * its count), as scikit-learn's
OPTIMIZERS = ("rmsprop", "adam")
BACKBONE_KEYS = ("model", "alpha", "preprocess", "image_size", "weights_sha256", "preprocess_version")
MAX_C = 1e12
MAX_LEARNING_RATE = 10.0
HEAD_ADVICE = "train the head again with `bottlecache cache train-head`"


# ---------------------------------------------------------------------------------------------
# Metrics


def compute_metrics(labels: np.ndarray, proba: np.ndarray, class_names: list[str]) -> dict:
    """Accuracy, balanced accuracy (the mean recall over the classes present), log loss, per-class
    precision / recall / F1, confusion matrix, expected calibration error (10 bins), ROC AUC (2 classes)."""
    from sklearn import metrics

    k = len(class_names)
    predicted = proba.argmax(axis=1)
    precision, recall, f1, support = metrics.precision_recall_fscore_support(
        labels, predicted, labels=range(k), zero_division=0
    )
    out = {
        "n": int(len(labels)),
        "accuracy": float(metrics.accuracy_score(labels, predicted)),
        "balanced_accuracy": balanced_accuracy(labels, predicted),
        "log_loss": float(metrics.log_loss(labels, np.clip(proba, 1e-15, 1.0), labels=range(k))),
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(class_names, precision, recall, f1, support)
        },
        "confusion_matrix": metrics.confusion_matrix(labels, predicted, labels=range(k)).tolist(),
        "ece": expected_calibration_error(labels, proba, ECE_BINS),
    }
    if k == 2 and len(set(labels.tolist())) == 2:
        out["roc_auc"] = float(metrics.roc_auc_score(labels, proba[:, 1]))
    return out


def balanced_accuracy(labels: np.ndarray, predicted: np.ndarray) -> float:
    """The mean over the classes present in ``labels`` of their recall (scikit-learn's definition)."""
    import warnings

    from sklearn import metrics

    with warnings.catch_warnings():  # a predicted class absent from labels: its recall is not counted
        warnings.simplefilter("ignore")
        return float(metrics.balanced_accuracy_score(labels, predicted)) if len(labels) else 0.0


def class_weights(labels: np.ndarray, n_classes: int) -> dict[int, float]:
    """``balanced`` weights: class i gets n / (classes present * count of i); an absent class none."""
    counts = np.bincount(labels, minlength=n_classes)
    present = int((counts > 0).sum())
    return {i: float(len(labels) / (present * c)) for i, c in enumerate(counts) if c > 0}


# ---------------------------------------------------------------------------------------------
# Heads


class SklearnHead:
    """Logistic regression on the pooled (N, 1280) features.

    Parameters
    ----------
    C : float
        Inverse regularisation strength (positive).
    max_iter : int
    class_weight : {"none", "balanced"}
        ``balanced`` weighs each class by the inverse of its frequency in the training labels.
    """

    kind = "sklearn"
    temperature = 1.0  # logits are divided by it (bottlecache.train.calibration); 1: as fitted

    def __init__(self, C: float = 1.0, max_iter: int = 2000, class_weight: str = "none"):
        self.C = C
        self.max_iter = max_iter
        self.class_weight = class_weight

    def fit(self, pooled: np.ndarray, labels: np.ndarray, n_classes: int | None = None) -> "SklearnHead":
        """``n_classes``: the number of columns of ``predict_proba`` (a class absent from ``labels``
        gets probability 0); default the largest label + 1."""
        from sklearn.linear_model import LogisticRegression

        weights = None if self.class_weight == "none" else self.class_weight
        model = LogisticRegression(C=self.C, max_iter=self.max_iter, class_weight=weights)
        model.fit(pooled, labels)
        self.coef_, self.intercept_, self.classes_ = model.coef_, model.intercept_, model.classes_
        self.n_classes_ = int(n_classes or self.classes_.max() + 1)
        return self

    def fit_blocks(self, blocks, labels: np.ndarray, n_features: int, n_classes: int | None = None) -> "SklearnHead":
        """Fit from blocks of rows (``bottlecache.train.linear.fit_blocks``: the same objective as
        ``fit``, memory for one block); ``labels`` the training rows' labels, all of them."""
        found = fit_blocks(blocks, labels, n_features, self.C, class_weight=self.class_weight, max_iter=self.max_iter)
        self.coef_, self.intercept_, self.classes_ = found.coef, found.intercept, found.classes
        self.n_classes_ = int(n_classes or self.classes_.max() + 1)
        self.passes_, self.converged_ = found.passes, found.converged
        return self

    def decision_function(self, features: np.ndarray) -> np.ndarray:
        if not hasattr(self, "coef_"):
            raise BottlecacheError("This SklearnHead is not fitted yet; call fit() or load_head() first.")
        x = np.asarray(features, dtype=np.float32)
        if x.ndim == 4:  # full bottleneck → its spatial mean, exactly as `pooled` is stored
            x = x.mean(axis=(1, 2))
        return x.astype(np.float64) @ self.coef_.T + self.intercept_

    def logits(self, features: np.ndarray) -> np.ndarray:
        return self.decision_function(features)

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """Class probabilities (N, K) from pooled (N, 1280) or full (N, s, s, 1280) features."""
        proba = probabilities_from_logits(self.decision_function(features) / self.temperature)
        full = np.zeros((len(proba), self.n_classes_))
        full[:, self.classes_] = proba
        return full

    def save(self, folder: Path) -> None:
        np.savez(folder / "head.npz", coef=self.coef_, intercept=self.intercept_, classes=self.classes_,
                 C=np.array(self.C), n_classes=np.array(self.n_classes_))

    @classmethod
    def load(cls, folder: Path, record: HeadRecord | None = None) -> "SklearnHead":
        """Load ``head.npz`` (plain arrays, no pickle) and check it against its record."""
        path = Path(folder) / "head.npz"
        try:
            with np.load(path, allow_pickle=False) as arrays:
                values = {key: arrays[key] for key in arrays.files}
        except FileNotFoundError:
            raise BottlecacheError(f"{path} is missing; {HEAD_ADVICE}.") from None
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as error:  # zero bytes, truncated zip, object arrays
            raise BottlecacheError(f"{path} is damaged or not a head's arrays ({reason(error, 80)}); {HEAD_ADVICE}.") from None
        missing = [key for key in ("coef", "intercept", "classes", "C") if key not in values]
        if missing:
            raise BottlecacheError(f"{path} has no array {', '.join(missing)}; {HEAD_ADVICE}.")
        coef, intercept, classes = values["coef"], values["intercept"], values["classes"]
        n_classes = int(values["n_classes"]) if "n_classes" in values else None
        expected_k = len(record.class_names) if record else n_classes
        problems = []
        C = values["C"]
        if coef.dtype.kind != "f" or intercept.dtype.kind != "f" or classes.dtype.kind not in "iu":
            problems.append("arrays of the wrong type")
        elif C.dtype.kind not in "fiu" or C.size != 1 or not np.isfinite(C).all() or float(C.reshape(-1)[0]) <= 0:
            problems.append(f"C is {C.tolist()!r}, not a positive number")
        elif coef.ndim != 2 or intercept.shape != (coef.shape[0],) or classes.ndim != 1:
            problems.append(f"coef {coef.shape} and intercept {intercept.shape} do not fit")
        elif record and coef.shape[1] != record.feature_shape[-1]:
            problems.append(f"coef has {coef.shape[1]} features, the record {record.feature_shape[-1]}")
        elif len(classes) < 2 or coef.shape[0] != (1 if len(classes) == 2 else len(classes)):
            problems.append(f"{len(classes)} classes do not fit coef {coef.shape}")
        elif expected_k is not None and (classes.min() < 0 or classes.max() >= expected_k):
            problems.append(f"class indices {classes.tolist()} outside the {expected_k} classes")
        elif n_classes is not None and expected_k != n_classes:
            problems.append(f"{n_classes} classes, the record {expected_k}")
        elif not (np.all(np.isfinite(coef)) and np.all(np.isfinite(intercept))):
            problems.append("weights that are not finite")
        if problems:
            raise BottlecacheError(f"{path} does not match its head.json: {problems[0]}; {HEAD_ADVICE}.")
        head = cls(C=float(C.reshape(-1)[0]))
        head.coef_, head.intercept_, head.classes_ = coef, intercept, classes
        head.n_classes_ = int(expected_k if expected_k is not None else classes.max() + 1)
        return head


def build_head_model(feature_shape, n_classes: int, dropout: float = 0.2):
    """The tutorial's head: GlobalAveragePooling2D → Dropout → Dense(1) (2 classes) or Dense(K).

    It takes exactly the tensor the frozen base gives and outputs logits, so it can be put on
    top of the base unchanged.
    """
    keras = import_keras()
    inputs = keras.Input(shape=tuple(feature_shape), name="bottleneck")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(inputs)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    outputs = keras.layers.Dense(1 if n_classes == 2 else n_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="head")


# Steps the Keras head runs per call into its compiled training function. The head's own work per
# batch of 32 is tiny, so Keras's per-step overhead dominated: 16 steps per call halved the epoch
# (0.75-0.79 s -> 0.39-0.42 s with validation in batches of 256, 2,000 train / 1,000 validation images,
# this 2-core machine). The batches, their order and the updates are unchanged.
HEAD_STEPS_PER_EXECUTION = 16
EVAL_BATCH_SIZE = 256


def compile_for(model, n_classes: int, learning_rate: float, optimizer: str = "rmsprop", steps_per_execution: int = 1):
    keras = import_keras()
    opt = (keras.optimizers.RMSprop if optimizer == "rmsprop" else keras.optimizers.Adam)(learning_rate=learning_rate)
    if n_classes == 2:
        loss = keras.losses.BinaryCrossentropy(from_logits=True)
        acc = keras.metrics.BinaryAccuracy(threshold=0.0, name="accuracy")
    else:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        acc = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
    model.compile(optimizer=opt, loss=loss, metrics=[acc], steps_per_execution=steps_per_execution)
    return model


def best_weights_callback(monitor: str = "val_loss", patience: int | None = None):
    """Keep the best epoch's weights (by ``monitor``); stop after ``patience`` epochs without gain."""
    keras = import_keras()
    return keras.callbacks.EarlyStopping(
        monitor=monitor, patience=patience if patience else 10**9, restore_best_weights=True, mode="min"
    )


def epoch_timer(seconds: list, progress=None, epochs: int = 0):
    """A callback appending each epoch's wall seconds (training and validation) to ``seconds``, and
    advancing ``progress``'s "epochs" bar (of ``epochs``) as each ends."""
    keras = import_keras()

    class EpochTimer(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            if progress is not None:
                progress.start_split("epochs", epochs, 0)

        def on_epoch_begin(self, epoch, logs=None):
            self._started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            seconds.append(time.perf_counter() - self._started)
            if progress is not None:
                progress.advance("epochs", 1)

        def on_train_end(self, logs=None):
            if progress is not None:
                progress.end_split("epochs")

    return EpochTimer()


class KerasHead:
    """The tutorial's head, on the cached (s, s, 1280) features."""

    kind = "keras"
    temperature = 1.0  # logits are divided by it (bottlecache.train.calibration); 1: as trained

    def __init__(self, model=None):
        self.model = model

    def logits(self, features: np.ndarray, batch_size: int = EVAL_BATCH_SIZE) -> np.ndarray:
        if self.model is None:
            raise BottlecacheError("This KerasHead is not fitted yet; train it or load_head() it first.")
        x = np.asarray(features, dtype=np.float32)
        return np.concatenate([np.asarray(self.model(x[i : i + batch_size], training=False))
                               for i in range(0, len(x), batch_size)] or [np.zeros((0, 1))])

    def predict_proba(self, features: np.ndarray, batch_size: int = EVAL_BATCH_SIZE) -> np.ndarray:
        return probabilities_from_logits(self.logits(features, batch_size) / self.temperature)

    def save(self, folder: Path) -> None:
        self.model.save(folder / "head.keras")

    @classmethod
    def load(cls, folder: Path, record: HeadRecord | None = None) -> "KerasHead":
        path = Path(folder) / "head.keras"
        model = load_keras_file(path, advice=HEAD_ADVICE)
        if record is not None:
            n_outputs = 1 if len(record.class_names) == 2 else len(record.class_names)
            check_model_shapes(model, path, (None, *record.feature_shape), n_outputs, HEAD_ADVICE)
        return cls(model)


def check_model_shapes(model, path: Path, input_shape: tuple, n_outputs: int, advice: str) -> None:
    """A loaded Keras model must take ``input_shape`` and give ``n_outputs`` logits, as its record says."""
    try:
        got_in, got_out = tuple(model.input_shape), tuple(model.output_shape)
    except (AttributeError, ValueError, TypeError):
        raise BottlecacheError(f"{path} is not a single-input, single-output model; {advice}.") from None
    if got_in != tuple(input_shape) or got_out[1:] != (n_outputs,):
        raise BottlecacheError(
            f"{path} does not match its record: it takes {list(got_in[1:])} and gives {got_out[-1]} outputs, the record "
            f"says {list(input_shape[1:])} and {n_outputs}; {advice}."
        )


def load_keras_file(path: Path, compile: bool = False, advice: str = "save it again"):
    """Load a ``.keras`` file in safe mode: a file that would run code (a Lambda layer) is refused."""
    import zipfile

    keras = import_keras()
    from ..models import layers  # noqa: F401  (registers InferenceMode, the project's one custom layer)

    path = Path(path)
    if not path.is_file():
        raise BottlecacheError(f"{path} is missing; {advice}.")
    if not zipfile.is_zipfile(path):
        raise BottlecacheError(f"{path} is damaged or not a .keras file (not a zip archive); {advice}.")
    try:
        with quiet_keras():
            return keras.saving.load_model(path, safe_mode=True, compile=compile)
    except Exception as error:
        text = reason(error)
        if "safe_mode" in text or "lambda" in text.lower():
            raise BottlecacheError(f"{path} holds code (a Lambda layer) and is refused in safe mode; {advice}.") from None
        raise BottlecacheError(f"{path} cannot be loaded ({text}); {advice}.") from None


def quiet_keras():
    """Keras's own warnings and prints off, while a failure is turned into one line of ours."""
    import contextlib
    import io
    import warnings

    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    sink = io.StringIO()
    stack.enter_context(contextlib.redirect_stdout(sink))
    stack.enter_context(contextlib.redirect_stderr(sink))
    return stack


# ---------------------------------------------------------------------------------------------
# Training


@dataclass
class HeadResult:
    head: object
    kind: str
    metrics: dict  # split → metrics
    train_seconds: float
    params: dict
    path: Path | None = None
    selection: list = field(default_factory=list)  # C → validation accuracy (sklearn)
    history: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "path": str(self.path) if self.path else None,
            "train_seconds": round(self.train_seconds, 3),
            "params": self.params,
            "selection": self.selection,
            "metrics": self.metrics,
        }


def memory_budget() -> int:
    """The default ``max_memory``: a quarter of the memory free now."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError, AttributeError):
        return 2 << 30


@dataclass(frozen=True)
class HeadSettings:
    """How a head is trained, checked once on creation (each message names the option).

    ``kind`` ``sklearn`` (logistic regression on the pooled features, one fit per ``C``; the best
    validation accuracy wins, ties to the smaller C) or ``keras`` (the tutorial's head on the
    bottleneck: ``epochs``, ``batch_size``, ``learning_rate``, ``optimizer``, ``dropout``,
    ``seed``, ``early_stopping`` as a patience in epochs, ``shuffle``; the best epoch by
    validation loss is kept). ``class_weight`` ``balanced`` weighs each class by n / (k * its
    count) for both kinds. ``train_split`` is the split fitted; ``max_memory`` (bytes, or ``"16M"``,
    ``"2G"``; default a quarter of the free memory) the features a head may hold: above it the Keras
    head streams from the file and the scikit-learn head fits out of core
    (``bottlecache.train.linear``); ``views`` trains on the
    cache's augmented views (``bottlecache.train.views``). ``exclude``: keys left out of training (a
    file of keys, one a line, as ``cache audit`` writes, or the keys; ``bottlecache.train.exclusion``).
    ``calibrate``: fit a temperature on the validation split (``bottlecache.train.calibration``).
    ``tta`` ``flip``: measure (and calibrate) the head on the mean of the logits of each image and its
    mirror, from a cache built with ``--tta flip``; recorded, so that predict, report and export do the same.
    """

    kind: str = "sklearn"
    C: tuple[float, ...] = (1.0,)
    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 1e-4
    optimizer: str = "rmsprop"
    dropout: float = 0.2
    seed: int = 0
    early_stopping: int | None = None
    shuffle: bool = True
    class_weight: str = "none"
    train_split: str = "train"
    max_memory: int | None = None
    verbose: int = 0
    views: bool = False
    exclude: object = None  # → Exclusion | None
    calibrate: bool = False
    tta: str = "none"

    def __post_init__(self):
        check_choice("kind", self.kind, KINDS)
        check_choice("tta", self.tta, TTAS)
        object.__setattr__(self, "exclude", Exclusion.of(self.exclude))
        if self.exclude is not None and self.views:
            raise BottlecacheError("The 'exclude' option does not apply to --views yet; train without --views, or "
                                   "rebuild the cache without the excluded photos.")
        if self.max_memory is not None:
            object.__setattr__(self, "max_memory", parse_size("max_memory", self.max_memory))
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("class_weight", self.class_weight, CLASS_WEIGHTS)
        Cs = (self.C,) if isinstance(self.C, (int, float)) else tuple(self.C)
        if not Cs:
            raise BottlecacheError("The 'C' option needs at least one value. Got none.")
        for value in Cs:
            check_positive("C", value, float, maximum=MAX_C)
        object.__setattr__(self, "C", Cs)
        check_positive("epochs", self.epochs, maximum=MAX_EPOCHS)
        check_positive("batch_size", self.batch_size, maximum=MAX_BATCH_SIZE)
        check_positive("learning_rate", self.learning_rate, float, maximum=MAX_LEARNING_RATE)
        check_fraction("dropout", self.dropout)
        check_seed(self.seed)
        if self.early_stopping is not None:
            check_positive("early_stopping", self.early_stopping, maximum=MAX_EPOCHS)


def train_head(cache, kind: str | None = None, *, settings: HeadSettings | None = None, evaluate=None, out=None,
               save: bool = True, cache_dir=None, progress=None, **overrides) -> HeadResult:
    """Fit a head on a cache's ``train`` split and measure it on every other split.

    Parameters
    ----------
    cache : Cache or str or path, or a list of them
        An open ``Cache``, a cache file, or a fingerprint prefix in ``cache_dir``; several: a stack of
        caches of the same photos, their pooled features joined per key (``bottlecache.cache.stack``).
    kind : {"sklearn", "keras"}, optional
        ``settings.kind`` (default ``sklearn``).
    settings : HeadSettings, optional
        How the head is trained; keywords name its fields (``C=[0.1, 1]``, ``epochs=20``) and
        override them.
    evaluate : sequence of str, optional
        The splits to measure the head on; default every split but ``train_split``. (``sweep``
        measures its candidates on validation only, so that no test figure can sway the choice.)
    out : path, optional
        Folder to save the head in; default ``<cache dir>/heads/<kind>-<fingerprint12>-<time>``.
    cache_dir : path, optional
        Where a fingerprint prefix is looked up, and where heads are saved by default.
    progress : bottlecache.core.progress.Progress, optional
        A Keras head's epochs, as an "epochs" bar.
    **overrides
        Fields of ``HeadSettings`` by name.

    Returns
    -------
    HeadResult
    """

    if kind is not None:
        overrides["kind"] = kind
    (settings,) = settings_with("train_head", {HeadSettings: settings}, overrides)
    kind, train_split, views = settings.kind, settings.train_split, settings.views
    resolve_cache_dir(cache_dir)  # a bad --cache-dir is refused even where a cache path makes it unused
    if out is not None:
        out = check_folder_option("out", out)
        check_new_folder(out)
    opened = not isinstance(cache, (Cache, StackedCache))
    if opened:
        stacked = isinstance(cache, (list, tuple)) and len(cache) > 1
        one = cache[0] if isinstance(cache, (list, tuple)) and len(cache) == 1 else cache
        cache = open_stack(cache, cache_dir) if stacked else open_cache(one, cache_dir)
    try:
        if train_split not in cache.splits:
            raise BottlecacheError(f"The cache has no {train_split!r} split to train on. It has {', '.join(cache.splits)}.")
        if cache.config.get("cut"):
            raise BottlecacheError(
                f"{cache.path.name} holds the activations at the cut {cache.config['cut']['layer']} (for "
                "`finetune run --from-cache`); heads train on a bottleneck cache (cache build without --cut)."
            )
        if views:
            if isinstance(cache, StackedCache):
                raise BottlecacheError("The 'views' option does not apply to a stack of caches yet; train the stack "
                                       "without --views.")
            check_views(cache, train_split)
        if settings.tta != "none" and cache.tta != settings.tta:
            raise BottlecacheError(f"The 'tta' option {settings.tta} needs the mirrored features of the evaluation "
                                   f"splits, and {describe(cache)} has none; build it with `cache build --tta flip`, "
                                   "or leave out --tta.")
        if settings.calibrate and ("validation" not in cache.splits or train_split == "validation"):
            raise BottlecacheError("Calibrating fits a temperature on a 'validation' split, and this cache has none "
                                   "to spare; build it with --split validation=... or leave out --calibrate.")
        eval_splits = [s for s in cache.splits if s != train_split] if evaluate is None else list(evaluate)
        unknown = [s for s in eval_splits if s not in cache.splits or s == train_split]
        if unknown:
            raise BottlecacheError(f"The 'evaluate' option names splits other than {train_split!r} of the cache "
                                   f"({', '.join(s for s in cache.splits if s != train_split)}). Got {unknown[0]!r}.")
        has_validation = "validation" in cache.splits
        n_classes = len(cache.class_names)
        keep, excluded = (None, []) if settings.exclude is None else settings.exclude.rows_kept(cache, train_split)
        train_labels = cache.labels(train_split)
        present = np.unique(train_labels if keep is None else train_labels[keep]).tolist()
        if len(present) < 2:
            found = ", ".join(cache.class_names[i] for i in present) or "no examples"
            raise BottlecacheError(
                f"The {train_split!r} split has examples of fewer than two classes ({found}); a classifier needs "
                "at least two. Build the cache with a larger train split."
            )
        if kind == "sklearn":
            if len(settings.C) > 1 and not has_validation:
                raise BottlecacheError(
                    "Choosing among several C values needs a 'validation' split, and this cache has none; "
                    "pass one --C or build the cache with a validation split (--split validation=...)."
                )
            result = _train_sklearn(cache, list(settings.C), train_split, has_validation, settings.class_weight, views,
                                    keep, settings.max_memory or memory_budget())
        else:
            result = _train_keras(
                cache, n_classes, train_split, has_validation, epochs=settings.epochs, batch_size=settings.batch_size,
                learning_rate=settings.learning_rate, optimizer=settings.optimizer, dropout=settings.dropout,
                seed=settings.seed, early_stopping=settings.early_stopping, shuffle=settings.shuffle,
                max_memory=settings.max_memory or memory_budget(), verbose=settings.verbose,
                class_weight=settings.class_weight, views=views, progress=progress, keep=keep,
            )
        result.params["views"] = cache.n_views if views else 0
        if settings.tta != "none":
            result.params["tta"] = settings.tta
        if settings.calibrate:
            calibrate(result, cache, settings.tta)
        if settings.exclude is not None:
            result.params["exclude"] = settings.exclude.record(excluded)
        for split in eval_splits:
            proba = predict_split(result.head, cache, split, settings.tta)
            result.metrics[split] = compute_metrics(cache.labels(split), proba, cache.class_names)
        if save:
            result.path = save_head(result, cache, out, cache_dir)
        return result
    finally:
        if opened:
            cache.close()


def describe(cache) -> str:
    """A cache's file name, or a stack's members' (for messages)."""
    if isinstance(cache, StackedCache):
        return "the stack of " + ", ".join(m.path.name for m in cache.members)
    return cache.path.name


def calibrate(result: HeadResult, cache, tta: str = "none") -> None:
    """Fit the head's temperature on the validation split's logits (with ``tta``, the mean of each
    image's and its mirror's); record it and the validation expected calibration error and log loss
    before and after."""
    labels = cache.labels("validation")
    logits = head_logits(result.head, cache, "validation", tta)
    before = probabilities_from_logits(logits)
    temperature = fit_temperature(logits, labels)
    result.head.temperature = temperature
    after = probabilities_from_logits(logits / temperature)
    result.params["temperature"] = temperature
    result.params["calibration"] = {
        "split": "validation", "method": "temperature", "bins": ECE_BINS,
        "ece_before": expected_calibration_error(labels, before), "ece_after": expected_calibration_error(labels, after),
        "log_loss_before": mean_log_loss(labels, before), "log_loss_after": mean_log_loss(labels, after),
    }


POOLED_BLOCK_ROWS = 16_384  # rows of pooled features a scikit-learn head is measured on at a time (64 MiB at 1280)


def split_blocks(head, cache, split: str, tta: str = "none", block: int = 1024):
    """What ``head`` takes of ``split``, block by block (memory holds one block): the pooled features
    for a scikit-learn head, the bottleneck for a Keras head. With ``tta`` ``flip``, the mean of each
    image's and its mirror's: both heads are linear after the spatial mean, so their logits are the
    mean of the two images' logits."""
    pooled = head.kind == "sklearn"
    read, mirrored = (cache.pooled, cache.mirrored_pooled) if pooled else (cache.features, cache.mirrored_features)
    step = POOLED_BLOCK_ROWS if pooled else block
    for i in range(0, cache.n_examples(split), step):
        rows = slice(i, i + step)
        x = read(split, rows).astype(np.float32)
        yield x if tta == "none" else (x + mirrored(split, rows).astype(np.float32)) / 2


def head_logits(head, cache, split: str, tta: str = "none") -> np.ndarray:
    return np.concatenate([head.logits(x) for x in split_blocks(head, cache, split, tta)])


def predict_split(head, cache, split: str, tta: str = "none") -> np.ndarray:
    return np.concatenate([head.predict_proba(x) for x in split_blocks(head, cache, split, tta)])


# Bytes per pooled value a fit in memory holds: the float32 rows read, and scikit-learn's float64 copy.
IN_MEMORY_BYTES_PER_VALUE = 12


def _train_sklearn(cache, Cs, train_split, has_validation, class_weight="none", views: bool = False,
                   keep=None, max_memory: int | None = None) -> HeadResult:
    n_rows = cache.n_examples(train_split) if keep is None else int(np.sum(keep))
    n_features = cache.feature_shape[-1]
    in_memory = views or fits_in_memory(n_rows, n_features, max_memory)
    if views:
        x, y = pooled_rows(cache)
    elif in_memory:
        x, y = cache.pooled(train_split), cache.labels(train_split)
        if keep is not None:
            x, y = x[keep], y[keep]
    else:  # out of core: the rows are read block by block on every pass of the solver
        y = cache.labels(train_split) if keep is None else cache.labels(train_split)[keep]
        blocks = kept_blocks(lambda lo, hi: cache.pooled(train_split, slice(lo, hi)), cache.n_examples(train_split),
                             keep, rows_per_block(max_memory, n_features))
    selection, best = [], None
    started = time.perf_counter()
    for value in sorted(Cs):
        head = SklearnHead(C=float(value), class_weight=class_weight)
        if in_memory:
            head.fit(x, y, n_classes=len(cache.class_names))
        else:
            head.fit_blocks(blocks, y, n_features, n_classes=len(cache.class_names))
        score = None
        if has_validation and len(Cs) > 1:
            proba = predict_split(head, cache, "validation")
            score = float((proba.argmax(axis=1) == cache.labels("validation")).mean())
        selection.append({"C": float(value), "validation_accuracy": score})
        if best is None or (score is not None and score > best[0]):  # ties keep the smaller C
            best = (score, head)
    seconds = time.perf_counter() - started
    params = {"C": best[1].C, "Cs": [float(c) for c in sorted(Cs)], "class_weight": class_weight,
              "in_memory": in_memory}
    if not in_memory:
        params["passes"] = best[1].passes_  # reads of the training rows by the solver
        params["converged"] = best[1].converged_
    return HeadResult(best[1], "sklearn", {}, seconds, params, selection=selection)


def fits_in_memory(n_rows: int, n_features: int, max_memory: int | None) -> bool:
    """Whether a logistic regression on these pooled rows may hold them all (None: no budget)."""
    return max_memory is None or n_rows * n_features * IN_MEMORY_BYTES_PER_VALUE <= max_memory


def rows_per_block(max_memory: int, n_features: int) -> int:
    """Rows of an out-of-core block: a quarter of the budget for the float32 rows, their float64
    copy and the products (about 32 bytes a value), at least 256 rows."""
    return int(max(256, min(1 << 20, max_memory // (32 * n_features))))


def _train_keras(cache, n_classes, train_split, has_validation, *, epochs, batch_size, learning_rate, optimizer,
                 dropout, seed, early_stopping, shuffle, max_memory, verbose, class_weight="none",
                 views=False, progress=None, keep=None) -> HeadResult:
    keras = import_keras()
    keras.utils.set_random_seed(seed)
    model = compile_for(build_head_model(cache.feature_shape, n_classes, dropout), n_classes, learning_rate, optimizer,
                        steps_per_execution=HEAD_STEPS_PER_EXECUTION)
    n_values = sum(cache.n_examples(s) for s in cache.splits) * int(np.prod(cache.feature_shape))
    in_memory = n_values * 4 <= max_memory
    epoch_seconds = []
    train_labels = cache.labels(train_split) if keep is None else cache.labels(train_split)[keep]
    weights = None if class_weight == "none" else class_weights(train_labels, n_classes)
    callbacks = [best_weights_callback("val_loss" if has_validation else "loss", early_stopping),
                 epoch_timer(epoch_seconds, progress, epochs)]
    if views:  # one view per image per epoch (bottlecache.train.views); the views stay in their stored dtype

        validation = cache.dataset("validation", batch_size=EVAL_BATCH_SIZE) if has_validation else None
        started = time.perf_counter()
        history = model.fit(ViewEpochs(cache, batch_size, seed).dataset(), epochs=epochs, validation_data=validation,
                            shuffle=False, callbacks=callbacks, verbose=verbose)
    elif in_memory:
        x, y = cache.features(train_split).astype(np.float32), cache.labels(train_split)
        if keep is not None:
            x, y = x[keep], y[keep]
        validation = (cache.features("validation").astype(np.float32), cache.labels("validation")) if has_validation else None
        started = time.perf_counter()
        history = model.fit(x, y, batch_size=batch_size, epochs=epochs, validation_data=validation, shuffle=shuffle,
                            validation_batch_size=EVAL_BATCH_SIZE, callbacks=callbacks, verbose=verbose,
                            class_weight=weights)
    else:
        train = cache.dataset(train_split, keep=keep)
        if shuffle:
            train = train.shuffle(4096, seed=seed, reshuffle_each_iteration=True)
        validation = cache.dataset("validation", batch_size=EVAL_BATCH_SIZE) if has_validation else None
        started = time.perf_counter()
        history = model.fit(train.batch(batch_size).prefetch(2), epochs=epochs, validation_data=validation,
                            shuffle=False, callbacks=callbacks, verbose=verbose,  # shuffled above, if asked
                            class_weight=weights)
    seconds = time.perf_counter() - started
    params = {"epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate, "optimizer": optimizer,
              "dropout": dropout, "seed": seed, "early_stopping": early_stopping, "class_weight": class_weight,
              "in_memory": in_memory,
              "epochs_run": len(history.history.get("loss", []))}
    hist = {k: [float(v) for v in values] for k, values in history.history.items()}
    hist["seconds"] = epoch_seconds  # the first epoch includes tracing the training step
    return HeadResult(KerasHead(model), "keras", {}, seconds, params, history=hist)


# ---------------------------------------------------------------------------------------------
# Saving and loading


def save_head(result: HeadResult, cache, out=None, cache_dir=None) -> Path:
    """Write the head folder atomically (a temporary folder renamed into place)."""
    if out is None:
        base = ensure_cache_dir(resolve_cache_dir(cache_dir)) / "heads"
        stack = "stack-" if isinstance(cache, StackedCache) else ""
        out = free_folder(base / f"{result.kind}-{stack}{cache.fingerprint[:12]}-{time.strftime('%Y%m%d-%H%M%S')}")
    out = Path(out)
    check_new_folder(out)
    first = cache.members[0] if isinstance(cache, StackedCache) else cache
    record = {
        "format": HEAD_FORMAT,
        "format_version": RECORD_VERSION,
        "kind": result.kind,
        "class_names": cache.class_names,
        "feature_shape": list(cache.feature_shape),
        "params": result.params,
        "backbone": {key: cache.config[key] for key in BACKBONE_KEYS if key in cache.config},
        # where the base's weights and the data were (absolute), so that predict, export and report need neither
        "weights": cache.build_info.get("weights_path") or cache.build_info.get("weights"),
        "data": cache.build_info.get("data"),
        "cache": {"path": str(first.path.resolve()), "fingerprint": first.fingerprint, "config": first.config},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if isinstance(cache, StackedCache):  # the first member's is above; the stack's every member here
        record["stack"] = cache.record()
    try:
        with staged_folder(out) as staging:
            (staging / "head.json").write_text(to_json(record))
            metrics = result.to_dict() | {"path": str(out), "history": result.history}
            (staging / "metrics.json").write_text(to_json(metrics))
            result.head.save(staging)
    except OSError as error:
        raise write_error(out, error, "nothing was saved") from None
    return out


def check_new_folder(out: Path) -> None:
    """``out`` must be free: missing, or an empty folder."""
    if out.exists() and not out.is_dir():
        raise BottlecacheError(f"The 'out' option must be a folder; {out} is a file. Choose a new folder.")
    if out.is_dir() and any(out.iterdir()):
        raise BottlecacheError(f"The 'out' folder {out} exists and is not empty; choose a new folder.")


@dataclass
class LoadedHead:
    """A saved head with its record; ``predict_proba`` / ``predict`` take features."""

    path: Path
    record: dict
    head: object

    @property
    def kind(self) -> str:
        return self.record["kind"]

    @property
    def class_names(self) -> list[str]:
        return self.record["class_names"]

    @property
    def backbone(self) -> dict:
        return self.record["backbone"]

    @property
    def tta(self) -> str:
        return self.record["params"].get("tta", "none")

    @property
    def members(self) -> list[dict]:
        """What each base of the head ran: ``{"backbone", "weights", "data", "cache"}``, one per cache of
        a stack, or the one cache's."""
        stack = self.record.get("stack")
        if stack:
            return [m | {"backbone": {k: m["cache"]["config"][k] for k in BACKBONE_KEYS if k in m["cache"]["config"]}}
                    for m in stack["members"]]
        return [{key: self.record.get(key) for key in ("backbone", "weights", "data", "cache")}]

    def predict_proba(self, features) -> np.ndarray:
        return self.head.predict_proba(features)

    def predict(self, features) -> list[str]:
        return [self.class_names[i] for i in self.predict_proba(features).argmax(axis=1)]

    def check_backbone(self, **actual) -> None:
        """Raise if this head was trained on another model / image size / weights than ``actual``."""
        differ = differences(self.backbone, {k: v for k, v in actual.items() if k in self.backbone}, "head")
        if differ:
            raise CacheMismatchError(f"The head {self.path} was trained for another backbone: {differ}.")

    def check_cache(self, cache) -> None:
        self.check_backbone(**{key: cache.config.get(key) for key in BACKBONE_KEYS})

    def open_cache(self):
        """The cache the head was trained on (a ``StackedCache`` for a stacked head), each member checked
        to be there and to be the one it was trained on (its fingerprint)."""
        opened = []
        try:
            for member in self.members:
                path = Path(member["cache"]["path"])
                if not path.is_file():
                    raise BottlecacheError(f"The cache {path} this head was trained on is gone; rebuild it with "
                                           "`bottlecache cache build` and the same settings, or use another head.")
                opened.append(Cache(path))
                if opened[-1].fingerprint != member["cache"]["fingerprint"]:
                    raise BottlecacheError(f"The cache {path} is not the one the head {self.path} was trained on "
                                           "(another fingerprint); train the head again.")
            return opened[0] if len(opened) == 1 else StackedCache(opened)
        except BaseException:
            for cache in opened:
                cache.close()
            raise


def read_head_record(folder: Path) -> HeadRecord:
    folder = Path(folder)
    if not folder.is_dir():
        what = "is a file" if folder.exists() else "does not exist"
        raise BottlecacheError(f"The head folder {folder} {what}; pass a folder from `cache train-head`.")
    if not (folder / "head.json").exists():
        raise BottlecacheError(f"{folder} is not a head folder (no head.json); pass a folder from `cache train-head`.")
    return read_json(folder / "head.json", HeadRecord, HEAD_ADVICE, fmt=HEAD_FORMAT, version=RECORD_VERSION)


def recorded_inputs(folder) -> dict:
    """Where a head's cache found its data and weights (``{"data": ..., "weights": ...}``, each
    only if recorded and still there): what commands given the head use when not told. A head
    that cannot be read gives nothing here; the command that loads it says why."""
    try:
        record = read_head_record(Path(folder))
    except BottlecacheError:
        return {}
    out = {}
    where = record.data or {}
    if where.get("path") and Path(where["path"]).is_dir():
        out["data"] = where["path"]
        if where.get("tfds_data_dir"):
            out["tfds_data_dir"] = where["tfds_data_dir"]
    if record.weights and record.weights != "imagenet" and Path(record.weights).is_file():
        out["weights"] = record.weights
    return out


def load_head(path) -> LoadedHead:
    """Load a head folder written by ``train_head`` (no pickle; Keras in safe mode), checking its
    record and that the model file matches it."""
    folder = Path(path)
    record = read_head_record(folder)
    head = (SklearnHead if record.kind == "sklearn" else KerasHead).load(folder, record)
    head.temperature = float(record.params.get("temperature", 1.0))
    return LoadedHead(folder, record.model_dump(mode="json"), head)


def list_heads(cache_dir=None) -> list[tuple[Path, dict]]:
    """Saved heads under ``<cache dir>/heads`` with their metrics, newest first. A head whose
    record or metrics cannot be read is listed with ``{"error": reason}``."""
    folder = resolve_cache_dir(cache_dir) / "heads"
    if not folder.is_dir():
        return []
    out = []
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    for head_dir in newest_first(entries):
        try:
            record = read_head_record(head_dir)
            metrics = read_json(head_dir / "metrics.json", MetricsRecord, HEAD_ADVICE).model_dump(mode="json")
            expected = sorted(set(record.cache.config.splits) - {"train"})
            if sorted(metrics["metrics"]) != expected or metrics["kind"] != record.kind:
                raise BottlecacheError(
                    f"{head_dir / 'metrics.json'} does not match head.json (kind {metrics['kind']!r}, splits "
                    f"{sorted(metrics['metrics'])}; expected {record.kind!r}, {expected}); {HEAD_ADVICE}"
                )
        except BottlecacheError as error:
            metrics = {"error": str(error)}
        out.append((head_dir, metrics))
    return out
