"""The QuaRot inference runtime: what a model built from a rotated (or A/KV-quantized) checkpoint needs besides
its weights, and why no serving export can carry it.

:func:`install_runtime` installs online transforms before o_proj/down_proj (read from the config's
``quantpipe_quarot`` entry, i.e. from the seed) and, from the packed checkpoint's ``quantization_config.runtime``,
per-token activation fake quantization on every block linear's input and KV-cache fake quantization (q/k Hadamard
after RoPE when rotated). The block streamer (Hessians, :mod:`tasks.driver`) and
:func:`tasks.checkpoint.load_packed_model` (evaluation) both call it, so Hessians see the same activations as the
evaluated model (without A/KV quantization: QuaRot runs GPTQ on fp activations). Writing the rotated checkpoint is
:mod:`tasks.quarot`'s job; this module imports no other ``tasks`` module, so the loaders can use it freely.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from quant.arch import ArchMapping, mapping_for
from quant.quarot import QuaRotConfig, QuaRotDims, QuaRotTransforms, build_transforms, fake_quant_groups

__all__ = ["ATTENTION_NAME", "QUAROT_KEY", "install_runtime", "model_dims", "quarot_config", "runtime_export_reason"]

QUAROT_KEY = "quantpipe_quarot"  # config.json entry of a rotated checkpoint: {"seed", "fallback", "version"}
ATTENTION_NAME = "quantpipe_kvquant"  # attention implementation: KV fake quantization around sdpa


def model_dims(config: dict[str, Any]) -> QuaRotDims:
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    return QuaRotDims(
        hidden=hidden,
        n_heads=heads,
        n_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or hidden // heads),
        intermediate=int(config["intermediate_size"]),
    )


def quarot_config(data: dict[str, Any]) -> QuaRotConfig:
    """The rotation of a checkpoint's ``quantpipe_quarot`` entry (or a ``RotationConfig`` dump)."""
    return QuaRotConfig(seed=int(data["seed"]), fallback=data["fallback"])


def runtime_export_reason(config: dict[str, Any], runtime: dict[str, Any] | None, fmt: str) -> str | None:
    """Why export format ``fmt`` cannot carry this build's runtime (online rotations, A/KV fake quantization), or
    None when there is none. ``config``: the base model's config.json dict."""
    if QUAROT_KEY in config:
        return f"QuaRot needs online Hadamard transforms, which {fmt} cannot express"
    if runtime:
        return f"activation/KV fake quantization ({', '.join(sorted(runtime))}) is not a {fmt} scheme"
    return None


# ---- inference runtime ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _KVQuant:
    """K/V fake quantization inside attention; ``qk`` = T_hd applied to q and k after RoPE (rotated models)."""

    bits: int
    group_size: int
    sym: bool
    clip_ratio: float
    qk: Any = None

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.qk is not None:
            q, k = self.qk.apply(q), self.qk.apply(k)
        g = self.group_size or k.shape[-1]
        kw = {"sym": self.sym, "clip_ratio": self.clip_ratio}
        return q, fake_quant_groups(k, self.bits, g, **kw), fake_quant_groups(v, self.bits, g, **kw)


def _kv_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, *args: Any, **kwargs: Any) -> Any:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kv = getattr(module, "quantpipe_kv", None)
    if kv is not None:
        query, key, value = kv(query, key, value)
    return sdpa_attention_forward(module, query, key, value, *args, **kwargs)


def _register_attention() -> None:
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, _kv_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def _pre_hook(fn: Any) -> Any:
    def hook(_mod: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (fn(args[0]), *args[1:])

    return hook


def _act_quant(bits: int, clip_ratio: float, group_size: int = 0) -> Any:
    from kernels.actquant.ref import fake_quant_per_token

    return lambda x: fake_quant_per_token(x, bits=bits, clip_ratio=clip_ratio, group_size=group_size)


def _online(apply: Any) -> Any:
    """Run an online transform in fp32 (or fp64), returning x's dtype."""

    def fn(x: Tensor) -> Tensor:
        work = x if x.dtype in (torch.float32, torch.float64) else x.float()
        return apply(work).to(x.dtype)

    return fn


def install_runtime(model: nn.Module, config: dict[str, Any], runtime: dict[str, Any] | None = None) -> list[str]:
    """Install online transforms (rotated checkpoints) and A/KV fake quantization on ``model`` (in place).

    ``config`` is the checkpoint's config.json dict; ``runtime`` the packed checkpoint's
    ``quantization_config.runtime`` ({"activations": {...}, "kv_cache": {...}}). Pre-hooks run in install order:
    online transform first, then the activation quantizer. Returns what was installed (for logs and tests).
    """
    runtime = runtime or {}
    rotation = config.get(QUAROT_KEY)
    acts, kv = runtime.get("activations"), runtime.get("kv_cache")
    if rotation is None and acts is None and kv is None:
        return []
    mapping: ArchMapping = mapping_for(config.get("architectures") or [])
    blocks = model.get_submodule(mapping.blocks)
    t: QuaRotTransforms | None = build_transforms(model_dims(config), quarot_config(rotation)) if rotation else None
    installed = []
    for block in blocks:  # type: ignore[attr-defined]
        if t is not None:
            o_name, down_name = (next(g for g in mapping.groups if g.name == n).linears[0] for n in ("o_in", "down_in"))
            block.get_submodule(o_name).register_forward_pre_hook(_pre_hook(_online(t.across_heads)))
            block.get_submodule(down_name).register_forward_pre_hook(_pre_hook(_online(t.ff.apply)))
        if acts is not None:
            quant = _act_quant(int(acts["bits"]), float(acts["clip_ratio"]), int(acts.get("group_size", 0)))
            for linear in mapping.block_linears():
                block.get_submodule(linear).register_forward_pre_hook(_pre_hook(quant))
        if kv is not None:
            attn = block.get_submodule(mapping.value.rpartition(".")[0])
            attn.quantpipe_kv = _KVQuant(  # type: ignore[assignment]
                int(kv["bits"]),
                int(kv["group_size"]),
                bool(kv["sym"]),
                float(kv["clip_ratio"]),
                qk=t.head_dim if t is not None else None,
            )
    if t is not None:
        installed += ["online_o_proj", "online_down_proj"]
    if acts is not None:
        installed.append(f"a{acts['bits']}")
    if kv is not None:
        _register_attention()
        model.config._attn_implementation = ATTENTION_NAME  # type: ignore[union-attr]
        installed.append(f"kv{kv['bits']}" + ("+qk_hadamard" if t is not None else ""))
    return installed
