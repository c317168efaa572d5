"""Prediction: a fine-tuned model folder or a head folder → class probabilities per image.

``load_model`` checks the folder's record (``model.json`` or ``head.json``) and that its model
file fits it (input size, number of outputs, classes) before anything is predicted. Images go
through the same decoding and preprocessing as every other path (``bottlecache.data``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import DEFAULT_MODEL
from .data import IMAGE_EXTENSIONS, load_image, preprocess
from .errors import BottlecacheError, reason
from .records import DECODE_FAST, MODEL_FORMAT, RECORD_VERSION, ModelRecord, read_json

MODEL_ADVICE = "fine-tune again with `bottlecache finetune run`, or pass another model folder"


@dataclass
class Predictor:
    """Images → class probabilities, from a fine-tuned model folder or a head folder."""

    path: Path
    kind: str  # "model" or "head"
    class_names: list[str]
    image_size: int
    _predict_batch: object = field(repr=False)
    fast_decode: bool = False  # as the cache the head was trained on was decoded
    model: str = DEFAULT_MODEL  # the base, whose preprocessing the images get (bottlecache.backbones)

    def predict(self, items, batch_size: int = 32) -> list[dict]:
        """One dict per item (a path or a uint8 (H, W, 3) array): path, label, probability,
        probabilities; or path and a short error for an image that could not be read."""
        rows, images, slots = [], [], []
        for item in items:
            name = str(item) if isinstance(item, (str, os.PathLike)) else f"<array {len(rows)}>"
            try:
                if isinstance(item, (str, os.PathLike)):
                    image = load_image(item, self.image_size, self.fast_decode, self.model)
                else:
                    image = preprocess(np.asarray(item), self.image_size, self.model)
                images.append(np.asarray(image))
                slots.append(len(rows))
                rows.append({"path": name})
            except Exception as error:  # the decoder's reason, for this image's row
                rows.append({"path": name, "error": _image_error(item, error)})
        for lo in range(0, len(images), batch_size):
            proba = self._predict_batch(np.stack(images[lo : lo + batch_size]))
            for slot, p in zip(slots[lo : lo + batch_size], proba):
                best = int(np.argmax(p))
                rows[slot].update(label=self.class_names[best], probability=float(p[best]),
                                  probabilities={c: float(v) for c, v in zip(self.class_names, p)})
        return rows


def _image_error(item, error: BaseException) -> str:
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        if not path.exists():
            return "no such file"
        if path.is_dir():
            return "a folder, not an image"
        try:
            if path.stat().st_size == 0:
                return "empty file"
        except OSError as stat_error:
            return reason(stat_error, 80)
    text = reason(error, 120)
    return f"not a decodable image ({text})" if text else "not a decodable image"


def load_model(path, weights=None) -> Predictor:
    """A fine-tuned model folder (``model.keras``) or a head folder (``head.json``) → ``Predictor``.

    A head runs on top of the frozen backbone its record names; ``weights`` overrides where that
    backbone's weights file is found (its sha256 must match the record). A fine-tuned model holds
    its own weights: ``weights`` is refused there.
    """
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
    from .heads import check_model_shapes, load_keras_file, probabilities_from_logits

    record = read_json(folder / "model.json", ModelRecord, MODEL_ADVICE, fmt=MODEL_FORMAT, version=RECORD_VERSION)
    size = record.backbone.image_size
    model = load_keras_file(folder / "model.keras", advice=MODEL_ADVICE)
    n_outputs = 1 if len(record.class_names) == 2 else len(record.class_names)
    check_model_shapes(model, folder / "model.keras", (None, size, size, 3), n_outputs, MODEL_ADVICE)
    return Predictor(folder, "model", list(record.class_names), size,
                     lambda x: probabilities_from_logits(np.asarray(model(x, training=False))),
                     model=record.backbone.model)


def _load_head(folder: Path, weights) -> Predictor:
    from .backbone import load_backbone, resolve_weights
    from .heads import load_head

    loaded = load_head(folder)
    size, base_name = int(loaded.backbone["image_size"]), loaded.backbone["model"]
    weights_ref = resolve_weights(weights if weights is not None else loaded.record.get("weights"), size, base_name)
    loaded.check_backbone(weights_sha256=weights_ref.sha256)
    base = load_backbone(weights_ref, size)

    def predict_batch(x):
        return loaded.predict_proba(np.asarray(base(x, training=False)))

    fast = loaded.record["cache"]["config"]["decode"] == DECODE_FAST
    return Predictor(folder, "head", loaded.class_names, size, predict_batch, fast, base_name)


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
