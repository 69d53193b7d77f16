"""Token embedding: look up one row of the table per token id."""
import numpy as np

from .jit import NEEDS_NUMBA, njit
from .registry import EXACT, op, random_array, variant


@op("embedding", rule=EXACT, weights=(0,))
def embedding(table: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """x[t] = table[ids[t]]   table (V, D), ids (T,) -> (T, D)"""
    return table[ids]


# ---------------------------------------------------------------------------------- numba variant

@njit
def gather_rows(table, ids, out):
    for t in range(ids.shape[0]):
        out[t, :] = table[ids[t], :]


@variant("embedding", "numba", **NEEDS_NUMBA)
def embedding_numba(table, ids):
    """A compiled row gather (the caller has checked the ids: it does not bounds-check)."""
    out = np.empty((ids.shape[0], table.shape[1]), dtype=table.dtype)
    gather_rows(table, ids, out)
    return out


# ---------------------------------------------------------------------------------- strategy

def _embedding_inputs():
    from hypothesis import strategies as st

    @st.composite
    def args(draw):
        vocab, dim = draw(st.integers(1, 300)), draw(st.integers(1, 97))
        table = random_array(draw, (vocab, dim))
        ids = np.array(draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=40)), dtype=np.int64)
        return table, ids

    return args()


embedding.strategy(_embedding_inputs)
