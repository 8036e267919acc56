"""Every quantization method gives the same codes under a caller's bf16 autocast as outside it.

The sequential recipe runs its calibration forwards under ``torch.autocast(bfloat16)`` and calls the quantizer from
inside that loop; the quantizer must not inherit it (issue: the shipped ``gptq-w4g64`` swept partly in bf16)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tasks.quantize import METHODS, _quantize_tensor
from tasks.recipe import QuantizeConfig
from tests.quant.reference import random_spd, random_weight

CONFIGS: dict[str, dict[str, Any]] = {
    "rtn": {"method": "rtn", "bits": 4, "group_size": 64},
    "gptq": {"method": "gptq", "bits": 4, "group_size": 64},
    "quip": {"method": "quip", "bits": 2},
    "hadamard-gptq": {"method": "hadamard-gptq", "bits": 3, "group_size": 64},
    "hadamard-e8p": {"method": "hadamard-e8p", "bits": 2},
    "icquant-gptq": {"method": "icquant-gptq", "bits": 2},
    "gptqt": {"method": "gptqt", "bits": 2},
}


def _tensors(q: Any) -> list[torch.Tensor]:
    """Every tensor in the result, through nested dataclasses (``BCQLayer.weight``), whatever its type."""
    if isinstance(q, torch.Tensor):
        return [q]
    fields = getattr(q, "__dataclass_fields__", None)
    if fields is None:
        return []
    return [t for f in fields for t in _tensors(getattr(q, f))]


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_codes_do_not_depend_on_the_callers_autocast(method: str) -> None:
    assert method in METHODS
    cfg = QuantizeConfig.model_validate(CONFIGS[method])
    n = 256
    W = random_weight(128, n, 3)
    H = random_spd(n, 4) * 2.0  # finalize(Σ x xᵀ over 1000 tokens, 1000) of a 1000-token Gram sum
    plain = _quantize_tensor(W, H, cfg, "layer")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = _quantize_tensor(W, H, cfg, "layer")
    assert _tensors(plain)
    for a, b in zip(_tensors(plain), _tensors(under), strict=True):
        assert torch.equal(a, b)
