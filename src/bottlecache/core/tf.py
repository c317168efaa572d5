"""Import TensorFlow only where it is needed, and quietly (keeps ``--help`` fast and the screen clean).

TensorFlow's C++ start-up lines (absl, oneDNN, CUDA) are written to the process's stderr before
its log level applies, so even ``TF_CPP_MIN_LOG_LEVEL=3`` does not stop them. The import (and the
LiteRT interpreter's creation, which prints its delegate line the same way) runs with file
descriptor 2 pointed at /dev/null, unless ``--verbose`` or the user's own ``TF_CPP_MIN_LOG_LEVEL=0``
asks for everything; Python exceptions still propagate as usual.
"""

import contextlib
import os
import sys

# Set before bottlecache set its default (bottlecache/__init__.py): the user's own choice.
_USER_LOG_LEVEL = os.environ.get("_BOTTLECACHE_USER_TF_LOG_LEVEL")
_verbose = False


def set_verbose(verbose: bool) -> None:
    """``--verbose``: let TensorFlow's own start-up and log lines through."""
    global _verbose
    _verbose = bool(verbose)
    if verbose and _USER_LOG_LEVEL is None:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"


def wants_native_logs() -> bool:
    """``--verbose``, or the user's own ``TF_CPP_MIN_LOG_LEVEL=0``: let native libraries' lines through."""
    return _verbose or _USER_LOG_LEVEL == "0"


@contextlib.contextmanager
def native_logs_silenced():
    """File descriptor 2 to /dev/null for the block (native start-up lines), unless they are wanted."""
    if wants_native_logs():
        yield
        return
    with _stderr_silenced():
        yield


@contextlib.contextmanager
def _stderr_silenced():
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def import_tf():
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with native_logs_silenced():
        import tensorflow as tf

        tf.config.list_physical_devices()  # the platforms' first probe logs too (a failed cuInit on CPU machines)
    return tf


def import_keras():
    import_tf()
    import keras

    return keras
