"""bottlecache: run the frozen MobileNetV2 once per split, cache the bottleneck features in HDF5,
train heads in seconds, fine-tune end to end with the same preprocessing.

Everything the command line does is one import away::

    from bottlecache import build_cache, open_cache
    report = build_cache("path/to/images", weights="mobilenet_v2.weights.h5")
    with open_cache(report.path) as cache:
        x, y = cache.pooled("train"), cache.labels("train")

TensorFlow is imported only when a function that needs it runs.
"""

import os
from importlib import import_module

if "TF_CPP_MIN_LOG_LEVEL" in os.environ:  # the user's own choice: keep TensorFlow's start-up lines (see _tf)
    os.environ.setdefault("_BOTTLECACHE_USER_TF_LOG_LEVEL", os.environ["TF_CPP_MIN_LOG_LEVEL"])
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow is ever imported

__version__ = "0.1.0"

_API = {
    "build_cache": "build",
    "BuildReport": "build",
    "open_cache": "store",
    "Cache": "store",
    "verify_cache": "store",
    "find_cache": "store",
    "list_caches": "store",
    "open_source": "data",
    "preprocess": "data",
    "resolve_weights": "backbone",
    "load_backbone": "backbone",
    "train_head": "heads",
    "load_head": "heads",
    "finetune": "finetune",
    "load_model": "predict",
    "Predictor": "predict",
    "CacheSettings": "config",
    "sweep": "sweep",
    "Leaderboard": "sweep",
    "BottlecacheError": "errors",
    "CacheMismatchError": "errors",
}
__all__ = sorted(_API)


def __getattr__(name):
    if name in _API:
        return getattr(import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'bottlecache' has no attribute {name!r}")
