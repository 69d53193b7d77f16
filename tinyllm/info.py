"""`python -m tinyllm info`: what a loaded model is, what it holds in memory, and what runs it; and
`python -m tinyllm ops`'s table of every op and its variants (ops_table)."""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from ops.registry import OPS, VARIANTS

from .config import read_json
from .loading import read_quantization
from .placement import in_huge_pages, loaded_originals
from .stored import format_name


def describe(model) -> str:
    """A report on `model` (a tinyllm Model, loaded with its schedule) as lines of text."""
    return "\n".join([f"model: {model.path}", *_architecture(model), *_parameters(model), *_stored(model),
                      *_memory(model), *_tokenizer(model), *_ops(model)])


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
    """Numbers in the model's weights as loaded, each tensor once (a tied output head is the embedding,
    even where `tinyllm quantize` stored a quantised copy of it); a quantised N x K matrix is N x K."""
    return sum(int(np.prod(v.shape)) for v in _unique(_loaded_values(model, unquantized=True)))


def _parameters(model) -> list[str]:
    n = parameter_count(model)
    return [f"parameters: {n:,} ({n / 1e6:.3g} M)"]


def _stored(model) -> list[str]:
    """For a directory written by `tinyllm quantize`: which matrices it stores in which format."""
    record = read_quantization(model.path)
    return record.describe() if record else []


def _memory(model) -> list[str]:
    """Bytes per number format: loaded weights the schedule still reads (a quantised matrix loaded as
    stored counts under its format: values and scales), what its prepare steps made (copies such as a
    concatenated Q/K/V matrix, widened scales), and loaded weights that such copies replaced."""
    loaded = _unique(_loaded_values(model))
    loaded_arrays = [a for v in loaded for a in _arrays_in(v)]
    site_ops = {(id(s.owner), s.attr): s.op for s in model.transformer.weight_sites}
    # A loaded weight moved into huge pages (tinyllm/placement.py) counts as the loaded one.
    loaded_copy = loaded_originals(model.transformer.weight_sites)
    installed = defaultdict(list)  # "op=variant" whose (prepared) weights the model calls it with -> arrays
    held = {}  # the installed arrays that sit in huge pages (copies of loaded weights, or made), by id
    for owner, name in _weight_fields(model):
        op = site_ops.get((id(owner), name), "unprepared")
        label = f"{op}={model.schedule.choice[op]}" if op in model.schedule.choice else op
        arrays = _arrays_in(getattr(owner, name))
        held.update((id(a), a.nbytes) for a in arrays if in_huge_pages(a))
        installed[label] += [loaded_copy.get(id(a), a) for a in arrays]
    everything_installed = _unique([a for arrays in installed.values() for a in arrays])
    read = [v for v in loaded if any(np.may_share_memory(a, b) for a in _arrays_in(v) for b in everything_installed)]
    replaced = [v for v in loaded if not any(v is r for r in read)]
    lines = [f"weights in memory (schedule {model.schedule.spec}):"]
    lines += [f"  {dtype:<8} {_mib(n)}  loaded weights it reads" for dtype, n in _bytes_by_dtype(read).items()]
    for label, arrays in installed.items():
        made = [a for a in _unique(arrays) if not any(np.may_share_memory(a, b) for b in loaded_arrays)]
        lines += [f"  {dtype:<8} {_mib(n)}  made by {label}'s prepare step"
                  for dtype, n in _bytes_by_dtype(made).items()]
    if held:
        lines.append(f"  ({_mib(sum(held.values())).strip()} of these sit in one block of 2 MiB pages, copied there when the schedule "
                     "was applied: decode streams them faster than from the file's 4 KiB pages)")
    if replaced:
        lines.append(f"  (not held: {_mib(sum(map(_nbytes, replaced))).strip()} of loaded weights that prepared "
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


def ops_table(schedule, verbose: bool = False) -> str:
    """`tinyllm ops`: every op with its variants (* the one `schedule` runs, [format] what a projection
    reader reads) and the rule its variants are checked by; `verbose` adds why each tolerance is what it
    is and each variant's source module and first docstring line."""
    rows = [("op", "variants (* runs)", "rule")]
    for name, op in OPS.items():
        names = []
        for var_name, v in VARIANTS[name].items():
            mark = "*" if schedule.choice[name] == var_name else " "
            extra = "" if v.available else " (unavailable)"
            fmt = f" [{v.weight_format}]" if (name == "linear" or op.projections) and v.weight_format != "any" else ""
            names.append(f"{mark}{var_name}{fmt}{extra}")
        rules = {str(v.comparison()) for v in VARIANTS[name].values()}
        label = f"{name} ({' → '.join(op.composite)})" if op.is_composite else name
        if op.inside:  # checked like any op, but the model calls the op that contains it
            label += f" (inside {op.inside})"
        rows.append((label, "  ".join(names), "; ".join(sorted(rules))))
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]}" for r in rows]
    if any(op.inside for op in OPS.values()):
        lines += ["", "(inside X): a building block of X's reference; the model calls X, so scheduling it alone "
                  "changes nothing: a variant of X uses its own"]
    if verbose:
        lines += ["", "why the tolerances:"]
        lines += [f"  {name}: {op.rule.why}" for name, op in OPS.items() if op.rule.why]
        lines += ["", "what each variant is (its docstring's first line; the code is in the module named):"]
        every = [v for name in OPS for v in VARIANTS[name].values()]
        label, source = max(24, *(len(v.label) for v in every)), max(len(v.source) for v in every)
        lines += [f"  {v.label:<{label}} {v.source:<{source}} {v.doc}" for v in every]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ helpers


def _weight_fields(model) -> list[tuple[object, str]]:
    """Every (owner, attribute) of the transformer that holds weights: the embedding, each layer's
    fields, the output head. Weight sites are among them; norms the model passes unprepared too."""
    t = model.transformer
    return [(t, "embed"), *((L, name) for L in t.layers for name in vars(L)), (t, "head")]


def _loaded_values(model, unquantized: bool = False) -> list:
    """The weights as loaded from the checkpoint (before any prepare step): float arrays, and the
    matrices stored quantised as their format objects. `unquantized`: a tied head stored quantised
    is taken as the embedding it is a copy of."""
    raw = {(id(s.owner), s.attr): s.unquantized if unquantized and s.unquantized is not None else s.raw
           for s in model.transformer.weight_sites}
    return [v for owner, name in _weight_fields(model)
            for v in _values_in(raw.get((id(owner), name), getattr(owner, name)))]


def _leaves(value, keep) -> list:
    """What a weight argument holds that `keep` accepts, looking inside bundles (Weights, tuples, a
    quantised matrix's fields) until it does."""
    if keep(value):
        return [value]
    if isinstance(value, (tuple, list)):
        return [a for v in value for a in _leaves(v, keep)]
    if hasattr(value, "__dict__"):
        return [a for v in vars(value).values() for a in _leaves(v, keep)]
    return []


def _values_in(value) -> list:
    """The weights a weight argument holds: float arrays and quantised matrices (format objects)."""
    return _leaves(value, lambda v: isinstance(v, np.ndarray) or format_name(v) is not None)


def _arrays_in(value) -> list[np.ndarray]:
    """The NumPy arrays a weight argument holds: an array, or the fields of a bundle (Weights, tuple...)."""
    return _leaves(value, lambda v: isinstance(v, np.ndarray))


def _unique(arrays) -> list[np.ndarray]:
    """Each array (or quantised matrix) object once (a tied head and the embedding are the same array)."""
    return list({id(a): a for a in arrays}.values())


def _bytes_by_dtype(values) -> dict[str, int]:
    """Bytes per number format: an array's dtype, a quantised matrix's format (its values and scales)."""
    out = defaultdict(int)
    for v in values:
        out[format_name(v) or str(v.dtype)] += _nbytes(v)
    return dict(out)


def _nbytes(value) -> int:
    return sum(a.nbytes for a in _arrays_in(value))


def _mib(n: int) -> str:
    return f"{n / 2**20:9.2f} MiB ({n:,} bytes)"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"
