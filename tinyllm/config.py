"""The model's hyperparameters, read from a Hugging Face `config.json`."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelError

# Architectures whose checkpoints are plain Llama blocks (RMSNorm, RoPE, GQA, SwiGLU) in the HF layout.
LLAMA_FAMILY = {"llama", "mistral"}


@dataclass(frozen=True)
class Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    max_seq_len: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """The Config of a parsed config.json, or a ModelError saying which field is missing or bad."""
        model_type = d.get("model_type", "llama")
        if not isinstance(model_type, str) or model_type not in LLAMA_FAMILY:
            raise ModelError(f"model_type {model_type!r} is not supported (tinyllm runs {sorted(LLAMA_FAMILY)})")
        if d.get("hidden_act", "silu") != "silu":
            raise ModelError(f"hidden_act {d['hidden_act']!r} is not supported (only silu)")
        try:
            cfg = cls._from_fields(d)
        except KeyError as e:
            raise ModelError(f"the required field {e} is missing") from None
        except (TypeError, ValueError, AttributeError, ZeroDivisionError) as e:
            raise ModelError(f"a field has a bad value ({type(e).__name__}: {e})") from None
        sizes = {"vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
                 "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
                 "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
                 "max_position_embeddings": cfg.max_seq_len}
        for key, value in sizes.items():
            if value < 1:
                raise ModelError(f"{key} must be at least 1, got {value}")
        if cfg.n_heads % cfg.n_kv_heads:
            raise ModelError(f"num_attention_heads ({cfg.n_heads}) is not a multiple of "
                             f"num_key_value_heads ({cfg.n_kv_heads})")
        return cfg

    @classmethod
    def _from_fields(cls, d: dict) -> "Config":
        """The Config the fields of `d` describe; raises KeyError/ValueError/... for missing or bad ones."""
        n_heads = int(d["num_attention_heads"])
        hidden = int(d["hidden_size"])
        # Newer configs nest the rope settings in `rope_parameters`; older ones use `rope_theta`.
        rope = d.get("rope_parameters") or {}
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        scaling = d.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling is not None else "default"
        if kind == "default":
            scaling = None
        elif kind not in ("linear", "llama3"):  # what ops.rope.rope_inv_freq implements
            raise ModelError(f"rope scaling {kind!r} is not supported (default, linear, llama3)")
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            vocab_size=int(d["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(d["intermediate_size"]),
            n_layers=int(d["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(d.get("num_key_value_heads") or n_heads),
            head_dim=int(d.get("head_dim") or hidden // n_heads),
            max_seq_len=int(d.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=scaling,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_dir(cls, path: Path) -> "Config":
        file = Path(path) / "config.json"
        if not file.exists():
            raise ModelError(f"{path} is not a model directory: it has no config.json")
        fields = read_json(file)
        try:
            return cls.from_dict(fields)
        except ModelError as e:  # say which file holds the bad field
            raise ModelError(f"{file}: {e}") from None


def read_json(file: Path) -> dict:
    """A JSON object from a model directory's file, or a one-line ModelError naming the file."""
    try:
        d = json.loads(Path(file).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ModelError(f"{file} must hold a JSON object, not a {type(d).__name__}")
    return d
