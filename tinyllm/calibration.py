"""Calibration for GPTQ rounding (ops.quant.gptq) and smoothing (tinyllm/smoothing.py): what each
projection's inputs look like.

GPTQ needs, for every projection W, the second moments H = Σ x xᵀ of the inputs x it multiplies;
smoothing needs the largest |x_j| of each input feature.
They are recorded while the float32 `reference` schedule reads a calibration text: the `linear` op
of its op table is wrapped, so every projection's input passes by (the unfused composites call
`linear` for Q, K, V, the MLP's gate, up and down, and the LM head). Projections that read the same
input (Q, K and V; gate and up) share one H.

The default text is tinyllm/texts.py::docstring_text, not the text `tinyllm eval` scores.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import TinyLLMError
from .schedule import apply, parse
from .texts import DEFAULT_WINDOW, windows


def projection_inputs(transformer) -> dict[int, str]:
    """id(weight) -> the checkpoint name of the H its inputs go to, for the projections whose inputs
    are recorded, as the prepared `reference` model holds them. Of the projections that share an input
    (Q, K, V; gate, up), only the first is here: the others get its H afterwards."""
    sites = {}
    for i, L in enumerate(transformer.layers):
        p = f"model.layers.{i}."
        sites[id(L.attn_in.wq)] = p + "self_attn.q_proj.weight"
        sites[id(L.wo)] = p + "self_attn.o_proj.weight"
        sites[id(L.mlp.gate)] = p + "mlp.gate_proj.weight"
        sites[id(L.mlp.down)] = p + "mlp.down_proj.weight"
    sites[id(transformer.head.weight)] = "lm_head.weight"
    return sites


@dataclass
class Calibration:
    """Per projection (checkpoint name), over its calibration inputs x (rows of K features):
    `hessian` H = Σ x xᵀ (float32, K x K) and `absmax` max |x_j| per feature (float32, K). Projections
    that share an input share the arrays."""
    hessian: dict[str, np.ndarray]
    absmax: dict[str, np.ndarray]
    tokens: int  # positions the model read (a last window of one token is not run)


def calibrate(transformer, ids: list[int], progress: bool = True) -> Calibration:
    """What each projection's inputs look like while the model reads `ids` in independent windows of
    DEFAULT_WINDOW tokens (or of its context, if shorter). The transformer is left on the `reference` schedule."""
    from tqdm import tqdm

    apply(transformer, parse("reference"))  # float32 everywhere (a quantised model is dequantised)
    sites = projection_inputs(transformer)
    shared = {"self_attn.q_proj": ("self_attn.k_proj", "self_attn.v_proj"), "mlp.gate_proj": ("mlp.up_proj",)}
    H, absmax = {}, {}
    plain = transformer.ops.linear

    def recording_linear(x, weight, bias=None):
        name = sites.get(id(weight))
        if name is not None:
            rows = x.reshape(-1, x.shape[-1])
            H[name] = H[name] + rows.T @ rows if name in H else rows.T @ rows
            peak = np.abs(rows).max(axis=0)
            absmax[name] = np.maximum(absmax[name], peak) if name in absmax else peak
        return plain(x, weight, bias)

    transformer.ops.linear = recording_linear
    try:
        chunks = windows(ids, min(DEFAULT_WINDOW, transformer.cfg.max_seq_len))
        for chunk in tqdm(chunks, desc="calibrating", unit="window", disable=None if progress else True):
            transformer.forward(np.asarray(chunk))
    finally:
        transformer.ops.linear = plain
    bad = next((name for name in H if not (np.all(np.isfinite(H[name])) and np.all(np.isfinite(absmax[name])))), None)
    if bad is not None:
        raise TinyLLMError(f"the calibration run met NaN or Inf at the input of {bad}: the model's weights or "
                           "activations are not finite")
    for name in list(H):
        for leader, followers in shared.items():
            if leader in name:
                for follower in followers:
                    H[name.replace(leader, follower)] = H[name]
                    absmax[name.replace(leader, follower)] = absmax[name]
    return Calibration(H, absmax, sum(len(c) for c in chunks))
