"""Fuzzing the readers of files that come from strangers: safetensors and GGUF (issue 6).

Valid small files are mutated (bytes flipped, truncated, length fields grown to huge values, header
values replaced) and random safetensors headers are generated. Every input must either load to
tensors that agree with what the file declares, or raise ModelError: no other exception, no hang,
and no allocation proportional to a length field (each read runs under a time limit and with
tracemalloc watching its peak, which sees NumPy's allocations too).
"""
from __future__ import annotations

import contextlib
import json
import signal
import struct
import tracemalloc
import warnings

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save

from tests.test_gguf_import import hf_weights, write_gguf
from tinyllm.errors import ModelError
from tinyllm.gguf_import import open_gguf, tensor_as_float32
from tinyllm.loading import read_safetensors

MEMORY_LIMIT = 32 << 20  # the files are a few KB to ~100 KB; trusting a grown length field would be GBs
TIME_LIMIT_S = 10


class ReaderHung(BaseException):
    """Raised into a reader that runs too long; a BaseException, so no `except Exception` in it can
    turn the hang into an ordinary error."""


@contextlib.contextmanager
def bounded():
    """Fail if the body runs longer than TIME_LIMIT_S or allocates more than MEMORY_LIMIT at its peak."""
    def hung(signum, frame):
        raise ReaderHung(f"the reader ran for more than {TIME_LIMIT_S} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.setitimer(signal.ITIMER_REAL, TIME_LIMIT_S)
    tracemalloc.start()
    try:
        yield
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert peak < MEMORY_LIMIT, f"the reader allocated {peak} bytes"


def outcome(read, path):
    """`read(path)` under the bounds: its result, or the ModelError it raised (anything else fails the test)."""
    with bounded(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. NaN values a flipped byte made: a warning, not an error
        try:
            return read(path)
        except ModelError as e:
            assert str(e) and "\n" not in str(e)
            return e


# ------------------------------------------------------------------------- safetensors

BASE_TENSORS = {
    "a": np.arange(6, dtype=np.float32).reshape(2, 3),
    "b": np.linspace(-1, 1, 4).astype(np.float16),
    "c": np.zeros((0, 3), np.float32),
    "d": np.array([1.5, -2.0], np.float64),
}
BASE_SAFETENSORS = save(BASE_TENSORS)
_WIDTH = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": np.uint16}


def declared_tensors(raw: bytes) -> dict[str, np.ndarray]:
    """What the file says it holds, decoded independently of tinyllm: each entry's bytes as float32."""
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    out = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        values = np.frombuffer(raw[8 + n + begin:8 + n + end], dtype=_WIDTH[info["dtype"]])
        if info["dtype"] == "BF16":
            values = (values.astype(np.uint32) << 16).view(np.float32)
        out[name] = values.astype(np.float32).reshape(info["shape"])
    return out


def check_safetensors(raw: bytes, path) -> None:
    path.write_bytes(raw)
    result = outcome(read_safetensors, path)
    if isinstance(result, ModelError):
        return
    expected = declared_tensors(raw)
    assert sorted(result) == sorted(expected)
    for name, value in result.items():
        assert value.dtype == np.float32 and value.shape == expected[name].shape
        np.testing.assert_array_equal(value, expected[name])


def header_of(raw: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def with_header(header, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


big_ints = st.one_of(st.integers(-3, 300), st.integers(2**31 - 2, 2**31 + 2), st.integers(2**63 - 2, 2**64 + 2),
                     st.integers(-2**64, 2**70))


@st.composite
def mutated_safetensors(draw) -> bytes:
    raw = bytearray(BASE_SAFETENSORS)
    kind = draw(st.sampled_from(["flip", "truncate", "header length", "header value"]))
    if kind == "flip":
        for _ in range(draw(st.integers(1, 6))):
            raw[draw(st.integers(0, len(raw) - 1))] ^= draw(st.integers(1, 255))
    elif kind == "truncate":
        del raw[draw(st.integers(0, len(raw) - 1)):]
    elif kind == "header length":
        struct.pack_into("<Q", raw, 0, draw(st.integers(0, 2**64 - 1)))
    else:  # one shape or offset replaced by another (huge, negative, fractional...) value
        header, data = header_of(bytes(raw))
        entry = header[draw(st.sampled_from(sorted(BASE_TENSORS)))]
        key = draw(st.sampled_from(["shape", "data_offsets", "dtype"]))
        if key == "dtype" or not entry[key]:
            entry[key] = draw(st.sampled_from(["F32", "F16", "BF16", "F64", "I8", "", None, 3]))
        else:
            entry[key][draw(st.integers(0, len(entry[key]) - 1))] = draw(big_ints | st.floats() | st.booleans())
        raw = bytearray(with_header(header, data))
    return bytes(raw)


json_values = st.recursive(
    st.none() | st.booleans() | big_ints | st.floats() | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8)
entries = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "F16", "BF16", "F64", "I8"]) | json_values,
    "shape": st.lists(st.integers(-1, 40) | big_ints, max_size=3) | json_values,
    "data_offsets": st.lists(st.integers(-8, 200) | big_ints, max_size=3) | json_values,
})
random_headers = st.dictionaries(st.text(max_size=6), entries | json_values, max_size=4) | json_values


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@settings(max_examples=300)
@given(raw=mutated_safetensors())
def test_mutated_safetensors(scratch, raw):
    check_safetensors(raw, scratch / "mutated.safetensors")


@settings(max_examples=300)
@given(header=random_headers, data=st.binary(max_size=256))
def test_random_safetensors_headers(scratch, header, data):
    check_safetensors(with_header(header, data), scratch / "random.safetensors")


def test_a_trusting_reader_would_fail_the_bounds(scratch):
    """The bounds can fail: reading a grown length field's worth of bytes trips the memory limit."""
    with pytest.raises(AssertionError, match="allocated"):
        with bounded():
            bytearray(1 << 30)  # what f.read(n) of a 1 GiB length field would allocate


# ------------------------------------------------------------------------- GGUF


@pytest.fixture(scope="module")
def base_gguf(scratch) -> tuple[bytes, list[int], int]:
    """A valid small GGUF's bytes, the offsets of its u64 length and count fields, and where its data starts."""
    path = write_gguf(scratch / "base.gguf", hf_weights())
    reader = gguf.GGUFReader(path)
    lengths = [8, 16]  # the tensor and metadata counts
    for key, field in reader.fields.items():
        if not key.startswith("GGUF."):
            lengths.append(field.offset)  # the key's length
            value = field.offset + 8 + len(key.encode()) + 4
            if field.types[0] == gguf.GGUFValueType.STRING:
                lengths.append(value)
            elif field.types[0] == gguf.GGUFValueType.ARRAY:
                lengths.append(value + 4)  # the item count, after the item type
    for t in reader.tensors:
        lengths.append(t.field.offset)  # the name's length
        dims = t.field.offset + 8 + len(t.name.encode()) + 4
        lengths += [dims + 8 * i for i in range(len(t.shape))] + [dims + 8 * len(t.shape) + 4]  # dims, data offset
    return path.read_bytes(), lengths, reader.data_offset


def read_gguf(path) -> dict[str, np.ndarray]:
    reader, _ = open_gguf(path)
    tensors = {}
    for t in reader.tensors:
        value = tensor_as_float32(t)
        assert value.dtype == np.float32 and value.shape == tuple(int(n) for n in reversed(t.shape))
        tensors[t.name] = value
    return tensors


@settings(max_examples=300)
@given(data=st.data())
def test_mutated_gguf(scratch, base_gguf, data):
    base, lengths, data_start = base_gguf
    raw = bytearray(base)
    kind = data.draw(st.sampled_from(["flip", "truncate", "grow a length", "overwrite header bytes"]))
    if kind == "flip":  # mostly in the header and tables, where the structure is
        for _ in range(data.draw(st.integers(1, 6))):
            raw[data.draw(st.integers(0, data_start - 1) | st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        del raw[data.draw(st.integers(0, data_start + 64) | st.integers(0, len(raw) - 1)):]
    elif kind == "grow a length":
        offset = data.draw(st.sampled_from(lengths))
        struct.pack_into("<Q", raw, offset, data.draw(st.integers(0, 2**64 - 1) | st.integers(0, 1 << 20)))
    else:
        offset = data.draw(st.integers(0, data_start - 8))
        struct.pack_into("<Q", raw, offset, data.draw(st.integers(0, 2**64 - 1)))
    path = scratch / "mutated.gguf"
    path.write_bytes(bytes(raw))
    outcome(read_gguf, path)


@pytest.mark.parametrize("value", [1 << 20, 1 << 40, 2**64 - 1])
def test_every_gguf_length_field_grown(scratch, base_gguf, value):
    """Not left to chance: each count and length field in turn set to a value far past the file."""
    base, lengths, _ = base_gguf
    path = scratch / "grown.gguf"
    for offset in lengths:
        raw = bytearray(base)
        struct.pack_into("<Q", raw, offset, value)
        path.write_bytes(bytes(raw))
        outcome(read_gguf, path)


def test_valid_files_load(scratch, base_gguf):
    """The fuzzed readers accept the unmutated files (so a fuzz run is not all refusals)."""
    check_safetensors(BASE_SAFETENSORS, scratch / "base.safetensors")
    assert not isinstance(outcome(read_safetensors, scratch / "base.safetensors"), ModelError)
    path = scratch / "valid.gguf"
    path.write_bytes(base_gguf[0])
    assert len(outcome(read_gguf, path)) == len(hf_weights())
