"""compressed-tensors ``pack-quantized`` export (what llm-compressor writes and vLLM serves), symmetric and asymmetric.

Written with compressed-tensors' own per-module compressor from our fake-quantized weights and grids, so the
packed codes, scales and zero points are the library's encoding of exactly our numbers:

* ``weight_packed`` int32 [N, K·b/32] (codes − 2^(b−1), offset back on packing), ``weight_scale`` [N, G] (our
  fp16-exact scales in the model dtype), ``weight_shape``; asymmetric grids add ``weight_zero_point`` int32
  [N·b/32, G]: the zero points packed along the *output* dim (the layout vLLM's ``CompressedTensorsWNA16``
  registers for ``symmetric: false``).
* Our codes are 0..2^b−1 with zero z; theirs are signed −2^(b−1)..2^(b−1)−1 with zero z − 2^(b−1): the same
  affine map shifted by 2^(b−1) on both sides, so ŵ = s·(q − z) is unchanged.

Asymmetric checkpoints carry ``"dequantize": true`` in their ``quantization_config``. Upstream bug
(compressed-tensors 0.20.0, transformers 5.24): ``from_pretrained`` builds the model on the meta device and calls
``ModelCompressor.compress_model`` to lay out the compressed parameters; the meta branch of
``PackedQuantizationCompressor.compress`` replaces ``weight`` by a meta ``weight_packed`` but leaves
``weight_zero_point`` at its unpacked [N, G] int8 shape, while the real-tensor branch (what saving ran) packs it to
[N·b/32, G] int32. The checkpoint's packed zero points then mismatch the skeleton and transformers refuses the load
(``ignore_mismatched_sizes=True``: re-initialises them, silently changing the weights). With ``dequantize`` set,
transformers keeps the model dense and decompresses each module's checkpoint tensors with the same compressor's
``decompress`` (which unpacks the zero point), so plain ``from_pretrained`` loads exactly; vLLM and
compressed-tensors' own config parsing ignore the key. Reproduction: README ("compressed-tensors export").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tasks.checkpoint import copy_tokenizer
from tasks.export.common import ExportInputs, affine_reason

__all__ = ["FORMAT", "compressed_tensors_reason", "verify_compressed_tensors", "write_compressed_tensors"]

FORMAT = "compressed-tensors"


def compressed_tensors_reason(inputs: ExportInputs) -> str | None:
    """None when representable in compressed-tensors pack-quantized (4/8-bit integer groups that divide every
    layer, static groups), else why not."""
    reason = affine_reason(inputs, FORMAT)
    if reason is not None:
        return reason
    cfg = inputs.cfg
    if cfg.bits not in (4, 8):
        return f"compressed-tensors pack-quantized supports 4/8-bit integers, not {cfg.bits}-bit"
    for name, q in inputs.affine_shapes().items():
        if q.g_idx is not None:
            return f"{name} uses act-order without static groups (g_idx)"
        if q.in_features % q.group_size:
            return f"{name}: group {q.group_size} does not divide {q.in_features} columns (ragged last group)"
    return None


def _weight_args(cfg: Any) -> Any:
    from compressed_tensors.quantization import QuantizationArgs

    if cfg.group_size <= 0:  # one grid per output channel: each layer's "group" is its own width
        return QuantizationArgs(num_bits=cfg.bits, type="int", symmetric=cfg.sym, strategy="channel")
    return QuantizationArgs(
        num_bits=cfg.bits, type="int", symmetric=cfg.sym, strategy="group", group_size=cfg.group_size
    )


def _linear_names(model_path: Path) -> list[str]:
    """Every ``nn.Linear`` of the architecture (a meta-device skeleton: no weights read or allocated)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tasks.models import model_construction

    with model_construction(), torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def write_compressed_tensors(out: Path, inputs: ExportInputs) -> dict[str, Any]:
    """Write the checkpoint dir ``out``; returns what the pack manifest records about it.

    Each quantized linear goes through compressed-tensors' own ``PackedQuantizationCompressor.compress`` (what
    ``ModelCompressor.compress_model`` runs per module) from our fake-quantized weight and grid; the config is the
    library's ``QuantizationConfig`` written by ``ModelCompressor.update_config``. Every other tensor of the base
    checkpoint is copied unchanged (no model is instantiated).
    """
    from compressed_tensors.compressors import BaseCompressor, ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    from infra.safetensors_io import ShardedWriter
    from tasks.export.common import source_tensors

    cfg, qweights = inputs.cfg, inputs.affine()
    fmt = "pack-quantized"
    scheme = QuantizationScheme(targets=["Linear"], weights=_weight_args(cfg), format=fmt)
    qcfg = QuantizationConfig(  # llm-compressor's shape: every Linear, minus the ones left in full precision
        config_groups={"group_0": scheme},
        ignore=sorted(n for n in _linear_names(inputs.model_path) if n not in qweights),
        format=fmt,
        quantization_status="compressed",
    )
    compressor = BaseCompressor.get_value_from_registry(fmt)
    out.mkdir(parents=True)
    writer = ShardedWriter(out, metadata={"format": "pt"})  # one layer and one shard in memory at a time
    for name, t in source_tensors(inputs.model_path, skip=set(qweights)):
        writer.add(name, t)
    half = 1 << (cfg.bits - 1)
    for name, q in qweights.items():
        state = {"weight": q.dequantize(), "weight_scale": q.scales.clone()}
        if not cfg.sym:  # theirs = ours − 2^(b−1) (module docstring)
            state["weight_zero_point"] = (q.zeros - half).to(torch.int8)
        for suffix, t in compressor.compress(state, scheme).items():
            writer.add(f"{name}.{suffix}", t)
    writer.close()
    (out / "config.json").write_text(json.dumps(inputs.config, indent=2, sort_keys=True))
    ModelCompressor(quantization_config=qcfg).update_config(str(out))
    if not cfg.sym:  # packed zero points: see the module docstring (upstream meta-device bug)
        config = json.loads((out / "config.json").read_text())
        config["quantization_config"]["dequantize"] = True
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    copy_tokenizer(inputs.model_path, out)
    return {"scheme": f"W{cfg.bits}A16{'' if cfg.sym else '_ASYM'}", "zero_points_packed": not cfg.sym}


def decompressed_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every quantized linear's weight as compressed-tensors' own ``ModelCompressor.decompress_model`` rebuilds it
    from the files in ``path`` (a real-device skeleton, so the compressed layout is the one saving produced)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from tasks.models import model_construction

    config = json.loads((path / "config.json").read_text())
    qcfg = QuantizationConfig.model_validate(config["quantization_config"])
    hf_config = AutoConfig.from_pretrained(path)
    with model_construction():
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    apply_quantization_config(model, qcfg)
    compressor = ModelCompressor(quantization_config=qcfg)
    compressor.compress_model(model)
    state: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if "rotary_emb" not in m and m != "lm_head.weight"]:
        raise RuntimeError(f"compressed-tensors layout mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    compressor.decompress_model(model)
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if hasattr(m, "quantization_scheme")}


def verify_compressed_tensors(path: Path, inputs: ExportInputs) -> str | None:
    """None when compressed-tensors' own decompressor (the ``decompress`` that ``decompress_model`` and
    transformers' loader run per module) rebuilds our dequantized weights bit for bit from the files in ``path``."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors import safe_open

    qcfg = QuantizationConfig.model_validate(json.loads((path / "config.json").read_text())["quantization_config"])
    scheme = qcfg.config_groups["group_0"]
    compressor = BaseCompressor.get_value_from_registry(qcfg.format)
    handles = [safe_open(str(f), framework="pt") for f in sorted(path.glob("*.safetensors"))]
    keys = {k: h for h in handles for k in h.keys()}  # noqa: SIM118
    for name, q in inputs.affine().items():
        state = {k.removeprefix(f"{name}."): h.get_tensor(k) for k, h in keys.items() if k.startswith(f"{name}.")}
        got = compressor.decompress(state, scheme).get("weight") if "weight_packed" in state else None
        if got is None or not torch.equal(got, q.dequantize()):
            diff = "missing" if got is None else f"max |Δ| {(got - q.dequantize()).abs().max().item():.3g}"
            return f"compressed-tensors decompression of {name} differs from the quantized weights ({diff})"
    return None
