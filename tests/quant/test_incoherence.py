"""Incoherence processing: transforms vs dense matrices, pre/post exactness, invariance, pack round trip."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quant.gptq import GPTQConfig, quantize_gptq
from quant.grid import RMS_CLIP, fit_grid
from quant.hadamard import HadamardSizeError, dense_hadamard
from quant.hessian import proxy_loss
from quant.incoherence import (
    IncoherenceConfig,
    IncoherenceTransforms,
    OrthogonalTransform,
    dequantize_original,
    incoherence_postprocess,
    incoherence_preprocess,
    is_transform_key,
    make_transform,
    quantize_incoherent,
)
from quant.ldlq import LDLQConfig, quantize_ldlq
from quant.types import GridConfig
from tests.quant.reference import random_spd, random_weight

F64 = torch.float64
KRON = IncoherenceConfig(kind="kron")
HAD = IncoherenceConfig(kind="hadamard")


def dense(t: OrthogonalTransform) -> torch.Tensor:
    """V as a dense matrix: apply() maps the rows of I to the rows of I Vᵀ."""
    return t.apply(torch.eye(t.n, dtype=F64)).t()


@pytest.mark.parametrize("n", [64, 96, 576, 54, 13])
def test_kron_transform_is_permuted_kronecker(n: int) -> None:
    t = make_transform(n, KRON, torch.Generator().manual_seed(n))
    assert t.signs is None and t.perm is not None and all(F is not None for _, F in t.factors)
    K = torch.ones(1, 1, dtype=F64)
    for _, F in t.factors:
        assert F is not None
        K = torch.kron(K, F.to(F64))
    P = torch.eye(n, dtype=F64)[t.perm]  # P x = x[perm]
    V = dense(t)
    torch.testing.assert_close(V, K @ P, rtol=0, atol=1e-12)
    torch.testing.assert_close(V @ V.t(), torch.eye(n, dtype=F64), rtol=0, atol=1e-6)  # fp32 factors
    x = torch.randn(5, n, dtype=F64)
    torch.testing.assert_close(t.apply_t(x), x @ V, rtol=0, atol=1e-12)
    if n >= 64:  # only small factors are stored, never the dense n×n matrix
        assert max(F.numel() for _, F in t.factors if F is not None) <= n * n // 8


@pytest.mark.parametrize("n", [64, 192, 576, 54])
def test_hadamard_transform_is_rht(n: int) -> None:
    t = make_transform(n, HAD, torch.Generator().manual_seed(n))
    assert t.signs is not None and t.perm is None
    V = dense(t)
    if n == 54:  # fallback: Q_27 ⊗ H_2 with a random orthogonal Q
        (m, Q), (p, F) = t.factors
        assert (m, p, F) == (27, 2, None) and Q is not None
        H = torch.kron(Q.to(F64), dense_hadamard(2))
    else:
        assert t.factors == ((n, None),)
        H = dense_hadamard(n)
    torch.testing.assert_close(V, H @ torch.diag(t.signs.to(F64)), rtol=0, atol=1e-12)
    torch.testing.assert_close(V @ V.t(), torch.eye(n, dtype=F64), rtol=0, atol=1e-6)


def test_fallback_error_names_size_and_fallback() -> None:
    cfg = IncoherenceConfig(kind="hadamard", fallback="error")
    with pytest.raises(HadamardSizeError, match=r"size 54 .*random_orthogonal"):
        make_transform(54, cfg, torch.Generator().manual_seed(0))
    make_transform(576, cfg, torch.Generator().manual_seed(0))  # 36·16: supported


def dense_pair(tr: IncoherenceTransforms) -> tuple[torch.Tensor, torch.Tensor]:
    return dense(tr.U), dense(tr.V)


@pytest.mark.parametrize("cfg", [KRON, HAD, IncoherenceConfig(kind="kron", rescale=True)], ids=["kron", "had", "resc"])
def test_preprocess_matches_dense_and_postprocess_inverts(cfg: IncoherenceConfig) -> None:
    W, H = random_weight(48, 96, 0).to(F64), random_spd(96, 0)
    pre = incoherence_preprocess(W, H, cfg, generator=torch.Generator().manual_seed(0))
    U, V = dense_pair(pre.transforms)
    S = torch.eye(96, dtype=F64)
    if cfg.rescale:
        s = pre.transforms.rescale
        assert s is not None
        want = (torch.diagonal(H) / (W * W).sum(0)).pow(0.25)
        torch.testing.assert_close(s.to(F64), want, rtol=1e-6, atol=0)
        S = torch.diag(s.to(F64))
    W_t = U @ W @ S @ V.t()
    H_t = V @ torch.linalg.inv(S) @ H @ torch.linalg.inv(S) @ V.t()
    torch.testing.assert_close(pre.W, W_t, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(pre.H * pre.h_scale, H_t, rtol=1e-9, atol=1e-9)
    assert float(torch.diagonal(pre.H).mean()) == pytest.approx(1.0)
    torch.testing.assert_close(incoherence_postprocess(pre.W, pre.transforms), W, rtol=0, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    m=st.sampled_from([8, 12, 24, 36, 54]),
    n=st.sampled_from([16, 20, 28, 48, 54]),
    kind=st.sampled_from(["kron", "hadamard"]),
    rescale=st.booleans(),
    seed=st.integers(0, 2**20),
)
def test_proxy_loss_is_invariant(m: int, n: int, kind: str, rescale: bool, seed: int) -> None:
    """tr(ΔW̃ H̃ ΔW̃ᵀ)·h_scale = tr(ΔW H ΔWᵀ) for any ΔW, and post(pre(W)) = W."""
    cfg = IncoherenceConfig(kind=kind, rescale=rescale)  # type: ignore[arg-type]
    W, H = random_weight(m, n, seed).to(F64), random_spd(n, seed)
    pre = incoherence_preprocess(W, H, cfg, generator=torch.Generator().manual_seed(seed))
    D_t = torch.randn(m, n, dtype=F64, generator=torch.Generator().manual_seed(seed + 1))
    D = incoherence_postprocess(pre.W + D_t, pre.transforms) - incoherence_postprocess(pre.W, pre.transforms)
    lhs = float(((D_t @ pre.H) * D_t).sum()) * pre.h_scale
    assert lhs == pytest.approx(float(((D @ H) * D).sum()), rel=1e-5)
    torch.testing.assert_close(incoherence_postprocess(pre.W, pre.transforms), W, rtol=0, atol=1e-5)
    torch.testing.assert_close(pre.H, pre.H.t(), rtol=0, atol=0)


def test_transforms_round_trip_through_tensors() -> None:
    for cfg in (KRON, HAD, IncoherenceConfig(kind="hadamard", rescale=True)):
        W, H = random_weight(54, 64, 1), random_spd(64, 1)
        tr = incoherence_preprocess(W, H, cfg, generator=torch.Generator().manual_seed(1)).transforms
        d = tr.to_dict()
        assert all(is_transform_key(k) for k in d)
        back = IncoherenceTransforms.from_dict(d)
        x = torch.randn(3, 64, dtype=F64)
        torch.testing.assert_close(back.input(x), tr.input(x), rtol=0, atol=1e-12)
        y = torch.randn(3, 54, dtype=F64)
        torch.testing.assert_close(back.output(y), tr.output(y), rtol=0, atol=1e-12)
    assert not any(is_transform_key(k) for k in ("qweight", "scales", "zeros", "qmeta", "g_idx", "bias", "weight"))


def outlier_layer(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(64, 128, generator=g)
    W[:, :4] *= 20
    W[3] *= 10
    X = torch.randn(2048, 128, generator=g, dtype=F64)
    X[:, 5:8] *= 30
    return W, 2 * X.T @ X / 2048


@pytest.mark.parametrize("kind", ["kron", "hadamard"])
def test_incoherence_reduces_proxy_loss_on_outliers(kind: str) -> None:
    W, H = outlier_layer()
    grid = GridConfig(bits=3, group_size=-1, sym=True, scale_mode="rms")
    cfg = IncoherenceConfig(kind=kind)  # type: ignore[arg-type]
    q = quantize_incoherent(
        W, H, cfg, lambda Wt, Ht: quantize_ldlq(Wt, Ht, LDLQConfig(grid=grid)), generator=torch.Generator()
    )
    plain = quantize_gptq(W, H, GPTQConfig(grid=GridConfig(bits=3, group_size=-1, sym=True)))
    # measured: kron 5.7e4, hadamard 2.7e4 vs plain GPTQ 7.9e5
    assert q.stats["proxy_loss_exact"] < 0.2 * plain.stats["proxy_loss_exact"]
    assert q.stats["proxy_loss_exact"] == pytest.approx(proxy_loss(W, dequantize_original(q, F64), H), rel=1e-9)
    assert q.stats["proxy_loss_exact"] <= q.stats["proxy_loss"] < 1.5 * q.stats["proxy_loss_exact"]  # damped H


def test_ldlq_equals_gptq_in_the_rotated_basis() -> None:
    W, H = random_weight(32, 96, 2), random_spd(96, 2)
    grid = GridConfig(bits=2, group_size=32, sym=True, scale_mode="rms")
    run = {
        "gptq": lambda Wt, Ht: quantize_gptq(Wt, Ht, GPTQConfig(grid=grid, act_order=False), sweep_dtype=F64),
        "ldlq": lambda Wt, Ht: quantize_ldlq(Wt, Ht, LDLQConfig(grid=grid), sweep_dtype=F64),
    }
    out = {k: quantize_incoherent(W, H, KRON, f, generator=torch.Generator().manual_seed(5)) for k, f in run.items()}
    assert torch.equal(out["gptq"].codes, out["ldlq"].codes)
    for k in out["gptq"].transforms or {}:
        assert torch.equal(out["gptq"].transforms[k], out["ldlq"].transforms[k])  # type: ignore[index]


def test_rms_grid() -> None:
    w = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    for bits in (2, 3, 4):
        scale, zero = fit_grid(w, GridConfig(bits=bits, sym=True, scale_mode="rms"))
        half = 1 << (bits - 1)
        torch.testing.assert_close(scale, RMS_CLIP * w.square().mean(1).sqrt() / half, rtol=1e-6, atol=0)
        assert bool((zero == half).all())
    with pytest.raises(ValueError, match="symmetric"):
        GridConfig(bits=2, scale_mode="rms")


@pytest.mark.parametrize("kind", ["kron", "hadamard"])
@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("seeded", [False, True], ids=["explicit", "seeded"])
def test_pack_round_trip_is_exact(kind: str, rescale: bool, seeded: bool) -> None:
    """dequantize(pack(Ŵ̃)) with the transforms undone equals the fake-quantized weight; forward matches it."""
    from kernels.packing import pack_quantized_linear
    from kernels.quant_linear import RotatedQuantLinear

    W, H = random_weight(54, 96, 3), random_spd(96, 3)
    grid = GridConfig(bits=3, group_size=32, sym=True, scale_mode="rms", scale_dtype="float16")
    cfg = IncoherenceConfig(kind=kind, rescale=rescale)  # type: ignore[arg-type]
    q = quantize_incoherent(
        W,
        H,
        cfg,
        lambda Wt, Ht: quantize_gptq(Wt, Ht, GPTQConfig(grid=grid)),
        generator=torch.Generator().manual_seed(5),
    )
    assert q.transforms is not None
    transforms = q.transforms
    if seeded:  # what the pack stage stores: the layer seed instead of P and the drawn factors
        transforms = IncoherenceTransforms.from_dict(transforms).with_seed(5, kind).to_dict()  # type: ignore[arg-type]
        assert "tseed" in transforms
    tensors = {**pack_quantized_linear(q.codes, q.scales, q.zeros, q.bits, q.group_size, q.g_idx), **transforms}
    bias = torch.randn(54)
    mod = RotatedQuantLinear.from_packed(tensors, bias=bias.half())
    assert torch.equal(mod.dequantized_weight(), q.dequantize())
    W_fq = dequantize_original(q)
    torch.testing.assert_close(mod.dequantized_weight_original(), W_fq, rtol=0, atol=1e-6)
    x = torch.randn(7, 96)
    torch.testing.assert_close(mod(x), x @ W_fq.t() + bias.half().float(), rtol=1e-5, atol=1e-5)
    state = {k: v.clone() for k, v in mod.state_dict().items()}
    mod.to(torch.bfloat16)  # transforms stay fp32 (like the fp16 scales)
    assert all(torch.equal(v, state[k]) for k, v in mod.state_dict().items() if is_transform_key(k))
    assert mod(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_sign_vectors_are_stored_one_bit_each() -> None:
    """Checkpoints hold σ bit-packed (uint8 [⌈n/8⌉]); reading gives back the exact ±1 vector, and fp32 sign vectors
    of older artifacts are still read as they are."""
    from quant.incoherence import pack_signs, unpack_signs

    for n in (1, 8, 13, 576):
        s = (torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(n)) * 2 - 1).float()
        packed = pack_signs(s)
        assert packed.dtype == torch.uint8 and packed.numel() == -(-n // 8)
        assert torch.equal(unpack_signs(packed, n), s)
    with pytest.raises(ValueError, match="too short"):
        unpack_signs(torch.zeros(1, dtype=torch.uint8), 9)
    W, H = torch.randn(24, 40, dtype=torch.float64), torch.eye(40, dtype=torch.float64)
    pre = incoherence_preprocess(W, H, IncoherenceConfig(kind="hadamard"), generator=torch.Generator().manual_seed(0))
    d = pre.transforms.to_dict()
    assert d["su"].dtype == torch.uint8 and d["sv"].dtype == torch.uint8
    back = IncoherenceTransforms.from_dict(d)
    assert back.V.signs is not None and pre.transforms.V.signs is not None
    assert torch.equal(back.V.signs, pre.transforms.V.signs)
    old = {**d, "su": pre.transforms.U.signs, "sv": pre.transforms.V.signs}  # the fp32 layout of older artifacts
    x = torch.randn(3, 40)
    torch.testing.assert_close(IncoherenceTransforms.from_dict(old).input(x), back.input(x), rtol=0, atol=0)


def _nbytes(d: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in d.values())


# kron (QuIP): permutation + two Haar factors per side; hadamard on 54 = 27·2: a drawn 27×27 factor (fallback)
@pytest.mark.parametrize(("kind", "m", "n"), [("kron", 54, 96), ("kron", 13, 64), ("hadamard", 54, 40)])
@pytest.mark.parametrize("rescale", [False, True])
def test_transforms_stored_as_their_seed(kind: str, m: int, n: int, rescale: bool) -> None:
    """With the layer's seed, only seed + signs + layout + fingerprints are stored; reading draws P and the factors
    again and gives exactly the transforms the quantizer used."""
    from quant.incoherence import transforms_from_seed

    seed = 1234567890123
    W, H = random_weight(m, n, 2), random_spd(n, 2)
    cfg = IncoherenceConfig(kind=kind, rescale=rescale)  # type: ignore[arg-type]
    tr = incoherence_preprocess(W, H, cfg, generator=torch.Generator().manual_seed(seed)).transforms
    U, V = transforms_from_seed(seed, kind, m, n)  # type: ignore[arg-type]
    assert U.same_as(tr.U) and V.same_as(tr.V)
    explicit = tr.to_dict()
    seeded = tr.with_seed(seed, kind).to_dict()  # type: ignore[arg-type]
    assert all(is_transform_key(k) for k in seeded)
    assert not any(k.startswith(("perm_", "fac_")) for k in seeded) and {"tseed", "tcheck"} <= set(seeded)
    assert _nbytes(seeded) < _nbytes(explicit) / 4
    back = IncoherenceTransforms.from_dict(seeded)
    assert back.seed == (seed, kind) and back.U.same_as(tr.U) and back.V.same_as(tr.V)
    x, y = torch.randn(3, n, dtype=F64), torch.randn(3, m, dtype=F64)
    torch.testing.assert_close(back.input(x), tr.input(x), rtol=0, atol=0)
    torch.testing.assert_close(back.output(y), tr.output(y), rtol=0, atol=0)
    assert IncoherenceTransforms.from_dict(seeded).to_dict().keys() == seeded.keys()  # stays seeded on re-pack
    # a seed that does not reproduce them keeps the explicit tensors: nothing is ever lost
    assert tr.with_seed(seed + 1, kind).to_dict().keys() == explicit.keys()  # type: ignore[arg-type]


def test_seeded_transforms_that_do_not_reproduce_fail_loudly() -> None:
    """A torch that draws other numbers (simulated by tampering) must not load a wrong rotation silently."""
    W, H = random_weight(54, 96, 2), random_spd(96, 2)
    tr = incoherence_preprocess(W, H, KRON, generator=torch.Generator().manual_seed(7)).transforms
    seeded = tr.with_seed(7, "kron").to_dict()
    for bad in (
        {**seeded, "tcheck": seeded["tcheck"] + torch.tensor([0.0, 1e-2])},
        {**seeded, "tseed": torch.tensor([8, 1])},
    ):
        with pytest.raises(ValueError, match=r"drawn from its stored seed .* re-pack the model"):
            IncoherenceTransforms.from_dict(bad)
    with pytest.raises(ValueError, match="not \\[seed, kind 0/1\\]"):
        IncoherenceTransforms.from_dict({**seeded, "tseed": torch.tensor([7, 5])})
    W2 = random_weight(54, 40, 2)
    odd = incoherence_preprocess(W2, random_spd(40, 2), HAD, generator=torch.Generator().manual_seed(7)).transforms
    seeded = odd.with_seed(7, "hadamard").to_dict()  # 54 = 27·2: a drawn factor; signs drawn first and stored
    flipped = seeded["su"].clone()
    flipped[0] ^= 1
    with pytest.raises(ValueError, match="drawn from its stored seed"):
        IncoherenceTransforms.from_dict({**seeded, "su": flipped})
    W3 = random_weight(40, 96, 2)
    had = incoherence_preprocess(W3, H, HAD, generator=torch.Generator().manual_seed(7)).transforms
    assert had.with_seed(7, "hadamard") is had  # 40 = 20·2, 96 = 12·8: only signs, nothing a seed would save


def test_packed_layer_whose_seed_does_not_reproduce_names_the_layer() -> None:
    """Loading a checkpoint: the one-line error says which layer and what to do."""
    from kernels.layouts import replace_linears
    from kernels.packing import pack_quantized_linear

    W, H = random_weight(54, 96, 3), random_spd(96, 3)
    grid = GridConfig(bits=4, group_size=32, sym=True, scale_mode="rms", scale_dtype="float16")
    q = quantize_incoherent(
        W,
        H,
        KRON,
        lambda Wt, Ht: quantize_gptq(Wt, Ht, GPTQConfig(grid=grid)),
        generator=torch.Generator().manual_seed(3),
    )
    assert q.transforms is not None
    seeded = IncoherenceTransforms.from_dict(q.transforms).with_seed(3, "kron").to_dict()
    seeded["tcheck"] = seeded["tcheck"] + 1.0  # as if this torch drew other numbers
    tensors = {**pack_quantized_linear(q.codes, q.scales, q.zeros, q.bits, q.group_size, q.g_idx), **seeded}
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(96, 54, bias=False))
    with pytest.raises(ValueError, match=r"^'proj': U transform \(size 54\) drawn from its stored seed .* re-pack"):
        replace_linears(model, {"proj": tensors})
    assert isinstance(model.proj, torch.nn.Linear)  # nothing replaced


@pytest.mark.parametrize("cfg", [KRON, HAD, IncoherenceConfig(kind="kron", rescale=True)], ids=["kron", "had", "resc"])
def test_held_float32_preprocess_is_the_float64_one_rounded(cfg: IncoherenceConfig) -> None:
    """What the quantizers get (float32 W̃ and H̃) is the float64 preprocess rounded once, and the in-place
    panelled rotation gives the out-of-place V H Vᵀ on a width spanning several panels."""
    import quant.incoherence as inc

    W, H = random_weight(24, 1280, 3).to(F64), random_spd(1280, 3)
    ref = incoherence_preprocess(W, H, cfg, generator=torch.Generator().manual_seed(5))
    held = incoherence_preprocess(W, H, cfg, generator=torch.Generator().manual_seed(5), dtype=torch.float32)
    assert held.W.dtype == held.H.dtype == torch.float32 and held.h_scale == ref.h_scale
    assert torch.equal(held.W, ref.W.to(torch.float32))
    assert torch.equal(held.H, ref.H.to(torch.float32))
    assert torch.equal(held.H, held.H.t())
    V = ref.transforms.V
    Hs = (
        H
        if ref.transforms.rescale is None
        else H / ref.transforms.rescale.to(F64)[None, :] / ref.transforms.rescale.to(F64)[:, None]
    )
    want = V.apply(V.apply(Hs).t())
    want = (want + want.t()) / 2
    assert inc._PANEL < 1280
    torch.testing.assert_close(ref.H * ref.h_scale, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cfg", [KRON, HAD, IncoherenceConfig(kind="kron", rescale=True)], ids=["kron", "had", "resc"])
def test_consuming_h_writes_the_rotated_h_into_it_and_changes_no_code(cfg: IncoherenceConfig) -> None:
    """``consume_h``: H̃ lands in H's own memory (no second n×n matrix), the codes are the very ones of the
    non-consuming path, and proxy_loss_exact (now h_scale · the rotated-basis trace) is the original basis's to
    float32 rounding."""
    W = random_weight(24, 1280, 4)
    H = random_spd(1280, 4).to(torch.float32)
    gcfg = LDLQConfig(grid=GridConfig(bits=3, group_size=64))

    def run(h: torch.Tensor, consume: bool) -> Any:
        return quantize_incoherent(
            W,
            h,
            cfg,
            lambda Wt, Ht: quantize_ldlq(Wt, Ht, gcfg),
            generator=torch.Generator().manual_seed(9),
            consume_h=consume,
        )

    kept = H.clone()
    ref = run(kept, consume=False)
    assert torch.equal(kept, H)  # not consuming: H untouched
    owned = H.clone()
    ptr = owned.data_ptr()
    got = run(owned, consume=True)
    assert owned.data_ptr() == ptr and not torch.equal(owned, H)  # H's memory now holds H̃
    pre = incoherence_preprocess(W, H, cfg, generator=torch.Generator().manual_seed(9), dtype=torch.float32)
    assert torch.equal(owned, pre.H)
    assert torch.equal(got.codes, ref.codes) and torch.equal(got.scales, ref.scales)
    assert got.stats["proxy_loss_exact"] == pytest.approx(ref.stats["proxy_loss_exact"], rel=1e-5)
    with pytest.raises(ValueError, match="out must be a contiguous"):
        incoherence_preprocess(W, H, cfg, generator=torch.Generator(), dtype=torch.float32, out=H.t()[:, :10])
