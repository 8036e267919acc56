"""ICQuant Triton kernels vs their references (``kernels.icq.ref``), interpreter on CPU / GPU if any: the
tile-parallel position decode bit-exact against ``quant.icquant.decode_positions`` (edge bitmaps + a property
test), the mask-select GEMM against the torch GEMM, and ``ICQuantLinear``'s kernel dispatch, mask cache and
fallback."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.bitwords import pack_bit_words
from kernels.icq.ref import decode_mask_ref, dequantize_icq_packed, icq_gemm_ref
from kernels.icq_linear import ICQuantLinear, pack_icquant
from kernels.packing import pack_codes
from quant.icquant import ICQuantConfig, IndexStream, encode_positions, quantize_icquant
from quant.types import GridConfig
from tests.kernels import synth

pytestmark, _runnable = synth.kernel_test_module("kernels.icq.triton", "icq_decode_kernel")

# max |kernel - ref| / max |ref| within GEMM_TOL. Measured over MAIN in the interpreter: fp32 4.2e-7, fp16 7.6e-5,
# bf16 1.4e-2 (the interpreter's fp32->bf16 cast truncates where the reference rounds; same bound as test_wgemm).
TOL = synth.GEMM_TOL


# ---------------------------------------------------------------- position decode


def _check_decode(
    mask: torch.Tensor, segment: int, group_rows: int, index_bits: int | None, block_u=None
) -> IndexStream:
    from kernels.icq.launch import decode_mask

    s = encode_positions(mask, segment=segment, group_rows=group_rows, index_bits=index_bits)
    N, K = mask.shape
    args = (s.data.to(synth.DEVICE), s.offsets.to(synth.DEVICE), s.index_bits, N, K, s.segment, s.group_rows)
    got = decode_mask(*args, block_u=block_u)
    want = pack_bit_words(mask).to(synth.DEVICE)
    assert got.shape == want.shape and got.dtype == torch.int32
    assert torch.equal(got, want), f"{(got != want).sum()} mask words differ"
    assert torch.equal(got, decode_mask_ref(*args))
    return s


def _edge_mask(pattern: str, N: int = 21, K: int = 150) -> torch.Tensor:
    gen = torch.Generator().manual_seed(len(pattern))
    m = torch.rand(N, K, generator=gen) < 0.05
    if pattern == "empty":
        m[:] = False
    elif pattern == "full":
        m[:] = True
    elif pattern == "rows":  # empty rows, full-density rows, a lone far outlier (long gap: many escapes)
        m[0] = False
        m[3:5] = True
        m[7] = False
        m[8] = False
        m[8, -1] = True
        m[-1] = True
    elif pattern == "sparse":  # gaps ≫ 2^B: escape runs across row boundaries
        m[:] = False
        m[2, 149] = m[13, 0] = m[13, 31] = m[13, 32] = True
    return m


@pytest.mark.parametrize("pattern", ["empty", "full", "rows", "sparse", "random"])
@pytest.mark.parametrize(
    ("segment", "group_rows", "index_bits"),
    [(0, 16, None), (40, 5, 1), (7, 3, 2), (32, 21, 16), (64, 1, 4)],
    ids=["rows-R16", "L40-R5-B1", "L7-R3-B2", "L32-Rall-B16", "L64-R1-B4"],
)
def test_decode_matches_cpu_decoder(pattern, segment, group_rows, index_bits) -> None:
    _check_decode(_edge_mask(pattern), segment, group_rows, index_bits)


@pytest.mark.parametrize("block_u", [16, 64])
def test_decode_carries_across_steps(block_u) -> None:
    """Tiles longer than one step (the stop-bit rank and remainder sum carry over), escapes at B = 1 and 3."""
    m = _edge_mask("rows", 40, 300)
    for segment, group_rows, B in ((0, 16, 1), (100, 8, 3)):
        s = _check_decode(m, segment, group_rows, B, block_u=block_u)
        assert s.escape_bits - s.n_outliers > 4 * block_u  # many escape one-bits, spread over several steps


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 24),
    cols=st.integers(1, 130),
    density=st.floats(0.0, 1.0),
    segment=st.sampled_from([0, 1, 5, 32, 33, 200]),
    group_rows=st.integers(1, 20),
    index_bits=st.one_of(st.none(), st.integers(1, 16)),
    block_u=st.sampled_from([None, 16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_decode_any_bitmap(rows, cols, density, segment, group_rows, index_bits, block_u, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    _check_decode(torch.rand(rows, cols, generator=gen) < density, segment, group_rows, index_bits, block_u)


def test_decode_rejects_a_mismatched_table() -> None:
    from kernels.icq.launch import decode_mask

    s = encode_positions(_edge_mask("random"), segment=40, group_rows=5)
    with pytest.raises(ValueError, match="pos_offsets"):
        decode_mask(
            s.data.to(synth.DEVICE), s.offsets.to(synth.DEVICE), s.index_bits, 21, 150, 40, 4
        )  # R = 4: 6x4 tiles
    with pytest.raises(ValueError, match="block_u"):
        decode_mask(s.data.to(synth.DEVICE), s.offsets.to(synth.DEVICE), s.index_bits, 21, 150, 40, 5, block_u=48)


# ---------------------------------------------------------------- GEMM


def _gemm_tensors(N: int, K: int, bits: int, gs: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    G = -(-K // gs)
    maxq = (1 << bits) - 1
    t = {
        "qweight": pack_codes(torch.randint(0, maxq + 1, (N, K), generator=gen).to(torch.uint8), bits),
        "mask": pack_bit_words(torch.rand(N, K, generator=gen) < 0.1),
        "scales": (torch.rand(G, N, generator=gen) * 0.02 + 1e-3).half(),
        "zeros": torch.randint(0, maxq + 1, (G, N), generator=gen).half(),
        "oscales": (torch.rand(G, N, generator=gen) * 0.2 + 1e-2).half(),
        "ozeros": torch.randint(0, maxq + 1, (G, N), generator=gen).half(),
    }
    return {k: v.to(synth.DEVICE) for k, v in t.items()}


def _gemm_args(x, t, bits, gs, K):
    return (x, t["qweight"], t["scales"], t["zeros"], t["oscales"], t["ozeros"], t["mask"], bits, gs, K)


def _check_gemm(M, N, K, bits, gs, dt, *, bias=False, config=None) -> None:
    from kernels.icq.launch import icq_gemm

    t = _gemm_tensors(N, K, bits, gs, seed=M + N + K + bits)
    x, b = synth.gemm_inputs(M, K, N, dt, bias)
    args = _gemm_args(x, t, bits, gs, K)
    synth.assert_matches_ref(icq_gemm(*args, bias=b, config=config), icq_gemm_ref(*args, bias=b), x, dt)


# bits x dtype x M x (K, N, g): ragged N, g = BLOCK_K multiple, g = 50 (gather, K not a multiple of the pack
# factor or of 32), per-channel (g = K)
SHAPES = [(96, 40, 32), (128, 33, 64), (100, 24, 50), (160, 17, 160)]
MAIN = list(itertools.product([2, 3], synth.DTYPES, [1, 5, 32], SHAPES))


@pytest.mark.parametrize(
    ("bits", "dt", "M", "shape"),
    MAIN,
    ids=[f"w{b}-{d}-M{m}-K{s[0]}N{s[1]}g{s[2]}" for b, d, m, s in MAIN],
)
def test_icq_gemm_matches_ref(bits, dt, M, shape) -> None:
    K, N, gs = shape
    _check_gemm(M, N, K, bits, gs, dt, bias=M != 5)


CONFIGS = synth.SPLIT_CONFIGS


@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=list(CONFIGS))
def test_icq_gemm_explicit_configs_and_wider_codes(cfg) -> None:
    _check_gemm(3, 48, 192, 2, 32, "fp16", bias=True, config=cfg)
    _check_gemm(3, 48, 192, 4, 64, "fp32", config=cfg)


def test_icq_gemm_rejects_bad_shapes_and_large_m() -> None:
    from kernels.icq.launch import icq_gemm

    _check_gemm(256, 24, 64, 3, 32, "fp16", bias=True)
    t = _gemm_tensors(32, 64, 2, 32, seed=0)
    x = torch.randn(1, 64, device=synth.DEVICE)
    with pytest.raises(ValueError, match="mask"):
        icq_gemm(*_gemm_args(x, {**t, "mask": t["mask"][:1]}, 2, 32, 64))
    with pytest.raises(ValueError, match="oscales"):
        icq_gemm(*_gemm_args(x, {**t, "oscales": t["oscales"][:, :8]}, 2, 32, 64))
    with pytest.raises(ValueError, match="qweight"):
        icq_gemm(*_gemm_args(x, t, 3, 32, 64))
    assert icq_gemm(*_gemm_args(torch.randn(0, 64, device=synth.DEVICE), t, 2, 32, 64)).shape == (0, 32)


def test_icq_custom_op_and_fake_impl() -> None:
    import kernels.icq.launch  # noqa: F401  (registers quantpipe::icq_gemm)

    t = _gemm_tensors(32, 64, 2, 32, seed=0)
    x = torch.randn(3, 64, device=synth.DEVICE)
    a = _gemm_args(x, t, 2, 32, 64)
    args = (*a[:7], None, *a[7:])
    torch.testing.assert_close(torch.ops.quantpipe.icq_gemm(*args), icq_gemm_ref(*a), rtol=1e-5, atol=1e-5)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake_args = tuple(mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for v in args)
        out = torch.ops.quantpipe.icq_gemm(*fake_args)
    assert out.shape == (3, 32) and out.dtype == x.dtype


# ---------------------------------------------------------------- ICQuantLinear


def _packed_layer(bits: int, N: int = 40, K: int = 160, gs: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=gen) ** 3
    grid = GridConfig(bits=bits, group_size=gs, scale_dtype="float16")
    cfg = ICQuantConfig(grid=grid, gamma=0.08, segment=48, group_rows=16, base="rtn")
    return pack_icquant(quantize_icquant(W, None, cfg))


@pytest.mark.parametrize("bits", [2, 3])
def test_icq_linear_kernel_path_matches_reference(bits, monkeypatch) -> None:
    """Real quantized layers: kernel-decoded mask == the module's, ref weight == the module's (bit-exact), and
    ``forward`` through the chain (forced eligible here: on CPU it only runs for CUDA inputs) ≈ the reference."""
    import kernels.icq.launch as launch

    packed = _packed_layer(bits, seed=bits)
    mod = ICQuantLinear.from_packed(packed, bias=torch.randn(40)).to(synth.DEVICE)
    assert not mod._kernel_eligible(torch.randn(1, 160))  # CPU input: the reference
    w = mod.unpacked()
    mask = mod.outlier_mask_words()
    assert torch.equal(mask, pack_bit_words(w.outlier_mask()))
    grids = (mod.scales, mod.zeros, mod.oscales, mod.ozeros)
    W = dequantize_icq_packed(mod.qweight, *grids, mask, bits, 32, 160)
    assert torch.equal(W, mod.dequantized_weight())
    x = torch.randn(2, 3, 160, device=synth.DEVICE, dtype=torch.float16)
    ref = mod(x)
    decodes = []
    real_decode = launch.decode_mask
    monkeypatch.setattr(launch, "decode_mask", lambda *a, **kw: decodes.append(1) or real_decode(*a, **kw))
    monkeypatch.setattr(mod, "_kernel_eligible", lambda x: True)
    y = mod(x)
    assert y.shape == ref.shape == (2, 3, 40) and synth.rel_err(y, ref) <= TOL["fp16"]
    assert decodes == []  # the mask decoded above is reused
    mod.load_state_dict(mod.state_dict())  # copies in place: buffer versions change, the mask is decoded again
    assert torch.equal(mod(x), y) and decodes == [1]
    mod(x)
    assert decodes == [1]


def test_icq_linear_falls_back_with_one_warning(monkeypatch) -> None:
    synth.assert_falls_back_once(ICQuantLinear.from_packed(_packed_layer(2)).to(synth.DEVICE), monkeypatch, 160)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("M", [1, 16, 300])
def test_icq_linear_cuda_uses_kernel(M, recwarn) -> None:
    mod = ICQuantLinear.from_packed(_packed_layer(2, N=256, K=576, gs=128)).cuda()
    x = torch.randn(M, 576, device="cuda", dtype=torch.float16)
    y = mod(x)
    mod.use_kernel = False
    assert synth.rel_err(y, mod(x)) <= TOL["fp16"]
    assert not [w for w in recwarn if "Triton kernel not used" in str(w.message)]
