"""Reading weights from safetensors files, memory-mapped.

A safetensors file is an 8-byte little-endian header length, a JSON header that gives each tensor's
dtype, shape and byte range, then the raw bytes. We map the file into memory: a float32 tensor is
used in place (a read-only array over the mapped bytes, no copy at all), and a float16/bfloat16 one
is widened to a new float32 array one tensor at a time. So loading holds about one copy of the
weights (reading the whole file into a bytes object first would double the peak). NumPy has no
bfloat16: a bf16 value is the top half of a float32, so we widen it with a 16-bit shift.

A model saved by `tinyllm quantize` stores its projections in quantised formats: the file's metadata
lists them, and their parts (int8/uint8 values, float16 or float32 scales) are used in place, as they
are stored, and handed on as ops.quant format objects (see tinyllm/stored.py). Where the mapped
weights then live in memory is tinyllm/placement.py's.
"""
from __future__ import annotations

import json
import math
import mmap
import struct
import warnings
from pathlib import Path

import numpy as np

from .config import read_json
from .errors import ModelError, ModelWarning, NumericsError
from .placement import WeightFile
from .stored import RECORD_KEY, Record, assemble, format_name, record_from_metadata

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64, "I8": np.int8, "U8": np.uint8}
_INTEGER = {"I8", "U8"}  # only the parts of a quantised matrix are integers


def _read_header(path: Path, file_size: int) -> tuple[dict, int, object]:
    """The JSON header (tensor name -> entry), the offset where the tensor data starts, and the
    header's `__metadata__` (None when it has none)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ModelError(f"{path} is not a safetensors file: {file_size} bytes is too short for a header")
        (n,) = struct.unpack("<Q", raw)
        # Checked before reading: a corrupt length field must never make us allocate n bytes.
        if n > file_size - 8:
            raise ModelError(f"{path}: the header length ({n} bytes) runs past the end of the file "
                             f"({file_size} bytes; truncated or not a safetensors file?)")
        text = f.read(n)
    try:
        header = json.loads(text)
    except (ValueError, RecursionError):  # bad JSON, bad UTF-8, or nesting too deep to parse
        raise ModelError(f"{path}: the header is not valid JSON (not a safetensors file?)") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path}: the header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None)
    return header, 8 + n, metadata


def _is_count(x) -> bool:
    return type(x) is int and x >= 0  # not bool, not float: JSON 2.0 or true is no size


def _tensor_entries(path: Path, header: dict, data_size: int, parts: dict[str, str]) -> list[tuple]:
    """Each tensor's (name, dtype name, shape, begin, end), checked against the data section:
    a known dtype (the one its quantised matrix needs, for the `parts` named in the file's quantisation
    record; never an integer one for any other tensor), a byte range inside the file whose length is
    dtype size x elements, no overlaps.
    Names and dtypes come from the file, so messages quote them (repr): a newline stays on one line."""
    entries = []
    for name, info in header.items():
        try:
            dtype_name, offsets, shape = info["dtype"], info["data_offsets"], info["shape"]
            begin, end = offsets
            if not (isinstance(dtype_name, str) and isinstance(shape, list) and all(map(_is_count, shape))
                    and _is_count(begin) and _is_count(end)):
                raise TypeError
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"{path}: the header entry of tensor {name!r} is malformed "
                             f"(needs dtype, shape and data_offsets [begin, end])") from None
        if dtype_name not in _DTYPES:
            raise ModelError(f"{path}: tensor {name!r} has dtype {dtype_name!r}; tinyllm reads {', '.join(_DTYPES)}")
        if name in parts and dtype_name != parts[name]:
            raise ModelError(f"{path}: tensor {name!r} has dtype {dtype_name}; as a part of a quantised matrix it must "
                             f"be {parts[name]}")
        if name not in parts and dtype_name in _INTEGER:
            raise ModelError(f"{path}: tensor {name!r} has dtype {dtype_name}, which only the parts of a quantised "
                             f"matrix (listed in the file's {RECORD_KEY} metadata) may have")
        itemsize = np.dtype(_DTYPES[dtype_name]).itemsize
        if math.prod(n for n in shape if n) * itemsize > np.iinfo(np.intp).max:  # even with no elements
            raise ModelError(f"{path}: tensor {name!r} has shape {shape}, larger than any array can be")
        needed = math.prod(shape) * itemsize
        if end - begin != needed:
            raise ModelError(f"{path}: tensor {name!r} has data_offsets [{begin}, {end}] ({end - begin} bytes) but "
                             f"dtype {dtype_name} x shape {shape} needs {needed} bytes")
        if end > data_size:
            raise ModelError(f"{path}: the data of tensor {name!r} (bytes {begin}..{end}) runs past the end of the file "
                             f"({data_size} bytes of data; truncated?)")
        entries.append((name, dtype_name, shape, begin, end))
    by_start = sorted((e for e in entries if e[4] > e[3]), key=lambda e: e[3])  # empty tensors overlap nothing
    for a, b in zip(by_start, by_start[1:]):
        if b[3] < a[4]:
            raise ModelError(f"{path}: tensors {a[0]!r} and {b[0]!r} overlap (bytes {b[3]}..{a[4]})")
    return entries


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of one safetensors file as float32 NumPy arrays (HF names -> arrays), except the
    matrices the file's quantisation record lists: ops.quant format objects over the stored parts.
    Anything malformed is a ModelError naming the file and the tensor."""
    try:
        file_size = Path(path).stat().st_size
        header, data_start, metadata = _read_header(path, file_size)
        record = record_from_metadata(metadata, path)
        parts = record.parts() if record else {}
        entries = _tensor_entries(path, header, file_size - data_start, parts)
        if not entries:
            return assemble({}, record, path) if record else {}
        with open(path, "rb") as f:
            # The map outlives the file object: every array made from it keeps a reference to it.
            mapped = WeightFile(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise ModelError(f"cannot read {path}: {e.strerror or e}") from None
    out = {}
    for name, dtype_name, shape, begin, end in entries:
        dtype = np.dtype(_DTYPES[dtype_name])
        raw = np.frombuffer(mapped, dtype=dtype, count=(end - begin) // dtype.itemsize,
                            offset=data_start + begin).reshape(shape)
        if name in parts:
            out[name] = raw  # a quantised matrix's part, as stored (its dtype was checked)
        elif dtype_name == "BF16":
            out[name] = (raw.astype(np.uint32) << 16).view(np.float32)
        else:
            out[name] = raw.astype(np.float32, copy=False)  # F32: the mapped bytes themselves
    return assemble(out, record, path) if record else out


def read_quantization(model_dir: Path) -> Record | None:
    """The quantisation record of a model directory written by `tinyllm quantize` (None for any other
    directory), from the safetensors headers alone: it costs no weight loading."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelError(f"model directory {model_dir} " + ("is a file; give the directory that holds config.json"
                                                            if model_dir.exists() else "does not exist"))
    records = []
    for name in weight_files(model_dir):
        path = model_dir / name
        try:
            _, _, metadata = _read_header(path, path.stat().st_size)
        except OSError as e:
            raise ModelError(f"cannot read {path}: {e.strerror or e}") from None
        record = record_from_metadata(metadata, path)
        if record is not None:
            records.append(record)
    if not records:
        return None
    if len({r.spec for r in records}) > 1:
        raise ModelError(f"{model_dir}: its weight files were quantised for different schedules "
                         f"({', '.join(sorted({r.spec for r in records}))})")
    first = records[0]  # every shard is written by one `quantize` run, with one rounding
    return Record(first.spec, {name: fmt for r in records for name, fmt in r.tensors.items()}, first.rounding,
                  first.calibration, first.smoothing)


def _finite_weight(value) -> bool:
    """all_finite over a float array, or over each part of a quantised matrix."""
    if format_name(value) is None:
        return all_finite(value)
    return all(all_finite(a) for a in vars(value).values())


def all_finite(array: np.ndarray) -> bool:
    """No NaN and no Inf in `array`. max and min propagate NaN and reach +-Inf if present, and unlike
    np.isfinite(array).all() they allocate nothing: this runs over every weight at load."""
    return array.size == 0 or bool(np.isfinite(array.max()) and np.isfinite(array.min()))


def weight_files(model_dir: Path) -> list[str]:
    """The safetensors files of a model directory: `model.safetensors`, or the shards an index lists."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise ModelError(f"{index} has no valid weight_map")
        files = sorted(set(weight_map.values()))
        for name in files:
            if "/" in name or "\\" in name or name.startswith(".") or not (model_dir / name).is_file():
                raise ModelError(f"{index}: shard {name} listed in the index is missing (or not a plain file name)")
    elif (model_dir / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise ModelError(f"{model_dir} has no model.safetensors (nor model.safetensors.index.json)")
    return files


def load_weights(model_dir: Path, check_numerics: bool = False) -> dict[str, np.ndarray]:
    """Every tensor of a model directory: `model.safetensors`, or the shards an index file lists.

    Tensors holding NaN or Inf are a warning (a ModelWarning), or with `check_numerics` an error."""
    model_dir = Path(model_dir)
    weights = {}
    for name in weight_files(model_dir):
        tensors = read_safetensors(model_dir / name)
        bad = [t for t, value in tensors.items() if not _finite_weight(value)]
        if bad:
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            message = f"{model_dir / name}: tensor {bad[0]!r}{more} holds NaN or Inf values"
            if check_numerics:
                raise NumericsError(message + "; --check-numerics refuses to load it")
            warnings.warn(message, ModelWarning, stacklevel=2)
        weights.update(tensors)
    return weights
