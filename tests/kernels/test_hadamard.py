"""FWHT: Paley matrices, reference vs dense Hadamard (built here by Sylvester/Kronecker), Triton vs reference."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from kernels._triton_util import is_interpreted, triton_available
from kernels.hadamard.launch import hadamard_transform
from kernels.hadamard.ref import PALEY_SIZES, fwht_ref, paley_hadamard, split_hadamard_size

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# max |kernel - ref| / max |ref|; measured (interpreter): fp32 ~2.6e-7, fp16 ~6.5e-4, bf16 ~7e-3 (the
# interpreter truncates fp32->bf16 where the reference rounds to nearest).
TOL = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 1.6e-2}


def dense_hadamard(n: int) -> torch.Tensor:
    """Normalised dense H_n built independently: Sylvester for 2^k, Kronecker with a Paley H_m."""
    m = next(m for m in (1, *PALEY_SIZES) if n % m == 0 and (n // m) & (n // m - 1) == 0)
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < n // m:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    if m > 1:
        H = torch.kron(paley_hadamard(m), H)
    return H / math.sqrt(n)


@pytest.mark.parametrize("m", PALEY_SIZES)
def test_paley_matrices_are_hadamard(m: int) -> None:
    H = paley_hadamard(m)
    assert H.shape == (m, m) and bool(((H == 1) | (H == -1)).all())
    torch.testing.assert_close(H @ H.t(), m * torch.eye(m, dtype=torch.float64), rtol=0, atol=0)


SIZES = [1, 2, 4, 64, 512, 12, 24, 20, 80, 28, 112]


@pytest.mark.parametrize("n", SIZES, ids=[f"n{n}" for n in SIZES])
def test_ref_matches_dense(n: int) -> None:
    x = torch.randn(3, 2, n, dtype=torch.float64)
    H = dense_hadamard(n)
    torch.testing.assert_close(fwht_ref(x), x @ H.t(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fwht_ref(x) @ H, x, rtol=1e-12, atol=1e-12)  # orthonormal: inverse is y @ H
    y32 = fwht_ref(x.float())
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), x @ H.t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [3, 36, 24 * 3, 0])
def test_unsupported_sizes_fail_fast(n: int) -> None:
    with pytest.raises(ValueError, match="unsupported Hadamard size"):
        split_hadamard_size(n)


KSIZES = [1, 2, 16, 128, 1024, 1 << 15, 12, 48, 160, 112]
KCASES = list(itertools.product(KSIZES, DTYPES))


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
@pytest.mark.parametrize(("n", "dt"), KCASES, ids=[f"n{n}-{d}" for n, d in KCASES])
def test_triton_matches_ref(n: int, dt: str) -> None:
    if DEVICE == "cpu":
        from kernels.hadamard.triton import fwht_kernel

        if not is_interpreted(fwht_kernel):
            pytest.skip("no CUDA and kernels.hadamard.triton was imported without TRITON_INTERPRET=1")
    rows = 2 if n >= 4096 else 5
    x = torch.randn(rows, n).to(DEVICE, DTYPES[dt])
    y = hadamard_transform(x, use_kernel=True)
    ref = fwht_ref(x)
    assert y.dtype == x.dtype and y.shape == x.shape
    err = ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    assert err <= TOL[dt], f"{err:.2e}"


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_triton_strided_rows_and_op() -> None:
    if DEVICE == "cpu":
        from kernels.hadamard.triton import fwht_kernel

        if not is_interpreted(fwht_kernel):
            pytest.skip("interpreter not active")
    x = torch.randn(6, 3, 64, device=DEVICE)[::2]  # non-contiguous leading dims
    torch.testing.assert_close(hadamard_transform(x, use_kernel=True), fwht_ref(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.ops.quantpipe.hadamard(x), fwht_ref(x), rtol=1e-5, atol=1e-5)


def test_cpu_default_uses_reference() -> None:
    x = torch.randn(4, 96)
    torch.testing.assert_close(hadamard_transform(x), fwht_ref(x), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="unsupported"):
        hadamard_transform(x.double(), use_kernel=True)


# ---- all Paley orders of quant.hadamard, transpose, fused signs, incoherence transforms on the kernel ----------

XCASES = [(36, False), (576, False), (576, True), (688, True), (1536, False), (112, True), (256, False)]


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
@pytest.mark.parametrize(("n", "transpose"), XCASES, ids=[f"n{n}-{'T' if t else 'N'}" for n, t in XCASES])
def test_kernel_any_paley_size_signs_transpose_vs_dense(n: int, transpose: bool) -> None:
    """576 = 36·16 (SmolLM2 hidden), 688 = 344·2 (the 11008 factor), 1536 = 12·128: vs the dense H_n."""
    from quant.hadamard import dense_hadamard

    if DEVICE == "cpu":
        from kernels.hadamard.triton import fwht_kernel

        if not is_interpreted(fwht_kernel):
            pytest.skip("interpreter not active")
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(3, n, generator=gen, dtype=torch.float64)
    d = (torch.randint(0, 2, (n,), generator=gen) * 2 - 1).double()
    H = dense_hadamard(n)
    want = (x * d) @ (H if transpose else H.t())
    got = hadamard_transform(x.float().to(DEVICE), use_kernel=True, transpose=transpose, signs=d.float().to(DEVICE))
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-5)
    ref_path = hadamard_transform(x.float(), use_kernel=False, transpose=transpose, signs=d.float())
    torch.testing.assert_close(ref_path.double(), want, rtol=1e-5, atol=1e-5)


def test_launch_rejects_sizes_without_construction() -> None:
    from quant.hadamard import HadamardSizeError

    with pytest.raises(HadamardSizeError, match="unsupported Hadamard size 6"):
        hadamard_transform(torch.randn(2, 6))
    with pytest.raises(ValueError, match="signs"):
        hadamard_transform(torch.randn(2, 8), signs=torch.ones(4))


TCASES = [("hadamard", 64), ("hadamard", 576), ("hadamard", 40 * 3), ("kron", 48), ("hadamard", 144), ("hadamard", 90)]


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
@pytest.mark.parametrize(("kind", "n"), TCASES, ids=[f"{k}-n{n}" for k, n in TCASES])
@pytest.mark.parametrize("rescale", [False, True], ids=["plain", "rescale"])
def test_incoherence_transforms_on_kernel_match_quant(kind: str, n: int, rescale: bool) -> None:
    """``incoherence_input/output`` (RotatedQuantLinear's CUDA path) == ``IncoherenceTransforms.input/output``;
    144 = 36·4 uses Paley II; 90 = 45·2 has no construction, so it exercises the random-orthogonal ⊗ H_2 fallback."""
    from kernels.hadamard.launch import incoherence_input, incoherence_output
    from quant.incoherence import IncoherenceConfig, IncoherenceTransforms, make_transform

    if DEVICE == "cpu":
        from kernels.hadamard.triton import fwht_kernel

        if not is_interpreted(fwht_kernel):
            pytest.skip("interpreter not active")
    gen = torch.Generator().manual_seed(n)
    cfg = IncoherenceConfig(kind=kind)  # type: ignore[arg-type]
    tr = IncoherenceTransforms(
        make_transform(24, cfg, gen),
        make_transform(n, cfg, gen),
        torch.rand(n, generator=gen) + 0.5 if rescale else None,
    )
    x = torch.randn(2, 3, n, generator=gen)
    y = torch.randn(2, 3, 24, generator=gen)
    got_in = incoherence_input(tr, x.to(DEVICE), use_kernel=True).cpu()
    got_out = incoherence_output(tr, y.to(DEVICE), use_kernel=True).cpu()
    torch.testing.assert_close(got_in, tr.input(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_out, tr.output(y), rtol=1e-5, atol=1e-5)
