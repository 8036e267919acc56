"""GPTQ checkpoint export (``quant_method: gptq``): what AutoGPTQ / GPTQModel write and vLLM's gptq kernels load.

Tensor layout and the zero-point convention: :mod:`kernels.formats.gptq` (symmetric grids in v1 ``gptq``,
asymmetric ones in ``gptq_v2``, i.e. zeros stored as they are). The directory holds the base ``config.json``
with a ``quantization_config`` block (also written as ``quantize_config.json`` for AutoGPTQ-era readers),
``model.safetensors`` (per quantized linear ``<name>.qweight/.qzeros/.scales/.g_idx``, every other tensor of the
base checkpoint unchanged) and the tokenizer. ``dtype`` is float16, the activation dtype GPTQ kernels run; the
codes and fp16 scales are exact either way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kernels.formats.gptq import checkpoint_format, gptq_layer_reason, pack_gptq_linear
from tasks.checkpoint import copy_tokenizer
from tasks.export.common import ExportInputs, affine_reason, decoder_linear_names, source_tensors

__all__ = ["FORMAT", "gptq_reason", "write_gptq"]

FORMAT = "gptq"


def gptq_reason(inputs: ExportInputs) -> str | None:
    """None when every layer fits a GPTQ checkpoint exactly, else why not (one line)."""
    reason = affine_reason(inputs, "GPTQ")
    if reason is not None:
        return reason
    fmt = checkpoint_format(inputs.cfg.sym)
    qweights = inputs.affine() if fmt == "gptq" else inputs.affine_shapes()  # v1 checks zero-point values
    left = [n for n in decoder_linear_names(inputs.model_path) if n not in qweights]
    if left:
        return f"GPTQ loaders expect every linear of the decoder blocks quantized; {left[0]} is not"
    for name, q in qweights.items():
        reason = gptq_layer_reason(name, q.out_features, q.in_features, q.bits, q.group_size, q.zeros, fmt)
        if reason is not None:
            return reason
    return None


def gptq_quantization_config(inputs: ExportInputs) -> dict[str, Any]:
    cfg, qweights = inputs.cfg, inputs.affine_shapes()
    return {
        "quant_method": "gptq",
        "checkpoint_format": checkpoint_format(cfg.sym),
        "bits": cfg.bits,
        "group_size": cfg.group_size if cfg.group_size > 0 else -1,
        "desc_act": any(q.g_idx is not None for q in qweights.values()),
        "sym": cfg.sym,
        "static_groups": cfg.static_groups,
        "true_sequential": cfg.mode == "sequential",
        "damp_percent": cfg.damp,
        "lm_head": False,
        "pack_dtype": "int32",
        "meta": {"quantizer": ["quantpipe"], "method": cfg.effective_method()},
    }


def write_gptq(out: Path, inputs: ExportInputs) -> dict[str, Any]:
    """Write the checkpoint dir ``out``; returns what the pack manifest records about it."""
    from infra.safetensors_io import ShardedWriter

    qweights = inputs.affine()
    qconfig = gptq_quantization_config(inputs)
    out.mkdir(parents=True)
    writer = ShardedWriter(out, metadata={"format": "pt"})  # one layer and one shard in memory at a time
    for name, t in source_tensors(inputs.model_path, skip=set(qweights)):
        writer.add(name, t)
    for name, q in qweights.items():
        packed = pack_gptq_linear(
            q.codes, q.scales, q.zeros, q.g_idx, q.bits, q.group_size, qconfig["checkpoint_format"]
        )
        for suffix, t in packed.items():
            writer.add(f"{name}.{suffix}", t)
    writer.close()
    config = inputs.config
    config["quantization_config"] = qconfig
    config["dtype"] = config["torch_dtype"] = "float16"
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    (out / "quantize_config.json").write_text(json.dumps(qconfig, indent=2, sort_keys=True))
    copy_tokenizer(inputs.model_path, out)
    return {"checkpoint_format": qconfig["checkpoint_format"], "desc_act": qconfig["desc_act"]}
