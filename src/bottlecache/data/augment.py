"""Augmented views for the cache: the SPEC of ``cache build --augment`` and deterministic views.

A SPEC is a comma-separated list of ``flip`` (a horizontal flip, half the time), ``rotate=F``
(a rotation by an angle drawn in [-F, F] × 2π, as Keras's ``RandomRotation(F)``) and ``zoom=F``
(a scale drawn in [1 - F, 1 + F], as ``RandomZoom(F)``); ``tutorial`` is the TensorFlow
tutorial's ``RandomFlip('horizontal')`` + ``RandomRotation(0.2)``, i.e. ``flip,rotate=0.2``.
Pixels outside the image are filled by reflection and sampled bilinearly, as Keras does.

A view is a function of the image, its key, the view's index and the seed alone (its random
numbers come from a generator seeded by a hash of the three): a resumed or repeated build makes
the same arrays, whatever its batch size or engine. Views are made from the preprocessed image
(the shared ``data.preprocess``); flips, rotations and zooms commute with its per-pixel scaling.
"""

from __future__ import annotations

import hashlib

import numpy as np

from ..core.errors import BottlecacheError

TUTORIAL = "flip,rotate=0.2"
ALIASES = {"tutorial": TUTORIAL}
OPS = ("flip", "rotate", "zoom")  # the canonical order
LIMITS = {"rotate": 1.0, "zoom": 0.9}  # the largest factor each takes


def _bad(spec: str, why: str) -> BottlecacheError:
    return BottlecacheError(
        f"The 'augment' option must be 'tutorial' or a list such as 'flip,rotate=0.2,zoom=0.1' "
        f"(flip; rotate=F with 0 < F <= {LIMITS['rotate']:g}; zoom=F with 0 < F <= {LIMITS['zoom']:g}). "
        f"Got {spec!r}: {why}."
    )


def parse_spec(spec) -> dict:
    """SPEC → ``{"flip": True, "rotate": 0.2, "zoom": 0.1}`` (only what it names)."""
    if not isinstance(spec, str) or not spec.strip():
        raise _bad(str(spec), "it is empty")
    text = ALIASES.get(spec.strip().lower(), spec)
    ops: dict = {}
    for item in text.split(","):
        name, _, value = item.strip().lower().partition("=")
        if name not in OPS:
            raise _bad(spec, f"{name or 'an empty item'!r} is not one of {', '.join(OPS)}")
        if name in ops:
            raise _bad(spec, f"{name!r} is given twice")
        if name == "flip":
            if value not in ("", "horizontal"):
                raise _bad(spec, "flip takes no value (it flips horizontally)")
            ops["flip"] = True
            continue
        try:
            factor = float(value)
        except ValueError:
            raise _bad(spec, f"{name} needs a number, as {name}=0.1") from None
        if not 0 < factor <= LIMITS[name]:
            raise _bad(spec, f"{name}={value} is out of range")
        ops[name] = factor
    return ops


def canonical_spec(spec) -> str:
    """The SPEC in one spelling (fixed order, ``tutorial`` expanded): what the fingerprint holds."""
    ops = parse_spec(spec)
    return ",".join(name if name == "flip" else f"{name}={ops[name]:g}" for name in OPS if name in ops)


def view_rng(key: str, view: int, seed: int) -> np.random.Generator:
    """The random numbers of one view: seeded by a hash of the image key, the view index and the seed."""
    digest = hashlib.sha256(f"{seed}\0{view}\0{key}".encode("utf-8")).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def draw(ops: dict, rng: np.random.Generator) -> tuple[bool, float, float]:
    """``(flip, angle in radians, scale)`` of one view (each drawn, in the same order, even if unused)."""
    flip = bool(rng.random() < 0.5)
    angle = float(rng.uniform(-1.0, 1.0)) * ops.get("rotate", 0.0) * 2 * np.pi
    scale = 1.0 + float(rng.uniform(-1.0, 1.0)) * ops.get("zoom", 0.0)
    return flip and ops.get("flip", False), angle, scale


def transform(image: np.ndarray, flip: bool, angle: float, scale: float) -> np.ndarray:
    """``image`` (H, W, C) flipped, then rotated by ``angle`` and scaled by ``scale`` about its
    centre (reflected at the borders, bilinear)."""
    from scipy.ndimage import affine_transform

    if flip:
        image = image[:, ::-1]
    if angle == 0.0 and scale == 1.0:
        return np.ascontiguousarray(image, dtype=np.float32)
    # output pixel p samples the input at centre + scale * R(angle) (p - centre): a scale above 1 zooms out
    cos, sin = np.cos(angle), np.sin(angle)
    matrix = scale * np.array([[cos, -sin], [sin, cos]])
    centre = (np.array(image.shape[:2], dtype=np.float64) - 1) / 2
    offset = centre - matrix @ centre
    out = np.empty(image.shape, dtype=np.float32)
    for c in range(image.shape[2]):
        affine_transform(image[:, :, c], matrix, offset=offset, output=out[:, :, c], order=1, mode="reflect")
    return out


def view_batch(images: np.ndarray, keys, view: int, ops: dict, seed: int) -> np.ndarray:
    """View ``view`` of each image (keyed by ``keys``)."""
    return np.stack([transform(image, *draw(ops, view_rng(key, view, seed))) for image, key in zip(images, keys)])


def mirrored_features(engine, images: np.ndarray, batch_size: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """``(features (n, 1, ...) in dtype, pooled (n, 1, C) float32)``: the engine on each image mirrored
    left to right (preprocessing is per pixel, so mirroring the preprocessed image is mirroring the photo)."""
    mirrored = np.ascontiguousarray(images[:, :, ::-1])
    out = np.concatenate([engine(mirrored[i : i + batch_size]) for i in range(0, len(mirrored), batch_size)])
    return out.astype(dtype)[:, None], out.astype(np.float32).mean(axis=(1, 2))[:, None]


def view_features(engine, images: np.ndarray, keys, n_views: int, ops: dict, seed: int, batch_size: int,
                  dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """``(features (n, K, ...) in dtype, pooled (n, K, C) float32)``: the engine on each view of ``images``."""
    features, pooled = [], []
    for view in range(n_views):
        augmented = view_batch(images, keys, view, ops, seed)
        out = np.concatenate([engine(augmented[i : i + batch_size]) for i in range(0, len(augmented), batch_size)])
        pooled.append(out.astype(np.float32).mean(axis=(1, 2)))
        features.append(out.astype(dtype))
    return np.stack(features, axis=1), np.stack(pooled, axis=1)
