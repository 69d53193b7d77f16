"""`tinyllm quantize`: a model saved with its projections in a quantised format loads without quantising
anything and computes, bit for bit, what the source model computes on the same schedule; the stored
tensors are the formats' fields; bad input is one error line and leaves nothing behind."""
from __future__ import annotations

import json
import re
import shutil
import warnings
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save, save_file

import tinyllm
from ops.quant import BLOCK, FORMATS
from tests.conftest import build_tiny_llama, write_byte_tokenizer
from tests.test_cli import tinyllm as run_cli
from tests.test_cli_conveniences import expected_parameters
from tests.test_errors import assert_error_line, plugin, snapshot
from tests.test_fuzz_readers import big_ints, header_of, outcome, with_header
from tinyllm.checkpoint import projection_op
from tinyllm.config import Config
from tinyllm.errors import ModelError
from tinyllm.loading import load_weights, read_safetensors
from tinyllm.model import Transformer
from tinyllm.quantize import projection_formats, quantize
from tinyllm.schedule import apply, parse
from tinyllm.stored import LAYOUT, RECORD_KEY, Record, format_name, parts

PRESETS = ["int8", "q8_0", "q4_0", "q4_1"]
PROMPT = [3, 14, 15, 92, 65, 35, 89, 79, 32]


@pytest.fixture(scope="module")
def block_model_dir(tmp_path_factory) -> Path:
    """A tiny random model whose rows are all a multiple of 32 long (hidden 64, MLP 96, Q 4 x 16), so every
    format applies; tied head, like SmolLM2."""
    path = tmp_path_factory.mktemp("block-model")
    vocab = write_byte_tokenizer(path)
    build_tiny_llama(path, hidden=64, n_heads=4, n_kv_heads=2, head_dim=16, ffn=96, vocab=vocab, max_pos=64, tied=True)
    return path


@pytest.fixture(scope="module")
def quantized_dirs(block_model_dir, tmp_path_factory) -> dict[str, Path]:
    """The block model quantised for every preset, through the command line."""
    out = {}
    for preset in PRESETS:
        out[preset] = tmp_path_factory.mktemp("quantized") / preset
        r = run_cli("quantize", "--ops", preset, "--out", out[preset], "--model", block_model_dir, "--rounding", "nearest")
        assert r.returncode == 0 and r.stderr == "", r.stderr
        assert r.stdout.startswith(f"wrote {out[preset]}: ") and "MiB on disk" in r.stdout
    return out


def no_quantize(monkeypatch):
    """Make every format's quantise step fail: what runs after this must use the stored values."""
    def refuse(cls, w):
        raise AssertionError(f"{cls.__name__}.quantize was called")

    for cls in FORMATS.values():
        monkeypatch.setattr(cls, "quantize", classmethod(refuse))


def stored_format(preset: str, name: str) -> str | None:
    """The format a preset stores tensor `name` in (None: float32): the format its op reads it in."""
    op = projection_op(name)
    return projection_formats(parse(preset))[op] if op else None


# ------------------------------------------------------------------------------ the layout


@pytest.mark.parametrize("fmt", PRESETS)
def test_layout_table_is_what_the_formats_hold(fmt):
    w = np.random.default_rng(0).standard_normal((5, 3 * BLOCK)).astype(np.float32)
    q = FORMATS[fmt].quantize(w)
    assert set(LAYOUT[fmt]) == {f.name for f in fields(q)}
    dtypes = {"F32": np.float32, "F16": np.float16, "I8": np.int8, "U8": np.uint8}
    for field, (dtype, shape) in LAYOUT[fmt].items():
        value = getattr(q, field)
        assert value.dtype == dtypes[dtype] and value.shape == shape(*w.shape), field


# ------------------------------------------------------------------------------ what is stored


@pytest.mark.parametrize("preset", PRESETS)
def test_stored_tensors_are_the_formats_fields(block_model_dir, quantized_dirs, preset):
    source = load_weights(block_model_dir)
    path = quantized_dirs[preset] / "model.safetensors"
    stored = load_file(path)  # the safetensors package: an independent reader
    with safe_open(path, "np") as f:
        record = json.loads(f.metadata()[RECORD_KEY])
    expected = {name: stored_format(preset, name) for name in source if stored_format(preset, name)}
    expected["lm_head.weight"] = stored_format(preset, "lm_head.weight")  # tied: a copy of the embedding
    assert record == {"version": 1, "ops": preset, "tensors": expected, "rounding": "nearest"}
    dtypes = {"F32": np.float32, "F16": np.float16, "I8": np.int8, "U8": np.uint8}
    for name, fmt in expected.items():
        w = source["model.embed_tokens.weight" if name == "lm_head.weight" else name]
        q = FORMATS[fmt].quantize(w)
        for field, (dtype, _) in LAYOUT[fmt].items():
            part = stored.pop(f"{name}.{field}")
            assert part.dtype == dtypes[dtype]
            np.testing.assert_array_equal(part, getattr(q, field), err_msg=f"{name}.{field}")
    for name, value in stored.items():  # what is left: the float32 tensors, as in the source
        assert value.dtype == np.float32 and stored_format(preset, name) is None, name
        np.testing.assert_array_equal(value, source[name])
    assert set(stored) | set(expected) == set(source) | {"lm_head.weight"}
    for name in ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]:
        assert (quantized_dirs[preset] / name).read_bytes() == (block_model_dir / name).read_bytes()


@pytest.mark.parametrize("preset", PRESETS)
def test_loads_without_quantising_and_computes_what_the_source_does(block_model_dir, quantized_dirs, preset,
                                                                      monkeypatch):
    with monkeypatch.context() as patch:
        no_quantize(patch)
        model = tinyllm.load(quantized_dirs[preset])  # its default schedule: the one it was made for
        assert model.schedule.spec == preset
        logits = model.logits(PROMPT)
        first = model.prefill(PROMPT[:4])
        steps = [model.step(t) for t in PROMPT[4:]]
    source = tinyllm.load(block_model_dir, ops=preset)
    np.testing.assert_array_equal(logits, source.logits(PROMPT))
    np.testing.assert_array_equal(first, source.prefill(PROMPT[:4]))
    np.testing.assert_array_equal(np.array(steps), np.array([source.step(t) for t in PROMPT[4:]]))


def test_other_schedules_start_from_the_float32_the_stored_values_stand_for(block_model_dir, quantized_dirs,
                                                                           monkeypatch):
    """A float32 schedule runs on the dequantised projections (and a tied head on the embedding itself),
    another format quantises those; switching back to the stored format quantises nothing."""
    path = quantized_dirs["q4_1"]
    stored = load_weights(path)
    dequantized = {name: v if isinstance(v, np.ndarray) else v.dequantize() for name, v in stored.items()}
    del dequantized["lm_head.weight"]  # tied: the head is the embedding
    expected = Transformer(Config.from_dir(path), dequantized)
    apply(expected, parse("reference"))

    model = tinyllm.load(path, ops="reference")
    np.testing.assert_array_equal(model.logits(PROMPT), expected.forward(PROMPT))
    # the embedding's values (moved into huge pages like every streamed weight), not the q8_0 copy dequantised
    np.testing.assert_array_equal(model.transformer.head.weight, model.transformer.embed)
    assert not np.array_equal(stored["lm_head.weight"].dequantize(), model.transformer.embed)  # so that tells

    model.use("int8,norm_head=int8")  # the head too in int8, not in the stored copy's q8_0
    int8 = FORMATS["int8"].quantize
    head, wo = model.transformer.head.weight.fmt, model.transformer.layers[1].wo.fmt
    np.testing.assert_array_equal(head.q, int8(stored["model.embed_tokens.weight"]).q)  # from the embedding
    np.testing.assert_array_equal(wo.q, int8(dequantized["model.layers.1.self_attn.o_proj.weight"]).q)

    with monkeypatch.context() as patch:
        no_quantize(patch)
        model.use("q4_1")
        np.testing.assert_array_equal(model.logits(PROMPT), tinyllm.load(path).logits(PROMPT))


def test_quantising_a_quantised_model(quantized_dirs, tmp_path, monkeypatch):
    """The same format again: the stored values as they are (nothing quantised, the same bytes); another
    format: from the dequantised values, with a warning (the tied head from the float32 embedding)."""
    with monkeypatch.context() as patch:
        no_quantize(patch)
        quantize(quantized_dirs["q4_1"], "q4_1", tmp_path / "again", progress=False, rounding="nearest")
    assert snapshot(tmp_path / "again") == snapshot(quantized_dirs["q4_1"])
    with pytest.warns(UserWarning, match="holds 14 matrices quantised in another format"):
        quantize(quantized_dirs["q4_1"], "int8,norm_head=int8", tmp_path / "int8", progress=False, rounding="nearest")
    stored, source = load_weights(tmp_path / "int8"), load_weights(quantized_dirs["q4_1"])
    np.testing.assert_array_equal(stored[WO].q, FORMATS["int8"].quantize(source[WO].dequantize()).q)
    np.testing.assert_array_equal(stored["lm_head.weight"].q,
                                  FORMATS["int8"].quantize(source["model.embed_tokens.weight"]).q)


def test_an_untied_head_is_stored_as_itself(tmp_path, monkeypatch):
    source = tmp_path / "untied"
    source.mkdir()
    vocab = write_byte_tokenizer(source)
    build_tiny_llama(source, n_layers=1, hidden=32, n_heads=2, n_kv_heads=1, head_dim=16, ffn=64, vocab=vocab,
                     max_pos=32, tied=False)
    quantize(source, "q4_0", tmp_path / "q4_0", progress=False, rounding="nearest")
    head = load_weights(source)["lm_head.weight"]
    stored = load_weights(tmp_path / "q4_0")["lm_head.weight"]
    np.testing.assert_array_equal(stored.qs, FORMATS["q8_0"].quantize(head).qs)  # the quantised presets' head: q8_0
    with monkeypatch.context() as patch:
        no_quantize(patch)
        logits = tinyllm.load(tmp_path / "q4_0").logits(PROMPT)
    np.testing.assert_array_equal(logits, tinyllm.load(source, ops="q4_0").logits(PROMPT))
    reference = tinyllm.load(tmp_path / "q4_0", ops="reference")
    np.testing.assert_array_equal(reference.transformer.head.weight, stored.dequantize())


def test_ops_and_info_say_what_the_directory_holds(block_model_dir, quantized_dirs):
    r = run_cli("ops", "--model", quantized_dirs["q4_0"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("schedule: q4_0\n")  # its default schedule
    assert "stored quantised by `tinyllm quantize --ops q4_0`" in r.stdout
    assert re.search(r"^  q4_0 +q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj \(14 matrices\)$",
                     r.stdout, re.M), r.stdout
    assert re.search(r"^  q8_0 +lm_head \(1 matrix\)$", r.stdout, re.M)
    assert re.search(r"^linear +.*\*q4_0", r.stdout, re.M)
    plain = run_cli("ops", "--model", block_model_dir, "--ops", "reference")
    assert "float weights (not quantised" in plain.stdout

    cfg = json.loads((block_model_dir / "config.json").read_text())
    r = run_cli("info", "--model", quantized_dirs["q8_0"])
    assert r.returncode == 0, r.stderr
    n = expected_parameters(cfg)
    assert f"parameters: {n:,} " in r.stdout  # a quantised matrix counts its values, the tied head once
    assert "weights in memory (schedule q8_0):" in r.stdout
    # The q8_0 kernels read Q8_0 repacked, 64 rows side by side (ops/quant/tiles.py::row_tiles): every
    # matrix is copied at load, its rows padded to a multiple of 64; N x K int8 values and N x K/32
    # scales widened to float32. Nothing of the directory's Q8_0 is read as loaded.
    D, F, L, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    H, KV = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    pad = lambda rows: -(-rows // 64) * 64  # noqa: E731
    values = L * (pad(H + 2 * KV) * D + pad(D) * H + 2 * pad(F) * D + pad(D) * F) + pad(V) * D
    made = {dtype: sum(int(n.replace(",", "")) for n in re.findall(rf"^  {dtype} .*\(([\d,]+) bytes\)  made by", r.stdout, re.M))
            for dtype in ("int8", "float32")}
    assert made == {"int8": values, "float32": values // BLOCK * 4}, r.stdout
    assert not re.search(r"^  q8_0 .*loaded weights it reads$", r.stdout, re.M), r.stdout


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("args, message", [
    (("--ops", "q9"), "unknown preset 'q9'"),
    (("--ops", "fused"), "--ops fused reads every projection as float32: there is nothing to quantise"),
    (("--ops", "q4_0", "--model", "TINY"),  # hidden size 48: the head, first, is a q8_0 copy of the embedding
     "q8_0 stores rows in blocks of 32, and lm_head.weight has rows of 48 values"),
    (("--ops", "int8", "--out", "FILE"), "is a file; give a directory"),
    (("--ops", "int8", "--out", "FULL"), "exists and is not empty; choose a new directory, or --force"),
    (("--ops", "int8", "--out", "MISSING/out"), "does not exist"),
    (("--ops", "int8", "--out", "SOURCE"), "is the source model or holds it"),
    (("--ops", "int8", "--out", "ABOVE", "--force"), "is the source model or holds it"),
    (("--ops", "int8", "--model", "NOWHERE"), "does not exist"),
])
def test_bad_input_is_one_error_line_and_leaves_nothing(block_model_dir, tiny_model_dir, tmp_path, args, message):
    work = tmp_path / "work"
    source = work / "source"
    shutil.copytree(block_model_dir, source)
    (work / "FILE").write_text("mine")
    (work / "FULL").mkdir()
    (work / "FULL" / "keep.txt").write_text("mine")
    names = {"TINY": tiny_model_dir, "FILE": work / "FILE", "FULL": work / "FULL", "SOURCE": source, "ABOVE": work,
             "MISSING/out": work / "missing" / "out", "NOWHERE": work / "nowhere"}
    args = [names.get(a, a) for a in args]
    if "--out" not in args:
        args += ["--out", work / "new"]
    if "--model" not in args:
        args += ["--model", source]
    before = snapshot(work)
    r = run_cli("quantize", *args)
    assert_error_line(r, message)
    assert snapshot(work) == before and sorted(p.name for p in work.iterdir()) == ["FILE", "FULL", "source"]


def test_missing_options_are_usage_errors():
    r = run_cli("quantize", "--ops", "int8")
    assert_error_line(r, "the following arguments are required: --out", allowed=("usage:",))


def test_force_replaces_a_directory_only_when_the_new_one_is_complete(block_model_dir, quantized_dirs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    r = run_cli("quantize", "--ops", "q8_0", "--out", out, "--model", block_model_dir, "--force", "--rounding", "nearest")
    assert r.returncode == 0, r.stderr
    assert not (out / "old.txt").exists()
    assert snapshot(out) == snapshot(quantized_dirs["q8_0"])  # the same bytes, every time
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary directory left


@pytest.mark.parametrize("out", [".", "..", "here/.."])
def test_the_working_directory_is_refused_as_out(block_model_dir, tmp_path, monkeypatch, out):
    # it cannot be renamed away (`.`: "Device or resource busy", after all the work), and the summary and
    # the shell would be left standing in a deleted directory
    work = tmp_path / "work"
    (work / "here").mkdir(parents=True)
    (work / "here" / "mine.txt").write_text("mine")
    monkeypatch.chdir(work / "here" if out != "here/.." else work)
    before = {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")}
    with pytest.raises(tinyllm.TinyLLMError, match="is the current directory or holds it") as e:
        quantize(block_model_dir, "q8_0", out, force=True, progress=False)
    assert "\n" not in str(e.value)
    assert {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")} == before


def test_a_failed_move_of_the_old_directory_leaves_nothing_behind(tmp_path, monkeypatch):
    import os

    from tinyllm import files

    new, old = tmp_path / "new", tmp_path / "out"
    new.mkdir()
    old.mkdir()
    (old / "old.txt").write_text("old")
    real_replace = os.replace

    def refuse_to_move_the_old_one(src, dst):
        if Path(src) == old:
            raise PermissionError(13, "Permission denied")
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", refuse_to_move_the_old_one)
    with pytest.raises(PermissionError):
        files.move_dir_into_place(new, old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "out"]  # no hidden .out.old-* directory
    assert (old / "old.txt").read_text() == "old"


INTERRUPT_WRITE = """
import os, signal, time
import safetensors.numpy
real_save = safetensors.numpy.save_file
def interrupted(tensors, filename, metadata=None):
    real_save(tensors, filename, metadata=metadata)  # the weights are written, the directory is not complete
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)
safetensors.numpy.save_file = interrupted
"""


def test_ctrl_c_while_writing_leaves_the_old_directory_as_it_was(block_model_dir, tmp_path):
    work = tmp_path / "work"
    (work / "out").mkdir(parents=True)
    (work / "out" / "old.txt").write_text("old")
    before = snapshot(work)
    r = run_cli("quantize", "--ops", "q4_1", "--out", work / "out", "--force", "--model", block_model_dir,
                "--plugin", plugin(tmp_path, INTERRUPT_WRITE))
    assert r.returncode == 130 and "Traceback" not in r.stderr, r.stderr
    assert snapshot(work) == before and sorted(p.name for p in work.iterdir()) == ["out"]


FULL_DISK = """
import safetensors, safetensors.numpy
def full(tensors, filename, metadata=None):
    open(filename, "wb").write(b"half")
    raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
safetensors.numpy.save_file = full
"""


def test_a_failed_write_is_one_error_line_and_leaves_nothing(block_model_dir, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    r = run_cli("quantize", "--ops", "q8_0", "--out", work / "out", "--model", block_model_dir,
                "--plugin", plugin(tmp_path, FULL_DISK))
    assert_error_line(r, f"cannot write {work / 'out'}: Error while serializing: I/O error: No space left on device")
    assert list(work.iterdir()) == []


# ------------------------------------------------------------------------------ bad quantised files


def edit_stored(model: Path, change) -> None:
    """Rewrite a quantised model's safetensors with `change(tensors, record)` applied (metadata kept)."""
    path = model / "model.safetensors"
    tensors = load_file(path)
    with safe_open(path, "np") as f:
        record = json.loads(f.metadata()[RECORD_KEY])
    changed = change(tensors, record)
    record = changed if isinstance(changed, (str, dict)) else record
    metadata = {RECORD_KEY: record if isinstance(record, str) else json.dumps(record)}
    save_file(tensors, str(path), metadata=metadata)


WO = "model.layers.1.self_attn.o_proj.weight"


def _retype(tensors, name, dtype):
    tensors[name] = tensors[name].view(dtype)


def store_as_int8(tensors, record, name):
    """Store float tensor `name` as an int8 matrix (a 1-D norm as one row)."""
    w = np.atleast_2d(tensors.pop(name))
    tensors.update(parts(name, FORMATS["int8"].quantize(w)))
    record["tensors"][name] = "int8"


BAD_FILES = [
    ("a part missing", lambda t, r: t.pop(f"{WO}.m"), f"the q4_1 matrix '{WO}' has no tensor '{WO}.m'"),
    ("a part of the wrong dtype", lambda t, r: _retype(t, f"{WO}.qs", np.int8),
     f"tensor '{WO}.qs' has dtype I8; as a part of a quantised matrix it must be U8"),
    ("a part too small", lambda t, r: t.update({f"{WO}.qs": t[f"{WO}.qs"][:, :1].copy()}),
     f"tensor '{WO}.qs' has shape (64, 1, 16); a q4_1 matrix of 64 x 64 values needs (64, 2, 16)"),
    ("scales not a matrix", lambda t, r: t.update({f"{WO}.d": t[f"{WO}.d"].reshape(-1)}),
     f"tensor '{WO}.d' has shape (128,); a q4_1 matrix's is 2-D"),
    ("record not JSON", lambda t, r: "{oops", f"the {RECORD_KEY} metadata is malformed"),
    ("record of another version", lambda t, r: {**r, "version": 2}, f"{RECORD_KEY} has version 2"),
    ("unknown format", lambda t, r: r["tensors"].update({WO: "q3_k"}), f"says tensor '{WO}' is in format 'q3_k'"),
    ("integers outside the record", lambda t, r: r["tensors"].__delitem__(WO),
     f"tensor '{WO}.qs' has dtype U8, which only the parts of a quantised matrix"),
    ("stored twice", lambda t, r: t.update({WO: np.zeros((64, 64), np.float32)}), f"tensor '{WO}' is stored twice"),
    ("a norm stored quantised", lambda t, r: store_as_int8(t, r, "model.norm.weight"),
     "tensor model.norm.weight has shape (1, 64), config says (64,)"),
    ("the embedding stored quantised", lambda t, r: store_as_int8(t, r, "model.embed_tokens.weight"),
     "tensor model.embed_tokens.weight is stored quantised (int8); only the projections and lm_head.weight may be"),
]


@pytest.mark.parametrize("case, change, message", BAD_FILES, ids=[row[0] for row in BAD_FILES])
def test_bad_quantised_file(quantized_dirs, tmp_path, case, change, message):
    model = tmp_path / "model"
    shutil.copytree(quantized_dirs["q4_1"], model)
    edit_stored(model, change)
    before = snapshot(model)
    with pytest.raises(ModelError) as info:
        tinyllm.load(model)
    assert message in str(info.value) and "\n" not in str(info.value)
    r = run_cli("generate", "hi", "--raw", "--max-new-tokens", 1, "--model", model)
    assert_error_line(r, message)
    assert f"error: {info.value}" == r.stderr.strip()
    assert snapshot(model) == before


def _small_quantised_file() -> bytes:
    rng = np.random.default_rng(5)
    w = FORMATS["q4_1"].quantize(rng.standard_normal((4, 2 * BLOCK)).astype(np.float32))
    v = FORMATS["int8"].quantize(rng.standard_normal((3, 40)).astype(np.float32))
    tensors = {**parts("w", w), **parts("v", v), "b": rng.standard_normal(5).astype(np.float32)}
    return save(tensors, metadata=Record("q4_1", {"w": "q4_1", "v": "int8"}).metadata())


QUANTISED_FILE = _small_quantised_file()


@st.composite
def mutated_quantised_file(draw) -> bytes:
    """The small quantised file with one header entry or the record changed, or bytes flipped."""
    raw = bytearray(QUANTISED_FILE)
    kind = draw(st.sampled_from(["flip", "entry", "record"]))
    if kind == "flip":
        for _ in range(draw(st.integers(1, 4))):
            raw[draw(st.integers(0, len(raw) - 1))] ^= draw(st.integers(1, 255))
        return bytes(raw)
    header, data = header_of(bytes(raw))
    if kind == "entry":
        entry = header[draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))]
        key = draw(st.sampled_from(["shape", "dtype", "data_offsets"]))
        if key == "dtype":
            entry[key] = draw(st.sampled_from(["F32", "F16", "I8", "U8", "BF16", "F64"]))
        else:
            entry[key][draw(st.integers(0, len(entry[key]) - 1))] = draw(st.integers(0, 300) | big_ints)
    else:
        record = json.loads(header["__metadata__"][RECORD_KEY])
        field = draw(st.sampled_from(["version", "ops", "tensors", "format", "drop", "add"]))
        if field == "format":
            record["tensors"][draw(st.sampled_from(["w", "v"]))] = draw(st.sampled_from([*LAYOUT, "q5", 3]))
        elif field == "drop":
            del record["tensors"][draw(st.sampled_from(["w", "v"]))]
        elif field == "add":
            record["tensors"][draw(st.sampled_from(["b", "w.qs", "x"]))] = draw(st.sampled_from(list(LAYOUT)))
        else:
            record[field] = draw(st.none() | st.integers() | st.text(max_size=3) | st.just({}))
        header["__metadata__"][RECORD_KEY] = json.dumps(record)
    return with_header(header, data)


@settings(max_examples=200)
@given(raw=mutated_quantised_file())
def test_mutated_quantised_files_load_consistently_or_fail_in_one_line(tmp_path_factory, raw):
    """Whatever the file says, a quantised matrix that loads has every field of the dtype and shape its
    format needs for its N x K (the kernels do not check bounds); anything else is a ModelError."""
    path = tmp_path_factory.getbasetemp() / "mutated-quantised.safetensors"
    path.write_bytes(raw)
    result = outcome(read_safetensors, path)
    if isinstance(result, ModelError):
        return
    dtypes = {"F32": np.float32, "F16": np.float16, "I8": np.int8, "U8": np.uint8}
    for name, value in result.items():
        fmt = format_name(value)
        if fmt is None:
            assert value.dtype == np.float32, name
            continue
        n, k = value.shape
        for field, (dtype, shape) in LAYOUT[fmt].items():
            assert getattr(value, field).dtype == dtypes[dtype] and getattr(value, field).shape == shape(n, k)


def test_the_small_quantised_file_loads():
    """The fuzzed file itself loads (so a fuzz run is not all refusals)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "q.safetensors"
        path.write_bytes(QUANTISED_FILE)
        loaded = read_safetensors(path)
    assert format_name(loaded["w"]) == "q4_1" and format_name(loaded["v"]) == "int8" and loaded["w"].shape == (4, 64)


# ------------------------------------------------------------------------------ the real model


@pytest.mark.real_model
def test_q4_1_holds_the_default_model_without_loss(real_model_dir, tmp_path):
    """The default model came from a Q4_1 GGUF (its embedding Q8_0), so its q4_1 directory stores the very
    values the float32 model holds: dequantised, every projection and the head's copy are the source's."""
    r = run_cli("quantize", "--ops", "q4_1", "--out", tmp_path / "q4_1", "--model", real_model_dir)
    assert r.returncode == 0, r.stderr
    source, stored = load_weights(real_model_dir), load_weights(tmp_path / "q4_1")
    assert sum(not isinstance(v, np.ndarray) for v in stored.values()) == 7 * 30 + 1
    for name, value in stored.items():
        expected = source["model.embed_tokens.weight" if name == "lm_head.weight" else name]
        got = value if isinstance(value, np.ndarray) else value.dequantize()
        assert np.array_equal(got, expected), name
    size = sum(p.stat().st_size for p in (tmp_path / "q4_1").iterdir())
    assert size < 0.45 * sum(p.stat().st_size for p in real_model_dir.iterdir())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = tinyllm.load(tmp_path / "q4_1")
    assert model.generate("The capital of France is", chat=False, max_new_tokens=2).startswith(" Paris")
