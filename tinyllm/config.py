"""The model's hyperparameters, read from a Hugging Face `config.json`."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelError

# Architectures whose checkpoints are plain Llama blocks (RMSNorm, RoPE, GQA, SwiGLU) in the HF layout.
LLAMA_FAMILY = {"llama", "mistral"}
MAX_POSITIONS = 1 << 20  # 1M: the longest context of any Llama-family checkpoint we know of


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
        """The Config of a parsed config.json, or a ModelError naming the field that is missing or bad."""
        model_type = d.get("model_type", "llama")
        if not isinstance(model_type, str) or model_type not in LLAMA_FAMILY:
            raise ModelError(f"model_type {model_type!r} is not supported (tinyllm runs {sorted(LLAMA_FAMILY)})")
        if d.get("hidden_act", "silu") != "silu":
            raise ModelError(f"hidden_act {d['hidden_act']!r} is not supported (only silu)")
        n_heads, hidden = _field(d, "num_attention_heads", int), _field(d, "hidden_size", int)
        if n_heads < 1:
            raise ModelError(f"num_attention_heads must be at least 1, got {n_heads}")
        theta, scaling = _rope_fields(d)
        eos = d.get("eos_token_id")
        eos_ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
        if not all(type(i) is int for i in eos_ids):
            raise ModelError(f"eos_token_id must be an integer or a list of integers, got {eos!r}")
        cfg = cls(
            vocab_size=_field(d, "vocab_size", int),
            hidden_size=hidden,
            intermediate_size=_field(d, "intermediate_size", int),
            n_layers=_field(d, "num_hidden_layers", int),
            n_heads=n_heads,
            n_kv_heads=_field(d, "num_key_value_heads", int, default=n_heads),
            head_dim=_field(d, "head_dim", int, default=hidden // n_heads),
            max_seq_len=_field(d, "max_position_embeddings", int, default=2048),
            rms_norm_eps=_field(d, "rms_norm_eps", float, default=1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=tuple(eos_ids),
        )
        sizes = {"vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
                 "num_hidden_layers": cfg.n_layers, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
                 "max_position_embeddings": cfg.max_seq_len}
        for key, value in sizes.items():
            if value < 1:
                raise ModelError(f"{key} must be at least 1, got {value}")
        # The RoPE tables (and a full-context KV cache) are allocated for every position up front, so a
        # corrupt value must be refused here rather than become a multi-gigabyte allocation.
        if cfg.max_seq_len > MAX_POSITIONS:
            raise ModelError(f"max_position_embeddings is {cfg.max_seq_len}; tinyllm supports at most {MAX_POSITIONS}")
        if cfg.n_heads % cfg.n_kv_heads:
            raise ModelError(f"num_attention_heads ({cfg.n_heads}) is not a multiple of "
                             f"num_key_value_heads ({cfg.n_kv_heads})")
        if not cfg.rope_theta > 0:  # 0 would make every RoPE frequency infinite
            raise ModelError(f"rope_theta must be > 0, got {cfg.rope_theta}")
        if cfg.rms_norm_eps < 0:
            raise ModelError(f"rms_norm_eps must be >= 0, got {cfg.rms_norm_eps}")
        return cfg

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


_REQUIRED = object()


def _field(d: dict, key: str, kind: type, default=_REQUIRED, name: str | None = None):
    """`d[key]` converted by `kind` (int or float); absent or null: `default`. Anything missing, of the
    wrong type or not finite (a string, a list, 1e400) is a ModelError naming the field (as `name`,
    for a nested one)."""
    name = name or key
    value = d.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ModelError(f"the required field {name!r} is missing")
        return default
    try:
        if isinstance(value, bool) or not math.isfinite(float(value)):  # float(): TypeError for a list
            raise ValueError
        return kind(value)
    except (TypeError, ValueError, OverflowError):
        raise ModelError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}") from None


def _rope_fields(d: dict) -> tuple[float, dict | None]:
    """rope_theta, and the rope scaling (None when there is none), from either spelling: newer configs
    nest them in `rope_parameters`, older ones use top-level `rope_theta` and `rope_scaling`."""
    rope = d.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise ModelError(f"rope_parameters must be an object, got {rope!r}")
    theta = _field(rope, "rope_theta", float, default=None, name="rope_parameters.rope_theta")
    theta = _field(d, "rope_theta", float, default=10000.0) if theta is None else theta
    scaling = d.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling is None:
        return theta, None
    if not isinstance(scaling, dict):
        raise ModelError(f"rope_scaling must be an object, got {scaling!r}")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None
    # what ops.rope.rope_inv_freq implements, and the numbers it reads
    needs = {"linear": ["factor"],
             "llama3": ["factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"]}
    if kind not in needs:
        raise ModelError(f"rope scaling {kind!r} is not supported (default, linear, llama3)")
    for key in needs[kind]:
        _field(scaling, key, float, name=f"rope_scaling.{key}")  # present and a number
    if kind == "llama3" and scaling["low_freq_factor"] == scaling["high_freq_factor"]:
        raise ModelError("rope_scaling: low_freq_factor and high_freq_factor must differ")
    return theta, scaling


def read_json(file: Path) -> dict:
    """A JSON object from a model directory's file, or a one-line ModelError naming the file."""
    try:
        d = json.loads(Path(file).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ModelError(f"{file} must hold a JSON object, not a {type(d).__name__}")
    return d
