"""The scheduler: which variant runs for each op, and weights prepared for it.

A schedule maps every op (primitive and composite) to one variant. It is written as

- a **preset** name: `reference` (every op its NumPy reference; composites composed of them), and
  the presets later kernels add (`numba`, `fused`, ...);
- a **spec** string: comma-separated items, each a preset name or `op=variant`, applied left to right
  on top of `reference`, so later items override earlier ones: `fused,attention=reference`;
- a **dict** `{op: variant}`, applied on top of `reference`.

`apply(transformer, schedule)` runs the chosen variants' prepare steps over the model's weights (only
those whose preparation changes), installs them where the model reads them (their memory is
tinyllm/placement.py's), and hands the model the op table to call.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import ops as ops_pkg
from ops.registry import (COMPOSED, OPS, OpTable, RegistryError, Weights, default_variant, get_variant,
                          prepare_argument)

from . import placement
from .errors import ScheduleError
from .numerics import CheckedOpTable
from .stored import for_format


def _kernel_presets() -> dict[str, dict[str, str]]:
    """`numba`: every primitive op that has a Numba variant runs it (composites composed of them).
    `fused`: that, plus every composite's fused kernel. Built from what is registered, so both are
    consistent by construction (all fp32).

    The quantised presets are `fused` with every projection in one weight format (ops.quant):
    `int8`, `q8_0`, `q4_0`, `q4_1`. Not exact, so never the default. All keep the LM head (tied to
    the embedding in SmolLM2) as Q8_0 weights with float32 activations: the head in the preset's own
    format cost more accuracy than the rest of the model's rounding, as measured by `tinyllm eval`
    (benchmarks/RESULTS.md, Quantised weights: the note on the LM head)."""
    variants = ops_pkg.VARIANTS
    numba = {name: "numba" for name, o in OPS.items() if not o.is_composite and "numba" in variants[name]}
    fused = {**numba, **{name: "fused" for name, o in OPS.items() if o.is_composite and "fused" in variants[name]}}

    def quantized(fmt, head):
        return {**fused, "linear": fmt, "qkv_rope": fmt, "swiglu_mlp": fmt, "norm_head": head}

    return {"numba": numba, "fused": fused, **{fmt: quantized(fmt, "q8_0_weights") for fmt in ("int8", "q8_0", "q4_0", "q4_1")}}


# Preset name -> {op: variant} on top of `reference`. Plugins may add theirs with `register_preset`.
PRESETS: dict[str, dict[str, str]] = {"reference": {}, **_kernel_presets()}
# The default schedule is the first of these that is registered and available: the fastest exact (fp32) one.
FASTEST_EXACT = ["fused", "numba", "reference"]


def register_preset(name: str, choice: dict[str, str], *, exact: bool = True) -> None:
    """Add a preset (from a kernel module or a plugin). `exact`: fp32, a candidate for the default."""
    if name in OPS:
        raise ScheduleError(f"preset name {name!r} clashes with an op name")
    PRESETS[name] = dict(choice)
    if exact and name not in FASTEST_EXACT:
        FASTEST_EXACT.insert(FASTEST_EXACT.index("reference"), name)


@dataclass
class WeightSite:
    """One weight argument of one op call in the forward pass (`owner.attr`), with the raw value it
    was loaded as: float32, or for a model saved by `tinyllm quantize` its projections in their
    stored formats (tinyllm/stored.py). `apply` replaces `owner.attr` by what the chosen variant's
    prepare step makes of `raw`, and `key` records which preparation it holds. `unquantized`: the
    float32 value a quantised `raw` stands for where that is not its dequantised values (a tied head
    stored quantised: the embedding); None otherwise. `copied`: tinyllm/placement.py's record of the
    loaded arrays whose copies the installed value holds."""

    op: str
    owner: object
    attr: str
    raw: object
    key: tuple | None = None
    unquantized: object = None
    copied: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Schedule:
    spec: str  # exactly as the user gave it (JSON outputs name a schedule by this)
    choice: dict  # every op name -> variant name

    def table(self) -> OpTable:
        return OpTable(self.choice)


def default_spec() -> str:
    """The fastest exact preset whose variants are all available here."""
    for name in FASTEST_EXACT:
        if name in PRESETS:
            try:
                _validate(_choice_from_items([name]))
                return name
            except ScheduleError:
                continue
    return "reference"


def parse(spec=None) -> Schedule:
    """A Schedule from a preset name, a spec string, a dict, a Schedule, or None (the default)."""
    if isinstance(spec, Schedule):
        return spec
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        spec = default_spec()
    if isinstance(spec, dict):
        items = [f"{k}={v}" for k, v in spec.items()]
        text = ",".join(items)
    elif isinstance(spec, str):
        text = spec
        items = [item.strip() for item in spec.split(",")]
        if any(not item for item in items):
            raise ScheduleError(f"empty item in ops spec {spec!r} (items are separated by single commas)")
    else:
        raise ScheduleError(f"an ops schedule is a string or a dict, not {type(spec).__name__}")
    choice = _choice_from_items(items)
    _validate(choice)
    return Schedule(text, choice)


def _op_variant(item: str) -> tuple[str, str]:
    """`op=variant` -> (op, variant name as registered), or a one-line ScheduleError."""
    op_name, _, var_name = (s.strip() for s in item.partition("="))
    if op_name not in OPS:
        raise ScheduleError(f"unknown op {op_name!r} in {item!r}; ops are: {', '.join(OPS)}")
    try:
        return op_name, get_variant(op_name, var_name).name
    except RegistryError as e:
        raise ScheduleError(str(e)) from None


def _choice_from_items(items: list[str]) -> dict[str, str]:
    choice = {name: default_variant(name) for name in OPS}
    for item in items:
        if "=" in item:
            op_name, var_name = _op_variant(item)
            choice[op_name] = var_name
        elif item in PRESETS:
            choice.update(PRESETS[item])
        else:
            raise ScheduleError(f"unknown preset {item!r}; presets are: {', '.join(PRESETS)} "
                                f"(or write op=variant)")
    return choice


def _validate(choice: dict[str, str]) -> None:
    for op_name, var_name in choice.items():
        v = get_variant(op_name, var_name)
        if not v.available:
            reason = f" ({v.unavailable_reason})" if v.unavailable_reason else ""
            usable = [n for n, x in ops_pkg.VARIANTS[op_name].items() if x.available]
            raise ScheduleError(f"{v.label} is not available on this machine{reason}; "
                                f"available for {op_name}: {', '.join(usable)}")
    # A fused composite reads its projections in one weight format; `linear` decides the format of all
    # other projections. A mix would silently run part of the model in another precision: refuse it.
    # An op declared with own_format (the LM head: the quantised presets keep it as Q8_0 weights) is exempt.
    linear = get_variant("linear", choice["linear"])
    for op_name, var_name in choice.items():
        v, o = get_variant(op_name, var_name), OPS[op_name]
        if o.projections and not o.own_format and v.name != COMPOSED and v.weight_format != linear.weight_format:
            same = [n for n, x in ops_pkg.VARIANTS[op_name].items() if x.weight_format in (linear.weight_format, "any")]
            raise ScheduleError(
                f"{v.label} reads {v.weight_format} weights but {linear.label} stores {linear.weight_format}: "
                f"choose {op_name}={' or '.join(same)}, or a linear variant for {v.weight_format}")


def apply(transformer, schedule: Schedule, check_numerics: bool = False) -> None:
    """Prepare the model's weights for `schedule` and give it the schedule's op table.

    Each weight site keeps the raw value it was loaded with; a site is prepared again only when the
    variant that reads it (or, inside an unfused composite, the `linear` variant) changes. Projections
    loaded quantised (a model saved by `tinyllm quantize`) reach a variant of their own format as they
    are, and any other variant dequantised (see _raw_for).
    `check_numerics`: the table checks every op's output for NaN/Inf (see tinyllm.numerics); off, the
    model calls the variants directly.
    """
    linear = get_variant("linear", schedule.choice["linear"])
    changes = []  # prepared first, installed after: a failing prepare step leaves the model as it was
    for site in transformer.weight_sites:
        v = get_variant(site.op, schedule.choice[site.op])
        key = (v.name, linear.name) if v.name == COMPOSED else (v.name,)
        if site.key != key:
            try:
                raw = _raw_for(site, linear.weight_format if v.name == COMPOSED else v.weight_format)
                changes.append((site, key, prepare_argument(site.op, v, linear, raw)))
            except Exception as e:  # a plugin's prepare step may fail in any way
                who = f"{v.label} (its projections by {linear.label})" if v.name == COMPOSED else v.label
                raise ScheduleError(f"preparing weights for {who} failed: {type(e).__name__}: {e}") from None
    table = schedule.table()
    for site, key, value in placement.place(transformer.weight_sites, changes):
        setattr(site.owner, site.attr, value)
        site.key = key
    if check_numerics:  # built after the prepared weights are installed: it recognises layers by them
        table = CheckedOpTable(schedule.choice, transformer)
    transformer.ops = table


def _raw_for(site, fmt: str):
    """`site.raw` for a variant that reads `fmt` weights: each quantised projection in it as it is
    when it is in `fmt`, else the float32 matrix it stands for (tinyllm/stored.py::for_format), so
    that a schedule of another format, or of float32, runs on a quantised model too."""
    if not isinstance(site.raw, Weights):
        return for_format(site.raw, fmt, site.unquantized)
    unquantized = vars(site.unquantized) if site.unquantized is not None else {}
    changed = {name: for_format(value, fmt, unquantized.get(name)) for name, value in vars(site.raw).items()}
    changed = {name: value for name, value in changed.items() if value is not getattr(site.raw, name)}
    return site.raw.replace(**changed) if changed else site.raw  # a float32 model's bundles stay as loaded


def check_selection(selection: str | None) -> list[tuple[str, str]]:
    """The (op, variant) pairs a `check` selection names: nothing = every variant that is not a
    reference; an op = all its variants; `op=variant`; a preset = the non-reference variants it uses."""
    def non_reference(op_name):
        return [(op_name, n) for n in ops_pkg.VARIANTS[op_name] if n != default_variant(op_name)]

    if not selection or not selection.strip():
        return [pair for op_name in OPS for pair in non_reference(op_name)]
    pairs = []
    for item in (s.strip() for s in selection.split(",")):
        if "=" in item:
            pairs.append(_op_variant(item))
        elif item in OPS:
            pairs += non_reference(item) or [(item, default_variant(item))]
        elif item in PRESETS:  # a preset only lists what differs from the references
            pairs += [(o, v) for o, v in PRESETS[item].items() if v != default_variant(o)]
        else:
            raise ScheduleError(f"{item!r} is neither an op, op=variant, nor a preset; ops: {', '.join(OPS)}; "
                                f"presets: {', '.join(PRESETS)}")
    return list(dict.fromkeys(pairs))  # in order, without repeats
