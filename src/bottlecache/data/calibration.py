"""The calibration sample of an int8 cache: which images set the quantisation ranges, chosen
reproducibly from the images being cached, and an identity of their content for the fingerprint.

A folder's sample is the ``n`` keys of the train split (else the first split) with the smallest
sha256: spread over every class folder, independent of the listing order, and unchanged when
photos are added unless one of the new keys ranks among them. A TensorFlow Datasets split's
sample is its first ``n`` examples (its keys are not known before reading it; its order is
fixed). The identity is the sha256 of the sample's content digests (``content.py``): the same
photos give the same quantised base wherever they lie; an edited one gives another.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from ..core.errors import BottlecacheError
from .content import digests_of_keys, file_digest
from .sources import Source, image_dataset

RULE_FOLDER, RULE_TFDS = "smallest-key-hash", "first"


@dataclass(frozen=True)
class CalibrationSample:
    split: str
    indices: tuple[int, ...]  # in the split's order
    rule: str
    content_sha256: str

    def record(self) -> dict:
        """What the cache's configuration keeps (and the fingerprint hashes)."""
        return {"split": self.split, "images": len(self.indices), "rule": self.rule,
                "content_sha256": self.content_sha256}


def calibration_split(source: Source) -> str:
    return "train" if "train" in source.splits else next(iter(source.splits))


def calibration_sample(source: Source, n_images: int) -> CalibrationSample:
    """The ``n_images`` examples (fewer if the split has fewer) that calibrate an int8 base."""
    split = calibration_split(source)
    entry = source.split(split)
    n = min(n_images, entry.n_examples)
    if n == 0:
        raise BottlecacheError(f"The split {split!r} has no image to calibrate an int8 base with; "
                               "use --precision float32.")
    if source.kind == "folder":
        ranked = sorted(range(entry.n_examples), key=lambda i: hashlib.sha256(entry.keys[i].encode("utf-8")).digest())
        indices = tuple(sorted(ranked[:n]))
        digests = b"".join(file_digest(entry.paths[i]) for i in indices)
        rule = RULE_FOLDER
    else:
        keys = [key.decode("utf-8") for _, key, _, _ in source.examples(split).take(n).as_numpy_iterator()]
        indices = tuple(range(len(keys)))
        digests = digests_of_keys(source, keys).tobytes()
        rule = RULE_TFDS
    return CalibrationSample(split, indices, rule, hashlib.sha256(digests).hexdigest())


def calibration_images(source: Source, sample: CalibrationSample, image_size: int, *, fast_decode: bool,
                       model: str) -> np.ndarray:
    """The sample's images, decoded and preprocessed as the cache's rows are (float32, NHWC)."""
    mask = np.zeros(source.split(sample.split).n_examples, bool)
    mask[list(sample.indices)] = True
    dataset = image_dataset(source, sample.split, image_size, only=mask, fast_decode=fast_decode, model=model)
    images = [x for _, _, _, x in dataset.as_numpy_iterator()]
    if not images:
        raise BottlecacheError(f"No calibration image of the split {sample.split!r} decodes; use --precision float32.")
    return np.stack(images)
