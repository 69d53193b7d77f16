"""The Llama forward pass, written against ops by name.

    x = embedding(tokens)
    for each layer:
        h = rmsnorm(x);  q, k, v = h Wq, h Wk, h Wv;  q, k = rope(q), rope(k)
        x = x + attention(q, k_cache, v_cache) Wo
        h = rmsnorm(x);  x = x + (silu(h Wgate) * (h Wup)) Wdown
    logits = rmsnorm(x) Wlm_head

Every operator comes from `self.ops`, an op table chosen by the scheduler, so this file never knows
which implementation runs. Everything is float32: NumPy 2 promotes float32 with a float64 *array or
np.float64 scalar* to float64, which would silently make decode many times slower, so the forward
pass asserts the dtype of what it returns.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ops.rope import rope_inv_freq, rope_tables

from .config import Config
from .errors import ModelError
from .loading import load_weights


@dataclass
class Layer:
    attn_norm: np.ndarray  # (D,)
    wq: np.ndarray  # (Hq*d, D)
    wk: np.ndarray  # (Hkv*d, D)
    wv: np.ndarray  # (Hkv*d, D)
    wo: np.ndarray  # (D, Hq*d)
    mlp_norm: np.ndarray  # (D,)
    w_gate: np.ndarray  # (F, D)
    w_up: np.ndarray  # (F, D)
    w_down: np.ndarray  # (D, F)
    bq: np.ndarray | None = None  # attention biases, present in a few Llama-family checkpoints
    bk: np.ndarray | None = None
    bv: np.ndarray | None = None
    bo: np.ndarray | None = None


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

    def __init__(self, cfg: Config, weights: dict[str, np.ndarray], ops):
        self.cfg = cfg
        self.ops = ops
        w = dict(weights)

        def take(name, shape=None, optional=False):
            if name not in w:
                if optional:
                    return None
                raise ModelError(f"the checkpoint has no tensor {name}")
            t = w.pop(name)
            if shape is not None and tuple(t.shape) != shape:
                raise ModelError(f"tensor {name} has shape {tuple(t.shape)}, config says {shape}")
            return np.ascontiguousarray(t, dtype=np.float32)

        D, F, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
        q_dim, kv_dim = cfg.n_heads * d, cfg.n_kv_heads * d
        self.embed = take("model.embed_tokens.weight", (cfg.vocab_size, D))
        self.layers = []
        for i in range(cfg.n_layers):
            p = f"model.layers.{i}."
            self.layers.append(Layer(
                attn_norm=take(p + "input_layernorm.weight", (D,)),
                wq=take(p + "self_attn.q_proj.weight", (q_dim, D)),
                wk=take(p + "self_attn.k_proj.weight", (kv_dim, D)),
                wv=take(p + "self_attn.v_proj.weight", (kv_dim, D)),
                wo=take(p + "self_attn.o_proj.weight", (D, q_dim)),
                mlp_norm=take(p + "post_attention_layernorm.weight", (D,)),
                w_gate=take(p + "mlp.gate_proj.weight", (F, D)),
                w_up=take(p + "mlp.up_proj.weight", (F, D)),
                w_down=take(p + "mlp.down_proj.weight", (D, F)),
                bq=take(p + "self_attn.q_proj.bias", (q_dim,), optional=True),
                bk=take(p + "self_attn.k_proj.bias", (kv_dim,), optional=True),
                bv=take(p + "self_attn.v_proj.bias", (kv_dim,), optional=True),
                bo=take(p + "self_attn.o_proj.bias", (D,), optional=True),
            ))
        self.norm = take("model.norm.weight", (D,))
        lm_head = take("lm_head.weight", (cfg.vocab_size, D), optional=True)
        if lm_head is None or cfg.tie_word_embeddings:
            lm_head = self.embed  # tied: the output projection is the embedding table
        self.lm_head = lm_head
        w.pop("model.rotary_emb.inv_freq", None)
        for i in range(cfg.n_layers):
            w.pop(f"model.layers.{i}.self_attn.rotary_emb.inv_freq", None)
        if w:
            raise ModelError(f"the checkpoint has tensors this Llama model does not use: {sorted(w)[:5]}")
        try:
            inv_freq = rope_inv_freq(d, cfg.rope_theta, cfg.rope_scaling)
        except (ValueError, KeyError) as e:
            raise ModelError(f"bad rope scaling in config.json: {e}") from None
        self.rope_cos, self.rope_sin = rope_tables(inv_freq, cfg.max_seq_len)

    @classmethod
    def from_dir(cls, path: Path, ops) -> "Transformer":
        cfg = Config.from_dir(path)
        return cls(cfg, load_weights(path), ops)

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
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        T, d = len(ids), cfg.head_dim
        end = start_pos + T
        if cache is not None and end > cache.max_len:
            raise ValueError(f"positions up to {end} do not fit in a cache of {cache.max_len}")
        if cache is None and start_pos != 0:
            raise ValueError("start_pos > 0 needs a cache holding the earlier positions")
        cos, sin = self.rope_cos[start_pos:end], self.rope_sin[start_pos:end]

        x = ops.embedding(self.embed, ids)  # (T, D)
        for i, L in enumerate(self.layers):
            h = ops.rmsnorm(x, L.attn_norm, cfg.rms_norm_eps)
            q = ops.linear(h, L.wq, L.bq).reshape(T, cfg.n_heads, d)
            k = ops.linear(h, L.wk, L.bk).reshape(T, cfg.n_kv_heads, d)
            v = ops.linear(h, L.wv, L.bv).reshape(T, cfg.n_kv_heads, d)
            q, k = ops.rope(q, cos, sin), ops.rope(k, cos, sin)
            if cache is None:
                keys, values = k.transpose(1, 0, 2), v.transpose(1, 0, 2)  # (Hkv, T, d)
            else:
                cache.k[i, :, start_pos:end] = k.transpose(1, 0, 2)
                cache.v[i, :, start_pos:end] = v.transpose(1, 0, 2)
                keys, values = cache.k[i, :, :end], cache.v[i, :, :end]
            a = ops.attention(q, keys, values, start_pos).reshape(T, cfg.n_heads * d)
            x = ops.add(x, ops.linear(a, L.wo, L.bo))

            h = ops.rmsnorm(x, L.mlp_norm, cfg.rms_norm_eps)
            g = ops.swiglu(ops.linear(h, L.w_gate), ops.linear(h, L.w_up))
            x = ops.add(x, ops.linear(g, L.w_down))
        if cache is not None:
            cache.length = end

        if last_only:
            x = x[-1:]
        logits = ops.linear(ops.rmsnorm(x, self.norm, cfg.rms_norm_eps), self.lm_head)
        assert logits.dtype == np.float32, f"the forward pass drifted to {logits.dtype}"
        return logits
