"""The feature cache: its settings, the HDF5 store, chunk codecs, incremental reuse, shards and
the Ray executor, the row writer and ``build_cache``. Stands on ``models``, ``data`` and ``core``."""
