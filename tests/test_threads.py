"""ops/threads.py: a prefill on quantised weights holds BLAS at one thread and cuts each quantised
product's rows among the cores; the result is the same product."""
import numpy as np
import pytest

import ops.threads
from ops.linear import weights_times_transposed
from ops.quant import BLOCK, Int8, Q4_1, Q8_0
from ops.quantized import PREPARED
from ops.registry import OPS, OpTable, default_variant
from ops.threads import blas_threads, product_workers, split_products
from tinyllm.schedule import parse


def table(spec):
    return OpTable(parse(spec).choice)


def test_only_a_quantised_prefill_splits():
    q8 = table("q8_0")
    assert q8.quantized_projections and not table("fused").quantized_projections
    assert not OpTable({name: default_variant(name) for name in OPS}).quantized_projections
    before = blas_threads()
    for ops_table, rows in ((table("fused"), 128), (q8, 1), (q8, 4)):  # float weights; decode
        with split_products(ops_table, rows):
            assert product_workers() == 1 and blas_threads() == before
    with split_products(q8, 128):
        assert product_workers() == before and blas_threads() == 1
    assert product_workers() == 1 and blas_threads() == before


def test_blas_threads_come_back_after_an_error(monkeypatch):
    def threads_now():
        return [lib.num_threads for lib in ops.threads._blas_controller().lib_controllers]

    before = threads_now()
    monkeypatch.setattr(ops.threads, "blas_threads", lambda: 3)  # as on a machine with 3 cores
    with pytest.raises(RuntimeError):
        with split_products(table("int8"), 64):
            assert product_workers() == 3 and all(n == 1 for n in threads_now())
            raise RuntimeError("in the middle of a prefill")
    assert product_workers() == 1 and threads_now() == before


@pytest.mark.parametrize("fmt", [Int8, Q8_0, Q4_1])
@pytest.mark.parametrize("rows", [7, 150, 333])
@pytest.mark.parametrize("workers", [2, 3])
def test_a_split_product_is_the_whole_product(fmt, rows, workers, monkeypatch):
    """Every row is computed once, by one part: q8_0's parts start on its 64-row tiles, the others'
    on multiples of 16; 7 rows make one part, 333 make `workers` parts and a ragged last one."""
    name = {Int8: "int8", Q8_0: "q8_0", Q4_1: "q4_1"}[fmt]
    rng = np.random.default_rng(rows)
    weight = PREPARED[name][1].of(fmt.quantize(rng.standard_normal((rows, 3 * BLOCK)).astype(np.float32)))
    x = rng.standard_normal((20, 3 * BLOCK)).astype(np.float32)
    whole = weights_times_transposed(weight, x)
    monkeypatch.setattr(ops.threads, "blas_threads", lambda: workers)
    with split_products(table(name), len(x)):
        assert product_workers() == workers
        split = weights_times_transposed(weight, x)
    # the same rows times the same x: BLAS may block the sums differently for another row count
    np.testing.assert_allclose(split, whole, rtol=1e-5, atol=1e-5 * np.abs(whole).max())
    assert np.isfinite(split).all()
