"""bottlecache: run the frozen MobileNetV2 once per split, cache the bottleneck features in HDF5,
train heads in seconds, fine-tune end to end with the same preprocessing.

Everything the command line does is one import away::

    from bottlecache import build_cache, open_cache
    report = build_cache("path/to/images", weights="mobilenet_v2.weights.h5")
    with open_cache(report.path) as cache:
        x, y = cache.pooled("train"), cache.labels("train")

TensorFlow is imported only when a function that needs it runs.
"""

import os as _os
from importlib import import_module as _import_module

if "TF_CPP_MIN_LOG_LEVEL" in _os.environ:  # the user's own choice: keep TensorFlow's start-up lines (see core/tf.py)
    _os.environ.setdefault("_BOTTLECACHE_USER_TF_LOG_LEVEL", _os.environ["TF_CPP_MIN_LOG_LEVEL"])
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow is ever imported

__version__ = "0.1.0"

_API = {
    "build_cache": "cache.build",
    "BuildReport": "cache.writer",
    "open_cache": "cache.store",
    "Cache": "cache.store",
    "verify_cache": "cache.store",
    "find_cache": "cache.store",
    "list_caches": "cache.store",
    "open_source": "data.sources",
    "preprocess": "data.sources",
    "resolve_weights": "models.backbone",
    "load_backbone": "models.backbone",
    "train_head": "train.heads",
    "HeadSettings": "train.heads",
    "load_head": "train.heads",
    "finetune": "train.finetune",
    "FinetuneSettings": "train.finetune",
    "load_model": "serve.predict",
    "export_model": "serve.export",
    "ExportSettings": "serve.export",
    "Predictor": "serve.predictor",
    "CacheSettings": "cache.settings",
    "BuildOptions": "cache.settings",
    "sweep": "train.sweep",
    "SweepSettings": "train.sweep",
    "Leaderboard": "train.sweep",
    "BottlecacheError": "core.errors",
    "CacheMismatchError": "core.errors",
}
__all__ = sorted(_API)


def __dir__():
    """The public API beside the module's own names, so that tab completion finds it."""
    return sorted(set(globals()) | set(_API))  # the module's own names (subpackages, __version__) and the API


def __getattr__(name):
    if name in _API:
        return getattr(_import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'bottlecache' has no attribute {name!r}")
