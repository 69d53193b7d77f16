"""Same outputs before and after a change: every preset's logits, bit for bit, and `eval`'s scores.

    python benchmarks/same_outputs.py OUT.npz [--model DIR] [--threads N]
    python benchmarks/same_outputs.py --compare A.npz B.npz

The first form writes OUT.npz, OUT_eval.json, and (beside them) OUT_q8_0/, a model directory written by
`tinyllm quantize --ops q8_0 --rounding nearest`. For each of the presets reference, numba, fused, int8,
q8_0, q4_0, q4_1 and for that directory (named "quantized_q8_0"), OUT.npz holds, under "NAME/...":

    prefill3     logits (3, vocab) of a 3-token prefill into a new cache (all positions, not last_only)
    prefill128   logits (128, vocab) of a 128-token prefill into a new cache
    decode16     logits (16, vocab) of 16 greedy decode steps after prefill128, one token at a time
    decode_ids   the 16 tokens those steps were given (each the argmax of the logits before it)

plus "ids", the 128 prompt tokens (a fixed text, tokenized; prefill3 uses the first 3).
OUT_eval.json is `tinyllm eval --tokens 1024 --json` over the same presets and `--quantized OUT_q8_0`
(the directory's path replaced by "QDIR", so runs in two places compare).

Run it on the commit before a change and on the one after it, each from its own checkout so that
`import tinyllm` finds that checkout's code (e.g. `cd OLD && PYTHONPATH=$PWD python .../same_outputs.py
/tmp/before.npz`), then `--compare before.npz after.npz`: per array, "equal" (np.array_equal) or the
max abs and rel difference, then whether the eval JSONs are identical or which fields differ. Exit 1 on
any difference. The threads are fixed (default 2) so that both runs split their work alike.

Run it twice on each side and compare the second runs: a process that compiles the Numba kernels
(no cache yet, or the source changed) can differ in the last bits from one that loads them from the
cache, and the quantised presets' few-row paths (prefill3, decode16) show it (on the old code, cold vs
warm: int8 ~1e-5, q8_0 up to 0.7, where a moved last bit flips an activation's rounding).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

PRESETS = ["reference", "numba", "fused", "int8", "q8_0", "q4_0", "q4_1"]
QUANTIZED = "quantized_q8_0"
PROMPT = 128
DECODE = 16
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")
TEXT = ("The Python standard library is very extensive, offering a wide range of facilities. It contains "
        "built-in modules, written in C, that provide access to system functionality such as file I/O "
        "that would otherwise be inaccessible to Python programmers, as well as modules written in "
        "Python that provide standardized solutions for many problems that occur in everyday programming. "
        "Some of these modules are explicitly designed to encourage and enhance the portability of Python "
        "programs by abstracting away platform-specifics into platform-neutral APIs. In addition to the "
        "standard library, there is an active collection of hundreds of thousands of components, from "
        "individual programs and modules to packages and entire application development frameworks.")


def tinyllm_cli(*args: str) -> None:
    print("$ python -m tinyllm", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "tinyllm", *args], check=True)


def outputs(model, ids) -> dict:
    """Logits of a 3-token and a 128-token prefill and of 16 greedy steps after the latter."""
    import numpy as np

    t = model.transformer
    out = {"prefill3": t.forward(ids[:3], 0, t.new_cache())}
    cache = t.new_cache()
    logits = t.forward(ids, 0, cache)
    out["prefill128"], steps, tokens = logits, [], []
    for _ in range(DECODE):
        tokens.append(int(np.argmax(logits[-1])))
        logits = t.forward([tokens[-1]], cache.length, cache)
        steps.append(logits[0])
    out["decode16"], out["decode_ids"] = np.stack(steps), np.array(tokens)
    return out


def write(out: Path, model_dir: str | None, threads: int) -> None:
    os.environ.update({var: str(threads) for var in THREAD_VARS})  # before NumPy loads, here and in children
    import numpy as np
    import tinyllm

    print("tinyllm from", tinyllm.__file__, flush=True)
    reference = tinyllm.load(model_dir, ops="reference", progress=False)
    model_dir = str(reference.path.resolve())
    ids = reference.tokenizer.encode(TEXT)[:PROMPT]
    assert len(ids) == PROMPT, f"the text gives only {len(ids)} tokens"
    arrays = {"ids": np.array(ids)}
    qdir = out.with_name(out.stem + "_q8_0")
    tinyllm_cli("quantize", "--model", model_dir, "--ops", "q8_0", "--rounding", "nearest", "--out", str(qdir),
                "--force")
    for name in PRESETS + [QUANTIZED]:
        print("logits of", name, flush=True)
        model = reference if name == "reference" else (
            tinyllm.load(qdir, progress=False) if name == QUANTIZED else tinyllm.load(model_dir, ops=name))
        arrays.update({f"{name}/{k}": v for k, v in outputs(model, ids).items()})
        del model
    np.savez(out, **arrays)
    eval_json = out.with_name(out.stem + "_eval.json")
    tinyllm_cli("eval", "--model", model_dir, *[a for p in PRESETS[1:] for a in ("--ops", p)],
                "--quantized", str(qdir), "--tokens", "1024", "--threads", str(threads), "--json", str(eval_json))
    eval_json.write_text(eval_json.read_text().replace(json.dumps(str(qdir))[1:-1], "QDIR"))
    print("wrote", out, "and", eval_json)


def json_differences(a, b, where="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str)
                for d in (json_differences(a[k], b[k], f"{where}.{k}") if k in a and k in b else [f"{where}.{k}"])]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in json_differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def compare(a_path: Path, b_path: Path) -> int:
    import numpy as np

    a, b = np.load(a_path), np.load(b_path)
    bad = 0
    for key in sorted(set(a.files) | set(b.files)):
        if key not in a.files or key not in b.files:
            print(f"{key:28s} only in {a_path if key in a.files else b_path}")
        elif a[key].shape != b[key].shape:
            print(f"{key:28s} shapes differ: {a[key].shape} vs {b[key].shape}")
        elif np.array_equal(a[key], b[key]):
            print(f"{key:28s} equal")
            continue
        else:
            diff = np.abs(a[key].astype(np.float64) - b[key])
            rel = diff.max() / max(np.abs(a[key]).max(), 1e-30)
            print(f"{key:28s} DIFFERS: max|a-b| = {diff.max():.3g}, relative to max|a| {rel:.3g}")
        bad += 1
    ja, jb = (p.with_name(p.stem + "_eval.json") for p in (a_path, b_path))
    missing = [str(p) for p in (ja, jb) if not p.exists()]
    fields = [f"missing: {', '.join(missing)}"] if missing else json_differences(
        json.loads(ja.read_text()), json.loads(jb.read_text()))
    print("eval JSONs identical" if not fields else "eval JSONs differ at:\n  " + "\n  ".join(fields))
    print("same outputs" if not bad and not fields else f"DIFFERENT: {bad} arrays, {len(fields)} eval fields")
    return 1 if bad or fields else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", nargs="?", type=Path, help="the .npz to write")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("A.npz", "B.npz"))
    p.add_argument("--model", help="model directory (default: the default model)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if args.compare:
        return compare(*args.compare)
    if args.out is None:
        p.error("give OUT.npz, or --compare A.npz B.npz")
    write(args.out.resolve(), args.model, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
