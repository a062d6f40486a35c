"""Data shipped with the package (the ObjectNet label mapping)."""
