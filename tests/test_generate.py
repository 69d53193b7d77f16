"""Generation on a tiny random model: sampling, seeds, stopping, the context limit, and errors."""
import warnings

import numpy as np
import pytest

import tinyllm
from ops.sampling import sample


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return tinyllm.load(tiny_model_dir)


def test_same_seed_same_text_and_greedy_is_deterministic(tiny):
    kw = dict(max_new_tokens=12, chat=False)
    assert tiny.generate("hello", **kw) == tiny.generate("hello", **kw)
    a = tiny.generate("hello", temperature=1.0, seed=7, **kw)
    assert a == tiny.generate("hello", temperature=1.0, seed=7, **kw)
    others = {tiny.generate("hello", temperature=1.0, seed=s, **kw) for s in range(4)}
    assert len(others) > 1  # the seed really drives the draw


def test_stream_pieces_join_to_the_text(tiny):
    pieces = list(tiny.generate("abc", max_new_tokens=10, chat=False, stream=True))
    assert "".join(pieces) == tiny.generate("abc", max_new_tokens=10, chat=False)


def test_generated_ids_follow_the_argmax_of_the_logits(tiny):
    prompt = tiny.tokenizer.encode("xyz")
    new = list(tiny.generate_ids(prompt, max_new_tokens=5))
    assert new and not set(new) & tiny.stop_ids  # the stop token itself is never yielded
    for i, token in enumerate(new):
        assert token == int(np.argmax(tiny.logits(prompt + new[:i])[-1]))


def test_chat_template_wraps_the_prompt(tiny):
    ids = tiny.prompt_ids("hi", chat=True, system="be brief")
    assert tiny.tokenizer.decode(ids) == (
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert tiny.prompt_ids("hi", chat=False) == tiny.tokenizer.encode("hi")


def test_context_limit_stops_with_a_warning_and_long_prompt_is_an_error(tiny, monkeypatch):
    monkeypatch.setattr(tiny, "stop_ids", set())  # a random model may emit EOS early; ignore it here
    ctx = tiny.config.max_seq_len  # 64
    prompt = "a" * (ctx - 3)  # one token per byte
    with pytest.warns(tinyllm.ContextLimitWarning):
        tiny.generate(prompt, max_new_tokens=10, chat=False)
    assert tiny.last_stats.stopped_by == "context" and tiny.last_stats.new_tokens == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning when the budget fits
        tiny.generate(prompt, max_new_tokens=3, chat=False)
    assert tiny.last_stats.stopped_by == "max_new_tokens"
    with pytest.raises(tinyllm.ContextError, match="context"):
        tiny.generate("a" * (ctx + 1), chat=False)


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_k=-2), dict(top_p=0), dict(top_p=1.5),
                                    dict(max_new_tokens=-1)])
def test_bad_sampling_arguments(tiny, kwargs):
    with pytest.raises(tinyllm.TinyLLMError):
        tiny.generate("x", chat=False, **kwargs)


def test_sample_filters():
    logits = np.array([0.0, 3.0, 2.0, 1.0], dtype=np.float32)
    # top_k=1 and a tiny top_p are greedy whatever the draw
    assert {sample(logits, 1.0, 1, 1.0, u) for u in np.linspace(0, 0.999, 50)} == {1}
    assert {sample(logits, 1.0, 0, 1e-6, u) for u in np.linspace(0, 0.999, 50)} == {1}
    # top_k=2 only ever picks the two largest; the draw's quantiles follow the probabilities
    p = np.exp([3.0, 2.0]) / np.exp([3.0, 2.0]).sum()
    assert sample(logits, 1.0, 2, 1.0, p[0] - 1e-3) == 1
    assert sample(logits, 1.0, 2, 1.0, p[0] + 1e-3) == 2
    assert sample(logits, 1.0, 2, 1.0, 0.999) == 2
    # temperature 0 is argmax
    assert sample(logits, 0.0, 0, 1.0, 0.5) == 1


def test_token_ids_outside_the_vocabulary_are_refused(tiny):
    # the compiled embedding gather does not bounds-check: the API must, before it runs
    V = tiny.config.vocab_size
    for bad in ([V], [-1], [1, 2, V + 5]):
        with pytest.raises(tinyllm.TinyLLMError, match="outside the vocabulary"):
            tiny.logits(bad)
        with pytest.raises(tinyllm.TinyLLMError, match="outside the vocabulary"):
            list(tiny.generate_ids(bad, max_new_tokens=2))
    tiny.prefill([1, 2])
    with pytest.raises(tinyllm.TinyLLMError, match="outside the vocabulary"):
        tiny.step(V)
    with pytest.raises(tinyllm.TinyLLMError, match="seed"):
        tiny.generate("x", chat=False, seed=-1)
