"""q4_0 and q4_1: llama.cpp's 4-bit formats (ops/quant/formats.py::Q4_0, Q4_1), their kernels, their
prepared weight and their variants.

Both are read as w = d·q + m with q in [0, 15] (q4_0: m = -8·d), so a block's dot product is
d · Σ q·x + m · Σ x: the nibbles are multiplied as they are, and Σ x per block is computed once per
activation row, not once per weight row. Every matrix-vector kernel here is built on q4_tile_dot,
over a tile of ROW_TILE weight rows side by side (ops/quant/tiles.py). The activations stay float32.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..attention import _bias_and_rope, _normalised
from ..jit import NEEDS_NUMBA, njit, prange
from ..mlp import silu_scalar
from ..registry import variant
from .formats import BLOCK, Q4_0, Q4_1
from .prefill import PreparedWeight
from .projections import (describe, linear_quantized, norm_head_quantized, prepare_head, prepare_matrix, prepare_mlp,
                          prepare_stacked_qkv, qkv_rope_quantized, swiglu_mlp_quantized)
from .reference import (linear_block_examples, linear_block_inputs, linear_dequantized, norm_head_block_examples,
                        norm_head_block_inputs, norm_head_dequantized, qkv_rope_block_examples, qkv_rope_block_inputs,
                        qkv_rope_dequantized, swiglu_mlp_block_examples, swiglu_mlp_block_inputs,
                        swiglu_mlp_dequantized)
from .tiles import RowTiled, row_tiles, untiled

@njit
def block_sums(x):
    """(T, K) -> (T, K/32): the sum of each block of each row, for the m·Σx term of every 4-bit
    row's dot product."""
    xs = np.empty((x.shape[0], x.shape[1] // BLOCK), dtype=np.float32)
    for t in range(x.shape[0]):
        for b in range(xs.shape[1]):
            s = np.float32(0.0)
            for i in range(BLOCK):
                s += x[t, b * BLOCK + i]
            xs[t, b] = s
    return xs


@njit(inline="always")
def q4_tile_dot(x, xs, w, d, m, out):
    """out[r] = sum over blocks b of d[b, r] · Σ_i q_i · x_i + m[b, r] · xs[b], for the rows r of one
    tile (w: (K/32, 16, ROW_TILE) bytes; d, m: (K/32, ROW_TILE); x in half-blocks (K/32, 2, 16)).

    Byte i of a block holds element i (low nibble) and element i + 16 (high nibble), so one pass
    over the 16 bytes reads the block's two halves x[b, 0] and x[b, 1]. The nibbles are split in
    float32 (hi = floor(v / 16), lo = v - 16·hi, both exact): integer & and >> would be typed int64
    by Numba, 8 lanes a register instead of 16. As in q8_0_tile_dot, the loop over r is vectorised:
    the loop over the bytes runs to a constant and is unrolled."""
    for r in range(out.shape[0]):
        out[r] = 0
    for b in range(d.shape[0]):
        lo_x, hi_x, wb = x[b, 0], x[b, 1], w[b]
        for r in range(out.shape[0]):
            s = np.float32(0.0)
            for i in range(BLOCK // 2):  # a constant: unrolled, 16 bytes (32 weights) a row
                v = np.float32(wb[i, r])
                hi = np.floor(v * np.float32(0.0625))
                s += (v - np.float32(16.0) * hi) * lo_x[i] + hi * hi_x[i]
            out[r] += d[b, r] * s + m[b, r] * xs[b]


@njit(parallel=True)
def matvec_q4_tiles(x, w, d, m, out):
    """x (T, K), contiguous: seen as half-blocks (T, K/32, 2, 16), with its block sums."""
    xs, xh = block_sums(x), x.reshape(x.shape[0], -1, 2, BLOCK // 2)
    R = w.shape[3]
    for tile in prange(w.shape[0]):
        for t in range(x.shape[0]):
            q4_tile_dot(xh[t], xs[t], w[tile], d[tile], m[tile], out[t, tile * R:(tile + 1) * R])


@njit(parallel=True)
def gate_up_q4_tiles(h, gate_w, gate_d, gate_m, up_w, up_d, up_m, out):
    hs, hh = block_sums(h), h.reshape(h.shape[0], -1, 2, BLOCK // 2)
    R = gate_w.shape[3]
    for tile in prange(gate_w.shape[0]):
        u = np.empty(R, dtype=np.float32)
        for t in range(h.shape[0]):
            g = out[t, tile * R:(tile + 1) * R]
            q4_tile_dot(hh[t], hs[t], gate_w[tile], gate_d[tile], gate_m[tile], g)
            q4_tile_dot(hh[t], hs[t], up_w[tile], up_d[tile], up_m[tile], u[:g.shape[0]])
            for r in range(g.shape[0]):
                g[r] = silu_scalar(g[r]) * u[r]


@njit(parallel=True)
def qkv_rope_decode_q4(x, norm, w, d, m, bqkv, cos, sin, eps, n_q, n_kv, out):
    h = _normalised(x, norm, eps)
    hs = block_sums(h.reshape(1, -1))
    hh = h.reshape(-1, 2, BLOCK // 2)
    R = w.shape[3]
    for tile in prange(w.shape[0]):
        q4_tile_dot(hh, hs[0], w[tile], d[tile], m[tile], out[tile * R:(tile + 1) * R])
    _bias_and_rope(out, bqkv, cos, sin, n_q, n_kv)


@njit
def dequantize_q4_tiles(w, d, m, first, out):
    """Q4_0/Q4_1.dequantize of rows first .. first + n - 1, transposed as dequantize_q8_0_tiles
    writes them: out (K, n) = W^T, out = d · q + m (for q4_0, m = -8·d: the same values as its
    d · (q - 8), as an exact fused multiply-add rounds them), the nibbles split as in q4_tile_dot."""
    R = w.shape[3]
    for tile in range(first // R, (first + out.shape[1] + R - 1) // R):
        lo = max(first, tile * R) - tile * R  # the tile's rows wanted: lo .. hi - 1
        hi = min(first + out.shape[1], (tile + 1) * R) - tile * R
        for b in range(w.shape[1]):
            scales, lows = d[tile, b, lo:hi], m[tile, b, lo:hi]
            for i in range(w.shape[2]):
                low_half = out[b * BLOCK + i, tile * R + lo - first:tile * R + hi - first]
                high_half = out[b * BLOCK + BLOCK // 2 + i, tile * R + lo - first:tile * R + hi - first]
                codes = w[tile, b, i, lo:hi]
                for r in range(low_half.shape[0]):
                    v = np.float32(codes[r])
                    nib = np.floor(v * np.float32(0.0625))
                    low_half[r] = scales[r] * (v - np.float32(16.0) * nib) + lows[r]
                    high_half[r] = scales[r] * nib + lows[r]


@dataclass(frozen=True)
class Q4Weight(RowTiled, PreparedWeight):
    """A Q4_0 or Q4_1 matrix as the kernels read it: w = d·q + m per block, q in [0, 15] packed two
    a byte, in row tiles as q8_0's (row_tiles), d and m float32. For Q4_0, w = d·(q - 8), so
    m = -8·d (exact: a power of 2). `fmt` gives back the stored format."""

    tiles: np.ndarray  # (tiles, K/32, 16, ROW_TILE) uint8
    d: np.ndarray  # (tiles, K/32, ROW_TILE) float32
    m: np.ndarray  # (tiles, K/32, ROW_TILE) float32
    rows: int  # N: the tiles hold zero rows beyond it
    has_minimum: bool  # Q4_1 (a stored minimum per block), not Q4_0

    @classmethod
    def of(cls, fmt) -> "Q4Weight":
        d = fmt.d.astype(np.float32)
        m = fmt.m if isinstance(fmt, Q4_1) else -8 * d
        return cls(*row_tiles(fmt.qs, d, m), fmt.shape[0], isinstance(fmt, Q4_1))

    @property
    def fmt(self) -> Q4_0 | Q4_1:
        """The Q4_0 or Q4_1 it holds, row by row again (float16 -> float32 -> float16 is exact)."""
        d, qs = untiled(self.d, self.rows).astype(np.float16), untiled(self.tiles, self.rows)
        return Q4_1(d, untiled(self.m, self.rows).astype(np.float16), qs) if self.has_minimum else Q4_0(d, qs)

    def matvec(self, x, out):
        matvec_q4_tiles(np.ascontiguousarray(x), self.tiles, self.d, self.m, out)

    def gate_up(self, h, up: "Q4Weight", out):
        gate_up_q4_tiles(np.ascontiguousarray(h), self.tiles, self.d, self.m, up.tiles, up.d, up.m, out)

    def qkv_rope_decode(self, x, norm, bqkv, cos, sin, eps, n_q, n_kv, out):
        qkv_rope_decode_q4(x, norm, self.tiles, self.d, self.m, bqkv, cos, sin, eps, n_q, n_kv, out)

    def dequantize_rows(self, first, n, buf):
        out = buf[:n * self.shape[1]].reshape(self.shape[1], n)
        dequantize_q4_tiles(self.tiles, self.d, self.m, first, out)
        return out.T


# ---------------------------------------------------------------------------------- the variants

DOCS = {"q4_0": "llama.cpp's Q4_0 weights (4 bits, a scale per block of 32), repacked 64 rows side by side; "
                "activations float32",
        "q4_1": "llama.cpp's Q4_1 weights (4 bits, a scale and a minimum per block of 32), repacked 64 rows side "
                "by side; activations float32"}
BLOCKS = {op: dict(inputs=inputs, examples=examples) for op, inputs, examples in (
    ("linear", linear_block_inputs, linear_block_examples),
    ("swiglu_mlp", swiglu_mlp_block_inputs, swiglu_mlp_block_examples),
    ("qkv_rope", qkv_rope_block_inputs, qkv_rope_block_examples),
    ("norm_head", norm_head_block_inputs, norm_head_block_examples))}


@variant("linear", "q4_0", prepare=prepare_matrix(Q4_0, Q4Weight), weight_format="q4_0",
         reference=linear_dequantized, doc=describe(linear_quantized, DOCS["q4_0"]), **BLOCKS["linear"], **NEEDS_NUMBA)
def linear_q4_0(x, weight, bias=None):
    return linear_quantized(x, weight, bias)


@variant("swiglu_mlp", "q4_0", prepare=prepare_mlp(Q4_0, Q4Weight), weight_format="q4_0",
         reference=swiglu_mlp_dequantized, doc=describe(swiglu_mlp_quantized, DOCS["q4_0"]), **BLOCKS["swiglu_mlp"],
         **NEEDS_NUMBA)
def swiglu_mlp_q4_0(h, w):
    return swiglu_mlp_quantized(h, w)


@variant("qkv_rope", "q4_0", prepare=prepare_stacked_qkv(Q4_0, Q4Weight), weight_format="q4_0",
         reference=qkv_rope_dequantized, doc=describe(qkv_rope_quantized, DOCS["q4_0"]), **BLOCKS["qkv_rope"],
         **NEEDS_NUMBA)
def qkv_rope_q4_0(x, w, cos, sin, eps):
    return qkv_rope_quantized(x, w, cos, sin, eps)


@variant("norm_head", "q4_0", prepare=prepare_head(Q4_0, Q4Weight), weight_format="q4_0",
         reference=norm_head_dequantized, doc=describe(norm_head_quantized, DOCS["q4_0"]), **BLOCKS["norm_head"],
         **NEEDS_NUMBA)
def norm_head_q4_0(x, w, eps):
    return norm_head_quantized(x, w, eps)


@variant("linear", "q4_1", prepare=prepare_matrix(Q4_1, Q4Weight), weight_format="q4_1",
         reference=linear_dequantized, doc=describe(linear_quantized, DOCS["q4_1"]), **BLOCKS["linear"], **NEEDS_NUMBA)
def linear_q4_1(x, weight, bias=None):
    return linear_quantized(x, weight, bias)


@variant("swiglu_mlp", "q4_1", prepare=prepare_mlp(Q4_1, Q4Weight), weight_format="q4_1",
         reference=swiglu_mlp_dequantized, doc=describe(swiglu_mlp_quantized, DOCS["q4_1"]), **BLOCKS["swiglu_mlp"],
         **NEEDS_NUMBA)
def swiglu_mlp_q4_1(h, w):
    return swiglu_mlp_quantized(h, w)


@variant("qkv_rope", "q4_1", prepare=prepare_stacked_qkv(Q4_1, Q4Weight), weight_format="q4_1",
         reference=qkv_rope_dequantized, doc=describe(qkv_rope_quantized, DOCS["q4_1"]), **BLOCKS["qkv_rope"],
         **NEEDS_NUMBA)
def qkv_rope_q4_1(x, w, cos, sin, eps):
    return qkv_rope_quantized(x, w, cos, sin, eps)


@variant("norm_head", "q4_1", prepare=prepare_head(Q4_1, Q4Weight), weight_format="q4_1",
         reference=norm_head_dequantized, doc=describe(norm_head_quantized, DOCS["q4_1"]), **BLOCKS["norm_head"],
         **NEEDS_NUMBA)
def norm_head_q4_1(x, w, eps):
    return norm_head_quantized(x, w, eps)
