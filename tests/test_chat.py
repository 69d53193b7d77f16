"""`tinyllm chat` (issue 7): history through the chat template, /reset and /exit, dropping old exchanges
when the context is full, Ctrl-C during an answer; driven through a pipe on the tiny random model."""
from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys

import pytest

import tinyllm
from tests.test_cli import tinyllm as run_cli
from tests.test_errors import assert_error_line
from tinyllm.chat import ChatSession

OPTIONS = ("--ops", "reference", "--max-new-tokens", 6)


@pytest.fixture
def long_context_model(tiny_model_dir, tmp_path):
    """The tiny model with a context of 4096 positions (RoPE tables are computed, so any length works):
    room for a whole conversation of byte-sized tokens."""
    path = tmp_path / "long-context"
    shutil.copytree(tiny_model_dir, path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 4096}))
    return path


def chat_turn(user, assistant=None):
    """The tiny model's chat template (tests/conftest.py) rendered by hand, for one exchange."""
    text = f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    return text if assistant is None else text + f"{assistant}<|im_end|>\n"


def shown_prompts(stderr: str) -> list[str]:
    return re.findall(r"--- prompt \(\d+ tokens\) ---\n(.*?)\n--- answer ---", stderr, re.S)


def test_chat_through_a_pipe_keeps_history_until_reset(long_context_model):
    model = long_context_model
    # The first answer, computed apart: the same greedy decoding of the first message alone.
    first = run_cli("generate", "first message", "--model", model, *OPTIONS)
    assert first.returncode == 0, first.stderr
    first_answer = first.stdout[:-1]

    r = run_cli("chat", "--model", model, *OPTIONS, "--show-prompt",
                input="first message\nsecond message\n/reset\nthird message\n/exit\nnever sent\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(first_answer + "\n")
    prompts = shown_prompts(r.stderr)
    assert prompts == [
        chat_turn("first message"),
        chat_turn("first message", first_answer) + chat_turn("second message"),  # the first exchange is kept
        chat_turn("third message"),  # /reset forgot both
    ]
    assert "never sent" not in r.stdout + r.stderr  # /exit left before it


def test_chat_system_message_and_end_of_input(long_context_model):
    r = run_cli("chat", "--model", long_context_model, *OPTIONS, "--show-prompt", "--system", "Be brief.",
                input="hello\n")  # no /exit: the end of input leaves
    assert r.returncode == 0, r.stderr
    assert shown_prompts(r.stderr) == ["<|im_start|>system\nBe brief.<|im_end|>\n" + chat_turn("hello")]


def test_oldest_exchanges_are_dropped_when_the_context_is_full(tiny_model_dir):
    model = tinyllm.load(tiny_model_dir, ops="reference")  # a context of 64 byte tokens
    notices = []
    session = ChatSession(model, system="S.", notify=notices.append, max_new_tokens=8)
    session.conversation.exchanges = [("a" * 12, "b" * 12), ("c", "d")]
    ids = session.prompt_ids("hi")
    assert session.conversation.exchanges == [("c", "d")]  # the oldest went, the one that fits stayed
    assert len(ids) <= 64 - 8  # room for the answer
    assert ids == model.chat_ids([{"role": "system", "content": "S."}, {"role": "user", "content": "c"},
                                  {"role": "assistant", "content": "d"}, {"role": "user", "content": "hi"}])
    assert len(notices) == 1 and "dropped the oldest 1 exchange(s); the system message is kept" in notices[0]
    # and the whole history alone would not have fitted: the drop was needed
    assert len(model.chat_ids([{"role": "system", "content": "S."}, {"role": "user", "content": "a" * 12},
                               {"role": "assistant", "content": "b" * 12}, {"role": "user", "content": "c"},
                               {"role": "assistant", "content": "d"}, {"role": "user", "content": "hi"}])) > 56


def test_an_answer_is_recorded_with_what_was_shown(tiny_model_dir):
    model = tinyllm.load(tiny_model_dir, ops="reference")
    session = ChatSession(model, max_new_tokens=5, ignore_eos=True)
    answer = session.reply("hi")
    first_piece = next(answer)
    answer.close()  # as when Ctrl-C stops the answer
    assert session.conversation.exchanges == [("hi", first_piece)]


def test_ctrl_c_stops_the_answer_not_the_chat(long_context_model):
    proc = subprocess.Popen([sys.executable, "-m", "tinyllm", "chat", "--model", str(long_context_model), "--ops",
                             "reference", "--ignore-eos", "--max-new-tokens", "3000"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        proc.stdin.write(b"tell me everything\n")
        proc.stdin.flush()
        assert proc.stdout.read(1)  # the answer is streaming
        proc.send_signal(signal.SIGINT)
        proc.stdin.write(b"/reset\n")  # read only once the chat is back at its prompt
        proc.stdin.flush()
        lines = []  # until the chat answers /reset; if Ctrl-C ended it instead, stderr ends: fail, not hang
        while not lines or b"(conversation cleared)" not in lines[-1]:
            lines.append(proc.stderr.readline())
            assert lines[-1], b"chat ended after Ctrl-C during an answer:\n" + b"".join(lines)
        proc.send_signal(signal.SIGINT)  # at the prompt, Ctrl-C leaves like everywhere else
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and b"Traceback" not in stderr, stderr.decode()


def test_a_model_without_chat_template_cannot_chat(tiny_model_dir, tmp_path):
    model = tmp_path / "no-template"
    shutil.copytree(tiny_model_dir, model)
    tok_config = json.loads((model / "tokenizer_config.json").read_text())
    del tok_config["chat_template"]
    (model / "tokenizer_config.json").write_text(json.dumps(tok_config))
    assert_error_line(run_cli("chat", "--model", model, input="hi\n"), "has no chat template")


def test_an_error_in_a_piped_message_ends_the_chat(tiny_model_dir):
    r = run_cli("chat", "--model", tiny_model_dir, *OPTIONS, input="x" * 100 + "\n")  # past the context of 64
    assert_error_line(r, "the model's context is 64")
