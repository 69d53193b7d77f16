"""What the generic harness (test_registry.py: every variant against its reference on the op's
strategy) does not cover for the attention-family kernels: the model's real memory layouts, decode
and prefill agreeing with each other, the parallel kernels equal to their serial twins, and the fused Q/K/V
prepare step."""
import numpy as np
import pytest

from ops import attention as A
from ops import rope as R
from ops.jit import NUMBA_AVAILABLE
from ops.registry import OPS, Weights, reference_function

pytestmark = pytest.mark.skipif(not NUMBA_AVAILABLE, reason="numba is not available")

RNG = np.random.default_rng(11)


def f32(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def assert_matches(op_name, out, ref):
    error = OPS[op_name].rule.compare(out, ref)  # relative to max|ref|: the stricter scale here
    assert error is None, error


def cache_views(n_kv=3, max_len=1024, end=800, d=64):
    """Keys and values as the model passes them: the first `end` positions of a larger cache."""
    k_cache, v_cache = f32(n_kv, max_len, d), f32(n_kv, max_len, d)
    return k_cache[:, :end], v_cache[:, :end]


@pytest.mark.parametrize("T", [1, 5])
def test_attention_on_a_long_cache_view(T):
    k, v = cache_views(end=800)
    q = f32(T, 9, 64)
    assert not k.flags.c_contiguous
    assert_matches("attention", A.attention_numba(q, k, v, 800 - T), A.attention(q, k, v, 800 - T))


def test_decode_steps_agree_with_one_prefill():
    # A prefill of T queries (BLAS products around the masked softmax) and T decode steps over the
    # growing cache prefix (the online softmax) compute the same rows, within the op's rule.
    start, T = 37, 6
    k, v = cache_views(end=start + T)
    q = f32(T, 9, 64)
    prefill = A.attention_numba(q, k, v, start)
    for t in range(T):
        pos = start + t
        step = A.attention_numba(q[t:t + 1], k[:, :pos + 1], v[:, :pos + 1], pos)
        assert_matches("attention", step[0], prefill[t])


def test_attention_on_other_layouts():
    T, n_kv, d = 4, 2, 16
    q = f32(T, 6, d)
    # the model without a cache: k, v (T, Hkv, d) from the projections, transposed to (Hkv, T, d)
    k, v = f32(T, n_kv, d).transpose(1, 0, 2), f32(T, n_kv, d).transpose(1, 0, 2)
    assert_matches("attention", A.attention_numba(q, k, v, 0), A.attention(q, k, v, 0))
    # rows that are not contiguous (every other float): the kernel's non-SIMD branch; q strided too
    k2, v2 = f32(n_kv, T, 2 * d)[..., ::2], f32(n_kv, T, 2 * d)[..., ::2]
    q2 = f32(T, 6, 2 * d)[..., ::2]
    assert_matches("attention", A.attention_numba(q2, k2, v2, 0), A.attention(q2, k2, v2, 0))


def test_parallel_kernels_equal_the_serial_ones():
    # Each parallel work item does the serial kernel's arithmetic, so the results are identical;
    # small decode steps run the serial kernel, larger ones the parallel one.
    k, v = cache_views(end=300)
    for T, start in [(1, 299), (3, 297)]:
        q = f32(T, 9, 64)
        scale = np.float32(1 / np.sqrt(64))
        serial, parallel = np.empty_like(q), np.empty_like(q)
        A.attention_serial(q, k[:, :start + T], v[:, :start + T], start, scale, serial)
        A.attention_parallel(q, k[:, :start + T], v[:, :start + T], start, scale, parallel)
        np.testing.assert_array_equal(parallel, serial)
    w, x, cos, sin = real_shaped_qkv_args(biased=True)
    p = A.prepare_qkv(w)
    args = (x[0], p.norm, p.wqkv, p.bqkv, cos, sin, np.float32(1e-5), p.n_q, p.n_kv)
    serial, parallel = np.empty(p.wqkv.shape[0], np.float32), np.empty(p.wqkv.shape[0], np.float32)
    A.qkv_rope_decode_serial(*args, serial)
    A.qkv_rope_decode_parallel(*args, parallel)
    np.testing.assert_array_equal(parallel, serial)


def real_shaped_qkv_args(biased=False, T=1, D=576, n_heads=9, n_kv=3, d=64):
    """SmolLM2-135M's attention input shapes; optionally with a bias on Q only."""
    w = Weights(norm=f32(D), wq=f32(n_heads * d, D) * 0.05, wk=f32(n_kv * d, D) * 0.05,
                wv=f32(n_kv * d, D) * 0.05, bq=f32(n_heads * d) if biased else None, bk=None, bv=None)
    cos, sin = R.rope_tables(R.rope_inv_freq(d, 1e5), T, start=300)
    return w, f32(T, D), cos, sin


@pytest.mark.parametrize("biased", [False, True])
@pytest.mark.parametrize("T", [1, 3, 8])
def test_qkv_rope_fused_at_model_shapes(biased, T):
    # A decode's rows (T <= DECODE_MAX_ROWS) run the fused decode kernel, one pass per row; more
    # rows the BLAS path. A bias on Q alone (K, V unbiased) is concatenated with zeros by the prepare step.
    w, x, cos, sin = real_shaped_qkv_args(biased, T)
    out = A.qkv_rope_fused(x, A.prepare_qkv(w), cos, sin, 1e-5)
    assert_matches("qkv_rope", out, reference_function("qkv_rope")(x, w, cos, sin, 1e-5))


def test_qkv_prepare_keeps_one_copy_of_the_weights():
    w, *_ = real_shaped_qkv_args(biased=False)
    p = A.prepare_qkv(w)
    assert p.norm is w.norm and p.bqkv is None
    assert not hasattr(p, "wq") and not hasattr(p, "wk") and not hasattr(p, "wv")
    assert p.wqkv.shape == (576 + 2 * 192, 576) and p.wqkv.flags.c_contiguous
    assert (p.n_q, p.n_kv) == (576, 192)


def test_softmax_numba_over_the_last_axis_of_a_3d_array():
    x = f32(2, 3, 50) * 30
    x[0, 1, 5:20] = -np.inf
    out = A.softmax_numba(x)
    assert out.shape == x.shape and out.dtype == np.float32
    assert_matches("softmax", out, A.softmax(x))


def test_rope_kernel_in_place_equals_out_of_place():
    x = f32(4, 3, 16)
    cos, sin = R.rope_tables(R.rope_inv_freq(16, 1e4), 4, start=10)
    expected = R.rope_numba(x, cos, sin)
    R.rope_kernel(x, cos, sin, x)
    np.testing.assert_array_equal(x, expected)
