"""Softmax, causal grouped-query attention over a KV cache, and the attention block's input step
(`qkv_rope`: norm, Q/K/V projections, RoPE)."""
import math

import numpy as np

from .jit import NEEDS_NUMBA, is_decode, njit, prange
from .linear import weights_times_transposed
from .norm import rmsnorm_rows
from .registry import Weights, close, op, random_array, variant
from .rope import draw_rope_tables, rope_inv_freq, rope_kernel, rope_tables


@op("softmax", rule=close(1e-5, "probabilities ≤ 1; exp differs by a few ulp between libms and the sum by "
                          "~N·2^-24 relative"), inside="attention")
def softmax(x: np.ndarray) -> np.ndarray:
    """softmax(x)_i = exp(x_i - max x) / sum_j exp(x_j - max x), over the last axis"""
    # Subtracting the max changes nothing mathematically and keeps exp() from overflowing.
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


def _attention_terms(q, k, v, start_pos) -> float:
    """Each output row is a weighted average of value rows: their size is the natural scale."""
    return float(np.max(np.abs(v), initial=0.0))


@op("attention", rule=close(1e-5, "softmax-weighted averages of v; an online softmax rescales partial sums, "
                            "moving the last bits", _attention_terms, "max|v|"))
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


@op("qkv_rope", rule=close(1e-5, "rmsnorm, dot products and a rotation, each within 1e-5"),
    composite=("rmsnorm", "linear", "rope"), weights=(1,), projections=("wq", "wk", "wv"))
def qkv_rope(ops, x, w, cos, sin, eps):
    """The attention block's inputs: h = rmsnorm(x); q, k, v = h Wq, h Wk, h Wv; RoPE on q and k.
    x (T, D), cos/sin (T, d/2) -> q (T, Hq, d), k (T, Hkv, d), v (T, Hkv, d)"""
    T, d = x.shape[0], 2 * cos.shape[1]
    h = ops.rmsnorm(x, w.norm, eps)
    q = ops.linear(h, w.wq, w.bq).reshape(T, -1, d)
    k = ops.linear(h, w.wk, w.bk).reshape(T, -1, d)
    v = ops.linear(h, w.wv, w.bv).reshape(T, -1, d)
    return ops.rope(q, cos, sin), ops.rope(k, cos, sin), v


# ---------------------------------------------------------------------------------- variants
#
# Numba kernels for the ops above. Each reads its inputs once, keeps its running values in
# registers, and allocates nothing but its output.
#
# Threads (see ops/jit.py): for decode (`is_decode`: a few rows) the kernels run in parallel over
# heads or rows; for prefill, BLAS does the matrix products and the kernels around them run serial.


# -- softmax -------------------------------------------------------------------------------------

@njit
def softmax_kernel(x, out):
    """Row-wise softmax of a 2-D float32 array in three passes over each row (max; exp and sum;
    scale), the row staying in L1 between passes; the reference makes five whole-array passes and
    two temporaries. A -inf entry gives exp(-inf - max) = 0 (a row is never all -inf)."""
    R, N = x.shape
    for r in range(R):
        m = x[r, 0]
        for j in range(1, N):
            m = max(m, x[r, j])
        total = np.float32(0.0)
        for j in range(N):
            e = np.exp(x[r, j] - m)  # ≤ 1: subtracting the max keeps exp from overflowing
            out[r, j] = e
            total += e
        inv = np.float32(1.0) / total
        for j in range(N):
            out[r, j] *= inv


@variant("softmax", "numba", **NEEDS_NUMBA)
def softmax_numba(x: np.ndarray) -> np.ndarray:
    """softmax over the last axis: any leading axes are flattened into rows for the 2-D kernel."""
    out = np.empty(x.shape, dtype=np.float32)
    if x.size:
        softmax_kernel(x.reshape(-1, x.shape[-1]), out.reshape(-1, x.shape[-1]))
    return out


# -- attention -----------------------------------------------------------------------------------
#
# The keys and values arrive as views cache.k[i, :, :end]: not contiguous, so Numba types them as
# arrays of unknown strides and compiles their loops with the stride a run-time value, which LLVM
# does not vectorise. Each (head, position) row is d contiguous floats, though.
# The two row helpers test that and run the same loop in a branch where the stride is known to be
# 4 bytes: loop versioning by hand, and the compiler emits SIMD code for that branch. They are
# inlined (inline="always") into the kernel, so the test costs a compare per row, not a call.

@njit(inline="always")
def _dot64(q, k_row):
    """sum_i q_i k_i for a contiguous float32 row q and a cache row k, accumulated in float64."""
    s = 0.0
    if k_row.strides[0] == 4:  # a contiguous float32 row (always, from the model): SIMD code
        for i in range(q.shape[0]):
            s += np.float64(q[i]) * np.float64(k_row[i])
    else:
        for i in range(q.shape[0]):
            s += np.float64(q[i]) * np.float64(k_row[i])
    return s


@njit(inline="always")
def _axpy(p, v_row, acc):
    """acc += p · v for a contiguous float32 row acc and a cache row v."""
    if v_row.strides[0] == 4:
        for i in range(acc.shape[0]):
            acc[i] += p * v_row[i]
    else:
        for i in range(acc.shape[0]):
            acc[i] += p * v_row[i]


@njit
def _attend(q, k, v, n_keys, scale, acc):
    """acc = softmax(q · k[:n]^T * scale) @ v[:n] for one query row q (d,) over keys/values (S, d)
    of its KV head, in ONE pass over the keys: the online softmax of Milakov & Gimelshein (2018)
    that FlashAttention is built on.

        m = running max of the scores,  l = running sum of exp(score - m),
        acc = running sum of exp(score - m) · v_j
        for each key j < n:  s = q · k_j * scale
                             if s > m:  acc *= exp(m - s);  l *= exp(m - s);  m = s  (rescale to the new max)
                             p = exp(s - m);  l += p;  acc += p · v_j
        acc /= l

    No score vector is stored: each key and value row is read once, straight from the cache.

    The one float64 step is the dot product. Scores are exponentiated, so an absolute error in a
    score is a relative error in its weight, and scores can reach the hundreds: a float32 sum moves
    them by ~|s|·2^-24·sqrt(d). Summed in float64 and rounded once to float32 (as the reference's
    score is), the score is as close to the exact one as a float32 can be."""
    m = np.float32(-np.inf)
    l = np.float32(0.0)
    acc[:] = 0.0
    for j in range(n_keys):
        s = np.float32(_dot64(q, k[j])) * scale  # as the reference: the dot rounded to float32, then scaled
        if s > m:  # a new maximum: the terms so far were weighted by exp(. - m); rescale them
            c = np.exp(m - s)  # the first key: exp(-inf) = 0, and acc, l are 0 anyway
            l *= c
            for i in range(acc.shape[0]):
                acc[i] *= c
            m = s
        p = np.exp(s - m)
        l += p
        _axpy(p, v[j], acc)
    inv = np.float32(1.0) / l
    for i in range(acc.shape[0]):
        acc[i] *= inv


@njit
def attention_serial(q, k, v, start_pos, scale, out):
    """All (query, head) rows one after the other: below ATTENTION_PARALLEL_MIN_WORK."""
    T, n_heads, _ = q.shape
    group = n_heads // k.shape[0]
    for t in range(T):
        for h in range(n_heads):
            g = h // group  # the KV head this query head shares
            # causal: query t (position start_pos + t) sees keys 0 .. start_pos + t
            _attend(q[t, h], k[g], v[g], start_pos + t + 1, scale, out[t, h])


@njit(parallel=True)
def attention_parallel(q, k, v, start_pos, scale, out):
    """As attention_serial, with the T·Hq independent (query, head) rows spread over the cores."""
    T, n_heads, _ = q.shape
    group = n_heads // k.shape[0]
    for th in prange(T * n_heads):
        t, h = th // n_heads, th % n_heads
        g = h // group
        _attend(q[t, h], k[g], v[g], start_pos + t + 1, scale, out[t, h])


# Within decode (prefill never reaches these kernels): below this many multiply-adds (T·Hq·S·d,
# ~30 cached positions of a decode step of SmolLM2) the serial kernel is faster than waking the
# worker threads, even on idle cores.
ATTENTION_PARALLEL_MIN_WORK = 16_384


@njit
def causal_softmax_rows(scores, group, start_pos, scale):
    """In place, for a (T·group, S) block of raw scores whose row r belongs to query t = r // group
    (the group's query heads of one position are adjacent rows): scale, mask the keys after
    position start_pos + t, softmax. Masked entries become exact zeros."""
    R, S = scores.shape
    for r in range(R):
        n = start_pos + r // group + 1  # keys this query may see
        m = np.float32(-np.inf)
        for j in range(n):
            s = scores[r, j] * scale
            scores[r, j] = s
            m = max(m, s)
        total = np.float32(0.0)
        for j in range(n):
            e = np.exp(scores[r, j] - m)
            scores[r, j] = e
            total += e
        inv = np.float32(1.0) / total
        for j in range(n):
            scores[r, j] *= inv
        for j in range(n, S):
            scores[r, j] = 0.0


def attention_prefill(q, k, v, start_pos, scale):
    """Many queries: the score and output products are matrix products, compute-bound, so BLAS
    does them (per KV head, the group's queries as rows) and one compiled pass does the scale,
    causal mask and softmax in between. The rows are ordered (position, head of the group): that
    is q's own order, so each head's block of q is one copy and its output lands in place."""
    T, n_heads, d = q.shape
    n_kv, S, _ = k.shape
    group = n_heads // n_kv
    out = np.empty((T, n_heads, d), dtype=np.float32)
    scores = np.empty((T * group, S), dtype=np.float32)
    for g in range(n_kv):
        heads = slice(g * group, (g + 1) * group)
        qg = q[:, heads].reshape(T * group, d)  # (T·group, d)
        np.matmul(qg, k[g].T, out=scores)
        causal_softmax_rows(scores, group, start_pos, scale)
        out[:, heads] = (scores @ v[g]).reshape(T, group, d)
    return out


@variant("attention", "numba", **NEEDS_NUMBA)
def attention_numba(q: np.ndarray, k: np.ndarray, v: np.ndarray, start_pos: int) -> np.ndarray:
    """Causal GQA attention: for decode an online softmax, one pass over the cache and no score
    matrix; for prefill BLAS products around a compiled mask-and-softmax."""
    T, n_heads, d = q.shape
    scale = np.float32(1.0 / math.sqrt(d))  # as the reference: rounded to float32 once
    if not is_decode(T):
        return attention_prefill(q, k, v, start_pos, scale)
    q = np.ascontiguousarray(q, dtype=np.float32)  # T·Hq·d floats: copied only if a strided view
    out = np.empty((T, n_heads, d), dtype=np.float32)
    work = T * n_heads * k.shape[1] * d
    kernel = attention_parallel if work >= ATTENTION_PARALLEL_MIN_WORK else attention_serial
    kernel(q, k, v, start_pos, scale, out)
    return out


# -- qkv_rope: rmsnorm -> Q/K/V projections -> RoPE, fused -----------------------------------------

def prepare_qkv(w: Weights) -> Weights:
    """Once per schedule: stack Wq, Wk, Wv into one (Hq·d + 2·Hkv·d, D) matrix, so decode reads all
    three projections as one contiguous stream of rows with one kernel launch. The separate matrices
    are dropped (no second copy of the weights is kept); n_q, n_kv record where K and V start."""
    return stacked_qkv(w, np.ascontiguousarray(np.concatenate([w.wq, w.wk, w.wv]), dtype=np.float32))


def stacked_qkv(w: Weights, wqkv) -> Weights:
    """The qkv_rope weights with `wqkv`, Wq, Wk and Wv stacked (by prepare_qkv, or in another format
    by its own variant): the biases stacked likewise, a missing one as zeros."""
    biases = (w.bq, w.bk, w.bv)
    bqkv = None
    if any(b is not None for b in biases):  # a missing bias is a zero bias
        bqkv = np.concatenate([np.zeros(m.shape[0], np.float32) if b is None else b
                               for m, b in zip((w.wq, w.wk, w.wv), biases)]).astype(np.float32)
    return Weights(norm=w.norm, wqkv=wqkv, bqkv=bqkv, n_q=w.wq.shape[0], n_kv=w.wk.shape[0])


_NO_BIAS = np.zeros(0, dtype=np.float32)  # the kernel's "no bias" (a typed array, not None)


@njit
def _inv_rms(x, eps):
    """r = 1 / sqrt(mean(x^2) + eps): one pass over the D floats of x."""
    ms = np.float32(0.0)
    for i in range(x.shape[0]):
        ms += x[i] * x[i]
    return np.float32(1.0) / np.sqrt(ms / np.float32(x.shape[0]) + eps)


@njit(inline="always")
def _normalised(x, norm, eps):
    """rmsnorm of one row (D floats, the reference's order of products): computed once, before the
    stream, so each weight row costs one multiply-add per element and nothing more."""
    r = _inv_rms(x, eps)
    h = np.empty(x.shape[0], dtype=np.float32)
    for c in range(x.shape[0]):
        h[c] = x[c] * r * norm[c]
    return h


@njit(inline="always")
def _project_row(j, h, wqkv, out):
    acc = np.float32(0.0)
    for c in range(h.shape[0]):
        acc += wqkv[j, c] * h[c]
    out[j] = acc


@njit(inline="always")
def _bias_and_rope(out, bqkv, cos, sin, n_q, n_kv):
    """After the stream, on the one output row (Hq·d + 2·Hkv·d floats, in L1): add the bias, then
    rotate each Q and K head's pairs (i, i + d/2) as `rope` does. V is left as it is."""
    if bqkv.shape[0] > 0:
        for j in range(out.shape[0]):
            out[j] += bqkv[j]
    half = cos.shape[1]
    for head in range((n_q + n_kv) // (2 * half)):  # Q heads first, then K heads
        first = head * 2 * half
        for i in range(half):
            a, b = out[first + i], out[first + half + i]
            cs, sn = cos[0, i], sin[0, i]
            out[first + i] = a * cs - b * sn
            out[first + half + i] = b * cs + a * sn


@njit
def qkv_rope_decode_serial(x, norm, wqkv, bqkv, cos, sin, eps, n_q, n_kv, out):
    """One token: out = RoPE(rmsnorm(x) · Wqkv^T + b) on the Q and K rows, the plain product on V.

    Decode is a matrix-vector product: each weight is used for one multiply-add, so the time is the
    time to stream Wqkv (rows × D × 4 bytes, 2.2 MB per layer for SmolLM2-135M) from memory. It is
    read exactly once, row after row; the norm happens before the stream and RoPE after it, on the
    output row while it is still in cache. (Rotating inside the stream, both rows of a pair per work
    item, reads rows 32 apart and was ~20% slower: the row order is what the memory likes;
    benchmarks/RESULTS.md, "Where the time goes".)"""
    h = _normalised(x, norm, eps)
    for j in range(wqkv.shape[0]):
        _project_row(j, h, wqkv, out)
    _bias_and_rope(out, bqkv, cos, sin, n_q, n_kv)


@njit(parallel=True)
def qkv_rope_decode_parallel(x, norm, wqkv, bqkv, cos, sin, eps, n_q, n_kv, out):
    """As qkv_rope_decode_serial, the rows of the stream split over the cores."""
    h = _normalised(x, norm, eps)
    for j in prange(wqkv.shape[0]):
        _project_row(j, h, wqkv, out)
    _bias_and_rope(out, bqkv, cos, sin, n_q, n_kv)


def qkv_rope_decode(x, w, cos, sin, eps, kernel=qkv_rope_decode_parallel):
    """x (T, D), a decode's few rows -> q, k, v: views into the output rows the fused kernel writes,
    one call (one stream of Wqkv) per row. `kernel` takes qkv_rope_decode_parallel's arguments (a
    variant on another kind of Wqkv passes its own)."""
    T, n_q, n_kv, d = x.shape[0], w.n_q, w.n_kv, 2 * cos.shape[1]
    bias, eps = _NO_BIAS if w.bqkv is None else w.bqkv, np.float32(eps)
    out = np.empty((T, w.wqkv.shape[0]), dtype=np.float32)
    for t in range(T):
        kernel(x[t], w.norm, w.wqkv, bias, cos[t:t + 1], sin[t:t + 1], eps, n_q, n_kv, out[t])
    return (out[:, :n_q].reshape(T, -1, d), out[:, n_q:n_q + n_kv].reshape(T, -1, d),
            out[:, n_q + n_kv:].reshape(T, -1, d))


def qkv_rope_prefill(x, w, cos, sin, eps):
    """x (T, D): T tokens share every weight, so the projection is a matrix product, compute-bound,
    and BLAS is the right tool; we fuse around it: the norm (compiled), one matmul for Q, K and V
    together with the weights on the left (Wqkv @ h^T, the faster operand order, as in
    swiglu_mlp_prefill), the bias, and RoPE, whose pass also turns the transposed Q and K back
    into (T, heads, d) rows. V is returned as a (T, Hkv, d) view of the transposed product."""
    T, d, n_q, n_kv = x.shape[0], 2 * cos.shape[1], w.n_q, w.n_kv
    h = np.empty_like(x)
    rmsnorm_rows(x, w.norm, np.float32(eps), h)
    qkv = weights_times_transposed(w.wqkv, h)  # (rows, T): one sgemm
    if w.bqkv is not None:
        qkv += w.bqkv[:, None]
    q = np.empty((T, n_q // d, d), dtype=np.float32)
    k = np.empty((T, n_kv // d, d), dtype=np.float32)
    rope_kernel(qkv[:n_q].T.reshape(T, -1, d), cos, sin, q)
    rope_kernel(qkv[n_q:n_q + n_kv].T.reshape(T, -1, d), cos, sin, k)
    return q, k, qkv[n_q + n_kv:].T.reshape(T, -1, d)


@variant("qkv_rope", "fused", prepare=prepare_qkv, weight_format="fp32", **NEEDS_NUMBA)
def qkv_rope_fused(x, w, cos, sin, eps):
    """rmsnorm, the Q/K/V projections and RoPE: one compiled pass over Wqkv per row for decode,
    one BLAS matmul with the norm and RoPE around it for prefill (the split: ops/jit.py::is_decode)."""
    if is_decode(x.shape[0]):
        return qkv_rope_decode(x, w, cos, sin, eps)
    return qkv_rope_prefill(x, w, cos, sin, eps)


# ---------------------------------------------------------------------------------- strategies and edge cases

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


softmax.strategy(_softmax_inputs, examples=_softmax_examples)


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
        # keys/values as the model passes them: a view of the first S positions of a larger cache.
        # Keys stay at scale <= 1 so scores q·k/sqrt(d) stay below ~100, the range real models use
        # (SmolLM2 peaks at 37): at |score| ~ 300+ a float32 score is uncertain by 2^-24·300 ~ 2e-5,
        # and so is each softmax weight, in any float32 implementation, the reference included.
        spare = draw(st.integers(0, 5), label="cache spare")
        k = random_array(draw, (n_kv, S + spare, d), (1.0, 1e-2))[:, :S]
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


attention.strategy(_attention_inputs, examples=_attention_examples)


def _qkv_rope_inputs(multiple: int = 1):
    """`multiple`: D (the projections' input length) is a multiple of it."""
    from hypothesis import strategies as st

    @st.composite
    def args(draw):
        T, D = draw(st.integers(1, 16), label="T"), multiple * draw(st.integers(1, 96 // multiple), label="D")
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


qkv_rope.strategy(_qkv_rope_inputs, examples=_qkv_rope_examples)
