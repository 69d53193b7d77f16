"""The op registry: each operator is declared once, by name, with its NumPy reference.

The model calls ops through an *op table*, an object whose attributes are the ops by name
(`ops.rmsnorm(x, w, eps)`). Which function stands behind each name is the scheduler's business;
for now every name resolves to its reference implementation.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable


@dataclass(frozen=True)
class Op:
    name: str
    reference: Callable
    doc: str


OPS: dict[str, Op] = {}


def op(name: str):
    """Declare the decorated function as the NumPy reference of op `name`."""

    def register(fn: Callable) -> Callable:
        if name in OPS:
            raise ValueError(f"op {name!r} is declared twice")
        OPS[name] = Op(name, fn, (fn.__doc__ or "").strip().splitlines()[0])
        return fn

    return register


def reference_table() -> SimpleNamespace:
    """An op table in which every op runs its NumPy reference."""
    return SimpleNamespace(**{name: o.reference for name, o in OPS.items()})
