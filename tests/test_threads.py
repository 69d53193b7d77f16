"""ops/threads.py: a prefill on quantised weights holds BLAS at one thread and cuts each quantised
product's rows among the cores; the result is the same product."""
import numpy as np
import pytest

import ops.threads
from ops.linear import weights_times_transposed
from ops.quant import BLOCK, PREPARED, Int8, Q4_1, Q8_0
from ops.registry import OPS, OpTable, default_variant
from ops.threads import blas_threads, product_workers, split_products
from tinyllm.schedule import parse


def table(spec):
    return OpTable(parse(spec).choice)


@pytest.fixture
def two_blas_threads():
    """BLAS at two threads for the test, whatever the machine or OPENBLAS_NUM_THREADS says."""
    with ops.threads._blas_controller().limit(limits=2):
        if blas_threads() != 2:
            pytest.skip("no BLAS library whose threads threadpoolctl can set")
        yield


def test_only_a_quantised_prefill_splits(two_blas_threads):
    q8 = table("q8_0")
    assert q8.quantized_projections and table("int8").quantized_projections
    assert not OpTable({name: default_variant(name) for name in OPS}).quantized_projections
    # float weights; a quantised head alone (a prefill reads one row of it); decode
    for ops_table, rows in ((table("fused"), 128), (table("fused,norm_head=q8_0_weights"), 128), (q8, 1), (q8, 4)):
        with split_products(ops_table, rows):
            assert product_workers() == 1 and blas_threads() == 2
    with split_products(q8, 128):
        assert product_workers() == 2 and blas_threads() == 1
    assert product_workers() == 1 and blas_threads() == 2


def test_blas_threads_come_back_after_an_error(two_blas_threads, monkeypatch):
    monkeypatch.setattr(ops.threads, "blas_threads", lambda: 3)  # as on a machine with 3 cores
    with pytest.raises(RuntimeError):
        with split_products(table("int8"), 64):
            assert product_workers() == 3
            assert all(lib.num_threads == 1 for lib in ops.threads._blas_controller().lib_controllers)
            raise RuntimeError("in the middle of a prefill")
    assert product_workers() == 1
    assert all(lib.num_threads == 2 for lib in ops.threads._blas_controller().lib_controllers)


@pytest.mark.parametrize("fmt", [Int8, Q8_0, Q4_1])
@pytest.mark.parametrize("rows", [7, 150, 333])
@pytest.mark.parametrize("workers", [2, 3])
def test_a_split_product_is_the_whole_product(fmt, rows, workers, monkeypatch):
    """Every row is computed once, by one part: the parts start on multiples of 16 rows (inside q8_0's
    64-row tiles too); 7 rows make one part, 333 make `workers` parts and a ragged last one. The
    tiles are made small (32 rows' worth in all), so that a part takes several."""
    import ops.quant.prefill

    name = {Int8: "int8", Q8_0: "q8_0", Q4_1: "q4_1"}[fmt]
    rng = np.random.default_rng(rows)
    weight = PREPARED[name][1].of(fmt.quantize(rng.standard_normal((rows, 3 * BLOCK)).astype(np.float32)))
    x = rng.standard_normal((20, 3 * BLOCK)).astype(np.float32)
    whole = weights_times_transposed(weight, x)
    monkeypatch.setattr(ops.threads, "blas_threads", lambda: workers)
    monkeypatch.setattr(ops.quant.prefill, "TILE_BYTES", 32 * 3 * BLOCK * 4)
    calls = []
    dequantize_rows = type(weight).dequantize_rows
    monkeypatch.setattr(type(weight), "dequantize_rows",
                        lambda self, first, n, buf: calls.append((first, n)) or dequantize_rows(self, first, n, buf))
    with split_products(table(name), len(x)):
        assert product_workers() == workers
        split = weights_times_transposed(weight, x)
    # each row dequantised exactly once (q8_0's tiles of 64 rows are cut where the parts are)
    assert sorted(row for first, n in calls for row in range(first, first + n)) == list(range(rows))
    assert len(calls) > 1 or rows == 7  # 7 rows: a single part, a single tile
    # the same rows times the same x: BLAS may block the sums differently for another row count
    np.testing.assert_allclose(split, whole, rtol=1e-5, atol=1e-5 * np.abs(whole).max())
