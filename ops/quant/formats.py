"""Quantised weight formats: what each stores, and its NumPy reference quantise and dequantise.

Quantisation replaces a group of float32 weights by small integers and one scale for the group:

    q = round(x / scale)        x ≈ q · scale            (and for q4_1, x ≈ q · scale + min)

so a weight costs 8 or 4 bits instead of 32, and a memory-bound decode step reads 4-8× fewer bytes.
The formats (rows are output channels of a (N, K) weight matrix; K is the dot-product axis):

- `int8`: per row, symmetric. scale = max|row| / 127, q in [-127, 127].
- `q8_0`: llama.cpp's Q8_0. Blocks of 32 along a row; per block d = max|x| / 127, stored as float16,
  and q = round(x / d) as int8.
- `q4_0`: llama.cpp's Q4_0. Blocks of 32; m is the block's value of largest magnitude (with its
  sign), d = m / -8 as float16, q = x / d + 8 truncated to [0, 15]: 4 bits. Element j of a block
  is the low nibble of byte j, element j + 16 its high nibble.
- `q4_1`: llama.cpp's Q4_1. Blocks of 32; d = (max - min) / 15 and min, both float16, and
  q = (x - min) / d rounded to [0, 15], packed as in q4_0.

The llama.cpp formats are computed exactly as llama.cpp's reference quantiser does it (in float32,
multiplying by 1/d; the scale rounded to float16 only when stored), so the same weights give the
same bytes: tests/test_quant.py checks that bit for bit against the `gguf` package.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

BLOCK = 32  # values per block in the llama.cpp formats
CHUNK_ROWS = 1024  # rows quantised at a time (the embedding has 49152)


def round_half_away(v: np.ndarray) -> np.ndarray:
    """C's roundf: halves round away from zero (NumPy's rint rounds them to even). v - trunc(v) is
    exact in floating point, so the comparison with 0.5 is too (floor(v + 0.5) is not: 0.49999997 + 0.5
    rounds up to 1.0)."""
    whole = np.trunc(v)
    return whole + np.sign(v) * (np.abs(v - whole) >= 0.5)


def _inverse(d: np.ndarray) -> np.ndarray:
    """1 / d, and 0 where that is infinite: d is 0 (an all-zero block quantises to zeros) or so small
    (subnormal, below 2.9e-39) that 1 / d overflows, which would make every level ±inf or NaN. Such a
    block quantises to zeros too: llama.cpp's float16 scale holds nothing below 6e-8 anyway, and the
    q8_0 kernels, which keep the activations' scale in float32, do the same (ops/quant/q8_0.py)."""
    with np.errstate(divide="ignore", over="ignore"):
        inverse = np.float32(1) / np.asarray(d, dtype=np.float32)
    return np.where(np.isinf(inverse), np.float32(0), inverse).astype(np.float32)


def _blocks(w: np.ndarray) -> np.ndarray:
    """(N, K) float32 -> (N, K/32, 32) blocks along each row."""
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2 or w.shape[1] % BLOCK:
        raise ValueError(f"a {BLOCK}-block format needs a 2-D weight whose rows are a multiple of {BLOCK} long, "
                         f"got shape {w.shape}")
    return w.reshape(w.shape[0], -1, BLOCK)


def _in_chunks(cls, w: np.ndarray):
    """cls.quantize(w), CHUNK_ROWS rows at a time: each row is quantised on its own, so this gives
    the same bytes, with temporaries of a few MB instead of several copies of the whole matrix."""
    return concat_rows([cls.quantize(w[first:first + CHUNK_ROWS]) for first in range(0, len(w), CHUNK_ROWS)])


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """(..., 32) values in [0, 15] -> (..., 16) bytes: element j low nibble, element j + 16 high."""
    q = q.astype(np.uint8)
    return q[..., :BLOCK // 2] | (q[..., BLOCK // 2:] << np.uint8(4))


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """(..., 16) bytes -> (..., 32) values in [0, 15], the inverse of the packing above."""
    return np.concatenate([packed & np.uint8(0x0F), packed >> np.uint8(4)], axis=-1)


def q8_blocks(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, K) float32 -> d (N, K/32) float32 and q (N, K/32, 32) int8 with x ≈ q · d: Q8_0's rounding,
    with the scale kept in float32 (Numba has no float16 arithmetic on CPUs). Also how a kernel that
    rounds its activations rounds them (ops/quant/q8_0.py::Q8_0Weight)."""
    b = _blocks(x)
    d = np.abs(b).max(axis=-1) / np.float32(127)
    return d, round_half_away(b * _inverse(d)[..., None]).astype(np.int8)


def round_activations_q8(x: np.ndarray) -> np.ndarray:
    """x with each block of 32 rounded to q8_blocks' 255 levels and back: the activations a kernel
    that rounds them multiplies (the quantised reference multiplies these values)."""
    d, q = q8_blocks(x)
    return (q.astype(np.float32) * d[..., None]).reshape(x.shape)


# ---------------------------------------------------------------------------------- the formats


@dataclass(frozen=True)
class Int8:
    q: np.ndarray  # (N, K) int8
    scale: np.ndarray  # (N,) float32

    @property
    def shape(self) -> tuple[int, int]:
        """The shape of the float32 matrix it stands for."""
        return self.q.shape

    @classmethod
    def quantize(cls, w: np.ndarray) -> "Int8":
        w = np.asarray(w, dtype=np.float32)
        q = np.zeros(w.shape, dtype=np.int8)
        scale = np.zeros(w.shape[0], dtype=np.float32)
        if w.shape[1] == 0:
            return cls(q, scale)
        for first in range(0, w.shape[0], CHUNK_ROWS):  # temporaries of a few MB, not of the whole matrix
            rows = w[first:first + CHUNK_ROWS]
            s = np.abs(rows).max(axis=1) / np.float32(127)
            q[first:first + CHUNK_ROWS] = round_half_away(rows * _inverse(s)[:, None])
            scale[first:first + CHUNK_ROWS] = s
        return cls(q, scale)

    def dequantize(self) -> np.ndarray:
        return self.q.astype(np.float32) * self.scale[:, None]

    LEVELS = (-127, 127)  # the integer codes' range (see grid)

    def grid(self) -> tuple[np.ndarray, np.ndarray]:
        """(step, offset), each (N, K) float32: element (i, j) can take the values step·code + offset for
        the integer codes in LEVELS. Here step is the row's scale and offset 0."""
        return np.broadcast_to(self.scale[:, None], self.q.shape), np.zeros(self.q.shape, np.float32)

    def with_codes(self, codes: np.ndarray) -> "Int8":
        """The same scales holding other codes (N, K) in LEVELS (what ops/quant/gptq.py chose)."""
        return Int8(np.ascontiguousarray(codes, dtype=np.int8), self.scale)


class _BlockFormat:
    """What the llama.cpp formats share: a scale `d` per block of 32 along each row."""

    @property
    def shape(self) -> tuple[int, int]:
        """The shape of the float32 matrix it stands for."""
        return self.d.shape[0], self.d.shape[1] * BLOCK

    def _per_element(self, per_block: np.ndarray) -> np.ndarray:
        """(N, K/32) -> (N, K) float32: each block's value repeated over its 32 elements."""
        return np.repeat(per_block.astype(np.float32), BLOCK, axis=1)


@dataclass(frozen=True)
class Q8_0(_BlockFormat):
    d: np.ndarray  # (N, K/32) float16
    qs: np.ndarray  # (N, K/32, 32) int8

    @classmethod
    def quantize(cls, w: np.ndarray) -> "Q8_0":
        if len(w) > CHUNK_ROWS:
            return _in_chunks(cls, w)
        d, qs = q8_blocks(w)
        return cls(d.astype(np.float16), qs)

    def dequantize(self) -> np.ndarray:
        x = self.qs.astype(np.float32) * self.d.astype(np.float32)[..., None]
        return x.reshape(x.shape[0], -1)

    LEVELS = (-127, 127)

    def grid(self) -> tuple[np.ndarray, np.ndarray]:
        """As Int8.grid: step d, offset 0."""
        return self._per_element(self.d), np.zeros(self.shape, np.float32)

    def with_codes(self, codes: np.ndarray) -> "Q8_0":
        return Q8_0(self.d, np.ascontiguousarray(codes, dtype=np.int8).reshape(self.qs.shape))


@dataclass(frozen=True)
class Q4_0(_BlockFormat):
    d: np.ndarray  # (N, K/32) float16
    qs: np.ndarray  # (N, K/32, 16) uint8, two 4-bit values a byte

    @classmethod
    def quantize(cls, w: np.ndarray) -> "Q4_0":
        if len(w) > CHUNK_ROWS:
            return _in_chunks(cls, w)
        b = _blocks(w)
        # the value of largest magnitude, sign kept (the first one, where two tie)
        m = np.take_along_axis(b, np.abs(b).argmax(axis=-1)[..., None], axis=-1)[..., 0]
        d = m / np.float32(-8)
        q = np.trunc(b * _inverse(d)[..., None] + np.float32(8.5))
        return cls(d.astype(np.float16), _pack_nibbles(np.clip(q, 0, 15)))

    def dequantize(self) -> np.ndarray:
        q = unpack_nibbles(self.qs).astype(np.float32) - np.float32(8)
        x = self.d.astype(np.float32)[..., None] * q
        return x.reshape(x.shape[0], -1)

    LEVELS = (0, 15)

    def grid(self) -> tuple[np.ndarray, np.ndarray]:
        """As Int8.grid: step d, offset -8d (the stored nibble q stands for d·(q - 8))."""
        step = self._per_element(self.d)
        return step, np.float32(-8) * step

    def with_codes(self, codes: np.ndarray) -> "Q4_0":
        return Q4_0(self.d, _pack_nibbles(np.ascontiguousarray(codes).reshape(*self.d.shape, BLOCK)))


@dataclass(frozen=True)
class Q4_1(_BlockFormat):
    d: np.ndarray  # (N, K/32) float16
    m: np.ndarray  # (N, K/32) float16: each block's minimum
    qs: np.ndarray  # (N, K/32, 16) uint8, two 4-bit values a byte

    @classmethod
    def quantize(cls, w: np.ndarray) -> "Q4_1":
        if len(w) > CHUNK_ROWS:
            return _in_chunks(cls, w)
        b = _blocks(w)
        lo, hi = b.min(axis=-1), b.max(axis=-1)
        d = (hi - lo) / np.float32(15)
        q = np.trunc((b - lo[..., None]) * _inverse(d)[..., None] + np.float32(0.5))
        return cls(d.astype(np.float16), lo.astype(np.float16), _pack_nibbles(np.clip(q, 0, 15)))

    def dequantize(self) -> np.ndarray:
        q = unpack_nibbles(self.qs).astype(np.float32)
        x = self.d.astype(np.float32)[..., None] * q + self.m.astype(np.float32)[..., None]
        return x.reshape(x.shape[0], -1)

    LEVELS = (0, 15)

    def grid(self) -> tuple[np.ndarray, np.ndarray]:
        """As Int8.grid: step d, offset the block's minimum m."""
        return self._per_element(self.d), self._per_element(self.m)

    def with_codes(self, codes: np.ndarray) -> "Q4_1":
        return Q4_1(self.d, self.m, _pack_nibbles(np.ascontiguousarray(codes).reshape(*self.d.shape, BLOCK)))


FORMATS = {"int8": Int8, "q8_0": Q8_0, "q4_0": Q4_0, "q4_1": Q4_1}


def as_format(w, fmt):
    """`w` in format `fmt`: quantised from float32, or as it is when it already is (a model saved by
    `tinyllm quantize` holds its weights quantised)."""
    return w if isinstance(w, fmt) else fmt.quantize(w)


def concat_rows(parts: list):
    """Stack matrices of one format along their rows (each row is quantised on its own, so this is
    the same as quantising the stacked float32 matrix)."""
    cls = type(parts[0])
    return cls(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)))
