"""Reading weights from safetensors files, memory-mapped.

A safetensors file is an 8-byte little-endian header length, a JSON header that gives each tensor's
dtype, shape and byte range, then the raw bytes. We map the file into memory: a float32 tensor is
used in place (a read-only array over the mapped bytes, no copy at all), and a float16/bfloat16 one
is widened to a new float32 array one tensor at a time. So loading holds about one copy of the
weights (reading the whole file into a bytes object first would double the peak). NumPy has no
bfloat16: a bf16 value is the top half of a float32, so we widen it with a 16-bit shift.
"""
from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import numpy as np

from .errors import ModelError

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


def _read_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ModelError(f"{path} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError, MemoryError, OverflowError):
            raise ModelError(f"{path} is not a safetensors file (bad header)") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path} is not a safetensors file (bad header)")
    header.pop("__metadata__", None)
    return header, 8 + n


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of one safetensors file as float32 NumPy arrays (HF names -> arrays)."""
    header, data_start = _read_header(path)
    with open(path, "rb") as f:
        # The map outlives the file object: every array made from it keeps a reference to it.
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    out = {}
    for name, info in header.items():
        try:
            dtype_name, (begin, end), shape = info["dtype"], info["data_offsets"], [int(n) for n in info["shape"]]
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"{path}: the header entry of tensor {name} is malformed") from None
        dtype = _DTYPES.get(dtype_name)
        if dtype is None:
            raise ModelError(f"{path}: tensor {name} has dtype {dtype_name}; tinyllm reads F32, F16, BF16, F64")
        count = (end - begin) // np.dtype(dtype).itemsize
        if not 0 <= begin <= end or data_start + end > len(mapped) or count != int(np.prod(shape)):
            raise ModelError(f"{path}: tensor {name} does not fit its byte range (truncated file?)")
        raw = np.frombuffer(mapped, dtype=dtype, count=count, offset=data_start + begin).reshape(shape)
        if dtype_name == "BF16":
            out[name] = (raw.astype(np.uint32) << 16).view(np.float32)
        else:
            out[name] = raw.astype(np.float32, copy=False)  # F32: the mapped bytes themselves
    return out


def load_weights(model_dir: Path) -> dict[str, np.ndarray]:
    """Every tensor of a model directory: `model.safetensors`, or the shards an index file lists."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        from .config import read_json

        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise ModelError(f"{index} has no valid weight_map")
        files = sorted(set(weight_map.values()))
    elif (model_dir / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise ModelError(f"{model_dir} has no model.safetensors (nor model.safetensors.index.json)")
    weights = {}
    for name in files:
        if "/" in name or "\\" in name or name.startswith(".") or not (model_dir / name).exists():
            raise ModelError(f"{model_dir}: shard {name} listed in the index is missing (or not a plain file name)")
        weights.update(read_safetensors(model_dir / name))
    return weights


def release_pages(array: np.ndarray) -> bool:
    """Drop a memory-mapped weight's pages from this process's resident memory.

    Used when a schedule's prepare step has made its own copy (e.g. Q, K and V concatenated): the
    raw tensor is no longer read, so its pages need not count twice. They stay in the OS page cache
    and the array stays valid: reading it again (swapping back to `reference`) faults them back in.
    Whole pages inside the array only; returns False for an array that is not memory-mapped."""
    base = array
    while base is not None and not isinstance(base, mmap.mmap):
        base = base.obj if isinstance(base, memoryview) else getattr(base, "base", None)
    if base is None or not hasattr(base, "madvise"):
        return False
    start = array.ctypes.data - np.frombuffer(base, dtype=np.uint8, count=1).ctypes.data
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE  # round up: never drop a neighbour's page
    last = (start + array.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        base.madvise(mmap.MADV_DONTNEED, first, last - first)
    return True
