"""Linear projection with a weight stored as PyTorch does: one row per output feature."""
import numpy as np

from .registry import op


@op("linear")
def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """y = x @ W^T (+ b)   x (T, in), weight (out, in), bias (out,) -> (T, out)"""
    y = x @ weight.T  # BLAS reads the transposed view in place: no copy of W
    if bias is not None:
        y += bias
    return y
