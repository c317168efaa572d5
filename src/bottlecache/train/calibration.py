"""Calibrated probabilities: temperature scaling (Guo et al., 2017) fitted on the validation split,
and the expected calibration error (ECE) that says how far a head's confidence is from its accuracy.

A head's logits are divided by one temperature T > 0 before the softmax (or the sigmoid): the
predicted class never changes, only how sure the head says it is. T is the value that minimises
the validation log loss; it is stored in the head's record and applied wherever the head predicts
(heads, ``predict``, ``report``, ``export``). See docs/heads-and-finetuning.md, "Calibration".
"""

from __future__ import annotations

import numpy as np

from ..core.errors import BottlecacheError

ECE_BINS = 10  # equal-width confidence bins, as the report's reliability diagram
TEMPERATURE_RANGE = (1e-2, 1e2)


def expected_calibration_error(labels: np.ndarray, proba: np.ndarray, bins: int = ECE_BINS) -> float:
    """Σ over equal-width bins of the top probability: (bin count / N) · |bin accuracy − bin mean confidence|."""
    labels, proba = np.asarray(labels), np.asarray(proba, dtype=np.float64)
    if not len(labels):
        return 0.0
    confidence = proba.max(axis=1)
    correct = proba.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(total)


def probabilities_from_logits(logits: np.ndarray) -> np.ndarray:
    """(N, 1) binary logits → (N, 2) probabilities; (N, K) logits → softmax."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim == 1 or logits.shape[1] == 1:
        p = 1.0 / (1.0 + np.exp(-logits.reshape(-1)))
        return np.stack([1.0 - p, p], axis=1)
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def scaled_probabilities(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities of ``logits / temperature`` ((N, 1) or (N,) binary logits: sigmoid; (N, K): softmax)."""
    return probabilities_from_logits(np.asarray(logits, dtype=np.float64) / temperature)


def mean_log_loss(labels: np.ndarray, proba: np.ndarray) -> float:
    """The mean negative log probability of each image's label (clipped at 1e-15)."""
    return float(-np.mean(np.log(np.clip(proba[np.arange(len(labels)), labels], 1e-15, 1.0))))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimising the log loss of ``labels`` under ``logits / T`` (bounded search on log T)."""
    from scipy.optimize import minimize_scalar

    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) < 2:
        raise BottlecacheError("Calibrating needs at least two validation images.")

    def loss(log_t: float) -> float:
        return mean_log_loss(labels, scaled_probabilities(logits, float(np.exp(log_t))))

    low, high = np.log(TEMPERATURE_RANGE[0]), np.log(TEMPERATURE_RANGE[1])
    found = minimize_scalar(loss, bounds=(low, high), method="bounded", options={"xatol": 1e-6})
    return float(np.exp(found.x))
