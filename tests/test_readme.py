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


def test_custom_variant_example_works_as_written(tmp_path, real_model_dir):
    """The README's worked example: its plugin file and its three commands, run as written."""
    import os
    import shlex
    import subprocess
    import sys

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Writing your own variant"):]
    code = re.search(r"```python\n# my_variants.py\n(.*?)```", section, re.S).group(1)
    (tmp_path / "my_variants.py").write_text(code)
    commands = re.findall(r"^ {4}(python -m tinyllm .*--plugin my_variants\.py.*)$", section, re.M)
    assert len(commands) == 3
    env = {**os.environ, "TINYLLM_HOME": str(real_model_dir.parent)}
    out = {}
    for command in commands:
        argv = shlex.split(command)
        r = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, capture_output=True, text=True, env=env,
                           timeout=600)
        assert r.returncode == 0, f"{command}\n{r.stderr}"
        out[argv[3]] = r.stdout
    assert "PASS rmsnorm=rsqrt" in out["check"]
    assert "*rsqrt" in next(line for line in out["ops"].splitlines() if line.startswith("rmsnorm "))
    assert out["generate"].startswith(" Paris")
