"""tinyllm's operators.

Every operator the model runs has a plain NumPy reference here, one file per op family, written to
read like the formula, with its optimised variants beside it. The model never imports these
functions: it calls ops by name on an op table (see `ops.registry`), so a variant can be swapped in
without touching the model.
"""
# Imported in the order the model runs them, which is the order `tinyllm ops` lists them in.
from . import embedding, norm, linear, rope, attention, mlp, sampling  # noqa: F401,I001  (declares the ops)
from . import quant  # noqa: F401,E402  (quantised weights: formats, kernels, variants of the projection ops)
from .registry import OPS, VARIANTS, OpTable, Weights, op, reference_table, variant

__all__ = ["OPS", "VARIANTS", "OpTable", "Weights", "op", "variant", "reference_table"]
