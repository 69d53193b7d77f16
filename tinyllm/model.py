"""The Llama forward pass, written against ops by name.

    x = embedding(tokens)
    for each layer:
        q, k, v = rope(rmsnorm(x) Wq), rope(rmsnorm(x) Wk), rmsnorm(x) Wv      qkv_rope
        x = x + attention(q, k_cache, v_cache) Wo;  h = rmsnorm(x)            attention, linear, add_rmsnorm
        x = x + (silu(h Wgate) * (h Wup)) Wdown                              swiglu_mlp, add
    logits = rmsnorm(x) Wlm_head                                             norm_head

Every operator comes from `self.ops`, an op table chosen by the scheduler, so this file never knows
which implementation runs; which checkpoint tensor is which argument is tinyllm/checkpoint.py's
business. Where several steps are planned to run as one fused kernel, the model calls the composite op (`qkv_rope`, `add_rmsnorm`, `swiglu_mlp`, `norm_head`); unfused, a composite
runs its steps as the scheduled primitive ops.

Everything is float32: NumPy 2 promotes float32 with a float64 *array or np.float64 scalar* to
float64, which would silently make decode many times slower, so the forward pass asserts the dtype
of what it returns.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ops.registry import OpTable, Weights, reference_table
from ops.rope import rope_inv_freq, rope_tables

from . import checkpoint
from .config import Config
from .errors import ModelError
from .loading import load_weights


@dataclass
class Layer:
    attn_in: Weights  # norm (D,), wq (Hq*d, D), wk/wv (Hkv*d, D), biases bq/bk/bv or None: for qkv_rope
    wo: np.ndarray  # (D, Hq*d)
    bo: np.ndarray | None  # attention output bias, present in a few Llama-family checkpoints
    mlp_norm: np.ndarray  # (D,)
    mlp: Weights  # gate (F, D), up (F, D), down (D, F): for swiglu_mlp


class KVCache:
    """Keys and values of every position seen so far, per layer, laid out (Hkv, position, d) so
    that each KV head's history is one contiguous matrix for the attention matmuls."""

    def __init__(self, cfg: Config, max_len: int):
        shape = (cfg.n_layers, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = np.zeros(shape, dtype=np.float32)
        self.v = np.zeros(shape, dtype=np.float32)
        self.max_len = max_len
        self.length = 0  # positions filled


class Transformer:
    """Weights plus the forward pass. `forward(ids, start_pos, cache)` is the one entry point."""

    def __init__(self, cfg: Config, weights: dict[str, np.ndarray], ops: OpTable | None = None):
        """`weights`: checkpoint name -> float32 array, or for a projection a quantised matrix as
        stored by `tinyllm quantize` (tinyllm/stored.py)."""
        self.cfg = cfg
        self.ops = ops or reference_table()  # tinyllm.schedule.apply() sets the schedule's table
        found = checkpoint.arguments(cfg, weights)
        self.embed, self.head = found.embed, found.head
        self.layers = [Layer(**fields) for fields in found.layers]
        inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)  # Config checked the scaling
        self.rope_cos, self.rope_sin = rope_tables(inv_freq, cfg.max_seq_len)
        self.weight_sites = checkpoint.weight_sites(self, found.head_unquantized)  # what a schedule prepares

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

        with ops.forward_pass(T):  # how the schedule's kernels share the cores for T rows (ops/registry.py)
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
