"""Launch configs for the FWHT kernel: rows per program and warps, by transform size n = 2^k."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MAX_TRITON_SIZE", "HadamardConfig", "hadamard_config"]

MAX_TRITON_SIZE = 1 << 15  # one program holds a whole row in registers; beyond this use the reference


@dataclass(frozen=True)
class HadamardConfig:
    block_rows: int  # rows per program (power of two)
    num_warps: int


def hadamard_config(n: int) -> HadamardConfig:
    """~4096 elements per program for small n; one row and up to 16 warps for large n."""
    block_rows = max(1, min(64, 4096 // max(n, 1)))
    num_warps = max(1, min(16, (n * block_rows) // 512))
    num_warps = 1 << (num_warps.bit_length() - 1)  # power of two
    return HadamardConfig(block_rows, num_warps)
