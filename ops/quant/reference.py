"""The quantised references, and the strategies and edge cases of the 32-block formats.

Each quantised variant is checked against its *quantised reference*: dequantise the prepared weights
(and, where its kernels round the activations, round them as ops/quant/formats.py::
round_activations_q8 does), then run the float32 reference op. So `check` measures the kernel
alone; what the rounding costs is measured by `tinyllm eval`.
"""
from __future__ import annotations

import numpy as np

from ..attention import _qkv_rope_inputs
from ..linear import _linear_inputs, _norm_head_inputs, linear
from ..mlp import _swiglu_mlp_inputs
from ..registry import OPS, Weights, reference_table
from ..rope import rope_inv_freq, rope_tables
from .formats import BLOCK, round_activations_q8


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


# -- edge cases for the 32-block formats: a zero block, ±max at block edges, rows of two blocks

def _block_matrix(rng, rows, cols):
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    w[0, :BLOCK] = 0  # an all-zero block
    w[-1, BLOCK - 1], w[-1, BLOCK] = 8.0, -8.0  # the largest magnitudes at a block's last/first element
    return w


def _block_activations():
    """The generator every op's edge cases draw from, K = two blocks, and 3 rows of activations."""
    rng = np.random.default_rng(7)
    K = 2 * BLOCK
    x = rng.standard_normal((3, K)).astype(np.float32)
    x[1, BLOCK:] = 0  # a zero block in the activations too
    return rng, K, x


def linear_block_examples():
    rng, K, x = _block_activations()
    return [(x, _block_matrix(rng, 5, K), None), (x[:1], _block_matrix(rng, 4, K), rng.standard_normal(4)
                                                   .astype(np.float32))]


def swiglu_mlp_block_examples():
    rng, K, x = _block_activations()
    return [(x, Weights(gate=_block_matrix(rng, K, K), up=_block_matrix(rng, K, K), down=_block_matrix(rng, K, K)))]


def norm_head_block_examples():
    rng, K, x = _block_activations()
    return [(x, Weights(norm=rng.standard_normal(K).astype(np.float32), weight=_block_matrix(rng, 50, K)), 1e-5)]


def qkv_rope_block_examples():
    rng, K, x = _block_activations()
    d = 4
    w = Weights(norm=rng.standard_normal(K).astype(np.float32), bq=None, bk=None, bv=None,
                wq=_block_matrix(rng, 4 * d, K), wk=_block_matrix(rng, 2 * d, K), wv=_block_matrix(rng, 2 * d, K))
    cos, sin = rope_tables(rope_inv_freq(d, 1e4), 3, start=2)
    return [(x, w, cos, sin, 1e-5), (x[:1], w, cos[:1], sin[:1], 1e-5)]


# -- strategies for the 32-block formats: the float ops' own, with dot products a multiple of 32 long

def linear_block_inputs():
    return _linear_inputs(BLOCK)


def swiglu_mlp_block_inputs():
    return _swiglu_mlp_inputs(BLOCK)


def norm_head_block_inputs():
    return _norm_head_inputs(BLOCK)


def qkv_rope_block_inputs():
    return _qkv_rope_inputs(BLOCK)
