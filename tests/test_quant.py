"""ops/quant/formats.py: the llama.cpp formats bit for bit against the `gguf` package (an independent
implementation of llama.cpp's reference quantiser), and the int8 format's defining properties."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as GGML
from gguf import quants
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ops.quant import BLOCK, Int8, Q4_0, Q4_1, Q8_0, q8_blocks, round_activations_q8, round_half_away

GGML_TYPE = {Q8_0: GGML.Q8_0, Q4_0: GGML.Q4_0, Q4_1: GGML.Q4_1}


def ggml_bytes(fmt) -> np.ndarray:
    """Our quantised tensor in ggml's block layout: per block the float16 scale(s), then the values."""
    parts = [fmt.d[..., None].view(np.uint8)]
    if isinstance(fmt, Q4_1):
        parts.append(fmt.m[..., None].view(np.uint8))
    parts.append(fmt.qs.view(np.uint8))
    blocks = np.concatenate(parts, axis=-1)  # (N, K/32, bytes per block)
    return blocks.reshape(blocks.shape[0], -1)


@st.composite
def weights(draw):
    """(N, K) float32 weights with the cases a quantiser gets wrong: all-zero blocks, the largest
    value at a block's first or last position, two values of equal magnitude and opposite sign
    (q4_0 keeps the first), exact halves (rounding), huge and tiny magnitudes."""
    n, n_blocks = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    seed, scale = draw(st.integers(0, 2**32 - 1)), draw(st.sampled_from([1.0, 1e-6, 1e-2, 30.0, 1e4]))
    w = (np.random.default_rng(seed).standard_normal((n, n_blocks * BLOCK)) * scale).astype(np.float32)
    b = w.reshape(n, n_blocks, BLOCK)
    for r in range(n):
        for k in range(n_blocks):
            case = draw(st.sampled_from(["plain", "zero", "max first", "max last", "tie", "halves"]))
            peak = np.float32(np.abs(b[r, k]).max() * 3 + scale)
            if case == "zero":
                b[r, k] = 0
            elif case == "max first":
                b[r, k, 0] = draw(st.sampled_from([peak, -peak]))
            elif case == "max last":
                b[r, k, -1] = draw(st.sampled_from([peak, -peak]))
            elif case == "tie":
                b[r, k, 3], b[r, k, 20] = peak, -peak
            elif case == "halves":  # x / d lands on .5 exactly for d = 1 (q8_0: max 127)
                b[r, k] = np.float32(0.5) * np.arange(BLOCK) - 8
                b[r, k, 0] = 127
    return w


@pytest.mark.parametrize("fmt", [Q8_0, Q4_0, Q4_1], ids=lambda f: f.__name__)
@settings(max_examples=150)
@given(w=weights())
def test_bit_exact_with_gguf(fmt, w):
    with np.errstate(over="ignore"):  # |x| past float16's 65504 makes an infinite scale, in both alike
        ours = fmt.quantize(w)
        theirs = quants.quantize(w, GGML_TYPE[fmt])
    np.testing.assert_array_equal(ggml_bytes(ours), theirs)
    # dequantised: the same float32 bits (array_equal on the bits also tells -0.0 from 0.0)
    np.testing.assert_array_equal(ours.dequantize().view(np.uint32),
                                  quants.dequantize(theirs, GGML_TYPE[fmt]).astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("fmt", [Q8_0, Q4_0, Q4_1], ids=lambda f: f.__name__)
def test_formats_need_whole_blocks(fmt):
    with pytest.raises(ValueError, match="multiple of 32"):
        fmt.quantize(np.zeros((2, 48), np.float32))


@settings(max_examples=100)
@given(w=weights())
def test_q4_1_values_quantise_back_to_themselves(w):
    """What a q4_1 file holds, dequantised (as the default model's weights are) and quantised again,
    comes back value for value: the property the q4_1 schedule relies on."""
    with np.errstate(over="ignore", invalid="ignore"):
        once = Q4_1.quantize(w).dequantize()
    assume(np.isfinite(once).all())  # a float16 scale or minimum holds |x| < 65504 only
    np.testing.assert_array_equal(Q4_1.quantize(once).dequantize(), once)


@settings(max_examples=150)
@given(w=weights())
def test_int8_per_row(w):
    f = Int8.quantize(w)
    assert f.q.dtype == np.int8 and f.scale.shape == (w.shape[0],)
    np.testing.assert_array_equal(f.scale, np.abs(w).max(axis=1) / np.float32(127))
    assert np.abs(f.q.astype(np.int32)).max() <= 127
    # the largest value of each non-zero row is exactly ±127 steps
    rows = f.scale > 0
    top = np.abs(w).argmax(axis=1)
    np.testing.assert_array_equal(np.abs(f.q[np.arange(len(w)), top])[rows], 127)
    # every value within half a step (plus float32 rounding of the step itself)
    err = np.abs(f.dequantize() - w)
    assert np.all(err <= f.scale[:, None] * np.float32(0.5 + 1e-5))


def test_round_half_away_is_c_roundf():
    v = np.array([0.5, 1.5, 2.5, -0.5, -2.5, 0.49999997, -0.49999997, 126.5, 3.0, -0.0], np.float32)
    np.testing.assert_array_equal(round_half_away(v), [1, 2, 3, -1, -3, 0, 0, 127, 3, 0])


@pytest.mark.real_model
def test_the_default_models_weights_come_back_from_their_file_formats(real_model_dir):
    """The default model's GGUF stores its projections as Q4_1 and its embedding as Q8_0 (its norms
    as float32): quantising each float32 matrix to its file's format again gives back exactly the same
    values. This is what lets the q4_1 schedule hold the model without any loss."""
    from tinyllm.loading import load_weights

    weights = load_weights(real_model_dir)
    matrices = {name: w for name, w in weights.items() if w.ndim == 2}
    assert len(matrices) == 1 + 7 * 30  # the embedding (tied to the LM head) and 7 projections a layer
    for name, w in matrices.items():
        fmt = Q8_0 if name == "model.embed_tokens.weight" else Q4_1
        again = fmt.quantize(w).dequantize()
        assert np.array_equal(again, w), f"{name} as {fmt.__name__}: {np.count_nonzero(again != w)} values differ"
    # and the test can tell: the embedding is not made of q4_1 values
    embed = weights["model.embed_tokens.weight"][:256]
    assert not np.array_equal(Q4_1.quantize(embed).dequantize(), embed)


@pytest.mark.parametrize("fmt", [Int8, Q8_0, Q4_0, Q4_1])
def test_large_matrices_quantise_in_chunks_like_row_by_row(fmt):
    w = np.random.default_rng(3).standard_normal((2500, 64)).astype(np.float32)  # crosses two chunk edges
    whole = fmt.quantize(w)
    for r in (0, 1023, 1024, 2047, 2048, 2499):
        row = fmt.quantize(w[r:r + 1])
        for field in whole.__dataclass_fields__:
            np.testing.assert_array_equal(getattr(whole, field)[r], getattr(row, field)[0])


def integer_case(fmt, rng, N=150, K=512):  # N: q8_0's two tiles of 64 rows and part of a third
    """Weights whose format values are integers with unit scales (each block's extremes pin d to 1 and,
    for Q4_1, the minimum to 0) and integer activations: every exact sum is an integer below 2^24."""
    if fmt is Q8_0:
        w = rng.integers(-127, 128, (N, K)).astype(np.float32)
        w.reshape(N, -1, BLOCK)[..., 0] = 127  # block max 127: d = 1
    else:
        w = rng.integers(0, 16, (N, K)).astype(np.float32)
        w.reshape(N, -1, BLOCK)[..., 0], w.reshape(N, -1, BLOCK)[..., 1] = 0, 15  # min 0, max 15: d = 1, m = 0
    x = rng.integers(-127 if fmt is Q8_0 else 0, 128, (1, K)).astype(np.float32)
    x.reshape(1, -1, BLOCK)[..., 0] = 127  # q8_0 rounds activations with d = max|x| / 127 = 1: unchanged
    return w, x


@pytest.mark.parametrize("fmt_name", ["q8_0", "q8_0_weights", "q4_1"])
def test_block_kernels_sum_integers_exactly(fmt_name):
    """Where the arithmetic is integer the kernels are bit-exact: with unit scales each output is a sum
    of integer products (q8_0: int8 · int8, the sum llama.cpp makes in int32), which must come out
    as exactly the integer NumPy computes in int64, whatever order the vectorised kernel adds in."""
    from ops.quant import PREPARED

    fmt, prepared = PREPARED[fmt_name]
    w, x = integer_case(fmt, np.random.default_rng(5))
    stored = fmt.quantize(w)
    assert np.all(stored.d == 1) and (fmt is not Q4_1 or np.all(stored.m == 0))
    weight = prepared.of(stored)
    out = np.empty((1, w.shape[0]), np.float32)
    weight.matvec(x, out)
    exact = x.astype(np.int64) @ w.astype(np.int64).T
    assert np.abs(exact).max() > 2**16  # sums large enough that float32 rounding would show, were there any
    np.testing.assert_array_equal(out, exact.astype(np.float32))


@pytest.mark.parametrize("fmt", [Q8_0, Q4_0, Q4_1])
@pytest.mark.parametrize("rows", [1, 64, 150])
def test_row_tiles_hold_the_stored_format(fmt, rows, monkeypatch):
    """The block formats' kernels read the weights repacked, 64 rows side by side: the repacking gives
    back the stored codes, scales and minimums exactly, and prefill, which dequantises tile by tile,
    dequantises every row exactly (BLAS tiles of 96 rows here: the second starts in the middle of
    the layout's second 64-row tile)."""
    import ops.quant.prefill
    from ops.linear import weights_times_transposed
    from ops.quant import PREPARED

    rng = np.random.default_rng(rows)
    stored = fmt.quantize(rng.standard_normal((rows, 2 * BLOCK)).astype(np.float32))
    weight = PREPARED[{Q8_0: "q8_0", Q4_0: "q4_0", Q4_1: "q4_1"}[fmt]][1].of(stored)
    assert weight.shape == stored.shape and type(weight.fmt) is fmt
    for field in vars(stored):
        a, b = getattr(weight.fmt, field), getattr(stored, field)
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8), err_msg=field)
    monkeypatch.setattr(ops.quant.prefill, "TILE_BYTES", 100 * 2 * BLOCK * 4)  # 100 rows: tiles of 96
    x = np.eye(2 * BLOCK, dtype=np.float32)  # W @ I: each dequantised weight itself
    if fmt is Q8_0:
        x *= 127  # rounded per block as q8_0 rounds activations: 127 · (1/127 steps), exactly 127
    expected = stored.dequantize() * (127 if fmt is Q8_0 else 1)
    np.testing.assert_array_equal(weights_times_transposed(weight, x), expected)


@pytest.mark.real_model
def test_int8_linear_keeps_the_references_top1_on_the_real_model(real_model, real_model_dir):
    """The `int8` preset: weight-only int8 projections (the head as Q8_0 weights, the embedding
    float32). On 512 tokens of English prose the prefill (tiles widened into BLAS) picks the
    reference's top-1 token at 95% of positions or more, and so do 16 decode steps (the int8
    matrix-vector kernels) at 90% (measured: 97.1% and 16/16; with a per-row int8 head 95.9%)."""
    import tinyllm
    from tinyllm.bench import bench_prompt

    int8 = tinyllm.load(real_model_dir, ops="int8")
    ids = bench_prompt(real_model.tokenizer.encode, 528)
    ref, ours = real_model.logits(ids[:512]), int8.logits(ids[:512])
    prefill_top1 = np.mean(ref.argmax(-1) == ours.argmax(-1))
    real_model.prefill(ids[:512])
    int8.prefill(ids[:512])
    steps = [(real_model.step(t), int8.step(t)) for t in ids[512:]]
    decode_top1 = np.mean([a.argmax() == b.argmax() for a, b in steps])
    assert prefill_top1 >= 0.95 and decode_top1 >= 0.9, (prefill_top1, decode_top1)
    assert not np.array_equal(ref, ours)  # it does run on other weights


def awkward_activations(rng) -> np.ndarray:
    """Rows of blocks a rounding gets wrong: exact ties (d = 1, levels k + 0.5), zeros and -0.0, the
    largest finite float32, and blocks so small that their scale max / 127 is subnormal, where 1 / d
    overflows to inf."""
    x = rng.standard_normal((8, 4 * BLOCK)).astype(np.float32)
    x[0, :BLOCK] = np.float32(0.5) * np.arange(BLOCK) - 8
    x[0, 0] = 127  # d = 1: the others are exact halves
    x[0, BLOCK:2 * BLOCK] = -x[0, :BLOCK]
    x[1, :BLOCK], x[1, BLOCK:2 * BLOCK], x[1, 2 * BLOCK] = 0, -0.0, -0.0
    x[2, :BLOCK] *= np.float32(3.4e38) / np.abs(x[2, :BLOCK]).max()
    for row, peak in zip(range(3, 8), [1e-36, 3e-37, 1e-38, 1e-40, 1e-44]):
        x[row] *= np.float32(peak) / np.abs(x[row]).max()
    return x


def test_q8_0_kernels_round_activations_as_q8_blocks_bit_for_bit():
    """The kernels' rounding (ops/quant/q8_0.py) is the definition's (q8_blocks), scale and level alike:
    the quantised reference that `check` compares them with rounds by the definition."""
    from ops.quant.q8_0 import quantized_activations

    x = awkward_activations(np.random.default_rng(0))
    d, q = q8_blocks(x)
    xq, xd = quantized_activations(x)
    np.testing.assert_array_equal(xd.view(np.uint32), d.view(np.uint32))
    np.testing.assert_array_equal(xq, q.astype(np.float32))


def test_tiny_activations_give_tiny_q8_0_outputs_not_nan():
    """A block whose scale is subnormal (max < ~4e-37: 1 / d overflows) rounds to zeros, as llama.cpp's
    float16 scale makes of it, in decode and prefill alike; it must not become inf levels and NaN."""
    from ops.quant import PREPARED
    from ops.quant.projections import linear_quantized
    from ops.quant.reference import linear_dequantized

    fmt, prepared = PREPARED["q8_0"]
    rng = np.random.default_rng(1)
    w = prepared.of(fmt.quantize(rng.standard_normal((16, 2 * BLOCK)).astype(np.float32)))
    x = (rng.standard_normal((6, 2 * BLOCK)) * 1e-38).astype(np.float32)
    for rows in (1, 6):  # the decode kernel, BLAS on dequantised tiles
        out = linear_quantized(x[:rows], w)
        assert np.isfinite(out).all() and np.abs(out).max() < 1e-30, rows
        np.testing.assert_array_equal(out, linear_dequantized(x[:rows], w))


def test_nan_and_inf_activations_propagate_through_q8_0():
    from ops.quant import PREPARED
    from ops.quant.projections import linear_quantized

    fmt, prepared = PREPARED["q8_0"]
    rng = np.random.default_rng(2)
    w = prepared.of(fmt.quantize(rng.standard_normal((8, 2 * BLOCK)).astype(np.float32)))
    for bad in (np.nan, np.inf, -np.inf):
        for rows in (1, 6):
            x = rng.standard_normal((rows, 2 * BLOCK)).astype(np.float32)
            x[0, 3] = bad
            with np.errstate(invalid="ignore"):  # inf · 0
                out = linear_quantized(x, w)
            assert not np.isfinite(out[0]).any() and np.isfinite(out[1:]).all(), (bad, rows)
