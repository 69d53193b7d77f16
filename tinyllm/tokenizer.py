"""Text <-> token ids with the `tokenizers` library, the chat template, and streaming detokenization."""
from __future__ import annotations

from datetime import datetime
from pathlib import Path

from .config import read_json
from .errors import ModelError, TinyLLMError


class Tokenizer:
    """The model directory's `tokenizer.json`, plus what `tokenizer_config.json` says about special
    tokens and the chat template."""

    def __init__(self, model_dir: Path):
        from tokenizers import Tokenizer as HFTokenizer

        model_dir = Path(model_dir)
        try:
            self._tok = HFTokenizer.from_file(str(model_dir / "tokenizer.json"))
        except Exception as e:  # the library raises a bare Exception for missing or malformed files
            raise ModelError(f"cannot read {model_dir / 'tokenizer.json'}: {e}") from None
        cfg_file = model_dir / "tokenizer_config.json"
        cfg = read_json(cfg_file) if cfg_file.exists() else {}
        self.chat_template: str | None = cfg.get("chat_template")
        if isinstance(self.chat_template, list):  # some configs hold several named templates
            named = {t.get("name"): t.get("template") for t in self.chat_template if isinstance(t, dict)}
            self.chat_template = named.get("default")
        if self.chat_template is not None and not isinstance(self.chat_template, str):
            raise ModelError(f"{cfg_file}: chat_template must be a string (or a list of named templates)")
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token text such as `<|im_start|>` maps to its id; no BOS added."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a raw prompt, with whatever the tokenizer adds at the start (BOS for some models)."""
        return self._tok.encode(text, add_special_tokens=True).ids

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def special_tokens(self) -> dict[int, str]:
        """The tokens tokenizer.json declares special (`<|im_start|>`, ...): id -> text."""
        return {i: t.content for i, t in sorted(self._tok.get_added_tokens_decoder().items()) if t.special}

    def token_id(self, text: str | None) -> int | None:
        return None if text is None else self._tok.token_to_id(text)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render a conversation with the model's own Jinja template, in a sandbox (a template is
        code that came with a downloaded model)."""
        if not self.chat_template:
            raise TinyLLMError("this model has no chat template; use --raw to feed the prompt as is")
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TinyLLMError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "",
            )
        except TinyLLMError:
            raise
        except TemplateError as e:
            raise TinyLLMError(f"chat template failed: {e}") from None
        except Exception as e:  # the template is a downloaded model's code: it may fail in any way
            raise TinyLLMError(f"chat template failed: {type(e).__name__}: {e}") from None


def _token_text(tok) -> str | None:
    """A special token from tokenizer_config.json (a string, or a dict with its `content`); None if absent
    or malformed."""
    text = tok.get("content") if isinstance(tok, dict) else tok
    return text if isinstance(text, str) else None


class StreamDecoder:
    """Turns a growing list of token ids into text pieces, never emitting half a character.

    A byte-level BPE token may hold only some bytes of a UTF-8 character (an emoji can take four
    tokens); decoding such a prefix yields U+FFFD. So we re-decode a short window of recent tokens,
    and emit the new text only once it no longer ends in U+FFFD.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start: tokens before it are already emitted and settled
        self.read = 0  # tokens before it have been emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """Whatever is still held back at the end (a truly incomplete character prints as U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        done = self.tok.decode(self.ids[self.prefix : self.read])
        text = self.tok.decode(self.ids[self.prefix :])
        if len(text) <= len(done) or (text.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(done) :]
