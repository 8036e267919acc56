"""The quantpipe-native packed checkpoint: write it from ``qlayer`` artifacts, load it into a HF model.

Layout of ``native/``: the base model's ``config.json`` plus a ``quantization_config`` block
(``quant_method: quantpipe``), tokenizer files, and ``model.safetensors`` (or, past 512 MB of tensors, the
shards ``model-0000k-of-0000N.safetensors`` with ``model.safetensors.index.json``) holding every full-precision tensor
(embeddings, norms, lm_head, …) and, per quantized linear ``<name>``, the packed tensors
``<name>.qweight/.scales/.zeros/.qmeta[/.g_idx]`` of :mod:`kernels.packing` — plus, for incoherence-processed
schemes (quip, hadamard-gptq; ``quantization_config.transform``), the small transform tensors
``<name>.su/.sv/.kron_u/.kron_v[/.perm_u/.perm_v/.fac_u0/…/.rescale]`` of :mod:`quant.incoherence`. Loading builds
the model skeleton from the config and swaps those linears for the module of their layout
(:func:`kernels.layouts.replace_linears`: ``QuantLinear``, ``RotatedQuantLinear`` which applies the transforms
online, ICQuant, binary-coded, mixed or E8P modules), so evaluation runs on the packed weights, not on in-memory
fake-quantized copies.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch

from infra.errors import CorruptArtifactError
from tasks.models import copy_tokenizer  # re-exported: the exporters copy the tokenizer through here

__all__ = ["QUANT_METHOD", "copy_tokenizer", "load_packed_model", "packed_modules"]

QUANT_METHOD = "quantpipe"


def packed_modules(config: dict[str, Any]) -> list[str]:
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") != QUANT_METHOD:
        raise CorruptArtifactError("checkpoint config has no quantpipe quantization_config")
    return list(qc["modules"])


def _under(key: str, modules: dict[str, Any]) -> bool:
    """Whether a state-dict key belongs to a packed module (its own buffers, or its parts' for mixed layers)."""
    while "." in key:
        key = key.rpartition(".")[0]
        if key in modules:
            return True
    return False


def load_packed_model(
    path: Path,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    runtime_parts: Collection[str] | None = None,
) -> Any:
    """A HF causal LM whose quantized linears are ``QuantLinear`` modules reading the packed tensors.

    ``runtime_parts`` keeps only those parts of the checkpoint's A/KV runtime (e.g. ``{"kv_cache"}``), so a
    benchmark can measure what each costs; None installs all of it, as evaluation does. Online rotations of a
    QuaRot checkpoint are part of its function and always installed.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from kernels.layouts import is_packed_key, replace_linears
    from tasks.models import model_construction

    config_dict = json.loads((path / "config.json").read_text())
    modules = packed_modules(config_dict)
    qconfig = config_dict.pop("quantization_config")
    config = AutoConfig.for_model(**config_dict)
    with model_construction(), torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    from quant.arch import mapping_for
    from tasks.moe import unfuse_model  # MoE: experts stored (and quantized) as per-expert linears

    unfuse_model(model, mapping_for(config_dict.get("architectures") or []))
    state: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):  # model.safetensors, or the shards a large pack is written in
        state.update(load_file(str(f)))
    packed: dict[str, dict[str, torch.Tensor]] = {m: {} for m in modules}
    plain: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        mod, _, suffix = name.rpartition(".")
        if mod in packed and is_packed_key(suffix):  # a tensor of some layout (kernels.layouts)
            packed[mod][suffix] = tensor
        else:
            plain[name] = tensor
    # QuantLinear replaces the meta Linear; its own buffers come from the packed tensors.
    model.to_empty(device=device)
    for sub in model.modules():  # non-persistent buffers (Gemma's embed_scale) are not in the checkpoint and
        if sub is not model and getattr(sub, "_non_persistent_buffers_set", None):  # to_empty left them garbage:
            model._init_weights(sub)  # transformers' own init recomputes them (parameters are loaded below)
    replace_linears(model, packed)
    missing, unexpected = model.load_state_dict(plain, strict=False)
    missing = [m for m in missing if not _under(m, packed) and "rotary_emb" not in m]
    if config.tie_word_embeddings:
        model.tie_weights()
        missing = [m for m in missing if m != "lm_head.weight"]
    if missing or unexpected:
        raise CorruptArtifactError(
            f"packed checkpoint {path} does not match its config: missing={missing[:5]} unexpected={unexpected[:5]}"
        )
    _reset_rotary(model, device)
    model = model.to(dtype=dtype).eval()
    from tasks.quarot_runtime import install_runtime  # QuaRot online transforms, A/KV fake quant (CPU torch path)

    runtime = qconfig.get("runtime") or {}
    if runtime_parts is not None:
        runtime = {k: v for k, v in runtime.items() if k in runtime_parts}
    install_runtime(model, config_dict, runtime)
    return model


def _reset_rotary(model: Any, device: str) -> None:
    """Non-persistent rotary buffers were left uninitialised by ``to_empty``: rebuild them from the config."""
    for name, mod in model.named_modules():
        if name.endswith("rotary_emb"):
            fresh = type(mod)(config=model.config).to(device)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, fresh)
