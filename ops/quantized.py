"""Computing on quantised weights: the kernels for each format, and the variants of the projection
ops (`linear`, `swiglu_mlp`, `qkv_rope`, `norm_head`) that run them.

ops/quant.py defines the formats: what is stored, and the NumPy quantise/dequantise that define it.
Here each format becomes a *prepared weight*: the stored integers (the block scales widened to
float32, since Numba has no float16 arithmetic on CPUs) plus the kernels that read them:

    w.matvec(x, out)             out = x @ W^T for a few rows (decode): W is streamed once
    w.gate_up(h, up, out)        out = silu(h @ W^T) * (h @ Wup^T), both streamed in one pass
    w.qkv_rope_decode(...)       one token: rmsnorm, the stacked Q/K/V rows, bias and RoPE
    w.dequantize_rows(first, n, buf)   rows first..first+n of W as float32, an (n, K) view of buf
                                 (q8_0's: a transposed one): prefill feeds BLAS tile by tile
    w.round_activations(x)       what the format does to activations (only q8_0 rounds them)

Every matrix-vector kernel of a format is built on one function, that format's dot product of an
activation row with weight row j (`int8_dot`), or, for the block formats, with a tile of 64 rows
side by side (`q8_0_tile_dot`, for the LM head too, and `q4_tile_dot`), so compare those to see
what each format costs per weight:

- int8: one float multiply-add per weight, the scale applied once per row.
- q8_0: the activations are rounded to int8 levels per block of 32 first (llama.cpp's way), then
  each block is an integer dot product, summed exactly, scaled once by d_w · d_x.
- q4_0 / q4_1: both read as w = d·q + m with q in [0, 15] (q4_0: m = -8·d), so a block's dot
  product is d · Σ q·x + m · Σ x: the nibbles are multiplied as they are, and Σ x per block is
  computed once per activation row, not once per weight row.

The block formats are repacked at load, 64 rows side by side (row_tiles, below): each vector lane
then holds one row, and a block's sum needs no sum across the lanes before its scale.

Three things decide whether the compiler turns these loops into 16-lane AVX-512 code (each cost
5-10x here when wrong): in a row-by-row kernel the block's inner loop must run to a bound read from
an array's shape, not the constant 32 (a constant loop is unrolled first, and the vectoriser then
takes the *block* loop, gathering values 32 apart; the row tiles use that on purpose, to vectorise
the loop over rows around it); indices it can prove non-negative (Numba wraps negative indices, and
`x[b*32 + i]` defeats that proof: so activations arrive reshaped into blocks, `x[b, i]`); and
32-bit lanes (Numba types int8·int8 as int64, 8 lanes a register: so integer products are made in
float32, where they are exact, see q8_0_tile_dot).

Prefill (many rows) is compute-bound: every format dequantises tiles of rows into a float32 buffer
in cache and hands them to BLAS (ops/linear.py::weights_times_transposed).

Each variant is checked against its *quantised reference*: dequantise the prepared weights (and,
for q8_0, round the activations), then run the float32 reference op. So `check` measures the
kernel alone; what the rounding costs is measured by `tinyllm eval`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .attention import _bias_and_rope, _normalised, _qkv_rope_inputs, prepare_qkv, qkv_rope_fused
from .jit import FEW_ROWS, NUMBA_AVAILABLE, NUMBA_MISSING, njit, prange
from .linear import _linear_inputs, _norm_head_inputs, linear, weights_times_transposed
from .mlp import _swiglu_mlp_inputs, silu_scalar, swiglu, swiglu_mlp_prefill
from .norm import rmsnorm, rmsnorm_rows
from .quant import BLOCK, FORMATS, Int8, Q4_0, Q4_1, Q8_0, as_format, concat_rows, round_activations_q8
from .registry import OPS, Weights, close, reference_table, variant
from .rope import rope_inv_freq, rope_tables

# ================================================================================== int8: a scale per row


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
class Int8Weight:
    """An ops/quant.py::Int8 matrix (int8 values, a float32 scale per row), as the kernels read it."""

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

    ROUNDS_ACTIVATIONS = False

    def round_activations(self, x):
        return x


# ================================================================================== q8_0: int8 blocks of 32


@njit(fastmath=False)  # bit for bit ops/quant.py::q8_blocks (no reassociation, no reciprocal rewrites)
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
            if np.isinf(inv):  # d subnormal, 1 / d overflowed: zeros (ops/quant.py::_inverse says why)
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


# The block formats (Q8_0 here, Q4_0 and Q4_1 below) are stored as llama.cpp lays them out, row by
# row: codes (N, K/32, bytes a block), a scale per block. Their kernels read them repacked, ROW_TILE
# rows side by side (llama.cpp's CPU backend repacks Q4_0 in the same spirit, rows interleaved, e.g.
# Q4_0_8x8): tiles[t, b, i, r] = codes[t·ROW_TILE + r, b, i]. Why: each block needs its own sum before
# its scale. Row by row, that is a sum across the vector lanes (a horizontal reduction) for every 32
# weights. With rows side by side, the lanes are 16 rows, each lane sums its own row's block, and the
# scale is applied lane by lane. Measured on this machine for q8_0: 1.2-1.4x faster per projection
# than the row-by-row kernel (1536 x 576: 30 against 38-42 us; the 49152-row head: 0.76-0.82 against
# 1.02-1.10 ms), with the same exact integer block sums.
# Rows per tile: 64 ran 1.15-1.37x the row-by-row kernel, 32 only 0.96-1.16x. Decode runs a tile per
# thread at a time, so a 576-row matrix (9 tiles) keeps at most 9 threads busy: enough here (2 cores).
ROW_TILE = 64


def row_tiles(codes: np.ndarray, *scales: np.ndarray):
    """(N, K/32, W) codes (W bytes a block), and (N, K/32) scales -> (tiles, K/32, W, ROW_TILE) codes
    and (tiles, K/32, ROW_TILE) float32 scales: rows side by side, zero rows after the last (N need not
    be a multiple of ROW_TILE). q8_0 and the 4-bit formats share it."""
    pad = -codes.shape[0] % ROW_TILE
    codes = np.pad(codes, ((0, pad), (0, 0), (0, 0)))
    tiles = codes.reshape(-1, ROW_TILE, *codes.shape[1:]).transpose(0, 2, 3, 1)
    scales = [np.pad(a.astype(np.float32), ((0, pad), (0, 0))) for a in scales]
    return (np.ascontiguousarray(tiles), *(np.ascontiguousarray(a.reshape(-1, ROW_TILE, a.shape[1]).transpose(0, 2, 1))
                                            for a in scales))


def untiled(tiles: np.ndarray, rows: int) -> np.ndarray:
    """row_tiles undone for codes or scales: (tiles, K/32, [W,] ROW_TILE) -> (rows, K/32[, W])."""
    t = np.moveaxis(tiles, -1, 1)
    return np.ascontiguousarray(t.reshape(-1, *t.shape[2:])[:rows])


class RowTiled:
    """What the row-tiled weights (Q8_0Weight, Q4Weight) share: their `rows` and scales `d` (tiles,
    K/32, ROW_TILE) give the shape of the matrix they stand for."""

    @property
    def shape(self):
        return self.rows, self.d.shape[1] * BLOCK


@njit(inline="always")
def q8_0_tile_dot(x, xd, w, d, out):
    """out[r] = sum over blocks b of (d[b, r] · xd[b]) · Σ_i w[b, i, r] · x[b, i], for the rows r of
    one tile (w: (K/32, 32, ROW_TILE) codes, d: (K/32, ROW_TILE) scales; x: (K/32, 32)).

    The loop over r is the one vectorised, 16 rows a register. That is why the loop over i runs to
    the constant BLOCK: the compiler unrolls a constant loop first, then vectorises the loop around
    it (the row-by-row kernels avoid a constant bound for the same reason, see the module
    docstring). For q8_0, x holds integer levels: each product is an integer of magnitude at most
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
    tile's rows are read and written contiguously (into row order: 4-5x slower here)."""
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
class Q8_0Weight(RowTiled):
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
        return out.T  # BLAS reads the transposed operand as fast (1.19 against 1.17 ms, 1536 x 576 x 128)

    ROUNDS_ACTIVATIONS = True

    def round_activations(self, x):
        # contiguous first: prefill hands the down projection a transposed view, and rounding it
        # in place of a copy ran 9x slower (strided blocks; 1.96 against 0.22 + 0.15 ms per layer)
        xq, xd = quantized_activations(np.ascontiguousarray(x))
        return (xq * xd[..., None]).reshape(x.shape)  # as ops/quant.py::round_activations_q8


class Q8_0WeightOnly(Q8_0Weight):
    """Q8_0 weights, float32 activations (weight-only, like int8): the LM head of every quantised
    preset (tinyllm/schedule.py::_kernel_presets says why, with the measurements). SmolLM2's head
    is its embedding, which the default model stores as Q8_0, so this head is exact there."""

    ROUNDS_ACTIVATIONS = False

    def matvec(self, x, out):
        x = np.ascontiguousarray(x)
        ones = np.ones((x.shape[0], self.d.shape[1]), dtype=np.float32)  # no activation scales
        matvec_q8_0_tiles(x.reshape(x.shape[0], -1, BLOCK), ones, self.tiles, self.d, out)

    def round_activations(self, x):
        return x


# ================================================================================== q4_0, q4_1: 4-bit blocks


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
class Q4Weight(RowTiled):
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

    ROUNDS_ACTIVATIONS = False

    def round_activations(self, x):
        return x


# format name -> (the stored format, what the kernels read)
PREPARED = {"int8": (Int8, Int8Weight), "q8_0": (Q8_0, Q8_0Weight), "q4_0": (Q4_0, Q4Weight),
            "q4_1": (Q4_1, Q4Weight), "q8_0_weights": (Q8_0, Q8_0WeightOnly)}
assert set(FORMATS) <= set(PREPARED)


# ================================================================================== the variants
#
# One function per op serves every format: the format's kernels come with the prepared weight.


def linear_quantized(x, weight, bias=None):
    """linear on quantised weights: the format's matrix-vector kernel, or BLAS on dequantised tiles.

    A few rows (decode) run the matrix-vector kernel; many (prefill) go to BLAS on tiles of the
    weight dequantised to float32, weights on the left (ops/linear.py::weights_times_transposed)."""
    T, N = x.shape[0], weight.shape[0]
    if T > FEW_ROWS:
        out = np.ascontiguousarray(weights_times_transposed(weight, x).T)
    else:
        out = np.empty((T, N), dtype=np.float32)
        weight.matvec(x, out)
    if bias is not None:
        out += bias
    return out


def swiglu_mlp_quantized(h, w):
    """The SwiGLU MLP on quantised projections: gate·up·silu in one pass, then down.

    For many rows, ops/mlp.py::swiglu_mlp_prefill: dequantised tiles into BLAS."""
    if h.shape[0] > FEW_ROWS:
        return swiglu_mlp_prefill(h, w)
    a = np.empty((h.shape[0], w.gate.shape[0]), dtype=np.float32)
    w.gate.gate_up(h, w.up, a)
    out = np.empty((h.shape[0], w.down.shape[0]), dtype=np.float32)
    w.down.matvec(a, out)
    return out


def norm_head_quantized(x, w, eps):
    """Final rmsnorm, then the LM head as linear on the quantised head."""
    h = np.empty_like(x)
    rmsnorm_rows(x, w.norm, np.float32(eps), h)
    return linear_quantized(h, w.weight)


# -- prepare steps: float32 (or already in the format, from `tinyllm quantize`) -> prepared weight

def _prepare_matrix(name):
    fmt, prepared = PREPARED[name]
    return lambda w: prepared.of(as_format(w, fmt))


def _prepare_mlp(name):
    matrix = _prepare_matrix(name)
    return lambda w: Weights(gate=matrix(w.gate), up=matrix(w.up), down=matrix(w.down))


def _prepare_qkv(name):
    fmt, prepared = PREPARED[name]
    return lambda w: prepare_qkv(w, stack=lambda ms: prepared.of(concat_rows([as_format(m, fmt) for m in ms])))


def _prepare_head(name):
    matrix = _prepare_matrix(name)
    return lambda w: w.replace(weight=matrix(w.weight))


# -- the quantised references: dequantise, round activations as the format does, then the float op

def dequantized(w):
    return w.fmt.dequantize()


def linear_dequantized(x, weight, bias=None):
    """The quantised reference of linear: the float32 op on the dequantised weight and on the
    activations as the format rounds them (q8_0; the others leave them as they are)."""
    return linear(round_activations_q8(x) if weight.ROUNDS_ACTIVATIONS else x, dequantized(weight), bias)


def _dequantized_table():
    """The reference op table with linear = linear_dequantized: a composite's reference run over it
    is its quantised reference (each projection inside it dequantised, activations rounded)."""
    table = reference_table()
    table.linear = linear_dequantized
    return table


def swiglu_mlp_dequantized(h, w):
    return OPS["swiglu_mlp"].reference(_dequantized_table(), h, w)


def norm_head_dequantized(x, w, eps):
    return OPS["norm_head"].reference(_dequantized_table(), x, w, eps)


def qkv_rope_dequantized(x, w, cos, sin, eps):
    """Unstack Wqkv (dequantised) into Wq, Wk, Wv, then the composite's reference. For q8_0 the
    three projections all round the same normalised row, as the kernel does once."""
    ends = (w.n_q, w.n_q + w.n_kv)
    wq, wk, wv = np.split(dequantized(w.wqkv), ends)
    bq, bk, bv = np.split(w.bqkv, ends) if w.bqkv is not None else (None, None, None)
    rounds = w.wqkv.ROUNDS_ACTIVATIONS
    table = reference_table()
    table.linear = (lambda x, wt, b=None: linear(round_activations_q8(x), wt, b)) if rounds else linear
    raw = Weights(norm=w.norm, wq=wq, wk=wk, wv=wv, bq=bq, bk=bk, bv=bv)
    return OPS["qkv_rope"].reference(table, x, raw, cos, sin, eps)


# -- comparison rules

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


# -- edge cases for the 32-block formats: a zero block, ±max at block edges, rows of two blocks

def _block_matrix(rng, rows, cols):
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    w[0, :BLOCK] = 0  # an all-zero block
    w[-1, BLOCK - 1], w[-1, BLOCK] = 8.0, -8.0  # the largest magnitudes at a block's last/first element
    return w


def _block_examples(op_name):
    def examples():
        rng = np.random.default_rng(7)
        K = 2 * BLOCK
        x = rng.standard_normal((3, K)).astype(np.float32)
        x[1, BLOCK:] = 0  # a zero block in the activations too
        if op_name == "linear":
            return [(x, _block_matrix(rng, 5, K), None), (x[:1], _block_matrix(rng, 4, K), rng.standard_normal(4)
                                                           .astype(np.float32))]
        if op_name == "swiglu_mlp":
            return [(x, Weights(gate=_block_matrix(rng, K, K), up=_block_matrix(rng, K, K),
                                down=_block_matrix(rng, K, K)))]
        if op_name == "norm_head":
            return [(x, Weights(norm=rng.standard_normal(K).astype(np.float32), weight=_block_matrix(rng, 50, K)), 1e-5)]
        d = 4
        w = Weights(norm=rng.standard_normal(K).astype(np.float32), bq=None, bk=None, bv=None,
                    wq=_block_matrix(rng, 4 * d, K), wk=_block_matrix(rng, 2 * d, K), wv=_block_matrix(rng, 2 * d, K))
        cos, sin = rope_tables(rope_inv_freq(d, 1e4), 3, start=2)
        return [(x, w, cos, sin, 1e-5), (x[:1], w, cos[:1], sin[:1], 1e-5)]

    return examples


# -- registration: linear, swiglu_mlp, qkv_rope and norm_head for each format

_DOCS = {
    "int8": "weight-only int8, a scale per output row; activations float32",
    "q8_0": "llama.cpp's Q8_0 weights, repacked 64 rows side by side; activations rounded per block of 32, "
            "exact integer block sums",
    "q4_0": "llama.cpp's Q4_0 weights (4 bits, a scale per block of 32), repacked 64 rows side by side; "
            "activations float32",
    "q4_1": "llama.cpp's Q4_1 weights (4 bits, a scale and a minimum per block of 32), repacked 64 rows side "
            "by side; activations float32",
}
_OPS = {
    "linear": (linear_quantized, _prepare_matrix, linear_dequantized, _linear_inputs, None),
    "swiglu_mlp": (swiglu_mlp_quantized, _prepare_mlp, swiglu_mlp_dequantized, _swiglu_mlp_inputs, _mlp_slack),
    # qkv_rope=fused itself: its decode pass hands a quantised Wqkv to the format's kernel
    # (ops/attention.py::qkv_rope_decode), its prefill goes through weights_times_transposed
    "qkv_rope": (qkv_rope_fused, _prepare_qkv, qkv_rope_dequantized, _qkv_rope_inputs, _qkv_slack),
    "norm_head": (norm_head_quantized, _prepare_head, norm_head_dequantized, _norm_head_inputs, _head_slack),
}


def _describe(fn, doc):
    """A variant's description for `tinyllm ops`: the function's first paragraph, then the format."""
    first_paragraph = " ".join(line.strip() for line in fn.__doc__.split("\n\n")[0].splitlines())
    return f"{first_paragraph} [{doc}]"


def _register_all():
    for name, doc in _DOCS.items():
        blocks = name != "int8"  # the llama.cpp formats need rows a multiple of 32 long
        for op_name, (fn, prepare, reference, inputs, slack) in _OPS.items():
            variant(op_name, name, prepare=prepare(name), weight_format=name, reference=reference,
                    rule=_q8_0_rule(op_name, slack) if name == "q8_0" and slack else None,
                    inputs=(lambda inputs=inputs: inputs(BLOCK)) if blocks else None,
                    examples=_block_examples(op_name) if blocks else None, doc=_describe(fn, doc),
                    available=NUMBA_AVAILABLE, unavailable_reason=NUMBA_MISSING)(fn)
    variant("norm_head", "q8_0_weights", prepare=_prepare_head("q8_0_weights"), weight_format="q8_0",
            reference=norm_head_dequantized, inputs=lambda: _norm_head_inputs(BLOCK),
            examples=_block_examples("norm_head"),
            doc=_describe(norm_head_quantized, "Q8_0 weights, float32 activations (the quantised presets' head)"),
            available=NUMBA_AVAILABLE, unavailable_reason=NUMBA_MISSING)(norm_head_quantized)


_register_all()
