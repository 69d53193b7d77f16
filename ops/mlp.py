"""The SwiGLU feed-forward block (Shazeer, 2020): silu, the gated product, and the whole MLP."""
import numpy as np

from .jit import NEEDS_NUMBA, is_decode, njit, prange
from .linear import linear_terms, matvec_rows, weights_times_transposed
from .registry import Weights, close, op, random_array, variant


@op("silu", rule=close(1e-5, "one exp and a division; exp implementations differ by a few ulp"), inside="swiglu")
def silu(x: np.ndarray) -> np.ndarray:
    """silu(x) = x * sigmoid(x) = x / (1 + exp(-x))"""
    # exp(-x) overflows to inf for x < -88 in float32; x / inf = -0.0, which is the right limit.
    with np.errstate(over="ignore"):
        return x / (np.float32(1) + np.exp(-x))


@op("swiglu", rule=close(1e-5, "silu, then one product"))
def swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """swiglu(g, u) = silu(g) * u   (T, F), (T, F) -> (T, F)"""
    return silu(gate) * up


def _swiglu_mlp_terms(h, w) -> float:
    """Bound the terms of each sum: |silu(g)| <= silu(|g|) and |g| <= |h| @ |Wg|^T, likewise for up."""
    g, u = np.abs(h) @ np.abs(w.gate).T, np.abs(h) @ np.abs(w.up).T
    return linear_terms(silu(g) * u, w.down)


@op("swiglu_mlp", rule=close(1e-5, "two projections, the gate, one projection: each within 1e-5 of its terms",
                             _swiglu_mlp_terms, "Σ|a·w|"),
    composite=("linear", "swiglu"), weights=(1,), projections=("gate", "up", "down"))
def swiglu_mlp(ops, h, w):
    """The feed-forward block: (silu(h Wgate) * (h Wup)) Wdown   (T, D) -> (T, D)"""
    return ops.linear(ops.swiglu(ops.linear(h, w.gate), ops.linear(h, w.up)), w.down)


# ---------------------------------------------------------------------------------- numba variants


@njit
def silu_scalar(v):
    # 1 + exp(-v) is inf for v < -88: v / inf = -0.0, the right limit (no NaN, so no special case)
    return v / (np.float32(1.0) + np.exp(-v))


@njit
def silu_rows(x, out):
    for t in range(x.shape[0]):
        for i in range(x.shape[1]):
            out[t, i] = silu_scalar(x[t, i])


@variant("silu", "numba", **NEEDS_NUMBA)
def silu_numba(x):
    """silu elementwise in one compiled loop: no temporaries for exp(-x) and 1 + exp(-x)."""
    out = np.empty_like(x)
    silu_rows(x, out)
    return out


@njit
def swiglu_rows(gate, up, out):
    for t in range(gate.shape[0]):
        for i in range(gate.shape[1]):
            out[t, i] = silu_scalar(gate[t, i]) * up[t, i]


@variant("swiglu", "numba", **NEEDS_NUMBA)
def swiglu_numba(gate, up):
    """silu(gate) * up in one compiled loop: one pass, no temporary arrays."""
    out = np.empty_like(gate)
    swiglu_rows(gate, up, out)
    return out


@njit(parallel=True)
def gate_up_rows(h, w_gate, w_up, out):
    """out[t, j] = silu(h[t]·w_gate[j]) * (h[t]·w_up[j]): both projections and the gate in one pass,
    so the (T, F) gate and up activations are never written to memory and read back."""
    T, D = h.shape
    for j in prange(w_gate.shape[0]):
        for t in range(T):
            g = np.float32(0.0)
            u = np.float32(0.0)
            for k in range(D):
                g += h[t, k] * w_gate[j, k]
                u += h[t, k] * w_up[j, k]
            out[t, j] = silu_scalar(g) * u


def swiglu_inplace(gate, up):
    """gate <- silu(gate) * up, in place, with NumPy's vectorised exp: the reference's operations in
    the reference's order (so the same bits) and one temporary instead of its four. Used where the
    arrays are large (prefill): a compiled loop calls the scalar libm exp, 3x slower here
    (benchmarks/RESULTS.md, "Where the time goes")."""
    e = np.negative(gate)
    with np.errstate(over="ignore"):  # exp(-g) = inf for g < -88: g / inf = -0.0, as in `silu`
        np.exp(e, out=e)
    e += np.float32(1)
    np.divide(gate, e, out=gate)
    gate *= up


def swiglu_mlp_prefill(h, w):
    """Many rows: three BLAS matmuls with the gate in place between them. The weights go on the
    left, W @ h^T, so every product comes out transposed ((F, T), then (D, T)): the same dot
    products, but OpenBLAS runs this operand order faster for these shapes (10-15% on the MLP
    matrices: benchmarks/RESULTS.md, "Where the time goes"). The (D, T) result is copied
    back to (T, D) rows (0.3 MB), so the kernels after it keep their contiguous fast path. A prepared
    quantised projection goes the same way, by its own product (ops/quant/prefill.py)."""
    g = weights_times_transposed(w.gate, h)  # (F, T)
    u = weights_times_transposed(w.up, h)
    swiglu_inplace(g, u)  # g <- silu(g) * u
    return np.ascontiguousarray(weights_times_transposed(w.down, g.T).T)


@variant("swiglu_mlp", "fused", **NEEDS_NUMBA)
def swiglu_mlp_fused(h, w):
    """The SwiGLU MLP as two kernels for a few rows (gate·up·silu fused, then down); for many rows
    BLAS does the three matmuls, weights on the left, and NumPy the gate in place."""
    if not is_decode(h.shape[0]):
        return swiglu_mlp_prefill(h, w)
    a = np.empty((h.shape[0], w.gate.shape[0]), dtype=np.float32)
    gate_up_rows(h, w.gate, w.up, a)
    out = np.empty((h.shape[0], w.down.shape[0]), dtype=np.float32)
    matvec_rows(a, w.down, out)
    return out


# ---------------------------------------------------------------------------------- strategies and edge cases

SCALES = (1.0, 1e-3, 10.0, 100.0)  # ±100: exp(-x) overflows float32 for x < -88


def _elementwise(n_arrays):
    def inputs():
        from hypothesis import strategies as st

        @st.composite
        def args(draw):
            shape = (draw(st.integers(1, 40), label="T"), draw(st.integers(1, 300), label="F"))
            return tuple(random_array(draw, shape, SCALES) for _ in range(n_arrays))

        return args()

    return inputs


def _silu_examples():
    return [(np.array([[-100.0, -88.5, -1.0, 0.0, 1.0, 100.0]], dtype=np.float32),)]


silu.strategy(_elementwise(1), examples=_silu_examples)
swiglu.strategy(_elementwise(2))


def _swiglu_mlp_inputs(multiple: int = 1):
    """`multiple`: D and F (both are summed over) are multiples of it (32 for a 32-block format)."""
    from hypothesis import strategies as st

    @st.composite
    def args(draw):
        T = draw(st.integers(1, 16), label="T")
        D, F = (multiple * draw(st.integers(1, n // multiple), label=name) for n, name in ((96, "D"), (200, "F")))
        w = Weights(gate=random_array(draw, (F, D)), up=random_array(draw, (F, D)), down=random_array(draw, (D, F)))
        return random_array(draw, (T, D), (1.0, 1e-2, 10.0)), w

    return args()


swiglu_mlp.strategy(_swiglu_mlp_inputs)
