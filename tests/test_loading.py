"""Loading model directories: sharded checkpoints, float16/bfloat16 tensors, config spellings, bad input."""
import json

import numpy as np
import pytest
import torch

import ops
from tests.conftest import build_tiny_llama, relative_error
from tinyllm.config import Config
from tinyllm.errors import ModelError
from tinyllm.loading import load_weights
from tinyllm.model import Transformer
from tinyllm.placement import _huge_pages_available

# What moves into huge pages is only moved where Linux offers them (elsewhere nothing is copied).
huge_pages = pytest.mark.skipif(not _huge_pages_available(), reason="no transparent huge pages here")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_sharded_low_precision_checkpoint_loads_exactly(tmp_path, dtype):
    # ~20 KB shards force several files and a model.safetensors.index.json
    oracle = build_tiny_llama(tmp_path, dtype=dtype, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    weights = load_weights(tmp_path)
    expected = {k: v.float().numpy() for k, v in oracle.state_dict().items()}
    assert set(weights) == set(expected)
    for name, value in expected.items():
        assert weights[name].dtype == np.float32
        np.testing.assert_array_equal(weights[name], value, err_msg=name)  # widening is exact

    ids = [3, 14, 15, 92, 65, 35]
    with torch.no_grad():
        ref = oracle(torch.tensor([ids])).logits[0].numpy()
    ours = Transformer.from_dir(tmp_path, ops.reference_table()).forward(ids)
    assert relative_error(ours, ref) < 1e-4


def test_rope_theta_in_either_spelling():
    base = dict(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2)
    assert Config.from_dict({**base, "rope_theta": 12345.0}).rope_theta == 12345.0
    nested = {**base, "rope_parameters": {"rope_type": "default", "rope_theta": 54321.0}}
    assert Config.from_dict(nested).rope_theta == 54321.0
    assert Config.from_dict(nested).rope_scaling is None


def test_bad_model_directories_raise_model_error(tmp_path):
    with pytest.raises(ModelError, match="config.json"):
        Config.from_dir(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        Config.from_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ModelError, match="not supported"):
        Config.from_dir(tmp_path)
    with pytest.raises(ModelError, match="model.safetensors"):
        load_weights(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x05")
    with pytest.raises(ModelError, match="not a safetensors file"):
        load_weights(tmp_path)


def test_shape_mismatch_is_reported(tmp_path):
    build_tiny_llama(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] += 1
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="mlp.gate_proj.weight has shape"):
        Transformer.from_dir(tmp_path, ops.reference_table())


@pytest.mark.parametrize("name, content, message", [
    ("config.json", "[1, 2]", "must hold a JSON object"),
    ("config.json", '{"model_type": "llama", "rope_scaling": {"rope_type": "yarn"}}', "rope scaling 'yarn'"),
    ("model.safetensors.index.json", "{broken", "is not valid JSON"),
    ("model.safetensors.index.json", '{"weight_map": {"a": "../../etc/passwd"}}', "not a plain file name"),
    ("tokenizer_config.json", "{broken", "is not valid JSON"),
    ("generation_config.json", "[]", "must hold a JSON object"),
])
def test_malformed_model_files_are_model_errors(tmp_path, tiny_model_dir, name, content, message):
    import shutil

    import tinyllm

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    if name == "config.json" and "rope_scaling" in content:
        cfg = json.loads((model / "config.json").read_text())
        cfg["rope_scaling"] = {"rope_type": "yarn"}
        content = json.dumps(cfg)
    (model / name).write_text(content)
    with pytest.raises(tinyllm.TinyLLMError, match=message):
        tinyllm.load(model)


def test_malformed_safetensors_header_entry(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [2]}}).encode()  # no data_offsets
    (tmp_path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(ModelError, match="header entry of tensor 'w' is malformed"):
        load_weights(tmp_path)


@huge_pages
def test_huge_page_copies_are_exact_read_only_copies_in_one_block(tiny_model_dir):
    from tinyllm.placement import HUGE_PAGE, _mapping_of, huge_page_copies, in_huge_pages

    mapped = load_weights(tiny_model_dir)["model.embed_tokens.weight"]  # a read-only view of the mapped file
    made = np.arange(-100, 100, dtype=np.int8).reshape(4, 50)
    copies = huge_page_copies([mapped, made, mapped])  # the same array twice: copied once
    assert set(copies) == {id(mapped), id(made)}
    for original in (mapped, made):
        copy = copies[id(original)]
        assert copy.dtype == original.dtype and copy.shape == original.shape
        np.testing.assert_array_equal(copy, original)
        assert in_huge_pages(copy) and not in_huge_pages(original) and not copy.flags.writeable
    assert copies[id(mapped)].ctypes.data % HUGE_PAGE == 0  # the block starts on a 2 MiB boundary
    assert _mapping_of(copies[id(mapped)]) is _mapping_of(copies[id(made)])
    assert huge_page_copies([]) == {}


@huge_pages
def test_every_swap_moves_all_streamed_weights_into_one_new_block(tiny_model_dir):
    """A block is never left partly used: after each swap every site but the embedding holds weights
    of one block, the previous block is freed, and the output is that of a fresh load."""
    import gc
    import weakref

    import tinyllm
    from tinyllm.placement import _arrays, _mapping_of

    def blocks(model):
        t = model.transformer
        return {_mapping_of(a) for s in t.weight_sites if s.op != "embedding" for a in _arrays(getattr(s.owner, s.attr))}

    model = tinyllm.load(tiny_model_dir, ops="fused", progress=False)
    ids = [1, 5, 9, 3]
    for spec in ("fused,linear=reference", "int8,norm_head=int8", "reference", "fused"):
        (old,) = blocks(model)
        old = weakref.ref(old)
        model.use(spec)
        gc.collect()
        (new,) = blocks(model)
        assert old() is None and new is not None
        np.testing.assert_array_equal(model.logits(ids), tinyllm.load(tiny_model_dir, ops=spec, progress=False).logits(ids))


@huge_pages
def test_converted_and_plugin_weights_are_not_moved(tmp_path, tiny_model_dir):
    """What moves into huge pages is only what can then leave memory: a float16 checkpoint's tensors,
    widened to float32 arrays its sites keep, stay where they are (a copy would hold them twice), and
    a plugin's prepare result is installed as returned (it may hold buffers it writes)."""
    from dataclasses import dataclass

    import tinyllm
    from ops import variant
    from ops.registry import VARIANTS
    from tinyllm.placement import _arrays, in_huge_pages, is_mapped
    from tinyllm.schedule import apply, parse

    build_tiny_llama(tmp_path, dtype="float16")
    t = Transformer.from_dir(tmp_path)
    apply(t, parse("fused"))
    mlp = next(s for s in t.weight_sites if s.op == "swiglu_mlp")
    assert t.layers[0].mlp.gate is mlp.raw.gate and not is_mapped(mlp.raw.gate)
    assert in_huge_pages(t.layers[0].attn_in.wqkv)  # made by the fused prepare step: moved

    float32 = tinyllm.load(tiny_model_dir, ops="fused", progress=False)
    assert in_huge_pages(float32.transformer.layers[0].mlp.gate)  # mapped from the file: moved

    @dataclass
    class WithScratch:
        weight: np.ndarray
        scratch: np.ndarray

    def linear_with_scratch(x, w, bias=None):
        w.scratch[...] = 0  # writes into what its prepare step made
        return ops.linear.linear(x, w.weight, bias)

    variant("linear", "with_scratch", prepare=lambda w: WithScratch(w, np.zeros(4, np.float32)))(linear_with_scratch)
    try:
        float32.use("reference,linear=with_scratch")
        held = [a for s in float32.transformer.weight_sites if s.op == "linear"
                for a in _arrays(getattr(s.owner, s.attr))]
        assert held and not any(in_huge_pages(a) for a in held)
        float32.logits([1, 2, 3])
    finally:
        VARIANTS["linear"].pop("with_scratch")
