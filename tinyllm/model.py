"""The Llama forward pass, written against ops by name.

    x = embedding(tokens)
    for each layer:
        q, k, v = rope(rmsnorm(x) Wq), rope(rmsnorm(x) Wk), rmsnorm(x) Wv      qkv_rope
        x = x + attention(q, k_cache, v_cache) Wo;  h = rmsnorm(x)            attention, linear, add_rmsnorm
        x = x + (silu(h Wgate) * (h Wup)) Wdown                              swiglu_mlp, add
    logits = rmsnorm(x) Wlm_head                                             norm_head

Every operator comes from `self.ops`, an op table chosen by the scheduler, so this file never knows
which implementation runs. Where several steps are planned to run as one fused kernel, the model
calls the composite op (`qkv_rope`, `add_rmsnorm`, `swiglu_mlp`, `norm_head`); unfused, a composite
runs its steps as the scheduled primitive ops.

Everything is float32: NumPy 2 promotes float32 with a float64 *array or np.float64 scalar* to
float64, which would silently make decode many times slower, so the forward pass asserts the dtype
of what it returns.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ops.registry import OpTable, Weights, reference_table
from ops.rope import rope_inv_freq, rope_tables
from ops.threads import split_products

from .config import Config
from .errors import ModelError, ModelWarning
from .loading import load_weights
from .quantize import format_name


@dataclass
class Layer:
    attn_in: Weights  # norm (D,), wq (Hq*d, D), wk/wv (Hkv*d, D), biases bq/bk/bv or None: for qkv_rope
    wo: np.ndarray  # (D, Hq*d)
    bo: np.ndarray | None  # attention output bias, present in a few Llama-family checkpoints
    mlp_norm: np.ndarray  # (D,)
    mlp: Weights  # gate (F, D), up (F, D), down (D, F): for swiglu_mlp


@dataclass
class WeightSite:
    """One weight argument of one op call in the forward pass (`owner.attr`), with the raw value it
    was loaded as: float32, or for a model saved by `tinyllm quantize` its projections in their
    ops/quant.py formats. The scheduler replaces `owner.attr` by what the chosen variant's prepare
    step makes of `raw`, and `key` records which preparation it holds. `unquantized`: the float32
    value a quantised `raw` stands for where that is not its dequantised values (a tied head stored
    quantised: the embedding); None otherwise. `copied`: for each loaded array of `raw` that the
    installed value holds as a huge-page copy (tinyllm/loading.py::huge_page_copies), id(copy) -> that
    loaded array, so `info` can tell a moved weight from one a prepare step made."""

    op: str
    owner: object
    attr: str
    raw: object
    key: tuple | None = None
    unquantized: object = None
    copied: dict = field(default_factory=dict)


class KVCache:
    """Keys and values of every position seen so far, per layer, laid out (Hkv, position, d) so
    that each KV head's history is one contiguous matrix for the attention matmuls."""

    def __init__(self, cfg: Config, max_len: int):
        shape = (cfg.n_layers, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = np.zeros(shape, dtype=np.float32)
        self.v = np.zeros(shape, dtype=np.float32)
        self.max_len = max_len
        self.length = 0  # positions filled


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


class Transformer:
    """Weights plus the forward pass. `forward(ids, start_pos, cache)` is the one entry point."""

    def __init__(self, cfg: Config, weights: dict[str, np.ndarray], ops: OpTable | None = None):
        """`weights`: checkpoint name -> float32 array, or for a projection an ops/quant.py format object
        (a model saved by `tinyllm quantize`), whose `.shape` is the float matrix's."""
        self.cfg = cfg
        self.ops = ops or reference_table()  # tinyllm.schedule.apply() sets the schedule's table
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

        self.embed = take("model.embed_tokens.weight")
        self.layers = []
        for i in range(cfg.n_layers):
            p = f"model.layers.{i}."
            self.layers.append(Layer(
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
                lm_head = self.embed
            else:  # ... of which `tinyllm quantize` stored a quantised copy, for schedules reading that format
                head_unquantized = Weights(norm=norm, weight=self.embed)
        self.head = Weights(norm=norm, weight=lm_head)
        w.pop("model.rotary_emb.inv_freq", None)
        for i in range(cfg.n_layers):
            w.pop(f"model.layers.{i}.self_attn.rotary_emb.inv_freq", None)
        if w:  # e.g. a checkpoint saved with extra heads: runnable, but worth knowing about
            more = f" and {len(w) - 5} more" if len(w) > 5 else ""
            warnings.warn(f"ignoring {len(w)} tensor(s) of the checkpoint that this Llama model does not use: "
                          f"{', '.join(sorted(w)[:5])}{more}", ModelWarning, stacklevel=2)
        inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)  # Config checked the scaling
        self.rope_cos, self.rope_sin = rope_tables(inv_freq, cfg.max_seq_len)
        # Every weight argument of every op call, so a schedule can prepare them (see tinyllm.schedule).
        self.weight_sites = [WeightSite("embedding", self, "embed", self.embed)]
        for L in self.layers:
            self.weight_sites += [WeightSite("qkv_rope", L, "attn_in", L.attn_in), WeightSite("linear", L, "wo", L.wo),
                                  WeightSite("swiglu_mlp", L, "mlp", L.mlp)]
        self.weight_sites.append(WeightSite("norm_head", self, "head", self.head, unquantized=head_unquantized))

    @classmethod
    def from_dir(cls, path: Path, ops: OpTable | None = None, check_numerics: bool = False) -> "Transformer":
        cfg = Config.from_dir(path)
        weights = load_weights(path, check_numerics)
        try:
            return cls(cfg, weights, ops)
        except ModelError as e:  # the checkpoint disagrees with config.json: say which model
            raise ModelError(f"{path}: {e}") from None

    def new_cache(self, max_len: int | None = None) -> KVCache:
        return KVCache(self.cfg, min(max_len or self.cfg.max_seq_len, self.cfg.max_seq_len))

    def forward(self, ids, start_pos: int = 0, cache: KVCache | None = None, last_only: bool = False) -> np.ndarray:
        """Logits (T, vocab) for tokens `ids` at positions start_pos .. start_pos+T-1.

        `last_only`: compute the logits of the last position only, shape (1, vocab) -- all that
        generation needs after a prefill, and it skips most of the LM head's work.

        With a cache, the keys/values of earlier positions come from it and this call's are appended;
        without one, `ids` is the whole sequence (start_pos must be 0).
        """
        ops, cfg = self.ops, self.cfg
        eps = cfg.rms_norm_eps
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        T, d = len(ids), cfg.head_dim
        end = start_pos + T
        if cache is not None and end > cache.max_len:
            raise ValueError(f"positions up to {end} do not fit in a cache of {cache.max_len}")
        if cache is None and start_pos != 0:
            raise ValueError("start_pos > 0 needs a cache holding the earlier positions")
        cos, sin = self.rope_cos[start_pos:end], self.rope_sin[start_pos:end]

        with split_products(ops, T):  # a quantised prefill gives each core its own rows (ops/threads.py)
            x = ops.embedding(self.embed, ids)  # (T, D)
            for i, L in enumerate(self.layers):
                q, k, v = ops.qkv_rope(x, L.attn_in, cos, sin, eps)  # rmsnorm -> Q/K/V projections -> RoPE
                if cache is None:
                    keys, values = k.transpose(1, 0, 2), v.transpose(1, 0, 2)  # (Hkv, T, d)
                else:
                    cache.k[i, :, start_pos:end] = k.transpose(1, 0, 2)
                    cache.v[i, :, start_pos:end] = v.transpose(1, 0, 2)
                    keys, values = cache.k[i, :, :end], cache.v[i, :, :end]
                a = ops.attention(q, keys, values, start_pos).reshape(T, cfg.n_heads * d)
                x, h = ops.add_rmsnorm(x, ops.linear(a, L.wo, L.bo), L.mlp_norm, eps)  # residual, then norm
                x = ops.add(x, ops.swiglu_mlp(h, L.mlp))  # residual around the SwiGLU MLP
            if cache is not None:
                cache.length = end

            if last_only:
                x = x[-1:]
            logits = ops.norm_head(x, self.head, eps)  # final rmsnorm -> LM head
        assert logits.dtype == np.float32, f"the forward pass drifted to {logits.dtype}"
        return logits
