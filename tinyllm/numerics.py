"""`--check-numerics`: find the first op that turns finite numbers into NaN or Inf.

Off by default, and then nothing here runs: the model calls the schedule's plain op table. When it
is on, `schedule.apply` gives the model a `CheckedOpTable` instead, whose every op checks its outputs
after running. A composed composite calls its steps through the same table, so each step is checked
and the error names the innermost op that went wrong (`linear=reference inside swiglu_mlp=composed`).

The layer is recognised by the weights an op is given (every layer's weights are distinct objects),
so the forward pass needs no hook; an op given no weights (attention, add) runs in the layer of the
op before it.
"""
from __future__ import annotations

import numpy as np

from ops.registry import OpTable

from .errors import NumericsError


class CheckedOpTable(OpTable):
    """An op table whose ops raise NumericsError as soon as one returns NaN or Inf."""

    def __init__(self, choice: dict[str, str], transformer):
        super().__init__(choice)
        self._locations = _weight_locations(transformer)
        self._location = "before the first layer"
        self._running: list[str] = []  # the ops now running, outermost first
        for name in self.choice:
            setattr(self, name, self._checked(name, getattr(self, name)))

    def _checked(self, name: str, fn):
        label = f"{name}={self.choice[name]}"

        def run(*args):
            for arg in args:
                self._location = self._locations.get(id(arg), self._location)
            self._running.append(label)
            try:
                out = fn(*args)
            finally:
                self._running.pop()
            if not _finite(out):
                inside = "".join(f" inside {outer}" for outer in reversed(self._running))
                raise NumericsError(f"NaN or Inf first produced by op {label}{inside}, {self._location} "
                                    f"(found by --check-numerics)")
            return out

        return run


def _weight_locations(transformer) -> dict[int, str]:
    """id of each weight argument the forward pass hands an op -> where in the model it is."""
    where = {id(transformer.embed): "in the embedding", id(transformer.head): "in the final norm and LM head"}
    for i, layer in enumerate(transformer.layers):
        for value in vars(layer).values():
            if value is not None:
                where[id(value)] = f"in layer {i}"
    return where


def _finite(out) -> bool:
    if isinstance(out, tuple):
        return all(_finite(o) for o in out)
    if isinstance(out, np.ndarray) and np.issubdtype(out.dtype, np.floating):
        return bool(np.isfinite(out).all())
    return True  # token ids and other non-float results
