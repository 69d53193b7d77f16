"""Wrong variants, planted to prove that `tinyllm check` catches each kind of bug (tests/test_registry.py).
Each is a plausible mistake, registered as variant `planted` of its op."""
import numpy as np

from ops import variant
from ops.attention import softmax


@variant("rmsnorm", "planted_no_eps")
def rmsnorm_without_eps(x, weight, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True)) * weight


@variant("rmsnorm", "planted_wrong_axis")
def rmsnorm_wrong_axis(x, weight, eps):
    return x / np.sqrt(np.mean(x * x, axis=0, keepdims=True) + np.float32(eps)) * weight


@variant("attention", "planted_no_causal_mask")
def attention_without_mask(q, k, v, start_pos):
    T, n_heads, d = q.shape
    n_kv, S, _ = k.shape
    group = n_heads // n_kv
    qg = q.reshape(T, n_kv, group, d).transpose(1, 2, 0, 3).reshape(n_kv, group * T, d)
    scores = (qg @ k.transpose(0, 2, 1)) * np.float32(1.0 / np.sqrt(d))
    out = softmax(scores) @ v
    return out.reshape(n_kv, group, T, d).transpose(2, 0, 1, 3).reshape(T, n_heads, d)


@variant("rope", "planted_adjacent_pairs")
def rope_adjacent_pairs(x, cos, sin):
    x1, x2 = x[..., 0::2], x[..., 1::2]  # GPT-J/llama.cpp pairing, not Hugging Face's half split
    c, s = cos[:, None, :], sin[:, None, :]
    out = np.empty_like(x)
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x2 * c + x1 * s
    return out


@variant("softmax", "planted_no_max_subtraction")
def softmax_without_max(x):
    e = np.exp(x)
    return e / np.sum(e, axis=-1, keepdims=True)


@variant("linear", "planted_drops_last_column")
def linear_drops_last_column(x, weight, bias=None):
    y = x[:, :-1] @ weight[:, :-1].T
    return y if bias is None else y + bias
