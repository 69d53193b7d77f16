"""`tinyllm quantize`: a model directory whose projections are stored in a quantised format, so that
loading it runs its schedule without quantising anything.

It is a Hugging Face-layout directory like any other (config.json unchanged, the tokenizer files, one
model.safetensors), in which each quantised matrix NAME (an attention or MLP projection, or the LM
head) is stored as the fields of its ops/quant.py format, one tensor per field, named NAME.FIELD:

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
gets them dequantised (tinyllm/schedule.py).

A tied LM head is the embedding. When the schedule reads the head quantised, a quantised copy of the
embedding is stored as lm_head.weight; schedules that read the head in another format ignore it and
start from the float32 embedding, exactly as on the source model.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ops.gptq import gptq_quantize
from ops.quant import ACTIVATIONS_ROUNDED, BLOCK, FORMATS, as_format

from . import calibration, smoothing
from .errors import ModelError, TinyLLMError

RECORD_KEY = "tinyllm.quantization"  # the safetensors metadata key of the record
RECORD_VERSION = 1
# How `quantize` chooses each matrix's integer codes (the format's scales are the same either way):
# "gptq" (ops/gptq.py) keeps each projection's outputs close on a calibration text; "nearest" rounds
# each weight on its own, the format's own quantise (as llama.cpp does).
ROUNDINGS = ("gptq", "nearest")


def _per_block(n, k):
    return (n, k // BLOCK)


# format -> field -> (safetensors dtype, its shape in a matrix of N x K floats): what the ops/quant.py
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
    """The ops/quant.py format `value` is in, or None (a float array, or anything else)."""
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


# ------------------------------------------------------------------------------ the command


def projection_formats(schedule) -> dict[str, str | None]:
    """op -> the format its projections are stored in for `schedule` (None: float32), for each op that
    takes projections. An unfused composite reads them through `linear`, so in linear's format."""
    from ops.registry import COMPOSED, OPS, get_variant

    linear = get_variant("linear", schedule.choice["linear"])
    out = {}
    for op_name in ("qkv_rope", "linear", "swiglu_mlp", "norm_head"):
        v = get_variant(op_name, schedule.choice[op_name])
        fmt = linear.weight_format if v.name == COMPOSED else v.weight_format
        if fmt not in ("fp32", "any") and fmt not in LAYOUT:
            raise TinyLLMError(f"--ops {schedule.spec}: {v.label} reads {fmt!r} weights, which tinyllm cannot store; "
                               f"it stores {', '.join(LAYOUT)}")
        out[op_name] = fmt if fmt in LAYOUT else None
    assert set(out) == {name for name, o in OPS.items() if o.projections} | {"linear"}
    return out


def quantize(source, spec, out, *, force: bool = False, progress: bool = True, rounding: str = "gptq",
             smooth: float | None = None, calibration_text=None, calibration_tokens: int | None = None) -> str:
    """Write the model directory `source` (None: the default model, pulled if missing) to the new
    directory `out`, each projection stored in the format schedule `spec` reads it in; returns a summary.

    `rounding` (see ROUNDINGS): "gptq" records each projection's inputs while the float32 model reads
    `calibration_tokens` tokens of `calibration_text` (a tinyllm.eval.Text; default: the standard
    library's docstrings, tinyllm/calibration.py), then rounds with GPTQ; "nearest" needs no text.
    `smooth`: the strength α of smoothing (tinyllm/smoothing.py; 0: off; None: its default with GPTQ,
    off with "nearest", which then stores what the schedule computes when it quantises at load),
    applied to the inputs of projections in a format that rounds its activations (q8_0).

    Everything is checked and quantised before anything is written; the files are written into a
    temporary directory beside `out` that is renamed to `out` only when complete. An existing non-empty
    `out` is an error unless `force`, and even then it is removed only after the new one is in place."""
    from .config import Config
    from .eval import first_tokens
    from .loading import load_weights, read_quantization
    from .model import Transformer
    from .schedule import PRESETS, parse
    from .tokenizer import Tokenizer

    schedule = parse(spec)
    formats = projection_formats(schedule)
    if not any(formats.values()):
        quantised = [p for p in PRESETS if any(projection_formats(parse(p)).values())]
        raise TinyLLMError(f"--ops {schedule.spec} reads every projection as float32: there is nothing to quantise "
                           f"(quantised presets: {', '.join(quantised)})")
    if rounding not in ROUNDINGS:
        raise TinyLLMError(f"--rounding {rounding!r}: choose one of {', '.join(ROUNDINGS)}")
    alpha = (smoothing.DEFAULT_ALPHA if rounding == "gptq" else 0.0) if smooth is None else smooth
    if not 0 <= alpha <= 1:
        raise TinyLLMError(f"--smooth {alpha}: the migration strength is between 0 (off) and 1")
    sites = [site for site, (op, _, _) in smoothing.SITES.items() if formats[op] in ACTIVATIONS_ROUNDED] if alpha else []
    if smooth and not sites:
        warnings.warn(f"--smooth applies to formats that round their activations ({', '.join(ACTIVATIONS_ROUNDED)}); "
                      f"--ops {schedule.spec} rounds none, so nothing is smoothed")
    n_calibration = calibration.DEFAULT_TOKENS if calibration_tokens is None else calibration_tokens
    calibrating = rounding == "gptq" or bool(sites)
    if calibrating and n_calibration < 2:
        raise TinyLLMError(f"--calibration-tokens {n_calibration}: calibration needs at least 2 tokens")
    if not calibrating and (calibration_text is not None or calibration_tokens is not None):
        warnings.warn("--rounding nearest without smoothing reads no calibration text; the calibration options "
                      "do nothing")
    source = _source_dir(source, progress)
    out = _check_out(out, source, force)
    source_record = read_quantization(source)
    if source_record is not None and calibrating:
        # GPTQ and smoothing start from float32: a quantised source's matrices are kept as they are
        # stored (the same format) or dequantised and rounded to nearest (another format).
        warnings.warn(f"{source} was written by `tinyllm quantize`: its matrices are kept as stored or rounded to "
                      "nearest, not calibrated (give the float32 model it came from to calibrate)")
        calibrating, sites, rounding = False, [], "nearest"

    cfg = Config.from_dir(source)
    weights = load_weights(source)
    try:
        transformer = Transformer(cfg, weights)  # every tensor checked against config.json before any work
    except ModelError as e:
        raise ModelError(f"{source}: {e}") from None
    tokenizer = Tokenizer(source)  # and the tokenizer loads, so the copy will too

    found, about = None, {"rounding": rounding}
    if calibrating:
        text = calibration_text or calibration.docstring_text()
        ids = first_tokens(tokenizer.encode, text.text, n_calibration)
        if len(ids) < 2:
            raise TinyLLMError(f"the calibration text {text.source} has {len(ids)} token(s); calibration needs at "
                               "least 2")
        if len(ids) < n_calibration:
            warnings.warn(f"the calibration text {text.source} has only {len(ids)} tokens; calibrating on those")
        found = calibration.calibrate(transformer, ids, progress)
        about["calibration"] = {"source": text.source, "sha256": text.sha256, "tokens": found.tokens}
    del transformer
    if sites:
        smoothing.smooth(weights, cfg.n_layers, found, sites, alpha)
        about["smoothing"] = {"alpha": alpha, "sites": sites}

    tensors, record = _stored_tensors(cfg, weights, formats, schedule.spec, source, progress,
                                      found.hessian if rounding == "gptq" else None)
    if source_record is not None and all(source_record.tensors.get(n) == f for n, f in record.items()):
        about = {"rounding": source_record.rounding, "calibration": source_record.calibration,
                 "smoothing": source_record.smoothing}  # every matrix kept as stored: its codes are the source's
    bad = next((n for n, t in tensors.items() if t.dtype.kind == "f" and not np.all(np.isfinite(t))), None)
    if bad is not None:  # e.g. a float16 scale overflowed: such a model would compute NaN
        raise TinyLLMError(f"quantising gave non-finite values in {bad}; nothing was written (try --smooth 0 or "
                           "--rounding nearest)")
    _write(out, source, tensors, Record(schedule.spec, record, **about).metadata())
    return _summary(source, out, schedule.spec, record, about)


def _write(out: Path, source: Path, tensors: dict, metadata: dict) -> None:
    """model.safetensors and the source's other files, into a temporary directory beside `out` that takes
    its name only when complete (a failure or Ctrl-C removes it, leaving any old `out` as it was)."""
    from safetensors import SafetensorError  # imported here so that importing tinyllm stays cheap
    from safetensors.numpy import save_file

    from .files import move_dir_into_place, usual_permissions

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        usual_permissions(tmp, 0o777)
        try:
            save_file(tensors, str(tmp / "model.safetensors"), metadata=metadata)
        except SafetensorError as e:  # its own error for a failed write (a full disk), not an OSError
            raise TinyLLMError(f"cannot write {out}: {e}") from None
        usual_permissions(tmp / "model.safetensors", 0o666)
        for name in _model_files(source):
            shutil.copyfile(source / name, tmp / name)
        move_dir_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _stored_tensors(cfg, weights: dict, formats: dict, spec: str, source: Path, progress: bool,
                    hessians: dict | None = None) -> tuple[dict, dict]:
    """What model.safetensors holds: every tensor the model uses (checkpoint name -> array), each
    projection the schedule reads quantised as its format's fields; and the record's name -> format.
    With `hessians` (name -> H, tinyllm/calibration.py) the float32 matrices are rounded by GPTQ."""
    from tqdm import tqdm

    from .model import checkpoint_shapes, projection_op

    tensors, record, requantised = {}, {}, []
    tied_head = cfg.tie_word_embeddings or "lm_head.weight" not in weights
    embed = weights["model.embed_tokens.weight"]
    for name in tqdm(checkpoint_shapes(cfg), desc="quantising", unit="tensor", disable=None if progress else True):
        op_name = projection_op(name)
        fmt = formats[op_name] if op_name else None
        value, unquantized = weights.get(name), None
        if name == "lm_head.weight" and tied_head:
            if fmt is None:
                continue  # the head is the embedding, stored once
            value, unquantized = (value if format_name(value) else embed), embed  # a quantised copy of it
        if value is None:
            continue  # an optional tensor (a bias) the source does not have
        if format_name(value) not in (None, fmt) and unquantized is None:
            requantised.append(name)
        stored = for_format(value, fmt, unquantized)
        if fmt is None:
            tensors[name] = np.ascontiguousarray(stored, dtype=np.float32)
            continue
        try:
            if hessians is not None and format_name(stored) is None:
                stored = gptq_quantize(stored, hessians[name], FORMATS[fmt])
            else:
                stored = as_format(stored, FORMATS[fmt])
        except ValueError:  # a 32-block format on rows of another length
            raise TinyLLMError(f"--ops {spec}: {fmt} stores rows in blocks of {BLOCK}, and {name} has rows of "
                               f"{stored.shape[1]} values") from None
        tensors.update(parts(name, stored))
        record[name] = fmt
    if requantised:
        warnings.warn(f"{source} holds {len(requantised)} matrices quantised in another format (e.g. "
                      f"{requantised[0]}); they were dequantised and quantised again, which adds the roundings of "
                      "both formats")
    return tensors, record


def _source_dir(source, progress: bool) -> Path:
    if source is None:
        from .pull import default_model_dir, is_model_dir, pull

        source = default_model_dir()
        return source if is_model_dir(source) else pull(progress=progress)
    source = Path(source)
    if not source.is_dir():
        raise ModelError(f"model directory {source} " + ("is a file; give the directory that holds config.json"
                                                         if source.exists() else "does not exist"))
    return source


def _check_out(out, source: Path, force: bool) -> Path:
    """--out as a new directory to write: refused when it is a file, a non-empty directory (unless
    `force`), the source model, the working directory or a directory holding either, or under a
    directory that does not exist."""
    if not str(out):
        raise TinyLLMError("--out is empty: give a directory to write the quantised model to")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TinyLLMError(f"--out {out} is a file; give a directory to write the quantised model to")
    if out.resolve() == source.resolve() or out.resolve() in source.resolve().parents:
        raise TinyLLMError(f"--out {out} is the source model or holds it; write the quantised model to a new directory")
    if out.resolve() == Path.cwd() or out.resolve() in Path.cwd().parents:  # `.` cannot be renamed away
        raise TinyLLMError(f"--out {out} is the current directory or holds it; write the quantised model to a new "
                           "directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise TinyLLMError(f"--out {out} exists and is not empty; choose a new directory, or --force to replace it "
                           "(the old one is removed only once the new one is complete)")
    if not out.parent.is_dir():
        raise TinyLLMError(f"cannot write --out {out}: {out.parent} does not exist")
    return out


# The files a model directory holds besides its weights: copied as they are.
_MODEL_FILES = ("config.json", "generation_config.json", "special_tokens_map.json", "added_tokens.json",
                "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")


def _model_files(source: Path) -> list[str]:
    """config.json and the tokenizer's and generation's files that `source` has (tokenizer* included)."""
    names = [n for n in _MODEL_FILES if (source / n).is_file()]
    return names + sorted(p.name for p in source.glob("tokenizer*") if p.is_file())


def _summary(source: Path, out: Path, spec: str, record: dict, about: dict) -> str:
    counts = Counter(record.values())
    formats = ", ".join(f"{n} {fmt}" for fmt, n in counts.most_common())
    size, source_size = _dir_bytes(out), _dir_bytes(source)
    how = "GPTQ rounding" if about["rounding"] == "gptq" else "rounded to nearest"
    if about.get("smoothing"):
        how += f", smoothed (alpha {about['smoothing']['alpha']})"
    return (f"wrote {out}: {len(record)} matrices quantised for --ops {spec} ({formats}; {how}), every other tensor "
            f"float32; {size / 2**20:.1f} MiB on disk, the source {source} {source_size / 2**20:.1f} MiB "
            f"({size / source_size:.2f}x)")


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
