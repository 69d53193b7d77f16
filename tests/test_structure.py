"""Every built-in variant can be found by searching for its registration: a literal
`@variant("<op>", "<name>"` line in the module `tinyllm ops -v` names as its source (Variant.source).
Not a loop over a table, not `variant(...)(fn)` on a function defined elsewhere. `reference` and
`composed` are exempt: `@op` declares them."""
import importlib
from pathlib import Path

import ops


def test_every_builtin_variant_has_a_registration_line_in_its_module():
    offenders = []
    for op_name, variants in ops.VARIANTS.items():
        for name, v in variants.items():
            if name in ("reference", "composed") or not v.source.startswith("ops."):
                continue
            path = Path(importlib.import_module(v.source).__file__)
            line = f'@variant("{op_name}", "{name}"'
            if not any(text.strip().startswith(line) for text in path.read_text().splitlines()):
                offenders.append(f"{op_name}={name}: no line {line}... in {v.source} ({path.name})")
    assert not offenders, f"{len(offenders)} variants registered without a greppable line:\n" + "\n".join(offenders)
