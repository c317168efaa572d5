"""Logistic regression fitted from blocks of rows: the scikit-learn head when its features do not fit
the memory budget (``cache train-head --max-memory``).

The objective is scikit-learn's ``LogisticRegression(C=C)`` with its lbfgs solver, written out:
the mean (sample-weighted) log loss plus ``||W||² / (2 C n)``, the intercept not penalised; a
binary problem has one weight vector, more classes a softmax over one vector each. Its value and
gradient are summed over blocks of rows read from the cache, and SciPy's L-BFGS-B minimises it with
scikit-learn's settings, so the fitted weights are the in-memory head's (to the solver's tolerance)
while memory holds one block, never the split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.errors import BottlecacheError


@dataclass
class BlockFit:
    """What ``fit_blocks`` found: the weights as scikit-learn stores them, and how the solver ended."""

    coef: np.ndarray  # (1, d) for two classes, (k, d) for more
    intercept: np.ndarray
    classes: np.ndarray  # the labels present, in order
    iterations: int
    passes: int  # reads of the training rows (one per value-and-gradient evaluation)
    converged: bool


def fit_blocks(blocks, labels: np.ndarray, n_features: int, C: float = 1.0, *, class_weight: str = "none",
               max_iter: int = 2000, tol: float = 1e-4) -> BlockFit:
    """Fit on the rows ``blocks()`` yields, block by block.

    Parameters
    ----------
    blocks : callable
        Each call returns an iterator over ``(rows, x)``: ``rows`` a slice or index array into
        ``labels``, ``x`` those rows' features (float32, (b, d)). It is called once per pass.
    labels : (n,) int array
        The training labels (small beside the features: they stay in memory).
    class_weight : {"none", "balanced"}
        ``balanced``: each row weighted n / (classes present × its class's count), as scikit-learn's.
    """
    from scipy.optimize import minimize

    classes, y = np.unique(labels, return_inverse=True)
    if len(classes) < 2:
        raise BottlecacheError("A logistic regression needs examples of at least two classes.")
    k, d = len(classes), int(n_features)
    weights = np.ones(len(y))
    if class_weight == "balanced":
        counts = np.bincount(y, minlength=k)
        weights = len(y) / (k * counts[y])
    total = float(weights.sum())
    outputs = 1 if k == 2 else k
    passes = 0

    def value_and_gradient(theta):
        nonlocal passes
        passes += 1
        W, b = theta[: outputs * d].reshape(outputs, d), theta[outputs * d :]
        loss, grad_w, grad_b = 0.0, np.zeros_like(W), np.zeros_like(b)
        for rows, x in blocks():
            x = np.asarray(x, np.float64)
            z, yy, sw = x @ W.T + b, y[rows], weights[rows]
            if outputs == 1:
                z = z[:, 0]
                positive = yy == 1
                loss += float(np.sum(sw * (np.logaddexp(0.0, z) - positive * z)))
                residual = (sw * (_sigmoid(z) - positive))[:, None]
            else:
                top = z.max(axis=1, keepdims=True)
                log_norm = top[:, 0] + np.log(np.exp(z - top).sum(axis=1))
                loss += float(np.sum(sw * (log_norm - z[np.arange(len(yy)), yy])))
                residual = np.exp(z - log_norm[:, None])
                residual[np.arange(len(yy)), yy] -= 1.0
                residual *= sw[:, None]
            grad_w += residual.T @ x
            grad_b += residual.sum(axis=0)
        scale = 1.0 / total
        penalty = 0.5 / (C * total)
        value = loss * scale + penalty * float(np.sum(W * W))
        gradient = np.concatenate([(grad_w * scale + 2 * penalty * W).ravel(), grad_b * scale])
        return value, gradient

    result = minimize(value_and_gradient, np.zeros(outputs * (d + 1)), jac=True, method="L-BFGS-B",
                      options={"maxiter": max_iter, "maxls": 50, "gtol": tol, "ftol": 64 * np.finfo(float).eps})
    theta = result.x
    return BlockFit(theta[: outputs * d].reshape(outputs, d), theta[outputs * d :], classes, int(result.nit), passes,
                    bool(result.success))


def kept_blocks(read, n: int, keep, block: int):
    """``blocks()`` for ``fit_blocks`` over ``n`` rows that ``read(lo, hi)`` returns ``block`` at a time:
    the rows ``keep`` (a boolean mask, or None for all) leaves in, each block with its rows'
    positions among the rows kept."""
    position = None if keep is None else np.cumsum(keep) - 1

    def blocks():
        for lo in range(0, n, block):
            hi = min(n, lo + block)
            if position is None:
                yield slice(lo, hi), read(lo, hi)
                continue
            kept = np.asarray(keep[lo:hi], bool)
            if kept.any():
                yield position[lo:hi][kept], read(lo, hi)[kept]

    return blocks


def _sigmoid(z: np.ndarray) -> np.ndarray:
    out = np.empty_like(z)
    positive = z >= 0
    out[positive] = 1.0 / (1.0 + np.exp(-z[positive]))
    e = np.exp(z[~positive])
    out[~positive] = e / (1.0 + e)
    return out
