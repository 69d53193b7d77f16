"""Smoothing: moving the activations' outliers into the weights before a format rounds activations.

q8_0 rounds each projection's *input* to 8 bits per block of 32 values (ops.quant). A few input
features of this model are far larger than the rest (the normed residual stream has outlier
channels; the MLP's down projection sees values near 2800), and in a block that holds one, the
other 31 values round to a handful of levels, or to 0. Smoothing (Xiao et al., 2022, "SmoothQuant",
arXiv:2211.10438) divides input feature j by s_j and multiplies the weights' column j by s_j, which
leaves every product the same:

    W x = (W diag(s)) (diag(s)⁻¹ x),     s_j = max|x_j|^α / max|W[:, j]|^(1-α)

With α = 0.5 the outliers are shared evenly between activations and weights; the weights, rounded
once and carefully (GPTQ), take their share better than activations rounded on the fly. (A small α is
not "almost off": as α -> 0, s_j -> 1 / max|W_j|, which rescales every weight column to a largest
value of 1. α = 0 means no smoothing at all.) The division
costs nothing at run time, because it folds into what makes the input:

- the attention's Q/K/V input is rmsnorm(x)·γ: γ_j / s_j (input_layernorm.weight);
- the MLP's gate/up input is rmsnorm(x)·γ: γ_j / s_j (post_attention_layernorm.weight);
- the down projection's input is silu(gate)·up: row j of up_proj / s_j.

The attention output projection is left alone: its input is a mix of V's rows shared by several
query heads (grouped-query attention), so its features cannot be scaled one by one through V.
The result is an ordinary model directory: norms and matrices changed, the same function up to
float32 rounding. max|x_j| comes from the calibration run (tinyllm/calibration.py).
"""
from __future__ import annotations

import numpy as np

DEFAULT_ALPHA = 0.5  # SmoothQuant's default migration strength (not tuned on the eval text)

# site -> (the op whose input it is, the matrices that read the input, where 1/s is folded)
SITES = {
    "attention input": ("qkv_rope", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                        "input_layernorm"),
    "MLP input": ("swiglu_mlp", ("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm"),
    "down-projection input": ("swiglu_mlp", ("mlp.down_proj",), "mlp.up_proj rows"),
}


DEAD = 1e-6  # a feature whose inputs (or weights) stay below this share of the largest is left alone


def smoothing_scales(x_absmax: np.ndarray, w_absmax: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = max|x_j|^α / max|W_j|^(1-α); 1 for a feature whose inputs or weights are (nearly) always 0:
    dividing by a tiny s_j would blow its fold (a row of up_proj) past float16's range."""
    x, w = x_absmax.astype(np.float64), w_absmax.astype(np.float64)
    live = (x > DEAD * x.max(initial=0)) & (w > DEAD * w.max(initial=0))
    s = np.ones_like(x)
    s[live] = x[live] ** alpha / w[live] ** (1 - alpha)
    return s.astype(np.float32)


def smooth(weights: dict, n_layers: int, calibration, sites: list[str], alpha: float) -> None:
    """Smooth `sites` (keys of SITES) of every layer: `weights` (checkpoint name -> float32 array) get
    their new arrays, and `calibration`'s Hessians and maxima become those of the scaled inputs
    (H -> S⁻¹ H S⁻¹, max|x| -> max|x| / s), so that GPTQ rounds for the inputs the model will see."""
    for i in range(n_layers):
        p = f"model.layers.{i}."
        for site in sites:
            _, matrices, fold = SITES[site]
            names = [f"{p}{m}.weight" for m in matrices]
            w_absmax = np.max([np.abs(weights[n]).max(axis=0) for n in names], axis=0)
            s = smoothing_scales(calibration.absmax[names[0]], w_absmax, alpha)
            for n in names:
                weights[n] = weights[n] * s  # column j times s_j
            if fold == "mlp.up_proj rows":  # (Llama checkpoints have no MLP biases, so no bias to divide)
                up = f"{p}mlp.up_proj.weight"
                weights[up] = weights[up] / s[:, None]
            else:
                weights[f"{p}{fold}.weight"] = weights[f"{p}{fold}.weight"] / s
            hessian = calibration.hessian[names[0]] / s[:, None] / s[None, :]
            absmax = calibration.absmax[names[0]] / s
            for n in names:
                calibration.hessian[n], calibration.absmax[n] = hessian, absmax
