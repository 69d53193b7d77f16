"""RMSNorm (Zhang & Sennrich, 2019): scale each row to unit root-mean-square, then by a learned weight."""
import numpy as np

from .registry import op


@op("rmsnorm")
def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """y = x / sqrt(mean(x^2) + eps) * weight   x (T, D), weight (D,) -> (T, D)"""
    ms = np.mean(x * x, axis=-1, keepdims=True)  # (T, 1)
    # eps as float32: a Python float is fine under NumPy 2 rules, a np.float64 would promote.
    return x / np.sqrt(ms + np.float32(eps)) * weight
