"""An error report for a head or a fine-tuned model: one self-contained HTML page.

The page holds per-class precision / recall / F1, the confusion matrix as a picture, the most
confidently wrong images as thumbnails with their keys and probabilities, a reliability diagram
with the expected calibration error, and, for two classes, accuracy against the decision
threshold. Every picture is inlined (base64 PNG plots, JPEG thumbnails): the file can be mailed
or attached to a CI run as it is. Plots are drawn with matplotlib (Agg, no display needed).

A head is evaluated on its cache's features (no backbone run); a fine-tuned model on the images
of ``data``. Thumbnails need the images: ``data`` (the folder or tfds name the cache was built
from). See docs/report.md.
"""

from __future__ import annotations

import base64
import html
import io
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.errors import BottlecacheError
from ..core.files import atomic_write_text, check_output_file, free_file, write_error
from ..core.options import TTAS, check_choice, check_folder_option, check_positive, check_range
from ..data.sources import image_dataset, open_source
from ..train.heads import balanced_accuracy, compute_metrics, load_head, predict_split, read_head_record
from .artifacts import is_export
from .predict import load_model

DEFAULT_TOP = 16
MAX_TOP = 1000
DEFAULT_BINS = 10
THUMBNAIL = 160  # pixels, the longer side
THRESHOLDS = np.linspace(0.0, 1.0, 101)


@dataclass
class Evaluation:
    """What a report is made from: one split's labels, probabilities and keys."""

    name: str  # the head or model folder
    kind: str  # "head (sklearn)", "head (keras)", "fine-tuned model"
    split: str
    class_names: list[str]
    labels: np.ndarray
    proba: np.ndarray  # (N, K)
    keys: list[str]
    data: object = None  # an opened Source, for thumbnails; None: keys only
    notes: list[str] = field(default_factory=list)


@dataclass
class ReportResult:
    path: Path
    split: str
    metrics: dict
    ece: float
    n_wrong: int
    n_thumbnails: int
    seconds: float

    def to_dict(self) -> dict:
        return {"path": str(self.path), "split": self.split, "accuracy": self.metrics["accuracy"],
                "balanced_accuracy": self.metrics["balanced_accuracy"], "ece": self.ece, "n": self.metrics["n"],
                "n_wrong": self.n_wrong, "n_thumbnails": self.n_thumbnails, "seconds": round(self.seconds, 3)}


def write_report(model, split: str | None = None, out=None, *, data=None, top: int = DEFAULT_TOP,
                 bins: int = DEFAULT_BINS, tfds_data_dir=None, overwrite: bool = False, progress=None,
                 tta: str | None = None) -> ReportResult:
    """Evaluate ``model`` (a head folder or a fine-tuned model folder) on ``split`` and write the page.

    Parameters
    ----------
    split : str, optional
        Default: ``test`` if the cache has one, else ``validation``.
    out : path, optional
        The HTML file: a new one, or an existing one with ``overwrite`` (never the model's own files
        or a bottlecache file). Default ``report-<folder name>-<split>.html`` in the current folder,
        or ``…-2.html`` and so on beside an earlier one.
    data : str or path, optional
        The image folder (or tfds name) the cache was built from: thumbnails of the mistakes.
        Needed for a fine-tuned model, which runs on the images.
    top : int
        How many of the most confidently wrong images to show.
    bins : int
        Confidence bins of the reliability diagram and the expected calibration error.
    tta : {"none", "flip"}, optional
        Test-time flips (the mean of the logits of each image and its mirror); default as the head
        was trained, none for a fine-tuned model.
    """
    check_positive("top", top, maximum=MAX_TOP)
    check_range("bins", bins, 2, 100, high_open=False)
    if tfds_data_dir is not None:
        tfds_data_dir = str(check_folder_option("tfds_data_dir", tfds_data_dir))
    _require_matplotlib()
    inputs = [model] + ([data] if data is not None and Path(str(data)).exists() else [])
    if out is not None:
        out = check_output_file("out", out, overwrite=overwrite, inputs=inputs)
    started = time.perf_counter()
    evaluation = evaluate(model, split, data=data, tfds_data_dir=tfds_data_dir, progress=progress, tta=tta)
    if out is None:
        out = free_file(Path(f"report-{Path(model).name}-{evaluation.split}.html"))
    check_output_file("out", out, overwrite=overwrite, inputs=inputs)  # again: the evaluation took a while
    page, summary = render(evaluation, top, bins)
    try:
        atomic_write_text(out, page)
    except OSError as error:
        raise write_error(out, error, "nothing was written") from None
    return ReportResult(out, evaluation.split, summary["metrics"], summary["ece"], summary["n_wrong"],
                        summary["n_thumbnails"], time.perf_counter() - started)


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise BottlecacheError("The report draws its plots with matplotlib, which is not installed; "
                               "run `pip install matplotlib`.") from None


# ---------------------------------------------------------------------------------------------
# Evaluating


def evaluate(model, split=None, *, data=None, tfds_data_dir=None, progress=None, tta: str | None = None) -> Evaluation:
    """A head folder → its cache's features; a fine-tuned model folder → the images of ``data``.
    ``tta`` as ``predict.load_model`` takes it (a head's mirrored features come from its cache)."""
    folder = Path(model)
    if tta is not None:
        check_choice("tta", tta, TTAS)
    if folder.is_dir() and (folder / "head.json").exists() and not (folder / "model.json").exists():
        return _evaluate_head(folder, split, data, tfds_data_dir, tta)
    if is_export(folder):
        raise BottlecacheError(f"{folder} is an export; report on the head or fine-tuned model folder it came from.")
    predictor = load_model(folder, tta=tta)  # refuses what is neither, with one line
    return _evaluate_model(predictor, split, data, tfds_data_dir, progress)


def _default_split(splits, split):
    if split is not None:
        if split not in splits:
            raise BottlecacheError(f"The 'split' option must be one of {', '.join(splits)}. Got {split!r} instead.")
        return split
    for name in ("test", "validation"):
        if name in splits:
            return name
    raise BottlecacheError(f"There is no test or validation split to report on (splits: {', '.join(splits)}); "
                           "pass --split.")


def _evaluate_head(folder: Path, split, data, tfds_data_dir, tta: str | None = None) -> Evaluation:
    loaded = load_head(folder)
    tta = loaded.tta if tta is None else tta
    with loaded.open_cache() as cache:
        if tta != "none" and cache.tta != tta:
            raise BottlecacheError(f"The 'tta' option {tta} needs the mirrored features of the cache, and the head's "
                                   "cache has none; build it with `cache build --tta flip` (and train the head on it), "
                                   "or pass --tta none.")
        split = _default_split(cache.splits, split)
        proba = predict_split(loaded.head, cache, split, tta)
        labels, keys, config = cache.labels(split), cache.keys(split), cache.config
    kind = f"head ({loaded.kind}" + (f", a stack of {len(loaded.members)} caches" if len(loaded.members) > 1 else "") + ")"
    evaluation = Evaluation(str(folder), kind, split, list(loaded.class_names), labels, proba, keys)
    if tta == "flip":
        evaluation.notes.append("Test-time flips: each image's probabilities are from the mean of its logits and its "
                                "mirror's.")
    calibration_record = loaded.record["params"].get("calibration")
    if calibration_record:
        evaluation.notes.append(
            f"Calibrated head: its logits are divided by the temperature {loaded.head.temperature:.3f} fitted on "
            f"validation (expected calibration error there {calibration_record['ece_before']:.4f} before, "
            f"{calibration_record['ece_after']:.4f} after).")
    where = loaded.record.get("data") or {}
    if data is None and where.get("path") and Path(where["path"]).is_dir():  # where the cache's build found it
        data, tfds_data_dir = where["path"], tfds_data_dir or where.get("tfds_data_dir")
    if data is not None:
        evaluation.data = _open_data(data, config, tfds_data_dir, evaluation.notes)
    elif where.get("path"):
        evaluation.notes.append(f"Thumbnails need the images, which were at {where['path']} when the cache was built "
                                "and are not there now: pass --data with where they are.")
    else:
        evaluation.notes.append("Thumbnails need the images: pass --data with the folder the cache was built from.")
    return evaluation


def _open_data(data, config: dict, tfds_data_dir, notes: list) -> object:
    source = open_source(data, list(config["splits"].values()), tfds_data_dir=tfds_data_dir)
    if source.identity != config["data"]:
        notes.append(f"The data {data} is not exactly what the cache was built from (its files or their dates "
                     "differ); thumbnails are looked up by key.")
    return source


def _evaluate_model(predictor, split, data, tfds_data_dir, progress) -> Evaluation:
    if data is None:
        raise BottlecacheError("A fine-tuned model is evaluated on images: pass --data with the image folder "
                               "(or tfds name) it was trained on.")
    if predictor.kind != "model":
        raise BottlecacheError(f"{predictor.path} is not a head folder or a fine-tuned model folder.")
    specs = None
    try:
        import json

        head = Path(json.loads((predictor.path / "model.json").read_text())["head"])
        specs = list(read_head_record(head).cache.config.splits.values())
    except (OSError, ValueError, KeyError, TypeError, BottlecacheError):
        pass  # the warm-start head is gone: the data's own splits
    source = open_source(data, specs, tfds_data_dir=tfds_data_dir)
    split = _default_split(list(source.splits), split)
    n = source.split(split).n_examples
    if progress is not None:
        progress.start_split(split, n, 0)
    labels, keys, proba = [], [], []
    ds = image_dataset(source, split, predictor.image_size, fast_decode=predictor.fast_decode,
                       model=predictor.model).batch(32)
    for _, k, y, x in ds:
        proba.append(predictor._predict_batch(np.asarray(x)))
        labels.append(y.numpy())
        keys += [v.decode("utf-8", "replace") for v in k.numpy()]
        if progress is not None:
            progress.advance(split, len(y))
    if not keys:
        raise BottlecacheError(f"No image of the {split!r} split of {data} could be read.")
    return Evaluation(str(predictor.path), "fine-tuned model", split, list(predictor.class_names),
                      np.concatenate(labels), np.concatenate(proba), keys, source)


# ---------------------------------------------------------------------------------------------
# Calibration and thresholds


def calibration(labels: np.ndarray, proba: np.ndarray, bins: int = DEFAULT_BINS) -> dict:
    """Confidence (the top probability) in ``bins`` equal-width bins: per bin the count, mean
    confidence and accuracy; ``ece`` = Σ (count / N) · |accuracy − confidence|."""
    confidence = proba.max(axis=1)
    correct = proba.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        mask = which == b
        count = int(mask.sum())
        conf = float(confidence[mask].mean()) if count else None
        acc = float(correct[mask].mean()) if count else None
        if count:
            ece += count / len(labels) * abs(acc - conf)
        rows.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": count, "confidence": conf,
                     "accuracy": acc})
    return {"bins": rows, "ece": float(ece)}


def threshold_curve(labels: np.ndarray, proba: np.ndarray) -> dict:
    """Two classes: accuracy and balanced accuracy when class 1 is predicted for p(class 1) ≥ t."""

    p1 = proba[:, 1]
    accuracy = [float(((p1 >= t).astype(int) == labels).mean()) for t in THRESHOLDS]
    balanced = [balanced_accuracy(labels, (p1 >= t).astype(int)) for t in THRESHOLDS]
    best = int(np.argmax(accuracy))
    return {"thresholds": THRESHOLDS.tolist(), "accuracy": accuracy, "balanced_accuracy": balanced,
            "best_threshold": float(THRESHOLDS[best]), "best_accuracy": accuracy[best]}


def confident_mistakes(labels: np.ndarray, proba: np.ndarray, top: int) -> list[int]:
    """Rows predicted wrong, the most confident first (ties: by row)."""
    predicted = proba.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    order = np.lexsort((wrong, -proba[wrong, predicted[wrong]]))
    return wrong[order][:top].tolist()


# ---------------------------------------------------------------------------------------------
# Pictures


def _figure(width=5.0, height=4.0):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(width, height), dpi=100)


def _png(plt, figure) -> str:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def confusion_png(matrix: list[list[int]], class_names: list[str]) -> str:
    k = len(class_names)
    size = min(12.0, 2.4 + 0.5 * k)
    plt, figure, axes = _figure(size + 0.9, size)
    cm = np.asarray(matrix)
    image = axes.imshow(cm, cmap="Blues")
    figure.colorbar(image, ax=axes, fraction=0.046)
    axes.set_xticks(range(k), class_names, rotation=45 if k > 4 else 0, ha="right" if k > 4 else "center")
    axes.set_yticks(range(k), class_names)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    if k <= 20:
        middle = cm.max() / 2 if cm.size else 0
        for i in range(k):
            for j in range(k):
                axes.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > middle else "black")
    axes.set_title("confusion matrix")
    return _png(plt, figure)


def reliability_png(cal: dict) -> str:
    plt, figure, axes = _figure(4, 3.6)
    bins = cal["bins"]
    centers = [(b["low"] + b["high"]) / 2 for b in bins]
    width = bins[0]["high"] - bins[0]["low"]
    accuracy = [b["accuracy"] if b["count"] else 0.0 for b in bins]
    axes.bar(centers, accuracy, width=width * 0.95, color="#4c78a8", edgecolor="white", label="accuracy")
    axes.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    shown = [b for b in bins if b["count"]]
    axes.plot([b["confidence"] for b in shown], [b["accuracy"] for b in shown], "o", color="#e45756",
              label="mean confidence")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.02)
    axes.set_xlabel("confidence (top probability)")
    axes.set_ylabel("accuracy")
    axes.set_title(f"reliability, ECE {cal['ece']:.4f}")
    axes.legend(loc="upper left", fontsize="small")
    return _png(plt, figure)


def threshold_png(curve: dict, positive: str) -> str:
    plt, figure, axes = _figure(4, 3.6)
    axes.plot(curve["thresholds"], curve["accuracy"], linewidth=3, alpha=0.6, label="accuracy")
    axes.plot(curve["thresholds"], curve["balanced_accuracy"], linewidth=1.2, label="balanced accuracy")
    axes.axvline(0.5, color="gray", linestyle="--", label="0.5 (argmax)")
    axes.axvline(curve["best_threshold"], color="#e45756", linestyle=":", label=f"best {curve['best_threshold']:.2f}")
    axes.set_xlabel(f"threshold on p({positive})")
    axes.set_ylabel("accuracy")
    axes.set_ylim(0, 1.02)
    axes.set_title("accuracy against the decision threshold")
    axes.legend(loc="lower center", fontsize="small")
    return _png(plt, figure)


def thumbnails(source, split: str, keys: list[str]) -> dict[str, str]:
    """key → base64 JPEG of at most ``THUMBNAIL`` pixels, for the ``keys`` found in the split that
    decode (one pass over a tfds split; a folder's files are read directly)."""
    found = {}
    for key, encoded in _image_bytes(source, split, set(keys)):
        jpeg = thumbnail_jpeg(encoded)
        if jpeg is not None:
            found[key] = jpeg
    return found


def thumbnail_jpeg(encoded: bytes) -> str | None:
    """Encoded image bytes → a base64 JPEG thumbnail; None if Pillow cannot decode them."""
    from PIL import Image  # matplotlib depends on Pillow

    try:
        with Image.open(io.BytesIO(encoded)) as image:
            image = image.convert("RGB")
            image.thumbnail((THUMBNAIL, THUMBNAIL))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=85)
    except Exception:  # noqa: BLE001 - an image Pillow cannot read: the row says so
        return None
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _image_bytes(source, split: str, wanted: set[str]):
    """(key, encoded bytes) of the ``wanted`` keys that the source's split holds and can be read."""
    if split not in source.splits:
        return
    if source.kind == "folder":
        s = source.split(split)
        for key, path in zip(s.keys, s.paths):
            if key in wanted:
                try:
                    yield key, Path(path).read_bytes()
                except OSError:
                    continue
        return
    left = set(wanted)
    for _, k, _, encoded in source.examples(split):
        key = k.numpy().decode("utf-8", "replace")
        if key in left:
            left.discard(key)
            yield key, encoded.numpy()
            if not left:
                return


# ---------------------------------------------------------------------------------------------
# The page


CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 2rem auto; max-width: 1320px;
       color: #222; padding: 0 1rem; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5rem 0; } th, td { padding: 0.25rem 0.7rem; text-align: right; }
th:first-child, td:first-child { text-align: left; } tr:nth-child(even) { background: #f5f5f5; }
.summary td { text-align: left; } .plots { display: flex; flex-wrap: wrap; gap: 1rem; align-items: flex-start; }
.mistakes { display: grid; grid-template-columns: repeat(auto-fill, minmax(180px, 1fr)); gap: 0.8rem; }
figure { margin: 0; padding: 0.4rem; border: 1px solid #ddd; border-radius: 4px; background: #fff; }
figure img { display: block; max-width: 100%; margin: 0 auto; }
figcaption { font-size: 0.8rem; overflow-wrap: anywhere; } .wrong { color: #b00020; font-weight: 600; }
.note { color: #555; font-style: italic; }
"""


def render(e: Evaluation, top: int, bins: int) -> tuple[str, dict]:
    """The page, and a summary of what it shows."""

    metrics = compute_metrics(e.labels, e.proba, e.class_names)
    cal = calibration(e.labels, e.proba, bins)
    mistakes = confident_mistakes(e.labels, e.proba, top)
    n_wrong = int((e.proba.argmax(axis=1) != e.labels).sum())
    cards, n_thumbnails = _mistake_cards(e, mistakes)
    sections = [
        f"<h1>Error report: {_h(Path(e.name).name)}</h1>",
        _summary(e, metrics, cal, n_wrong),
        "<h2>Per class</h2>", _per_class_table(metrics),
        "<h2>Confusion matrix and calibration</h2><div class='plots'>",
        _img(confusion_png(metrics["confusion_matrix"], e.class_names), "png", "confusion matrix"),
        _img(reliability_png(cal), "png", "reliability diagram"),
    ]
    if len(e.class_names) == 2:
        curve = threshold_curve(e.labels, e.proba)
        sections.append(_img(threshold_png(curve, e.class_names[1]), "png", "accuracy against the threshold"))
        sections.append(f"</div><p>Threshold on p({_h(e.class_names[1])}): accuracy at 0.5 "
                        f"{metrics['accuracy']:.4f}; best {curve['best_accuracy']:.4f} at "
                        f"{curve['best_threshold']:.2f} (chosen on this split: optimistic).</p>")
    else:
        sections.append("</div>")
    sections += [_calibration_table(cal), f"<h2>Most confidently wrong ({len(mistakes)} of {n_wrong})</h2>"]
    sections += [f"<p class='note'>{_h(note)}</p>" for note in e.notes]
    sections.append(f"<div class='mistakes'>{''.join(cards)}</div>" if cards else "<p>No mistakes on this split.</p>")
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>bottlecache report: "
            f"{_h(Path(e.name).name)} on {_h(e.split)}</title><style>{CSS}</style></head><body>"
            + "\n".join(sections) + "</body></html>\n")
    return page, {"metrics": metrics, "ece": cal["ece"], "n_wrong": n_wrong, "n_thumbnails": n_thumbnails}


def _h(text) -> str:
    return html.escape(str(text), quote=True)


def _img(data: str, kind: str, alt: str) -> str:
    return f"<figure><img src='data:image/{kind};base64,{data}' alt='{_h(alt)}'></figure>"


def _summary(e: Evaluation, metrics: dict, cal: dict, n_wrong: int) -> str:
    rows = [("model", f"{e.name} ({e.kind})"), ("split", f"{e.split}: {metrics['n']} images, {n_wrong} wrong"),
            ("accuracy", f"{metrics['accuracy']:.4f}"), ("balanced accuracy", f"{metrics['balanced_accuracy']:.4f}"),
            ("log loss", f"{metrics['log_loss']:.4f}"), ("expected calibration error", f"{cal['ece']:.4f}")]
    if "roc_auc" in metrics:
        rows.append(("ROC AUC", f"{metrics['roc_auc']:.4f}"))
    rows.append(("written", time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())))
    return "<table class='summary'>" + "".join(f"<tr><th>{_h(a)}</th><td>{_h(b)}</td></tr>" for a, b in rows) + "</table>"


def _per_class_table(metrics: dict) -> str:
    head = "<tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>"
    rows = "".join(
        f"<tr><td>{_h(name)}</td><td>{v['precision']:.4f}</td><td>{v['recall']:.4f}</td><td>{v['f1']:.4f}</td>"
        f"<td>{v['support']}</td></tr>" for name, v in metrics["per_class"].items()
    )
    return f"<table>{head}{rows}</table>"


def _calibration_table(cal: dict) -> str:
    head = "<tr><th>confidence</th><th>images</th><th>mean confidence</th><th>accuracy</th></tr>"
    rows = "".join(
        f"<tr><td>{b['low']:.2f}–{b['high']:.2f}</td><td>{b['count']}</td>"
        f"<td>{'-' if b['confidence'] is None else format(b['confidence'], '.4f')}</td>"
        f"<td>{'-' if b['accuracy'] is None else format(b['accuracy'], '.4f')}</td></tr>" for b in cal["bins"] if b["count"]
    )
    return f"<details><summary>Reliability bins</summary><table>{head}{rows}</table></details>"


def _mistake_cards(e: Evaluation, rows: list[int]) -> tuple[list[str], int]:
    cards, n_thumbnails = [], 0
    pictures = thumbnails(e.data, e.split, [e.keys[i] for i in rows]) if e.data is not None and rows else {}
    for i in rows:
        predicted = int(e.proba[i].argmax())
        probabilities = ", ".join(f"{_h(c)} {p:.3f}" for c, p in zip(e.class_names, e.proba[i]))
        jpeg = pictures.get(e.keys[i])
        if jpeg is not None:
            n_thumbnails += 1
            picture = f"<img src='data:image/jpeg;base64,{jpeg}' alt='{_h(e.keys[i])}'>"
        elif e.data is not None:
            picture = "<p class='note'>image not found in the data</p>"
        else:
            picture = ""
        cards.append(
            f"<figure>{picture}<figcaption><b>{_h(e.keys[i])}</b><br>true {_h(e.class_names[int(e.labels[i])])}, "
            f"predicted <span class='wrong'>{_h(e.class_names[predicted])}</span> "
            f"({e.proba[i, predicted]:.3f})<br>{probabilities}</figcaption></figure>"
        )
    return cards, n_thumbnails

