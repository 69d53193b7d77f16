"""Token embedding: look up one row of the table per token id."""
import numpy as np

from .registry import op


@op("embedding")
def embedding(table: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """x[t] = table[ids[t]]   table (V, D), ids (T,) -> (T, D)"""
    return table[ids]
