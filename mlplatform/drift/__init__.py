"""Fast univariate drift detection on polars (see :mod:`drift.engine`, which also maps the layers)."""

from mlplatform.drift.engine import METHODS, ChunkSpec, DriftEngine

__all__ = ["METHODS", "ChunkSpec", "DriftEngine"]
