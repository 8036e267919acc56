"""QuaRot glue between the math (:mod:`quant.quarot`) and Hugging Face models / the artifact store.

* :func:`prepare_model`: the derived fp checkpoint with folded norms and offline rotations, a ``rotated-model``
  artifact keyed by (model, rotation config). The hessians, quantize and pack stages then run on it unchanged: their
  input key is the rotated model's, so they never collide with the unrotated recipe's artifacts. It is written one
  decoder block per safetensors shard, so memory stays at one block (plus the embedding).
* :func:`install_runtime`: what a model built from a rotated checkpoint needs at inference besides its weights —
  online transforms before o_proj/down_proj (read from the config's ``quantpipe_quarot`` entry, i.e. from the seed),
  and, from the packed checkpoint's ``quantization_config.runtime``, per-token activation fake quantization on every
  block linear's input and KV-cache fake quantization (q/k Hadamard after RoPE when rotated). The block streamer
  (Hessians) and :func:`tasks.checkpoint.load_packed_model` (evaluation) both call it, so Hessians see the same
  activations as the evaluated model (without A/KV quantization: QuaRot runs GPTQ on fp activations).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from infra.errors import ConfigError
from quant.arch import ArchMapping, mapping_for
from quant.quarot import (
    QuaRotConfig,
    QuaRotDims,
    QuaRotTransforms,
    build_transforms,
    check_sizes,
    fake_quant_groups,
    rotate_block,
    rotate_embedding,
    rotate_lm_head,
)
from tasks.recipe import Recipe, RotationConfig

__all__ = [
    "ATTENTION_NAME",
    "QUAROT_KEY",
    "ROTATED_VERSION",
    "check_recipe_for_model",
    "install_runtime",
    "model_dims",
    "prepare_model",
    "runtime_reason",
    "write_rotated_checkpoint",
]

QUAROT_KEY = "quantpipe_quarot"  # config.json entry of a rotated checkpoint: {"seed", "fallback", "version"}
ATTENTION_NAME = "quantpipe_kvquant"  # attention implementation: KV fake quantization around sdpa
ROTATED_VERSION = 1


def model_dims(config: dict[str, Any]) -> QuaRotDims:
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    return QuaRotDims(
        hidden=hidden,
        n_heads=heads,
        n_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or hidden // heads),
        intermediate=int(config["intermediate_size"]),
    )


def _quarot_config(cfg: RotationConfig | dict[str, Any]) -> QuaRotConfig:
    data = cfg.model_dump(mode="json") if isinstance(cfg, RotationConfig) else dict(cfg)
    return QuaRotConfig(seed=int(data["seed"]), fallback=data["fallback"])


def check_recipe_for_model(recipe: Recipe, model_path: Path) -> None:
    """Refuse before any work: QuaRot on a model without RMSNorm, unsupported sizes, a KV group not dividing the
    head dim."""
    config = json.loads((Path(model_path) / "config.json").read_text())
    dims = model_dims(config)
    if recipe.kv_cache.enabled and recipe.kv_cache.group_size and dims.head_dim % recipe.kv_cache.group_size:
        raise ConfigError(
            f"recipe {recipe.name}: kv_cache.group_size={recipe.kv_cache.group_size} does not divide the head dim "
            f"{dims.head_dim}"
        )
    g = recipe.activations.group_size
    if recipe.activations.enabled and g:
        widths = {dims.hidden, dims.intermediate, dims.n_heads * dims.head_dim}
        bad = sorted(w for w in widths if w % g)
        if bad:
            raise ConfigError(
                f"recipe {recipe.name}: activations.group_size={g} does not divide the linear input widths {bad}"
            )
    if not recipe.rotation.enabled:
        return
    mapping = mapping_for(config.get("architectures") or [])
    if not mapping.quarot:
        raise ConfigError(
            f"recipe {recipe.name}: QuaRot's norm folding and V/O rotation are derived for the Llama family only, "
            f"not for {mapping.family} ({', '.join(config.get('architectures') or [])}); use hadamard-gptq or "
            "hadamard-e8p (per-layer rotations) on this model"
        )
    if "rms_norm_eps" not in config:
        raise ConfigError(
            f"recipe {recipe.name}: QuaRot folds RMSNorm scales into the linears, but model {model_path} "
            f"({config.get('model_type', '?')}) has no RMSNorm (no rms_norm_eps in config.json)"
        )
    try:
        check_sizes(dims, _quarot_config(recipe.rotation))
    except ValueError as exc:
        raise ConfigError(f"recipe {recipe.name}: {exc}") from None


# ---- the rotated fp checkpoint --------------------------------------------------------------------------------


def write_rotated_checkpoint(src: Path, dst: Path, cfg: RotationConfig) -> None:
    """Fold norms, untie and rotate ``src`` into ``dst`` (one shard per block + an index, tokenizer, config)."""
    from safetensors.torch import save_file

    from tasks.checkpoint import copy_tokenizer
    from tasks.driver import _WeightIndex

    config = json.loads((src / "config.json").read_text())
    mapping = mapping_for(config.get("architectures") or [])
    t = build_transforms(model_dims(config), _quarot_config(cfg))
    index = _WeightIndex(src)
    dst.mkdir(parents=True)
    weight_map: dict[str, str] = {}
    total = 0

    def write(file: str, tensors: dict[str, Tensor]) -> None:
        nonlocal total
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        save_file(tensors, str(dst / file), metadata={"format": "pt"})
        for k, v in tensors.items():
            weight_map[k] = file
            total += v.numel() * v.element_size()

    n_blocks = int(config["num_hidden_layers"])
    prefixes = [f"{mapping.blocks}.{i}." for i in range(n_blocks)]
    embed, head, norm = f"{mapping.embed}.weight", f"{mapping.lm_head}.weight", f"{mapping.final_norm}.weight"
    top: dict[str, Tensor] = {}
    for name in index.entries:
        if not name.startswith(tuple(prefixes)) and name not in (embed, head, norm):
            top[name] = index.get(name)  # e.g. rotary buffers: not on the residual stream
    E = index.get(embed)
    gamma = index.get(norm)
    top[head] = rotate_lm_head(index.get(head) if head in index else E, gamma, t)  # untied (tied → copy of E)
    top[embed] = rotate_embedding(E, t)
    top[norm] = torch.ones_like(gamma)
    del E
    write("model-00000-top.safetensors", top)
    del top
    for i, prefix in enumerate(prefixes):
        state = {n[len(prefix) :]: index.get(n) for n in index.entries if n.startswith(prefix)}
        rotated = rotate_block(state, mapping, t)
        write(f"model-{i + 1:05d}-block.safetensors", {prefix + k: v for k, v in rotated.items()})
    (dst / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=1)
    )
    config["tie_word_embeddings"] = False
    config[QUAROT_KEY] = {"version": ROTATED_VERSION, **_quarot_config(cfg).model_dump(mode="json")}
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    copy_tokenizer(src, dst)


def prepare_model(ctx: Any, model: Any, model_ref: str, cfg: RotationConfig) -> tuple[Any, str]:
    """(model, ref) the hessians/quantize/pack stages run on: the rotated checkpoint when ``cfg`` asks for one."""
    if not cfg.enabled:
        return model, model_ref
    from tasks.stage import ensure_artifact

    def produce(w: Any, _run: Any) -> None:
        write_rotated_checkpoint(Path(model.path), w.dir / "model", cfg)
        w.register_tree("model")
        w.metadata.update({"rotation": cfg.model_dump(mode="json"), "source_model": model_ref})

    config = cfg.model_dump(mode="json")
    ref, _hit = ensure_artifact(ctx, "rotated-model", ROTATED_VERSION, config, {"model": model_ref}, produce)
    root = ctx.store.get(ref).file("model/config.json").parent
    return dataclasses.replace(model, path=root), str(ref)


def runtime_reason(model_path: Path, runtime: dict[str, Any] | None) -> str | None:
    """Why compressed-tensors cannot express this build (online rotations, A/KV quantization), or None."""
    config = json.loads((Path(model_path) / "config.json").read_text())
    if QUAROT_KEY in config:
        return "QuaRot needs online Hadamard transforms, which compressed-tensors cannot express"
    if runtime:
        return f"activation/KV fake quantization ({', '.join(sorted(runtime))}) is not a compressed-tensors scheme"
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
    t: QuaRotTransforms | None = build_transforms(model_dims(config), _quarot_config(rotation)) if rotation else None
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
