"""E8P decode-GEMM Triton kernel vs its reference (``kernels.e8p.ref``), interpreter on CPU / GPU if any; the
reference vs ``E8PLinear``'s weight (bit-exact); ``E8PLinear``'s kernel dispatch and fallback."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from kernels.e8p.ref import e8p_gemm_ref
from kernels.e8p_linear import E8PLinear, pack_e8p
from quant.e8p import E8PWeight
from tests.kernels import synth

pytestmark, _runnable = synth.kernel_test_module("kernels.e8p.triton", "e8p_gemm_kernel")


def _coded(N: int, K: int, seed: int = 0, bits: int = 2) -> E8PWeight:
    """Random 16-bit codeword indices (every bit pattern is a valid codeword), random residual indices for 3 bits,
    and fp16-exact row scales."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(-(2**15), 2**15, (N, K // 8), generator=gen, dtype=torch.int32).to(torch.int16)
    codes2 = torch.randint(0, 256, (N, K // 8), generator=gen).to(torch.uint8) if bits == 3 else None
    scales = (torch.rand(N, generator=gen) * 0.05 + 0.01).half().float()
    return E8PWeight(codes, scales, codes2=codes2)


def _check(M: int, N: int, K: int, dt: str, *, bias: bool = False, config=None, bits: int = 2) -> None:
    from kernels.e8p.launch import e8p_gemm

    t = {k: v.to(synth.DEVICE) for k, v in pack_e8p(_coded(N, K, seed=M + N + K, bits=bits)).items()}
    x, b = synth.gemm_inputs(M, K, N, dt, bias)
    q2 = t.get("qweight2")
    y = e8p_gemm(x, t["qweight"], t["scales"], b, qweight2=q2, config=config)
    synth.assert_matches_ref(y, e8p_gemm_ref(x, t["qweight"], t["scales"], b, q2), x, dt)


# dtype x M (GEMV, small, tensor-core tile) x (K, N): ragged N, K not a multiple of BLOCK_K (K = 200), tiny K = 8
SHAPES = [(96, 40), (128, 33), (200, 24), (8, 16)]
MAIN = list(itertools.product(synth.DTYPES, [1, 5, 32], SHAPES))


@pytest.mark.parametrize(("dt", "M", "shape"), MAIN, ids=[f"{d}-M{m}-K{s[0]}N{s[1]}" for d, m, s in MAIN])
def test_e8p_gemm_matches_ref(dt, M, shape) -> None:
    K, N = shape
    _check(M, N, K, dt, bias=M != 5)
    _check(M, N, K, dt, bias=M == 5, bits=3)


@pytest.mark.parametrize("cfg", synth.SPLIT_CONFIGS.values(), ids=list(synth.SPLIT_CONFIGS))
def test_e8p_gemm_explicit_configs(cfg) -> None:
    _check(3, 48, 192, "fp16", bias=True, config=cfg)
    _check(17, 40, 96, "fp32", config=cfg, bits=3)


def test_e8p_gemm_3d_strided_and_empty_input() -> None:
    from kernels.e8p.launch import e8p_gemm

    t = {k: v.to(synth.DEVICE) for k, v in pack_e8p(_coded(24, 64)).items()}
    x = torch.randn(2, 64, 3).to(synth.DEVICE).transpose(1, 2)  # [2, 3, 64], last dim strided
    ref = e8p_gemm_ref(x, t["qweight"], t["scales"])
    torch.testing.assert_close(e8p_gemm(x, t["qweight"], t["scales"]), ref, rtol=1e-5, atol=1e-5)
    assert e8p_gemm(torch.randn(0, 64, device=synth.DEVICE), t["qweight"], t["scales"]).shape == (0, 24)


def test_e8p_ref_is_the_module_weight_bit_exact() -> None:
    w = _coded(24, 72, seed=3)
    x = torch.randn(3, 72)
    assert torch.equal(e8p_gemm_ref(x, w.codes, w.scales.half()), F.linear(x, w.dequantize()))


def test_e8p_gemm_rejects_bad_shapes() -> None:
    from kernels.e8p.launch import e8p_gemm

    t = {k: v.to(synth.DEVICE) for k, v in pack_e8p(_coded(32, 64)).items()}
    x = torch.randn(1, 64, device=synth.DEVICE)
    with pytest.raises(ValueError, match="in_features"):
        e8p_gemm(x[:, :32], t["qweight"], t["scales"])
    with pytest.raises(ValueError, match="qweight must be int16"):
        e8p_gemm(x, t["qweight"].to(torch.int32), t["scales"])
    with pytest.raises(ValueError, match="scales must be"):
        e8p_gemm(x, t["qweight"], t["scales"][:5])
    with pytest.raises(ValueError, match="bias"):
        e8p_gemm(x, t["qweight"], t["scales"], torch.zeros(3, device=synth.DEVICE))
    with pytest.raises(ValueError, match="qweight2 must be uint8"):
        e8p_gemm(x, t["qweight"], t["scales"], qweight2=t["qweight"])


def _module(N: int = 40, K: int = 96, bias: bool = True) -> E8PLinear:
    b = torch.randn(N) if bias else None
    return E8PLinear.from_packed(pack_e8p(_coded(N, K, seed=7)), bias=b).to(synth.DEVICE)


def test_e8p_linear_kernel_path_matches_reference(monkeypatch) -> None:
    """``forward`` through the kernel (forced eligible here: on CPU it only runs for CUDA inputs)."""
    import kernels.e8p.launch as launch

    mod = _module()
    y, ref, calls, _ = synth.forward_through_kernel(mod, monkeypatch, launch, "e8p_gemm", 96)
    assert calls and y.shape == ref.shape == (2, 3, 40) and y.dtype == torch.float16
    assert synth.rel_err(y, ref) <= synth.GEMM_TOL["fp16"]


def test_e8p_linear_falls_back_with_one_warning(monkeypatch) -> None:
    synth.assert_falls_back_once(_module(bias=False), monkeypatch, 96)


def test_e8p_launcher_imports_without_triton() -> None:
    code = (
        "import torch\n"
        "import kernels.e8p.launch, kernels.e8p.ref\n"
        "from kernels.e8p.launch import kernel_unsupported_reason\n"
        "x = torch.randn(1, 64)\n"
        "assert kernel_unsupported_reason(x, x, x) == 'triton is not installed'\n"
        "from kernels.e8p_linear import E8PLinear\n"
        "assert 'triton' not in [k for k, v in sys.modules.items() if v is not None]\n"
    )
    synth.run_without_triton(code)
