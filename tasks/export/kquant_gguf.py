"""k-quant GGUF: llama.cpp's Q2_K / Q3_K_M / Q4_K_M files, every weight rounded by GPTQ onto its ggml grid.

Which tensor gets which ggml type mirrors ``llama-quantize`` (``llama_tensor_get_type_impl`` and
``tensor_type_fallback`` in llama.cpp's ``src/llama-quant.cpp``, dense llama and qwen2 models), so a quantpipe file
and llama.cpp's own have the same size:

* output (and the token embedding when tied to it): Q6_K;
* ``attn_v``: Q2_K → Q3_K (Q4_K when n_head/n_kv ≥ 4); Q3_K_M → Q5_K in the first two layers, else Q4_K;
  Q4_K_M → Q6_K in "more bits" layers (first and last eighth, every third in between), else Q4_K;
* ``ffn_down``: Q2_K → Q3_K; Q3_K_M → Q5_K in the first sixteenth of the layers, else Q4_K; Q4_K_M → Q6_K in
  the more-bits layers;
* ``attn_output``: Q2_K → Q3_K; Q3_K_M → Q4_K;
* everything else (q, k, gate, up, an untied token embedding): the file type's base (Q2_K, Q3_K, Q4_K);
* a tensor whose row length is not a multiple of 256 falls back: Q2_K/Q3_K → Q4_0, Q4_K → Q5_0, Q5_K → Q5_1,
  Q6_K → Q8_0 (SmolLM2-135M's hidden size 576 sends every tensor but ``ffn_down`` there).

Each tensor is quantized with :func:`quant.kquant.quantize_kquant` against its layer's proxy Hessian (the token
embedding, when tied, against the LM head's), or, without one, by the importance-free grid search alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from kernels.formats.kquants import encode_rows
from quant.kquant import KSPECS, KQuantWeight, quantize_kquant, quantize_rtn

__all__ = ["FTYPES", "kquant_mix", "kquant_reason", "quantize_mix", "write_kquant_gguf"]

FTYPES: dict[str, str] = {"Q2_K": "Q2_K", "Q3_K_M": "Q3_K", "Q4_K_M": "Q4_K"}  # file type → base tensor type
_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def _more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _layer_type(ftype: str, kind: str, i: int, n: int, n_gqa: int) -> str:
    base = FTYPES[ftype]
    if kind == "v_proj":
        if ftype == "Q2_K":
            return "Q4_K" if n_gqa >= 4 else "Q3_K"
        if ftype == "Q3_K_M":
            return "Q5_K" if i < 2 else "Q4_K"
        return "Q6_K" if _more_bits(i, n) else base
    if kind == "down_proj":
        if ftype == "Q2_K":
            return "Q3_K"
        if ftype == "Q3_K_M":
            return "Q5_K" if i < n // 16 else "Q4_K"
        return "Q6_K" if _more_bits(i, n) else base
    if kind == "o_proj":
        return {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K"}.get(ftype, base)
    return base


def _fit(qtype: str, cols: int) -> str:
    if cols % KSPECS[qtype].block == 0:
        return qtype
    fallback = _FALLBACK.get(qtype, qtype)
    if cols % KSPECS[fallback].block:
        raise ValueError(f"{cols}-weight rows fit neither {qtype} nor {fallback}")
    return fallback


def kquant_mix(ftype: str, config: dict[str, Any]) -> dict[str, str]:
    """{Hugging Face weight name (no ``.weight``): ggml type} for every tensor ``llama-quantize`` quantizes."""
    if ftype not in FTYPES:
        raise ValueError(f"unknown k-quant file type {ftype!r}; one of {', '.join(FTYPES)}")
    n = int(config["num_hidden_layers"])
    hidden, inter = int(config["hidden_size"]), int(config["intermediate_size"])
    n_head = int(config["num_attention_heads"])
    n_gqa = n_head // int(config.get("num_key_value_heads") or n_head)
    tied = bool(config.get("tie_word_embeddings", True))
    mix = {"model.embed_tokens": _fit("Q6_K" if tied else FTYPES[ftype], hidden)}
    if not tied:
        mix["lm_head"] = _fit("Q6_K", hidden)
    for i in range(n):
        for kind, cols in (
            ("self_attn.q_proj", hidden),
            ("self_attn.k_proj", hidden),
            ("self_attn.v_proj", hidden),
            ("self_attn.o_proj", n_head * int(config.get("head_dim") or hidden // n_head)),
            ("mlp.gate_proj", hidden),
            ("mlp.up_proj", hidden),
            ("mlp.down_proj", inter),
        ):
            mix[f"model.layers.{i}.{kind}"] = _fit(_layer_type(ftype, kind.split(".")[1], i, n, n_gqa), cols)
    return mix


def kquant_reason(model_path: Path, config: dict[str, Any]) -> str | None:
    """None when this base checkpoint is written as a GGUF llama.cpp loads (the checks of the exact GGUF export
    that concern the model, not its grids), else why not (one line)."""
    from tasks.export.gguf import gguf_model_reason

    reason = gguf_model_reason(model_path, config)
    if reason is not None:
        return reason
    try:
        kquant_mix("Q4_K_M", config)
    except ValueError as exc:
        return str(exc)
    return None


def quantize_mix(
    weights: Mapping[str, torch.Tensor],
    mix: Mapping[str, str],
    hessians: Mapping[str, torch.Tensor],
    *,
    tied: bool,
    progress: Callable[[str], None] | None = None,
) -> dict[str, KQuantWeight]:
    """GPTQ every tensor of ``mix`` onto its type (``hessians`` keyed by linear name; a tied embedding uses
    ``lm_head``'s). A tensor without a Hessian gets the grid search alone (uniform importance)."""
    out = {}
    for name, qtype in mix.items():
        H = hessians.get("lm_head" if tied and name == "model.embed_tokens" else name)
        W = weights[name]
        out[name] = quantize_rtn(W, qtype) if H is None else quantize_kquant(W, H, qtype, name=name)
        if progress is not None:
            progress(name)
    return out


def write_kquant_gguf(
    path: Path, model_path: Path, ftype: str, quantized: Mapping[str, KQuantWeight], config: dict[str, Any]
) -> dict[str, Any]:
    """Write ``path``: the model's plain tensors (norms F32) and ``quantized`` as their ggml types (``ftype``
    "F32" with nothing quantized: the unquantized model, llama-quantize's input); q/k rows permuted as llama.cpp's
    converter permutes them (whole rows move, so blocks stay exact)."""
    import gguf

    from tasks.export.common import source_tensors
    from tasks.export.gguf import _plain_tensor, _rows_permutation, qk_heads, start_writer, tensor_names

    tied = bool(config.get("tie_word_embeddings", True))
    file_type = gguf.LlamaFileType.ALL_F32 if ftype == "F32" else getattr(gguf.LlamaFileType, f"MOSTLY_{ftype}")
    w = start_writer(path, model_path, config, file_type)
    names = tensor_names(config)
    for name, t in source_tensors(model_path, skip=set(quantized)):
        if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
            continue
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise ValueError(f"no llama.cpp tensor name for {name}")
        heads = qk_heads(name, config)
        if heads is not None:
            t = t[_rows_permutation(t.shape[0], heads)]
        array, raw = _plain_tensor(name, t)
        w.add_tensor(target, array, raw_dtype=raw)
    types: dict[str, int] = {}
    for name, kw in sorted(quantized.items()):
        heads = qk_heads(name, config)
        if heads is not None:
            kw = kw.rows(_rows_permutation(kw.shape[0], heads))
        target = names.get_name(f"{name}.weight", try_suffixes=(".weight",))
        if target is None:
            raise ValueError(f"no llama.cpp tensor name for {name}")
        w.add_tensor(target, encode_rows(kw).numpy(), raw_dtype=getattr(gguf.GGMLQuantizationType, kw.qtype))
        types[kw.qtype] = types.get(kw.qtype, 0) + 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"file": path.name, "ftype": ftype, "tensor_types": types}
