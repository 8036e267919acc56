"""Serving exports written by the pack stage next to ``native/``: every format the build can be written in exactly.

Each format has a one-line ``reason`` (None: representable), a ``write`` into its own directory of the pack
artifact, and, where an independent decoder is installed, a ``verify`` that decodes the written files with it
(compressed-tensors' ``ModelCompressor``, the ``gguf`` package) and compares bit for bit with the quantized
weights. A build that fails verification is recorded as skipped with what differed; nothing unverified ships.

==================== ============================================ ===========================================
format               engines                                      what maps
==================== ============================================ ===========================================
compressed-tensors   vLLM, SGLang, transformers                   4/8-bit groups or channels, sym and asym
gptq                 vLLM (gptq/Marlin), GPTQModel, AutoGPTQ,     2/3/4/8-bit groups or channels, sym (v1) and
                     transformers + optimum                       asym (gptq_v2), act-order (desc_act)
gguf                 llama.cpp, transformers (gguf_file=)         W4 g32 asym/sym, W8 g32 sym (Q4_1/Q4_0/Q8_0)
==================== ============================================ ===========================================
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.export.common import ExportInputs

__all__ = ["EXPORTS", "ExportFormat", "ExportInputs", "write_exports"]


@dataclass(frozen=True)
class ExportFormat:
    name: str  # directory in the pack artifact, entry of the manifest's ``formats``
    flag: str  # PackConfig field that enables it; also the prefix of ``<flag>_skipped`` in the manifest
    reason: Callable[[ExportInputs], str | None]
    write: Callable[[Path, ExportInputs], dict[str, Any]]
    verify: Callable[[Path, ExportInputs], str | None] | None = None


def _ct_reason(inputs: ExportInputs) -> str | None:
    from tasks.export.compressed_tensors import compressed_tensors_reason

    return compressed_tensors_reason(inputs)


def _ct_write(out: Path, inputs: ExportInputs) -> dict[str, Any]:
    from tasks.export.compressed_tensors import write_compressed_tensors

    return write_compressed_tensors(out, inputs)


def _ct_verify(out: Path, inputs: ExportInputs) -> str | None:
    from tasks.export.compressed_tensors import verify_compressed_tensors

    return verify_compressed_tensors(out, inputs)


def _gptq_reason(inputs: ExportInputs) -> str | None:
    from tasks.export.gptq import gptq_reason

    return gptq_reason(inputs)


def _gptq_write(out: Path, inputs: ExportInputs) -> dict[str, Any]:
    from tasks.export.gptq import write_gptq

    return write_gptq(out, inputs)


def _gguf_reason(inputs: ExportInputs) -> str | None:
    from tasks.export.gguf import gguf_reason

    return gguf_reason(inputs)


def _gguf_write(out: Path, inputs: ExportInputs) -> dict[str, Any]:
    from tasks.export.gguf import write_gguf

    return write_gguf(out, inputs)


def _gguf_verify(out: Path, inputs: ExportInputs) -> str | None:
    from tasks.export.gguf import verify_gguf

    files = sorted(out.glob("*.gguf"))
    if len(files) != 1:
        return f"expected one .gguf file, found {len(files)}"
    return verify_gguf(files[0], inputs)


EXPORTS: tuple[ExportFormat, ...] = (
    ExportFormat("compressed-tensors", "compressed_tensors", _ct_reason, _ct_write, _ct_verify),
    ExportFormat("gptq", "gptq", _gptq_reason, _gptq_write),
    ExportFormat("gguf", "gguf", _gguf_reason, _gguf_write, _gguf_verify),
)


def write_exports(root: Path, inputs: ExportInputs, enabled: Callable[[str], bool]) -> dict[str, Any]:
    """Write every enabled, representable format under ``root/<name>``; returns manifest metadata:
    ``formats`` (the names written), ``exports`` ({name: what the writer reported}) and ``<flag>_skipped``
    (the one-line reason) for each format not written."""
    from tasks.moe import moe_export_reason  # MoE builds: refused in one line per format

    meta: dict[str, Any] = {"formats": [], "exports": {}}
    for fmt in EXPORTS:
        reason = (
            (moe_export_reason(inputs.model_path, fmt.name) or fmt.reason(inputs))
            if enabled(fmt.flag)
            else "disabled in recipe"
        )
        if reason is None:
            out = root / fmt.name
            info = fmt.write(out, inputs)
            reason = fmt.verify(out, inputs) if fmt.verify is not None else None
            if reason is None:
                meta["formats"].append(fmt.name)
                meta["exports"][fmt.name] = info
                continue
            shutil.rmtree(out)  # written but not reproduced by its own decoder: never ship it
        meta[f"{fmt.flag}_skipped"] = reason
    return meta
