"""The code's shape, checked from its own source:

- the runtime never depends on the test oracle: nothing under tinyllm/ or ops/ imports torch or
  transformers (they are the independent reference, and a user's install does not have them);
- no import cycles among tinyllm/ and ops/ modules, counting imports inside functions (a cycle dodged
  by a function-level import is still a cycle) and tinyllm/__init__.py's lazy exports;
- ops/ never imports tinyllm/ (the ops stand alone; the engine is built on them);
- no .py file in ops/ or tinyllm/ over 500 lines, and README.md at most 200. These limits are
  permanent: a family that outgrows them becomes a package (e.g. ops/attention/), a manual moves into docs/.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("tinyllm", "ops")
SOURCES = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
MAX_LINES, README_MAX_LINES = 500, 200


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


# -- the import graph ---------------------------------------------------------------------------------
def module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path, packages=PACKAGES) -> dict[str, set[str]]:
    """module -> the modules of `packages` it imports, anywhere in its code (module level or in a
    function). `from P import name` imports P and, where P.name is a submodule, P.name too (a module
    inside P does not depend on P's __init__ for a submodule: Python loads P first anyway).
    `import P.M` imports P.M and each package above it. A package's `_EXPORTS` dict (public name ->
    submodule, loaded lazily) counts as the package importing each of those submodules."""
    files = {module_name(root, p): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}
    graph = {}
    for mod, path in files.items():
        is_package = path.name == "__init__.py"
        parts = mod.split(".")
        ancestors = {".".join(parts[:i]) for i in range(1, len(parts) + is_package)}  # a package is inside itself

        def with_parents(target):  # a module and the packages above it that `mod` is not already inside
            parts = target.split(".")
            return {".".join(parts[:i]) for i in range(1, len(parts) + 1)} - ancestors | {target}

        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    edges |= with_parents(alias.name)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".")[: len(mod.split(".")) - node.level + is_package]
                    package = ".".join(base + ([node.module] if node.module else []))
                else:
                    package = node.module
                names = [a.name for a in node.names]
                submodules = {f"{package}.{n}" for n in names if f"{package}.{n}" in files}
                for sub in submodules:
                    edges |= with_parents(sub)
                if len(submodules) < len(names) or package not in ancestors:  # a name from P's __init__
                    edges |= with_parents(package)
            elif (is_package and isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)
                  and any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in node.targets)):
                edges |= {f"{mod}.{v.value}" for v in node.value.values if isinstance(v, ast.Constant)}
        graph[mod] = {e for e in edges if e in files and e != mod}
    return graph


def import_groups(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected groups of two or more modules (each imports each, through the others)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def connect(v):  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while v not in group:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return groups


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected group, in import order: the shortest way from the group's first
    module (by name) back to itself, [a, b, c, a]. Empty when the graph has no cycle."""
    cycles = []
    for group in import_groups(graph):
        start = min(group)
        paths = {w: [start, w] for w in sorted(graph[start] & group)}
        while start not in paths:  # breadth first: the paths one import longer, keeping the shorter ones
            paths = {w: path + [w] for path in paths.values() for w in sorted(graph[path[-1]] & group)} | paths
        cycles.append(paths[start])
    return sorted(cycles)


def test_no_import_cycles():
    graph = import_graph(ROOT)
    groups = sorted(sorted(g) for g in import_groups(graph))
    assert not groups, "import cycles (in-function imports and tinyllm's lazy exports count):\n" + "\n".join(
        f"{' -> '.join(c)}\n  (all of {len(g)} import each other: {', '.join(g)})"
        for c, g in zip(find_cycles(graph), groups))


def test_ops_never_import_tinyllm():
    graph = import_graph(ROOT)
    offenders = sorted(f"{m} imports {t}" for m, ts in graph.items() if m.split(".")[0] == "ops"
                       for t in ts if t.split(".")[0] == "tinyllm")
    assert not offenders, "\n".join(offenders)


def _write_package(root: Path, files: dict[str, str]):
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_cycle_finder_sees_function_level_imports_and_lazy_exports(tmp_path):
    _write_package(tmp_path, {
        "pkg/__init__.py": '_EXPORTS = {"run": "a"}\n',
        "pkg/a.py": "from . import b\nimport pkg.c\n",
        "pkg/b.py": "import os\n\ndef f():\n    from .a import thing\n    return thing\n",  # b -> a, in a function
        "pkg/c.py": "from pkg import run\n",  # c -> pkg's __init__, which lazily exports a
        "pkg/sub/__init__.py": "from .leaf import x\n",
        "pkg/sub/leaf.py": "from ..c import y\n",
    })
    graph = import_graph(tmp_path, ("pkg",))
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.b", "pkg.c"}, "pkg.b": {"pkg.a"}, "pkg.c": {"pkg"},
                     "pkg.sub": {"pkg.sub.leaf"}, "pkg.sub.leaf": {"pkg.c"}}
    assert find_cycles(graph) == [["pkg", "pkg.a", "pkg.c", "pkg"]]  # one group: a, b, c and pkg
    assert find_cycles({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"c"}}) == [["a", "b", "a"], ["c", "d", "c"]]


def test_cycle_finder_passes_a_package_without_cycles(tmp_path):
    _write_package(tmp_path, {
        "pkg/__init__.py": '_EXPORTS = {"run": "a"}\nfrom . import b\n',
        "pkg/a.py": "from . import b\nfrom .b import f\n",
        "pkg/b.py": "def f():\n    from . import c\n    import pkg.c\n",
        "pkg/c.py": "import os\nfrom .d import g\n",
        "pkg/d.py": "g = 1\n",
    })
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.b"] == {"pkg.c"} and graph["pkg"] == {"pkg.a", "pkg.b"}
    assert find_cycles(graph) == []


# -- sizes --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_source_file_length(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, (f"{path.relative_to(ROOT)} has {n} lines (limit {MAX_LINES}): split the family "
                            f"into a package rather than raise the limit")


def test_readme_length():
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (limit {README_MAX_LINES}): move the manual into docs/"
