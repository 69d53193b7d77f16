"""The op registry: every operator is a named contract, and any number of variants implement it.

An **op** is declared once, beside its NumPy reference (`@op(...)` in the op family's file):

- `reference`: the plain NumPy function that *defines* what the op computes;
- `inputs`: a Hypothesis strategy of valid arguments, and `examples`: explicit edge cases that are
  always checked first (so catching a planted bug never depends on luck). Our family files attach
  them at the bottom of the file, after the references and variants:
  `rmsnorm.strategy(_rmsnorm_inputs, examples=_rmsnorm_examples)` (`@op(..., inputs=, examples=)`
  does the same in one step, as a plugin may);
- `rule`: how a variant's output is compared with the reference's (a tolerance, stated and justified);
- `weights`: which arguments are weights, i.e. what a variant's `prepare` step transforms once when a
  schedule is applied (quantise, transpose, concatenate...) instead of on every call.

A **composite** op names a sequence the model runs as one step (`qkv_rope`: rmsnorm, then the Q/K/V
projections, then RoPE). Its reference is written as a composition of primitive ops taken from an op
table: run over the reference table it is the composite's reference (always available); run over
the current schedule's table it is the `composed` variant, so swapping `linear` also changes the
projections inside every unfused composite. A `fused` variant does the whole composite in one kernel.

A **variant** registers with `@variant(op, name, ...)`, from our `ops/` files or from a user's plugin
module. The model never imports a variant: it calls ops by name on an `OpTable`.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .threads import split_products

REFERENCE = "reference"  # every primitive op's defining variant
COMPOSED = "composed"  # every composite op's unfused variant: the composition over the schedule's ops


class RegistryError(Exception):
    """A name that is not registered, or a registration that clashes (tinyllm turns it into a one-line error)."""


# ---------------------------------------------------------------------------------- comparison


@dataclass(frozen=True)
class Rule:
    """How a variant's output is compared with the reference output.

    `exact`: equal, bit for bit (copies, integer results, a single rounding done the same way).
    otherwise: max|out - ref| <= tol * scale over each output array, where scale is the largest
    reference magnitude (as logits are judged) or, for ops that sum products, the larger of that and
    `magnitude(*args)`: the size of the terms being summed (e.g. max of |x| @ |W|^T). Floating-point
    error is proportional to the terms, not to a result that cancels to near zero, so that is the
    honest yardstick: a dot product whose terms cancel is as uncertain in the reference as in any
    variant. NaN or inf where the reference has a finite value always fails. `why` justifies the bound.
    """

    tol: float = 0.0
    why: str = ""
    magnitude: Callable | None = None  # args -> float: the scale of the summed terms
    magnitude_label: str = ""
    slack: Callable | None = None  # args -> float: an absolute allowance on top (see `why`)
    slack_label: str = ""

    @property
    def exact(self) -> bool:
        return self.tol == 0.0

    def __str__(self) -> str:
        if self.exact:
            return "exact"
        scale = f"max(|ref|, {self.magnitude_label})" if self.magnitude else "max|ref|"
        return f"max|Δ| ≤ {self.tol:g}·{scale}" + (f" + {self.slack_label}" if self.slack else "")

    def compare(self, out, ref, args: tuple = ()) -> str | None:
        """None if `out` passes against `ref` (computed from `args`), else the observed error."""
        if isinstance(ref, tuple):
            if not isinstance(out, tuple) or len(out) != len(ref):
                return f"returned {type(out).__name__} of {_len(out)} items, expected a tuple of {len(ref)}"
            for i, (o, r) in enumerate(zip(out, ref)):
                err = self.compare(o, r, args)
                if err:
                    return f"output {i}: {err}"
            return None
        if not isinstance(ref, np.ndarray):  # ints (token ids) and other scalars compare exactly
            return None if out == ref else f"returned {out!r}, expected {ref!r}"
        out = np.asarray(out)
        if out.shape != ref.shape:
            return f"shape {out.shape}, expected {ref.shape}"
        if out.dtype != ref.dtype:
            return f"dtype {out.dtype}, expected {ref.dtype}"
        if self.exact:
            bad = ~((out == ref) | (np.isnan(out) & np.isnan(ref)))
            return f"{int(bad.sum())} of {out.size} values differ (exact rule)" if bad.any() else None
        finite = np.isfinite(ref)
        if np.any(~np.isfinite(out) & finite):
            return f"{int(np.sum(~np.isfinite(out) & finite))} non-finite values where the reference is finite"
        if np.any(~finite & (out != ref) & ~(np.isnan(out) & np.isnan(ref))):
            return "differs where the reference is not finite"
        if not finite.any():
            return None
        scale = float(np.max(np.abs(ref[finite])))
        what = "max|ref|"
        if self.magnitude is not None and args:
            terms = float(self.magnitude(*args))
            if terms > scale:
                scale, what = terms, self.magnitude_label
        err = float(np.max(np.abs(out[finite].astype(np.float64) - ref[finite])))
        slack = float(self.slack(*args)) if self.slack is not None and args else 0.0
        if err <= self.tol * scale + slack or err == 0.0:
            return None
        extra = f" + {slack:.3g} ({self.slack_label})" if slack else ""
        return f"max|Δ| = {err:.3g} = {err / scale if scale else float('inf'):.3g}·{what} > {self.tol:g}·{what}{extra}"


def _len(x):
    try:
        return len(x)
    except TypeError:
        return "no"


EXACT = Rule(0.0, "")


def close(tol: float, why: str, magnitude: Callable | None = None, label: str = "", slack: Callable | None = None,
          slack_label: str = "") -> Rule:
    return Rule(tol, why, magnitude, label, slack, slack_label)


# ---------------------------------------------------------------------------------- weights


class Weights:
    """A bundle of weights passed to a composite op as one argument (`w.wq`, `w.norm`, ...).

    A variant's prepare step returns a new bundle, possibly with other fields (a fused Q/K/V kernel
    might hold one concatenated `wqkv`)."""

    def __init__(self, **arrays):
        self.__dict__.update(arrays)

    def replace(self, **changes) -> "Weights":
        return Weights(**{**self.__dict__, **changes})

    def __repr__(self) -> str:
        return "Weights(" + ", ".join(f"{k}={_describe(v)}" for k, v in self.__dict__.items()) + ")"


# ---------------------------------------------------------------------------------- ops and variants


@dataclass
class Op:
    name: str
    reference: Callable  # for a composite: fn(ops, *args), a composition over an op table
    doc: str
    rule: Rule
    inputs: Callable[[], Any] | None  # () -> Hypothesis strategy of argument tuples
    examples: Callable[[], list[tuple]] = lambda: []
    weights: tuple[int, ...] = ()  # argument positions a prepare step transforms
    composite: tuple[str, ...] = ()  # for a composite op: the primitive ops it is made of
    projections: tuple[str, ...] = ()  # for a composite: the Weights fields that are `linear` weights
    inside: str = ""  # a building block the model does not call itself: the op whose reference uses it
    own_format: bool = False  # a composite whose weight format is chosen on its own, not tied to `linear`'s

    @property
    def is_composite(self) -> bool:
        return bool(self.composite)


@dataclass
class Variant:
    op: str
    name: str
    fn: Callable | None  # None for `composed`: bound to an op table when one is built
    doc: str = ""
    available: bool = True
    unavailable_reason: str = ""
    prepare: Callable | None = None  # weight -> prepared weight, once per schedule application
    weight_format: str = "fp32"  # linear: the format prepare produces; composites: the format read
    source: str = ""  # the module that registered it
    rule: Rule | None = None  # its own comparison rule (a quantised variant's), else the op's
    reference: Callable | None = None  # its own reference over the *prepared* weights (dequantise, then the
    #                                    float op), else the op's reference over the raw ones
    inputs: Callable | None = None  # its own Hypothesis strategy (e.g. rows a multiple of 32 long), else the op's
    examples: Callable | None = None  # its own edge cases, else the op's

    def comparison(self) -> Rule:
        return self.rule or OPS[self.op].rule

    @property
    def label(self) -> str:
        return f"{self.op}={self.name}"


OPS: dict[str, Op] = {}
VARIANTS: dict[str, dict[str, Variant]] = {}


def op(name: str, *, rule: Rule, inputs=None, examples=None, weights=(), composite=(), projections=(), inside="",
       own_format: bool = False):
    """Declare the decorated function as the reference of op `name` (see the module docstring).

    The function comes back with a `strategy(inputs, examples=None)` method that attaches the op's
    Hypothesis strategy and edge cases later, when they are not given here."""

    def register(fn: Callable) -> Callable:
        if name in OPS:
            raise RegistryError(f"op {name!r} is declared twice")
        OPS[name] = Op(name, fn, _first_line(fn.__doc__), rule, inputs, examples or (lambda: []), tuple(weights),
                       tuple(composite), tuple(projections), inside, own_format)
        if composite:
            VARIANTS[name] = {COMPOSED: Variant(name, COMPOSED, None, "the composition of the scheduled ops: "
                                                + " → ".join(composite), weight_format="any", source=fn.__module__)}
        else:
            VARIANTS[name] = {REFERENCE: Variant(name, REFERENCE, fn, "NumPy reference", source=fn.__module__)}

        def strategy(inputs: Callable, examples: Callable | None = None) -> Callable:
            """Attach op `name`'s strategy (() -> Hypothesis strategy of argument tuples) and edge cases."""
            declared = OPS[name]
            if declared.inputs is not None:
                raise RegistryError(f"op {name!r} has a strategy already")
            declared.inputs, declared.examples = inputs, examples or (lambda: [])
            return fn

        fn.strategy = strategy
        return fn

    return register


def variant(op_name: str, name: str, *, available: bool | Callable[[], bool] = True, unavailable_reason: str = "",
            prepare: Callable | None = None, weight_format: str = "fp32", rule: Rule | None = None,
            reference: Callable | None = None, inputs: Callable | None = None, examples: Callable | None = None,
            doc: str | None = None, replace_existing: bool = False):
    """Register the decorated function as variant `name` of op `op_name`.

    It must take the same arguments as the op's reference and return the same result, up to the
    op's comparison rule; arguments listed as the op's `weights` arrive as `prepare` made them.
    `available` (a bool or a callable) says whether it can run on this machine. `rule` replaces the
    op's comparison rule for this variant, and `reference` the function it is compared with: a
    quantised variant is compared with a quantised reference (dequantise its prepared weights, then
    the float op), bit-exact where the arithmetic is integer. `inputs`/`examples` replace the op's
    strategy and edge cases where the variant accepts fewer shapes (a 32-block format needs rows
    whose length is a multiple of 32). `doc`: its one-line description, when not the first line of
    the function's docstring (a quantised variant's: the shared body's description and its format's).
    """

    def register(fn: Callable) -> Callable:
        if op_name not in OPS:
            raise RegistryError(f"cannot register {op_name}={name}: no op {op_name!r}; ops are: {', '.join(OPS)}")
        if name in (REFERENCE, COMPOSED):
            raise RegistryError(f"{op_name}={name}: the name {name!r} is reserved")
        if name in VARIANTS[op_name] and not replace_existing:
            raise RegistryError(f"{op_name}={name} is registered twice (by {VARIANTS[op_name][name].source} "
                                f"and {fn.__module__})")
        ok = available() if callable(available) else bool(available)
        VARIANTS[op_name][name] = Variant(op_name, name, fn, doc or _first_line(fn.__doc__), ok, unavailable_reason, prepare,
                                          weight_format, fn.__module__, rule, reference, inputs, examples)
        return fn

    return register


def _first_line(doc: str | None) -> str:
    lines = (doc or "").strip().splitlines()
    return lines[0] if lines else ""


def get_op(name: str) -> Op:
    if name not in OPS:
        raise RegistryError(f"unknown op {name!r}; ops are: {', '.join(OPS)}")
    return OPS[name]


def get_variant(op_name: str, name: str) -> Variant:
    get_op(op_name)
    if name == REFERENCE and OPS[op_name].is_composite:
        name = COMPOSED  # `reference` of a composite is its composition
    if name not in VARIANTS[op_name]:
        raise RegistryError(f"unknown variant {op_name}={name}; {op_name} has: {', '.join(VARIANTS[op_name])}")
    return VARIANTS[op_name][name]


def default_variant(op_name: str) -> str:
    return COMPOSED if OPS[op_name].is_composite else REFERENCE


# ---------------------------------------------------------------------------------- op tables


class OpTable:
    """What the model calls: one attribute per op, the chosen variant's function.

    `choice` maps every op name to a variant name. A `composed` composite is bound to this very
    table, so its primitive steps run whatever variants the table holds. The model runs each
    forward pass inside `forward_pass(rows)`."""

    def __init__(self, choice: dict[str, str]):
        self.choice = dict(choice)
        for name, var_name in self.choice.items():
            v = get_variant(name, var_name)
            fn = functools.partial(OPS[name].reference, self) if v.name == COMPOSED else v.fn
            setattr(self, name, fn)
        # whether the projections read quantised weights: their prefill then splits the cores itself
        # (ops/threads.py). The readers are the ops declared with `projections=`, and the primitive
        # steps with weights that their unfused composition reads them through (linear). An op with
        # its own format does not count: a quantised head alone reads only the prefill's last row.
        readers = {name for name, o in OPS.items() if o.projections and not o.own_format}
        readers |= {part for name in readers for part in OPS[name].composite if part in OPS and OPS[part].weights}
        self.quantized_projections = any(get_variant(name, self.choice[name]).weight_format not in ("fp32", "any")
                                         for name in readers if name in self.choice)

    def forward_pass(self, rows: int):
        """A context manager around one forward pass of `rows` tokens: the thread policy of this
        schedule (a prefill on quantised projections gives each core its own rows: ops/threads.py)."""
        return split_products(self, rows)


def reference_table() -> OpTable:
    """The op table in which every op runs its reference (composites: composed over references)."""
    return OpTable({name: default_variant(name) for name in OPS})


def reference_function(op_name: str) -> Callable:
    """The function that defines op `op_name`: its NumPy reference, or for a composite the
    composition over the reference table."""
    o = get_op(op_name)
    return functools.partial(o.reference, reference_table()) if o.is_composite else o.reference


def prepare_argument(op_name: str, v: Variant, linear: Variant, value):
    """A weight argument of op `op_name` as variant `v` wants it (with `linear` the schedule's
    linear variant, which prepares the projections inside an unfused composite)."""
    o = OPS[op_name]
    if v.name == COMPOSED:
        if linear.prepare is None or not isinstance(value, Weights):
            return value
        return value.replace(**{f: linear.prepare(getattr(value, f)) for f in o.projections
                                if getattr(value, f, None) is not None})
    return value if v.prepare is None else v.prepare(value)


# ---------------------------------------------------------------------------------- input helpers


def random_array(draw, shape, scales=(1.0,), zero_rows: bool = False) -> np.ndarray:
    """A float32 array for a Hypothesis strategy: standard normal values from a drawn seed, times a
    drawn scale (large and tiny magnitudes); optionally with some rows set to zero.

    Hypothesis shrinks the seed and the scale, so a failing example is reported small and simple."""
    from hypothesis import strategies as st

    seed = draw(st.integers(0, 2**32 - 1), label="seed")
    scale = draw(st.sampled_from(scales), label="scale")
    a = (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)
    if zero_rows and a.ndim >= 1 and a.shape[0] > 0:
        rows = draw(st.lists(st.booleans(), min_size=a.shape[0], max_size=a.shape[0]), label="zero rows")
        a[np.array(rows, dtype=bool)] = 0
    return a


def _describe(x) -> str:
    if isinstance(x, np.ndarray):
        if x.size <= 6:
            return f"{x.dtype}{list(x.shape)} {np.array2string(x.ravel(), precision=4, separator=', ')}"
        finite = x[np.isfinite(x)] if np.issubdtype(x.dtype, np.floating) else x
        peak = f" max|x|={np.max(np.abs(finite)):.3g}" if finite.size else ""
        n_zero = 0 if x.ndim < 2 else int(np.sum(~x.reshape(x.shape[0], -1).any(axis=1)))
        zeros = f" zero rows={n_zero}" if n_zero else ""
        return f"{x.dtype}{list(x.shape)}{peak}{zeros}"
    if isinstance(x, Weights):
        return repr(x)
    if isinstance(x, float):
        return f"{x:.4g}"
    return repr(x)


def describe_args(args: tuple) -> str:
    """A one-line summary of an example's arguments (shapes, magnitudes, small values in full)."""
    return "(" + ", ".join(_describe(a) for a in args) + ")"
