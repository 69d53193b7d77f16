"""Activations, the SwiGLU gate, and the residual add."""
import numpy as np

from .registry import op


@op("silu")
def silu(x: np.ndarray) -> np.ndarray:
    """silu(x) = x * sigmoid(x) = x / (1 + exp(-x))"""
    # exp(-x) overflows to inf for x < -88 in float32; x / inf = -0.0, which is the right limit.
    with np.errstate(over="ignore"):
        return x / (np.float32(1) + np.exp(-x))


@op("swiglu")
def swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """swiglu(g, u) = silu(g) * u   (Shazeer, 2020)   (T, F), (T, F) -> (T, F)"""
    return silu(gate) * up


@op("add")
def add(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The residual connection: x + y"""
    return x + y
