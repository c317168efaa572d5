"""Import TensorFlow only where it is needed, and quietly (keeps ``--help`` fast and the screen clean).

TensorFlow's C++ start-up lines (absl, oneDNN, CUDA) are written to the process's stderr before
its log level applies, twice per import. Unless the user set ``TF_CPP_MIN_LOG_LEVEL`` themselves
(or passed ``--verbose``), the import runs with file descriptor 2 pointed at /dev/null; Python
exceptions still propagate as usual.
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
    quiet = not _verbose and _USER_LOG_LEVEL in (None, "")
    with _stderr_silenced() if quiet else contextlib.nullcontext():
        import tensorflow as tf
    return tf


def import_keras():
    import_tf()
    import keras

    return keras
