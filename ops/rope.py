"""Rotary position embedding (Su et al., 2021), in the half-split layout Hugging Face Llama uses.

Each head vector is split into halves (x1, x2); pair i = (x1[i], x2[i]) is rotated by the angle
pos * theta^(-2i/d). The angles are computed once per position by `rope_tables` (the model does that),
the op only applies them.
"""
import numpy as np

from .jit import NEEDS_NUMBA, njit
from .registry import close, op, random_array, variant


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> np.ndarray:
    """Per-pair rotation frequencies theta^(-2i/d), i = 0 .. d/2-1, with optional Llama 3 scaling."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if scaling is None:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, a smooth blend between.
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * np.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        return np.where(wavelen > old_len / low, inv_freq / factor,
                        np.where(wavelen < old_len / high, inv_freq, blended))
    raise ValueError(f"unsupported rope scaling {kind!r}")


def rope_tables(inv_freq: np.ndarray, n_positions: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of pos * inv_freq for positions start .. start+n_positions-1: two (n, d/2) float32 tables."""
    angles = np.outer(np.arange(start, start + n_positions, dtype=np.float64), inv_freq)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


@op("rope", rule=close(1e-5, "two products and a sum per element; an FMA or another order moves the last bits"))
def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate pairs (x1[i], x2[i]) by the angle of their position.   x (T, H, d), cos/sin (T, d/2) -> (T, H, d)

    [y1]   [cos -sin] [x1]
    [y2] = [sin  cos] [x2]
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]  # broadcast over heads
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


# ---------------------------------------------------------------------------------- variants

@njit
def rope_kernel(x, cos, sin, out):
    """out[t, h] = x[t, h] with pair i = (x[i], x[half+i]) rotated by the angle of position t.

    One pass: each pair is read once and written once, with no temporaries (the reference builds
    four products, two sums and a concatenation). Every pair is read before it is written, so
    `out` may be `x` itself (the fused Q/K/V kernel rotates in place)."""
    T, H, d = x.shape
    half = d // 2
    for t in range(T):
        for h in range(H):
            for i in range(half):
                c, s = cos[t, i], sin[t, i]
                x1, x2 = x[t, h, i], x[t, h, half + i]
                out[t, h, i] = x1 * c - x2 * s         # y1 = x1 cos - x2 sin
                out[t, h, half + i] = x2 * c + x1 * s  # y2 = x2 cos + x1 sin


@variant("rope", "numba", **NEEDS_NUMBA)
def rope_numba(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """One compiled pass over x, rotating each pair straight into the output array."""
    out = np.empty(x.shape, dtype=np.float32)
    rope_kernel(x, cos, sin, out)
    return out


# ---------------------------------------------------------------------------------- strategies and edge cases

def draw_rope_tables(draw, T: int, head_dim: int):
    """Hypothesis helper: cos/sin tables for T consecutive positions starting anywhere in a long context."""
    from hypothesis import strategies as st

    theta = draw(st.sampled_from([1e4, 1e5, 1e6]), label="theta")
    start = draw(st.integers(0, 4000), label="start position")
    return rope_tables(rope_inv_freq(head_dim, theta), T, start)


def _rope_inputs():
    from hypothesis import strategies as st

    @st.composite
    def args(draw):
        T, H = draw(st.integers(1, 24), label="T"), draw(st.integers(1, 9), label="H")
        d = 2 * draw(st.integers(1, 64), label="d/2")
        cos, sin = draw_rope_tables(draw, T, d)
        return random_array(draw, (T, H, d), (1.0, 1e-3, 1e3)), cos, sin

    return args()


def _rope_examples():
    x = np.random.default_rng(2).standard_normal((3, 2, 8)).astype(np.float32)
    cos, sin = rope_tables(rope_inv_freq(8, 10000.0), 3, start=1)
    return [(x, cos, sin)]


rope.strategy(_rope_inputs, examples=_rope_examples)
