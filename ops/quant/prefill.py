"""Prefill on a quantised weight: W @ x^T for many rows, by BLAS on tiles of W dequantised to float32.

Many rows (prefill) make a projection compute-bound, and BLAS's blocked GEMM is the right tool for
it, but BLAS multiplies float32. So the weight goes in tiles of rows, each dequantised by the format's
kernel (`dequantize_rows`) into a float32 buffer that stays in cache (at most TILE_BYTES), and no
float32 copy of a large matrix is ever made. The activations first get what the format does to them
(`round_activations`: only a format that rounds them changes them).

In a prefill with quantised weights (ops/threads.py::split_products) the rows are cut into one part
per core, each dequantised and multiplied by its own core with single-threaded BLAS.

Every prepared weight (PreparedWeight) brings this product with it, as `times_transposed(x)` and as
the `@` operator (`weight @ x.T`), so the float code's prefill paths (ops/linear.py::
weights_times_transposed, ops/mlp.py::swiglu_mlp_prefill, ops/attention.py::qkv_rope_prefill) run it
without knowing the weight is quantised.
"""
from __future__ import annotations

import numpy as np

from ..threads import on_workers, product_workers

# Float32 bytes dequantised at a time for a quantised weight, shared among the parts a split prefill
# cuts it into (ops/threads.py): every projection of the default model fits in one BLAS call per
# part (1536 x 576 floats = 3.4 MB; one call on the whole matrix is faster than several on smaller
# tiles: benchmarks/RESULTS.md, Quantised weights, "Prefill dequantises weights into float32 tiles").
# The LM head (49152 rows) goes in tiles of this size, never a float32 copy of the whole matrix.
TILE_BYTES = 4 << 20
_tile_buffers: list[np.ndarray] = []  # one per worker (ops/threads.py), kept between calls (see _tile)


def _tile(worker: int, size: int) -> np.ndarray:
    """Worker `worker`'s float32 buffer of `size` numbers for dequantised weights, the same memory
    every call. A fresh 4 MiB array each call is fresh pages from the OS whenever glibc has handed the
    last one back: page faults and the kernel zeroing them made a tiled product up to twice as slow
    at random (benchmarks/RESULTS.md, Quantised weights: "its own tile buffer, kept")."""
    while len(_tile_buffers) <= worker:
        _tile_buffers.append(np.empty(0, dtype=np.float32))
    if _tile_buffers[worker].size < size:
        _tile_buffers[worker] = np.empty(size, dtype=np.float32)
    return _tile_buffers[worker]


def times_transposed(weight, x) -> np.ndarray:
    """W @ x^T, (N, T), for a prepared quantised `weight` and many rows x (prefill): the operand order
    OpenBLAS runs faster for our shapes (see ops/mlp.py::swiglu_mlp_prefill), in tiles of rows, the
    rows cut into parts as ops/threads.py says."""
    x = weight.round_activations(x)
    N, K = weight.shape
    out = np.empty((N, x.shape[0]), dtype=np.float32)
    align = 16  # rows: each part and tile starts on a multiple of 16, which BLAS blocks evenly
    parts = max(1, min(product_workers(), -(-N // align)))
    bounds = [min(N, round(N * i / parts / align) * align) for i in range(parts)] + [N]  # part i: rows bounds[i]..
    tile_rows = max(align, TILE_BYTES // parts // (4 * max(K, 1)) // align * align)

    def product(part: int):
        start, end = bounds[part], bounds[part + 1]
        buf = _tile(part, min(tile_rows, end - start) * K)
        for first in range(start, end, tile_rows):
            rows = weight.dequantize_rows(first, min(tile_rows, end - first), buf)  # (rows, K), a view of buf
            np.matmul(rows, x.T, out=out[first:first + rows.shape[0]])

    on_workers(product, parts)
    return out


class PreparedWeight:
    """What every prepared quantised weight shares: the prefill product above, and activations left
    as they are (a weight whose kernels round them overrides ROUNDS_ACTIVATIONS and round_activations).
    A subclass gives `shape` and `dequantize_rows(first, n, buf)`: rows first..first+n of W as float32,
    an (n, K) view of buf."""

    ROUNDS_ACTIVATIONS = False

    def round_activations(self, x):
        return x

    def times_transposed(self, x) -> np.ndarray:
        """W @ x^T (N, T) for many rows x, in dequantised tiles."""
        return times_transposed(self, x)

    def __matmul__(self, xt) -> np.ndarray:
        """`weight @ x.T`: the same product, for code written for a float32 weight."""
        return self.times_transposed(xt.T)
