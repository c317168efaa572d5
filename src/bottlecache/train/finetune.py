"""End-to-end fine-tuning: the tutorial's second phase, warm-started from a head trained on the cache.

The flow, one named step each: resolve the cache settings once (the same object ``cache build``
uses) → take a Keras head trained on the cache, or build the cache and train one first → put it
on the frozen base, called with ``training=False`` so BatchNorm stays in inference mode → unfreeze
the layers from ``fine_tune_at`` on → train at a small learning rate on images preprocessed by the
shared function, one resumable checkpoint per epoch → keep the best epoch by validation loss →
save ``model.keras`` with its record. Prediction lives in ``bottlecache.serve.predict``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..cache.build import build_resolved
from ..cache.cut_cache import cut_datasets, open_cut_cache
from ..cache.settings import CacheSettings
from ..core.errors import BottlecacheError
from ..core.files import atomic_save, atomic_write_text, ensure_cache_dir, write_error
from ..core.fingerprint import canonical_json, fingerprint
from ..core.options import (
    DEFAULT_MODEL,
    MAX_BATCH_SIZE,
    MAX_EPOCHS,
    MAX_VIEWS,
    check_folder_option,
    check_positive,
    check_range,
    check_seed,
    given_fields,
    settings_with,
)
from ..core.progress import NullProgress
from ..core.records import MODEL_FORMAT, RECORD_VERSION, CheckpointState, read_json, to_json
from ..core.registry import get_backbone
from ..core.tf import import_keras, import_tf
from ..data.sources import image_dataset, training_dataset
from ..models.backbone import backbone_record, load_backbone
from ..models.cut import cut_model, full_model
from ..models.network import AUGMENT_SPEC, attach_head, unfreeze
from .exclusion import Exclusion
from .heads import (
    MAX_LEARNING_RATE,
    compile_for,
    compute_metrics,
    load_head,
    load_keras_file,
    probabilities_from_logits,
    recorded_inputs,
    train_head,
)
from .views import ViewEpochs

CHECKPOINT_DIR = ".checkpoint"
# Options that only say when to stop: a resumed run honours new values. Every other option must match.
RESUMABLE_PARAMS = ("epochs", "early_stopping")
CHECKPOINT_ADVICE = "delete the folder's .checkpoint to start over, or pass another --out"


@dataclass
class FinetuneResult:
    path: Path
    metrics: dict  # split → metrics after fine-tuning
    head_metrics: dict  # split → metrics of the warm start (head on the frozen base), same images
    history: dict
    seconds_per_epoch: float
    train_seconds: float
    epochs_run: int
    best_epoch: int
    head_path: Path | None = None
    params: dict = field(default_factory=dict)
    cut_cache: Path | None = None  # with from_cache: the cut cache it trained on

    def to_dict(self) -> dict:
        return {
            "kind": "finetune",
            "path": str(self.path),
            "head": str(self.head_path) if self.head_path else None,
            "train_seconds": round(self.train_seconds, 3),
            "seconds_per_epoch": round(self.seconds_per_epoch, 3),
            "epochs_run": self.epochs_run,
            "best_epoch": self.best_epoch,
            "params": self.params,
            "cut_cache": str(self.cut_cache) if self.cut_cache else None,
            "head_metrics": self.head_metrics,
            "metrics": self.metrics,
        }


DEFAULT_VIEWS = 8


def epoch_checkpoint(folder: Path, state: dict, patience, progress, n_images: int, batch_size: int,
                     monitor: str = "val_loss"):
    """A Keras callback that, per epoch, keeps the best weights by ``monitor``, writes a resumable
    checkpoint (model with optimizer state, and ``state.json``), stops early after ``patience``
    epochs without gain, and drives a progress bar."""
    keras = import_keras()

    class EpochCheckpoint(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started, self.seen = time.perf_counter(), 0
            progress.start_split(f"epoch {epoch + 1}", n_images, 0)

        def on_train_batch_end(self, batch, logs=None):
            step = min(batch_size, n_images - self.seen)
            self.seen += step
            progress.advance(f"epoch {state['epoch'] + 1}", step)

        def on_epoch_end(self, epoch, logs=None):
            logs = {k: float(v) for k, v in (logs or {}).items()}
            seconds = time.perf_counter() - self.started
            for key, value in logs.items():
                state["history"].setdefault(key, []).append(value)
            state["history"].setdefault("seconds", []).append(seconds)
            if logs.get(monitor, float("inf")) < state["best"]:
                state["best"], state["best_epoch"] = logs[monitor], epoch + 1
                atomic_save(folder / "best.weights.h5", self.model.save_weights)
            state["epoch"] = epoch + 1
            atomic_save(folder / "last.keras", self.model.save)
            atomic_write_text(folder / "state.json", to_json(state))
            progress.end_split(f"epoch {epoch + 1}")
            shown = ", ".join(f"{k} {v:.4f}" for k, v in logs.items())
            progress.message(f"epoch {epoch + 1}: {shown} ({seconds:.1f} s)")
            if patience and epoch + 1 - state["best_epoch"] >= patience:
                self.model.stop_training = True

    return EpochCheckpoint()


def _evaluate(model, source, split: str, image_size: int, batch_size: int, base: str = DEFAULT_MODEL) -> dict:
    ds = image_dataset(source, split, image_size, model=base).map(lambda i, k, y, x: (x, y)).batch(batch_size)
    logits, labels = [], []
    for x, y in ds:
        logits.append(np.asarray(model(x, training=False)))
        labels.append(y.numpy())
    proba = probabilities_from_logits(np.concatenate(logits))
    return compute_metrics(np.concatenate(labels), proba, source.class_names)


def _evaluate_batches(model, batches, class_names) -> dict:
    logits, labels = [], []
    for x, y in batches:
        logits.append(np.asarray(model(x, training=False)))
        labels.append(np.asarray(y))
    return compute_metrics(np.concatenate(labels), probabilities_from_logits(np.concatenate(logits)), class_names)


def _resolve_cut(settings: CacheSettings, params: dict, cut_cache):
    """The cut cache's settings (the run's, with the cut below ``fine_tune_at``, and with ``--augment``
    its augmented views) resolved; a given ``cut_cache`` that holds another cut is refused here,
    before any work."""

    fine_tune_at = params["fine_tune_at"]
    if fine_tune_at < 1:
        raise BottlecacheError("--from-cache needs --fine-tune-at 1 or more: with 0, no layer is frozen to cache.")
    views = {}
    if params["augment"]:  # the same flip and rotation as augmentation(), drawn per image per epoch among the views
        views = {"views": params["views"], "augment": AUGMENT_SPEC, "view_seed": params["seed"]}
    cut = dataclasses.replace(settings, cut=fine_tune_at, **views).resolve()
    if cut_cache is not None:
        open_cut_cache(cut_cache, cut).close()
    return cut


def _ensure_cut_cache(cut, cut_cache, progress) -> Path:
    """The cut cache's path: the given one, or the one under the cache dir, built first if missing."""

    if cut_cache is not None:
        return Path(cut_cache)
    progress.message(f"caching the activations at the cut {cut.config['cut']['layer']} (or finding them cached)")
    return build_resolved(cut, progress=progress).path


def _cut_data(cut, cut_cache: Path, params: dict):
    """``(train, validation, n_train)`` from the cut cache."""

    with open_cut_cache(cut_cache, cut) as cache:
        keep = None
        if params.get("exclude"):
            if params["augment"]:
                raise BottlecacheError("The 'exclude' option does not apply to --from-cache --augment (cached views) "
                                       "yet; leave out --augment, or fine-tune on the images.")
            keep, _ = Exclusion(tuple(params["exclude"]["keys"])).rows_kept(cache, "train")
        train, validation = cut_datasets(cache, params["batch_size"], params["seed"], keep)
        if params["augment"]:  # one cached view of each image per epoch (bottlecache.train.views)

            train = ViewEpochs(cache, params["batch_size"], params["seed"]).dataset()
        return train, validation, cache.n_examples("train") if keep is None else int(keep.sum())


@dataclass(frozen=True)
class FinetuneSettings:
    """How fine-tuning runs, checked once on creation (each message names the option).

    ``fine_tune_at``: layers of the base before it stay frozen (None: the model's top part,
    ``bottlecache.core.registry``; for MobileNetV2 layer 100, as in the tutorial; checked against
    the model in ``finetune``). ``epochs``, ``learning_rate``, ``batch_size``, ``seed``, ``augment``
    (random flip and small rotation), ``early_stopping`` (a patience in epochs): RMSprop as in the
    tutorial, the best epoch by validation loss kept. ``head_epochs``: the warm-start head's, when
    none is given. ``from_cache``: train the network above the cut below ``fine_tune_at`` on cached
    activations (``bottlecache.models.cut``); with ``augment``, the cut cache holds ``views``
    (default 8) augmented views of each train image. ``exclude``: train images left out (a file of
    keys, one a line, as ``cache audit`` writes), from the warm-start head's training too.
    """

    fine_tune_at: int | None = None
    epochs: int = 10
    learning_rate: float = 1e-5
    batch_size: int = 32
    seed: int = 0
    augment: bool = False
    early_stopping: int | None = None
    head_epochs: int = 10
    from_cache: bool = False
    views: int | None = None
    exclude: object = None  # keys left out of training (bottlecache.train.exclusion)

    def __post_init__(self):
        object.__setattr__(self, "exclude", Exclusion.of(self.exclude))
        check_positive("epochs", self.epochs, maximum=MAX_EPOCHS)
        check_positive("learning_rate", self.learning_rate, float, maximum=MAX_LEARNING_RATE)
        check_positive("batch_size", self.batch_size, maximum=MAX_BATCH_SIZE)
        check_seed(self.seed)
        if self.early_stopping is not None:
            check_positive("early_stopping", self.early_stopping, maximum=MAX_EPOCHS)
        if self.views is not None:
            check_range("views", self.views, 1, MAX_VIEWS, high_open=False)
        object.__setattr__(self, "augment", bool(self.augment))
        object.__setattr__(self, "from_cache", bool(self.from_cache))
        if self.views and not (self.from_cache and self.augment):
            raise BottlecacheError("The 'views' option needs --from-cache and --augment (the augmented views of the cut).")
        check_positive("head_epochs", self.head_epochs, maximum=MAX_EPOCHS)


def finetune(data=None, splits=None, *, settings: FinetuneSettings | None = None, cache: CacheSettings | None = None,
             head=None, out=None, resume: bool = False, cut_cache=None, progress=None, **overrides) -> FinetuneResult:
    """Fine-tune the base from ``fine_tune_at`` on, warm-started from a cached Keras head.

    How it trains is a ``FinetuneSettings``; the cache its warm-start head trains on is a
    ``CacheSettings`` (data, splits, model, image size, weights, dtype, where it lives). Pass them
    whole, or name their fields as keywords (``finetune("photos", epochs=5, image_size=224)``),
    which override the objects' fields.

    Parameters
    ----------
    data, splits : optional
        The cache's data and split specs (``CacheSettings``). With ``head`` and no ``cache``, the
        data and weights default to where the head's cache found them.
    settings : FinetuneSettings, optional
    cache : CacheSettings, optional
        Without cut or views: the cut cache of ``from_cache`` is made from it.
    head : path, optional
        A Keras head folder from ``train_head``. Without it, the cache is built (or found) and a
        head is trained on it for ``head_epochs`` first: the tutorial's two phases.
    out : path, optional
        Folder for ``model.keras``; default ``<cache dir>/models/finetune-<fingerprint12>``.
    resume : bool
        Continue an interrupted run in ``out`` from its last finished epoch. Its settings must be
        the run's own (``epochs`` and ``early_stopping`` may change); a difference is refused,
        naming each option.
    cut_cache : path, optional
        With ``from_cache``: this cut cache instead of the one under ``cache_dir`` (it must hold
        the cut ``fine_tune_at`` needs, of the same data and weights).
    progress : bottlecache.core.progress.Progress, optional
    **overrides
        Fields of ``FinetuneSettings`` or ``CacheSettings`` by name (``views``, ``augment``: the
        fine-tuning's).

    Returns
    -------
    FinetuneResult
    """
    overrides = given_fields(overrides, data=data, splits=splits)
    if head is not None and cache is None:  # the head's own data and weights, unless told otherwise
        overrides = recorded_inputs(head) | overrides
    cache, settings = settings_with("finetune", {CacheSettings: cache, FinetuneSettings: settings}, overrides)
    if cache.cut is not None or cache.views or cache.fast_decode:
        raise BottlecacheError("finetune's cache settings take no cut, views or fast decoding: the head's cache is a "
                               "plain bottleneck cache, and --from-cache makes the cut cache itself.")
    model, image_size = cache.model, cache.image_size
    fine_tune_at = get_backbone(model).fine_tune_at if settings.fine_tune_at is None else settings.fine_tune_at
    params = check_params(model=model, fine_tune_at=fine_tune_at, epochs=settings.epochs,
                          learning_rate=settings.learning_rate, batch_size=settings.batch_size, seed=settings.seed,
                          augment=settings.augment, early_stopping=settings.early_stopping,
                          from_cache=settings.from_cache, views=settings.views)
    from_cache, batch_size, seed = settings.from_cache, settings.batch_size, settings.seed
    if settings.exclude is not None:  # part of the run: a resumed run must leave out the same images
        params["exclude"] = {"file": settings.exclude.file, "sha256": settings.exclude.sha256,
                             "keys": list(settings.exclude.keys)}
    if cut_cache is not None and not from_cache:
        raise BottlecacheError("The 'cut_cache' option needs --from-cache.")
    progress = progress or NullProgress()
    resolved = cache.resolve()
    source = resolved.source
    if "train" not in source.splits or "validation" not in source.splits:
        raise BottlecacheError(
            f"Fine-tuning needs 'train' and 'validation' splits; the data has {', '.join(source.splits)}. "
            "Name them with --split train=... --split validation=...."
        )
    if settings.exclude is not None:
        settings.exclude.check_source(source)
    cut = _resolve_cut(cache, params, cut_cache) if from_cache else None
    if out is not None:
        _check_out(Path(out), resume)
        if resume:
            _read_state(Path(out))  # a damaged checkpoint is refused before anything is loaded
    head = Path(head) if head is not None else _train_warm_start_head(resolved, settings.head_epochs, batch_size, seed,
                                                                       progress, settings.exclude)
    loaded = _load_warm_start_head(head, resolved)
    record = backbone_record(resolved.weights, image_size)
    run_config = {"data": source.identity, "splits": {n: str(s.spec) for n, s in source.splits.items()},
                  "backbone": record, "params": params,
                  "head": {"path": str(head.resolve()),
                           "cache_fingerprint": loaded.record.get("cache", {}).get("fingerprint", "")}}
    if cut is not None:
        run_config["cut_cache"] = cut.fingerprint
    if out is None:
        out = ensure_cache_dir(cache.cache_dir) / "models" / f"finetune-{fingerprint(_fixed(run_config))[:12]}"
    out = Path(out)
    _check_out(out, resume)
    state = _resume_state(out, run_config) if resume and (out / CHECKPOINT_DIR / "state.json").exists() else None
    try:
        return _run(out, resolved, loaded, head, run_config, state, progress, cut, cut_cache)
    except OSError as error:
        raise write_error(out, error, "finished epochs are kept; run again with --resume") from None


def check_params(model: str = DEFAULT_MODEL, **params) -> dict:
    """The fine-tuning settings of a run on the base ``model``, each range-checked (sklearn-style messages)."""
    check_positive("epochs", params["epochs"], maximum=MAX_EPOCHS)
    check_positive("learning_rate", params["learning_rate"], float, maximum=MAX_LEARNING_RATE)
    check_positive("batch_size", params["batch_size"], maximum=MAX_BATCH_SIZE)
    check_seed(params["seed"])
    check_range("fine_tune_at", params["fine_tune_at"], 0, get_backbone(model).n_layers, high_open=False)
    if params["early_stopping"] is not None:
        check_positive("early_stopping", params["early_stopping"], maximum=MAX_EPOCHS)
    params["augment"] = bool(params["augment"])
    params["from_cache"] = bool(params.get("from_cache", False))
    if params.get("views") is not None:
        check_range("views", params["views"], 1, MAX_VIEWS, high_open=False)
    if params["from_cache"] and params["augment"]:
        params["views"] = params.get("views") or DEFAULT_VIEWS
    else:
        params.pop("views", None)
    return params


def _fixed(run_config: dict) -> dict:
    """The part of a run's configuration a resumed run must share (not when to stop)."""
    params = {k: v for k, v in run_config["params"].items() if k not in RESUMABLE_PARAMS}
    return {**run_config, "params": params}


def _check_out(out: Path, resume: bool) -> None:
    check_folder_option("out", out)
    if (out / "model.keras").exists() or (out / "model.json").exists():
        raise BottlecacheError(f"{out} already holds a finished model; pass another --out.")
    if (out / CHECKPOINT_DIR / "state.json").exists() and not resume:
        raise BottlecacheError(
            f"{out} holds an interrupted run; pass --resume to continue it, or another --out to start over."
        )
    if resume and not (out / CHECKPOINT_DIR / "state.json").exists():
        raise BottlecacheError(f"--resume: {out} holds no interrupted run to continue; run without --resume.")
    if not resume and out.is_dir() and any(p.name != CHECKPOINT_DIR for p in out.iterdir()):
        raise BottlecacheError(f"The 'out' folder {out} exists and is not empty; pass another --out.")


def _train_warm_start_head(resolved, head_epochs: int, batch_size: int, seed: int, progress, exclude=None) -> Path:
    """Phase 1: the cache (built or found) and a Keras head trained on it."""

    progress.message(f"phase 1: caching features and training a Keras head for {head_epochs} epochs")
    report = build_resolved(resolved, progress=progress)
    return train_head(report.path, "keras", epochs=head_epochs, batch_size=batch_size, seed=seed,
                      cache_dir=resolved.settings.cache_dir, exclude=exclude).path


def _load_warm_start_head(head: Path, resolved):
    loaded = load_head(head)
    if loaded.kind != "keras":
        raise BottlecacheError(
            f"The 'head' option needs a Keras head (cache train-head --kind keras); {head} is {loaded.kind}."
        )
    loaded.check_backbone(**backbone_record(resolved.weights, resolved.settings.image_size))
    if loaded.class_names != resolved.source.class_names:
        raise BottlecacheError(f"The head's classes {loaded.class_names} differ from the data's {resolved.source.class_names}.")
    return loaded


def _option(key: str) -> str:
    return "--" + key.replace("_", "-")


def _resume_state(out: Path, run_config: dict) -> dict:
    """The interrupted run's state, if it was started with the same settings (else one line naming each)."""
    checkpoint = out / CHECKPOINT_DIR
    state = _read_state(out)
    stored = json.loads(state["config"])
    if not isinstance(stored, dict):
        raise BottlecacheError(f"{checkpoint / 'state.json'}: field 'config' is not an object; {CHECKPOINT_ADVICE}.")
    stored_params = stored.get("params") if isinstance(stored.get("params"), dict) else {}
    before, now = _fixed({**stored, "params": stored_params}), _fixed(run_config)
    differ = []
    for key in sorted(set(before.get("params", {})) | set(now["params"])):
        if before.get("params", {}).get(key) != now["params"].get(key):
            differ.append(f"{_option(key)} {before.get('params', {}).get(key)!r} -> {now['params'].get(key)!r}")
    names = {"data": "--data", "splits": "--split", "backbone": "--model/--weights/--image-size", "head": "--head",
             "cut_cache": "--from-cache/--dtype"}
    differ += [f"{names.get(k, k)} changed" for k in sorted(set(before) | set(now)) if k != "params"
               and before.get(k) != now.get(k)]
    if differ:
        raise BottlecacheError(
            f"{out} holds a run started with other settings ({'; '.join(differ)}); pass the run's own settings "
            "with --resume, or another --out to start a new run."
        )
    state["config"] = canonical_json(run_config)
    for name in ("last.keras", "head_metrics.json"):
        if not (checkpoint / name).is_file():
            raise BottlecacheError(f"{checkpoint / name} is missing; {CHECKPOINT_ADVICE}.")
    return state


def _read_state(out: Path) -> dict:
    return read_json(out / CHECKPOINT_DIR / "state.json", CheckpointState, CHECKPOINT_ADVICE).model_dump(mode="json")


def _run(out: Path, resolved, loaded, head: Path, run_config: dict, state: dict | None, progress, cut=None,
         cut_cache=None) -> FinetuneResult:
    params, source, image_size = run_config["params"], resolved.source, resolved.settings.image_size
    base_name = resolved.settings.model
    # from the cache: batches of cut activations instead of images (built first if missing)
    data = None
    if cut is not None:
        cut_cache = _ensure_cut_cache(cut, cut_cache, progress)
        data = _cut_data(cut, cut_cache, params)
    checkpoint = out / CHECKPOINT_DIR
    keras = import_keras()
    import_tf()
    keras.utils.set_random_seed(params["seed"])
    if state is not None:
        model = load_keras_file(checkpoint / "last.keras", compile=True, advice=CHECKPOINT_ADVICE)  # with optimizer state
        head_metrics = _read_head_metrics(checkpoint / "head_metrics.json")
        progress.message(f"resuming {out} after epoch {state['epoch']}")
    else:
        state = {"epoch": 0, "history": {}, "best": None, "best_epoch": 0, "config": canonical_json(run_config)}
        model, head_metrics = _warm_start(resolved, loaded, params, checkpoint, cut, data)
        state["best"] = head_metrics["validation"]["log_loss"]  # the warm start is epoch 0: kept unless beaten
    train_seconds = _fit(model, source, image_size, params, state, checkpoint, progress, base_name, data)
    if (checkpoint / "best.weights.h5").exists():
        model.load_weights(checkpoint / "best.weights.h5")
    if cut is not None:  # the trained layers put back into the whole base: the model takes images

        model = full_model(model, load_backbone(resolved.weights, image_size, fresh=True), params["fine_tune_at"],
                           image_size)
    metrics = {split: _evaluate(model, source, split, image_size, params["batch_size"], base_name)
               for split in source.splits if split != "train"}
    for split in metrics:
        head_metrics.setdefault(split, None)
    seconds = state["history"].get("seconds", [])
    result = FinetuneResult(
        out, metrics, head_metrics, state["history"], float(np.mean(seconds)) if seconds else 0.0,
        train_seconds, state["epoch"], state["best_epoch"], head, params, cut_cache if cut is not None else None,
    )
    _save_model(out, model, resolved, head, params, state, result)
    shutil.rmtree(checkpoint, ignore_errors=True)
    return result


def _read_head_metrics(path: Path) -> dict:
    try:
        metrics = json.loads(path.read_text())
        if isinstance(metrics, dict) and isinstance(metrics.get("validation"), dict):
            return metrics
    except (OSError, ValueError):
        pass
    raise BottlecacheError(f"{path} is damaged; {CHECKPOINT_ADVICE}.")


def _warm_start(resolved, loaded, params: dict, checkpoint: Path, cut=None, data=None):
    """The head on the frozen base, measured, then the top of the base unfrozen and compiled.

    With a ``cut`` (``--from-cache``): the head on the base above the cut, measured on the cached
    validation activations (what the epochs' validation loss is measured on too).
    """
    source, image_size, base_name = resolved.source, resolved.settings.image_size, resolved.settings.model
    base = load_backbone(resolved.weights, image_size, fresh=True)  # trained: not the shared one
    if cut is not None:
        model = cut_model(base, loaded.head.model, cut.config["cut"]["layer"])
        head_metrics = {"validation": _evaluate_batches(model, data[1], source.class_names)}
    else:
        model = attach_head(base, loaded.head.model, image_size, params["augment"])
        head_metrics = {"validation": _evaluate(model, source, "validation", image_size, params["batch_size"],
                                                base_name)}
    unfreeze(base, params["fine_tune_at"])
    compile_for(model, len(source.class_names), params["learning_rate"])
    checkpoint.mkdir(parents=True, exist_ok=True)
    atomic_save(checkpoint / "best.weights.h5", model.save_weights)
    atomic_write_text(checkpoint / "head_metrics.json", to_json(head_metrics))
    return model, head_metrics


def _fit(model, source, image_size: int, params: dict, state: dict, checkpoint: Path, progress,
         base_name: str = DEFAULT_MODEL, data=None) -> float:
    """Train from the state's epoch on; returns the seconds it took. ``data``: ``(train, validation,
    n_train)`` batches to use instead of the images (``--from-cache``)."""
    batch_size, early_stopping = params["batch_size"], params["early_stopping"]
    if data is not None:
        train, validation, n_train = data
    else:
        excluded = frozenset((params.get("exclude") or {}).get("keys", ()))
        train = training_dataset(source, "train", image_size, batch_size, shuffle=True, seed=params["seed"],
                                 model=base_name, exclude=excluded)
        validation = training_dataset(source, "validation", image_size, batch_size, model=base_name)
        split = source.split("train")
        n_train = split.n_examples - (sum(k in excluded for k in split.keys) if split.keys else 0)
    callback = epoch_checkpoint(checkpoint, state, early_stopping, progress, n_train, batch_size)
    started = time.perf_counter()
    stopped_early = early_stopping and state["epoch"] - state["best_epoch"] >= early_stopping
    if state["epoch"] < params["epochs"] and not stopped_early:
        with warnings.catch_warnings():  # tf.data of unknown length: Keras warns at each epoch's end
            warnings.filterwarnings("ignore", message=".*ran out of data.*")
            model.fit(train, validation_data=validation, epochs=params["epochs"], initial_epoch=state["epoch"],
                      callbacks=[callback], shuffle=False, verbose=0)
    return time.perf_counter() - started


def _save_model(out: Path, model, resolved, head: Path, params: dict, state: dict, result: FinetuneResult) -> None:
    model_record = {
        "format": MODEL_FORMAT, "format_version": RECORD_VERSION, "class_names": resolved.source.class_names,
        "backbone": backbone_record(resolved.weights, resolved.settings.image_size),
        "weights": resolved.weights.spec, "head": str(head.resolve()), "params": params,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write_text(out / "model.json", to_json(model_record))
    atomic_write_text(out / "history.json", to_json(state["history"]))
    atomic_write_text(out / "metrics.json", to_json(result.to_dict()))
    atomic_save(out / "model.keras", model.save)  # last: its presence marks the run finished
