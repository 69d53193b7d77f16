"""Choosing the next token from the logits.

The random draw is an input (a uniform number u in [0, 1)), so sampling is a deterministic function
of its arguments: the generator owns the seeded RNG, and any variant can be compared with this one.
"""
import numpy as np

from .jit import NEEDS_NUMBA, njit
from .registry import EXACT, op, random_array, variant


@op("argmax", rule=EXACT)
def argmax(logits: np.ndarray) -> int:
    """The most likely token (greedy decoding); ties go to the lowest id.   (V,) -> int"""
    return int(np.argmax(logits))


@op("sample", rule=EXACT)
def sample(logits: np.ndarray, temperature: float, top_k: int, top_p: float, u: float) -> int:
    """Draw a token from softmax(logits / temperature), restricted to the top-k tokens and then to the
    smallest set whose probability reaches top_p (nucleus sampling); u in [0, 1) is the random draw.
    temperature <= 0 means greedy; top_k <= 0 and top_p >= 1 disable those filters.   (V,) -> int"""
    if temperature <= 0:
        return argmax(logits)
    return int(draw_token(logits, temperature, top_k, top_p, u))


def draw_token(logits, temperature, top_k, top_p, u):
    """The draw itself, for temperature > 0 (plain NumPy that Numba also compiles: see below)."""
    z = logits.astype(np.float64) / temperature
    order = np.argsort(-z, kind="mergesort")  # most likely first; mergesort is stable: ties by id
    if top_k > 0:
        order = order[:top_k]
    p = np.exp(z[order] - z[order[0]])
    p /= np.cumsum(p)[-1]  # the total, summed in order (a fixed order, so a compiled copy matches exactly)
    if top_p < 1.0:
        # keep token i while the mass before it is < top_p: the first token is always kept
        keep = (np.cumsum(p) - p) < top_p
        order, p = order[keep], p[keep] / np.cumsum(p[keep])[-1]
    cdf = np.cumsum(p)
    i = np.searchsorted(cdf, u * cdf[-1], side="right")
    return order[min(i, order.shape[0] - 1)]


# ---------------------------------------------------------------------------------- numba variant

@njit
def first_max(x):
    best, i_best = x[0], 0
    for i in range(1, x.shape[0]):
        if x[i] > best:  # strictly greater: a tie keeps the lower id, as np.argmax does
            best, i_best = x[i], i
    return i_best


@variant("argmax", "numba", **NEEDS_NUMBA)
def argmax_numba(logits):
    """One compiled pass keeping the first maximum."""
    return int(first_max(logits))


# The reference's draw, compiled as it is: without fastmath, the same IEEE operations in the same
# order, so the result is bit-exact (argsort, exp and the in-order sums are what they are in NumPy).
draw_token_numba = njit(fastmath=False)(draw_token)


@variant("sample", "numba", **NEEDS_NUMBA)
def sample_numba(logits, temperature, top_k, top_p, u):
    """The reference's draw, compiled without fastmath: bit-exact, without the Python overhead."""
    if temperature <= 0:
        return argmax_numba(logits)
    return int(draw_token_numba(logits, float(temperature), int(top_k), float(top_p), float(u)))


# ---------------------------------------------------------------------------------- strategies and edge cases

def _argmax_inputs():
    from hypothesis import strategies as st

    @st.composite
    def args(draw):
        return (random_array(draw, (draw(st.integers(1, 500), label="V"),), (1.0, 1e-3, 1e3)),)

    return args()


def _argmax_examples():
    return [(np.array([1.0, 3.0, 3.0, -2.0], dtype=np.float32),)]  # a tie goes to the lowest id


argmax.strategy(_argmax_inputs, examples=_argmax_examples)


def _sample_inputs():
    from hypothesis import strategies as st

    @st.composite
    def args(draw):
        V = draw(st.integers(1, 300), label="V")
        logits = random_array(draw, (V,), (1.0, 5.0, 1e-2))
        temperature = draw(st.sampled_from([0.0, 0.3, 0.7, 1.0, 1.5]), label="temperature")
        top_k = draw(st.one_of(st.just(0), st.integers(1, V)), label="top_k")
        top_p = draw(st.sampled_from([1.0, 0.95, 0.5, 0.1]), label="top_p")
        u = draw(st.floats(0.0, 1.0, exclude_max=True), label="u")
        return logits, temperature, top_k, top_p, u

    return args()


sample.strategy(_sample_inputs)
