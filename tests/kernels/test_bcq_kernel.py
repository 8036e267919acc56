"""Binary-coding (GPTQT) GEMM Triton kernel vs its reference (``kernels.bcq.ref``), interpreter on CPU / GPU if
any; the reference vs ``BCQLinear``'s weight (bit-exact); ``BCQLinear``'s kernel dispatch and fallback."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from kernels.bcq.ref import bcq_gemm_ref, dequantize_bcq_packed
from kernels.bcq_linear import BCQLinear, pack_bcq
from kernels.wgemm.configs import WGemmConfig
from quant.gptqt import BinaryCodedWeight
from quant.icquant import pack_bits
from tests.kernels import synth

pytestmark, _runnable = synth.kernel_test_module("kernels.bcq.triton", "bcq_gemm_kernel")

# max |kernel - ref| / max |ref| within GEMM_TOL. Measured over MAIN in the interpreter: fp32 6.5e-7, fp16 1.6e-5,
# bf16 1.2e-2 (the interpreter's fp32->bf16 cast truncates where the reference rounds; same bound as test_wgemm).
TOL = synth.GEMM_TOL


def _coded(N: int, K: int, k: int, gs: int, seed: int = 0) -> BinaryCodedWeight:
    """A random binary-coded weight with fp16-exact α' > 0 (decreasing per plane, as GPTQT fits) and β'."""
    gen = torch.Generator().manual_seed(seed)
    G = -(-K // gs)
    bits = torch.rand(k, N, K, generator=gen) < 0.5
    nb = -(-K // 8)
    planes = pack_bits(F.pad(bits.to(torch.uint8), (0, nb * 8 - K)).reshape(-1), 1).reshape(k, N, nb)
    alpha = (torch.rand(N, G, k, generator=gen) * 0.05 * 0.5 ** torch.arange(k)).half().float()
    beta = (torch.randn(N, G, generator=gen) * 0.01).half().float()
    return BinaryCodedWeight(planes, alpha, beta, K, gs)


def _packed(N: int, K: int, k: int, gs: int, seed: int = 0) -> dict[str, torch.Tensor]:
    return {n: t.to(synth.DEVICE) for n, t in pack_bcq(_coded(N, K, k, gs, seed)).items()}


def _check(M, N, K, k, gs, dt, *, bias=False, config=None) -> None:
    from kernels.bcq.launch import bcq_gemm

    t = _packed(N, K, k, gs, seed=M + N + K + k)
    x, b = synth.gemm_inputs(M, K, N, dt, bias)
    args = (x, t["planes"], t["alpha"], t["beta"], gs, K)
    synth.assert_matches_ref(bcq_gemm(*args, b, config=config), bcq_gemm_ref(*args, b), x, dt)


# planes x dtype x M (GEMV, small, tensor-core tile) x (K, N, g): ragged N, g = BLOCK_K multiple, g = 24 (gather,
# not a multiple of 32), a ragged last group (K = 160, g = 64)
SHAPES = [(96, 40, 32), (128, 33, 64), (72, 24, 24), (160, 48, 64)]
MAIN = list(itertools.product([2, 3], synth.DTYPES, [1, 5, 32], SHAPES))


@pytest.mark.parametrize(
    ("k", "dt", "M", "shape"),
    MAIN,
    ids=[f"k{k}-{d}-M{m}-K{s[0]}N{s[1]}g{s[2]}" for k, d, m, s in MAIN],
)
def test_bcq_gemm_matches_ref(k, dt, M, shape) -> None:
    K, N, gs = shape
    _check(M, N, K, k, gs, dt, bias=M != 5)


CONFIGS = {**synth.SPLIT_CONFIGS, "gemv-bk128-gather": WGemmConfig(4, 64, 128)}


@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=list(CONFIGS))
def test_bcq_gemm_explicit_configs(cfg) -> None:
    _check(3, 48, 192, 2, 32, "fp16", bias=True, config=cfg)
    _check(3, 48, 192, 3, 64, "fp32", config=cfg)


def test_bcq_gemm_large_m_one_plane_and_3d_input() -> None:
    from kernels.bcq.launch import bcq_gemm

    _check(256, 40, 64, 1, 32, "fp16", bias=True)  # the largest M the module sends to the kernel
    t = _packed(24, 64, 2, 32)
    args = (t["planes"], t["alpha"], t["beta"], 32, 64)
    x = torch.randn(2, 64, 3).to(synth.DEVICE).transpose(1, 2)  # [2, 3, 64], last dim strided
    torch.testing.assert_close(bcq_gemm(x, *args), bcq_gemm_ref(x, *args), rtol=1e-5, atol=1e-5)
    assert bcq_gemm(torch.randn(0, 64, device=synth.DEVICE), *args).shape == (0, 24)


def test_bcq_ref_is_the_module_weight_bit_exact() -> None:
    """The kernel's spec equals ``BinaryCodedWeight.dequantize`` (what BCQLinear's CPU path uses) bit for bit."""
    for N, K, k, gs in ((24, 72, 3, 24), (33, 100, 2, 32), (8, 64, 4, 64)):
        w = _coded(N, K, k, gs, seed=N)
        t = pack_bcq(w)
        W = dequantize_bcq_packed(t["planes"], t["alpha"], t["beta"], gs, K)
        assert torch.equal(W, w.dequantize())
        x = torch.randn(3, K)
        assert torch.equal(bcq_gemm_ref(x, t["planes"], t["alpha"], t["beta"], gs, K), F.linear(x, w.dequantize()))


def test_bcq_gemm_rejects_bad_shapes() -> None:
    from kernels.bcq.launch import bcq_gemm

    t = _packed(32, 64, 2, 32)
    x = torch.randn(1, 64, device=synth.DEVICE)
    with pytest.raises(ValueError, match="in_features"):
        bcq_gemm(x[:, :32], t["planes"], t["alpha"], t["beta"], 32, 64)
    with pytest.raises(ValueError, match="planes"):
        bcq_gemm(torch.randn(1, 96, device=synth.DEVICE), t["planes"], t["alpha"], t["beta"], 32, 96)
    with pytest.raises(ValueError, match="alpha"):
        bcq_gemm(x, t["planes"], t["alpha"], t["beta"], 16, 64)
    with pytest.raises(ValueError, match="bias"):
        bcq_gemm(x, t["planes"], t["alpha"], t["beta"], 32, 64, torch.zeros(3, device=synth.DEVICE))


def test_bcq_custom_op_and_fake_impl() -> None:
    import kernels.bcq.launch  # noqa: F401  (registers quantpipe::bcq_gemm)

    t = _packed(32, 64, 2, 32)
    x = torch.randn(3, 64, device=synth.DEVICE)
    args = (x, t["planes"], t["alpha"], t["beta"], None, 32, 64)
    y = torch.ops.quantpipe.bcq_gemm(*args)
    torch.testing.assert_close(y, bcq_gemm_ref(x, t["planes"], t["alpha"], t["beta"], 32, 64), rtol=1e-5, atol=1e-5)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake_args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        out = torch.ops.quantpipe.bcq_gemm(*fake_args)
    assert out.shape == (3, 32) and out.dtype == x.dtype


def _module(N=40, K=96, k=3, gs=32, bias=True) -> BCQLinear:
    b = torch.randn(N) if bias else None
    return BCQLinear.from_packed(pack_bcq(_coded(N, K, k, gs, seed=7)), bias=b).to(synth.DEVICE)


def test_bcq_linear_kernel_path_matches_reference(monkeypatch) -> None:
    """``forward`` through the kernel (forced eligible here: on CPU it only runs for CUDA inputs)."""
    import kernels.bcq.launch as launch

    mod = _module()
    y, ref, calls, x = synth.forward_through_kernel(mod, monkeypatch, launch, "bcq_gemm", 96)
    assert calls and y.shape == ref.shape == (2, 3, 40) and y.dtype == torch.float16
    assert synth.rel_err(y, ref) <= TOL["fp16"]
    mod(x)
    assert len(calls) == 2 and len(mod._kernel_cache) == 1  # group size read from bcqmeta once


def test_bcq_linear_falls_back_with_one_warning(monkeypatch) -> None:
    synth.assert_falls_back_once(_module(bias=False), monkeypatch, 96)


def test_new_launchers_import_without_triton() -> None:
    """The bcq/icq launchers and both modules import, and the modules run on CPU, with triton absent."""
    code = (
        "import torch\n"
        "import kernels.bcq.launch, kernels.bcq.ref, kernels.icq.launch, kernels.icq.ref, kernels.bitwords\n"
        "from kernels.bcq.launch import kernel_unsupported_reason\n"
        "x = torch.randn(1, 64)\n"
        "assert kernel_unsupported_reason(x, x, x, x) == 'triton is not installed'\n"
        "from kernels.bcq_linear import BCQLinear\n"
        "from kernels.icq_linear import ICQuantLinear\n"
        "assert 'triton' not in [k for k, v in sys.modules.items() if v is not None]\n"
    )
    synth.run_without_triton(code)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("M", [1, 16, 300])
def test_bcq_linear_cuda_uses_kernel(M, recwarn) -> None:
    mod = _module(N=256, K=576, k=3, gs=128)
    x = torch.randn(M, 576, device="cuda", dtype=torch.float16)
    y = mod(x)
    mod.use_kernel = False
    assert synth.rel_err(y, mod(x)) <= TOL["fp16"]
    assert not [w for w in recwarn if "Triton kernel not used" in str(w.message)]
