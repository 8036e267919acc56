"""QuantLinear: reference forward is exactly the explicit dequant matmul; state_dict/safetensors; swapping."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from torch import nn

from kernels.layouts import replace_linears
from kernels.packing import pack_quantized_linear
from kernels.quant_linear import QuantLinear
from tests.kernels.synth import explicit_dequant, make_quantized, run_without_triton

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CASES = list(itertools.product([2, 3, 4, 8], [(64, 32), (96, 64), (50, -1)], DTYPES, [False, True], [False, True]))


def _id(c) -> str:
    bits, (K, g), dt, act, bias = c
    return f"w{bits}-K{K}-g{g}-{dt}-{'act' if act else 'seq'}-{'bias' if bias else 'nobias'}"


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_reference_forward_is_exact(case) -> None:
    bits, (K, g), dt, act, with_bias = case
    dtype = DTYPES[dt]
    N = 24
    q = make_quantized(N, K, bits, g, act_order=act, seed=bits * K)
    bias = torch.randn(N) if with_bias else None
    mod = QuantLinear.from_quantized(q, bias=bias)
    W = explicit_dequant(q)
    torch.testing.assert_close(mod.dequantized_weight(), W, rtol=0, atol=0)
    x = torch.randn(2, 3, K).to(dtype)
    # identical to an nn.Linear holding the fake-quantized weight
    expected = torch.nn.functional.linear(x, W.to(dtype), None if bias is None else bias.to(dtype))
    y = mod(x)
    assert y.dtype == dtype and y.shape == (2, 3, N)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


def test_state_dict_and_safetensors_roundtrip(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    q = make_quantized(32, 96, 4, 64, act_order=True)
    mod = QuantLinear.from_quantized(q, bias=torch.randn(32))
    sd = mod.state_dict()
    assert set(sd) == {"qweight", "scales", "zeros", "qmeta", "g_idx", "bias"}
    packed = pack_quantized_linear(q.codes, q.scales, q.zeros, 4, 64, q.g_idx)
    for k, v in packed.items():
        assert torch.equal(sd[k], v), k
    save_file(sd, str(tmp_path / "m.safetensors"))
    fresh = QuantLinear(96, 32, 4, 64, bias=True, act_order=True, bias_dtype=torch.float32)
    fresh.load_state_dict(load_file(str(tmp_path / "m.safetensors")))
    x = torch.randn(5, 96)
    torch.testing.assert_close(fresh(x), mod(x), rtol=0, atol=0)
    u = fresh.unpacked()
    assert torch.equal(u.codes, q.codes) and torch.equal(u.g_idx, q.g_idx)


def test_load_state_dict_rejects_mismatched_meta() -> None:
    q = make_quantized(8, 64, 4, 32)
    mod = QuantLinear.from_quantized(q)
    other = QuantLinear(64, 8, 4, 16)  # same K, N; different group size -> scales shape and qmeta differ
    with pytest.raises(RuntimeError, match="qmeta"):
        other.load_state_dict(mod.state_dict())


@pytest.mark.parametrize("cast", ["half", "bfloat16", "to_bf16", "double"])
def test_dtype_casts_keep_fp16_scales_exact(cast: str) -> None:
    q = make_quantized(8, 64, 3, 32)
    mod = QuantLinear.from_quantized(q, bias=torch.randn(8))
    W = mod.dequantized_weight()
    if cast == "to_bf16":
        mod = mod.to(torch.bfloat16)
    else:
        mod = getattr(mod, cast)()
    assert mod.scales.dtype == torch.float16 and mod.zeros.dtype == torch.float16
    assert mod.qweight.dtype == torch.int32
    torch.testing.assert_close(mod.dequantized_weight(), W, rtol=0, atol=0)
    assert mod.bias is not None and mod.bias.dtype != torch.float32  # the bias does follow the cast


class _Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(64, 32, bias=True)
        self.o_proj = nn.Linear(32, 64, bias=False)


class _Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = _Attn()


class _Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Layer(), _Layer()])


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = _Inner()


def test_replace_linears_swaps_named_modules() -> None:
    model = _Model()
    lin = model.model.layers[0].self_attn.q_proj
    q1 = make_quantized(32, 64, 4, 32, seed=1)
    q2 = make_quantized(64, 32, 2, 16, act_order=True, seed=2)
    quantized = {
        "model.layers.0.self_attn.q_proj": pack_quantized_linear(q1.codes, q1.scales, q1.zeros, 4, 32),
        "model.layers.1.self_attn.o_proj": pack_quantized_linear(q2.codes, q2.scales, q2.zeros, 2, 16, q2.g_idx),
    }
    names = replace_linears(model, quantized)
    assert names == list(quantized)
    new_q = model.model.layers[0].self_attn.q_proj
    assert isinstance(new_q, QuantLinear) and new_q.bits == 4
    assert new_q.bias is not None and torch.equal(new_q.bias, lin.bias.detach())
    new_o = model.model.layers[1].self_attn.o_proj
    assert isinstance(new_o, QuantLinear) and new_o.bias is None and new_o.g_idx is not None
    assert isinstance(model.model.layers[1].self_attn.q_proj, nn.Linear)
    x = torch.randn(3, 64)
    expected = torch.nn.functional.linear(x, explicit_dequant(q1), lin.bias.detach())
    torch.testing.assert_close(new_q(x), expected, rtol=0, atol=0)


def test_replace_linears_errors_leave_model_untouched() -> None:
    model = _Model()
    q = make_quantized(32, 64, 4, 32)
    good = pack_quantized_linear(q.codes, q.scales, q.zeros, 4, 32)
    with pytest.raises(KeyError):
        replace_linears(model, {"model.layers.0.self_attn.q_proj": good, "model.nope": good})
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)
    with pytest.raises(ValueError, match="does not match"):
        replace_linears(model, {"model.layers.0.self_attn.o_proj": good})
    with pytest.raises(TypeError):
        replace_linears(model, {"model.layers.0": good})
    assert replace_linears(model, {"model.nope": good}, strict=False) == []


def test_replace_linears_on_meta_skeleton() -> None:
    """Loading path: build the model on meta, swap in QuantLinear, then load the remaining tensors."""
    with torch.device("meta"):
        model = _Model()
    q = make_quantized(32, 64, 4, 32)
    packed = pack_quantized_linear(q.codes, q.scales, q.zeros, 4, 32)
    names = replace_linears(model, {"model.layers.0.self_attn.q_proj": packed})
    mod = model.get_submodule(names[0])
    assert isinstance(mod, QuantLinear) and mod.qweight.device.type == "cpu"
    assert mod.bias is not None and mod.bias.device.type == "cpu"
    mod.load_state_dict({**mod.state_dict(), "bias": torch.ones(32)})
    x = torch.randn(2, 64)
    torch.testing.assert_close(mod(x), x @ explicit_dequant(q).t() + 1, rtol=1e-6, atol=1e-6)


def test_fallback_warning_is_one_time(monkeypatch) -> None:
    import kernels.quant_linear as ql

    monkeypatch.setattr(ql, "_WARNED", set())
    with pytest.warns(UserWarning, match="bf8 activations"):
        ql._warn_once("bf8 activations")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ql._warn_once("bf8 activations")


def test_cpu_forward_does_not_warn() -> None:
    q = make_quantized(8, 64, 4, 32)
    mod = QuantLinear.from_quantized(q)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mod(torch.randn(1, 64))


def test_imports_work_without_triton_and_package_is_light() -> None:
    """`kernels` must import (and QuantLinear run on CPU) with triton absent; `kernels/__init__` stays empty."""
    code = (
        "import kernels, torch\n"
        "assert not hasattr(kernels, '__version__')\n"
        "assert [n for n in vars(kernels) if not n.startswith('__')] == [], vars(kernels).keys()\n"
        "import kernels.packing, kernels.quant_linear, kernels.wgemm.launch, kernels.wgemm.configs\n"
        "import kernels.hadamard.launch, kernels.hadamard.ref, kernels.actquant.launch, kernels.actquant.ref\n"
        "from kernels.quant_linear import QuantLinear\n"
        "m = QuantLinear(64, 8, 4, 32)\n"
        "assert m(torch.randn(2, 64)).shape == (2, 8)\n"
        "from kernels.hadamard.launch import hadamard_transform\n"
        "assert hadamard_transform(torch.randn(2, 48)).shape == (2, 48)\n"
        "assert 'triton' not in [k for k, v in sys.modules.items() if v is not None]\n"
    )
    run_without_triton(code)
