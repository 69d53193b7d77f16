"""Start-up: the compiled kernels are cached on disk, so a second start compiles nothing.

Numba says what its cache does when NUMBA_DEBUG_CACHE is set: "[cache] data saved to ..." after a
compile, "[cache] data loaded from ..." when a kernel comes from disk. A fresh NUMBA_CACHE_DIR makes
the first start compile every kernel the run needs, whatever earlier tests left beside the sources.
"""
import os
import subprocess
import sys


def test_second_start_loads_every_kernel_from_the_cache(tiny_model_dir, tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba"), NUMBA_DEBUG_CACHE="1")
    # a 5-token prompt takes the prefill path (above DECODE_MAX_ROWS), then decode steps take the one-row kernels
    args = [sys.executable, "-m", "tinyllm", "generate", "hello", "--raw", "--max-new-tokens", "6",
            "--model", str(tiny_model_dir), "--ops", "fused"]
    first = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr
    assert "[cache] data saved" in first.stdout  # the empty cache made it compile

    second = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stderr
    assert "[cache] data loaded" in second.stdout
    assert "[cache] data saved" not in second.stdout, "a kernel was compiled again on the second start"
    assert second.stdout.splitlines()[-1] == first.stdout.splitlines()[-1]  # and it generates the same text
