"""GPTQ: rounding a weight matrix to a format's grid so that its *outputs* stay close, not each weight.

Round-to-nearest (each format's `quantize` in ops/quant/formats.py) picks every integer code on its own.
What the model feels is the error of a projection's output y = W x over the inputs x it sees. With
H = Σ x xᵀ summed over calibration inputs (K x K), a weight error E (N x K) costs

    Σ_x ||E x||² = tr(E H Eᵀ)        (row by row: e_i H e_iᵀ)

GPTQ (Frantar, Ashkboos, Hoefler and Alistarh, 2022, arXiv:2210.17323) rounds the columns one at a
time; after rounding column j it moves that column's error onto the columns not yet rounded, in the
proportions that minimise tr(E H Eᵀ) given the roundings so far (the Optimal Brain Surgeon update).
With U the upper Cholesky factor of H⁻¹ (H⁻¹ = Uᵀ U, rows and columns in rounding order):

    e = (w_j - q_j) / U_jj          W[:, j+1:] -= e ⊗ U[j, j+1:]

so rounding column j needs only row j of U. The columns go in order of decreasing H_jj (largest
inputs first, the paper's "act order"): the columns whose error costs most are rounded while the
most columns are left to compensate them. The updates inside a block of BLOCK_COLUMNS columns are
rank-1; the rest of the matrix gets the block's errors in one matrix product.

The format's scales (and minimums) are fixed first, by its own round-to-nearest `quantize`; GPTQ only
chooses the codes. The result is in exactly the same format, read by the same kernels. A diagonal H
(uncorrelated inputs) carries no error between columns and gives round-to-nearest on that grid.
"""
from __future__ import annotations

import numpy as np

from .formats import round_half_away

BLOCK_COLUMNS = 128  # columns whose updates are applied one by one before the rest is updated at once
DAMPING = 0.01  # added to H's diagonal, times its mean: keeps H⁻¹ well conditioned (the paper's choice)


def gptq_quantize(w: np.ndarray, hessian: np.ndarray, fmt):
    """`w` (N, K) in format `fmt` (a class of ops/quant/formats.py), its codes chosen by GPTQ for inputs whose
    second moments are `hessian` (K, K): Σ x xᵀ over the calibration inputs (any positive multiple)."""
    w = np.asarray(w, dtype=np.float32)
    start = fmt.quantize(w)  # the scales, and the codes' range, are the format's own
    step, offset = start.grid()
    lo, hi = fmt.LEVELS
    order, U = _rounding_order_and_factor(hessian)
    # Columns as rows (K, N): column j of W is then contiguous.
    W, S, O = (np.ascontiguousarray(a.T[order], dtype=np.float32) for a in (w, step, offset))
    codes = np.empty(W.shape, dtype=np.float32)
    K = len(W)
    for b0 in range(0, K, BLOCK_COLUMNS):
        b1 = min(b0 + BLOCK_COLUMNS, K)
        errors = np.empty((b1 - b0, W.shape[1]), dtype=np.float32)
        for j in range(b0, b1):
            codes[j] = _nearest_codes(W[j], S[j], O[j], lo, hi)
            e = (W[j] - (S[j] * codes[j] + O[j])) / U[j, j]
            W[j + 1:b1] -= U[j, j + 1:b1, None] * e[None, :]
            errors[j - b0] = e
        W[b1:] -= U[b0:b1, b1:].T @ errors
    out = np.empty_like(codes)
    out[order] = codes
    return start.with_codes(out.T)


def _nearest_codes(w: np.ndarray, step: np.ndarray, offset: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """The code of the grid value nearest to each w (code 0 where the step is 0: an all-zero block)."""
    t = np.divide(w - offset, step, out=np.zeros_like(w), where=step != 0)
    return np.clip(round_half_away(t), lo, hi)


def _rounding_order_and_factor(hessian: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The columns' rounding order (decreasing H_jj), and U, the upper Cholesky factor of the damped
    H⁻¹ in that order, as float32. An input that was always 0 (H_jj = 0) gets H_jj = 1: its weights
    never meet a nonzero input, so they are rounded to nearest and carry nothing to the others."""
    H = np.array(hessian, dtype=np.float64)
    if H.ndim != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"the Hessian must be square, got shape {H.shape}")
    diag = np.diag(H).copy()
    dead = diag <= 0
    H[dead, :] = 0
    H[:, dead] = 0
    H[dead, dead] = 1
    order = np.argsort(-np.diag(H), kind="stable")
    H = H[order][:, order]
    H[np.diag_indices_from(H)] += DAMPING * np.mean(np.diag(H))
    L = np.linalg.cholesky(np.linalg.inv(H))  # H⁻¹ = L Lᵀ, so U = Lᵀ
    return order, np.ascontiguousarray(L.T, dtype=np.float32)
