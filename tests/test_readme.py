"""CI must run exactly the README's set-up commands, so the README cannot drift from what is tested."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_install_and_test_command():
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"^ {4}(pip install .*\[test\].*) && (python -m pytest.*)$", readme, re.M)
    assert match, "README lost its test command"
    install, test = match.groups()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert install in ci and test in ci
