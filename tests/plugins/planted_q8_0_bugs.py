"""q8_0 variants that forget to round their activations, planted to prove that the q8_0 rules' allowance
for flipped roundings does not hide that bug (tests/test_registry.py). Each is registered as variant
`planted_unrounded` of its op, judged as the real q8_0 variant is (its prepare step, quantised reference,
rule, inputs and edge cases), and computes the real quantised reference with one rounding left out."""
import numpy as np

from ops import VARIANTS, variant
from ops.linear import linear
from ops.quant.reference import _dequantized_table, qkv_rope_dequantized
from ops.registry import OPS, reference_table


def like_q8_0(op_name):
    v = VARIANTS[op_name]["q8_0"]
    return variant(op_name, "planted_unrounded", prepare=v.prepare, weight_format=v.weight_format, rule=v.rule,
                   reference=v.reference, inputs=v.inputs, examples=v.examples)


def unrounded(x, weight, bias=None):
    """linear on the dequantised weight, the activations as they are (the planted bug)."""
    return linear(x, weight.fmt.dequantize(), bias)


@like_q8_0("qkv_rope")
def qkv_rope_unrounded(x, w, cos, sin, eps):
    """The normalised row is not rounded before the Q/K/V projections."""
    raw = w.replace(wqkv=type("Unrounded", (), {"ROUNDS_ACTIVATIONS": False, "fmt": w.wqkv.fmt})())
    return qkv_rope_dequantized(x, raw, cos, sin, eps)


@like_q8_0("swiglu_mlp")
def swiglu_mlp_down_unrounded(h, w):
    """gate and up round h; the down projection does not round silu(gate)·up."""
    table = _dequantized_table()
    a = table.swiglu(table.linear(h, w.gate), table.linear(h, w.up))
    return unrounded(a, w.down)


@like_q8_0("norm_head")
def norm_head_unrounded(x, w, eps):
    """The normalised rows are not rounded before the head."""
    table = reference_table()
    table.linear = unrounded
    return OPS["norm_head"].reference(table, x, w, eps)
