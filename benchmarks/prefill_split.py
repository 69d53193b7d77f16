"""Quantised prefill with and without ops/threads.py's split, side by side in one process.

    python benchmarks/prefill_split.py --rounds 30 --ops q8_0 --ops int8 --ops q4_0

Each round times a 128-token prefill (`Model.logits`, the mean of 2 after a warm-up) of `fused`, then
of each quantised schedule twice: with BLAS's own threads reading tiles one core wrote ("tiles", the
split switched off) and with each core dequantising and multiplying its own rows ("split", as
tinyllm runs). It prints each round's ratios to `fused` and, at the end, their median and minimum:
this machine switches between a state in which reading another core's fresh writes is fast and one
in which it is slow, so the minimum is what the split is for. Needs the default model (tinyllm pull).
"""
import argparse
import contextlib
import time

import numpy as np

import tinyllm
from tinyllm.bench import bench_prompt


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--ops", action="append", help="quantised schedules (default: q8_0, int8, q4_0)")
    parser.add_argument("--model", default="weights/smollm2-135m-instruct")
    args = parser.parse_args()
    no_split = lambda rows: contextlib.nullcontext()  # noqa: E731  (in place of the table's forward_pass)
    fused = tinyllm.load(args.model, ops="fused", progress=False)
    models = {spec: tinyllm.load(args.model, ops=spec, progress=False) for spec in args.ops or ["q8_0", "int8", "q4_0"]}
    ids = bench_prompt(fused.tokenizer.encode, 128)

    def ms(model, n=2):
        model.logits(ids)
        start = time.perf_counter()
        for _ in range(n):
            model.logits(ids)
        return (time.perf_counter() - start) / n * 1e3

    ratios = {spec: [] for spec in models}
    for _ in range(args.rounds):
        f = ms(fused)
        line = f"{time.strftime('%H:%M:%S')} fused {f:.0f} ms"
        for spec, model in models.items():
            model.transformer.ops.forward_pass = no_split
            tiles = ms(model)
            del model.transformer.ops.forward_pass  # the schedule's own again
            ours = ms(model)
            ratios[spec].append((f / tiles, f / ours))
            line += f" | {spec} tiles {f / tiles:.2f} split {f / ours:.2f}"
        print(line, flush=True)
    for spec, r in ratios.items():
        r = np.array(r)
        print(f"{spec}: prefill x fused, tiles median {np.median(r[:, 0]):.2f} min {r[:, 0].min():.2f}; "
              f"split median {np.median(r[:, 1]):.2f} min {r[:, 1].min():.2f}")


if __name__ == "__main__":
    main()
