"""tinyllm's operators.

Every operator the model runs has a plain NumPy reference here, one file per op family, written to
read like the formula. The model never imports these functions directly: it asks an op table
(see `ops.registry`) for an op by name, so an optimised variant can be swapped in without touching
the model.
"""
from . import activation, attention, embedding, linear, norm, rope, sampling  # noqa: F401  (registers the ops)
from .registry import OPS, reference_table

__all__ = ["OPS", "reference_table"]
