"""Labelled images: sources (folders, TensorFlow Datasets) and split specs, each example's content
identity, and augmented views. Stands on ``core`` only."""
