"""hessians.first_token_weight: each calibration window's first token (the attention sink) weighted in Σ x xᵀ.

Checked against the obvious weighted sum, keyed only when it is not 1 (existing keys unchanged), applied by every
collector (the hessians stage and true-sequential quantization), and refused for MoE models, whose routed expert
inputs have no positions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from infra.errors import ConfigError, QuantpipeError
from tasks.driver import GroupStats
from tasks.recipe import HessianConfig


def test_weighted_statistics_equal_the_obvious_weighted_sum() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 10, 8, generator=g)  # [samples, positions, features]
    stats = GroupStats(first_token_weight=16.0)
    stats.add(x)
    w = torch.ones(3, 10, dtype=torch.float64)
    w[:, 0] = 16.0
    xd = x.double().reshape(-1, 8)
    ref = (xd * w.reshape(-1, 1)).T @ xd
    assert stats.H is not None and stats.n == 30  # the token count is unchanged
    torch.testing.assert_close(stats.H, ref, rtol=1e-6, atol=1e-6)
    plain = GroupStats()
    plain.add(x)
    assert not torch.allclose(plain.H, stats.H)
    with pytest.raises(QuantpipeError, match="MoE"):
        GroupStats(first_token_weight=4.0).add(x.reshape(-1, 8))  # routed expert inputs: no positions


def test_keyed_only_when_it_is_not_one() -> None:
    assert "first_token_weight" not in HessianConfig().key_config()  # every existing key stays as it was
    assert HessianConfig(first_token_weight=16).key_config()["first_token_weight"] == 16.0
    with pytest.raises(ValueError):
        HessianConfig(first_token_weight=0)


def test_hessians_stage_and_sequential_quantize_apply_it(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """The stage's block statistics equal a weighted recomputation (different artifacts from K = 1), and the
    sequential quantize key carries the weight."""
    from infra.settings import Settings
    from tasks.calibration import run_calibration, run_model
    from tasks.hessians import load_block_hessians, run_hessians
    from tasks.models import resolve_model
    from tasks.quantize import _sequential_forward_key
    from tasks.recipe import CalibrationConfig, load_recipe
    from tasks.stage import StageContext

    settings = Settings(home=tmp_path)
    ctx = StageContext(settings=settings, store_url=(tmp_path / "store").as_uri(), progress=False)
    model = resolve_model(str(tiny_llama_dir), settings, progress=False)
    model_ref = str(run_model(ctx, model).ref)
    cal = run_calibration(ctx, model, model_ref, CalibrationConfig(n_samples=4, seq_len=16))
    one = run_hessians(ctx, tiny_llama_dir, model_ref, str(cal.ref), HessianConfig(micro_batch=2))
    heavy = run_hessians(
        ctx, tiny_llama_dir, model_ref, str(cal.ref), HessianConfig(micro_batch=2, first_token_weight=9)
    )
    assert one.ref != heavy.ref and one.metadata["blocks"][0] != heavy.metadata["blocks"][0]
    H1, n1 = load_block_hessians(ctx, one.metadata["blocks"][0], ["attn_in"])["attn_in"]
    H9, n9 = load_block_hessians(ctx, heavy.metadata["blocks"][0], ["attn_in"])["attn_in"]
    assert n1 == n9 == 4 * 16
    assert not torch.allclose(H1, H9)
    cfg = load_recipe("gptq-w4g64").quantize
    assert _sequential_forward_key(cfg, HessianConfig(first_token_weight=9))["first_token_weight"] == 9.0
    assert "first_token_weight" not in _sequential_forward_key(cfg, HessianConfig())


def test_refused_for_moe_models(tmp_path: Path) -> None:
    from flows.quantize import validate_recipe_for_model
    from tasks.recipe import load_recipe
    from tests.helpers.models import build_tiny_family

    src = build_tiny_family(tmp_path / "olmoe", "olmoe")
    base = load_recipe("rtn-w4g64")
    base = base.model_copy(update={"eval": base.eval.model_copy(update={"seq_len": 64})})  # the tiny model's 512
    recipe = base.model_copy(update={"hessians": HessianConfig(first_token_weight=16)})
    with pytest.raises(ConfigError, match="first_token_weight needs token positions"):
        validate_recipe_for_model(recipe, src)
    validate_recipe_for_model(base, src)  # the default is fine
