"""Issue 7's command-line conveniences: `generate --stop/--file/-/--ignore-eos/--threads` and `info`,
on the tiny random model, in a subprocess as a user runs them."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

import tinyllm
from tests.test_cli import tinyllm as run_cli
from tests.test_errors import assert_error_line
from tinyllm.api import until_stop

GENERATE = ("generate", "--raw", "--ops", "reference")


def test_stop_string_cuts_the_text_before_it(tiny_model_dir):
    full = run_cli(*GENERATE, "hello", "--ignore-eos", "--max-new-tokens", 40, "--model", tiny_model_dir)
    assert full.returncode == 0, full.stderr
    text = full.stdout[:-1]
    # three characters from the middle of the real output (three tokens: the tokenizer has one per byte)
    start = next(i for i in range(8, len(text) - 3) if "\ufffd" not in text[i:i + 3] and "\n" not in text[i:i + 3])
    stop = text[start:start + 3]
    r = run_cli(*GENERATE, "hello", "--ignore-eos", "--max-new-tokens", 40, "--model", tiny_model_dir,
                "--stop", "never produced", "--stop", stop, "--stats")
    assert r.returncode == 0, r.stderr
    assert r.stdout == text[:text.index(stop)] + "\n"
    assert "(stopped by stop)" in r.stderr


@pytest.mark.parametrize("pieces, expected", [
    (["ab", "cS", "TO", "Pxy"], ["ab", "c"]),  # the stop string arrives over three pieces
    (["aS", "T", "b", "c"], ["a", "STb", "c"]),  # "ST" looked like its start: held back, then released
    (["xSTOPy"], ["x"]),
    (["STOPy"], []),
    (["abS"], ["ab", "S"]),  # the text ended while a partial stop was held: it is not lost
])
def test_until_stop_holds_back_only_what_could_start_a_stop_string(pieces, expected):
    stopped = []
    out = list(until_stop(iter_gen(pieces), ["STOP", "zz"], lambda: stopped.append(True)))
    assert out == expected
    assert bool(stopped) == ("STOP" in "".join(pieces))


def iter_gen(items):
    yield from items  # a generator, as the model's text pieces are


def test_prompt_from_a_file_and_from_standard_input(tiny_model_dir, tmp_path):
    args = (*GENERATE, "--max-new-tokens", 12, "--model", tiny_model_dir)
    expected = run_cli(*args, "hello world")
    assert expected.returncode == 0, expected.stderr
    (tmp_path / "prompt.txt").write_text("hello world\n")  # the final newline is dropped, as an editor adds one
    from_file = run_cli(*args, "--file", tmp_path / "prompt.txt")
    from_stdin = run_cli(*args, "-", input="hello world\n")
    assert from_file.returncode == 0 and from_stdin.returncode == 0, from_file.stderr + from_stdin.stderr
    assert from_file.stdout == from_stdin.stdout == expected.stdout
    other = run_cli(*args, "-", input="other words")
    assert other.returncode == 0 and other.stdout != expected.stdout  # standard input really is the prompt


def test_ignore_eos(tiny_model_dir, tmp_path):
    # A copy of the tiny model whose end-of-sequence token is the first token it generates for "hello".
    model = tmp_path / "eos-first"
    shutil.copytree(tiny_model_dir, model)
    m = tinyllm.load(model, ops="reference")
    first = next(m.generate_ids(m.prompt_ids("hello", chat=False)))
    for name in ("config.json", "generation_config.json"):
        d = json.loads((model / name).read_text())
        (model / name).write_text(json.dumps({**d, "eos_token_id": first}))
    stops = run_cli(*GENERATE, "hello", "--model", model, "--stats")
    goes_on = run_cli(*GENERATE, "hello", "--model", model, "--stats", "--ignore-eos", "--max-new-tokens", 5)
    assert stops.returncode == 0 and goes_on.returncode == 0, stops.stderr + goes_on.stderr
    assert "new tokens: 0 " in stops.stderr and "(stopped by eos)" in stops.stderr
    assert "new tokens: 5 " in goes_on.stderr and "(stopped by max_new_tokens)" in goes_on.stderr


REPORT_THREADS = """
import os, sys
import numba
print("threads:", *(os.environ.get(v) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
      "NUMBA_NUM_THREADS")), numba.get_num_threads(), file=sys.stderr)
"""


def test_threads_set_blas_and_numba_before_they_load(tiny_model_dir, tmp_path):
    # Importing the command line loads no NumPy: --threads can still set what its BLAS reads at load.
    r = subprocess.run([sys.executable, "-c", "import sys, tinyllm.cli; print('numpy' in sys.modules)"],
                       capture_output=True, text=True)
    assert r.stdout.strip() == "False", r.stderr
    plugin = tmp_path / "report_threads.py"
    plugin.write_text(REPORT_THREADS)  # a plugin is imported after --threads is applied, like the kernels
    r = run_cli(*GENERATE, "hi", "--max-new-tokens", 2, "--threads", 1, "--plugin", plugin, "--model", tiny_model_dir,
                env={"OMP_NUM_THREADS": "2", "NUMBA_NUM_THREADS": "2"})  # the flag wins over the environment
    assert r.returncode == 0, r.stderr
    assert "threads: 1 1 1 1 1" in r.stderr


def expected_parameters(cfg: dict) -> int:
    """Parameters of a Llama model from its config.json, counted by hand."""
    D, F, L, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    d = cfg.get("head_dim") or D // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    per_layer = 2 * D + D * q + 2 * D * kv + q * D + 3 * D * F  # two norms, Q K V O, gate up down
    return V * D * (1 if cfg["tie_word_embeddings"] else 2) + L * per_layer + D  # + the final norm


def test_info(tiny_model_dir):
    from transformers import LlamaForCausalLM

    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    n = expected_parameters(cfg)
    assert LlamaForCausalLM.from_pretrained(tiny_model_dir).num_parameters() == n
    r = run_cli("info", "--model", tiny_model_dir, "--ops", "fused")
    assert r.returncode == 0, r.stderr
    assert f"parameters: {n:,} ({n / 1e6:.3g} M)" in r.stdout  # 43,392 is not "0.0 M"
    assert re.search(r"^  softmax +numba +\(inside attention, which the model calls", r.stdout, re.M)
    assert f"layers {cfg['num_hidden_layers']}, hidden size {cfg['hidden_size']}" in r.stdout
    assert "chat template: yes" in r.stdout and "<|im_start|> (1)" in r.stdout
    assert re.search(r"^  qkv_rope +fused ", r.stdout, re.M) and re.search(r"^  attention +numba", r.stdout, re.M)
    # fused's prepare step holds Wq, Wk and Wv of every layer concatenated: that many float32 bytes
    d = cfg["head_dim"]
    qkv = cfg["num_hidden_layers"] * (cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"]) * d
    made = re.search(r"float32 .*\(([\d,]+) bytes\)  made by qkv_rope=fused's prepare step", r.stdout)
    assert made and int(made.group(1).replace(",", "")) == qkv * cfg["hidden_size"] * 4, r.stdout
    reference = run_cli("info", "--model", tiny_model_dir, "--ops", "reference")
    assert "made by" not in reference.stdout
    loaded = re.search(r"float32 .*\(([\d,]+) bytes\)  loaded weights it reads", reference.stdout)
    assert int(loaded.group(1).replace(",", "")) == 4 * n


@pytest.mark.parametrize("args, message", [
    (("--file", "/no/such/prompt.txt"), "cannot read --file /no/such/prompt.txt"),
    (("-",), "the prompt from standard input is empty"),
    (("hi", "--file", "/etc/hostname"), "not both"),
    ((), "no prompt"),
    (("hi", "--stop", ""), "a stop string must be non-empty"),
    (("hi", "--threads", 0), "--threads must be at least 1"),
])
def test_bad_generate_input(tiny_model_dir, args, message):
    assert_error_line(run_cli("generate", *args, "--model", tiny_model_dir), message)


def test_bad_prompt_file_bytes(tiny_model_dir, tmp_path):
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    assert_error_line(run_cli("generate", "--file", tmp_path / "latin1.txt", "--model", tiny_model_dir),
                      "the prompt is not valid UTF-8 text (byte 0xe9")
    assert_error_line(run_cli("chat", "--model", tiny_model_dir, input=b"caf\xe9\n"),
                      "the message is not valid UTF-8 text (byte 0xe9")
