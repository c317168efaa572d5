"""The fine-tuning network: the head on the frozen base (BatchNorm kept in inference mode), the
augmentation layers, and which of the base's layers train."""

from __future__ import annotations

from ..core.errors import BottlecacheError
from ..core.tf import import_keras

AUGMENT_SPEC = "flip,rotate=0.05"  # augmentation()'s, as a bottlecache.data.augment spec (for --from-cache views)


def augmentation():
    """Random horizontal flip and a small rotation; active only while training."""
    keras = import_keras()
    return keras.Sequential(
        [keras.layers.RandomFlip("horizontal"), keras.layers.RandomRotation(0.05)], name="augmentation"
    )


def attach_head(base, head_model, image_size: int, augment: bool = False):
    """Images (preprocessed by ``data.preprocess``) → [augmentation] → base(training=False) → head."""
    keras = import_keras()
    inputs = keras.Input(shape=(image_size, image_size, 3), name="image")
    x = augmentation()(inputs) if augment else inputs
    from .layers import InferenceMode  # Keras, on import

    # BatchNorm in inference mode, also once the base is trainable (see layers.InferenceMode)
    x = InferenceMode(base, name="frozen_bn_base")(x, training=False)
    outputs = head_model(x)
    return keras.Model(inputs, outputs, name="bottlecache_finetune")


def unfreeze(base, fine_tune_at: int) -> int:
    """Make the base's layers from ``fine_tune_at`` on trainable; return how many are."""
    if not 0 <= fine_tune_at <= len(base.layers):
        raise BottlecacheError(
            f"The 'fine_tune_at' option must be between 0 and {len(base.layers)} (the base's layers). "
            f"Got {fine_tune_at} instead."
        )
    base.trainable = True
    for layer in base.layers[:fine_tune_at]:
        layer.trainable = False
    return sum(1 for layer in base.layers if layer.trainable)
