"""How a model directory written by `tinyllm quantize` stores its quantised matrices, and how they are
read back: the layout the load path needs (tinyllm/loading.py, tinyllm/checkpoint.py, tinyllm/schedule.py),
apart from the command that writes it (tinyllm/quantize.py).

It is a Hugging Face-layout directory like any other (config.json unchanged, the tokenizer files, one
model.safetensors), in which each quantised matrix NAME (an attention or MLP projection, or the LM
head) is stored as the fields of its ops.quant format, one tensor per field, named NAME.FIELD:

    int8   NAME.q   (N, K) I8              NAME.scale (N,) F32
    q8_0   NAME.qs  (N, K/32, 32) I8       NAME.d (N, K/32) F16
    q4_0   NAME.qs  (N, K/32, 16) U8       NAME.d (N, K/32) F16
    q4_1   NAME.qs  (N, K/32, 16) U8       NAME.d, NAME.m (N, K/32) F16

(N x K is the float32 matrix's shape). Every other tensor (embedding, norms, biases) is float32. The
file's safetensors metadata holds, under `tinyllm.quantization`, the JSON record
{"version": 1, "ops": SPEC, "tensors": {NAME: FORMAT, ...}}: the schedule it was made for, which a
load runs unless told otherwise, and each quantised matrix's format. The reader (tinyllm/loading.py)
hands the Transformer these matrices as format objects; the variants of that format take them as they
are (their prepare steps quantise float32 only), and a schedule that reads another format, or float32,
gets them dequantised (for_format, called by tinyllm/schedule.py).

A tied LM head is the embedding. When the schedule reads the head quantised, a quantised copy of the
embedding is stored as lm_head.weight; schedules that read the head in another format ignore it and
start from the float32 embedding, exactly as on the source model.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from ops.quant import BLOCK, FORMATS

from .errors import ModelError

RECORD_KEY = "tinyllm.quantization"  # the safetensors metadata key of the record
RECORD_VERSION = 1
# How `quantize` chooses each matrix's integer codes (the format's scales are the same either way):
# "gptq" (ops.quant.gptq) keeps each projection's outputs close on a calibration text; "nearest" rounds
# each weight on its own, the format's own quantise (as llama.cpp does).
ROUNDINGS = ("gptq", "nearest")


def _per_block(n, k):
    return (n, k // BLOCK)


# format -> field -> (safetensors dtype, its shape in a matrix of N x K floats): what the ops.quant
# formats hold, as the reader checks it (tests/test_quantize.py checks this table against the formats)
LAYOUT = {
    "int8": {"q": ("I8", lambda n, k: (n, k)), "scale": ("F32", lambda n, k: (n,))},
    "q8_0": {"d": ("F16", _per_block), "qs": ("I8", lambda n, k: (n, k // BLOCK, BLOCK))},
    "q4_0": {"d": ("F16", _per_block), "qs": ("U8", lambda n, k: (n, k // BLOCK, BLOCK // 2))},
    "q4_1": {"d": ("F16", _per_block), "m": ("F16", _per_block),
             "qs": ("U8", lambda n, k: (n, k // BLOCK, BLOCK // 2))},
}
assert set(LAYOUT) == set(FORMATS)


# ------------------------------------------------------------------------------ format objects


def format_name(value) -> str | None:
    """The ops.quant format `value` is in, or None (a float array, or anything else)."""
    return next((name for name, cls in FORMATS.items() if type(value) is cls), None)


def for_format(value, fmt: str | None, unquantized=None):
    """A loaded weight as a reader of `fmt` weights takes it (`fmt` None or "fp32": float32).

    A float array, or a format object already in `fmt`, is passed as it is. A format object of another
    format becomes the float32 matrix it stands for: `unquantized` when given (a tied head's float32
    embedding), else its values dequantised; the reader's prepare step then treats it as any float32
    weight (and quantises it to its own format)."""
    name = format_name(value)
    if name is None or name == fmt:
        return value
    return unquantized if unquantized is not None else value.dequantize()


def parts(name: str, value) -> dict[str, np.ndarray]:
    """A format object's fields as the tensors NAME.FIELD that store it."""
    return {f"{name}.{field}": np.ascontiguousarray(getattr(value, field)) for field in LAYOUT[format_name(value)]}


def matrix_kind(name: str) -> str:
    """`model.layers.7.mlp.up_proj.weight` -> `up_proj`: what a matrix is, whatever its layer."""
    return name.removesuffix(".weight").rsplit(".", 1)[-1]


# ------------------------------------------------------------------------------ the record


@dataclass(frozen=True)
class Record:
    """What a quantised model file says about itself: the schedule it was made for (`spec`), and the
    format of each matrix it stores quantised (`tensors`: name -> format name)."""

    spec: str
    tensors: dict
    rounding: str = "nearest"  # how the codes were chosen: "nearest" or "gptq" (see ROUNDINGS)
    calibration: dict | None = None  # {"source", "sha256", "tokens"} of the calibration text, if one was read
    smoothing: dict | None = None  # {"alpha", "sites"} when the activations were smoothed (tinyllm/smoothing.py)

    def parts(self) -> dict[str, str]:
        """Each stored part NAME.FIELD -> the safetensors dtype it must have."""
        return {f"{name}.{field}": dtype for name, fmt in self.tensors.items()
                for field, (dtype, _) in LAYOUT[fmt].items()}

    def metadata(self) -> dict[str, str]:
        """The safetensors metadata that carries it (metadata values are strings: this one is JSON)."""
        record = {"version": RECORD_VERSION, "ops": self.spec, "tensors": self.tensors, "rounding": self.rounding}
        if self.calibration is not None:
            record["calibration"] = self.calibration
        if self.smoothing is not None:
            record["smoothing"] = self.smoothing
        return {RECORD_KEY: json.dumps(record)}

    def describe(self) -> list[str]:
        """Lines for `tinyllm ops --model` and `tinyllm info`: which matrices are in which format."""
        lines = [f"stored quantised by `tinyllm quantize --ops {self.spec}` (the schedule it runs by default):"]
        by_format = {}
        for name, fmt in self.tensors.items():
            by_format.setdefault(fmt, []).append(name)
        for fmt, names in sorted(by_format.items(), key=lambda item: -len(item[1])):  # the bulk first
            kinds = ", ".join(dict.fromkeys(matrix_kind(n) for n in names))
            lines.append(f"  {fmt:<8} {kinds} ({len(names)} {'matrix' if len(names) == 1 else 'matrices'})")
        lines.append(f"  {'float32':<8} every other tensor (embedding, norms, biases)")
        c = self.calibration or {}
        calibrated = f"{c.get('tokens')} tokens of {c.get('source')} (sha256 {str(c.get('sha256'))[:12]}...)"
        lines.append(f"  codes chosen by GPTQ, calibrated on {calibrated}" if self.rounding == "gptq"
                     else "  codes rounded to nearest")
        if self.smoothing:
            lines.append(f"  smoothed (alpha {self.smoothing.get('alpha')}) at the "
                         f"{', '.join(map(str, self.smoothing.get('sites', [])))} of every layer"
                         + ("" if self.rounding == "gptq" else f", calibrated on {calibrated}"))
        return lines


def record_from_metadata(metadata, path) -> Record | None:
    """The record in a safetensors file's metadata, checked; None when the file has none."""
    if not isinstance(metadata, dict) or RECORD_KEY not in metadata:
        return None
    malformed = ModelError(f"{path}: the {RECORD_KEY} metadata is malformed (it should be the JSON "
                           '{"version": 1, "ops": SPEC, "tensors": {NAME: FORMAT, ...}})')
    try:
        r = json.loads(metadata[RECORD_KEY])
    except (TypeError, ValueError, RecursionError):
        raise malformed from None
    if not (isinstance(r, dict) and isinstance(r.get("ops"), str) and isinstance(r.get("tensors"), dict)):
        raise malformed
    if type(r.get("version")) is not int or r["version"] != RECORD_VERSION:
        raise ModelError(f"{path}: {RECORD_KEY} has version {r.get('version')!r}; this tinyllm reads version "
                         f"{RECORD_VERSION} (quantize the model again with this tinyllm)")
    for name, fmt in r["tensors"].items():
        if not (isinstance(fmt, str) and fmt in LAYOUT):
            raise ModelError(f"{path}: {RECORD_KEY} says tensor {name!r} is in format {fmt!r}; tinyllm stores "
                             f"{', '.join(LAYOUT)}")
    rounding = r.get("rounding", "nearest")  # files written before GPTQ rounding existed have no key
    if rounding not in ROUNDINGS:
        raise ModelError(f"{path}: {RECORD_KEY} says its codes were rounded by {rounding!r}; this tinyllm knows "
                         f"{', '.join(ROUNDINGS)}")
    calibration, smoothed = r.get("calibration"), r.get("smoothing")
    return Record(r["ops"], dict(r["tensors"]), rounding, calibration if isinstance(calibration, dict) else None,
                  smoothed if isinstance(smoothed, dict) else None)


def assemble(tensors: dict, record: Record, path) -> dict:
    """One file's tensors (the parts in their stored dtypes) with each quantised matrix's parts replaced
    by its format object, checked first: every part there, shapes that make one N x K matrix (the
    kernels do not check bounds, so a part too small must never reach them)."""
    out = dict(tensors)
    for name, fmt in record.tensors.items():
        missing = [f"{name}.{field}" for field in LAYOUT[fmt] if f"{name}.{field}" not in out]
        if missing:
            raise ModelError(f"{path}: the {fmt} matrix {name!r} has no tensor {missing[0]!r}")
        if name in out:
            raise ModelError(f"{path}: tensor {name!r} is stored twice, as float and as {fmt}")
        fields = {field: out.pop(f"{name}.{field}") for field in LAYOUT[fmt]}
        _check_shapes(name, fmt, fields, path)
        out[name] = FORMATS[fmt](**fields)
    return out


def _check_shapes(name: str, fmt: str, fields: dict, path) -> None:
    lead = fields["q"] if fmt == "int8" else fields["d"]  # the field that says N and K
    if lead.ndim != 2:
        raise ModelError(f"{path}: tensor '{name}.{'q' if fmt == 'int8' else 'd'}' has shape {lead.shape}; "
                         f"a {fmt} matrix's is 2-D")
    n, k = lead.shape if fmt == "int8" else (lead.shape[0], lead.shape[1] * BLOCK)
    for field, (_, shape) in LAYOUT[fmt].items():
        if fields[field].shape != shape(n, k):
            raise ModelError(f"{path}: tensor '{name}.{field}' has shape {fields[field].shape}; a {fmt} matrix "
                             f"of {n} x {k} values needs {shape(n, k)}")
