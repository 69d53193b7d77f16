"""RMSNorm (Zhang & Sennrich, 2019), the residual add, and the two fused together."""
import numpy as np

from .jit import NEEDS_NUMBA, njit
from .registry import EXACT, close, op, random_array, variant


@op("rmsnorm", rule=close(1e-5, "a sum of D squares in another order moves mean(x^2) by ~D·2^-24 "
                          "relative; the square root halves that"))
def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """y = x / sqrt(mean(x^2) + eps) * weight   x (T, D), weight (D,) -> (T, D)"""
    ms = np.mean(x * x, axis=-1, keepdims=True)  # (T, 1)
    # eps as float32: a Python float is fine under NumPy 2 rules, a np.float64 would promote.
    return x / np.sqrt(ms + np.float32(eps)) * weight


@op("add", rule=EXACT)
def add(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The residual connection: x + y   (T, D), (T, D) -> (T, D)"""
    return x + y


@op("add_rmsnorm", rule=close(1e-5, "as rmsnorm; the add is exact"), composite=("add", "rmsnorm"))
def add_rmsnorm(ops, x, y, weight, eps):
    """The residual add, then the next sublayer's norm: s = x + y, (s, rmsnorm(s))   -> (T, D), (T, D)"""
    s = ops.add(x, y)
    return s, ops.rmsnorm(s, weight, eps)


# ---------------------------------------------------------------------------------- numba variants


@njit
def rmsnorm_rows(x, weight, eps, out):
    """One pass for the sum of squares of a row, one to scale it: out = x * (1/rms) * weight."""
    T, D = x.shape
    for t in range(T):
        ss = np.float32(0.0)
        for i in range(D):
            ss += x[t, i] * x[t, i]
        inv = np.float32(1.0) / np.sqrt(ss / np.float32(D) + eps)
        for i in range(D):
            out[t, i] = x[t, i] * inv * weight[i]


@variant("rmsnorm", "numba", **NEEDS_NUMBA)
def rmsnorm_numba(x, weight, eps):
    """Two passes per row in one compiled loop, no temporary arrays (the reference makes five)."""
    out = np.empty_like(x)
    rmsnorm_rows(x, weight, np.float32(eps), out)
    return out


@njit
def add_rows(x, y, out):
    for t in range(x.shape[0]):
        for i in range(x.shape[1]):
            out[t, i] = x[t, i] + y[t, i]


@variant("add", "numba", **NEEDS_NUMBA)
def add_numba(x, y):
    """The residual add as a compiled loop: the same single rounding as NumPy's, so exact."""
    out = np.empty_like(x)
    add_rows(x, y, out)
    return out


@njit
def add_rmsnorm_rows(x, y, weight, eps, s, h):
    """s = x + y and h = rmsnorm(s) with s read back from cache, not from memory: one kernel, one
    Python call instead of two, and no separate pass over s."""
    T, D = x.shape
    for t in range(T):
        ss = np.float32(0.0)
        for i in range(D):
            v = x[t, i] + y[t, i]
            s[t, i] = v
            ss += v * v
        inv = np.float32(1.0) / np.sqrt(ss / np.float32(D) + eps)
        for i in range(D):
            h[t, i] = s[t, i] * inv * weight[i]


@variant("add_rmsnorm", "fused", **NEEDS_NUMBA)
def add_rmsnorm_fused(x, y, weight, eps):
    """The residual add and the next norm in one kernel: the sum is normalised while still in cache."""
    s, h = np.empty_like(x), np.empty_like(x)
    add_rmsnorm_rows(x, y, weight, np.float32(eps), s, h)
    return s, h


# ---------------------------------------------------------------------------------- strategies and edge cases

# Inputs span tiny to large magnitudes: at 1e-4, mean(x^2) ~ 1e-8 is far below eps = 1e-5, so a
# norm that forgets eps is caught; all-zero rows must give zeros, not NaN.
SCALES = (1.0, 1e-4, 1e-2, 1e2, 1e4)


def _rows(draw, max_dim=200):
    from hypothesis import strategies as st

    return draw(st.integers(1, 40), label="T"), draw(st.integers(1, max_dim), label="D")


def _rmsnorm_inputs():
    from hypothesis import strategies as st

    @st.composite
    def args(draw):
        T, D = _rows(draw)
        x = random_array(draw, (T, D), SCALES, zero_rows=True)
        w = random_array(draw, (D,))
        return x, w, draw(st.sampled_from([1e-5, 1e-6]), label="eps")

    return args()


def _rmsnorm_examples():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5)).astype(np.float32)
    x[1] = 0  # an all-zero row: 0 / sqrt(0 + eps) = 0
    tiny = (rng.standard_normal((2, 7)) * 1e-4).astype(np.float32)
    return [(x, rng.standard_normal(5).astype(np.float32), 1e-5),
            (tiny, np.ones(7, np.float32), 1e-5)]


rmsnorm.strategy(_rmsnorm_inputs, examples=_rmsnorm_examples)


def _add_inputs():
    from hypothesis import strategies as st

    @st.composite
    def args(draw):
        T, D = _rows(draw)
        return random_array(draw, (T, D), SCALES), random_array(draw, (T, D), SCALES)

    return args()


add.strategy(_add_inputs)


def _add_rmsnorm_inputs():
    from hypothesis import strategies as st

    @st.composite
    def args(draw):
        T, D = _rows(draw)
        x, y = random_array(draw, (T, D), SCALES), random_array(draw, (T, D), SCALES)
        return x, y, random_array(draw, (D,)), 1e-5

    return args()


add_rmsnorm.strategy(_add_rmsnorm_inputs)
