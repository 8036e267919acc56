"""Per-token activation quantization (W4A4) and the integer-activation matmul: Triton vs ``kernels.actquant.ref``."""

from __future__ import annotations

import itertools

import pytest
import torch

from kernels._triton_util import is_interpreted, triton_available
from kernels.actquant import ref
from kernels.packing import pack_quantized_linear
from tests.kernels.synth import make_quantized

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
needs_kernel = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


@pytest.fixture
def kernel_runnable():
    if DEVICE == "cpu":
        from kernels.actquant.triton import actquant_kernel

        if not is_interpreted(actquant_kernel):
            pytest.skip("no CUDA and kernels.actquant.triton was imported without TRITON_INTERPRET=1")


# ---- reference (the API QuaRot relies on) ------------------------------------------------------------------


def test_ref_contract() -> None:
    x = torch.tensor([[[0.0, 1.4, -2.0, 0.6]], [[0.0, 0.0, 0.0, 0.0]]], dtype=torch.float16)
    codes, scales = ref.quantize_per_token(x, bits=4)
    assert codes.dtype == torch.int8 and codes.shape == x.shape
    assert scales.dtype == torch.float32 and scales.shape == (2, 1, 1)
    assert scales[0, 0, 0].item() == pytest.approx(2.0 / 7) and scales[1, 0, 0].item() == 1.0  # zero row -> 1
    assert codes[0, 0].tolist() == [0, 5, -7, 2]  # 1.4 / (2/7) = 4.9 -> 5, 0.6 / (2/7) = 2.1 -> 2
    assert codes[1].abs().sum() == 0
    fq = ref.fake_quant_per_token(x, bits=4)
    assert fq.dtype == x.dtype and fq.shape == x.shape
    c9, s9 = ref.quantize_per_token(x, bits=4, clip_ratio=0.5)  # clipped: 9.8 -> 7, -14 -> -8 saturate
    assert c9[0, 0].tolist() == [0, 7, -8, 4] and s9[0, 0, 0].item() == pytest.approx(1.0 / 7)
    for bits in range(2, 9):
        c, _ = ref.quantize_per_token(torch.randn(4, 33) * 5, bits=bits, clip_ratio=0.8)
        assert int(c.min()) >= -(2 ** (bits - 1)) and int(c.max()) <= 2 ** (bits - 1) - 1
    with pytest.raises(ValueError, match="bits"):
        ref.quantize_per_token(x, bits=9)
    with pytest.raises(ValueError, match="clip_ratio"):
        ref.quantize_per_token(x, clip_ratio=0.0)


def test_pack_int4_roundtrip_and_layout() -> None:
    codes = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 1)
    packed = ref.pack_int4(codes)
    assert packed.shape == (3, 8) and packed.dtype == torch.int8
    assert (int(packed[0, 0]) & 0xFF) == ((-8 & 0xF) | ((-7 & 0xF) << 4))  # low nibble = even column
    assert torch.equal(ref.unpack_int4(packed), codes)
    with pytest.raises(ValueError):
        ref.pack_int4(codes[:, :3])


# ---- Triton quantizer: bit-identical codes and scales --------------------------------------------------------

QCASES = list(itertools.product(DTYPES, [2, 4, 8], [1.0, 0.9], [(3, 64), (2, 5, 33)]))


@needs_kernel
@pytest.mark.parametrize(
    ("dt", "bits", "clip", "shape"),
    QCASES,
    ids=[f"{d}-b{b}-clip{c}-{'x'.join(map(str, s))}" for d, b, c, s in QCASES],
)
def test_quantize_kernel_bit_identical(kernel_runnable, dt, bits, clip, shape) -> None:
    from kernels.actquant.launch import quantize_per_token

    gen = torch.Generator().manual_seed(bits + len(shape))
    x = (torch.randn(*shape, generator=gen) * 4).to(DEVICE, DTYPES[dt])
    x.view(-1, shape[-1])[0] = 0  # a zero row gets scale 1
    codes, scales = quantize_per_token(x, bits, clip, use_kernel=True)
    rc, rs = ref.quantize_per_token(x, bits, clip)
    assert torch.equal(scales, rs)
    assert torch.equal(codes, rc)


@needs_kernel
def test_quantize_kernel_ties_long_rows_and_packing(kernel_runnable) -> None:
    from kernels.actquant.launch import MAX_BLOCK_N, quantize_per_token

    # exact .5 ties after division (scale = 7/7 = 1): round half to even like torch.round
    x = torch.tensor([[0.5, 1.5, 2.5, -2.5, -0.5, 7.0, 3.5, -3.5]], device=DEVICE)
    codes, _ = quantize_per_token(x, 4, use_kernel=True)
    assert codes.tolist() == [[0, 2, 2, -2, 0, 7, 4, -4]]
    long = torch.randn(3, MAX_BLOCK_N + 52, device=DEVICE, dtype=torch.float16)  # two-pass over 2 chunks
    c, s = quantize_per_token(long, 4, 0.9, use_kernel=True)
    rc, rs = ref.quantize_per_token(long, 4, 0.9)
    assert torch.equal(c, rc) and torch.equal(s, rs)
    packed, ps = quantize_per_token(long, 4, 0.9, pack=True, use_kernel=True)
    assert torch.equal(packed, ref.pack_int4(rc)) and torch.equal(ps, rs)
    with pytest.raises(ValueError, match="pack"):
        quantize_per_token(long[:, :7], 4, pack=True)
    with pytest.raises(ValueError, match="pack"):
        quantize_per_token(long, 8, pack=True)


def test_quantize_dispatch_reference_on_cpu() -> None:
    from kernels.actquant.launch import quantize_per_token

    x = torch.randn(2, 16)
    c, s = quantize_per_token(x, 4, use_kernel=False)
    rc, rs = ref.quantize_per_token(x, 4)
    assert torch.equal(c, rc) and torch.equal(s, rs)


# ---- integer-activation matmul (W4A4 / WxA4) -------------------------------------------------------------------

GCASES = [
    # name, M, K, N, bits, g, sym
    ("w4a4-g64-asym", 3, 128, 40, 4, 64, False),
    ("w4a4-perchannel-sym", 1, 96, 32, 4, -1, True),
    ("w2a4-g128", 20, 256, 48, 2, 128, False),
    ("w3a4-g64-ragged", 5, 160, 16, 3, 64, False),
    ("w8a4-sym", 2, 64, 24, 8, 64, True),
]


@needs_kernel
@pytest.mark.parametrize(("name", "M", "K", "N", "bits", "g", "sym"), GCASES, ids=[c[0] for c in GCASES])
@pytest.mark.parametrize("packed_x", [False, True], ids=["int8x", "int4x"])
def test_int_gemm_matches_ref(kernel_runnable, name, M, K, N, bits, g, sym, packed_x) -> None:
    from kernels.actquant.launch import int_gemm, quantize_per_token

    q = make_quantized(N, K, bits, g, sym=sym, seed=M + K)
    t = {k: v.to(DEVICE) for k, v in pack_quantized_linear(q.codes, q.scales, q.zeros, bits, g).items()}
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(DEVICE, torch.float16)
    codes, scales = quantize_per_token(x, 4, 0.9)
    xin = ref.pack_int4(codes) if packed_x else codes
    w = (t["qweight"], t["scales"], t["zeros"], bits, g, K)
    y = int_gemm(xin, scales, *w, x_packed=packed_x, out_dtype=torch.float32)
    r = ref.int_gemm_ref(codes, scales, *w, out_dtype=torch.float32)
    err = ((y - r).abs().max() / r.abs().max()).item()
    assert err <= 1e-5, f"max rel err {err:.2e}"  # int32 tile sums are exact; only fp32 scaling rounds (~1e-7)


@needs_kernel
def test_int_gemm_unsupported_reasons(kernel_runnable) -> None:
    from kernels.actquant.launch import int_gemm, int_gemm_unsupported_reason

    q = make_quantized(16, 96, 4, 32)
    t = pack_quantized_linear(q.codes, q.scales, q.zeros, 4, 32)
    xc = torch.zeros(1, 96, dtype=torch.int8, device=DEVICE)
    assert "group size 32" in str(int_gemm_unsupported_reason(xc, t["qweight"], t["zeros"], 4, 32, 96))
    q8 = make_quantized(16, 64, 8, 64)  # asymmetric 8-bit: code - zero can leave int8
    t8 = pack_quantized_linear(q8.codes, q8.scales, q8.zeros, 8, 64)
    assert "int8" in str(int_gemm_unsupported_reason(xc[:, :64], t8["qweight"], t8["zeros"], 8, 64, 64))
    with pytest.raises(RuntimeError, match="unsupported"):
        int_gemm(xc, torch.ones(1, 1), t["qweight"], t["scales"], t["zeros"], 4, 32, 96)


@pytest.mark.parametrize("group_size", [4, 8, 32])
def test_group_wise_activation_quantization_is_per_token_on_each_group(group_size: int) -> None:
    """a_groupsize: every (token, group of channels) is quantized exactly like a token of that group alone."""
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(2)) * 4
    got = ref.fake_quant_per_token(x, bits=4, clip_ratio=0.9, group_size=group_size)
    for g in range(32 // group_size):
        cols = slice(g * group_size, (g + 1) * group_size)
        assert torch.equal(got[..., cols], ref.fake_quant_per_token(x[..., cols].contiguous(), bits=4, clip_ratio=0.9))
    codes, scales = ref.quantize_per_token(x, bits=4, group_size=group_size)
    assert scales.shape == (3, 5, 32 // group_size) and codes.shape == x.shape
    with pytest.raises(ValueError, match="must be 0 .per token. or divide 32"):
        ref.quantize_per_token(x, group_size=5)
