"""A Llama checkpoint's tensors as the forward pass's arguments.

A Hugging Face checkpoint names every tensor (`model.layers.7.self_attn.q_proj.weight`); the forward
pass (tinyllm/model.py) reads them as per-layer bundles (`Weights`) handed to its ops. This module
maps one onto the other, checking each tensor's shape against config.json, and says

- which tensors a checkpoint of a config has, and which are optional (biases, an untied head);
- which may be stored quantised, and which op reads each (projection_op, also used by `quantize`);
- which weight argument each op call reads (weight_sites), for the scheduler to prepare.

A tied LM head is the embedding table. A model saved by `tinyllm quantize` may store a quantised copy
of it as lm_head.weight, for schedules that read the head in that format; the float32 embedding stays
what every other schedule starts from (WeightSite.unquantized).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from ops.registry import Weights

from .config import Config
from .errors import ModelError, ModelWarning
from .schedule import WeightSite
from .stored import format_name


def checkpoint_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Llama checkpoint for `cfg`: Hugging Face name -> shape. The biases and an
    untied `lm_head.weight` are optional (is_optional_tensor); the rest are required."""
    D, F, d, V = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.vocab_size
    q_dim, kv_dim = cfg.n_heads * d, cfg.n_kv_heads * d
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,), "lm_head.weight": (V, D)}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (D,),
            p + "self_attn.q_proj.weight": (q_dim, D), p + "self_attn.q_proj.bias": (q_dim,),
            p + "self_attn.k_proj.weight": (kv_dim, D), p + "self_attn.k_proj.bias": (kv_dim,),
            p + "self_attn.v_proj.weight": (kv_dim, D), p + "self_attn.v_proj.bias": (kv_dim,),
            p + "self_attn.o_proj.weight": (D, q_dim), p + "self_attn.o_proj.bias": (D,),
            p + "post_attention_layernorm.weight": (D,),
            p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D), p + "mlp.down_proj.weight": (D, F),
        })
    return shapes


# The matrices a schedule may store quantised, and the op that reads each (tinyllm/quantize.py).
_PROJECTION_OPS = {"self_attn.q_proj.weight": "qkv_rope", "self_attn.k_proj.weight": "qkv_rope",
                   "self_attn.v_proj.weight": "qkv_rope", "self_attn.o_proj.weight": "linear",
                   "mlp.gate_proj.weight": "swiglu_mlp", "mlp.up_proj.weight": "swiglu_mlp",
                   "mlp.down_proj.weight": "swiglu_mlp"}


def projection_op(name: str) -> str | None:
    """The op that reads checkpoint tensor `name` if it is a projection (or the LM head), else None."""
    if name == "lm_head.weight":
        return "norm_head"
    return _PROJECTION_OPS.get(name.split(".", 3)[-1]) if name.startswith("model.layers.") else None


def is_optional_tensor(name: str) -> bool:
    """Biases (a few Llama-family checkpoints have them) and an untied output head."""
    return name.endswith(".bias") or name == "lm_head.weight"


def random_checkpoint(cfg: Config, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 values for every required tensor of `cfg` (small, finite): a model to run
    without a file, e.g. to compile or load the kernels before a real model is measured."""
    rng = np.random.default_rng(seed)
    return {name: rng.uniform(-0.5, 0.5, shape).astype(np.float32)
            for name, shape in checkpoint_shapes(cfg).items() if not is_optional_tensor(name)}


@dataclass
class Arguments:
    """A checkpoint as the forward pass reads it: the embedding table, each layer's fields (those of
    tinyllm/model.py::Layer), the final norm and LM head, and the float32 head a quantised tied head
    stands for (None unless the head is a quantised copy of the embedding)."""

    embed: np.ndarray
    layers: list[dict]
    head: Weights
    head_unquantized: Weights | None


def arguments(cfg: Config, weights: dict) -> Arguments:
    """The forward pass's arguments from `weights` (checkpoint name -> float32 array, or for a
    projection a stored format object (ops/quant/formats.py, read by tinyllm/stored.py), whose `.shape` is the float matrix's), each
    tensor checked against `cfg`. A tensor the model does not use is a ModelWarning."""
    w = dict(weights)
    # Checked before any table per layer is built: a corrupt num_hidden_layers (say 10^9) must be
    # this error, not an allocation proportional to it.
    last_layer = f"model.layers.{cfg.n_layers - 1}.input_layernorm.weight"
    if last_layer not in w:
        raise ModelError(f"the checkpoint has no tensor {last_layer} (num_hidden_layers is {cfg.n_layers})")
    shapes = checkpoint_shapes(cfg)

    def take(name):
        if name not in w:
            if is_optional_tensor(name):
                return None
            raise ModelError(f"the checkpoint has no tensor {name}")
        t = w.pop(name)
        if tuple(t.shape) != shapes[name]:
            raise ModelError(f"tensor {name} has shape {tuple(t.shape)}, config says {shapes[name]}")
        if format_name(t) is not None:  # stored quantised by `tinyllm quantize`: kept in its format
            if projection_op(name) is None:
                raise ModelError(f"tensor {name} is stored quantised ({format_name(t)}); only the projections "
                                 "and lm_head.weight may be")
            return t
        return np.ascontiguousarray(t, dtype=np.float32)

    embed = take("model.embed_tokens.weight")
    layers = []
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        layers.append(dict(
            attn_in=Weights(
                norm=take(p + "input_layernorm.weight"),
                wq=take(p + "self_attn.q_proj.weight"),
                wk=take(p + "self_attn.k_proj.weight"),
                wv=take(p + "self_attn.v_proj.weight"),
                bq=take(p + "self_attn.q_proj.bias"),
                bk=take(p + "self_attn.k_proj.bias"),
                bv=take(p + "self_attn.v_proj.bias")),
            wo=take(p + "self_attn.o_proj.weight"),
            bo=take(p + "self_attn.o_proj.bias"),
            mlp_norm=take(p + "post_attention_layernorm.weight"),
            mlp=Weights(gate=take(p + "mlp.gate_proj.weight"),
                        up=take(p + "mlp.up_proj.weight"),
                        down=take(p + "mlp.down_proj.weight")),
        ))
    norm = take("model.norm.weight")
    lm_head = take("lm_head.weight")
    head_unquantized = None
    if lm_head is None or cfg.tie_word_embeddings:  # tied: the output projection is the embedding table
        if format_name(lm_head) is None:
            lm_head = embed
        else:  # ... of which `tinyllm quantize` stored a quantised copy, for schedules reading that format
            head_unquantized = Weights(norm=norm, weight=embed)
    w.pop("model.rotary_emb.inv_freq", None)
    for i in range(cfg.n_layers):
        w.pop(f"model.layers.{i}.self_attn.rotary_emb.inv_freq", None)
    if w:  # e.g. a checkpoint saved with extra heads: runnable, but worth knowing about
        more = f" and {len(w) - 5} more" if len(w) > 5 else ""
        warnings.warn(f"ignoring {len(w)} tensor(s) of the checkpoint that this Llama model does not use: "
                      f"{', '.join(sorted(w)[:5])}{more}", ModelWarning, stacklevel=3)  # the caller of Transformer()
    return Arguments(embed, layers, Weights(norm=norm, weight=lm_head), head_unquantized)


def weight_sites(transformer, head_unquantized: Weights | None = None) -> list[WeightSite]:
    """Every weight argument of every op call of `transformer`'s forward pass, so a schedule can
    prepare them (tinyllm/schedule.py::apply)."""
    sites = [WeightSite("embedding", transformer, "embed", transformer.embed)]
    for L in transformer.layers:
        sites += [WeightSite("qkv_rope", L, "attn_in", L.attn_in), WeightSite("linear", L, "wo", L.wo),
                  WeightSite("swiglu_mlp", L, "mlp", L.mlp)]
    sites.append(WeightSite("norm_head", transformer, "head", transformer.head, unquantized=head_unquantized))
    return sites
