"""The projection ops (`linear`, `swiglu_mlp`, `qkv_rope`, `norm_head`) on a prepared quantised weight,
whatever its format, and the prepare steps that make one. Each format's file (int8.py, q8_0.py, q4.py,
q8_0_weights.py) registers its variants of these ops, with its prepared weight, its doc and its rules.

A prepared weight (ops/quant/prefill.py::PreparedWeight) brings its format's kernels:

    w.matvec(x, out)             out = x @ W^T for a few rows (decode): W is streamed once
    w.gate_up(h, up, out)        out = silu(h @ W^T) * (h @ Wup^T), both streamed in one pass
    w.qkv_rope_decode(...)       one token: rmsnorm, the stacked Q/K/V rows, bias and RoPE
    w.times_transposed(x)        W @ x^T for many rows (prefill), also as `w @ x.T`: BLAS on
                                 dequantised tiles (ops/quant/prefill.py)
    w.round_activations(x)       what the format does to activations (only q8_0 rounds them)
"""
from __future__ import annotations

import numpy as np

from ..attention import qkv_rope_decode, qkv_rope_prefill, stacked_qkv
from ..jit import is_decode
from ..mlp import swiglu_mlp_prefill
from ..norm import rmsnorm_rows
from ..registry import Weights
from .formats import as_format, concat_rows


def describe(fn, doc):
    """A variant's description for `tinyllm ops`: the function's first paragraph, then the format."""
    first_paragraph = " ".join(line.strip() for line in fn.__doc__.split("\n\n")[0].splitlines())
    return f"{first_paragraph} [{doc}]"


# ---------------------------------------------------------------------------------- the ops


def linear_quantized(x, weight, bias=None):
    """linear on quantised weights: the format's matrix-vector kernel, or BLAS on dequantised tiles.

    A few rows (decode) run the matrix-vector kernel; many (prefill) go to BLAS on tiles of the
    weight dequantised to float32, weights on the left (ops/quant/prefill.py)."""
    T, N = x.shape[0], weight.shape[0]
    if not is_decode(T):
        out = np.ascontiguousarray(weight.times_transposed(x).T)
    else:
        out = np.empty((T, N), dtype=np.float32)
        weight.matvec(x, out)
    if bias is not None:
        out += bias
    return out


def swiglu_mlp_quantized(h, w):
    """The SwiGLU MLP on quantised projections: gate·up·silu in one pass, then down.

    For many rows, ops/mlp.py::swiglu_mlp_prefill: dequantised tiles into BLAS."""
    if not is_decode(h.shape[0]):
        return swiglu_mlp_prefill(h, w)
    a = np.empty((h.shape[0], w.gate.shape[0]), dtype=np.float32)
    w.gate.gate_up(h, w.up, a)
    out = np.empty((h.shape[0], w.down.shape[0]), dtype=np.float32)
    w.down.matvec(a, out)
    return out


def _stream(x, norm, wqkv, bqkv, cos, sin, eps, n_q, n_kv, out):
    """ops/attention.py::qkv_rope_decode's kernel, for a quantised Wqkv: its format's own."""
    wqkv.qkv_rope_decode(x, norm, bqkv, cos, sin, eps, n_q, n_kv, out)


def qkv_rope_quantized(x, w, cos, sin, eps):
    """rmsnorm, the Q/K/V projections and RoPE: one compiled pass over Wqkv per row for decode,
    one BLAS matmul with the norm and RoPE around it for prefill.

    As ops/attention.py::qkv_rope_fused, with the format's decode kernel, one pass per row for a
    decode of a few rows (the prefill's matmul is the prepared weight's own product)."""
    if is_decode(x.shape[0]):
        return qkv_rope_decode(x, w, cos, sin, eps, kernel=_stream)
    return qkv_rope_prefill(x, w, cos, sin, eps)


def norm_head_quantized(x, w, eps):
    """Final rmsnorm, then the LM head as linear on the quantised head."""
    h = np.empty_like(x)
    rmsnorm_rows(x, w.norm, np.float32(eps), h)
    return linear_quantized(h, w.weight)


# ---------------------------------------------------------------------------------- prepare steps
#
# float32 (or already in the format, from `tinyllm quantize`) -> the prepared weight


def prepare_matrix(fmt, prepared):
    return lambda w: prepared.of(as_format(w, fmt))


def prepare_mlp(fmt, prepared):
    matrix = prepare_matrix(fmt, prepared)
    return lambda w: Weights(gate=matrix(w.gate), up=matrix(w.up), down=matrix(w.down))


def prepare_stacked_qkv(fmt, prepared):
    """Wq, Wk and Wv in the format, stacked as ops/attention.py::prepare_qkv stacks float32 ones."""
    return lambda w: stacked_qkv(w, prepared.of(concat_rows([as_format(m, fmt) for m in (w.wq, w.wk, w.wv)])))


def prepare_head(fmt, prepared):
    matrix = prepare_matrix(fmt, prepared)
    return lambda w: w.replace(weight=matrix(w.weight))
