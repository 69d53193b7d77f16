"""The Python API: `load()` a model directory, then `generate`, `logits`, `prefill`/`step`.

    >>> import tinyllm
    >>> model = tinyllm.load()                  # the default model, pulled on first use
    >>> model.generate("The capital of France is", chat=False)
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterator

import numpy as np

from . import schedule as scheduling
from .config import read_json
from .errors import ContextError, ContextLimitWarning, ModelError, ScheduleError, TinyLLMError
from .generate import GenerationStats, Sampling, generate_tokens
from .loading import read_quantization
from .model import KVCache, Transformer
from .placement import release_free_heap
from .pull import default_model_dir, is_model_dir, pull
from .tokenizer import StreamDecoder, Tokenizer


class Model:
    """A loaded model: the transformer, its tokenizer, and a KV cache for `prefill`/`step`."""

    def __init__(self, path: Path, ops=None, check_numerics: bool = False):
        self.path = Path(path)
        if self.path.is_file():
            raise ModelError(f"model directory {self.path} is a file; give the directory that holds config.json")
        if not self.path.is_dir():
            raise ModelError(f"model directory {self.path} does not exist")
        stored = _quantized_for(self.path) if ops is None else None
        try:  # validated before the weights are read
            self.schedule = scheduling.parse(stored or ops)  # a model saved by `tinyllm quantize`: its schedule
        except ScheduleError as e:
            if stored is None:
                raise
            raise ScheduleError(f"{self.path} was quantised for --ops {stored}, which cannot run here "
                                           f"(give --ops): {e}") from None
        self.check_numerics = check_numerics
        self.transformer = Transformer.from_dir(self.path, check_numerics=check_numerics)
        scheduling.apply(self.transformer, self.schedule, check_numerics)
        self.config = self.transformer.cfg
        self.tokenizer = Tokenizer(self.path)
        release_free_heap()  # what parsing tokenizer.json freed, back to the OS
        if self.tokenizer.vocab_size > self.config.vocab_size:
            raise ModelError(f"{self.path}: tokenizer.json has {self.tokenizer.vocab_size} tokens but config.json's "
                             f"vocab_size is {self.config.vocab_size}")
        self.stop_ids = self._stop_ids()
        self.last_stats = GenerationStats()
        self._cache: KVCache | None = None

    def _stop_ids(self) -> set[int]:
        ids = set(self.config.eos_token_ids)
        gen_cfg = self.path / "generation_config.json"
        if gen_cfg.exists():
            eos = read_json(gen_cfg).get("eos_token_id")
            ids |= set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        eos_tok = self.tokenizer.token_id(self.tokenizer.eos_token)
        if eos_tok is not None:
            ids.add(eos_tok)
        return ids

    # -- which variants run ------------------------------------------------------------------------
    def swap(self, op: str, variant: str) -> None:
        """Run `variant` for `op` from now on (e.g. `model.swap("attention", "reference")`); only the weights
        whose preparation changes are prepared again. The weights then move into a new block of huge
        pages (tinyllm/placement.py): a swap copies them all and holds two copies for a moment."""
        self.use(f"{self.schedule.spec},{op}={variant}")

    def use(self, ops) -> None:
        """Switch the whole schedule (a preset, spec string or dict)."""
        new = scheduling.parse(ops)
        scheduling.apply(self.transformer, new, self.check_numerics)
        self.schedule = new

    # -- logits ---------------------------------------------------------------------------------
    def logits(self, ids) -> np.ndarray:
        """Logits (len(ids), vocab), float32: one full forward pass over `ids`, no cache."""
        self._check_ids(ids)
        return self.transformer.forward(ids)

    def prefill(self, ids) -> np.ndarray:
        """Start a new sequence: run `ids` through the model, keeping their keys/values in the cache.
        Returns their logits (len(ids), vocab); the same numbers `logits(ids)` gives."""
        self._check_ids(ids)
        self._cache = self.transformer.new_cache()
        return self.transformer.forward(ids, 0, self._cache)

    def step(self, token_id: int) -> np.ndarray:
        """Append one token to the sequence started by `prefill`; returns its logits (vocab,)."""
        if self._cache is None:
            raise TinyLLMError("step() needs a sequence: call prefill() first")
        self._check_ids([token_id], what="token id")
        pos = self._cache.length
        if pos >= self._cache.max_len:
            raise ContextError(f"the sequence has reached the model's context of {self._cache.max_len} tokens")
        return self.transformer.forward([token_id], pos, self._cache)[0]

    def _check_ids(self, ids, what: str = "the prompt"):
        """Token ids must index the embedding table (a compiled gather does not check), and fit the context."""
        n = len(ids)
        if n == 0:
            raise TinyLLMError(f"{what} is empty: no tokens to run")
        if n > self.config.max_seq_len:
            raise ContextError(f"{what} has {n} tokens; the model's context is {self.config.max_seq_len}")
        arr = np.asarray(ids)
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise TinyLLMError(f"{what} must be a list of integer token ids")
        bad = arr[(arr < 0) | (arr >= self.config.vocab_size)]
        if bad.size:
            raise TinyLLMError(f"token id {int(bad[0])} is outside the vocabulary (0..{self.config.vocab_size - 1})")

    # -- text -----------------------------------------------------------------------------------
    def prompt_ids(self, prompt: str, chat: bool = True, system: str | None = None) -> list[int]:
        """The prompt as token ids: through the chat template when the model has one and `chat`."""
        if chat and self.tokenizer.chat_template:
            messages = ([{"role": "system", "content": system}] if system is not None else [])
            messages.append({"role": "user", "content": prompt})
            return self.chat_ids(messages)
        if system is not None:
            raise TinyLLMError("a system message needs the chat template" + (
                " (drop --raw, or drop --system)" if self.tokenizer.chat_template else ", and this model has none"))
        return self.tokenizer.encode_prompt(prompt)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation (a list of {"role": ..., "content": ...}) rendered by the model's
        chat template, ending where the assistant speaks next."""
        # The rendered template carries its own BOS text where the model wants one, so no second BOS.
        return self.tokenizer.encode(self.tokenizer.apply_chat_template(messages))

    def generate(self, prompt: str, *, max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, chat: bool = True, system: str | None = None,
                 stop=(), ignore_eos: bool = False, stream: bool = False) -> str | Iterator[str]:
        """Continue `prompt`: greedy by default; `temperature > 0` samples (reproducibly with `seed`).

        Returns the new text, or with `stream=True` an iterator of text pieces as they are produced.
        Stops at an end-of-sequence token (unless `ignore_eos`), when the text produces one of the `stop`
        strings (which is not returned), after `max_new_tokens`, or at the context limit (with a
        ContextLimitWarning). Statistics of the run land in `self.last_stats`.
        """
        if not isinstance(prompt, str):
            raise TinyLLMError(f"the prompt must be a string, not {type(prompt).__name__}")
        if not prompt:
            raise TinyLLMError("the prompt is empty: give some text to continue")
        check_utf8("the prompt", prompt)
        check_utf8("the system message", system)
        ids = self.prompt_ids(prompt, chat=chat, system=system)
        pieces = self.generate_text(ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                    top_p=top_p, seed=seed, stop=stop, ignore_eos=ignore_eos)
        return pieces if stream else "".join(pieces)

    def generate_text(self, ids: list[int], *, stop=(), **options) -> Iterator[str]:
        """Text pieces of the continuation of prompt ids `ids`, as they are produced, up to the first
        of the `stop` strings (not included; generation ends there). `options` are generate_ids'."""
        stops = _check_stops(stop)
        pieces = self._text_pieces(self.generate_ids(ids, **options))
        if not stops:
            return pieces

        def stopped():
            self.last_stats.stopped_by = "stop"
        return until_stop(pieces, stops, stopped)

    def generate_ids(self, ids: list[int], *, max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
                     top_p: float = 1.0, seed: int | None = None, ignore_eos: bool = False) -> Iterator[int]:
        """The token-level generator under `generate`: yields new token ids for prompt ids `ids`
        (the end-of-sequence token that stops it is not yielded; with `ignore_eos` none stops it)."""
        _check_sampling(max_new_tokens, temperature, top_k, top_p, seed)
        self._check_ids(ids)
        self.last_stats = GenerationStats()
        stop_ids = set() if ignore_eos else self.stop_ids
        return generate_tokens(self.transformer, list(ids), max_new_tokens,
                               Sampling(temperature, top_k, top_p, seed), stop_ids, self.last_stats)

    def _text_pieces(self, tokens: Iterator[int]) -> Iterator[str]:
        decoder = StreamDecoder(self.tokenizer)
        for token in tokens:
            piece = decoder.push(token)
            if piece:
                yield piece
        tail = decoder.flush()
        if tail:
            yield tail
        if self.last_stats.stopped_by == "context":
            warnings.warn(f"stopped at the model's context limit of {self.config.max_seq_len} tokens",
                          ContextLimitWarning, stacklevel=2)


def _quantized_for(path: Path) -> str | None:
    """The schedule a directory written by `tinyllm quantize` was made for; None for any other, or
    when its files cannot be read (loading them then reports what is wrong, in its usual order)."""
    try:
        record = read_quantization(path)
    except ModelError:
        return None
    return record.spec if record else None


def until_stop(pieces: Iterator[str], stops: list[str], on_stop=lambda: None) -> Iterator[str]:
    """`pieces` up to the first of the `stops` strings (not included; then `on_stop()` is called).

    A stop string may arrive split over several pieces, so the end of the text that could still be the
    start of one is held back until the next piece settles it; the rest streams at once."""
    held = ""
    try:
        for piece in pieces:
            held += piece
            found = [i for i in (held.find(s) for s in stops) if i >= 0]
            if found:
                if min(found):
                    yield held[:min(found)]
                on_stop()
                return
            keep = _longest_partial_stop(held, stops)
            if len(held) > keep:
                yield held[:len(held) - keep]
                held = held[len(held) - keep:]
        if held:  # generation ended with text that only looked like the start of a stop string
            yield held
    finally:
        pieces.close()  # ends the token generator too, so no token is computed past a stop string


def _longest_partial_stop(text: str, stops: list[str]) -> int:
    """The length of the longest end of `text` that is the beginning of a stop string (but not all of it)."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def _check_stops(stop) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or ())
    for s in stops:
        if not isinstance(s, str) or not s:
            raise TinyLLMError(f"a stop string must be non-empty text, got {s!r}")
        check_utf8("the stop string", s)
    return stops


def check_utf8(what: str, text) -> None:
    """Text the tokenizer can take. Command-line bytes that are not UTF-8 reach Python as lone
    surrogates (U+DC80..U+DCFF stand for bytes 0x80..0xFF), which the tokenizer refuses with a TypeError."""
    if not isinstance(text, str):
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        found = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"lone surrogate U+{code:04X}"
        raise TinyLLMError(f"{what} is not valid UTF-8 text ({found} at character {e.start})") from None


def _check_sampling(max_new_tokens, temperature, top_k, top_p, seed=None):
    integers = {"max_new_tokens": max_new_tokens, "top_k": top_k, **({} if seed is None else {"seed": seed})}
    for name, value in integers.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TinyLLMError(f"{name} must be an integer, got {value!r}")
    for name, value in {"temperature": temperature, "top_p": top_p}.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise TinyLLMError(f"{name} must be a number, got {value!r}")
    if max_new_tokens < 0:
        raise TinyLLMError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not temperature >= 0:
        raise TinyLLMError(f"temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise TinyLLMError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    if seed is not None and seed < 0:
        raise TinyLLMError(f"seed must be >= 0, got {seed}")
    if not 0 < top_p <= 1:
        raise TinyLLMError(f"top_p must be in (0, 1], got {top_p}")


def load(path: str | Path | None = None, ops=None, progress: bool = True, check_numerics: bool = False) -> Model:
    """Load a Hugging Face-layout Llama model directory; `path=None` means the default model,
    pulled (downloaded and converted) first if it is not there yet. `ops` is the schedule (default: the
    fastest exact preset, or for a directory written by `tinyllm quantize` the schedule it was made for).

    `check_numerics=True` refuses weights holding NaN/Inf and checks every op's output, raising a
    NumericsError that names the first op and layer to produce NaN/Inf (slower; off by default)."""
    if path is None:
        path = default_model_dir()
        if not is_model_dir(path):
            path = pull(progress=progress)
    return Model(Path(path), ops=ops, check_numerics=check_numerics)
