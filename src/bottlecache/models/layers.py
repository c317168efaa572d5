"""The custom Keras layers of the project (imported only where Keras is needed).

Keras 3's functional models pass the outer call's ``training`` flag down to every layer, over
an explicit ``base(x, training=False)`` given when the model was built. While fitting, the
unfrozen BatchNormalization layers of the base would then switch to batch statistics and
update their moving averages. ``InferenceMode`` keeps the wrapped base in inference mode in
every call: its weights still train, its BatchNorm statistics stay as they are.

``Preprocess`` and ``Mirror`` are what an exported model carries before its base(s): the project's
one preprocessing function, and the mirror image of a test-time flip.
"""

import keras

from ..data.sources import preprocess


@keras.saving.register_keras_serializable(package="bottlecache")
class InferenceMode(keras.layers.Wrapper):
    """Call the wrapped layer with ``training=False``, whatever the caller asks."""

    def call(self, inputs, training=None):
        return self.layer(inputs, training=False)

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)


@keras.saving.register_keras_serializable(package="bottlecache")
class Mirror(keras.layers.Layer):
    """Images mirrored left to right (an exported head's test-time flip)."""

    def call(self, inputs):
        return keras.ops.flip(inputs, axis=2)

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package="bottlecache")
class Preprocess(keras.layers.Layer):
    """uint8 RGB images → the model's input, by the project's one preprocessing function
    (``bottlecache.data.sources.preprocess``): what an exported model carries inside it."""

    def __init__(self, image_size: int, model: str = "mobilenet_v2", **kwargs):
        super().__init__(**kwargs)
        self.image_size = int(image_size)
        self.model = str(model)  # the base whose preprocessing this is (bottlecache.core.registry)

    def call(self, inputs):
        return preprocess(inputs, self.image_size, self.model)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.image_size, self.image_size, 3)

    def get_config(self):
        return {**super().get_config(), "image_size": self.image_size, "model": self.model}
