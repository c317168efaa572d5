"""The one preprocessing function gives the tutorial's values."""

import numpy as np


def test_preprocess_equals_cast_scale_resize_on_real_photos(cats_dogs):
    import tensorflow as tf

    from bottlecache.data.sources import decode_image, preprocess

    files = sorted((cats_dogs / "validation" / "cats").glob("*.jpg"))[:20]
    for path in files:
        image = decode_image(tf.io.read_file(str(path)))
        tutorial = tf.image.resize(tf.cast(image, tf.float32) / 127.5 - 1.0, (160, 160), method="bilinear")
        ours = preprocess(image, 160)
        assert ours.dtype == tf.float32 and ours.shape == (160, 160, 3)
        np.testing.assert_allclose(ours.numpy(), tutorial.numpy(), atol=1e-6)
        assert -1.0 <= float(tf.reduce_min(ours)) and float(tf.reduce_max(ours)) <= 1.0


def test_preprocess_takes_batches_and_other_sizes():
    from bottlecache.data.sources import preprocess

    batch = np.zeros((2, 50, 70, 3), np.uint8)
    batch[1] = 255
    out = preprocess(batch, 96).numpy()
    assert out.shape == (2, 96, 96, 3)
    np.testing.assert_allclose(out[0], -1.0)
    np.testing.assert_allclose(out[1], 1.0)
