"""Quantised weights: the formats, the kernels that compute on them, and the variants that run them.

- formats.py: what each format stores, and its NumPy quantise/dequantise that define it.
- tiles.py: the row tiles the block formats' kernels read (64 rows side by side).
- prefill.py: many rows (prefill) on a quantised weight, BLAS on dequantised tiles; every prepared
  weight brings that product with it.
- int8.py, q8_0.py, q8_0_weights.py, q4.py (q4_0 and q4_1): each format's kernels, its prepared
  weight (the stored integers as its kernels read them) and its variants of the projection ops,
  `linear`, `swiglu_mlp`, `qkv_rope` and `norm_head`, registered where they are defined.
- projections.py: those ops' bodies and prepare steps, shared by the formats.
- reference.py: the quantised references every quantised variant is checked against.
- gptq.py: GPTQ rounding (codes chosen for the outputs, in the same formats).
"""
from . import int8, q8_0, q4, q8_0_weights  # noqa: F401  (registers the variants, in `tinyllm ops` order)
from .formats import (BLOCK, FORMATS, Int8, Q4_0, Q4_1, Q8_0, as_format, concat_rows, q8_blocks,
                      round_activations_q8, round_half_away, unpack_nibbles)
from .int8 import Int8Weight
from .q4 import Q4Weight
from .q8_0 import Q8_0Weight
from .q8_0_weights import Q8_0WeightOnly

# format name -> (the stored format, what the kernels read)
PREPARED = {"int8": (Int8, Int8Weight), "q8_0": (Q8_0, Q8_0Weight), "q4_0": (Q4_0, Q4Weight),
            "q4_1": (Q4_1, Q4Weight), "q8_0_weights": (Q8_0, Q8_0WeightOnly)}
assert set(FORMATS) <= set(PREPARED)

# the formats whose kernels round their activations too, per block of 32 (`ROUNDS_ACTIVATIONS`: q8_0's)
ACTIVATIONS_ROUNDED = tuple(name for name in FORMATS if PREPARED[name][1].ROUNDS_ACTIVATIONS)

__all__ = ["ACTIVATIONS_ROUNDED", "BLOCK", "FORMATS", "PREPARED", "Int8", "Int8Weight", "Q4_0", "Q4_1", "Q4Weight",
           "Q8_0", "Q8_0Weight", "Q8_0WeightOnly", "as_format", "concat_rows", "q8_blocks", "round_activations_q8",
           "round_half_away", "unpack_nibbles"]
