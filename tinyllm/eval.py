"""`python -m tinyllm eval`: what a schedule costs in accuracy, measured on a fixed text.

Every schedule reads the same tokens: by default the first 4096 of the standard library's
`pydoc_data.topics` prose (tinyllm/texts.py), tokenized without BOS, cut into independent windows of
512 tokens. In a window each position predicts the next
token, so a window of 512 scores 511 positions, and every schedule is scored on the same positions:

- **perplexity**: exp of the mean negative log-likelihood of the true next tokens;
- **KL(reference ‖ schedule)**: how far the schedule's next-token distribution is from the float32
  `reference` schedule's, sum over the vocabulary of p_ref * (log p_ref - log p_schedule), averaged
  over positions (nats; 0 for an exact schedule, up to float32 rounding);
- **top-1 agreement**: the share of positions where the schedule's most likely token is reference's.

Log-probabilities are computed in float64 from each schedule's float32 logits, a few rows at a time:
one window's logits are already 512 x 49152 float32 (100 MB) for the default model, so only the
reference's and one schedule's logits of the current window are held at once. Windows are the outer
loop and schedules the inner one, with every schedule's model loaded side by side (they map the same
safetensors file; a schedule's prepared weights are its own).

With `--plot`, decode speed joins the picture: each schedule's tokens/s come from `tinyllm bench`'s
machinery (one child process per schedule: BLAS-threaded and Numba-parallel schedules in one process
would starve each other's threads and time nothing true), one short round, or from the JSON of an
earlier `tinyllm bench --json` run (`--bench-json`), which is steadier.
"""
from __future__ import annotations

import json
import math
import platform
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import bench
from .errors import TinyLLMError
from .files import save_png, write_text_atomic
from .texts import Text, first_tokens, windows

ROWS = 64  # positions whose log-probabilities are computed at once (64 x 49152 float64 = 25 MB)
SPEED_PROMPT_TOKENS, SPEED_NEW_TOKENS = 128, 32  # decode speed for --plot: one short bench round


def tokens_to_score(model, text: Text, n: int, window: int) -> tuple[list[int], int]:
    """The first `n` token ids of `text` for `model`, and the window to score them in: at most
    `window`, and no longer than the text. Fewer tokens than asked is a warning; a window the
    model's context cannot hold is an error."""
    ids = first_tokens(model.tokenizer.encode, text.text, n)
    if len(ids) < 2:
        raise TinyLLMError(f"{text.source} has {len(ids)} token(s); eval needs at least 2")
    if len(ids) < n:
        warnings.warn(f"{text.source} has only {len(ids)} tokens; scoring those", stacklevel=2)
    window = min(window, len(ids))
    if window > model.config.max_seq_len:
        raise TinyLLMError(f"--window {window} is longer than the model's context of {model.config.max_seq_len} tokens")
    return ids, window


# ---------------------------------------------------------------------------------- the scores


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities over the last axis, in float64: the differences KL measures for an exact
    schedule are float32 rounding, ~1e-7 relative, which float32 arithmetic here would drown."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return x


@dataclass
class Score:
    """One schedule's running totals over the positions scored so far."""
    ops: str
    nll: float = 0.0  # sum of -log p(next token)
    kl: float = 0.0  # sum of KL(reference ‖ schedule)
    agree: int = 0  # positions where both argmaxes are the same token
    positions: int = 0
    decode_tok_s: float | None = None  # --plot / --bench-json

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.positions)

    @property
    def kl_mean(self) -> float:
        return self.kl / self.positions

    @property
    def top1(self) -> float:
        return self.agree / self.positions

    def add(self, ref_logits: np.ndarray, logits: np.ndarray, targets: np.ndarray) -> None:
        """Score positions 0..len(targets)-1 of a window: `logits` row i predicts `targets[i]`, and is
        compared with `ref_logits` row i. A few rows at a time, in float64."""
        for start in range(0, len(targets), ROWS):
            rows = slice(start, min(start + ROWS, len(targets)))
            ref, ours = log_softmax(ref_logits[rows]), log_softmax(logits[rows])
            self.nll -= float(ours[np.arange(len(ours)), targets[rows]].sum())
            self.kl += float((np.exp(ref) * (ref - ours)).sum())
            self.agree += int((ref_logits[rows].argmax(-1) == logits[rows].argmax(-1)).sum())
            self.positions += len(ours)

    def as_json(self) -> dict:
        speed = {} if self.decode_tok_s is None else {"decode_tok_s": self.decode_tok_s}
        return {"ops": self.ops, "ppl": self.ppl, "kl_mean": self.kl_mean, "top1": self.top1, **speed}


def evaluate(reference, models: list, ids: list[int], window: int, progress: bool = True,
             labels: list[str] | None = None) -> list[Score]:
    """Score `reference` (a tinyllm Model on the float32 `reference` schedule) and each of `models`
    on the windows of `ids`, every one against reference's distributions. Returns one Score per
    model, reference's first (its KL is computed too: 0, and top-1 1.0, by construction), named by
    `labels` (default: each model's schedule spec)."""
    from tqdm import tqdm

    chunks = windows(ids, window)
    labels = labels or [m.schedule.spec for m in [reference, *models]]
    scores = [Score(label) for label in labels]
    # disable=None: tqdm draws only when stderr is a terminal (no bar characters in logs)
    with tqdm(total=len(chunks) * len(scores), desc="eval", unit="window", disable=None if progress else True) as bar:
        for chunk in chunks:
            targets = np.asarray(chunk[1:])
            ref_logits = None
            for model, score in zip([reference, *models], scores):
                logits = model.logits(chunk)[:-1]  # the last position has no next token in the window
                ref_logits = logits if ref_logits is None else ref_logits
                score.add(ref_logits, logits, targets)
                bar.update()
    return scores


# ---------------------------------------------------------------------------------- decode speeds


def measured_speeds(rows: list[tuple[str, str, str]], context: int, threads: int | None, plugins: list[str],
                    log) -> dict[str, float]:
    """Decode tokens/s of each (label, schedule spec, model directory) row, each in a child process of
    `tinyllm bench` (one round, a short prompt and SPEED_NEW_TOKENS new tokens; fewer for a model with
    a short context). Returns label -> tokens/s."""
    prompt, new = min(SPEED_PROMPT_TOKENS, context // 4), min(SPEED_NEW_TOKENS, context // 4)
    engines = [bench.tinyllm_engine(spec, model, prompt, new, plugins) for _, spec, model in rows]
    bench.run(engines, rounds=1, threads=threads, profile=False, log=log)
    return {label: e.median("decode_tok_s") for (label, _, _), e in zip(rows, engines)}


def speeds_from_bench_json(path, specs: list[str]) -> dict[str, float]:
    """Decode tokens/s of each schedule from a `tinyllm bench --json` file (its median), matched by
    the spec exactly as written (a --quantized directory's by "SPEC @ DIR", as both commands name it)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        found = {r["ops"]: float(r["decode_tok_s"]) for r in data["results"]}
    except OSError as e:
        raise TinyLLMError(f"cannot read --bench-json {path}: {e.strerror or e}") from None
    except (ValueError, KeyError, TypeError):
        raise TinyLLMError(f"--bench-json {path} is not the JSON of `tinyllm bench --json` (results with ops and "
                           f"decode_tok_s)") from None
    missing = [s for s in specs if s not in found]
    if missing:
        raise TinyLLMError(f"--bench-json {path} has no decode speed for {', '.join(missing)} (it has: "
                           f"{', '.join(found) or 'none'}); run `tinyllm bench --json` with these --ops (and "
                           "--quantized) too")
    return {s: found[s] for s in specs}


# ---------------------------------------------------------------------------------- the report


def format_table(scores: list[Score]) -> str:
    speeds = any(s.decode_tok_s is not None for s in scores)
    header = ("ops", "ppl", "KL mean", "top-1") + (("decode tok/s",) if speeds else ())
    rows = [header]
    for s in scores:
        row = (s.ops, f"{s.ppl:.3f}", f"{s.kl_mean:.3g}", f"{100 * s.top1:.2f}%")
        rows.append(row + ((f"{s.decode_tok_s:.1f}" if s.decode_tok_s is not None else "-",) if speeds else ()))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def text_json(text: Text, tokens: int, window: int) -> dict:
    return {"source": text.source, "sha256": text.sha256, "python": platform.python_version(), "tokens": tokens,
            "window": window}


def report(scores: list[Score], text: Text, ids: list[int], window: int, json_path=None, plot_path=None) -> None:
    """What `eval` ends with: which text, the table on stdout, then the --json file and the --plot PNG."""
    about = text_json(text, len(ids), window)
    print(f"{about['source']} (Python {about['python']}, sha256 {about['sha256'][:12]}): {len(ids)} tokens in "
          f"{len(windows(ids, window))} window(s) of {window}, {scores[0].positions} positions scored against "
          "reference\n")
    print(format_table(scores))
    if json_path is not None:
        write_text_atomic(json_path, json.dumps({"text": about, "results": [s.as_json() for s in scores]},
                                                indent=2) + "\n")
    if plot_path is not None:
        plot(scores, plot_path)


def plot(scores: list[Score], path) -> None:
    """A PNG of the speed/accuracy trade-off: one point per schedule, decode tokens/s against mean
    KL divergence from reference; the legend gives each one's figures and top-1 agreement. The KL
    axis is symmetric-log, linear below 1e-6, so exact schedules (KL ~1e-11) sit at 0 and quantised
    ones spread by decade. Needs matplotlib, an optional extra (`pip install 'tinyllm-edu[plot]'`)."""
    import matplotlib

    matplotlib.use("Agg")  # draw into a file; no window, no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5.5))
    markers = "osD^vP*Xph"  # exact schedules share a point: their markers tell them apart
    for i, s in enumerate(scores):
        ax.scatter([s.kl_mean], [s.decode_tok_s], s=70, marker=markers[i % len(markers)], alpha=0.8, zorder=3,
                   color=plt.get_cmap("tab10")(i % 10),
                   label=f"{s.ops}: {s.decode_tok_s:.1f} tok/s, KL {s.kl_mean:.2g}, top-1 {100 * s.top1:.1f}%")
    ax.set_xscale("symlog", linthresh=1e-6)
    ax.set_xlim(left=-1e-7, right=max(1e-2, 3 * max(s.kl_mean for s in scores)))
    ax.set_ylim(0, max(s.decode_tok_s for s in scores) * 1.15)
    ax.set_xlabel("mean KL(reference ‖ schedule), nats per token (0: exact)")
    ax.set_ylabel("decode tokens/s")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("tinyllm: decode speed against accuracy, per schedule")
    fig.tight_layout()
    save_png(fig, path)
