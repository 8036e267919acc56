"""Block configs for the weight-only GEMM, per shape class, and the per-GPU tuned-config cache (JSON).

Shape classes (M = rows of x):
  * GEMV-like, M <= 8: no tensor cores; BLOCK_M = next_pow2(M), broadcast-multiply-reduce; split-K so that the
    grid fills the GPU when N / BLOCK_N programs are too few.
  * GEMM, 8 < M <= 256: ``tl.dot`` with BLOCK_M in {16, 32, 64}; split-K only for very small grids.

Tuned configs are an artifact, not global state: ``TunedConfigs`` is a JSON table keyed by
(GPU name, kernel version, bucketed M, N, K, group, bits), loaded by whoever calls the launcher and passed
explicitly (``wgemm(..., tuned=table)``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = [
    "KERNEL_VERSION",
    "TunedConfigs",
    "WGemmConfig",
    "bucket_m",
    "candidate_configs",
    "default_config",
    "tune_key",
]

KERNEL_VERSION = 1  # bump when the kernel changes so stale tuned tables are ignored
GEMV_MAX_M = 8
TARGET_PROGRAMS_PER_SM = 2


@dataclass(frozen=True)
class WGemmConfig:
    """One launch configuration. ``block_k`` must be a power of two; ``split_k`` >= 1."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two, got {v}")
        if self.split_k < 1:
            raise ValueError("split_k must be >= 1")

    @property
    def use_dot(self) -> bool:
        return self.block_m >= 16


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def bucket_m(M: int) -> int:
    """M rounded up to a power of two (configs are tuned per bucket)."""
    return _next_pow2(max(1, M))


def _split_k(programs: int, K: int, block_k: int, num_sms: int) -> int:
    """Smallest power-of-two split that gives ~TARGET_PROGRAMS_PER_SM programs per SM (>= 2 K-tiles each)."""
    max_split = max(1, K // (2 * block_k))
    split = 1
    while programs * split < TARGET_PROGRAMS_PER_SM * num_sms and split * 2 <= max_split:
        split *= 2
    return split


def default_config(M: int, N: int, K: int, group_size: int, bits: int, num_sms: int = 132) -> WGemmConfig:
    """Heuristic config when no tuned entry exists."""
    bk = 128 if K >= 128 else _next_pow2(K)
    while group_size % bk and bk > 32:  # prefer BLOCK_K | g: one scale row per K-tile (else per-column gather)
        bk //= 2
    if M <= GEMV_MAX_M:
        bm, bn, warps = bucket_m(M), 64 if N >= 64 else _next_pow2(N), 4
    else:
        bm = 16 if M <= 16 else (32 if M <= 32 else 64)
        bn, warps = (64 if N >= 64 else max(16, _next_pow2(N))), 4
        bk = max(bk, 32)
    programs = -(-M // bm) * -(-N // bn)
    return WGemmConfig(bm, bn, bk, _split_k(programs, K, bk, num_sms), num_warps=warps, num_stages=2)


def candidate_configs(M: int, N: int, K: int, group_size: int, bits: int, num_sms: int = 132) -> list[WGemmConfig]:
    """A handful of configs to time per shape class (used by ``kernels.wgemm.launch.tune``)."""
    base = default_config(M, N, K, group_size, bits, num_sms)
    out = {base}
    bms = [bucket_m(M)] if M <= GEMV_MAX_M else [16, 32, 64]
    for bm in bms:
        if bm > max(16, bucket_m(M)):
            continue
        for bn, bk in ((32, 128), (64, 64), (64, 128), (128, 64), (128, 128)):
            programs = -(-M // bm) * -(-N // bn)
            for split in {1, _split_k(programs, K, bk, num_sms)}:
                out.add(WGemmConfig(bm, bn, bk, split, num_warps=4 if bn <= 64 else 8, num_stages=2))
    return sorted(out, key=lambda c: (c.block_m, c.block_n, c.block_k, c.split_k))


def tune_key(gpu: str, M: int, N: int, K: int, group_size: int, bits: int) -> str:
    return f"{gpu}|v{KERNEL_VERSION}|M{bucket_m(M)}|N{N}|K{K}|g{group_size}|b{bits}"


@dataclass
class TunedConfigs:
    """Per-GPU table of tuned configs, persisted as JSON: {tune_key: WGemmConfig fields}."""

    table: dict[str, WGemmConfig]

    @classmethod
    def load(cls, path: str | Path) -> TunedConfigs:
        raw = json.loads(Path(path).read_text())
        return cls({k: WGemmConfig(**v) for k, v in raw.get("configs", {}).items()})

    def save(self, path: str | Path) -> None:
        payload = {"kernel_version": KERNEL_VERSION, "configs": {k: asdict(v) for k, v in self.table.items()}}
        Path(path).write_text(json.dumps(payload, indent=1, sort_keys=True))

    def get(self, gpu: str, M: int, N: int, K: int, group_size: int, bits: int) -> WGemmConfig | None:
        return self.table.get(tune_key(gpu, M, N, K, group_size, bits))
