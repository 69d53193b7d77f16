"""Shared fixtures: tiny random Llama models built with transformers (the oracle), and the real
default model, pulled once per test run."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# Model builds and JIT compiles blow Hypothesis' 200 ms deadline. In CI the examples are derandomized
# so a red run can be reproduced exactly.
settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", parent=settings.get_profile("dev"), derandomize=True, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

DATA = Path(__file__).parent / "data"


def build_tiny_llama(path: Path, *, n_layers=2, hidden=48, n_heads=6, n_kv_heads=2, head_dim=8, ffn=64,
                     vocab=97, tied=False, rope_theta=10000.0, max_pos=128, seed=0, dtype="float32",
                     max_shard_size=None):
    """Save a randomly initialised transformers LlamaForCausalLM as safetensors; return the torch model
    (float32, eval mode) as the oracle."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, head_dim=head_dim,
        max_position_embeddings=max_pos, rope_theta=rope_theta, tie_word_embeddings=tied,
        # A larger init than the default 0.02 makes attention scores far from uniform, so a wrong
        # mask or a wrong RoPE pairing changes the logits visibly.
        initializer_range=0.25, bos_token_id=1, eos_token_id=2, pad_token_id=None,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norm weights are ones at init; make them matter too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    if dtype == "float32":
        model.save_pretrained(path, **kwargs)
        return model
    model.to(getattr(torch, dtype)).save_pretrained(path, **kwargs)
    # Reload in float32 rather than upcasting in place: `.to()` also rounded the RoPE frequency
    # buffer, which would make the oracle itself inexact.
    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
    """max |ours - ref| relative to the largest |ref| (logits are compared on the scale of the largest)."""
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """The default model (SmolLM2-135M-Instruct), pulled into $TINYLLM_HOME (weights/) if missing."""
    from tinyllm.pull import default_model_dir, is_model_dir, pull

    path = default_model_dir()
    return path if is_model_dir(path) else pull(progress=False)


@pytest.fixture(scope="session")
def real_model(real_model_dir):
    """The default model on the `reference` schedule: the golden data is matched by plain NumPy."""
    import tinyllm

    return tinyllm.load(real_model_dir, ops="reference")


@pytest.fixture(scope="session")
def golden() -> dict:
    import json

    return json.loads((DATA / "smollm2_135m.json").read_text())


TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_byte_tokenizer(path: Path) -> int:
    """A byte-level tokenizer with no merges (one token per byte) and three special tokens, written
    as tokenizer.json + tokenizer_config.json. Returns its vocabulary size."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {s: i for i, s in enumerate(specials)}
    vocab.update({ch: len(specials) + i for i, ch in enumerate(sorted(alphabet))})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": TINY_CHAT_TEMPLATE}))
    return len(vocab)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A complete tiny model directory (random weights, byte tokenizer, chat template): fast to run,
    so the API and CLI can be tested without the real model."""
    path = tmp_path_factory.mktemp("tiny-model")
    vocab = write_byte_tokenizer(path)
    build_tiny_llama(path, vocab=vocab, max_pos=64, tied=True)
    return path
