"""`python -m tinyllm` end to end, in a subprocess, as a user runs it."""
import json
import os
import shutil
import subprocess
import sys

import pytest


def tinyllm(*args, timeout=300, env=None, input=""):
    """Run `python -m tinyllm ARGS` as a user would; `env` adds to (or overrides) the environment;
    `input` is standard input (bytes or text; empty by default, never the terminal's)."""
    if isinstance(input, bytes):
        input = input.decode("utf-8", "surrogateescape")  # text mode writes it back as the same bytes
    return subprocess.run([sys.executable, "-m", "tinyllm", *map(str, args)], capture_output=True, text=True,
                          errors="surrogateescape", input=input, timeout=timeout, env={**os.environ, **(env or {})})


def test_help_and_version():
    r = tinyllm("--help")
    assert r.returncode == 0 and "generate" in r.stdout and "pull" in r.stdout
    r = tinyllm("generate", "--help")
    assert r.returncode == 0 and "greedy" in r.stdout and "--temperature" in r.stdout
    assert tinyllm("--version").stdout.startswith("tinyllm ")


def test_seed_reproducibility_and_stats(tiny_model_dir):
    args = ("generate", "hello", "--model", tiny_model_dir, "--raw", "--max-new-tokens", 8, "--temperature", 1.0)
    a = tinyllm(*args, "--seed", 3)
    b = tinyllm(*args, "--seed", 3, "--stats")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert a.stdout == b.stdout
    assert "time to first token" in b.stderr and "decode" in b.stderr


# Bad models, prompts and generate arguments: tests/test_errors.py
@pytest.mark.parametrize("args, message", [
    (("check", "rope", "--json", "/no/such/dir/out.json"), "does not exist"),
    (("bench", "--new-tokens", 1), "--new-tokens must be at least 2"),
    (("bench", "--threads", 0), "--threads must be at least 1"),
])
def test_bad_input_is_one_error_line_and_exit_2(tiny_model_dir, args, message):
    if "--model" not in args and args[0] != "check":
        args = (*args, "--model", tiny_model_dir)
    r = tinyllm(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], r.stderr


def test_context_limit_is_a_warning(tiny_model_dir, tmp_path):
    # a copy of the tiny model without an end-of-sequence token, so only the context can stop it
    model = tmp_path / "no-eos"
    shutil.copytree(tiny_model_dir, model)
    for name, key in [("config.json", "eos_token_id"), ("generation_config.json", "eos_token_id"),
                      ("tokenizer_config.json", "eos_token")]:
        d = json.loads((model / name).read_text())
        d[key] = None
        (model / name).write_text(json.dumps(d))
    r = tinyllm("generate", "a" * 60, "--raw", "--model", model, "--max-new-tokens", 50, "--stats")
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[0] == "warning: stopped at the model's context limit of 64 tokens"
    assert "new tokens: 4 " in lines[1]


@pytest.mark.real_model
def test_generate_real_model(real_model_dir, golden):
    r = tinyllm("generate", "The capital of France is", "--raw", "--max-new-tokens", 8, "--model", real_model_dir)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(" Paris")

    chat_case = next(c for c in golden["greedy"] if c["chat"])
    chat = tinyllm("generate", chat_case["prompt"], "--model", real_model_dir)
    raw = tinyllm("generate", chat_case["prompt"], "--raw", "--max-new-tokens", 12, "--model", real_model_dir)
    assert chat.returncode == 0 and raw.returncode == 0
    assert chat.stdout == chat_case["text"].replace("<|im_end|>", "") + "\n"
    assert raw.stdout != chat.stdout
