"""Architecture knowledge as data: one mapping per model family (STYLE.md item 6).

The layer driver, the Hessian collector and the rotation code read these mappings; no library code branches on
a model type. Adding a Llama-like family means adding a mapping, not an ``if``.
"""

from __future__ import annotations

from quant.arch.mapping import (
    GEMMA_FAMILY,
    LLAMA_FAMILY,
    PHI3_FAMILY,
    QWEN3_FAMILY,
    ArchMapping,
    LinearGroup,
    mapping_for,
    supported_architectures,
)

__all__ = [
    "GEMMA_FAMILY",
    "LLAMA_FAMILY",
    "PHI3_FAMILY",
    "QWEN3_FAMILY",
    "ArchMapping",
    "LinearGroup",
    "mapping_for",
    "supported_architectures",
]
