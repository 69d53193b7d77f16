"""Choosing the next token from the logits.

The random draw is an input (a uniform number u in [0, 1)), so sampling is a deterministic function
of its arguments: the generator owns the seeded RNG, and any variant can be compared with this one.
"""
import numpy as np

from .registry import op


@op("argmax")
def argmax(logits: np.ndarray) -> int:
    """The most likely token (greedy decoding); ties go to the lowest id."""
    return int(np.argmax(logits))


@op("sample")
def sample(logits: np.ndarray, temperature: float, top_k: int, top_p: float, u: float) -> int:
    """Draw a token from softmax(logits / temperature), restricted to the top-k tokens and then to the
    smallest set whose probability reaches top_p (nucleus sampling); u in [0, 1) is the random draw.
    temperature <= 0 means greedy; top_k <= 0 and top_p >= 1 disable those filters."""
    if temperature <= 0:
        return argmax(logits)
    z = logits.astype(np.float64) / temperature
    order = np.argsort(-z, kind="stable")  # most likely first, ties by id
    if top_k > 0:
        order = order[:top_k]
    p = np.exp(z[order] - z[order[0]])
    p /= p.sum()
    if top_p < 1.0:
        # keep token i while the mass before it is < top_p: the first token is always kept
        keep = (np.cumsum(p) - p) < top_p
        order, p = order[keep], p[keep] / p[keep].sum()
    cdf = np.cumsum(p)
    i = min(int(np.searchsorted(cdf, u * cdf[-1], side="right")), len(order) - 1)
    return int(order[i])
