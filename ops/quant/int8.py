"""int8: a scale per row (ops/quant/formats.py::Int8), its kernels, its prepared weight and its variants.

Every matrix-vector kernel here is built on one function, int8_dot, the dot product of an activation
row with weight row j: one float multiply-add per weight, the scale applied once per row. The
activations stay float32 (weight-only int8).

What makes the compiler turn these loops into 16-lane AVX-512 code (benchmarks/RESULTS.md, Quantised
weights, has what each costs when wrong): the inner loop runs to a bound read from an array's shape,
not a constant (a constant loop is unrolled first, and the vectoriser then takes the loop around
it); and each int8 is widened to float32 (Numba types int8·int8 as int64, 8 lanes a register).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..attention import _bias_and_rope, _normalised
from ..jit import NEEDS_NUMBA, njit, prange
from ..mlp import silu_scalar
from ..registry import variant
from .formats import Int8
from .prefill import PreparedWeight
from .projections import (describe, linear_quantized, norm_head_quantized, prepare_head, prepare_matrix, prepare_mlp,
                          prepare_stacked_qkv, qkv_rope_quantized, swiglu_mlp_quantized)
from .reference import linear_dequantized, norm_head_dequantized, qkv_rope_dequantized, swiglu_mlp_dequantized


@njit(inline="always")
def int8_dot(x, q, j):
    """sum_k x[k] · q[j, k], each int8 widened to float32 in a register (scale it afterwards)."""
    acc = np.float32(0.0)
    for k in range(x.shape[0]):
        acc += x[k] * np.float32(q[j, k])
    return acc


@njit(parallel=True)
def matvec_int8_rows(x, q, scale, out):
    """out[t, j] = scale[j] · x[t]·q[j]: each int8 row is read once, for every row of x."""
    for j in prange(q.shape[0]):
        for t in range(x.shape[0]):
            out[t, j] = int8_dot(x[t], q, j) * scale[j]


@njit(parallel=True)
def gate_up_int8_rows(h, gate_q, gate_scale, up_q, up_scale, out):
    """out[t, j] = silu(g) · u, g = gate_scale[j] · h[t]·gate_q[j], u likewise: one pass over both."""
    for j in prange(gate_q.shape[0]):
        for t in range(h.shape[0]):
            out[t, j] = silu_scalar(int8_dot(h[t], gate_q, j) * gate_scale[j]) * (int8_dot(h[t], up_q, j) * up_scale[j])


@njit(parallel=True)
def qkv_rope_decode_int8(x, norm, q, scale, bqkv, cos, sin, eps, n_q, n_kv, out):
    """ops/attention.py::qkv_rope_decode_parallel on int8 rows: norm, stream, then bias and RoPE."""
    h = _normalised(x, norm, eps)
    for j in prange(q.shape[0]):
        out[j] = int8_dot(h, q, j) * scale[j]
    _bias_and_rope(out, bqkv, cos, sin, n_q, n_kv)


@njit
def dequantize_int8_rows(q, scale, first, out):
    """out[i] = q[first + i] · scale[first + i]: Int8.dequantize, row by row."""
    for i in range(out.shape[0]):
        for k in range(q.shape[1]):
            out[i, k] = np.float32(q[first + i, k]) * scale[first + i]


@dataclass(frozen=True)
class Int8Weight(PreparedWeight):
    """An ops/quant/formats.py::Int8 matrix (int8 values, a float32 scale per row), as the kernels read it."""

    fmt: Int8

    @classmethod
    def of(cls, fmt: Int8) -> "Int8Weight":
        return cls(fmt)

    @property
    def shape(self):
        return self.fmt.shape

    def matvec(self, x, out):
        matvec_int8_rows(x, self.fmt.q, self.fmt.scale, out)

    def gate_up(self, h, up: "Int8Weight", out):
        gate_up_int8_rows(h, self.fmt.q, self.fmt.scale, up.fmt.q, up.fmt.scale, out)

    def qkv_rope_decode(self, x, norm, bqkv, cos, sin, eps, n_q, n_kv, out):
        qkv_rope_decode_int8(x, norm, self.fmt.q, self.fmt.scale, bqkv, cos, sin, eps, n_q, n_kv, out)

    def dequantize_rows(self, first, n, buf):
        out = buf[:n * self.shape[1]].reshape(n, -1)
        dequantize_int8_rows(self.fmt.q, self.fmt.scale, first, out)
        return out


# ---------------------------------------------------------------------------------- the variants

DOC = "weight-only int8, a scale per output row; activations float32"
INT8 = dict(weight_format="int8", **NEEDS_NUMBA)


@variant("linear", "int8", prepare=prepare_matrix(Int8, Int8Weight), reference=linear_dequantized,
         doc=describe(linear_quantized, DOC), **INT8)
def linear_int8(x, weight, bias=None):
    return linear_quantized(x, weight, bias)


@variant("swiglu_mlp", "int8", prepare=prepare_mlp(Int8, Int8Weight), reference=swiglu_mlp_dequantized,
         doc=describe(swiglu_mlp_quantized, DOC), **INT8)
def swiglu_mlp_int8(h, w):
    return swiglu_mlp_quantized(h, w)


@variant("qkv_rope", "int8", prepare=prepare_stacked_qkv(Int8, Int8Weight), reference=qkv_rope_dequantized,
         doc=describe(qkv_rope_quantized, DOC), **INT8)
def qkv_rope_int8(x, w, cos, sin, eps):
    return qkv_rope_quantized(x, w, cos, sin, eps)


@variant("norm_head", "int8", prepare=prepare_head(Int8, Int8Weight), reference=norm_head_dequantized,
         doc=describe(norm_head_quantized, DOC), **INT8)
def norm_head_int8(x, w, eps):
    return norm_head_quantized(x, w, eps)
