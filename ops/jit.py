"""How our Numba kernels are compiled: one place for the flags every kernel shares.

- `cache=True`: compiled machine code is kept on disk, so a second start does not compile again.
  Numba writes its cache beside the source file (`__pycache__`); where that is read-only (a
  non-editable install in a system site-packages), we point NUMBA_CACHE_DIR at the user cache.
- fastmath: only the flags that keep NaN and Inf meaning what they mean. `reassoc` lets sums be
  vectorised (reordered, hence the ~1e-5 tolerances), `contract` allows fused multiply-add, `arcp`
  and `afn` allow reciprocal and approximate-libm rewrites, `nsz` ignores the sign of zero (-0.0 vs
  0.0 compare equal anyway); `nnan`/`ninf` (in `fastmath=True`) are
  left out, because with them the compiler may assume no NaN/Inf exists and drop our handling of
  them (an all-masked row, an overflowing exp).
- Threads: Numba's `prange` uses NUMBA_NUM_THREADS workers (default: the cores); `parallel=True` is
  used only where a kernel moves enough memory to pay for waking them.
- Decode and prefill differ, and every variant that cares asks `is_decode(rows)`: the one split.
  With a few rows (decode: T = 1; up to DECODE_MAX_ROWS) a projection streams its weights once
  and is memory-bound: our parallel matrix-vector kernels beat BLAS there. With many rows (prefill)
  it is compute-bound, and BLAS's blocked GEMM is the right tool; the kernels around it run serial.
  That split also keeps the two thread pools apart: OpenBLAS's and Numba's workers both spin-wait
  for their next job, and on a machine with no idle core a parallel Numba kernel squeezed between
  BLAS calls waits for a spinning BLAS worker to be descheduled, and vice versa (what two spinning
  pools cost is measured in benchmarks/RESULTS.md, "Quantised weights"). A prefill on quantised
  weights shares the cores another way, without Numba's workers: see ops/threads.py.
"""
from __future__ import annotations

import os
from pathlib import Path

FASTMATH = {"reassoc", "contract", "arcp", "afn", "nsz"}
DECODE_MAX_ROWS = 4  # up to this many rows, the kernels stream the weights themselves (decode); above, BLAS


def is_decode(rows: int) -> bool:
    """Whether a pass over `rows` tokens takes the decode path (stream the weights once, Numba's
    threads) rather than the prefill path (BLAS products, serial kernels around them)."""
    return rows <= DECODE_MAX_ROWS


def _ensure_writable_cache() -> None:
    if os.environ.get("NUMBA_CACHE_DIR"):
        return
    here = Path(__file__).resolve().parent
    if not os.access(here, os.W_OK):
        cache = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "tinyllm" / "numba"
        cache.mkdir(parents=True, exist_ok=True)
        os.environ["NUMBA_CACHE_DIR"] = str(cache)


try:
    _ensure_writable_cache()
    import numba

    NUMBA_AVAILABLE, NUMBA_MISSING = True, ""
except Exception as e:  # numba is a dependency, but a broken llvmlite must not break the reference path
    numba = None
    NUMBA_AVAILABLE, NUMBA_MISSING = False, f"numba cannot be imported: {e}"

# what every Numba variant passes to @variant: available where numba imports, else why not
NEEDS_NUMBA = dict(available=NUMBA_AVAILABLE, unavailable_reason=NUMBA_MISSING)


def njit(*args, parallel: bool = False, **kwargs):
    """numba.njit with our cache and fastmath settings (a no-op decorator if numba is missing)."""
    if not NUMBA_AVAILABLE:
        return (lambda f: f) if not args or not callable(args[0]) else args[0]
    options = dict(cache=True, fastmath=FASTMATH, parallel=parallel, nogil=True)
    options.update(kwargs)  # e.g. fastmath=False where results must match NumPy bit for bit
    if args and callable(args[0]):
        return numba.njit(**options)(args[0])
    return numba.njit(*args, **options)


# numba recognises its own prange object inside a kernel, so this must be that object, not a wrapper.
prange = numba.prange if NUMBA_AVAILABLE else range
