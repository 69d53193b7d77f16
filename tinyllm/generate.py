"""The generation loop: prefill the prompt once, then one cached step per new token."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    ttft_s: float = 0.0  # prompt submitted -> first new token chosen (the prefill, mostly)
    prefill_s: float = 0.0
    decode_steps: int = 0  # cached one-token forward passes after the prefill
    decode_s: float = 0.0  # time spent in them (and in choosing their tokens)
    stopped_by: str = ""  # "eos", "max_new_tokens", "context", or "stop" (a stop string, see Model.generate)

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s else 0.0


@dataclass
class Sampling:
    temperature: float = 0.0  # 0: greedy (argmax)
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1: no nucleus filter
    seed: int | None = None


def generate_tokens(model, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling,
                    stop_ids, stats: GenerationStats) -> Iterator[int]:
    """Yield new token ids until a stop id (not yielded), `max_new_tokens`, or the end of the cache.

    `model` is the Transformer; the caller has checked that the prompt fits its context.
    """
    ops = model.ops
    rng = np.random.default_rng(sampling.seed)
    stop_ids = set(stop_ids)

    def choose(logits: np.ndarray) -> int:
        if sampling.temperature <= 0:
            return ops.argmax(logits)
        return ops.sample(logits, sampling.temperature, sampling.top_k, sampling.top_p, rng.random())

    n = len(prompt_ids)
    budget = min(max_new_tokens, model.cfg.max_seq_len - n)
    stats.prompt_tokens, stats.new_tokens = n, 0
    if budget <= 0:
        stats.stopped_by = "context" if max_new_tokens > 0 else "max_new_tokens"
        return
    cache = model.new_cache(n + budget)
    t0 = time.perf_counter()
    logits = model.forward(prompt_ids, 0, cache, last_only=True)[-1]
    token = choose(logits)
    stats.ttft_s = stats.prefill_s = time.perf_counter() - t0
    while token not in stop_ids:
        stats.new_tokens += 1
        yield token
        if stats.new_tokens >= budget:
            stats.stopped_by = "max_new_tokens" if budget == max_new_tokens else "context"
            return
        t = time.perf_counter()  # timed here, so the consumer's time (printing) is not counted
        token = choose(model.forward([token], n + stats.new_tokens - 1, cache)[0])
        stats.decode_s += time.perf_counter() - t
        stats.decode_steps += 1
    stats.stopped_by = "eos"
