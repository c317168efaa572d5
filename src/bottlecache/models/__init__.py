"""The networks: loading a base and its weights, the inference engines (Keras, LiteRT), the cut
for cached fine-tuning, and the fine-tuning network. Stands on ``data`` and ``core``."""
