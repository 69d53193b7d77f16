"""q8_0: llama.cpp's Q8_0 (ops/quant/formats.py::Q8_0), its kernels, its prepared weight and its variants.

The q8_0 kernels round their activations to int8 levels per block of 32 first (llama.cpp's way, the
rounding ops/quant/formats.py::q8_blocks defines), then each block is an integer dot product, summed
exactly, scaled once by d_w · d_x. Every matrix-vector kernel here is built on one function,
q8_0_tile_dot: the dot product of an activation row with a tile of ROW_TILE weight rows side by side
(ops/quant/tiles.py), for the LM head too.

Each variant is compared with the quantised reference (ops/quant/reference.py) under the op's rule
plus an allowance for roundings that may flip (FLIP_WHY, below).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..attention import _bias_and_rope, _normalised
from ..jit import NEEDS_NUMBA, njit, prange
from ..mlp import silu_scalar, swiglu
from ..norm import rmsnorm
from ..registry import OPS, close, variant
from .formats import BLOCK, Q8_0, as_format, round_activations_q8
from .prefill import PreparedWeight
from .projections import (describe, linear_quantized, norm_head_quantized, prepare_head, prepare_matrix, prepare_mlp,
                          prepare_stacked_qkv, qkv_rope_quantized, swiglu_mlp_quantized)
from .reference import (linear_block_examples, linear_block_inputs, linear_dequantized, norm_head_block_examples,
                        norm_head_block_inputs, norm_head_dequantized, qkv_rope_block_examples, qkv_rope_block_inputs,
                        qkv_rope_dequantized, swiglu_mlp_block_examples, swiglu_mlp_block_inputs,
                        swiglu_mlp_dequantized)
from .tiles import RowTiled, row_tiles, untiled

@njit(fastmath=False)  # bit for bit ops/quant/formats.py::q8_blocks (no reassociation, no reciprocal rewrites)
def quantize_activation_rows(x, xq, xd):
    """Each block of 32 of each row of x: xd = max|x| / 127, xq = round(x · (1 / xd)) half away from zero:
    an integer in [-127, 127], kept as a float32 (so the dot products need no conversion). Zeros
    where 1 / xd is infinite, as in q8_blocks."""
    for t in range(x.shape[0]):
        for b in range(xd.shape[1]):
            amax = np.float32(0.0)
            for i in range(BLOCK):
                amax = max(amax, abs(x[t, b * BLOCK + i]))
            d = amax / np.float32(127.0)
            inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
            if np.isinf(inv):  # d subnormal, 1 / d overflowed: zeros (formats.py::_inverse says why)
                inv = np.float32(0.0)
            xd[t, b] = d
            for i in range(BLOCK):
                v = x[t, b * BLOCK + i] * inv
                r = np.trunc(v)
                if abs(v - r) >= np.float32(0.5):
                    r += np.sign(v)
                xq[t, b, i] = r


@njit
def quantized_activations(x):
    """x (T, K) float32 -> xq (T, K/32, 32) integer levels (as float32), xd (T, K/32) float32."""
    T, K = x.shape
    xq = np.empty((T, K // BLOCK, BLOCK), dtype=np.float32)
    xd = np.empty((T, K // BLOCK), dtype=np.float32)
    quantize_activation_rows(x, xq, xd)
    return xq, xd


@njit(inline="always")
def q8_0_tile_dot(x, xd, w, d, out):
    """out[r] = sum over blocks b of (d[b, r] · xd[b]) · Σ_i w[b, i, r] · x[b, i], for the rows r of
    one tile (w: (K/32, 32, ROW_TILE) codes, d: (K/32, ROW_TILE) scales; x: (K/32, 32)).

    The loop over r is the one vectorised, 16 rows a register. That is why the loop over i runs to
    the constant BLOCK: the compiler unrolls a constant loop first, then vectorises the loop around
    it (the row-by-row kernels avoid a constant bound for the same reason: ops/quant/int8.py).
    For q8_0, x holds integer levels: each product is an integer of magnitude at most
    127 · 127 and a block's sum at most 32 times that, 516128 < 2^24, so every partial sum is exact
    in float32 and the block sum is llama.cpp's int32 sum bit for bit. (Numba would type
    int8 · int8 as int64: half as many lanes.)"""
    for r in range(out.shape[0]):
        out[r] = 0
    for b in range(d.shape[0]):
        xb, wb, scale = x[b], w[b], d[b]
        for r in range(out.shape[0]):  # the last tile's zero rows beyond N are skipped: out is shorter
            s = np.float32(0.0)
            for i in range(BLOCK):  # a constant: unrolled, 32 products a row
                s += xb[i] * np.float32(wb[i, r])
            out[r] += s * (scale[r] * xd[b])


@njit(parallel=True)
def matvec_q8_0_tiles(x, xd, w, d, out):
    """out[t, j] = x[t]·W[j], tile by tile in parallel; x (T, K/32, 32) in blocks, xd (T, K/32) the
    activation scales (ones for float32 activations: d · 1 is d exactly)."""
    R = w.shape[3]
    for tile in prange(w.shape[0]):
        for t in range(x.shape[0]):
            q8_0_tile_dot(x[t], xd[t], w[tile], d[tile], out[t, tile * R:(tile + 1) * R])


@njit
def matvec_q8_0(x, w, d, out):
    """out[t, j] = x[t]·W[j] with x[t] rounded per block first (inside one compiled call: one call
    per projection from Python, not two)."""
    xq, xd = quantized_activations(x)
    matvec_q8_0_tiles(xq, xd, w, d, out)


@njit(parallel=True)
def gate_up_q8_0_tiles(h, gate_w, gate_d, up_w, up_d, out):
    """out[t, j] = silu(g) · u, g and u from the gate's and up's tiles t, read one after the other."""
    xq, xd = quantized_activations(h)
    R = gate_w.shape[3]
    for tile in prange(gate_w.shape[0]):
        u = np.empty(R, dtype=np.float32)
        for t in range(xq.shape[0]):
            g = out[t, tile * R:(tile + 1) * R]
            q8_0_tile_dot(xq[t], xd[t], gate_w[tile], gate_d[tile], g)
            q8_0_tile_dot(xq[t], xd[t], up_w[tile], up_d[tile], u[:g.shape[0]])
            for r in range(g.shape[0]):
                g[r] = silu_scalar(g[r]) * u[r]


@njit(parallel=True)
def qkv_rope_decode_q8_0(x, norm, w, d, bqkv, cos, sin, eps, n_q, n_kv, out):
    """Norm, round the normalised row per block, stream the Q8_0 tiles, then bias and RoPE."""
    h = _normalised(x, norm, eps)
    xq, xd = quantized_activations(h.reshape(1, -1))
    R = w.shape[3]
    for tile in prange(w.shape[0]):
        q8_0_tile_dot(xq[0], xd[0], w[tile], d[tile], out[tile * R:(tile + 1) * R])
    _bias_and_rope(out, bqkv, cos, sin, n_q, n_kv)


@njit
def dequantize_q8_0_tiles(w, d, first, out):
    """Q8_0.dequantize of rows first .. first + n - 1, written transposed: out (K, n) = W^T, so each
    tile's rows are read and written contiguously (row order is several times slower to write:
    benchmarks/RESULTS.md, Quantised weights, "The block formats with rows side by side")."""
    R = w.shape[3]
    for tile in range(first // R, (first + out.shape[1] + R - 1) // R):
        lo = max(first, tile * R) - tile * R  # the tile's rows wanted: lo .. hi - 1
        hi = min(first + out.shape[1], (tile + 1) * R) - tile * R
        for b in range(w.shape[1]):
            for i in range(w.shape[2]):
                o = out[b * BLOCK + i, tile * R + lo - first:tile * R + hi - first]
                codes, scales = w[tile, b, i, lo:hi], d[tile, b, lo:hi]
                for r in range(o.shape[0]):
                    o[r] = np.float32(codes[r]) * scales[r]


@dataclass(frozen=True)
class Q8_0Weight(RowTiled, PreparedWeight):
    """A Q8_0 matrix as the kernels read it: its codes and scales in row tiles (row_tiles), the scales
    widened to float32 (Numba has no float16 arithmetic on CPUs). `fmt` gives back the Q8_0."""

    tiles: np.ndarray  # (tiles, K/32, 32, ROW_TILE) int8
    d: np.ndarray  # (tiles, K/32, ROW_TILE) float32
    rows: int  # N: the tiles hold zero rows beyond it

    @classmethod
    def of(cls, fmt: Q8_0) -> "Q8_0Weight":
        return cls(*row_tiles(fmt.qs, fmt.d), fmt.shape[0])

    @property
    def fmt(self) -> Q8_0:
        """The Q8_0 it holds, row by row again (for the quantised reference: widening float16 to
        float32 and back is exact)."""
        return Q8_0(untiled(self.d, self.rows).astype(np.float16), untiled(self.tiles, self.rows))

    def matvec(self, x, out):
        matvec_q8_0(np.ascontiguousarray(x), self.tiles, self.d, out)

    def gate_up(self, h, up: "Q8_0Weight", out):
        gate_up_q8_0_tiles(np.ascontiguousarray(h), self.tiles, self.d, up.tiles, up.d, out)

    def qkv_rope_decode(self, x, norm, bqkv, cos, sin, eps, n_q, n_kv, out):
        qkv_rope_decode_q8_0(x, norm, self.tiles, self.d, bqkv, cos, sin, eps, n_q, n_kv, out)

    def dequantize_rows(self, first, n, buf):
        out = buf[:n * self.shape[1]].reshape(self.shape[1], n)
        dequantize_q8_0_tiles(self.tiles, self.d, first, out)
        return out.T  # BLAS reads the transposed operand about as fast (RESULTS.md, as above)

    ROUNDS_ACTIVATIONS = True  # the one place that says which kernels round their activations

    def round_activations(self, x):
        # contiguous first: prefill hands the down projection a transposed view, and rounding its
        # strided blocks in place of a copy is several times slower
        xq, xd = quantized_activations(np.ascontiguousarray(x))
        return (xq * xd[..., None]).reshape(x.shape)  # as formats.py::round_activations_q8


# ---------------------------------------------------------------------------------- comparison rules

# How far, in levels, an activation the kernel rounds may lie from the reference's: measured at most
# 2.5e-4 (silu·up) and 3.3e-5 (rmsnorm) over 1500 generated examples each; this leaves 40x room.
FLIP_LEVELS = 1e-2


def _flip_allowance(x, weight) -> float:
    """What q8_0 roundings that may flip can cost. `x`: the activations as the quantised reference
    rounds them. Only one within FLIP_LEVELS of a half-level boundary can go to the neighbouring level,
    costing one quantum (block max / 127) times |w| in each output: their sum, for the worst output.
    (Allowing a flip anywhere, as much as the largest quantum·|w|, let a kernel that rounded nothing pass.)"""
    blocks = np.abs(x.reshape(x.shape[0], -1, BLOCK)).astype(np.float64)
    d = blocks.max(axis=-1, keepdims=True) / 127
    with np.errstate(divide="ignore", invalid="ignore"):
        levels = blocks / d  # NaN in an all-zero block: never near a boundary
    near = np.abs(levels - np.floor(levels) - 0.5) <= FLIP_LEVELS
    quanta = np.where(near, d, 0).reshape(x.shape)  # (T, K)
    return float(np.max(quanta @ np.abs(weight).T.astype(np.float64), initial=0.0))


def _q8_0_values(w):
    """A float32 weight as the q8_0 variants hold it: quantised, then dequantised."""
    return as_format(w, Q8_0).dequantize()


def _mlp_slack(h, w):
    x = round_activations_q8(h)  # the reference's silu·up: from rounded h and the q8_0 weights
    return _flip_allowance(swiglu(x @ _q8_0_values(w.gate).T, x @ _q8_0_values(w.up).T), w.down)


def _qkv_slack(x, w, cos, sin, eps):
    h = rmsnorm(x, w.norm, eps)
    # RoPE mixes two outputs with |cos|, |sin| <= 1: at most twice one output's error
    return 2 * max(_flip_allowance(h, m) for m in (w.wq, w.wk, w.wv))


def _head_slack(x, w, eps):
    return _flip_allowance(rmsnorm(x, w.norm, eps), w.weight)


FLIP_WHY = ("; the activations the kernel rounds (rmsnorm's or silu·up's output) are computed in another "
            f"order than the reference's, so one within {FLIP_LEVELS:g} of a level of a rounding boundary may go "
            "to the neighbouring int8 level: each such one is allowed one quantum (block max / 127) times |w|")


def _q8_0_rule(op_name, slack):
    base = OPS[op_name].rule
    return close(base.tol, base.why + FLIP_WHY, base.magnitude, base.magnitude_label, slack, "flipped roundings")


# ---------------------------------------------------------------------------------- the variants

DOC = ("llama.cpp's Q8_0 weights, repacked 64 rows side by side; activations rounded per block of 32, "
       "exact integer block sums")
Q8 = dict(weight_format="q8_0", **NEEDS_NUMBA)


@variant("linear", "q8_0", prepare=prepare_matrix(Q8_0, Q8_0Weight), reference=linear_dequantized,
         inputs=linear_block_inputs, examples=linear_block_examples, doc=describe(linear_quantized, DOC), **Q8)
def linear_q8_0(x, weight, bias=None):
    return linear_quantized(x, weight, bias)


@variant("swiglu_mlp", "q8_0", prepare=prepare_mlp(Q8_0, Q8_0Weight), reference=swiglu_mlp_dequantized,
         rule=_q8_0_rule("swiglu_mlp", _mlp_slack), inputs=swiglu_mlp_block_inputs,
         examples=swiglu_mlp_block_examples, doc=describe(swiglu_mlp_quantized, DOC), **Q8)
def swiglu_mlp_q8_0(h, w):
    return swiglu_mlp_quantized(h, w)


@variant("qkv_rope", "q8_0", prepare=prepare_stacked_qkv(Q8_0, Q8_0Weight), reference=qkv_rope_dequantized,
         rule=_q8_0_rule("qkv_rope", _qkv_slack), inputs=qkv_rope_block_inputs, examples=qkv_rope_block_examples,
         doc=describe(qkv_rope_quantized, DOC), **Q8)
def qkv_rope_q8_0(x, w, cos, sin, eps):
    return qkv_rope_quantized(x, w, cos, sin, eps)


@variant("norm_head", "q8_0", prepare=prepare_head(Q8_0, Q8_0Weight), reference=norm_head_dequantized,
         rule=_q8_0_rule("norm_head", _head_slack), inputs=norm_head_block_inputs,
         examples=norm_head_block_examples, doc=describe(norm_head_quantized, DOC), **Q8)
def norm_head_q8_0(x, w, eps):
    return norm_head_quantized(x, w, eps)
