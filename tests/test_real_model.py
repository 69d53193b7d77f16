"""The real default model (SmolLM2-135M-Instruct) against golden data from independent engines:
token ids from llama.cpp's tokenizer, greedy continuations and logits from transformers in float32."""
import numpy as np
import pytest
import torch

from tests.conftest import relative_error
from tinyllm.tokenizer import StreamDecoder

pytestmark = pytest.mark.real_model


def test_tokenizer_matches_llama_cpp(real_model, golden):
    tok = real_model.tokenizer
    for case in golden["tokenize"]:
        assert tok.encode(case["text"]) == case["ids"], case["text"]
        assert tok.decode(case["ids"]) == case["text"]


def test_streaming_never_splits_a_character(real_model, golden):
    tok = real_model.tokenizer
    for case in golden["tokenize"]:
        decoder = StreamDecoder(tok)
        pieces = [decoder.push(i) for i in case["ids"]] + [decoder.flush()]
        assert "".join(pieces) == case["text"]
        assert not any("\ufffd" in p for p in pieces), pieces


def test_greedy_continuations_match_transformers(real_model, golden):
    for case in golden["greedy"]:
        ids = real_model.prompt_ids(case["prompt"], chat=case["chat"])
        assert ids == case["prompt_ids"], case["prompt"]
        if case["chat"]:
            rendered = real_model.tokenizer.apply_chat_template([{"role": "user", "content": case["prompt"]}])
            assert rendered == case["rendered"]
        # the golden runs stop at <|im_end|> (id 2), which they include; we stop before it
        expected = [t for t in case["new_ids"] if t != 2]
        got = list(real_model.generate_ids(ids, max_new_tokens=len(case["new_ids"])))
        assert got == expected, case["prompt"]
        # and the text API streams the same continuation
        text = real_model.generate(case["prompt"], chat=case["chat"], max_new_tokens=len(case["new_ids"]))
        assert text == real_model.tokenizer.decode(expected)


def test_logits_match_transformers_on_128_tokens(real_model, real_model_dir, golden):
    from transformers import LlamaForCausalLM

    text = " ".join(case["text"] for case in golden["greedy"] if not case["chat"]) * 4
    ids = real_model.tokenizer.encode(text)[:128]
    assert len(ids) == 128
    oracle = LlamaForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = oracle(torch.tensor([ids])).logits[0].numpy()
    ours = real_model.logits(ids)
    assert ours.dtype == np.float32
    assert relative_error(ours, ref) < 1e-4

    # the cached path gives the same logits: prefill half, then step token by token
    cached = [real_model.prefill(ids[:64])] + [real_model.step(t)[None] for t in ids[64:]]
    assert relative_error(np.concatenate(cached), ref) < 1e-4


@pytest.mark.parametrize("spec", ["numba", "fused"])
def test_fast_schedules_follow_the_reference_under_teacher_forcing(real_model, real_model_dir, spec):
    """Fed the reference's own greedy tokens for 64 steps, a fast schedule's logits stay within 1e-4
    of the largest logit, and it picks the same token wherever the reference's top-2 margin > 1e-3."""
    import tinyllm

    prompt = real_model.prompt_ids("Write a short story about a robot who learns to paint.")
    tokens = list(real_model.generate_ids(prompt, max_new_tokens=64))
    model = tinyllm.load(real_model_dir, ops=spec)
    seq = prompt + tokens
    ref_steps = [real_model.prefill(prompt)[-1]] + [real_model.step(t) for t in tokens[:-1]]
    fast_steps = [model.prefill(prompt)[-1]] + [model.step(t) for t in tokens[:-1]]
    assert len(seq) > len(prompt) + 32
    for ref, fast in zip(ref_steps, fast_steps):
        assert relative_error(fast, ref) < 1e-4
        top2 = np.sort(ref)[-2:]
        if top2[1] - top2[0] > 1e-3:
            assert int(np.argmax(fast)) == int(np.argmax(ref))
