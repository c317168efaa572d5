"""Import TensorFlow only where it is needed, quietly (keeps ``--help`` fast)."""

import os


def import_tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    return tf


def import_keras():
    import_tf()
    import keras

    return keras
