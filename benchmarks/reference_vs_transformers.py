"""Side by side, in one process and one run: tinyllm's schedules against Hugging Face transformers
(torch, fp32) on the same model directory. Prefill of a 128-token prompt and greedy decode of 64 new
tokens (EOS ignored), batch 1; rounds alternate between engines so machine drift hits all alike.

    python benchmarks/reference_vs_transformers.py [--model DIR] [--ops SPEC ...] [--rounds 3] [--threads 2]

Needs the test extra (torch, transformers) for the transformers row; without it, that row is skipped.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: the default model)")
    ap.add_argument("--ops", action="append", default=None, help="tinyllm schedule(s) to run (default: reference)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    # Thread counts must be set before numpy/torch start their pools.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(args.threads)

    import numpy as np

    import tinyllm

    engines = {}
    for spec in args.ops or ["reference"]:
        engines[f"tinyllm {spec}"] = tinyllm_engine(tinyllm.load(args.model, ops=spec, progress=False))
    model_dir = tinyllm.load(args.model, progress=False).path
    try:
        engines["transformers fp32"] = transformers_engine(model_dir, args.threads)
    except ImportError:
        print("transformers/torch not installed: skipping that row", file=sys.stderr)

    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(100, 40000, args.prompt_tokens)]
    runs = {name: [] for name in engines}
    for name, run in engines.items():  # warm-up
        run(prompt[:8], 2)
    for _ in range(args.rounds):
        for name, run in engines.items():
            runs[name].append(run(prompt, args.new_tokens))

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads, "
          f"python {platform.python_version()}, numpy {np.__version__}")
    print(f"prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, median of {args.rounds} rounds "
          f"(min-max)\n")
    print(f"{'engine':<24} {'prefill tok/s':>22} {'decode tok/s':>20}")
    for name, rs in runs.items():
        pre = [r[0] for r in rs]
        dec = [r[1] for r in rs]
        print(f"{name:<24} {statistics.median(pre):>8.0f} ({min(pre):.0f}-{max(pre):.0f}){'':>4} "
              f"{statistics.median(dec):>8.1f} ({min(dec):.1f}-{max(dec):.1f})")


def tinyllm_engine(model):
    t = model.transformer

    def run(prompt, n_new):
        cache = t.new_cache(len(prompt) + n_new)
        t0 = time.perf_counter()
        token = int(t.forward(prompt, 0, cache, last_only=True)[-1].argmax())
        t1 = time.perf_counter()
        for i in range(n_new - 1):
            token = int(t.forward([token], len(prompt) + i, cache)[0].argmax())
        t2 = time.perf_counter()
        return len(prompt) / (t1 - t0), (n_new - 1) / (t2 - t1)

    return run


def transformers_engine(model_dir, threads):
    import torch
    from transformers import DynamicCache, LlamaForCausalLM

    torch.set_num_threads(threads)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    @torch.inference_mode()
    def run(prompt, n_new):
        cache = DynamicCache()
        t0 = time.perf_counter()
        out = model(torch.tensor([prompt]), past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[0, -1].argmax()
        t1 = time.perf_counter()
        for _ in range(n_new - 1):
            out = model(token.view(1, 1), past_key_values=cache, use_cache=True)
            token = out.logits[0, -1].argmax()
        t2 = time.perf_counter()
        return len(prompt) / (t1 - t0), (n_new - 1) / (t2 - t1)

    return run


if __name__ == "__main__":
    main()
