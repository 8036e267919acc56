"""The parallel quantize path hands a layer's own Hessian to the rotating methods to overwrite (issue 20: one
n×n matrix less through a 70B down_proj's sweep); the layer it produces must be the one a kept H gives."""

from __future__ import annotations

import pytest
import torch

from tasks.quantize import CONSUMING, METHODS, _quantize_tensor
from tasks.recipe import load_recipe
from tests.quant.reference import random_spd, random_weight


@pytest.mark.parametrize("recipe", ["hadamard-e8p-w2", "quip-w2", "hadamard-gptq-w3g64"])
def test_owned_hessian_gives_the_same_layer(recipe: str) -> None:
    cfg = load_recipe(recipe).quantize
    assert cfg.effective_method() in CONSUMING
    W = random_weight(32, 256, 1)
    H = random_spd(256, 1).to(torch.float32)
    kept = H.clone()
    ref = _quantize_tensor(W, kept, cfg, "layer")
    assert torch.equal(kept, H)
    owned = H.clone()
    got = _quantize_tensor(W, owned, cfg, "layer", owned_h=True)
    assert not torch.equal(owned, H)  # overwritten: the caller said it was done with it
    for field in ("codes", "scales", "zeros", "codes2"):
        a, b = getattr(ref, field, None), getattr(got, field, None)
        assert (a is None and b is None) or torch.equal(a, b), field
    assert got.stats["proxy_loss_exact"] == pytest.approx(ref.stats["proxy_loss_exact"], rel=1e-5)


def test_methods_that_cannot_consume_never_see_the_flag() -> None:
    """gptq keeps reading H after its factor (no rotated copy to save): owned_h leaves H untouched."""
    cfg = load_recipe("gptq-w4g64").quantize
    assert cfg.effective_method() in METHODS and cfg.effective_method() not in CONSUMING
    W, H = random_weight(16, 128, 2), random_spd(128, 2).to(torch.float32)
    owned = H.clone()
    _quantize_tensor(W, owned, cfg, "layer", owned_h=True)
    assert torch.equal(owned, H)
