"""The runtime never depends on the test oracle: nothing under tinyllm/ or ops/ imports torch or
transformers (they are the independent reference, and a user's install does not have them)."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "tinyllm").rglob("*.py")) + sorted((ROOT / "ops").rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_oracle_imports(path):
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            assert name.split(".")[0] not in {"torch", "transformers"}, f"{path} imports {name}"
