"""How a prefill on quantised weights shares the cores: each core dequantises its own rows and runs
its own single-threaded BLAS product on them.

A quantised weight reaches BLAS as float32 tiles dequantised just before the product
(ops/quant/prefill.py). Left to BLAS's own threads, the tile is written by one core and read by all
of them, and on a 2-core VM reading what the other core has just written is sometimes fast and
sometimes slow, switching every few seconds to minutes; with each core reading only what it wrote,
the prefill holds its speed (benchmarks/RESULTS.md, Quantised weights: "The fix: each core its own
rows").

That needs BLAS held at one thread for the whole forward pass, not only around each product:
BLAS's idle workers spin for a while after a multi-threaded call, and a core shared with a
spinning worker made the split products about twice as slow (the same section). So the forward
pass runs inside `split_products(ops, T)` (OpTable.forward_pass); inside it a quantised product
asks `product_workers()` how many parts to cut its rows into. Only schedules whose projections are
quantised split (`fused` runs BLAS as usual); inside, attention's float32 products run on one
thread (a small share of a 128-token prefill, growing with the prompt's length).

One forward pass at a time per process: the parts' tile buffers (ops/quant/prefill.py::_tile), the
pool and BLAS's thread count are the process's, as BLAS's own threads are.

threadpoolctl sets the BLAS library's thread count: it finds whichever BLAS NumPy loaded (OpenBLAS,
MKL, BLIS...) and calls that library's own setter, which NumPy does not expose.
"""
from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor, wait

from .jit import is_decode

_state = threading.local()  # .workers: how many parts a product is cut into, inside split_products
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_blas = None  # threadpoolctl's controller of the BLAS libraries, made on first use


def _blas_controller():
    global _blas
    if _blas is None:
        from threadpoolctl import ThreadpoolController

        _blas = ThreadpoolController().select(user_api="blas")
    return _blas


def blas_threads() -> int:
    """The thread count BLAS runs products with now (1 if no BLAS library is found)."""
    return max([lib.num_threads for lib in _blas_controller().lib_controllers], default=1)


@contextlib.contextmanager
def split_products(ops, rows: int):
    """Around a forward pass of `rows` tokens: if it is a prefill (more rows than decode's few) and
    the schedule `ops` has quantised projections, hold BLAS at one thread and let each quantised
    product cut its rows into as many parts as BLAS had threads, one part per core. Otherwise
    nothing changes."""
    workers = blas_threads() if not is_decode(rows) and getattr(ops, "quantized_projections", False) else 1
    if workers <= 1:
        yield
        return
    _state.workers = workers
    try:
        with _blas_controller().limit(limits=1):
            yield
    finally:
        _state.workers = 1


def product_workers() -> int:
    """How many parts a quantised product cuts its rows into now: 1 outside split_products."""
    return getattr(_state, "workers", 1)


def on_workers(task, parts: int) -> None:
    """task(0) .. task(parts - 1), part 0 on this thread and the others on pool threads, at once.
    The work inside (Numba kernels compiled nogil, NumPy's matmul) runs without Python's lock."""
    global _pool, _pool_size
    if parts == 1:
        task(0)
        return
    if _pool_size < parts - 1:
        _pool, _pool_size = ThreadPoolExecutor(parts - 1, thread_name_prefix="tinyllm-product"), parts - 1
    futures = [_pool.submit(task, i) for i in range(1, parts)]
    try:
        task(0)
    finally:
        wait(futures)  # all of them, even when one failed: none may still write its buffer afterwards
    for f in futures:
        f.result()  # re-raises a worker's exception here
