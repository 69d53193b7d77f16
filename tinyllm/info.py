"""`python -m tinyllm info`: what a loaded model is, what it holds in memory, and what runs it."""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from ops.registry import OPS

from .config import read_json


def describe(model) -> str:
    """A report on `model` (a tinyllm Model, loaded with its schedule) as lines of text."""
    return "\n".join([f"model: {model.path}", *_architecture(model), *_parameters(model), *_memory(model),
                      *_tokenizer(model), *_ops(model)])


def _architecture(model) -> list[str]:
    c, raw = model.config, read_json(model.path / "config.json")
    names = ", ".join(raw.get("architectures") or []) or "?"
    scaling = c.rope_scaling.get("rope_type", c.rope_scaling.get("type", "?")) if c.rope_scaling else "none"
    return [
        f"architecture: {raw.get('model_type', 'llama')} ({names})",
        f"  layers {c.n_layers}, hidden size {c.hidden_size}, MLP size {c.intermediate_size}, "
        f"attention heads {c.n_heads} (key/value heads {c.n_kv_heads}, head dim {c.head_dim})",
        f"  vocabulary {c.vocab_size}, context {c.max_seq_len} tokens, RMSNorm eps {c.rms_norm_eps:g}, "
        f"RoPE theta {c.rope_theta:g} (scaling: {scaling}), tied embeddings: {_yes(c.tie_word_embeddings)}",
    ]


def parameter_count(model) -> int:
    """Numbers in the model's weights as loaded, each tensor once (a tied output head is the embedding)."""
    return sum(a.size for a in _unique(_loaded_arrays(model)))


def _parameters(model) -> list[str]:
    n = parameter_count(model)
    return [f"parameters: {n:,} ({n / 1e6:.3g} M)"]


def _memory(model) -> list[str]:
    """Bytes per number format: loaded weights the schedule still reads, what its prepare steps made
    (copies such as a concatenated Q/K/V matrix), and loaded weights that such copies replaced."""
    loaded = _unique(_loaded_arrays(model))
    site_ops = {(id(s.owner), s.attr): s.op for s in model.transformer.weight_sites}
    installed = defaultdict(list)  # "op=variant" whose (prepared) weights the model calls it with -> arrays
    for owner, name in _weight_fields(model):
        op = site_ops.get((id(owner), name), "unprepared")
        label = f"{op}={model.schedule.choice[op]}" if op in model.schedule.choice else op
        installed[label] += _arrays_in(getattr(owner, name))
    everything_installed = _unique([a for arrays in installed.values() for a in arrays])
    read = [a for a in loaded if any(np.may_share_memory(a, b) for b in everything_installed)]
    replaced = [a for a in loaded if not any(a is r for r in read)]
    lines = [f"weights in memory (schedule {model.schedule.spec}):"]
    lines += [f"  {dtype:<8} {_mib(n)}  loaded weights it reads" for dtype, n in _bytes_by_dtype(read).items()]
    for label, arrays in installed.items():
        made = [a for a in _unique(arrays) if not any(np.may_share_memory(a, b) for b in loaded)]
        lines += [f"  {dtype:<8} {_mib(n)}  made by {label}'s prepare step"
                  for dtype, n in _bytes_by_dtype(made).items()]
    if replaced:
        lines.append(f"  (not held: {_mib(sum(a.nbytes for a in replaced)).strip()} of loaded weights that prepared "
                     "copies replace; they stay mapped from the file and are read again if a schedule needs them)")
    return lines


def _tokenizer(model) -> list[str]:
    tok = model.tokenizer
    specials = ", ".join(f"{text} ({i})" for i, text in tok.special_tokens().items()) or "none"
    template = tok.chat_template
    return [
        f"tokenizer: {tok.vocab_size} tokens; BOS {tok.bos_token or 'none'}, EOS {tok.eos_token or 'none'}; "
        f"generation stops at token ids {sorted(model.stop_ids) or 'none'}",
        f"  special tokens: {specials}",
        f"chat template: {'yes (' + str(len(template)) + ' characters)' if template else 'none (use generate --raw)'}",
    ]


def _ops(model) -> list[str]:
    width = max(map(len, OPS))
    lines = [f"ops (schedule {model.schedule.spec}):"]
    for name, op in OPS.items():
        steps = f"  ({' → '.join(op.composite)})" if op.is_composite else ""
        inside = f"  (inside {op.inside}, which the model calls: scheduling it alone changes nothing)" if op.inside else ""
        lines.append(f"  {name:<{width}}  {model.schedule.choice[name]}{steps}{inside}")
    return lines


# ------------------------------------------------------------------------------------------ helpers


def _weight_fields(model) -> list[tuple[object, str]]:
    """Every (owner, attribute) of the transformer that holds weights: the embedding, each layer's
    fields, the output head. Weight sites are among them; norms the model passes unprepared too."""
    t = model.transformer
    return [(t, "embed"), *((L, name) for L in t.layers for name in vars(L)), (t, "head")]


def _loaded_arrays(model) -> list[np.ndarray]:
    """The weights as loaded from the checkpoint (before any prepare step)."""
    raw = {(id(s.owner), s.attr): s.raw for s in model.transformer.weight_sites}
    return [a for owner, name in _weight_fields(model)
            for a in _arrays_in(raw.get((id(owner), name), getattr(owner, name)))]


def _arrays_in(value) -> list[np.ndarray]:
    """The NumPy arrays a weight argument holds: an array, or the fields of a bundle (Weights, tuple...)."""
    if isinstance(value, np.ndarray):
        return [value]
    if isinstance(value, (tuple, list)):
        return [a for v in value for a in _arrays_in(v)]
    if hasattr(value, "__dict__"):
        return [a for v in vars(value).values() for a in _arrays_in(v)]
    return []


def _unique(arrays) -> list[np.ndarray]:
    """Each array object once (a tied head and the embedding are the same array)."""
    return list({id(a): a for a in arrays}.values())


def _bytes_by_dtype(arrays) -> dict[str, int]:
    out = defaultdict(int)
    for a in arrays:
        out[str(a.dtype)] += a.nbytes
    return dict(out)


def _mib(n: int) -> str:
    return f"{n / 2**20:9.2f} MiB ({n:,} bytes)"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"
