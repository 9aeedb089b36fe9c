"""Python client of the ArrowEngine Flight server (pyarrow + numpy only, no torch)."""
from __future__ import annotations

from flight_client.client import EmbeddingClient, EmbeddingRowErrors, embeddings_to_numpy

__all__ = ["EmbeddingClient", "EmbeddingRowErrors", "embeddings_to_numpy"]
