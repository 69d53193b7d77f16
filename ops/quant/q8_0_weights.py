"""q8_0_weights: Q8_0 weights with float32 activations (weight-only, like int8), the LM head of every
quantised preset (tinyllm/schedule.py::_kernel_presets says why). It reads the Q8_0 row tiles with
q8_0's kernel, its activation scales all ones.
"""
from __future__ import annotations

import numpy as np

from ..jit import NEEDS_NUMBA
from ..registry import variant
from .formats import BLOCK, Q8_0
from .prefill import PreparedWeight
from .projections import describe, norm_head_quantized, prepare_head
from .q8_0 import Q8_0Weight, matvec_q8_0_tiles
from .reference import norm_head_block_examples, norm_head_block_inputs, norm_head_dequantized


class Q8_0WeightOnly(Q8_0Weight):
    """Q8_0 weights, float32 activations. SmolLM2's head is its embedding, which the default model
    stores as Q8_0, so this head is exact there."""

    ROUNDS_ACTIVATIONS = False

    def matvec(self, x, out):
        x = np.ascontiguousarray(x)
        ones = np.ones((x.shape[0], self.d.shape[1]), dtype=np.float32)  # no activation scales
        matvec_q8_0_tiles(x.reshape(x.shape[0], -1, BLOCK), ones, self.tiles, self.d, out)

    round_activations = PreparedWeight.round_activations  # as they are


# ---------------------------------------------------------------------------------- the variant


@variant("norm_head", "q8_0_weights", prepare=prepare_head(Q8_0, Q8_0WeightOnly), weight_format="q8_0",
         reference=norm_head_dequantized, inputs=norm_head_block_inputs, examples=norm_head_block_examples,
         doc=describe(norm_head_quantized, "Q8_0 weights, float32 activations (the quantised presets' head)"),
         **NEEDS_NUMBA)
def norm_head_q8_0_weights(x, w, eps):
    return norm_head_quantized(x, w, eps)
