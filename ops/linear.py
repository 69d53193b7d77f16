"""Linear projection with a weight stored as PyTorch does (one row per output feature), and the
model's last step, final norm + LM head."""
import numpy as np

from .jit import NEEDS_NUMBA, is_decode, njit, prange
from .norm import rmsnorm, rmsnorm_rows
from .registry import Weights, close, op, random_array, variant


def linear_terms(x, weight, bias=None) -> float:
    """The size of the terms a projection sums: max over outputs of sum_k |x_k w_jk| (+ |b_j|)."""
    terms = np.abs(x) @ np.abs(weight).T
    return float(np.max(terms + (0 if bias is None else np.abs(bias)), initial=0.0))


@op("linear", rule=close(1e-5, "dot products of length K summed in another order (blocked, SIMD) differ by "
                         "~sqrt(K)·2^-24 of the summed terms; 1e-5 leaves room for K in the thousands",
                         linear_terms, "Σ|x·w|"),
    weights=(1,))
def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """y = x @ W^T (+ b)   x (T, in), weight (out, in), bias (out,) -> (T, out)"""
    y = x @ weight.T  # BLAS reads the transposed view in place: no copy of W
    if bias is not None:
        y += bias
    return y


def _norm_head_terms(x, w, eps) -> float:
    return linear_terms(rmsnorm(x, w.norm, eps), w.weight)


@op("norm_head", rule=close(1e-5, "rmsnorm then a dot product of length D, as linear", _norm_head_terms, "Σ|h·w|"),
    composite=("rmsnorm", "linear"), weights=(1,), projections=("weight",),
    own_format=True)  # the LM head's precision is chosen on its own (the quantised presets keep it Q8_0)
def norm_head(ops, x, w, eps):
    """Logits from the last hidden states: linear(rmsnorm(x, w.norm), w.weight)   (T, D) -> (T, V)"""
    return ops.linear(ops.rmsnorm(x, w.norm, eps), w.weight)


# ---------------------------------------------------------------------------------- numba variants
#
# At batch 1 (decode) a projection is a matrix-vector product: every weight is read once and used
# once, so its speed is the speed of streaming W from memory. The kernel below reads each weight row
# exactly once, for all T input rows at a time, with one thread per block of output rows.
# With many rows (prefill) the product is compute-bound instead, and BLAS's blocked GEMM is the
# right tool: we hand it over when the rows are not a decode's (ops/jit.py::is_decode).


@njit(parallel=True)
def matvec_rows(x, w, out):
    """out[t, j] = sum_k x[t, k] * w[j, k]: each row of W is read once, for every row of x."""
    T, K = x.shape
    for j in prange(w.shape[0]):
        for t in range(T):
            acc = np.float32(0.0)
            for k in range(K):
                acc += x[t, k] * w[j, k]
            out[t, j] = acc


@variant("linear", "numba", **NEEDS_NUMBA)
def linear_streaming(x, weight, bias=None):
    """linear: a Numba matrix-vector kernel for a few rows, BLAS GEMM for many."""
    if not is_decode(x.shape[0]):
        return linear(x, weight, bias)
    out = np.empty((x.shape[0], weight.shape[0]), dtype=np.float32)
    matvec_rows(x, weight, out)
    if bias is not None:
        out += bias
    return out


@variant("norm_head", "fused", **NEEDS_NUMBA)
def norm_head_fused(x, w, eps):
    """Final rmsnorm and LM head as one op: for a few rows the norm kernel, then the parallel
    matrix-vector kernel streams the head (the largest matrix: 113 MB for the default model) once;
    for many rows the norm, then BLAS."""
    h = np.empty_like(x)
    rmsnorm_rows(x, w.norm, np.float32(eps), h)
    if not is_decode(x.shape[0]):
        return linear(h, w.weight)
    out = np.empty((x.shape[0], w.weight.shape[0]), dtype=np.float32)
    matvec_rows(h, w.weight, out)
    return out


# ---------------------------------------------------------------------------------- prefill


def weights_times_transposed(weight, x) -> np.ndarray:
    """W @ x^T, (N, T), for many rows x (prefill): the operand order OpenBLAS runs faster for our
    shapes (see ops/mlp.py::swiglu_mlp_prefill). A prepared quantised weight defines `@` as its own
    product (ops/quant/prefill.py)."""
    return weight @ x.T


# ---------------------------------------------------------------------------------- strategies and edge cases

SCALES = (1.0, 1e-3, 1e3)


def _linear_inputs(multiple: int = 1):
    """`multiple`: the input length is a multiple of it (a 32-block weight format needs 32)."""
    from hypothesis import strategies as st

    @st.composite
    def args(draw):
        T, n_in, n_out = draw(st.integers(1, 40)), multiple * draw(st.integers(1, 300 // multiple)), draw(
            st.integers(1, 300))
        x = random_array(draw, (T, n_in), SCALES, zero_rows=True)
        w = random_array(draw, (n_out, n_in), SCALES)
        bias = random_array(draw, (n_out,)) if draw(st.booleans(), label="bias") else None
        return x, w, bias

    return args()


def _linear_examples():
    rng = np.random.default_rng(1)
    return [(rng.standard_normal((1, 33)).astype(np.float32), rng.standard_normal((17, 33)).astype(np.float32), None),
            (rng.standard_normal((5, 64)).astype(np.float32), rng.standard_normal((48, 64)).astype(np.float32),
             rng.standard_normal(48).astype(np.float32))]


linear.strategy(_linear_inputs, examples=_linear_examples)


def _norm_head_inputs(multiple: int = 1):
    from hypothesis import strategies as st

    @st.composite
    def args(draw):
        T, D, V = draw(st.integers(1, 8)), multiple * draw(st.integers(1, 128 // multiple)), draw(st.integers(1, 500))
        x = random_array(draw, (T, D), (1.0, 1e-3, 1e2))
        return x, Weights(norm=random_array(draw, (D,)), weight=random_array(draw, (V, D))), 1e-5

    return args()


norm_head.strategy(_norm_head_inputs)
