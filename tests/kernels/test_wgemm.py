"""Weight-only GEMM Triton kernel vs its reference (``kernels.wgemm.ref``), interpreter on CPU / GPU if any."""

from __future__ import annotations

import itertools

import pytest
import torch

from kernels._triton_util import triton_available
from kernels.packing import pack_quantized_linear
from kernels.quant_linear import QuantLinear
from kernels.wgemm.configs import TunedConfigs, WGemmConfig, candidate_configs, default_config, tune_key
from kernels.wgemm.ref import wgemm_ref
from tests.kernels.synth import DEVICE, DTYPES, GEMM_TOL, assert_matches_ref, make_quantized, skip_unless_runnable

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

# max |kernel - ref| / max |ref| within GEMM_TOL. Measured in the interpreter: fp32 ~3e-7, fp16 ~9e-4, bf16 ~1.2e-2
# (both sides round to bf16's 8-bit mantissa, and the interpreter's fp32->bf16 cast truncates).
TOL = GEMM_TOL


@pytest.fixture(autouse=True)
def _kernel_runnable():
    skip_unless_runnable("kernels.wgemm.triton", "wgemm_kernel")


def _packed(N, K, bits, g, act=False, sym=False, seed=0):
    q = make_quantized(N, K, bits, g, act_order=act, sym=sym, seed=seed)
    t = pack_quantized_linear(q.codes, q.scales, q.zeros, bits, g, q.g_idx)
    return {k: v.to(DEVICE) for k, v in t.items()}


def _check(M, N, K, bits, g, dt, *, act=False, sym=False, bias=False, config=None, x=None):
    from kernels.wgemm.launch import wgemm

    t = _packed(N, K, bits, g, act, sym, seed=M + N + K + bits)
    gen = torch.Generator().manual_seed(1)
    if x is None:
        x = torch.randn(M, K, generator=gen).to(DEVICE, DTYPES[dt])
    b = torch.randn(N, generator=gen).to(DEVICE) if bias else None
    args = (x, t["qweight"], t["scales"], t["zeros"], t.get("g_idx"), bits, g, K)
    assert_matches_ref(wgemm(*args, bias=b, config=config), wgemm_ref(*args, bias=b), x, dt)


# main matrix: bits x dtype x M (GEMV, small, tensor-core tile) x (K, N, g) x act-order
SHAPES = [(64, 32, 32), (128, 64, 64), (256, 32, 128)]
MAIN = list(itertools.product([2, 3, 4, 8], DTYPES, [1, 3, 16], SHAPES, [False, True]))


@pytest.mark.parametrize(
    ("bits", "dt", "M", "shape", "act"),
    MAIN,
    ids=[f"w{b}-{d}-M{m}-K{s[0]}N{s[1]}g{s[2]}-{'act' if a else 'seq'}" for b, d, m, s, a in MAIN],
)
def test_wgemm_matches_ref(bits, dt, M, shape, act) -> None:
    K, N, g = shape
    _check(M, N, K, bits, g, dt, act=act, sym=bits == 4, bias=M == 3)


# edge cases: ragged last group, group not a multiple of BLOCK_K, per-channel, K not a multiple of the pack
# factor, N not a multiple of BLOCK_N, larger M (masked dot tiles)
EDGE = [
    ("ragged-K96-g64", 2, 96, 40, 64, 3),
    ("ragged-K576-g128", 1, 576, 16, 128, 4),
    ("g48-gather", 4, 96, 32, 48, 4),
    ("per-channel", 1, 80, 24, -1, 8),
    ("K100-w3-g50", 5, 100, 32, 50, 3),
    ("N40-M40", 40, 64, 40, 32, 2),
]


@pytest.mark.parametrize(("name", "M", "K", "N", "g", "bits"), EDGE, ids=[e[0] for e in EDGE])
@pytest.mark.parametrize("dt", ["fp32", "fp16"])
def test_wgemm_edge_shapes(name, M, K, N, g, bits, dt) -> None:
    _check(M, N, K, bits, g, dt, bias=True)
    _check(M, N, K, bits, g, dt, act=True)


CONFIGS = {
    "gemv-split4": WGemmConfig(1, 32, 32, split_k=4),
    "gemv-split3-ragged": WGemmConfig(2, 16, 32, split_k=3),
    "dot-split2": WGemmConfig(16, 32, 32, split_k=2),
    "dot-bk16-gather": WGemmConfig(16, 16, 16),
    "gemv-bk128-g32-gather": WGemmConfig(4, 64, 128),
}


@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=list(CONFIGS))
@pytest.mark.parametrize("act", [False, True], ids=["seq", "act"])
def test_wgemm_explicit_configs(cfg, act) -> None:
    _check(3, 48, 192, 4, 32, "fp16", act=act, bias=True, config=cfg)
    _check(3, 48, 192, 3, 64, "fp32", act=act, bias=False, config=cfg)


def test_wgemm_3d_noncontiguous_and_empty_input() -> None:
    from kernels.wgemm.launch import wgemm

    t = _packed(32, 64, 4, 32)
    args = (t["qweight"], t["scales"], t["zeros"], None, 4, 32, 64)
    x = torch.randn(2, 64, 3).to(DEVICE).transpose(1, 2)  # [2, 3, 64], last dim strided
    torch.testing.assert_close(wgemm(x, *args), wgemm_ref(x, *args), rtol=1e-5, atol=1e-5)
    empty = torch.randn(0, 64, device=DEVICE)
    assert wgemm(empty, *args).shape == (0, 32)


def test_wgemm_rejects_bad_shapes() -> None:
    from kernels.wgemm.launch import wgemm

    t = _packed(32, 64, 4, 32)
    x = torch.randn(1, 64, device=DEVICE)
    with pytest.raises(ValueError, match="in_features"):
        wgemm(x[:, :32], t["qweight"], t["scales"], t["zeros"], None, 4, 32, 64)
    with pytest.raises(ValueError, match="qweight"):
        wgemm(x, t["qweight"], t["scales"], t["zeros"], None, 3, 32, 64)
    with pytest.raises(ValueError, match="scales"):
        wgemm(x, t["qweight"], t["scales"], t["zeros"], None, 4, 16, 64)


def test_custom_op_and_fake_impl() -> None:
    import kernels.wgemm.launch  # noqa: F401  (registers quantpipe::wgemm)

    t = _packed(32, 64, 4, 32)
    x = torch.randn(3, 64, device=DEVICE)
    args = (x, t["qweight"], t["scales"], t["zeros"], None, None, 4, 32, 64)
    y = torch.ops.quantpipe.wgemm(*args)
    torch.testing.assert_close(y, wgemm_ref(x, *args[1:5], 4, 32, 64), rtol=1e-5, atol=1e-5)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake_args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        out = torch.ops.quantpipe.wgemm(*fake_args)
    assert out.shape == (3, 32) and out.dtype == x.dtype


def test_configs_heuristics_and_tuned_table(tmp_path) -> None:
    gemv = default_config(1, 4096, 4096, 128, 4, num_sms=132)
    assert gemv.block_m == 1 and not gemv.use_dot and gemv.split_k > 1 and 128 % gemv.block_k == 0
    gemm = default_config(64, 4096, 4096, 128, 4, num_sms=132)
    assert gemm.use_dot and gemm.block_m == 64
    assert default_config(1, 64, 576, 64, 4).block_k == 64  # BLOCK_K | g -> one scale row per tile
    assert all(isinstance(c, WGemmConfig) for c in candidate_configs(16, 4096, 4096, 128, 4))
    table = TunedConfigs({tune_key("H100", 3, 64, 128, 64, 4): WGemmConfig(4, 32, 64, 2)})
    table.save(tmp_path / "tuned.json")
    back = TunedConfigs.load(tmp_path / "tuned.json")
    assert back.get("H100", 4, 64, 128, 64, 4) == WGemmConfig(4, 32, 64, 2)  # M=3 and 4 share a bucket
    assert back.get("A100", 4, 64, 128, 64, 4) is None
    with pytest.raises(ValueError):
        WGemmConfig(3, 32, 32)


def test_kernel_unsupported_reason() -> None:
    from kernels.wgemm.launch import kernel_unsupported_reason

    t = _packed(32, 64, 4, 32)
    args = (t["qweight"], t["scales"], t["zeros"], None, 4, 32, 64)
    assert kernel_unsupported_reason(torch.randn(1, 64, device=DEVICE), *args) is None
    assert "dtype" in str(kernel_unsupported_reason(torch.randn(1, 64, device=DEVICE).double(), *args))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dt", ["fp16", "bf16"])
@pytest.mark.parametrize("M", [1, 16, 300])
def test_quant_linear_cuda_uses_kernel(dt, M, recwarn) -> None:
    q = make_quantized(256, 576, 4, 128, act_order=True)
    mod = QuantLinear.from_quantized(q, bias=torch.randn(256))
    mod = mod.cuda()
    x = torch.randn(M, 576, device="cuda", dtype=DTYPES[dt])
    y = mod(x)
    mod.use_kernel = False
    ref = mod(x)
    err = ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    assert err <= TOL[dt]
    assert not [w for w in recwarn if "QuantLinear" in str(w.message)]


def test_tuned_table_entry_is_used_and_reaches_quant_linears(monkeypatch) -> None:
    """A tuned entry for this device/shape bucket replaces the heuristic (which is made to fail here)."""
    import kernels._gemm_launch as gemm_launch
    import kernels.wgemm.launch as launch
    from kernels.quant_linear import set_tuned_configs

    gpu = gemm_launch.gpu_name(torch.device(DEVICE))
    table = TunedConfigs({tune_key(gpu, 3, 48, 192, 32, 4): WGemmConfig(4, 16, 32, split_k=3)})

    def no_heuristic(*a, **k):
        raise AssertionError("default_config used although a tuned entry exists")

    monkeypatch.setattr(gemm_launch, "default_config", no_heuristic)
    t = _packed(48, 192, 4, 32)
    x = torch.randn(3, 192, device=DEVICE)
    args = (x, t["qweight"], t["scales"], t["zeros"], None, 4, 32, 192)
    torch.testing.assert_close(launch.wgemm(*args, tuned=table), wgemm_ref(*args), rtol=1e-5, atol=1e-5)
    model = torch.nn.Sequential(QuantLinear.from_packed({k: v.cpu() for k, v in t.items()}), torch.nn.ReLU())
    assert set_tuned_configs(model, table) == 1 and model[0].tuned is table
