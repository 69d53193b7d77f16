"""Which implementation runs for each op. For now there is one schedule, `reference`: every op runs
its plain NumPy reference from `ops/`. Later schedules swap in optimised variants by op name."""
from __future__ import annotations

import ops as ops_pkg

from .errors import TinyLLMError

PRESETS = ("reference",)


def resolve_ops(spec=None):
    """(spec name, op table) for a schedule spec; None means the default schedule."""
    spec = spec or "reference"
    if spec not in PRESETS:
        raise TinyLLMError(f"unknown ops schedule {spec!r}; choose from: {', '.join(PRESETS)}")
    return spec, ops_pkg.reference_table()
