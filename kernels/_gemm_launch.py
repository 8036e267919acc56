"""Launch plumbing shared by the weight-only GEMM launchers (``kernels.wgemm``, ``kernels.bcq``, ``kernels.icq``).

The kernels walk K the same way (same ``WGemmConfig`` block shapes, same heuristic, same split-K scheme, the
device helpers of ``kernels._triton_tiles``), so the layout checks they share, the config choice, the split-K
plan, the output buffer, the common launch meta-parameters and the final reduction live here once:
split == 1 writes y in x's dtype with the bias fused; split > 1 writes fp32 partials [split, M, N] that
``finish`` sums deterministically (bias added once, in fp32) before the single rounding to x's dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from kernels._triton_util import device_sm_count, is_interpreted
from kernels.packing import codes_per_word, packed_rows
from kernels.wgemm.configs import TunedConfigs, WGemmConfig, default_config

__all__ = [
    "SUPPORTED_DTYPES",
    "GemmPlan",
    "cdiv",
    "check_bias",
    "check_qweight",
    "check_x",
    "device_reason",
    "finish",
    "gpu_name",
    "plan_gemm",
]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def gpu_name(device: torch.device) -> str:
    """The tuned-config table's device key: the CUDA device name, or "interpreter"."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "interpreter"


def check_x(x: Tensor, K: int) -> None:
    if x.shape[-1] != K:
        raise ValueError(f"x last dim {x.shape[-1]} != in_features {K}")


def check_qweight(qweight: Tensor, K: int, bits: int) -> int:
    """N of an INT32_KPACKED ``qweight`` int32 [ceil(K/P), N] (``kernels.packing``); ValueError otherwise."""
    if qweight.dtype != torch.int32 or qweight.dim() != 2 or qweight.shape[0] != packed_rows(K, bits):
        raise ValueError(
            f"qweight must be int32 [ceil(K/{codes_per_word(bits)})={packed_rows(K, bits)}, N], "
            f"got {qweight.dtype} {tuple(qweight.shape)}"
        )
    return int(qweight.shape[1])


def device_reason(tensors: Sequence[Tensor], kernel: Callable[[], object], module: str) -> str | None:
    """None if the tensors share one device the kernel runs on (CUDA, or any device when ``module`` — the
    ``kernels.<family>.triton`` that ``kernel()`` imports — was imported under TRITON_INTERPRET=1), else why not."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        return f"tensors on several devices {sorted(map(str, devices))}"
    dev = next(iter(devices))
    if dev.type != "cuda" and not is_interpreted(kernel()):
        return f"device {dev.type} (needs CUDA, or TRITON_INTERPRET=1 when {module} is imported)"
    return None


def check_bias(bias: Tensor | None, N: int) -> None:
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias must be [{N}], got {tuple(bias.shape)}")


@dataclass(frozen=True)
class GemmPlan:
    """One launch: x as [M, K], the config, the K range per split, the output buffer and its strides."""

    x2: Tensor
    M: int
    N: int
    cfg: WGemmConfig
    k_per_split: int
    split: int
    out: Tensor
    fuse_bias: bool

    @property
    def grid(self) -> tuple[int, int, int]:
        return (cdiv(self.M, self.cfg.block_m), cdiv(self.N, self.cfg.block_n), self.split)

    def io_args(self, bias: Tensor | None, dummy: Tensor, *sizes: int) -> tuple[object, ...]:
        """The positional kernel arguments every GEMM kernel takes after its weight pointers, in its order: the bias
        pointer (``dummy`` when the bias is not fused), the output, M, N, ``sizes`` (K, and the group size where the
        kernel has one), the K range per split and x's strides."""
        fused = bias if self.fuse_bias and bias is not None else dummy
        return (fused, self.out, self.M, self.N, *sizes, self.k_per_split, self.x2.stride(0), self.x2.stride(1))

    @property
    def out_strides(self) -> tuple[int, int, int]:
        """(split, m, n) strides of ``out``; split stride 0 when there is a single slice."""
        o = self.out
        return (o.stride(0), o.stride(1), o.stride(2)) if self.split > 1 else (0, o.stride(0), o.stride(1))

    def launch_meta(self, kernel: object) -> dict[str, object]:
        """The meta-parameters every GEMM kernel takes alike: bias fusion, product mode, block shape, warps."""
        cfg, dtype = self.cfg, self.x2.dtype
        return {
            "HAS_BIAS": self.fuse_bias,
            "USE_DOT": cfg.use_dot,
            "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
            "DOT_FP32": dtype == torch.bfloat16 and is_interpreted(kernel),
            "BLOCK_M": cfg.block_m,
            "BLOCK_N": cfg.block_n,
            "BLOCK_K": cfg.block_k,
            "num_warps": cfg.num_warps,
            "num_stages": cfg.num_stages,
        }


def plan_gemm(
    x: Tensor,
    N: int,
    K: int,
    group_size: int,
    bits: int,
    has_bias: bool,
    config: WGemmConfig | None,
    tuned: TunedConfigs | None = None,
) -> GemmPlan:
    """Config (explicit > ``tuned`` entry for this GPU/shape > ``default_config``), split-K plan and output buffer
    for y = x @ Ŵᵀ."""
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    cfg = config
    if cfg is None and tuned is not None:
        cfg = tuned.get(gpu_name(x.device), max(M, 1), N, K, group_size, bits)
    if cfg is None:
        cfg = default_config(max(M, 1), N, K, group_size, bits, device_sm_count(x.device))
    bk = cfg.block_k
    k_per_split = cdiv(cdiv(K, cfg.split_k), bk) * bk  # K range of one split, a multiple of BLOCK_K
    split = cdiv(K, k_per_split)
    if split == 1:
        out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    else:
        out = torch.empty(split, M, N, device=x.device, dtype=torch.float32)
    return GemmPlan(x2, M, N, cfg, k_per_split, split, out, has_bias and split == 1)


def finish(plan: GemmPlan, x: Tensor, bias: Tensor | None) -> Tensor:
    """y [..., N] in x's dtype: reduce split-K partials (and add the bias) when the kernel did not."""
    out = plan.out
    if plan.split > 1:
        y = out.sum(0)
        if bias is not None:
            y = y + bias.to(torch.float32)
        out = y.to(x.dtype)
    return out.view(*x.shape[:-1], plan.N)
