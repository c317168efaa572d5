"""Prediction: a fine-tuned model folder or a head folder → class probabilities per image.

``load_model`` checks the folder's record (``model.json`` or ``head.json``) and that its model
file fits it (input size, number of outputs, classes) before anything is predicted. Images go
through the same decoding and preprocessing as every other path (``bottlecache.data.sources``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.errors import BottlecacheError
from ..core.files import atomic_write_text, check_output_file, write_error
from ..core.records import DECODE_FAST, MODEL_FORMAT, RECORD_VERSION, ModelRecord, read_json
from ..data.sources import IMAGE_EXTENSIONS
from ..models.backbone import load_backbone, resolve_weights
from ..train.heads import check_model_shapes, load_head, load_keras_file, probabilities_from_logits
from .artifacts import is_export, load_export
from .predictor import Predictor

MODEL_ADVICE = "fine-tune again with `bottlecache finetune run`, or pass another model folder"


def load_model(path, weights=None) -> Predictor:
    """A fine-tuned model folder (``model.keras``), a head folder (``head.json``) or an export
    (``bottlecache export``: its folder or its artifact, run by its own runtime) → ``Predictor``.

    A head runs on top of the frozen backbone its record names; ``weights`` overrides where that
    backbone's weights file is found (its sha256 must match the record). A fine-tuned model holds
    its own weights: ``weights`` is refused there.
    """

    if is_export(path):
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
        return _load_finetuned(folder)
    if (folder / "head.json").exists():
        return _load_head(folder, weights)
    raise BottlecacheError(
        f"{folder} is neither a fine-tuned model folder (model.json, model.keras) nor a head folder (head.json)."
    )


def _load_finetuned(folder: Path) -> Predictor:
    record = read_json(folder / "model.json", ModelRecord, MODEL_ADVICE, fmt=MODEL_FORMAT, version=RECORD_VERSION)
    size = record.backbone.image_size
    model = load_keras_file(folder / "model.keras", advice=MODEL_ADVICE)
    n_outputs = 1 if len(record.class_names) == 2 else len(record.class_names)
    check_model_shapes(model, folder / "model.keras", (None, size, size, 3), n_outputs, MODEL_ADVICE)
    return Predictor(folder, "model", list(record.class_names), size,
                     lambda x: probabilities_from_logits(np.asarray(model(x, training=False))),
                     model=record.backbone.model, parts={"network": model})


def _load_head(folder: Path, weights) -> Predictor:
    loaded = load_head(folder)
    size, base_name = int(loaded.backbone["image_size"]), loaded.backbone["model"]
    weights_ref = resolve_weights(weights if weights is not None else loaded.record.get("weights"), size, base_name)
    loaded.check_backbone(weights_sha256=weights_ref.sha256)
    base = load_backbone(weights_ref, size)

    def predict_batch(x):
        return loaded.predict_proba(np.asarray(base(x, training=False)))

    fast = loaded.record["cache"]["config"]["decode"] == DECODE_FAST
    return Predictor(folder, "head", loaded.class_names, size, predict_batch, fast, base_name,
                     parts={"base": base, "head": loaded})


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
