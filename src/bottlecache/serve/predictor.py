"""The loaded model as users run it: images (paths or arrays) in batches → a row per image,
with the class, its probability and every class's, or the reason an image could not be read."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.errors import reason
from ..core.options import DEFAULT_MODEL
from ..data.sources import load_image, preprocess


@dataclass
class Predictor:
    """Images → class probabilities, from a fine-tuned model folder or a head folder."""

    path: Path
    kind: str  # "model", "head" or "export <format>"
    class_names: list[str]
    image_size: int
    _predict_batch: object = field(repr=False)
    fast_decode: bool = False  # as the cache the head was trained on was decoded
    model: str = DEFAULT_MODEL  # the base, whose preprocessing the images get (bottlecache.core.registry)
    # What it runs, loaded once, for an export built from the same objects: a fine-tuned model's
    # {"network"}, a head's {"bases", "head"} (a LoadedHead); nothing for an export.
    parts: dict = field(default_factory=dict, repr=False)
    # A stacked head's bases each take the image at their own size and preprocessing: (image_size,
    # fast_decode, model) per base; ``_predict_batch`` then takes one array per base. None: the one above.
    inputs: list | None = None
    tta: str = "none"  # "flip": the mean of the logits of each image and its mirror

    @property
    def input_specs(self) -> list[tuple[int, bool, str]]:
        return self.inputs or [(self.image_size, self.fast_decode, self.model)]

    def predict(self, items, batch_size: int = 32, progress=None) -> list[dict]:
        """One dict per item (a path or a uint8 (H, W, 3) array): path, label, probability,
        probabilities; or path and a short error for an image that could not be read.

        Images are decoded and run ``batch_size`` at a time: memory holds one batch, not the list.
        ``progress`` (``bottlecache.core.progress.Progress``) advances per batch, under "predict".
        """
        items = list(items)
        rows = []
        if progress is not None:
            progress.start_split("predict", len(items), 0)
        for lo in range(0, len(items), batch_size):
            batch = items[lo : lo + batch_size]
            rows += self._predict_rows(batch, len(rows))
            if progress is not None:
                progress.advance("predict", len(batch))
        if progress is not None:
            progress.end_split("predict")
        return rows

    def _predict_rows(self, items, first: int) -> list[dict]:
        rows, images, slots = [], [], []
        specs = self.input_specs
        for item in items:
            name = str(item) if isinstance(item, (str, os.PathLike)) else f"<array {first + len(rows)}>"
            try:
                if isinstance(item, (str, os.PathLike)):
                    inputs = [load_image(item, size, fast, model) for size, fast, model in specs]
                else:
                    inputs = [preprocess(np.asarray(item), size, model) for size, _, model in specs]
                images.append([np.asarray(image) for image in inputs])
                slots.append(len(rows))
                rows.append({"path": name})
            except Exception as error:  # the decoder's reason, for this image's row
                rows.append({"path": name, "error": _image_error(item, error)})
        if images:
            batches = [np.stack(column) for column in zip(*images)]
            for slot, p in zip(slots, self._predict_batch(batches if self.inputs else batches[0])):
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
