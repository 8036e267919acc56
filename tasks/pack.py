"""Stage ``pack``: a loadable checkpoint from the ``qlayer`` artifacts.

``native/`` is quantpipe's own format (see :mod:`tasks.checkpoint`), readable by :class:`QuantLinear` and the
kernels. ``compressed-tensors/`` is the ``pack-quantized`` export that transformers and vLLM load, written
whenever the scheme is representable there (4/8-bit integer groups that divide every layer, static groups);
otherwise the artifact records why it was skipped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from infra.errors import QuantpipeError
from infra.safetensors_io import canonicalise_file
from quant.types import QuantizedWeight
from tasks.checkpoint import QUANT_METHOD, copy_tokenizer
from tasks.qlayer import BPW_COUNTED, LayerResult, layer_bits, layer_kind, layer_shape, native_tensors, stored_bits
from tasks.quantize import layer_seed
from tasks.recipe import PackConfig, QuantizeConfig
from tasks.stage import StageContext, StageResult, run_stage

__all__ = ["STAGE_VERSION", "compressed_tensors_reason", "run_pack"]

STAGE_VERSION = 2  # 2: transform sign vectors bit-packed (1 bit per sign instead of fp32)


def _layers(ctx: StageContext, quant_ref: str) -> dict[str, str]:
    index = json.loads(ctx.store.read_bytes(quant_ref, "index.json"))
    return {name: v["ref"] for name, v in index["layers"].items()}


def compressed_tensors_reason(cfg: QuantizeConfig, qweights: dict[str, LayerResult]) -> str | None:
    """None when representable in compressed-tensors pack-quantized, else why not."""
    if cfg.icquant_base() is not None:
        return "ICQuant outlier grids and index-coded positions have no compressed-tensors representation"
    if cfg.method == "gptqt":
        return "GPTQT binary coding (bit-planes + α') has no compressed-tensors representation"
    if cfg.method == "hadamard-e8p":
        return "E8P lattice codes (16-bit codeword per 8 weights) have no compressed-tensors representation"
    if cfg.bitalloc is not None or len({q.bits for q in qweights.values()}) > 1:
        return "mixed per-layer bit-widths have no single compressed-tensors scheme"
    if not all(isinstance(q, QuantizedWeight) for q in qweights.values()):
        return "layers are not plain affine-grid weights"
    if cfg.transform_kind() is not None or any(q.transforms for q in qweights.values()):
        return f"{cfg.method} weights need the online incoherence transforms, which compressed-tensors cannot express"
    if cfg.bits not in (4, 8):
        return f"compressed-tensors pack-quantized supports 4/8-bit integers, not {cfg.bits}-bit"
    if not cfg.sym:
        # Measured: transformers 5.24 + compressed-tensors 0.20 re-initialise packed asymmetric zero points on load
        # (shape mismatch [N/8, G] vs [N, G]), silently changing the weights. Export only what loads exactly.
        return "asymmetric zero points do not load correctly in transformers/compressed-tensors (sym only)"
    for name, q in qweights.items():
        if q.g_idx is not None:
            return f"{name} uses act-order without static groups (g_idx)"
        if q.in_features % q.group_size:
            return f"{name}: group {q.group_size} does not divide {q.in_features} columns (ragged last group)"
    return None


def _write_native(
    out: Path, model_path: Path, cfg: QuantizeConfig, qweights: dict[str, LayerResult]
) -> dict[str, dict[str, float]]:
    """Write ``native/``; returns the measured bits per weight of every packed linear (``stored_bits``)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    files = sorted(model_path.glob("*.safetensors"))
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for name in h.keys():  # noqa: SIM118
                if name.removesuffix(".weight") not in qweights:
                    tensors[name] = h.get_tensor(name)
    layer_bpw: dict[str, dict[str, float]] = {}
    kind = cfg.transform_kind()
    for name, q in qweights.items():
        seed = (layer_seed(cfg, name), kind) if kind is not None else None  # transforms stored as their seed
        packed = native_tensors(q, seed)  # affine (+ transforms), ICQuant or binary-coded layout
        for suffix, t in packed.items():
            tensors[f"{name}.{suffix}"] = t.contiguous()
        out_f, in_f = layer_shape(q)
        layer_bpw[name] = {"bits": layer_bits(q), "n_weights": float(out_f * in_f), **stored_bits(packed, out_f * in_f)}
    out.mkdir(parents=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt", "quant_method": QUANT_METHOD})
    canonicalise_file(out / "model.safetensors")  # safetensors writes metadata keys in random order
    config = json.loads((model_path / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": QUANT_METHOD,
        "format": "int32-kpacked",
        "format_version": 1,
        "bits": cfg.bits,
        "group_size": cfg.group_size,
        "sym": cfg.sym,
        "method": cfg.effective_method(),
        "modules": sorted(qweights),
    }
    if cfg.icquant_base() is not None:
        config["quantization_config"]["outliers"] = cfg.outlier_config().model_dump(mode="json")
    if cfg.method == "gptqt":
        config["quantization_config"]["gptqt"] = cfg.gptqt.model_dump(mode="json")
    if cfg.method == "hadamard-e8p":  # kernels.e8p_linear layout; group_size/sym do not apply
        config["quantization_config"]["e8p"] = cfg.e8p.model_dump(mode="json")
        config["quantization_config"]["group_size"] = None
    if cfg.bitalloc is not None or len({q.bits for q in qweights.values()}) > 1:  # per-layer bits in the JSON
        config["quantization_config"]["bits"] = None
        config["quantization_config"]["layer_bits"] = {
            name: layer_bits(q) if layer_kind(q) == "mixed" else q.bits for name, q in sorted(qweights.items())
        }
        if cfg.bitalloc is not None:
            config["quantization_config"]["bitalloc"] = cfg.bitalloc.model_dump(mode="json")
    if kind is not None:  # y = Uᵀ Ŵ̃ V diag(s)⁻¹ x, from each module's transform tensors
        config["quantization_config"]["transform"] = {
            "kind": kind,
            **cfg.transform.model_dump(mode="json", exclude={"kind"}),
        }
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    copy_tokenizer(model_path, out)
    return layer_bpw


def _write_compressed_tensors(out: Path, model_path: Path, cfg: QuantizeConfig, qweights: dict[str, Any]) -> None:
    """Export via compressed-tensors' own compressor: weights = our fake-quantized values, qparams = our grids."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, use_safetensors=True)
    if cfg.group_size <= 0:  # one grid per output channel: each layer's "group" is its own width
        wargs = QuantizationArgs(num_bits=cfg.bits, type="int", symmetric=cfg.sym, strategy="channel")
    else:
        wargs = QuantizationArgs(
            num_bits=cfg.bits, type="int", symmetric=cfg.sym, strategy="group", group_size=cfg.group_size
        )
    qcfg = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=sorted(qweights), weights=wargs)},
        quantization_status="frozen",
    )
    apply_quantization_config(model, qcfg)
    half = 1 << (cfg.bits - 1)
    for name, q in qweights.items():
        m = model.get_submodule(name)
        if not hasattr(m, "weight_scale"):
            raise QuantpipeError(f"compressed-tensors did not attach qparams to {name}")
        m.weight.data.copy_(q.dequantize())
        m.weight_scale.data.copy_(q.scales.reshape(m.weight_scale.shape))
        if hasattr(m, "weight_zero_point"):
            # ours: codes 0..2^b-1 with zero z; theirs: signed codes −2^(b−1)..2^(b−1)−1 → shift both by 2^(b−1)
            m.weight_zero_point.data.copy_(
                (q.zeros - half).reshape(m.weight_zero_point.shape).to(m.weight_zero_point.dtype)
            )
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(out)
    copy_tokenizer(model_path, out)


def run_pack(
    ctx: StageContext,
    model_path: Path,
    model_ref: str,
    quant_ref: str,
    qcfg: QuantizeConfig,
    cfg: PackConfig,
    *,
    runtime: dict[str, Any] | None = None,
) -> StageResult:
    """``runtime``: A/KV fake quantization the packed model applies (``Recipe.runtime_config``); keyed when set."""
    from tasks.quantize import load_qlayer
    from tasks.quarot import runtime_reason

    config = {
        **cfg.model_dump(mode="json"),
        "bits": qcfg.bits,
        "sym": qcfg.sym,
        "group_size": qcfg.group_size,
        "method": qcfg.effective_method(),
    }

    if runtime:
        config["runtime"] = runtime
    if qcfg.transform_kind() is not None:  # permutations/factors stored as the layer seed (older packs: explicit)
        config["transform_storage"] = "seed"

    def produce(w: Any, run: Any) -> None:
        qweights = {name: load_qlayer(ctx, ref) for name, ref in _layers(ctx, quant_ref).items()}
        layer_bpw = _write_native(w.dir / "native", model_path, qcfg, qweights)
        if runtime:  # read by load_packed_model → tasks.quarot.install_runtime
            native_config = json.loads((w.dir / "native" / "config.json").read_text())
            native_config["quantization_config"]["runtime"] = runtime
            (w.dir / "native" / "config.json").write_text(json.dumps(native_config, indent=2, sort_keys=True))
        w.register_tree("native")
        w.add_bytes("layer_bits.json", json.dumps(layer_bpw, indent=1, sort_keys=True).encode())
        n_weights = sum(v["n_weights"] for v in layer_bpw.values())
        meta: dict[str, Any] = {
            "quantized_params": int(n_weights),
            "bits_per_weight_codes": sum(v["bits"] * v["n_weights"] for v in layer_bpw.values()) / max(n_weights, 1),
            "formats": ["native"],
        }
        for part in (
            "total",
            "codes",
            "positions",
            "offsets",
            "grids",
            "other",
            "position_overhead",
        ):  # weighted by layer size = Σ bits / Σ weights
            overall = sum(v[f"bpw_{part}"] * v["n_weights"] for v in layer_bpw.values()) / max(n_weights, 1)
            meta["bits_per_weight_stored" if part == "total" else f"bits_per_weight_stored_{part}"] = overall
        meta["layer_bits_counted"] = {f"bpw_{k}": v for k, v in BPW_COUNTED.items()}  # what layer_bits.json sums
        reason = compressed_tensors_reason(qcfg, qweights) if cfg.compressed_tensors else "disabled in recipe"
        reason = reason or runtime_reason(model_path, runtime)
        if reason is None:
            _write_compressed_tensors(w.dir / "compressed-tensors", model_path, qcfg, qweights)
            w.register_tree("compressed-tensors")
            meta["formats"].append("compressed-tensors")
        else:
            meta["compressed_tensors_skipped"] = reason
        w.metadata.update(meta)
        if run is not None:
            run.log_metrics({k: float(v) for k, v in meta.items() if isinstance(v, int | float)})

    def after(ref: Any, run: Any, hit: bool) -> dict[str, Any]:
        meta = ctx.store.manifest(ref).metadata
        return {k: meta[k] for k in ("bits_per_weight_stored", "formats") if k in meta}

    return run_stage(
        ctx, "pack", STAGE_VERSION, config, {"model": model_ref, "quantize": quant_ref}, produce, after=after
    )
