"""Prediction: a fine-tuned model folder or a head folder → class probabilities per image.

``load_model`` checks the folder's record (``model.json`` or ``head.json``) and that its model
file fits it (input size, number of outputs, classes) before anything is predicted. Images go
through the same decoding and preprocessing as every other path (``bottlecache.data.sources``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.errors import BottlecacheError, CacheMismatchError
from ..core.files import atomic_write_text, check_output_file, write_error
from ..core.options import TTAS, check_choice
from ..core.records import DECODE_FAST, MODEL_FORMAT, RECORD_VERSION, ModelRecord, read_json
from ..data.sources import IMAGE_EXTENSIONS
from ..models.backbone import load_backbone, resolve_weights
from ..train.heads import check_model_shapes, load_head, load_keras_file, probabilities_from_logits
from .artifacts import is_export, load_export
from .predictor import Predictor

MODEL_ADVICE = "fine-tune again with `bottlecache finetune run`, or pass another model folder"


def load_model(path, weights=None, tta: str | None = None) -> Predictor:
    """A fine-tuned model folder (``model.keras``), a head folder (``head.json``) or an export
    (``bottlecache export``: its folder or its artifact, run by its own runtime) → ``Predictor``.

    A head runs on top of the frozen backbone its record names (a stacked head: each of its bases);
    ``weights`` overrides where that backbone's weights file is found (its sha256 must match the
    record). A fine-tuned model holds its own weights: ``weights`` is refused there. ``tta``
    ``flip``: the mean of the logits of each image and its mirror; ``none``: the image alone; None:
    as the head was trained (``train-head --tta``), else none. An export carries its own.
    """

    if tta is not None:
        check_choice("tta", tta, TTAS)
    if is_export(path):
        if tta is not None:
            raise BottlecacheError(f"The 'tta' option does not apply to an export ({path}): its test-time flips are "
                                   "inside the artifact, chosen when it was exported (`export --tta`). Leave --tta out.")
        if weights is not None:
            raise BottlecacheError(
                f"The 'weights' option applies to head folders only; {path} is an export, which holds its own "
                "weights. Leave --weights out."
            )
        return load_export(path)
    folder = Path(path)
    if not folder.is_dir():
        what = "is a file" if folder.exists() else "does not exist"
        raise BottlecacheError(f"The model folder {folder} {what}; pass a fine-tuned model folder or a head folder.")
    if (folder / "model.json").exists() or (folder / "model.keras").exists():
        if weights is not None:
            raise BottlecacheError(
                f"The 'weights' option applies to head folders only; {folder} is a fine-tuned model, which holds "
                "its own weights. Leave --weights out."
            )
        return _load_finetuned(folder, tta or "none")
    if (folder / "head.json").exists():
        return _load_head(folder, weights, tta)
    raise BottlecacheError(
        f"{folder} is neither a fine-tuned model folder (model.json, model.keras) nor a head folder (head.json)."
    )


def _load_finetuned(folder: Path, tta: str = "none") -> Predictor:
    record = read_json(folder / "model.json", ModelRecord, MODEL_ADVICE, fmt=MODEL_FORMAT, version=RECORD_VERSION)
    size = record.backbone.image_size
    model = load_keras_file(folder / "model.keras", advice=MODEL_ADVICE)
    n_outputs = 1 if len(record.class_names) == 2 else len(record.class_names)
    check_model_shapes(model, folder / "model.keras", (None, size, size, 3), n_outputs, MODEL_ADVICE)
    def predict_batch(x):
        logits = np.asarray(model(x, training=False))
        if tta == "flip":
            logits = (logits + np.asarray(model(np.ascontiguousarray(x[:, :, ::-1]), training=False))) / 2
        return probabilities_from_logits(logits)

    return Predictor(folder, "model", list(record.class_names), size, predict_batch,
                     model=record.backbone.model, parts={"network": model}, tta=tta)


def _load_head(folder: Path, weights, tta: str | None = None) -> Predictor:
    loaded = load_head(folder)
    tta = loaded.tta if tta is None else tta
    members = loaded.members
    if weights is not None and len(members) > 1:
        raise BottlecacheError(f"The 'weights' option names one base's weights, and {folder} is a stacked head with "
                               f"{len(members)} bases: each is found where its cache's build found it. Leave --weights out.")
    bases, specs = [], []
    for member in members:
        size, base_name = int(member["backbone"]["image_size"]), member["backbone"]["model"]
        weights_ref = resolve_weights(weights if weights is not None else member.get("weights"), size, base_name)
        if weights_ref.sha256 != member["backbone"]["weights_sha256"]:
            raise CacheMismatchError(f"The head {folder} was trained for another backbone: weights_sha256 is "
                                     f"{member['backbone']['weights_sha256'][:12]}… for {base_name}, the weights file "
                                     f"{weights_ref.path} has {weights_ref.sha256[:12]}….")
        bases.append(load_backbone(weights_ref, size))
        specs.append((size, member["cache"]["config"]["decode"] == DECODE_FAST, base_name))

    def predict_batch(x):
        return loaded.predict_proba(head_input(bases, x if len(bases) > 1 else [x], tta))

    size, fast, base_name = specs[0]
    return Predictor(folder, "head", loaded.class_names, size, predict_batch, fast, base_name,
                     parts={"bases": bases, "head": loaded}, inputs=specs if len(specs) > 1 else None, tta=tta)


def head_input(bases, inputs, tta: str = "none") -> np.ndarray:
    """What a head takes from its bases' outputs on ``inputs`` (one batch per base): the one base's
    bottleneck, or the bases' pooled features side by side as a 1 × 1 map (a stack,
    ``bottlecache.cache.stack``); with ``tta`` ``flip``, the mean of each image's and its mirror's."""
    outputs = []
    for base, x in zip(bases, inputs):
        features = np.asarray(base(x, training=False))
        if tta == "flip":
            features = (features + np.asarray(base(np.ascontiguousarray(x[:, :, ::-1]), training=False))) / 2
        outputs.append(features)
    if len(outputs) == 1:
        return outputs[0]
    joined = np.concatenate([f.mean(axis=(1, 2)) for f in outputs], axis=1)
    return joined[:, None, None, :]


def expand_images(items) -> list[Path]:
    """Files as given; folders → their image files, recursively, sorted.

    Raises
    ------
    BottlecacheError
        A folder holds no images, or nothing at all was given.
    """
    out = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
            if not found:
                raise BottlecacheError(
                    f"The folder {path} holds no images ({', '.join(IMAGE_EXTENSIONS)}); pass image files or a "
                    "folder of them."
                )
            out += found
        else:  # a file, or a path that is not there: its row will say so
            out.append(path)
    if not out:
        raise BottlecacheError("No images given; pass image files or folders.")
    return out


def check_csv_path(path, *, overwrite: bool = False, inputs=()) -> Path:
    """The 'csv' option: a new file in an existing folder (an existing one only with ``overwrite``),
    never one of ``inputs`` (the model and the images) or a bottlecache file."""
    return check_output_file("csv", path, overwrite=overwrite, inputs=inputs)


def write_csv(path, rows: list[dict], class_names: list[str], *, overwrite: bool = False) -> Path:
    """The rows of ``Predictor.predict`` as CSV (path, label, probability, one column per class,
    error), written under a temporary name and renamed into place; an existing file only with
    ``overwrite``, and never one of the images or a bottlecache file."""
    import csv
    import io

    path = check_csv_path(path, overwrite=overwrite, inputs=[r["path"] for r in rows if Path(r["path"]).exists()])
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "label", "probability", *class_names, "error"])
    for row in rows:
        proba = row.get("probabilities", {})
        writer.writerow([row["path"], row.get("label", ""),
                         f"{row['probability']:.6f}" if "probability" in row else "",
                         *(f"{proba[c]:.6f}" if c in proba else "" for c in class_names), row.get("error", "")])
    try:
        atomic_write_text(path, buffer.getvalue())
    except OSError as error:
        raise write_error(path, error, "nothing was written") from None
    return path
