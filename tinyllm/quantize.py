"""`tinyllm quantize`: a model directory whose projections are stored in a quantised format, so that
loading it runs its schedule without quantising anything.

What the directory holds (one tensor per field of each quantised matrix, and a record of the schedule
and formats in the file's metadata) is tinyllm/stored.py, which the load path reads; this module only
writes it: it checks the source, calibrates when asked (GPTQ rounding, smoothing), rounds each projection
to the format its schedule reads, and writes the files.
"""
from __future__ import annotations

import shutil
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

from ops.quant.gptq import gptq_quantize
from ops.quant import ACTIVATIONS_ROUNDED, BLOCK, FORMATS, as_format
from ops.registry import COMPOSED, OPS, get_variant

from . import calibration, smoothing
from .checkpoint import checkpoint_shapes, projection_op
from .config import Config
from .errors import ModelError, TinyLLMError
from .files import move_dir_into_place, usual_permissions
from .loading import load_weights, read_quantization
from .model import Transformer
from .pull import default_model_dir, is_model_dir, pull
from .schedule import PRESETS, parse
from .stored import LAYOUT, ROUNDINGS, Record, for_format, format_name, parts
from .texts import DEFAULT_TOKENS, docstring_text, first_tokens
from .tokenizer import Tokenizer


def projection_formats(schedule) -> dict[str, str | None]:
    """op -> the format its projections are stored in for `schedule` (None: float32), for each op that
    takes projections. An unfused composite reads them through `linear`, so in linear's format."""
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
    `calibration_tokens` tokens of `calibration_text` (a tinyllm.texts.Text; default: the standard
    library's docstrings, tinyllm/texts.py), then rounds with GPTQ; "nearest" needs no text.
    `smooth`: the strength α of smoothing (tinyllm/smoothing.py; 0: off; None: its default with GPTQ,
    off with "nearest", which then stores what the schedule computes when it quantises at load),
    applied to the inputs of projections in a format that rounds its activations (q8_0).

    Everything is checked and quantised before anything is written; the files are written into a
    temporary directory beside `out` that is renamed to `out` only when complete. An existing non-empty
    `out` is an error unless `force`, and even then it is removed only after the new one is in place."""
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
    n_calibration = DEFAULT_TOKENS if calibration_tokens is None else calibration_tokens
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
        text = calibration_text or docstring_text()
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


def quantized_spec(directory, model) -> str:
    """The schedule the `tinyllm quantize` directory `directory` was written for, after checking that
    it was quantised from the model directory `model` (quantize copies config.json and the tokenizer
    as they are: _model_files)."""
    path, model = Path(directory), Path(model)
    if not (path / "config.json").is_file():
        raise TinyLLMError(f"--quantized {directory}: not a model directory (no config.json)")
    try:
        record = read_quantization(path)
    except ModelError as e:
        raise TinyLLMError(f"--quantized {directory}: {e}") from None
    if record is None:
        raise TinyLLMError(f"--quantized {directory}: not written by `tinyllm quantize` (its model.safetensors "
                           "has no quantisation record); compare schedules of one model with --ops instead")
    for name in ("config.json", "tokenizer.json"):
        ours, theirs = path / name, model / name
        if ours.is_file() and theirs.is_file() and ours.read_bytes() != theirs.read_bytes():
            raise TinyLLMError(f"--quantized {directory}: its {name} differs from {model}'s, so it was not "
                               "quantised from that model; give the model it came from as --model")
    return record.spec
