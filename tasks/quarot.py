"""QuaRot glue between the math (:mod:`quant.quarot`) and Hugging Face models / the artifact store.

* :func:`prepare_model`: the derived fp checkpoint with folded norms and offline rotations, a ``rotated-model``
  artifact keyed by (model, rotation config). The hessians, quantize and pack stages then run on it unchanged: their
  input key is the rotated model's, so they never collide with the unrotated recipe's artifacts. It is written one
  decoder block per safetensors shard, so memory stays at one block (plus the embedding).
* :func:`install_runtime` (defined in :mod:`tasks.quarot_runtime`, re-exported here): what a model built from a
  rotated checkpoint needs at inference besides its weights.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from infra.errors import ConfigError
from quant.arch import mapping_for
from quant.quarot import QuaRotConfig, build_transforms, check_sizes, rotate_block, rotate_embedding, rotate_lm_head
from tasks.models import copy_tokenizer
from tasks.quarot_runtime import ATTENTION_NAME, QUAROT_KEY, install_runtime, model_dims, quarot_config
from tasks.recipe import Recipe, RotationConfig
from tasks.weights import WeightIndex

__all__ = [
    "ATTENTION_NAME",
    "QUAROT_KEY",
    "ROTATED_VERSION",
    "check_recipe_for_model",
    "install_runtime",
    "model_dims",
    "prepare_model",
    "write_rotated_checkpoint",
]

ROTATED_VERSION = 1


def _quarot_config(cfg: RotationConfig) -> QuaRotConfig:
    return quarot_config(cfg.model_dump(mode="json"))


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

    config = json.loads((src / "config.json").read_text())
    mapping = mapping_for(config.get("architectures") or [])
    t = build_transforms(model_dims(config), _quarot_config(cfg))
    index = WeightIndex(src)
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
