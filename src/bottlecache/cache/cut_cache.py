"""A cut cache read back for fine-tuning: refused in one line unless it holds the cut asked for,
then its activations as in-memory datasets (``bottlecache.models.cut`` says what the cut is)."""

from __future__ import annotations

import numpy as np

from ..core.errors import BottlecacheError
from ..core.tf import import_tf
from .store import Cache


def cut_datasets(cache, batch_size: int, seed: int, keep=None):
    """``(train, validation)`` batches of ``(activations, labels)`` from a cut cache, in memory.

    The train split is shuffled with the same seeded shuffle of the same length as
    ``data.training_dataset`` (reshuffled each epoch): with nothing skipped, the batches hold the
    images an end-to-end run sees, in the same order. ``keep``: a mask of the train rows to use.
    """
    tf = import_tf()
    train_x, train_y = cache.features("train").astype(np.float32), cache.labels("train")
    if keep is not None:
        train_x, train_y = train_x[keep], train_y[keep]
    train = tf.data.Dataset.from_tensor_slices((train_x, train_y))
    train = train.shuffle(len(train_y), seed=seed, reshuffle_each_iteration=True).batch(batch_size).prefetch(2)
    val_x, val_y = cache.features("validation").astype(np.float32), cache.labels("validation")
    validation = tf.data.Dataset.from_tensor_slices((val_x, val_y)).batch(batch_size)
    return train, validation


def open_cut_cache(path, resolved_cut) -> "object":
    """A cut cache for the fine-tune ``resolved_cut`` asks for; a cache holding another cut (or none,
    or other data or weights) is refused in one line saying which cut is needed."""
    cache = Cache(path)
    try:
        need = resolved_cut.config["cut"]
        have = cache.config.get("cut")
        fine_tune_at = resolved_cut.settings.cut
        if not have or have.get("layer") != need["layer"]:
            held = f"the cut at {have['layer']}" if have else "no cut (bottleneck features)"
            raise BottlecacheError(
                f"{cache.path.name} holds {held}; --fine-tune-at {fine_tune_at} needs the cut at {need['layer']}: "
                f"run `bottlecache cache build --cut {fine_tune_at}` with the same data options, or drop --cut-cache."
            )
        if cache.fingerprint != resolved_cut.fingerprint:
            raise BottlecacheError(
                f"{cache.path.name} holds the cut at {need['layer']} of other data, weights, image size or dtype "
                f"(fingerprint {cache.fingerprint[:12]}, expected {resolved_cut.fingerprint[:12]}); drop --cut-cache "
                "to build the right one."
            )
        for split in ("train", "validation"):
            if split not in cache.splits:
                raise BottlecacheError(f"{cache.path.name} has no {split!r} split to fine-tune with.")
    except BaseException:
        cache.close()
        raise
    return cache
