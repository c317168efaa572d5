"""What a head trains on when ``train-head --views`` asks for a cache's augmented views.

The scikit-learn head fits on the clean pooled features and every view's (``pooled_rows``). The
Keras head draws, each epoch, one of the K views of each image (``ViewEpochs``), as an
augmentation layer would draw one transformation per image per epoch; validation stays clean.
"""

from __future__ import annotations

import numpy as np

from ..cache.store import VIEWS_SPLIT
from ..core.errors import BottlecacheError
from ..core.tf import import_tf


def check_views(cache, train_split: str) -> int:
    """The cache's number of views (one line if it has none, or they are not of ``train_split``)."""
    if not cache.n_views:
        raise BottlecacheError(
            f"{cache.path.name} holds no augmented views; build it with `bottlecache cache build --views K` "
            "(and --augment SPEC), or train without --views."
        )
    if train_split != VIEWS_SPLIT:
        raise BottlecacheError(f"Views are cached for the {VIEWS_SPLIT!r} split only; got train split {train_split!r}.")
    return cache.n_views


def pooled_rows(cache, with_clean: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``(pooled, labels)``: the train split's views (N × K rows), after its clean rows if ``with_clean``."""
    labels = cache.labels(VIEWS_SPLIT)
    views = cache.view_pooled()
    x = views.reshape(-1, views.shape[-1])
    y = np.repeat(labels, views.shape[1])
    if with_clean:
        x, y = np.concatenate([cache.pooled(VIEWS_SPLIT), x]), np.concatenate([labels, y])
    return x, y


class ViewEpochs:
    """Batches of one drawn view per image, a new draw and order each epoch (seeded), as a tf.data
    dataset for ``model.fit``. The views stay in memory in their stored dtype."""

    def __init__(self, cache, batch_size: int, seed: int):
        self.views = cache.view_features()  # (N, K, s, s, C)
        self.labels = cache.labels(VIEWS_SPLIT)
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)

    def batches(self):
        n, k = self.views.shape[:2]
        order = self.rng.permutation(n)
        drawn = self.rng.integers(0, k, size=n)
        for i in range(0, n, self.batch_size):
            rows = np.sort(order[i : i + self.batch_size])
            yield self.views[rows, drawn[rows]].astype(np.float32), self.labels[rows]

    def dataset(self):
        tf = import_tf()
        shape = self.views.shape[2:]
        return tf.data.Dataset.from_generator(
            self.batches,
            output_signature=(tf.TensorSpec((None, *shape), tf.float32), tf.TensorSpec((None,), tf.int64)),
        ).prefetch(2)
