"""tinyllm's schedules and Hugging Face transformers (torch, fp32), side by side in one run.

    python benchmarks/compare.py [--ops SPEC ...] [--rounds 3] [--threads 2] [--json PATH] [--profile] [--plot PNG]

Every engine runs in its own child process; rounds alternate between them (A B C A B C ...). The
transformers row needs the test extra (torch, transformers); without it the row is skipped.
`benchmarks/RESULTS.md` holds the latest table and the command that made it.
"""
import argparse
import importlib.util
import sys
from pathlib import Path

from tinyllm import bench
from tinyllm.errors import TinyLLMError
from tinyllm.pull import default_model_dir, is_model_dir, pull
from tinyllm.schedule import PRESETS

HERE = Path(__file__).resolve().parent


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--ops", action="append", help="tinyllm schedules (default: every preset)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--plot", help="also draw the tinyllm schedules' per-op profiles into this PNG (implies --profile)")
    args = ap.parse_args()
    bench.check_outputs(args.json, args.plot)
    if args.plot is not None:
        args.profile = True

    model = args.model or (str(default_model_dir()) if is_model_dir(default_model_dir()) else str(pull()))
    engines = [bench.tinyllm_engine(s, model, args.prompt_tokens, args.new_tokens, [])
               for s in args.ops or list(PRESETS)]
    if importlib.util.find_spec("torch") and importlib.util.find_spec("transformers"):
        engines.append(bench.Engine("transformers fp32", [
            sys.executable, str(HERE / "transformers_worker.py"), "--model", model,
            "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]))
    else:
        print("torch/transformers not installed: no transformers row", file=sys.stderr)
    bench.run(engines, rounds=args.rounds, threads=args.threads, profile=args.profile,
              log=lambda m: print(m, file=sys.stderr))
    bench.report(engines, threads=args.threads, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                 rounds=args.rounds, json_path=args.json, plot_path=args.plot)


if __name__ == "__main__":
    try:
        main()
    except TinyLLMError as e:  # like the tinyllm command: one line, exit 2
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
