"""Softmax and causal grouped-query attention over a KV cache."""
import numpy as np

from .registry import op


@op("softmax")
def softmax(x: np.ndarray) -> np.ndarray:
    """softmax(x)_i = exp(x_i - max x) / sum_j exp(x_j - max x), over the last axis"""
    # Subtracting the max changes nothing mathematically and keeps exp() from overflowing.
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


@op("attention")
def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, start_pos: int) -> np.ndarray:
    """Causal grouped-query attention.

    q (T, Hq, d): queries for positions start_pos .. start_pos+T-1
    k, v (Hkv, S, d): keys and values of positions 0 .. S-1, S = start_pos + T (the KV cache)
    returns (T, Hq, d). Query head h reads KV head h // (Hq / Hkv); query t sees keys 0 .. start_pos+t.
    """
    T, n_heads, d = q.shape
    n_kv, S, _ = k.shape
    group = n_heads // n_kv
    # (T, Hq, d) -> (Hkv, group*T, d): the queries that share a KV head become rows of one matmul.
    qg = q.reshape(T, n_kv, group, d).transpose(1, 2, 0, 3).reshape(n_kv, group * T, d)
    scores = (qg @ k.transpose(0, 2, 1)) * np.float32(1.0 / np.sqrt(d))  # (Hkv, group*T, S)
    if T > 1:  # a single decode token sees the whole cache: no mask needed
        # query t (position start_pos+t) must not see key positions > start_pos+t: add -inf there
        mask = np.triu(np.full((T, S), -np.inf, dtype=np.float32), k=start_pos + 1)  # (T, S)
        scores = (scores.reshape(n_kv, group, T, S) + mask).reshape(n_kv, group * T, S)
    out = softmax(scores) @ v  # (Hkv, group*T, d)
    return out.reshape(n_kv, group, T, d).transpose(2, 0, 1, 3).reshape(T, n_heads, d)
