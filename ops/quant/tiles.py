"""Row tiles: the layout the block formats' kernels (q8_0, q4_0, q4_1) read their weights in.

The block formats are stored as llama.cpp lays them out, row by row: codes (N, K/32, bytes a block),
a scale per block. Their kernels read them repacked, ROW_TILE rows side by side (llama.cpp's CPU
backend repacks Q4_0 in the same spirit, rows interleaved, e.g. Q4_0_8x8):

    tiles[t, b, i, r] = codes[t·ROW_TILE + r, b, i]

Why: each block needs its own sum before its scale. Row by row, that is a sum across the vector
lanes (a horizontal reduction) for every 32 weights. With rows side by side, the lanes are 16 rows,
each lane sums its own row's block, and the scale is applied lane by lane, with the same exact
integer block sums (benchmarks/RESULTS.md, Quantised weights: "The block formats with rows side by
side" has the measurements, and why 64 rows a tile rather than 32). Decode runs a tile per thread
at a time, so a 576-row matrix (9 tiles) keeps at most 9 threads busy.
"""
from __future__ import annotations

import numpy as np

from .formats import BLOCK

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
