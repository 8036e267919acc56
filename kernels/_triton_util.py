"""Small helpers shared by the kernel launchers (no triton import at module level)."""

from __future__ import annotations

import importlib.util

import torch

__all__ = ["device_sm_count", "is_interpreted", "triton_available"]


def triton_available() -> bool:
    """True if ``import triton`` can succeed (does not import it)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # sys.modules["triton"] = None, or a broken install
        return False


def is_interpreted(kernel: object) -> bool:
    """Whether a ``@triton.jit`` object was built in interpreter mode (TRITON_INTERPRET=1 at its import)."""
    return type(kernel).__name__ == "InterpretedFunction"


def device_sm_count(device: torch.device) -> int:
    """Multiprocessor count of a CUDA device; a small stand-in for the interpreter (CPU tensors)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).multi_processor_count)
    return 4
