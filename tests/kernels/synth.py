"""Synthetic quantizer outputs (the contract ``kernels`` consumes) and helpers shared by the kernel tests."""

from __future__ import annotations

import importlib
import subprocess
import sys
from typing import Any, NamedTuple

import pytest
import torch
from torch import Tensor

from kernels._triton_util import is_interpreted
from kernels.wgemm.configs import WGemmConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# max |kernel - ref| / max |ref| for the weight-only GEMMs (wgemm, bcq, icq): both sides round to the activation
# dtype's mantissa, and the interpreter's fp32->bf16 cast truncates where the reference rounds.
GEMM_TOL = {"fp32": 1e-5, "fp16": 1e-2, "bf16": 3e-2}
# explicit configs the coded GEMMs (bcq, icq) are checked with: split-K (ragged too), tl.dot, BLOCK_K = 16
SPLIT_CONFIGS = {
    "gemv-split4": WGemmConfig(1, 32, 32, split_k=4),
    "gemv-split3-ragged": WGemmConfig(2, 16, 32, split_k=3),
    "dot-split2": WGemmConfig(16, 32, 32, split_k=2),
    "dot-bk16": WGemmConfig(16, 16, 16),
}


def kernel_test_module(module: str, kernel: str) -> tuple[Any, Any]:
    """(pytestmark, autouse fixture) of a Triton kernel test module: the module is skipped without triton, each
    test when ``module.kernel`` cannot run here (``skip_unless_runnable``). Assign both at module level:
    ``pytestmark, _runnable = kernel_test_module("kernels.bcq.triton", "bcq_gemm_kernel")``."""
    from kernels._triton_util import triton_available

    mark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

    @pytest.fixture(autouse=True)
    def runnable() -> None:
        skip_unless_runnable(module, kernel)

    return mark, runnable


def skip_unless_runnable(module: str, kernel: str) -> None:
    """Skip on CPU when ``module`` (a ``kernels.<family>.triton``) was imported without TRITON_INTERPRET=1."""
    if DEVICE == "cpu" and not is_interpreted(getattr(importlib.import_module(module), kernel)):
        pytest.skip(f"no CUDA and {module} was imported without TRITON_INTERPRET=1")


def rel_err(y: Tensor, ref: Tensor) -> float:
    """max |y - ref| / max |ref| in fp32."""
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)).item()


def assert_matches_ref(y: Tensor, ref: Tensor, x: Tensor, dt: str) -> None:
    """Kernel output y has x's dtype, the reference's shape, and is within ``GEMM_TOL[dt]`` of it."""
    assert y.dtype == x.dtype and y.shape == ref.shape
    err = rel_err(y, ref)
    assert err <= GEMM_TOL[dt], f"max rel err {err:.2e} > {GEMM_TOL[dt]}"


def gemm_inputs(M: int, K: int, N: int, dt: str, bias: bool) -> tuple[Tensor, Tensor | None]:
    """x [M, K] in dtype ``dt`` and an optional fp32 bias [N], on DEVICE, from a fixed seed."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(M, K, generator=gen).to(DEVICE, DTYPES[dt])
    b = torch.randn(N, generator=gen).to(DEVICE) if bias else None
    return x, b


def run_without_triton(code: str) -> None:
    """Run ``code`` in a fresh interpreter (``sys`` imported) in which ``import triton`` fails; assert it exits 0."""
    code = "import sys; sys.modules['triton'] = None\n" + code
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


class Quantized(NamedTuple):
    codes: Tensor  # uint8 [N, K]
    scales: Tensor  # fp32 [N, G] (not fp16-representable on purpose)
    zeros: Tensor  # fp32 [N, G], integer-valued
    g_idx: Tensor | None  # int32 [K]
    bits: int
    group_size: int


def make_quantized(
    N: int, K: int, bits: int, group_size: int, *, act_order: bool = False, sym: bool = False, seed: int = 0
) -> Quantized:
    """Random codes/scales/zeros; ``act_order`` gives a permuted g_idx (each group still has g columns)."""
    gen = torch.Generator().manual_seed(seed)
    g = K if group_size <= 0 else group_size
    G = -(-K // g)
    qmax = (1 << bits) - 1
    codes = torch.randint(0, qmax + 1, (N, K), generator=gen, dtype=torch.int64).to(torch.uint8)
    scales = (torch.rand(N, G, generator=gen) * 0.02 + 1e-3) * (1 + 1e-6 * torch.rand(N, G, generator=gen))
    if sym:
        zeros = torch.full((N, G), float(1 << (bits - 1)))
    else:
        zeros = torch.randint(0, qmax + 1, (N, G), generator=gen).to(torch.float32)
    g_idx = None
    if act_order:
        perm = torch.randperm(K, generator=gen)
        g_idx = torch.empty(K, dtype=torch.int32)
        g_idx[perm] = (torch.arange(K) // g).to(torch.int32)
    return Quantized(codes, scales, zeros, g_idx, bits, group_size)


def explicit_dequant(q: Quantized) -> Tensor:
    """W_hat with fp16-rounded scales, written independently of kernels.packing (loop over groups)."""
    N, K = q.codes.shape
    g = K if q.group_size <= 0 else q.group_size
    s16 = q.scales.half().float()
    grp = q.g_idx.long() if q.g_idx is not None else torch.arange(K) // g
    W = torch.empty(N, K)
    for k in range(K):
        W[:, k] = s16[:, grp[k]] * (q.codes[:, k].float() - q.zeros[:, grp[k]])
    return W


def assert_falls_back_once(mod: Any, monkeypatch: Any, in_features: int) -> None:
    """A coded module whose kernel is forced eligible but refuses fp64 activations: the first forward warns once
    (naming the module class and the reason), later ones are silent, and the output is the torch reference's."""
    import warnings

    import torch.nn.functional as F

    from kernels import coded_module

    monkeypatch.setattr(coded_module, "_WARNED", set())
    monkeypatch.setattr(mod, "_kernel_eligible", lambda x: True)
    x = torch.randn(4, in_features, device=DEVICE, dtype=torch.float64)
    name = type(mod).__name__
    with pytest.warns(UserWarning, match=rf"{name}: Triton kernel not used \(activation dtype"):
        y = mod(x)
    assert torch.equal(y, F.linear(x, mod.dequantized_weight(torch.float64)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mod(x)  # once only


def forward_through_kernel(
    mod: Any, monkeypatch: Any, launch: Any, gemm: str, in_features: int
) -> tuple[Tensor, Tensor, list[int], Tensor]:
    """A coded module's fp16 forward on [2, 3, K] with its kernel forced eligible (on CPU it only runs for CUDA
    inputs), counting calls to ``launch.<gemm>``. Returns (y, the torch reference's output, calls, x)."""
    assert not mod._kernel_eligible(torch.randn(1, in_features))  # CPU input: the reference
    x = torch.randn(2, 3, in_features, device=DEVICE, dtype=torch.float16)
    mod.use_kernel = False
    ref = mod(x)
    mod.use_kernel = True
    monkeypatch.setattr(mod, "_kernel_eligible", lambda x: True)
    calls: list[int] = []
    real = getattr(launch, gemm)
    monkeypatch.setattr(launch, gemm, lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return mod(x), ref, calls, x
