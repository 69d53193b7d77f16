"""The SwiGLU feed-forward block (Shazeer, 2020): silu, the gated product, and the whole MLP."""
import numpy as np

from .registry import Weights, close, op, random_array

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


@op("silu", rule=close(1e-5, "one exp and a division; exp implementations differ by a few ulp"),
    inputs=_elementwise(1), examples=_silu_examples)
def silu(x: np.ndarray) -> np.ndarray:
    """silu(x) = x * sigmoid(x) = x / (1 + exp(-x))"""
    # exp(-x) overflows to inf for x < -88 in float32; x / inf = -0.0, which is the right limit.
    with np.errstate(over="ignore"):
        return x / (np.float32(1) + np.exp(-x))


@op("swiglu", rule=close(1e-5, "silu, then one product"), inputs=_elementwise(2))
def swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """swiglu(g, u) = silu(g) * u   (T, F), (T, F) -> (T, F)"""
    return silu(gate) * up


def _swiglu_mlp_inputs():
    from hypothesis import strategies as st

    @st.composite
    def args(draw):
        T, D, F = draw(st.integers(1, 16), label="T"), draw(st.integers(1, 96), label="D"), draw(
            st.integers(1, 200), label="F")
        w = Weights(gate=random_array(draw, (F, D)), up=random_array(draw, (F, D)), down=random_array(draw, (D, F)))
        return random_array(draw, (T, D), (1.0, 1e-2, 10.0)), w

    return args()


@op("swiglu_mlp", rule=close(1e-5, "two projections, the gate, one projection: each within 1e-5"),
    inputs=_swiglu_mlp_inputs, composite=("linear", "swiglu"), weights=(1,),
    projections=("gate", "up", "down"))
def swiglu_mlp(ops, h, w):
    """The feed-forward block: (silu(h Wgate) * (h Wup)) Wdown   (T, D) -> (T, D)"""
    return ops.linear(ops.swiglu(ops.linear(h, w.gate), ops.linear(h, w.up)), w.down)
