"""Softmax, causal grouped-query attention over a KV cache, and the attention block's input step
(`qkv_rope`: norm, Q/K/V projections, RoPE)."""
import numpy as np

from .registry import Weights, close, op, random_array
from .rope import draw_rope_tables, rope_inv_freq, rope_tables


def _softmax_inputs():
    from hypothesis import strategies as st

    @st.composite
    def args(draw):
        R, N = draw(st.integers(1, 16), label="rows"), draw(st.integers(1, 300), label="N")
        # 1e3: exp(1000) overflows float32 unless the row max is subtracted first
        x = random_array(draw, (R, N), (1.0, 1e-3, 30.0, 1e3))
        if N > 1 and draw(st.booleans(), label="masked"):  # attention masks put -inf in; never a whole row
            x[:, 1:][np.random.default_rng(N).random((R, N - 1)) < 0.3] = -np.inf
        return (x,)

    return args()


def _softmax_examples():
    big = np.array([[1000.0, 999.0, -1000.0], [88.0, 89.0, 90.0]], dtype=np.float32)
    return [(big,), (np.array([[0.0, -np.inf, 1.0]], dtype=np.float32),)]


@op("softmax", rule=close(1e-5, "probabilities ≤ 1; exp differs by a few ulp between libms and the sum by "
                          "~N·2^-24 relative"), inputs=_softmax_inputs, examples=_softmax_examples)
def softmax(x: np.ndarray) -> np.ndarray:
    """softmax(x)_i = exp(x_i - max x) / sum_j exp(x_j - max x), over the last axis"""
    # Subtracting the max changes nothing mathematically and keeps exp() from overflowing.
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


def _attention_inputs():
    from hypothesis import strategies as st

    @st.composite
    def args(draw):
        n_kv, group = draw(st.integers(1, 4), label="KV heads"), draw(st.integers(1, 8), label="GQA ratio")
        d, T = draw(st.integers(1, 72), label="d"), draw(st.integers(1, 12), label="T")
        start = draw(st.one_of(st.just(0), st.integers(0, 300)), label="start_pos")  # up to a long KV cache
        S = start + T
        scales = (1.0, 1e-2, 10.0)
        q = random_array(draw, (T, n_kv * group, d), scales)
        # keys/values as the model passes them: a view of the first S positions of a larger cache
        spare = draw(st.integers(0, 5), label="cache spare")
        k = random_array(draw, (n_kv, S + spare, d), scales)[:, :S]
        v = random_array(draw, (n_kv, S + spare, d), scales)[:, :S]
        return q, k, v, start

    return args()


def _attention_examples():
    rng = np.random.default_rng(3)

    def case(T, start, n_kv=2, group=3, d=8):
        q = rng.standard_normal((T, n_kv * group, d)).astype(np.float32) * 2
        k = rng.standard_normal((n_kv, start + T, d)).astype(np.float32) * 2
        v = rng.standard_normal((n_kv, start + T, d)).astype(np.float32)
        return q, k, v, start

    return [case(4, 0), case(3, 5), case(1, 9), case(1, 0, n_kv=1, group=8, d=5)]


@op("attention", rule=close(1e-5, "softmax-weighted sums; an online softmax rescales partial sums, "
                            "moving the last bits"), inputs=_attention_inputs, examples=_attention_examples)
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


def _qkv_rope_inputs():
    from hypothesis import strategies as st

    @st.composite
    def args(draw):
        T, D = draw(st.integers(1, 16), label="T"), draw(st.integers(1, 96), label="D")
        n_kv, group = draw(st.integers(1, 3), label="KV heads"), draw(st.integers(1, 4), label="GQA ratio")
        d = 2 * draw(st.integers(1, 24), label="d/2")
        cos, sin = draw_rope_tables(draw, T, d)
        biased = draw(st.booleans(), label="biases")

        def bias(n):
            return random_array(draw, (n,)) if biased else None

        w = Weights(norm=random_array(draw, (D,)),
                    wq=random_array(draw, (n_kv * group * d, D)), bq=bias(n_kv * group * d),
                    wk=random_array(draw, (n_kv * d, D)), bk=bias(n_kv * d),
                    wv=random_array(draw, (n_kv * d, D)), bv=bias(n_kv * d))
        return random_array(draw, (T, D), (1.0, 1e-3, 1e2)), w, cos, sin, 1e-5

    return args()


def _qkv_rope_examples():
    rng = np.random.default_rng(4)
    D, d = 12, 4
    w = Weights(norm=rng.standard_normal(D).astype(np.float32), bq=None, bk=None, bv=None,
                **{n: rng.standard_normal((rows, D)).astype(np.float32) for n, rows in
                   [("wq", 4 * d), ("wk", 2 * d), ("wv", 2 * d)]})
    cos, sin = rope_tables(rope_inv_freq(d, 1e4), 3, start=2)
    return [(rng.standard_normal((3, D)).astype(np.float32), w, cos, sin, 1e-5)]


@op("qkv_rope", rule=close(1e-5, "rmsnorm, dot products and a rotation, each within 1e-5"),
    inputs=_qkv_rope_inputs, examples=_qkv_rope_examples, composite=("rmsnorm", "linear", "rope"),
    weights=(1,), projections=("wq", "wk", "wv"))
def qkv_rope(ops, x, w, cos, sin, eps):
    """The attention block's inputs: h = rmsnorm(x); q, k, v = h Wq, h Wk, h Wv; RoPE on q and k.
    x (T, D), cos/sin (T, d/2) -> q (T, Hq, d), k (T, Hkv, d), v (T, Hkv, d)"""
    T, d = x.shape[0], 2 * cos.shape[1]
    h = ops.rmsnorm(x, w.norm, eps)
    q = ops.linear(h, w.wq, w.bq).reshape(T, -1, d)
    k = ops.linear(h, w.wk, w.bk).reshape(T, -1, d)
    v = ops.linear(h, w.wv, w.bv).reshape(T, -1, d)
    return ops.rope(q, cos, sin), ops.rope(k, cos, sin), v
