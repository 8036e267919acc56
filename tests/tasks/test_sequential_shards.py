"""Sharded calibration in sequential (true-sequential) quantize mode: with ``hessians.shards`` > 1 the shards meet
at a barrier per group (or per block), their partial statistics are summed in shard order, and the stored layers
are those of one process — same keys, same bytes — whatever the shard count; a killed run resumes."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra.settings import Settings
from tasks import quantize as quantize_mod
from tasks.calibration import run_calibration, run_model
from tasks.models import resolve_model
from tasks.quantize import run_quantize
from tasks.recipe import CalibrationConfig, HessianConfig, QuantizeConfig, load_recipe
from tasks.stage import StageContext


def _setup(home: Path, model_dir: Path) -> tuple[StageContext, str, str]:
    settings = Settings(home=home)
    ctx = StageContext(settings=settings, store_url=(home / "store").as_uri(), progress=False)
    model = resolve_model(str(model_dir), settings, progress=False)
    model_ref = str(run_model(ctx, model).ref)
    cal = run_calibration(ctx, model, model_ref, CalibrationConfig(n_samples=10, seq_len=32))
    return ctx, model_ref, str(cal.ref)


def _sequential(scope: str = "group") -> QuantizeConfig:
    q = load_recipe("gptq-w4g64").quantize  # true-sequential GPTQ, act-order, static groups, MSE grids
    return q.model_copy(update={"sequential_scope": scope})


def _quantize(home: Path, model_dir: Path, cfg: QuantizeConfig, fwd: HessianConfig) -> dict[str, tuple[str, str]]:
    """{layer: (qlayer ref, payload sha256)} of one sequential quantize stage in the store under ``home``."""
    import json

    ctx, model_ref, cal_ref = _setup(home, model_dir)
    out = run_quantize(ctx, model_dir, model_ref, cfg, hessians_ref=None, cal_ref=cal_ref, block_refs=None, forward=fwd)
    layers = json.loads(ctx.store.read_bytes(out.ref, "index.json"))["layers"]
    return {n: (v["ref"], ctx.store.manifest(v["ref"]).files[0].sha256) for n, v in layers.items()}


@pytest.mark.parametrize(
    ("scope", "shards", "compute_dtype"),
    [("group", 2, "float32"), ("group", 3, "bfloat16"), ("block", 3, "float32")],
)
def test_shards_store_the_layers_of_one_process(
    tmp_path: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch, scope: str, shards: int, compute_dtype: str
) -> None:
    """10 samples in micro-batches of 2: 2 shards hold 2 and 3 micro-batches, 3 shards 1, 2 and 2 (uneven)."""
    cfg = _sequential(scope)
    one = _quantize(tmp_path / "one", tiny_llama_dir, cfg, HessianConfig(micro_batch=2, compute_dtype=compute_dtype))
    streams = _record_streams(monkeypatch)
    many = _quantize(
        tmp_path / "many",
        tiny_llama_dir,
        cfg,
        HessianConfig(micro_batch=2, compute_dtype=compute_dtype, shards=shards),
    )
    assert sorted(streams) == sorted({2: [4, 6], 3: [2, 4, 4]}[shards])  # one thread per shard, its rows only
    assert len(one) == 14  # 2 blocks × 7 linears
    assert many == one  # same keys (shards are not keyed) and the same bytes: codes, scales, zeros


def _record_streams(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The calibration rows of every block stream, each checked to run in a thread of its own."""
    import threading

    from tasks import driver

    real, rows, threads = driver.for_each_block, [], set()

    def recording(streamer, input_ids, *args, **kw):
        rows.append(int(input_ids.shape[0]))
        threads.add(threading.get_ident())
        assert len(threads) == len(rows)
        return real(streamer, input_ids, *args, **kw)

    monkeypatch.setattr(driver, "for_each_block", recording)
    return rows


def test_moe_shards_store_the_layers_of_one_process(tmp_path: Path) -> None:
    """Qwen2-MoE (routed experts, a shared expert, a dense layer): every expert group is a barrier, experts see the
    tokens routed to them in every shard, and the pooled statistics a starved expert is topped up with are merged
    once per role; the layers equal one process's."""
    from tests.helpers.models import build_tiny_family

    model_dir = build_tiny_family(tmp_path / "qwen2_moe", "qwen2_moe")
    cfg = _sequential().model_copy(update={"group_size": 32})  # moe_intermediate_size 32
    one = _quantize(tmp_path / "one", model_dir, cfg, HessianConfig(micro_batch=2))
    many = _quantize(tmp_path / "many", model_dir, cfg, HessianConfig(micro_batch=2, shards=2))
    assert any(".experts." in n for n in one) and any("shared_expert." in n for n in one)
    assert many == one


def test_killed_mid_block_resumes_with_shards(
    tmp_path: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after block 0 and o_proj of block 1 were stored: the rerun (2 shards again) replays block 0 from its
    stored layers, reuses o_proj, computes only the rest, and stores what an uninterrupted one-shard run does."""
    cfg, fwd = _sequential(), HessianConfig(micro_batch=2, shards=2)
    real = quantize_mod.ensure_artifact
    made: list[str] = []

    def dying(ctx, stage, version, config, inputs, produce, **kw):
        if stage == "qlayer" and config["layer"] == "model.layers.1.mlp.gate_proj":
            raise KeyboardInterrupt("killed")
        ref, hit = real(ctx, stage, version, config, inputs, produce, **kw)
        if stage == "qlayer" and not hit:
            made.append(config["layer"])
        return ref, hit

    monkeypatch.setattr(quantize_mod, "ensure_artifact", dying)
    with pytest.raises(KeyboardInterrupt):
        _quantize(tmp_path / "run", tiny_llama_dir, cfg, fwd)
    assert len(made) == 7 + 4 and made[-1] == "model.layers.1.self_attn.o_proj"

    def tracked(ctx, stage, version, config, inputs, produce, **kw):
        ref, hit = real(ctx, stage, version, config, inputs, produce, **kw)
        if stage == "qlayer" and not hit:
            made.append(config["layer"])
        return ref, hit

    made.clear()
    monkeypatch.setattr(quantize_mod, "ensure_artifact", tracked)
    resumed = _quantize(tmp_path / "run", tiny_llama_dir, cfg, fwd)
    assert sorted(made) == [f"model.layers.1.mlp.{p}_proj" for p in ("down", "gate", "up")]
    assert resumed == _quantize(tmp_path / "clean", tiny_llama_dir, cfg, HessianConfig(micro_batch=2))


def test_a_failing_shard_fails_the_stage_without_hanging(
    tmp_path: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One shard's forward raising breaks the barrier: the stage raises that error instead of waiting for ever."""
    from tasks import driver

    real = driver.BlockStreamer.run_block

    def flaky(self, block, hidden, **kw):
        if hidden.shape[0] == 6:  # the second shard only (rows 4-9; the first holds rows 0-3)
            raise RuntimeError("shard forward failed")
        return real(self, block, hidden, **kw)

    monkeypatch.setattr(driver.BlockStreamer, "run_block", flaky)
    with pytest.raises(RuntimeError, match="shard forward failed"):
        _quantize(tmp_path / "x", tiny_llama_dir, _sequential("block"), HessianConfig(micro_batch=2, shards=2))


def test_merged_partials_equal_one_running_sum() -> None:
    """Partials of whole micro-batches summed in shard order: Σ x xᵀ and n as one accumulator (bit for bit on
    these activations), Σ x to rounding, and MoE pooled statistics merged once for all experts sharing them."""
    import torch

    from tasks.driver import GroupStats, merge_group_stats

    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(2, 16, 24, generator=g) for _ in range(5)]
    one = GroupStats()
    for c in chunks:
        one.add(c)
    parts = []
    for a, b in ((0, 1), (1, 3), (3, 5)):
        p = GroupStats()
        for c in chunks[a:b]:
            p.add(c)
        parts.append(p)
    pools = [GroupStats(H=p.H.clone(), x_sum=p.x_sum.clone(), n=p.n) for p in parts]
    for p, pool in zip(parts, pools, strict=True):
        p.pooled = pool
    memo: dict = {}
    merged = merge_group_stats(parts, memo)
    assert merged.n == one.n == 5 * 32 and torch.equal(merged.H, one.H)
    torch.testing.assert_close(merged.x_sum, one.x_sum, rtol=1e-12, atol=1e-12)
    assert all(p.H is None and p.x_sum is None for p in parts)  # consumed: one sum held, not k + 1
    other_expert = [GroupStats(n=0, pooled=pool) for pool in pools]  # another expert of the role, same pools
    assert merge_group_stats(other_expert, memo).pooled is merged.pooled and torch.equal(merged.pooled.H, one.H)
    single = GroupStats(n=1)
    assert merge_group_stats([single]) is single
