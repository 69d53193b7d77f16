"""The docs stay true: every `file::name` that README.md and docs/ point at exists, every `python -m tinyllm ...`
line they show parses with the CLI's own parser, every relative link leads to a file, and every command in
docs/TOUR.md runs."""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]
TOUR = (ROOT / "docs" / "TOUR.md").read_text()
CODE_REFERENCE = re.compile(r"`((?:tinyllm|ops|tests|benchmarks)/[\w/]+\.py)(?:::([\w.]+))?`")


def page_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_code_reference_exists(page):
    refs = CODE_REFERENCE.findall(page.read_text())
    if page.name == "TOUR.md":
        assert len(refs) > 30, "the tour lost its code references"
    missing = []
    for path, name in refs:
        file = ROOT / path
        if not file.is_file():
            missing.append(path)
            continue
        source = file.read_text()
        for part in name.split(".") if name else []:  # Class.method: both must be defined in the file
            if not re.search(rf"^\s*(def|class) {part}\b|^{part}\s*(:[^=\n]*)?=", source, re.M):
                missing.append(f"{path}::{name}")
    assert not missing, f"{page_id(page)} points at names that are not there: {', '.join(missing)}"


def code_lines(text: str) -> list[str]:
    """The lines a reader would type: inside ``` fences, or indented 4 spaces outside them."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif fenced or line.startswith("    "):
            lines.append(line)
    return lines


def cli_commands(text: str) -> list[str]:
    """Each code line that runs `python -m tinyllm`, as written."""
    return [line.strip() for line in code_lines(text) if "python -m tinyllm" in line]


def cli_argv(command: str) -> list[str]:
    """The arguments after `python -m tinyllm`, read like a shell: quotes, comments, and the command cut at
    a pipe, `;`, `&&` or a redirection (so a quoted `|` or `;` argument would cut it too: the docs have none)."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    tokens = list(lexer)
    segments, current = [], []
    for token in tokens:
        if token and set(token) <= set("|&;<>()"):
            segments.append(current)
            current = []
        else:
            current.append(token)
    segments.append(current)
    for words in segments:
        for i in range(len(words) - 2):
            if words[i:i + 3] == ["python", "-m", "tinyllm"]:
                return words[i + 3:]
    raise AssertionError(f"no `python -m tinyllm` in {command!r}")


DOC_COMMANDS = [(page_id(page), command) for page in PAGES for command in cli_commands(page.read_text())]


def test_the_docs_have_commands():
    assert len(DOC_COMMANDS) > 40
    assert {page for page, _ in DOC_COMMANDS} >= {"README.md", "docs/TOUR.md", "docs/cli.md"}


@pytest.mark.parametrize("page,command", DOC_COMMANDS, ids=[f"{p}: {c}" for p, c in DOC_COMMANDS])
def test_every_command_in_the_docs_parses(page, command, capsys):
    from tinyllm.cli import build_parser

    argv = cli_argv(command)
    asks_for_help = any(a in ("-h", "--help", "--version") for a in argv)
    try:
        build_parser().parse_args(argv)
    except SystemExit as e:
        if not (asks_for_help and e.code == 0):
            pytest.fail(f"{page}: `{command}` does not parse:\n{capsys.readouterr().err}")
    else:
        assert not asks_for_help, f"{page}: `{command}` should have printed help and exited"


def test_the_command_reader_reads_like_a_shell():
    assert cli_argv("python -m tinyllm ops -v   # what runs") == ["ops", "-v"]
    assert cli_argv("""printf 'a\\nb\\n' | python -m tinyllm chat --show-prompt""") == ["chat", "--show-prompt"]
    assert cli_argv("""$ python -m tinyllm generate "Hi there" --stop '.' > out.txt""") == [
        "generate", "Hi there", "--stop", "."]
    assert cli_argv("pip install -e . && python -m tinyllm generate x --raw") == ["generate", "x", "--raw"]


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_relative_link_leads_to_a_file(page):
    links = re.findall(r"\]\(([^)\s]+)\)", page.read_text())
    broken = [link for link in links if not re.match(r"[a-z]+:", link) and not link.startswith("#")
              and not (page.parent / link.split("#")[0]).exists()]
    assert not broken, f"{page_id(page)} links to files that are not there: {broken}"


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
