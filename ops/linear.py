"""Linear projection with a weight stored as PyTorch does (one row per output feature), and the
model's last step, final norm + LM head."""
import numpy as np

from .registry import Weights, close, op, random_array

SCALES = (1.0, 1e-3, 1e3)


def _linear_inputs():
    from hypothesis import strategies as st

    @st.composite
    def args(draw):
        T, n_in, n_out = draw(st.integers(1, 40)), draw(st.integers(1, 300)), draw(st.integers(1, 300))
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


@op("linear", rule=close(1e-5, "dot products of length K summed in another order (blocked, SIMD) differ by "
                         "~sqrt(K)·2^-24 of their magnitude; 1e-5 leaves room for K in the thousands"),
    inputs=_linear_inputs, examples=_linear_examples, weights=(1,))
def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """y = x @ W^T (+ b)   x (T, in), weight (out, in), bias (out,) -> (T, out)"""
    y = x @ weight.T  # BLAS reads the transposed view in place: no copy of W
    if bias is not None:
        y += bias
    return y


def _norm_head_inputs():
    from hypothesis import strategies as st

    @st.composite
    def args(draw):
        T, D, V = draw(st.integers(1, 8)), draw(st.integers(1, 128)), draw(st.integers(1, 500))
        x = random_array(draw, (T, D), (1.0, 1e-3, 1e2))
        return x, Weights(norm=random_array(draw, (D,)), weight=random_array(draw, (V, D))), 1e-5

    return args()


@op("norm_head", rule=close(1e-5, "rmsnorm then a dot product of length D, as linear"),
    inputs=_norm_head_inputs, composite=("rmsnorm", "linear"), weights=(1,), projections=("weight",))
def norm_head(ops, x, w, eps):
    """Logits from the last hidden states: linear(rmsnorm(x, w.norm), w.weight)   (T, D) -> (T, V)"""
    return ops.linear(ops.rmsnorm(x, w.norm, eps), w.weight)
