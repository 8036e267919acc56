"""Roofline arithmetic for weight-only low-bit matmuls (BENCHMARKS.md "Speed", ALGORITHMS.md §9).

A memory-bound y = x Ŵᵀ with x [M, K] fp16 and Ŵ [N, K] packed at ``bits`` with group size g moves at least

    bytes = N·K·bits/8  +  (N·K/g)·4  +  M·K·2  +  M·N·2        (fp16 scale + fp16 zero per group)

(for fp16 weights, bits = 16 and no per-group metadata), so its time is at least bytes / bandwidth. The
"fraction of the limit" of a measured time t is roofline / t (1.0 = at the bandwidth limit). The bandwidth is the
larger of the measured copy and read bandwidths, as in ``shared/bench/roofline_peer.py``, so our numbers compare
with the peer numbers measured by that script.
"""

from __future__ import annotations

__all__ = ["LLAMA_SHAPES", "frac_of_limit", "roofline_bytes", "roofline_us", "speedup"]

# (in_features K, out_features N) of Llama-2-7B, Llama-3-8B and 70B-class linears (BENCHMARKS.md table)
LLAMA_SHAPES: tuple[tuple[int, int], ...] = (
    (4096, 4096),
    (4096, 11008),
    (11008, 4096),
    (4096, 14336),
    (14336, 4096),
    (8192, 8192),
    (8192, 28672),
    (28672, 8192),
)


def roofline_bytes(K: int, N: int, M: int, bits: int, group_size: int = 128) -> float:
    """Minimum bytes moved: packed weight + fp16 scale/zero per group (none for bits=16) + fp16 x and y."""
    if bits <= 0 or K <= 0 or N <= 0 or M < 0:
        raise ValueError(f"bad shape/bits K={K} N={N} M={M} bits={bits}")
    weight = N * K * bits / 8
    meta = 0.0 if bits >= 16 else (N * K / (K if group_size <= 0 else group_size)) * 2 * 2
    io = M * K * 2 + M * N * 2
    return weight + meta + io


def roofline_us(K: int, N: int, M: int, bits: int, bandwidth_Bps: float, group_size: int = 128) -> float:
    """Lower bound on the time in µs: bytes / bandwidth (bandwidth in bytes per second)."""
    if bandwidth_Bps <= 0:
        raise ValueError("bandwidth must be positive")
    return roofline_bytes(K, N, M, bits, group_size) / bandwidth_Bps * 1e6


def frac_of_limit(roofline: float, measured: float) -> float:
    """roofline / measured time (same unit): 1.0 means the kernel runs at the bandwidth limit."""
    if measured <= 0:
        raise ValueError("measured time must be positive")
    return roofline / measured


def speedup(baseline: float, measured: float) -> float:
    """baseline time / measured time (> 1: faster than the baseline)."""
    if measured <= 0:
        raise ValueError("measured time must be positive")
    return baseline / measured
