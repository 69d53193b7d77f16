"""docs/TOUR.md stays true: every `file::name` it points at exists, and every command in it runs."""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOUR = (ROOT / "docs" / "TOUR.md").read_text()


def test_every_code_reference_exists():
    refs = re.findall(r"`((?:tinyllm|ops|tests)/[\w/]+\.py)(?:::([\w.]+))?`", TOUR)
    assert len(refs) > 30, "the tour lost its code references"
    for path, name in refs:
        source = (ROOT / path).read_text()
        for part in name.split(".") if name else []:  # Class.method: both must be defined in the file
            assert re.search(rf"^\s*(def|class) {part}\b|^{part} = ", source, re.M), f"{path}::{name} not found"


def tour_commands():
    return re.findall(r"^ {4}(python -m tinyllm .*)$", TOUR, re.M)


def test_the_tour_has_its_commands():
    kinds = {shlex.split(c)[3] for c in tour_commands()}
    assert {"generate", "ops", "check", "bench", "eval"} <= kinds


@pytest.fixture(scope="module")
def tour_dir(tmp_path_factory):
    """Where the tour's commands run, one after another: what one writes (`quantize --out weights/...`)
    the next reads, and nothing lands in the checkout."""
    path = tmp_path_factory.mktemp("tour")
    (path / "weights").mkdir()
    return path


@pytest.mark.real_model
@pytest.mark.parametrize("command", tour_commands())
def test_tour_command_runs(command, real_model_dir, tour_dir):
    env = {**os.environ, "TINYLLM_HOME": str(real_model_dir.parent)}  # the pulled default model
    argv = shlex.split(command)
    r = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True, env=env, timeout=600,
                       cwd=tour_dir)
    assert r.returncode == 0, f"{command}\n{r.stderr}"
    kind = argv[3]
    if kind == "generate":
        assert r.stdout.startswith(" Paris") and "decode:" in r.stderr
    elif kind == "check":
        assert r.stdout.splitlines()[-1] == "1 passed, 0 failed"
    elif kind == "bench":
        specs = [argv[i + 1] for i, a in enumerate(argv) if a == "--ops"]
        assert all(line_starting(r.stdout, spec) for spec in specs)
        if "--profile" in argv:
            assert all(f"decode step profile, {spec} " in r.stdout for spec in specs)
    elif kind == "ops":
        assert "why the tolerances:" in r.stdout
    elif kind == "eval":  # a row per schedule, reference first and exact against itself
        specs = [argv[i + 1] for i, a in enumerate(argv) if a == "--ops"]
        specs += [f"{argv[i + 1].split('-')[-1]} @ {argv[i + 1]}" for i, a in enumerate(argv) if a == "--quantized"]
        rows = [line.rsplit(None, 3) for line in r.stdout.splitlines()[3:]]
        assert [row[0] for row in rows] == ["reference", *specs]
        assert rows[0][2:] == ["0", "100.00%"] and all(float(row[1]) > 1 for row in rows)
    elif kind == "quantize":
        assert r.stdout.startswith("wrote weights/") and "GPTQ rounding" in r.stdout


def line_starting(text: str, prefix: str) -> bool:
    return any(line.startswith(prefix + " ") for line in text.splitlines())
