"""What runs a trained model: prediction, export to deployable artifacts and their runtimes, the
HTML error report, and embeddings (neighbours, near duplicates). Stands on ``train`` and below."""
