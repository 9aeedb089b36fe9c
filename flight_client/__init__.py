"""Python client of the ArrowEngine Flight server (pyarrow + numpy only, no torch)."""
from __future__ import annotations

from flight_client.client import (EmbeddingClient, EmbeddingRowErrors, ScoreRowErrors, embeddings_to_numpy,
                                   scores_to_numpy)

__all__ = ["EmbeddingClient", "EmbeddingRowErrors", "ScoreRowErrors", "embeddings_to_numpy", "scores_to_numpy"]
