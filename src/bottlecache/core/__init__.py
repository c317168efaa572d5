"""The floor everything stands on: errors, option checks and defaults, the registry of bases, the
records bottlecache writes, fingerprints, atomic file writes, the progress protocol, and the one
way TensorFlow is imported. Imports nothing from the rest of the package."""
