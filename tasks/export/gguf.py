"""GGUF export for llama.cpp: the build's own grids as llama.cpp block types, written with the ``gguf`` package.

Only grids llama.cpp has are written, and only exactly (:mod:`kernels.formats.ggml`): W4 g32 asym → Q4_1,
W4 g32 sym → Q4_0, W8 g32 sym → Q8_0; anything else is refused in one line naming those. Metadata follows
llama.cpp's ``convert_hf_to_gguf.py`` for the llama and qwen2 architectures (``GGUF_ARCHES``):

* ``general.*`` (architecture, type, file_type, quantization_version, quantized_by) and ``<arch>.*``
  hyper-parameters (block_count, context_length, embedding_length, feed_forward_length, head counts,
  rope.freq_base, rope.dimension_count = head_dim, layer_norm_rms_epsilon, vocab_size; key/value_length when
  head_dim ≠ hidden/heads);
* the tokenizer as ``tokenizer.ggml.*``: model ``gpt2`` (byte-level BPE), ``pre`` (the pre-tokenizer llama.cpp
  must run, see ``tokenizer_pre``), tokens with their types (added special tokens CONTROL, other added tokens
  USER_DEFINED, holes ``[PAD<i>]`` UNUSED), merges, special token ids, add_bos/add_eos and the chat template
  (``gguf.SpecialVocab``);
* tensors under llama.cpp's names (``gguf.get_tensor_name_map``). For llama, ``attn_q``/``attn_k`` rows are
  permuted the way the converter permutes them (rotary pairs interleaved): a permutation of output rows, so every
  32-weight block moves whole and stays exact. qwen2 runs NeoX-style rotary (rows as they are) and keeps its
  q/k/v biases (F32). Tensors we did not quantize keep their dtype (F32 / F16 / BF16; norms F32),
  so the file holds exactly the native pack's numbers.

Not written (refused with the reason): other architectures, RoPE scaling, biases the architecture lacks, sentencepiece
vocabularies, pre-tokenizers llama.cpp does not implement, act-order without static groups.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, NamedTuple

import torch

from kernels.formats.ggml import encode_rows, ggml_type_for, grid_reason, mapping_text
from tasks.export.common import ExportInputs, affine_reason, source_tensors

__all__ = ["FILE_NAME", "FORMAT", "gguf_reason", "start_writer", "tokenizer_pre", "verify_gguf", "write_gguf"]

FORMAT = "gguf"
FILE_NAME = "model-{qtype}.gguf"

_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = _LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_USER_DEFINED, _TOKEN_UNUSED = 1, 3, 4, 5


class GGUFArch(NamedTuple):
    """How llama.cpp's converter writes one Hugging Face ``model_type``."""

    arch: str  # member of gguf.MODEL_ARCH
    permute_qk: bool  # llama's interleaved rotary pairs: q/k rows permuted; NeoX-style rotary keeps them
    biases: bool  # q/k/v biases are part of the architecture (Qwen2 always has them)


GGUF_ARCHES: dict[str, GGUFArch] = {
    "llama": GGUFArch("LLAMA", permute_qk=True, biases=False),
    "qwen2": GGUFArch("QWEN2", permute_qk=False, biases=True),
}


def gguf_arch(config: dict[str, Any]) -> GGUFArch:
    """The GGUF architecture of a checkpoint (``gguf_model_reason`` has refused the others)."""
    return GGUF_ARCHES[str(config.get("model_type"))]


def tensor_names(config: dict[str, Any]) -> Any:
    """llama.cpp's tensor-name map for this checkpoint (``gguf.TensorNameMap``)."""
    import gguf

    return gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, gguf_arch(config).arch), int(config["num_hidden_layers"]))


def qk_heads(name: str, config: dict[str, Any]) -> int | None:
    """Heads whose rotary pairs llama.cpp's converter interleaves in this q/k weight's rows, else None."""
    if not gguf_arch(config).permute_qk:
        return None
    n_head = int(config["num_attention_heads"])
    base = name.removesuffix(".weight")
    if base.endswith("q_proj"):
        return n_head
    if base.endswith("k_proj"):
        return int(config.get("num_key_value_heads") or n_head)
    return None


def _byte_level(step: dict[str, Any], *, regex: bool) -> bool:
    return step.get("type") == "ByteLevel" and bool(step.get("use_regex", True)) == regex


def _split(step: dict[str, Any], pattern: str) -> bool:
    return step.get("type") == "Split" and (step.get("pattern") or {}).get("Regex") == pattern


def tokenizer_pre(tokenizer_json: dict[str, Any]) -> str | None:
    """The llama.cpp pre-tokenizer (``tokenizer.ggml.pre``) that splits text as this ``tokenizer.json`` does, or
    None. llama.cpp's converter recognises a tokenizer by hashing its encoding of a probe text, which needs the
    exact published vocabulary; we match the pre-tokenizer definition itself against the ones llama.cpp runs:
    ``gpt-2`` (ByteLevel with GPT-2's regex), ``smollm`` (single digits, then GPT-2's regex), ``llama-bpe``
    (Llama-3's split) and ``qwen2``."""
    if (tokenizer_json.get("model") or {}).get("type") != "BPE" or tokenizer_json.get("normalizer"):
        return None
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if len(steps) == 1 and _byte_level(steps[0], regex=True):
        return "gpt-2"
    if len(steps) == 2 and _byte_level(steps[1], regex=True):
        first = steps[0]
        if first.get("type") == "Digits" and first.get("individual_digits"):
            return "smollm"
    if len(steps) == 2 and _byte_level(steps[1], regex=False):
        if _split(steps[0], _LLAMA3_REGEX):
            return "llama-bpe"
        if _split(steps[0], _QWEN2_REGEX):
            return "qwen2"
    return None


def _rope_default(config: dict[str, Any]) -> bool:
    rope = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling")
    return rope.get("rope_type", "default") == "default" and not scaling


def _rope_theta(config: dict[str, Any]) -> float:
    rope = config.get("rope_parameters") or {}
    return float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))


def gguf_model_reason(model_path: Path, config: dict[str, Any]) -> str | None:
    """None when this base checkpoint can be written as a GGUF llama.cpp loads (architecture, RoPE, biases,
    tokenizer, host byte order: what every GGUF export needs, whatever its grids), else why not (one line)."""
    arch = GGUF_ARCHES.get(str(config.get("model_type")))
    if arch is None:
        return f"the GGUF export writes {' and '.join(GGUF_ARCHES)} models, not {config.get('model_type')!r}"
    if not _rope_default(config):
        return "RoPE scaling is not written to GGUF by this exporter"
    if config.get("use_sliding_window"):
        return f"sliding-window attention is not part of llama.cpp's {arch.arch.lower()} architecture"
    if (config.get("attention_bias") and not arch.biases) or config.get("mlp_bias"):
        return f"attention/MLP biases are not part of llama.cpp's {arch.arch.lower()} architecture"
    tok_file = model_path / "tokenizer.json"
    if not tok_file.is_file():
        return "no tokenizer.json: the GGUF export writes byte-level BPE vocabularies only"
    if tokenizer_pre(json.loads(tok_file.read_text())) is None:
        return "the tokenizer's pre-tokenizer is none llama.cpp implements (gpt-2, smollm, llama-bpe, qwen2)"
    if sys.byteorder != "little":
        return "GGUF blocks are written on little-endian hosts only"
    return None


def gguf_reason(inputs: ExportInputs) -> str | None:
    """None when the build is written exactly as a GGUF llama.cpp loads, else why not (one line)."""
    reason = affine_reason(inputs, "GGUF")
    if reason is not None:
        return reason
    cfg = inputs.cfg
    qtype = ggml_type_for(cfg.bits, cfg.group_size, cfg.sym)
    if qtype is None:
        grid = f"W{cfg.bits} {'per-channel' if cfg.group_size <= 0 else f'g{cfg.group_size}'}"
        return f"llama.cpp has no grid for {grid} {'sym' if cfg.sym else 'asym'}; GGUF maps only {mapping_text()}"
    reason = gguf_model_reason(inputs.model_path, inputs.config)
    if reason is not None:
        return reason
    for name, q in inputs.affine().items():
        if q.g_idx is not None:
            return f"{name} uses act-order without static groups; GGUF blocks are contiguous"
        reason = grid_reason(name, qtype, q.scales, q.zeros, q.in_features)
        if reason is not None:
            return reason
    return None


def _rows_permutation(n_rows: int, n_head: int) -> torch.Tensor:
    """Row order of llama.cpp's q/k permute: ``w.reshape(n_head, 2, d, ...).swapaxes(1, 2)`` (new[i] = old[p[i]])."""
    return torch.arange(n_rows).reshape(n_head, 2, n_rows // n_head // 2).transpose(1, 2).reshape(-1)


def _vocab(model_path: Path, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens and token types as llama.cpp's ``get_vocab_base`` lists them."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    reverse = {i: t for t, i in tok.get_vocab().items()}
    added = tok.get_added_vocab()
    decoder = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(_TOKEN_UNUSED)
            continue
        if token in added:
            special = decoder[i].special or (token.startswith("<|") and token.endswith("|>"))
            types.append(_TOKEN_CONTROL if special else _TOKEN_USER_DEFINED)
        else:
            types.append(_TOKEN_NORMAL)
        tokens.append(token)
    return tokens, types


def _adds_bos(model_path: Path) -> bool:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    ids = tok("a").input_ids
    return tok.bos_token_id is not None and len(ids) > 0 and ids[0] == tok.bos_token_id


def _plain_tensor(name: str, t: torch.Tensor) -> tuple[Any, Any]:
    """(array, raw ggml type or None) for a tensor kept as it is: norms and 1-D tensors F32, others their dtype."""
    import gguf

    if t.dim() == 1 or "norm" in name:
        return t.to(torch.float32).numpy(), None
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.uint8).numpy(), gguf.GGMLQuantizationType.BF16
    if t.dtype in (torch.float16, torch.float32):
        return t.contiguous().numpy(), None
    return t.to(torch.float32).numpy(), None


def start_writer(path: Path, model_path: Path, config: dict[str, Any], file_type: int) -> Any:
    """A ``gguf.GGUFWriter`` for ``path`` with every key-value of a llama-architecture model (hyper-parameters,
    tokenizer) filled in; the caller adds the tensors and writes."""
    import gguf

    n_layers, hidden = int(config["num_hidden_layers"]), int(config["hidden_size"])
    n_head = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_head)
    head_dim = int(config.get("head_dim") or hidden // n_head)
    vocab_size = int(config["vocab_size"])
    tokens, types = _vocab(model_path, vocab_size)
    pre = tokenizer_pre(json.loads((model_path / "tokenizer.json").read_text()))
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, gguf_arch(config).arch)])
    w.add_type(gguf.GGUFType.MODEL)
    w.add_quantized_by("quantpipe")
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_block_count(n_layers)
    w.add_context_length(int(config.get("max_position_embeddings") or 2048))
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(int(config["intermediate_size"]))
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(_rope_theta(config))
    w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    w.add_vocab_size(vocab_size)
    w.add_rope_dimension_count(head_dim)
    if head_dim != hidden // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre or "default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = gguf.SpecialVocab(model_path, load_merges=True, n_vocab=len(tokens))
    special.add_special_token.setdefault("bos", _adds_bos(model_path))
    special.add_special_token.setdefault("eos", False)
    special.add_to_gguf(w, quiet=True)

    return w


def write_gguf(out: Path, inputs: ExportInputs) -> dict[str, Any]:
    """Write ``out/model-<TYPE>.gguf``; returns what the pack manifest records about it."""
    import gguf

    cfg, qweights, config = inputs.cfg, inputs.affine(), inputs.config
    qtype = ggml_type_for(cfg.bits, cfg.group_size, cfg.sym)
    if qtype is None:
        raise ValueError(f"no ggml type for W{cfg.bits} g{cfg.group_size}")
    out.mkdir(parents=True)
    path = out / FILE_NAME.format(qtype=qtype)
    w = start_writer(path, inputs.model_path, config, getattr(gguf.LlamaFileType, f"MOSTLY_{qtype}"))
    pre = tokenizer_pre(json.loads((inputs.model_path / "tokenizer.json").read_text()))
    names = tensor_names(config)
    tied = bool(config.get("tie_word_embeddings", True))
    for name, t in source_tensors(inputs.model_path, skip=set(qweights)):
        if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
            continue
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise ValueError(f"no llama.cpp tensor name for {name}")
        array, raw = _plain_tensor(name, t)
        w.add_tensor(target, array, raw_dtype=raw)
    for name, q in sorted(qweights.items()):
        codes, scales, zeros = q.codes, q.scales, q.zeros
        heads = qk_heads(name, config)
        if heads is not None:  # llama.cpp's rotary-pair permutation of q/k rows
            perm = _rows_permutation(q.out_features, heads)
            codes, scales, zeros = codes[perm], scales[perm], zeros[perm]
        target = names.get_name(f"{name}.weight", try_suffixes=(".weight",))
        if target is None:
            raise ValueError(f"no llama.cpp tensor name for {name}")
        blocks = encode_rows(qtype, codes, scales, zeros)
        w.add_tensor(target, blocks.numpy(), raw_dtype=getattr(gguf.GGMLQuantizationType, qtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"file": path.name, "ggml_type": qtype, "tokenizer_pre": pre}


def dequantized_weights(path: Path, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every block-quantized tensor of the file as transformers' GGUF loader reads it (its own header parser and
    block dequantizer, ``transformers.integrations.gguf``), q/k rows permuted back to the Hugging Face order,
    keyed by llama.cpp name."""
    from transformers.integrations.gguf.dequant import GGML_BLOCK, dequantize
    from transformers.integrations.gguf.reader import GgufHeader, load_gguf_state_dict

    names = tensor_names(config)
    hf_of = {
        names.get_name(f"model.layers.{i}.self_attn.{p}"): f"self_attn.{p}"
        for i in range(int(config["num_hidden_layers"]))
        for p in ("q_proj", "k_proj")
    }
    header = GgufHeader.from_file(str(path))
    lazy = load_gguf_state_dict(header)
    out = {}
    for info in header.tensors:
        if info.ggml_type not in GGML_BLOCK:  # plain tensors are stored as they are
            continue
        w = dequantize(lazy[info.name][()].reshape(-1), info.ggml_type).reshape(info.shape)
        heads = qk_heads(hf_of.get(info.name.removesuffix(".weight"), ""), config)
        if heads is not None:
            w = w[torch.argsort(_rows_permutation(w.shape[0], heads))]
        out[info.name] = w
    return out


def verify_gguf(path: Path, inputs: ExportInputs) -> str | None:
    """None when transformers' GGUF reader decodes every quantized tensor of ``path`` to our dequantized weights
    bit for bit, else what differs."""

    weights = dequantized_weights(path, inputs.config)
    names = tensor_names(inputs.config)
    for name, q in inputs.affine().items():
        got = weights.get(f"{names.get_name(name)}.weight")
        if got is None or not torch.equal(got, q.dequantize()):
            diff = "missing" if got is None else f"max |Δ| {(got - q.dequantize()).abs().max().item():.3g}"
            return f"transformers' GGUF reader decodes {name} differently from the quantized weights ({diff})"
    return None
