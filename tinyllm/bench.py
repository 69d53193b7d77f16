"""`python -m tinyllm bench`: speed and memory of schedules, measured side by side.

Each engine (a tinyllm schedule, or another engine such as transformers, see benchmarks/) runs in a
child process of its own, because peak memory only grows within a process and one engine's JIT or
allocator state must not tax another. The parent alternates rounds between the children
(A B A B ...) so that drift of a noisy machine hits all of them alike, and reports the median with
min and max. The children speak a line protocol on stdin/stdout, one JSON object per line:

    parent -> child: {"cmd": "run"}         child -> parent: {"prefill_tok_s", "decode_tok_s", "ttft_s"}
    parent -> child: {"cmd": "profile"}     child -> parent: {"profile": {"prefill": [...], "decode": [...]}}
    parent -> child: {"cmd": "stats"}       child -> parent: {"peak_rss_mib"}
and on start-up the child sends {"ready": true, "load_s", "weights_rss_mib", "kernels_rss_mib"} once it is
loaded and warmed up.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

from .errors import TinyLLMError
from .files import check_writable, save_png, write_text_atomic
from .texts import first_tokens, pydoc_text

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")
SETTLE_S = 0.5
PROFILE_PREFILLS = 3  # the prefill profile is the mean of this many prefills (one alone is noisy)


# ---------------------------------------------------------------------------------- shared helpers


def rss_mib() -> float:
    """Resident memory of this process now (Linux /proc; elsewhere the peak, the best we can do)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss_mib()


def peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20


def bench_prompt(tokenizer_encode, n_tokens: int) -> list[int]:
    """A fixed English prompt: the first `n_tokens` tokens of eval's text, the standard library's
    pydoc topics (tinyllm/texts.py)."""
    ids = first_tokens(tokenizer_encode, pydoc_text().text, n_tokens)
    if len(ids) < n_tokens:
        raise TinyLLMError(f"the benchmark text gives only {len(ids)} tokens")
    return ids[:n_tokens]


def machine_info(threads: int | None) -> dict:
    import numpy as np

    try:
        import numba

        numba_version = numba.__version__
    except ImportError:
        numba_version = None
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        blas = np.__config__.CONFIG["Build Dependencies"]["blas"]
        blas = f"{blas['name']} {blas.get('version', '')}".strip()
    except (AttributeError, KeyError, TypeError):
        blas = "unknown"
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "python": platform.python_version(),
            "numpy": np.__version__, "numba": numba_version, "blas": blas}


# ---------------------------------------------------------------------------------- the child


def worker(model_path: str | None, spec: str, prompt_tokens: int, new_tokens: int, plugins: list[str]) -> None:
    """Load the model with schedule `spec`, warm up, then answer the parent's commands."""
    # Here, not at the top: the parent's command line imports this module (THREAD_VARS) before
    # --threads is applied, so nothing that loads NumPy may be imported with it.
    import tinyllm  # already imported by `python -m tinyllm.bench`, with NumPy and Numba
    from tinyllm.placement import release_free_heap
    from tinyllm.plugins import load_plugins

    load_plugins(plugins)
    rss_imports = rss_mib()
    warm_up_kernels(spec)
    rss_code = rss_mib()  # imports plus the schedule's compiled kernels: the baseline of weights_rss
    t0 = time.perf_counter()
    model = tinyllm.load(model_path, ops=spec, progress=False)
    load_s = time.perf_counter() - t0
    # Weights as loaded and prepared (loading reads every tensor, so memory-mapped ones are resident):
    # measured before the warm-up, whose KV cache and embedding rows are not the schedule's weights.
    # Preparing freed temporaries (float32 rows being quantised) that glibc keeps mapped for reuse:
    # allocator slack, not weights, so it goes back first.
    release_free_heap()
    weights_rss = rss_mib() - rss_code
    model.stop_ids = set()  # EOS ignored: every round decodes exactly `new_tokens`
    prompt = bench_prompt(model.tokenizer.encode, prompt_tokens)

    def one_run():
        for _ in model.generate_ids(prompt, max_new_tokens=new_tokens):
            pass
        s = model.last_stats
        return {"prefill_tok_s": s.prefill_tok_s, "decode_tok_s": s.decode_tok_s, "ttft_s": s.ttft_s}

    # Warm-up: JIT compilation (or loading it from the cache) and first touches of the weights.
    for _ in model.generate_ids(prompt, max_new_tokens=8):
        pass
    _send({"ready": True, "load_s": load_s, "weights_rss_mib": weights_rss,
           "kernels_rss_mib": rss_code - rss_imports})
    for line in sys.stdin:
        cmd = json.loads(line)["cmd"]
        if cmd == "run":
            _send(one_run())
        elif cmd == "profile":
            _send({"profile": profile_ops(model, prompt, steps=min(new_tokens, 32))})
        elif cmd == "stats":
            _send({"peak_rss_mib": peak_rss_mib()})
        elif cmd == "quit":
            return


def warm_up_kernels(spec: str) -> None:
    """Run schedule `spec` on a tiny random model first, so its compiled kernels are loaded from
    Numba's cache (or compiled) before the real weights are measured. The Numba runtime and machine
    code are code, like an import, which `kernels_rss_mib` reports on its own, and not part of
    `weights_rss_mib`. The sizes take the same code paths as the real model (a prefill of more rows
    than decode's few, decode steps with enough work for the parallel attention)."""
    from tinyllm import schedule as scheduling
    from tinyllm.checkpoint import random_checkpoint
    from tinyllm.config import Config
    from tinyllm.generate import GenerationStats, Sampling, generate_tokens
    from tinyllm.model import Transformer

    cfg = Config.from_dict({"vocab_size": 64, "hidden_size": 128, "intermediate_size": 192, "num_hidden_layers": 1,
                            "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 160,
                            "tie_word_embeddings": True})
    weights = random_checkpoint(cfg)
    for w in weights.values():
        w.flags.writeable = False  # as memory-mapped weights are: Numba compiles read-only arrays apart
    model = Transformer(cfg, weights)
    scheduling.apply(model, scheduling.parse(spec))
    for _ in generate_tokens(model, [i % cfg.vocab_size for i in range(128)], 4, Sampling(), set(), GenerationStats()):
        pass


def _send(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def profile_ops(model, prompt: list[int], steps: int) -> dict[str, list[dict]]:
    """Where the time goes, op by op: in a prefill of `prompt` ("prefill": ms per prefill, the mean of
    PROFILE_PREFILLS) and in the mean of `steps` decode steps after it ("decode": ms per step). Each op's time is
    *exclusive* (a composed composite's rows do not include its steps, which are rows of their own);
    "(model code)" is the rest: the forward pass's own Python between the ops."""
    t = model.transformer
    table = t.ops
    totals: dict[str, list] = {}  # op -> [calls, seconds]
    stack: list[float] = [0.0]  # time spent in nested op calls, per open call

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            stack.append(0.0)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                nested = stack.pop()
                stack[-1] += elapsed
                entry = totals.setdefault(name, [0, 0.0])
                entry[0] += 1
                entry[1] += elapsed - nested

        return wrapper

    def rows(n, total_s):
        out = [{"op": name, "variant": table.choice[name], "calls": calls // n, "ms": secs / n * 1e3,
                "pct": 100 * secs / total_s} for name, (calls, secs) in totals.items()]
        out.sort(key=lambda r: -r["ms"])
        other = total_s / n - sum(r["ms"] for r in out) / 1e3
        out.append({"op": "(model code)", "variant": "", "calls": 0, "ms": other * 1e3, "pct": 100 * other * n / total_s})
        return out

    originals = {name: getattr(table, name) for name in table.choice}
    for name, fn in originals.items():
        setattr(table, name, timed(name, fn))
    try:
        start = time.perf_counter()
        for _ in range(PROFILE_PREFILLS):
            cache = t.new_cache(len(prompt) + steps + 1)
            token = table.argmax(t.forward(prompt, 0, cache, last_only=True)[-1])
        prefill = rows(PROFILE_PREFILLS, time.perf_counter() - start)
        totals.clear()
        start = time.perf_counter()
        for i in range(steps):
            token = table.argmax(t.forward([token], len(prompt) + i, cache)[0])
        decode = rows(steps, time.perf_counter() - start)
    finally:
        for name, fn in originals.items():
            setattr(table, name, fn)
    return {"prefill": prefill, "decode": decode}


# ---------------------------------------------------------------------------------- the parent


@dataclass
class Engine:
    name: str  # the spec exactly as the user gave it, or e.g. "transformers"
    argv: list[str]
    proc: subprocess.Popen | None = None
    ready: dict = field(default_factory=dict)
    runs: list = field(default_factory=list)
    peak_rss_mib: float = 0.0
    profile: list | None = None

    def median(self, key: str) -> float:
        return statistics.median(r[key] for r in self.runs)

    def start(self, env):
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.ready = self.receive()

    def ask(self, cmd: str) -> dict:
        self.proc.stdin.write(json.dumps({"cmd": cmd}) + "\n")
        self.proc.stdin.flush()
        return self.receive()

    def receive(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise TinyLLMError(f"the benchmark of {self.name} stopped (exit status {code}); its error is above")
        return json.loads(line)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()


def tinyllm_engine(spec: str, model: str | None, prompt_tokens: int, new_tokens: int, plugins: list[str],
                   name: str | None = None) -> Engine:
    argv = [sys.executable, "-m", "tinyllm.bench", "--spec", spec, "--prompt-tokens", str(prompt_tokens),
            "--new-tokens", str(new_tokens)]
    if model:
        argv += ["--model", model]
    for p in plugins:
        argv += ["--plugin", p]
    return Engine(name or spec, argv)


def run(engines: list[Engine], *, rounds: int, threads: int | None, profile: bool, log=print) -> list[Engine]:
    """Start every engine, alternate `rounds` timed runs between them, collect memory and profiles."""
    env = dict(os.environ)
    if threads:
        env.update({var: str(threads) for var in THREAD_VARS})
    try:
        for e in engines:
            log(f"starting {e.name} ...")
            e.start(env)
        for r in range(rounds):
            for e in engines:
                # Let the previous engine's idle BLAS/OpenMP workers stop spin-waiting (they spin for
                # up to ~0.1 s after their last job) before timing the next one on the same cores.
                time.sleep(SETTLE_S)
                e.runs.append(e.ask("run"))
            log(f"round {r + 1}/{rounds} done")
        for e in engines:
            if profile and e.argv[1:3] == ["-m", "tinyllm.bench"]:
                e.profile = e.ask("profile")["profile"]
            e.peak_rss_mib = e.ask("stats")["peak_rss_mib"]
    finally:
        for e in engines:
            e.stop()
    return engines


def summary(e: Engine) -> dict:
    return {"ops": e.name, "prefill_tok_s": e.median("prefill_tok_s"), "decode_tok_s": e.median("decode_tok_s"),
            "ttft_s": e.median("ttft_s"), "load_s": e.ready["load_s"], "weights_rss_mib": e.ready["weights_rss_mib"],
            "kernels_rss_mib": e.ready.get("kernels_rss_mib"), "peak_rss_mib": e.peak_rss_mib, "runs": e.runs,
            **({"profile": e.profile} if e.profile else {})}


def format_table(engines: list[Engine]) -> str:
    def span(e, key, fmt):
        values = [r[key] for r in e.runs]
        return f"{fmt.format(e.median(key))} ({fmt.format(min(values))}-{fmt.format(max(values))})"

    header = ("ops", "prefill tok/s", "decode tok/s", "ttft ms", "load s", "weights MiB", "kernels MiB", "peak MiB")
    rows = [header]
    for e in engines:
        rows.append((e.name, span(e, "prefill_tok_s", "{:.0f}"), span(e, "decode_tok_s", "{:.1f}"),
                     f"{e.median('ttft_s') * 1e3:.0f}", f"{e.ready['load_s']:.2f}",
                     f"{e.ready['weights_rss_mib']:.0f}", _mib(e.ready.get("kernels_rss_mib")), f"{e.peak_rss_mib:.0f}"))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
    lines = ["  ".join(f"{str(c):<{w}}" if i == 0 else f"{str(c):>{w}}" for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    out = "\n".join(lines)
    base = engines[0]
    if len(engines) > 1:
        def ratio(e, key):
            return f"{e.median(key) / base.median(key):.2f}x" if base.median(key) else "n/a"

        ratios = [f"{e.name}: decode {ratio(e, 'decode_tok_s')}, prefill {ratio(e, 'prefill_tok_s')}"
                  for e in engines[1:]]
        out += f"\n\nrelative to {base.name} (medians, same run): " + "; ".join(ratios)
    return out


def _mib(value) -> str:
    return "-" if value is None else f"{value:.0f}"  # another engine (transformers) does not report it


def format_profile(e: Engine) -> str:
    titles = {"prefill": f"prefill profile, {e.name} (exclusive time of one prefill of the prompt):",
              "decode": f"decode step profile, {e.name} (exclusive time per step):"}
    lines = []
    for phase, rows in e.profile.items():
        if lines:
            lines.append("")
        lines += [titles[phase],
                  f"  {'op':<14} {'variant':<10} {'calls':>5} {'ms':>8} {'%':>6}"]
        for r in rows:
            lines.append(f"  {r['op']:<14} {r['variant']:<10} {r['calls']:>5} {r['ms']:>8.3f} {r['pct']:>5.1f}%")
    return "\n".join(lines)


def report(engines: list[Engine], *, threads: int | None, prompt_tokens: int, new_tokens: int, rounds: int,
           json_path=None, plot_path=None) -> None:
    """What `bench` (and benchmarks/compare.py) ends with: the machine, the table and any profiles on
    stdout, then the --json file and the --plot PNG if asked for."""
    info = machine_info(threads)
    print(f"{info['cpu']}, {info['cores']} cores, threads {threads or 'default'}, python {info['python']}, "
          f"numpy {info['numpy']}, numba {info['numba']}, BLAS {info['blas']}")
    print(f"prompt {prompt_tokens} tokens, {new_tokens} new tokens, median (min-max) of {rounds} rounds\n")
    print(format_table(engines))
    for e in engines:
        if e.profile:
            print("\n" + format_profile(e))
    if json_path is not None:
        write_text_atomic(json_path, json.dumps({"machine": info, "results": [summary(e) for e in engines]},
                                                indent=2) + "\n")
    if plot_path is not None:
        plot(engines, plot_path)


def check_outputs(json_path, plot_path) -> None:
    """--json's and --plot's checks, made before anything is measured, not after minutes of it: each
    path can be written, and --plot has matplotlib."""
    import importlib.util

    if json_path is not None:
        check_writable(json_path, "--json")
    if plot_path is not None:
        check_writable(plot_path, "--plot")
        if importlib.util.find_spec("matplotlib") is None:
            raise TinyLLMError("--plot needs matplotlib: pip install 'tinyllm-edu[plot]'")


def plot(engines: list[Engine], path) -> None:
    """A PNG of where the time goes: for each profiled schedule, one bar per phase (a decode step,
    one prefill) stacked by op, labelled with the phase's tokens/s. Needs matplotlib, an optional
    extra (`pip install 'tinyllm-edu[plot]'`)."""
    import matplotlib

    matplotlib.use("Agg")  # draw into a file; no window, no display needed
    import matplotlib.pyplot as plt

    profiled = [e for e in engines if e.profile]
    if not profiled:
        raise TinyLLMError("--plot needs a profile: no tinyllm schedule was profiled")
    names = [e.name for e in profiled]
    fig, axes = plt.subplots(1, 2, figsize=(max(9.0, 3.0 * len(profiled) + 3.0), 5.5))
    colors = {}  # one colour per op, the same in both panels
    for ax, phase, speed in zip(axes, ("decode", "prefill"), ("decode_tok_s", "prefill_tok_s")):
        ms = [{r["op"]: r["ms"] for r in e.profile[phase]} for e in profiled]
        totals = [sum(m.values()) for m in ms]
        # ops that are at least 2% of some bar get a segment of their own; the rest are "other ops"
        big = sorted({op for m, t in zip(ms, totals) for op, v in m.items() if v >= 0.02 * t},
                     key=lambda op: -max(m.get(op, 0.0) for m in ms))
        segments = [(op, [m.get(op, 0.0) for m in ms]) for op in big]
        segments.append(("other ops", [t - sum(m.get(op, 0.0) for op in big) for m, t in zip(ms, totals)]))
        bottom = [0.0] * len(profiled)
        for op, heights in segments:  # the biggest at the bottom of every bar
            color = colors.setdefault(op, plt.get_cmap("tab20")(len(colors) % 20))
            ax.bar(names, heights, bottom=bottom, label=op, color=color)
            bottom = [b + h for b, h in zip(bottom, heights)]
        for i, e in enumerate(profiled):
            ax.annotate(f"{e.median(speed):.0f} tok/s", (i, bottom[i]), ha="center", va="bottom")
        ax.set_title("one decode step" if phase == "decode" else "one prefill of the prompt")
        ax.set_ylabel("ms (exclusive time per op; label: median tokens/s)")
        ax.set_ylim(0, max(bottom) * 1.12)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.tick_params(axis="x", labelrotation=15)
    fig.suptitle("tinyllm: where the time goes, per schedule")
    fig.tight_layout()
    save_png(fig, path)


def main(argv=None) -> None:
    """The child process entry point (`python -m tinyllm.bench --spec ...`)."""
    import argparse

    ap = argparse.ArgumentParser(description="tinyllm benchmark worker (started by `tinyllm bench`)")
    ap.add_argument("--spec", required=True)
    ap.add_argument("--model")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--plugin", action="append", default=[])
    args = ap.parse_args(argv)
    try:
        worker(args.model, args.spec, args.prompt_tokens, args.new_tokens, args.plugin)
    except TinyLLMError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
