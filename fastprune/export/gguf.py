"""GGUF export of Llama models (dense, structured-pruned with uniform widths, or 2:4-sparse) with the ``gguf`` package.

The file follows llama.cpp's ``convert_hf_to_gguf.py`` for the ``llama`` architecture: its metadata keys, its tensor
names (from gguf's own name map), the rows of the query and key projections permuted into the rotary layout
llama.cpp uses (transformers' GGUF loader undoes it), tied output matrices omitted, and the tokenizer as a
byte-level BPE vocabulary with merges. transformers (``from_pretrained(dir, gguf_file=...)``) and llama.cpp-style
tools load it.

Tensor types: 1-D tensors (norms) stay F32. Matrices take the requested type; for 4- and 5-bit types the token
embeddings (and an untied output matrix) take Q8_0, as llama.cpp keeps those at higher precision, and so do the
matrices named in ``keep_q8`` (GGUF kinds such as ``attn_v``, ``ffn_down``: a mixed recipe in the spirit of
llama.cpp's ``_M`` types; the file type stays the requested one, "mostly" that type, as llama.cpp writes it); a
matrix whose rows do not split into whole quantization blocks (32 weights) is written F16, as llama.cpp's
converter does. Q4_0 and Q4_1 blocks take the scale (and minimum) of least squared error
(``fastprune.export.quantize``) unless ``search`` is off: gguf's round-to-nearest blocks.

GGUF has no 2:4 layout: a 2:4-sparse model is written with its masked dense weights. Per-layer widths are refused:
llama.cpp reads per-layer head counts and feed-forward lengths, but transformers' GGUF loader reads one value for
all layers, so the file would not load there.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fastprune.adapters import adapter_for
from fastprune.errors import ConfigError, ExportError, OutputError
from fastprune.export.quantize import SEARCHED_TYPES, quantize_searched
from fastprune.sparsity.modules import densify

logger = logging.getLogger("fastprune")

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
#: Matrix kinds of a Llama block, by their GGUF names (``blk.N.<kind>.weight``).
MATRIX_KINDS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
#: transformers' Llama-3 pre-tokenizer split (llama.cpp's "llama-bpe"); a plain byte-level split is "gpt-2".
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _qtypes():
    import gguf

    q = gguf.GGMLQuantizationType
    f = gguf.LlamaFileType
    return {
        "f32": (q.F32, f.ALL_F32),
        "f16": (q.F16, f.MOSTLY_F16),
        "bf16": (q.BF16, f.MOSTLY_BF16),
        "q8_0": (q.Q8_0, f.MOSTLY_Q8_0),
        "q5_1": (q.Q5_1, f.MOSTLY_Q5_1),
        "q5_0": (q.Q5_0, f.MOSTLY_Q5_0),
        "q4_1": (q.Q4_1, f.MOSTLY_Q4_1),
        "q4_0": (q.Q4_0, f.MOSTLY_Q4_0),
    }


def export_gguf(
    model: torch.nn.Module,
    tokenizer,
    out: str | Path,
    qtype: str = "f16",
    inputs: list[Path] = (),
    overwrite: bool = False,
    keep_q8: tuple[str, ...] = (),
    search: bool = True,
) -> Path:
    """Write ``model`` (a Llama model) and ``tokenizer`` to the GGUF file ``out``, matrices in ``qtype`` (those of
    the kinds in ``keep_q8`` in Q8_0; Q4 scales searched unless ``search`` is off); the file appears only when
    complete."""
    if qtype not in GGUF_TYPES:
        raise ConfigError(f"GGUF type must be one of {', '.join(GGUF_TYPES)}; got {qtype!r}")
    keep_q8 = tuple(keep_q8)
    unknown = [k for k in keep_q8 if k not in MATRIX_KINDS]
    if unknown:
        raise ConfigError(f"keep_q8 takes matrix kinds among {', '.join(MATRIX_KINDS)}; got {', '.join(unknown)}")
    out = Path(out)
    _check_output_file(out, inputs, overwrite)
    config = model.config
    _check_exportable(model)
    vocab = _vocabulary(tokenizer, config.vocab_size)
    model = densify(copy.deepcopy(model))  # GGUF has no 2:4 layout: the masked weights, dense
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.partial-", dir=out.parent)
    os.close(fd)
    try:
        _write(model, vocab, Path(tmp), qtype, keep_q8, search)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    logger.info("wrote %s (%s%s)", out, qtype, f", {', '.join(keep_q8)} in q8_0" if keep_q8 else "")
    return out.resolve()


def _check_output_file(out: Path, inputs: list[Path], overwrite: bool) -> None:
    resolved = out.resolve()
    for src in inputs:
        src = Path(src).resolve()
        if src == resolved or src in resolved.parents:
            raise OutputError(f"output {resolved} is inside the input model's directory {src}; choose another place")
    if out.exists() and (out.is_dir() or not overwrite):
        raise OutputError(f"output {resolved} already exists; pass --overwrite (overwrite=True) to replace it")


def _check_exportable(model) -> None:
    config = model.config
    if config.model_type != "llama":
        raise ExportError(f"GGUF export supports Llama models (model_type llama); this one is {config.model_type!r}")
    adapter = adapter_for(model)
    if not adapter.is_uniform():
        raise ExportError(
            "this model's head counts or MLP widths differ per layer, and transformers' GGUF loader reads one value "
            "for all layers; prune with --ranking per_layer (the default) to export it"
        )
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ExportError(f"GGUF export writes plain rotary embeddings; this model uses {rope['rope_type']!r} scaling")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ExportError("GGUF export of Llama models with attention or MLP biases is not supported")


def _vocabulary(tokenizer, vocab_size: int) -> dict:
    """Tokens, types, merges and special ids of a byte-level BPE tokenizer, as GGUF's tokenizer keys hold them."""
    import gguf

    if tokenizer is None or not hasattr(tokenizer, "backend_tokenizer"):
        raise ExportError("GGUF export needs the model's fast (tokenizers) tokenizer")
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    pre = _pre_tokenizer(spec.get("pre_tokenizer"))
    if model["type"] != "BPE" or pre is None:
        raise ExportError(
            "GGUF export writes byte-level BPE tokenizers (GPT-2 / Llama-3 style); this one is "
            f"{model['type']} with pre-tokenizer {json.dumps(spec.get('pre_tokenizer'))[:120]}"
        )
    tokens: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    types = dict.fromkeys(tokens, gguf.TokenType.NORMAL)
    for added in spec.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    if max(tokens) >= vocab_size:
        raise ExportError(f"the tokenizer has token ids up to {max(tokens)} but the model only {vocab_size} embeddings")
    # Embedding rows without a token (vocabularies padded to a round size) get placeholders, as llama.cpp's do.
    token_list = [tokens.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    type_list = [types.get(i, gguf.TokenType.UNUSED) for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not merges:
        raise ExportError("the tokenizer has no BPE merges, which a GGUF byte-level vocabulary needs")
    probe = tokenizer("a")["input_ids"]
    special = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "unk", "pad")}
    return {
        "pre": pre,
        "tokens": token_list,
        "types": type_list,
        "merges": merges,
        "special": special,
        "add_bos": bool(probe) and special["bos"] is not None and probe[0] == special["bos"],
        "chat_template": getattr(tokenizer, "chat_template", None),
    }


def _pre_tokenizer(pre: dict | None) -> str | None:
    """llama.cpp's name for a byte-level pre-tokenizer, None for any other."""
    if pre is None:
        return None
    if pre["type"] == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if pre["type"] == "Sequence":
        steps = pre["pretokenizers"]
        if (
            len(steps) == 2
            and steps[0]["type"] == "Split"
            and steps[0]["pattern"].get("Regex") == LLAMA3_SPLIT
            and steps[1]["type"] == "ByteLevel"
        ):
            return "llama-bpe"
    return None


def _permute_rotary(w: np.ndarray, heads: int) -> np.ndarray:
    """Rows of q_proj / k_proj from transformers' rotate-half layout to llama.cpp's interleaved pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write(model, vocab: dict, path: Path, qtype: str, keep_q8: tuple[str, ...], search: bool) -> None:
    import gguf

    config = model.config
    shape = adapter_for(model).shape()
    layer = shape.layers[0]
    main_type, file_type = _qtypes()[qtype]
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(str(getattr(config, "_name_or_path", "") or "fastprune model").rsplit("/", 1)[-1])
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(shape.num_layers)
    writer.add_feed_forward_length(layer.channels)
    writer.add_head_count(layer.heads)
    writer.add_head_count_kv(layer.kv_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_key_length(shape.head_dim)
    writer.add_value_length(shape.head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_vocabulary(writer, vocab)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, shape.num_layers)
    state = model.state_dict()
    for hf_name, tensor in tqdm(state.items(), desc=f"GGUF {qtype}", unit="tensor", disable=None, leave=False):
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"no GGUF name for the tensor {hf_name}")
        data = tensor.detach().float().cpu().numpy()
        if name.endswith("attn_q.weight"):
            data = _permute_rotary(data, layer.heads)
        elif name.endswith("attn_k.weight"):
            data = _permute_rotary(data, layer.kv_heads)
        data, raw = _encode(name, data, main_type, keep_q8, search)
        writer.add_tensor(name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()


def _add_vocabulary(writer, vocab: dict) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    adders = {
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "unk": writer.add_unk_token_id,
        "pad": writer.add_pad_token_id,
    }
    for name, token_id in vocab["special"].items():
        if token_id is not None:
            adders[name](token_id)
    writer.add_add_bos_token(vocab["add_bos"])
    if isinstance(vocab["chat_template"], str):
        writer.add_chat_template(vocab["chat_template"])


def _encode(name: str, data: np.ndarray, main_type, keep_q8: tuple[str, ...], search: bool):
    """(array, raw dtype) of one tensor in the type it is written in (see the module docstring)."""
    import gguf

    q = gguf.GGMLQuantizationType
    if data.ndim < 2 or main_type == q.F32:
        return data.astype(np.float32), q.F32
    qtype = main_type
    low_bit = qtype in (q.Q4_0, q.Q4_1, q.Q5_0, q.Q5_1)
    if low_bit and (name in ("token_embd.weight", "output.weight") or name.split(".")[-2] in keep_q8):
        qtype = q.Q8_0
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if data.shape[-1] % block:
        logger.info("%s: rows of %d do not split into blocks of %d; writing F16", name, data.shape[-1], block)
        qtype = q.F16
    if qtype == q.F16:
        return data.astype(np.float16), q.F16
    if search and qtype.name.lower() in SEARCHED_TYPES:
        return quantize_searched(data, qtype.name.lower()), qtype
    return gguf.quants.quantize(data, qtype), qtype
