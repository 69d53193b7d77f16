"""The fixed texts tinyllm reads, and how a text becomes the tokens it reads.

- `pydoc_text()`: the standard library's `pydoc_data.topics` prose (it ships with every Python, so
  anyone can reproduce the figures): what `tinyllm eval` scores and what `tinyllm bench` prompts with;
- `docstring_text()`: docstrings of standard-library modules, what `tinyllm quantize` calibrates on
  (not eval's text, so an eval of a GPTQ model is not flattered by having been calibrated on what it is
  scored on);
- `read_text(path)`: a user's UTF-8 file instead (`eval --text`, `quantize --calibration-text`).

Both eval and calibration read the first DEFAULT_TOKENS tokens of their text (`first_tokens`) in
independent windows of DEFAULT_WINDOW tokens (`windows`).
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import warnings
from dataclasses import dataclass
from pathlib import Path

from .errors import TinyLLMError

DEFAULT_TOKENS, DEFAULT_WINDOW = 4096, 512  # eval's --tokens and --window, and calibration's: 8 windows of 512
PYDOC_SOURCE = "pydoc_data.topics"
MARGIN = 64  # tokens tokenized past the last one kept (see first_tokens)
DOCSTRING_MODULES = (
    "abc argparse ast asyncio bisect collections contextlib copy csv dataclasses datetime decimal difflib dis "
    "email enum fractions functools heapq http.client inspect io itertools json logging math multiprocessing "
    "os pathlib pickle pprint random re shutil socket sqlite3 ssl statistics string struct subprocess tarfile "
    "tempfile textwrap threading tokenize typing unittest urllib.request zipfile").split()


@dataclass(frozen=True)
class Text:
    source: str  # "pydoc_data.topics" or the --text path as given
    text: str

    @property
    def sha256(self) -> str:
        """Of the whole text as UTF-8: names exactly which text the figures were measured on."""
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def pydoc_text() -> Text:
    """The default text: the documentation topics of `pydoc_data.topics`, in sorted key order,
    joined by a blank line (the prose `tinyllm bench` prompts with, too). It changes a little
    between Python versions, so the JSON records the version and the text's sha256."""
    from pydoc_data.topics import topics

    return Text(PYDOC_SOURCE, "\n\n".join(topics[k] for k in sorted(topics)))


def read_text(path, flag: str = "--text") -> Text:
    """A user's text file (given as `flag`), which must be UTF-8."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise TinyLLMError(f"cannot read {flag} {path}: {e.strerror or e}") from None
    try:
        return Text(str(path), raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise TinyLLMError(f"{flag} {path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})") from None


def first_tokens(encode, text: str, n: int) -> list[int]:
    """The first `n` token ids of `text` (all of them if it has fewer). Tokenizing a long text whole
    would be wasted work, so a prefix is tokenized, doubled until it gives MARGIN tokens past `n`:
    a cut changes only the tokens of the word it falls in, so the first `n` are the whole text's."""
    chars = (n + MARGIN) * 8  # English runs ~4 characters a token
    while True:
        ids = encode(text[:chars])
        if chars >= len(text) or len(ids) >= n + MARGIN:
            return ids[:n]
        chars *= 2


def docstring_text() -> Text:
    """The default calibration text: each module's docstring, then those of its public functions and
    classes in sorted name order, joined by blank lines."""
    parts = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # typing.io and typing.re say they are going
        for name in DOCSTRING_MODULES:
            try:
                module = importlib.import_module(name)
            except ImportError:  # a Python built without it (ssl, sqlite3): its docstrings are not there
                continue
            parts.append(module.__doc__ or "")
            for attr, obj in sorted(vars(module).items()):
                if (not attr.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj))
                        and getattr(obj, "__module__", None) == module.__name__ and obj.__doc__):
                    parts.append(obj.__doc__)
    return Text("standard-library docstrings", "\n\n".join(p for p in parts if p))


def windows(ids: list[int], window: int) -> list[list[int]]:
    """Consecutive, non-overlapping windows of `window` tokens (the last may be shorter). Each is
    scored on its own, from its first token; a last window of one token predicts nothing, so it goes."""
    return [ids[i:i + window] for i in range(0, len(ids), window) if len(ids) - i >= 2]
