"""Turn a Llama-architecture GGUF file into a Hugging Face-style model directory.

GGUF is llama.cpp's single-file format: hyper-parameters, tokenizer and
(usually quantized) weights live together in one file. tinyllm reads the
Hugging Face layout instead (config.json + model.safetensors + tokenizer.json),
so this module unpacks a GGUF into exactly that:

* every weight is dequantized to float32 and renamed to its Hugging Face name;
* the row permutation llama.cpp applies to the query/key projections is undone;
* the GGUF vocabulary and merges become a `tokenizers` byte-level BPE tokenizer.

Only what the Llama architecture needs is supported; anything else is refused
with a `ModelError` rather than converted into a model that quietly misbehaves.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .errors import ModelError
from .files import move_dir_into_place as _move_into_place, usual_permissions as _usual_permissions

# GGUF tensor names (without the ".weight" suffix) -> Hugging Face names.
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.weight")

# Values of tokenizer.ggml.token_type (llama.cpp's llama_token_type).
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4


def convert_gguf(gguf_path, out_dir, *, overwrite: bool = False, progress: bool = True) -> Path:
    """Convert the GGUF file `gguf_path` into a model directory at `out_dir`.

    Everything is first written to a hidden temporary directory next to
    `out_dir` and renamed into place only when complete, so an interrupted or
    failed conversion never leaves a half-written model under the final name.
    An existing `out_dir` is an error unless `overwrite` is true.
    Returns `out_dir` as a Path.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ModelError(f"{out_dir} already exists")
    reader, fields = open_gguf(Path(gguf_path))
    arch = fields.get("general.architecture")
    if arch != "llama":
        raise ModelError(f"{gguf_path}: architecture {arch!r} is not supported (only llama)")

    try:
        config = _llama_config(fields)
    except (TypeError, ValueError, ZeroDivisionError, OverflowError) as exc:  # a field of the wrong type or value
        raise ModelError(f"{gguf_path}: bad llama.* metadata ({exc!r})") from None
    # Built before any weight is touched, so a vocabulary we cannot express
    # fails fast instead of after dequantizing every weight.
    try:
        tokenizer = _build_tokenizer(fields)
    except ModelError:
        raise
    except Exception as exc:  # bad field types, or `tokenizers` refusing the vocabulary (a bare Exception)
        raise ModelError(f"{gguf_path}: cannot build a tokenizer from its vocabulary ({exc!r})") \
            from None

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _usual_permissions(tmp, 0o777)  # mkdtemp makes it private; the model should not be
        tensors = _convert_tensors(reader, config, progress)
        del reader  # drop the memory map of the GGUF file as early as possible
        config["tie_word_embeddings"] = "lm_head.weight" not in tensors

        # Imported here so that merely importing tinyllm stays cheap.
        from safetensors.numpy import save_file

        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _usual_permissions(tmp / "model.safetensors", 0o666)  # safetensors writes it 0600
        tokenizer.save(str(tmp / "tokenizer.json"))
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "tokenizer_config.json", _tokenizer_config(fields, config))
        _write_json(tmp / "generation_config.json", {
            key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")
        })
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo the row order llama.cpp gives a query or key projection.

    Hugging Face Llama rotates the two halves of each head's vector
    (dimension i pairs with i + head_dim/2); llama.cpp's RoPE rotates adjacent
    pairs (2i with 2i+1). Its converter therefore interleaves the two halves of
    every head's rows. Here we put each head's rows back as [evens..., odds...].
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's permutation (Hugging Face order -> GGUF order); the inverse of `unpermute_qk`."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------- reading


def open_gguf(path: Path):
    """A GGUFReader over `path` and its metadata as Python values; any problem is a one-line ModelError.

    The file's layout is checked first (`_check_layout`): GGUFReader trusts every count, length and
    offset in the file, so a corrupt one would make it index past the end or loop for ever."""
    import gguf  # imported lazily: only conversion needs it

    if not path.is_file():
        raise ModelError(f"{path}: " + ("not a file (a directory?)" if path.exists() else "no such file"))
    _check_layout(path)
    try:
        reader = gguf.GGUFReader(path)
        fields = {key: field.contents() for key, field in reader.fields.items()}
    except Exception as exc:  # gguf raises ValueError, KeyError, UnicodeDecodeError, ... on bad input
        raise ModelError(f"{path} is not a readable GGUF file ({exc!r})") from None
    return reader, fields


def tensor_as_float32(t) -> np.ndarray:
    """A GGUF tensor (a GGUFReader tensor) dequantized to float32, in numpy's dimension order."""
    import gguf

    # GGUF lists dimensions fastest-varying first, the reverse of numpy's order.
    shape = tuple(int(n) for n in reversed(t.shape))
    try:
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        # np.array copies: F32 tensors come back as views into the memory-mapped file.
        return np.array(w, dtype=np.float32).reshape(shape)
    except NotImplementedError:
        raise ModelError(f"tensor {t.name!r} uses {t.tensor_type.name}, which we cannot dequantize") from None
    except ValueError as e:  # data that does not fit its type and shape (a corrupt file)
        raise ModelError(f"tensor {t.name!r} ({t.tensor_type.name}, shape {shape}) cannot be read: {e}") from None


# ---------------------------------------------------------------- checking the layout

# GGUF metadata value types (gguf.GGUFValueType): fixed-size scalars by size in bytes, then string and array.
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4
_MAX_DIMS = 4  # GGML_MAX_DIMS


class _Cursor:
    """Walks a GGUF file's little-endian fields; refuses any size that points past the end of the file,
    before acting on it, so no count or length field can make us allocate or loop more than the file holds."""

    def __init__(self, data, path: Path):
        self.data, self.path, self.pos = data, path, 0

    def skip(self, n: int, what: str) -> int:
        """Step over `n` bytes of `what`; returns where they start."""
        if n > len(self.data) - self.pos:
            raise ModelError(f"{self.path}: {what} (byte {self.pos}, {n} bytes) runs past the end of the file "
                             f"({len(self.data)} bytes; truncated?)")
        self.pos += n
        return self.pos - n

    def uint(self, size: int, what: str) -> int:
        start = self.skip(size, what)
        return int.from_bytes(self.data[start:start + size], "little")

    def string(self, what: str) -> bytes:
        n = self.uint(8, f"the length of {what}")
        start = self.skip(n, what)
        return self.data[start:start + n]

    def expect(self, count: int, least_size: int, what: str) -> None:
        """`count` items of at least `least_size` bytes each must fit in the rest of the file."""
        if count * least_size > len(self.data) - self.pos:
            raise ModelError(f"{self.path}: {count} {what} cannot fit in the rest of the file "
                             "(truncated, or a corrupt count?)")

    def value(self, vtype: int, what: str) -> None:
        """Step over one metadata value of GGUF type `vtype`."""
        if vtype in _SCALAR_SIZES:
            self.skip(_SCALAR_SIZES[vtype], what)
        elif vtype == _STRING:
            self.skip(self.uint(8, f"the length of {what}"), what)
        elif vtype == _ARRAY:
            item_type, count = self.uint(4, f"the item type of {what}"), self.uint(8, f"the length of {what}")
            if item_type in _SCALAR_SIZES:
                self.skip(count * _SCALAR_SIZES[item_type], what)
            elif item_type == _STRING:
                self.expect(count, 8, f"strings in {what}")
                for _ in range(count):
                    self.skip(self.uint(8, f"the length of a string in {what}"), what)
            else:  # llama.cpp writes no arrays of arrays, and refusing them bounds the recursion
                raise ModelError(f"{self.path}: {what} is an array of type {item_type}, which is not supported")
        else:
            raise ModelError(f"{self.path}: {what} has unknown value type {vtype}")


def _check_layout(path: Path) -> None:
    """Check a GGUF file's header, metadata and tensor table against its size, without trusting any
    count, length or offset in it: magic, version, every string and array inside the file, tensor
    types we know, and every tensor's data inside the file. Raises ModelError naming what is wrong."""
    import gguf

    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size < 24:  # magic, version, two counts
            raise ModelError(f"{path} is not a GGUF file (too short for a header)")
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    with data:
        c = _Cursor(data, path)
        if data[:4] != b"GGUF":
            raise ModelError(f"{path} is not a GGUF file (bad magic {bytes(data[:4])!r})")
        c.skip(4, "the magic")
        version = c.uint(4, "the version")
        if version not in (2, 3):
            raise ModelError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_fields = c.uint(8, "the tensor count"), c.uint(8, "the metadata count")
        c.expect(n_fields, 12, "metadata entries")  # each has at least a key length and a type
        alignment = 32  # GGUF's default
        for _ in range(n_fields):
            key = c.string("a metadata key").decode("utf-8", "replace")
            vtype = c.uint(4, f"the type of metadata {key!r}")
            if key == "general.alignment" and vtype == _UINT32:
                alignment = c.uint(4, "general.alignment")
            else:
                c.value(vtype, f"metadata {key!r}")
        c.expect(n_tensors, 24, "tensor infos")  # name length, dimension count, type, offset
        tensors = []
        for _ in range(n_tensors):
            name = c.string("a tensor name").decode("utf-8", "replace")
            n_dims = c.uint(4, f"the dimension count of tensor {name!r}")
            if n_dims > _MAX_DIMS:
                raise ModelError(f"{path}: tensor {name!r} has {n_dims} dimensions (at most {_MAX_DIMS})")
            dims = [c.uint(8, f"the dimensions of tensor {name!r}") for _ in range(n_dims)]
            tensors.append((name, dims, c.uint(4, f"the type of tensor {name!r}"),
                            c.uint(8, f"the data offset of tensor {name!r}")))
        if alignment == 0 or alignment & (alignment - 1):
            raise ModelError(f"{path}: general.alignment {alignment} is not a power of two")
        data_start = -(-c.pos // alignment) * alignment
        for name, dims, type_id, offset in tensors:
            try:
                block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(type_id)]
            except (ValueError, KeyError):
                raise ModelError(f"{path}: tensor {name!r} has unknown tensor type {type_id}") from None
            if dims and dims[0] % block:
                raise ModelError(f"{path}: tensor {name!r}'s rows ({dims[0]}) are not whole blocks of {block}")
            end = data_start + offset + math.prod(dims) // block * block_bytes
            if end > len(data):
                raise ModelError(f"{path}: the data of tensor {name!r} (to byte {end}) runs past the end of "
                                 f"the file ({len(data)} bytes; truncated?)")


def _llama_config(fields: dict) -> dict:
    """Translate llama.* metadata into the fields of a Hugging Face LlamaConfig."""

    def need(key):
        if key not in fields:
            raise ModelError(f"GGUF file lacks the required field {key}")
        return fields[key]

    scaling = fields.get("llama.rope.scaling.type", "none")
    if scaling != "none":
        raise ModelError(f"RoPE scaling {scaling!r} is not supported")

    hidden = int(need("llama.embedding_length"))
    heads = int(need("llama.attention.head_count"))
    head_dim = int(fields.get("llama.attention.key_length", hidden // heads))
    rope_dims = int(fields.get("llama.rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise ModelError(f"partial RoPE ({rope_dims} of {head_dim} dimensions) is not supported")
    kv_heads = int(fields.get("llama.attention.head_count_kv", heads))
    if heads < 1 or kv_heads < 1 or head_dim < 2 or head_dim % 2:
        raise ModelError(f"bad attention shape: {heads} heads, {kv_heads} KV heads, head size {head_dim} "
                         "(RoPE needs an even head size)")
    tokens = fields.get("tokenizer.ggml.tokens", [])
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(need("llama.feed_forward_length")),
        "num_hidden_layers": int(need("llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": int(need("llama.context_length")),
        # GGUF stores these as float32; float() of it keeps that exact value.
        "rms_norm_eps": float(need("llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(fields.get("llama.rope.freq_base", 10000.0)),
        "vocab_size": int(fields.get("llama.vocab_size", len(tokens))),
        "tie_word_embeddings": True,  # decided once we know whether output.weight exists
        "bos_token_id": _optional_int(fields, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _optional_int(fields, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _optional_int(fields, "tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    }


def _optional_int(fields: dict, key: str):
    return int(fields[key]) if key in fields else None


# ---------------------------------------------------------------- weights


def _hf_name(gguf_name: str) -> str:
    """Map a GGUF tensor name to its Hugging Face name, or raise ModelError."""
    if gguf_name == "rope_freqs.weight":
        raise ModelError("per-dimension RoPE frequencies (rope_freqs.weight) are not supported")
    if gguf_name.endswith(".weight") and gguf_name[: -len(".weight")] in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name[: -len(".weight")]] + ".weight"
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}.weight"
    raise ModelError(f"unexpected tensor {gguf_name!r} in a llama GGUF file")


def _expected_shape(hf_name: str, config: dict) -> tuple[int, ...]:
    """The shape (numpy order) the config gives tensor `hf_name`, checked before the q/k rows are
    un-permuted (which assumes whole heads)."""
    D, F, d = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q, kv, vocab = config["num_attention_heads"] * d, config["num_key_value_heads"] * d, config["vocab_size"]
    if hf_name in ("model.embed_tokens.weight", "lm_head.weight"):
        return (vocab, D)
    if hf_name == "model.norm.weight":
        return (D,)
    layer, part = hf_name.removeprefix("model.layers.").split(".", 1)
    if int(layer) >= config["num_hidden_layers"]:
        raise ModelError(f"tensor {hf_name} is in layer {layer}, but llama.block_count is {config['num_hidden_layers']}")
    return {"input_layernorm.weight": (D,), "post_attention_layernorm.weight": (D,),
            "self_attn.q_proj.weight": (q, D), "self_attn.k_proj.weight": (kv, D), "self_attn.v_proj.weight": (kv, D),
            "self_attn.o_proj.weight": (D, q), "mlp.gate_proj.weight": (F, D), "mlp.up_proj.weight": (F, D),
            "mlp.down_proj.weight": (D, F)}[part]


def _convert_tensors(reader, config: dict, progress: bool) -> dict:
    """Dequantize, rename and un-permute every tensor; returns {hf_name: float32 array}."""
    tensors = {}
    # disable=None: tqdm draws only when stderr is a terminal (no bar characters in logs)
    for t in tqdm(reader.tensors, desc="converting", unit="tensor", disable=None if progress else True):
        name = _hf_name(t.name)
        w = tensor_as_float32(t)
        if w.shape != _expected_shape(name, config):
            raise ModelError(f"tensor {t.name!r} has shape {w.shape}; the metadata says {_expected_shape(name, config)}")
        if name.endswith("self_attn.q_proj.weight"):
            w = unpermute_qk(w, config["num_attention_heads"])
        elif name.endswith("self_attn.k_proj.weight"):
            w = unpermute_qk(w, config["num_key_value_heads"])
        tensors[name] = np.ascontiguousarray(w)

    expected = {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{part}.weight" for i in range(config["num_hidden_layers"]) for part in _LAYER_NAMES.values()
    }
    missing = sorted(expected - tensors.keys())
    if missing:
        raise ModelError(f"GGUF file is missing {len(missing)} tensor(s), the first being {missing[0]}")
    return tensors


# ---------------------------------------------------------------- tokenizer


def _build_tokenizer(fields: dict):
    """Rebuild the GGUF's byte-level BPE vocabulary as a `tokenizers.Tokenizer`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = fields.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelError(f"tokenizer type {kind!r} is not supported (only gpt2-style byte-level BPE)")
    tokens = fields["tokenizer.ggml.tokens"]
    types = fields.get("tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ")) for m in fields.get("tokenizer.ggml.merges", [])]
    if any(len(m) != 2 for m in merges):
        raise ModelError("malformed BPE merge in the GGUF vocabulary")

    vocab = {token: i for i, token in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(fields.get("tokenizer.ggml.pre", "default"), pre_tokenizers)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    bos_id = fields.get("tokenizer.ggml.bos_token_id")
    if fields.get("tokenizer.ggml.add_bos_token", False) and bos_id is not None and 0 <= int(bos_id) < len(tokens):
        # the model wants BOS in front of a raw prompt: the tokenizer adds it when asked for special tokens
        bos = tokens[int(bos_id)]
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                          special_tokens=[(bos, int(bos_id))])])

    # Control tokens (<|im_start|>, ...) and user-defined tokens are matched as
    # whole strings before BPE runs, the way llama.cpp matches them; they keep
    # their ids because they are already in the vocabulary.
    added = [
        AddedToken(token, special=(kind_ == _TOKEN_CONTROL), normalized=False)
        for token, kind_ in zip(tokens, types)
        if kind_ in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED)
    ]
    tok.add_tokens(added)
    return tok


def _pre_tokenizer(pre: str, pre_tokenizers):
    """How text is cut into words before BPE, following llama.cpp's `tokenizer.ggml.pre`.

    "smollm" (like StarCoder's vocabulary) first isolates every digit, so
    numbers are spelled digit by digit, then applies GPT-2's byte-level regex.
    """
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre in ("default", "gpt2"):
        return byte_level
    if pre in ("smollm", "starcoder"):
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    raise ModelError(f"tokenizer pre-tokenization {pre!r} is not supported")


def _tokenizer_config(fields: dict, config: dict) -> dict:
    """The tokenizer_config.json that tells users of the tokenizer its special tokens."""
    tokens = fields["tokenizer.ggml.tokens"]

    def token(key):
        i = _optional_int(fields, key)
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    return {
        "add_bos_token": bool(fields.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(fields.get("tokenizer.ggml.add_eos_token", False)),
        "bos_token": token("tokenizer.ggml.bos_token_id"),
        "eos_token": token("tokenizer.ggml.eos_token_id"),
        "pad_token": token("tokenizer.ggml.padding_token_id"),
        "unk_token": token("tokenizer.ggml.unknown_token_id"),
        "chat_template": fields.get("tokenizer.chat_template"),
        "model_max_length": config["max_position_embeddings"],
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
    }


# ---------------------------------------------------------------- output


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
