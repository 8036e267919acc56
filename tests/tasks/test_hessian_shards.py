"""Sharded Hessian collection: the sum of shards equals one process, keys do not depend on the shard count, and a
run killed mid-shard resumes from the partials it committed."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open

from infra.settings import Settings
from tasks import hessians
from tasks.calibration import run_calibration, run_model
from tasks.hessians import run_hessians, shard_ranges
from tasks.models import resolve_model
from tasks.recipe import CalibrationConfig, HessianConfig
from tasks.stage import StageContext


@given(rows=st.integers(1, 200), shards=st.integers(1, 40), micro=st.integers(1, 16))
def test_shard_ranges_cover_rows_in_whole_micro_batches(rows: int, shards: int, micro: int) -> None:
    ranges = shard_ranges(rows, shards, micro)
    assert ranges[0][0] == 0 and ranges[-1][1] == rows
    assert all(a < b for a, b in ranges) and all(b == c for (_, b), (c, _) in itertools.pairwise(ranges))
    assert all(a % micro == 0 for a, _ in ranges)  # each shard sees the micro-batches one process would
    assert len(ranges) == min(shards, -(-rows // micro))
    sizes = [b - a for a, b in ranges[:-1]]
    assert not sizes or max(sizes) - min(sizes) <= micro


def _collect(tmp: Path, model_dir: Path, cfg: HessianConfig, **kw):
    settings = Settings(home=tmp)
    ctx = StageContext(settings=settings, store_url=(tmp / "store").as_uri(), progress=False)
    model = resolve_model(str(model_dir), settings, progress=False)
    model_ref = str(run_model(ctx, model).ref)
    cal = run_calibration(ctx, model, model_ref, CalibrationConfig(n_samples=10, seq_len=32))
    return ctx, run_hessians(ctx, model_dir, model_ref, str(cal.ref), cfg, **kw)


def _tensors(ctx: StageContext, ref: str) -> dict[str, torch.Tensor]:
    with safe_open(str(ctx.store.get(ref).file("hessians.safetensors")), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def test_sum_of_shards_equals_one_process(tmp_path: Path, tiny_llama_dir: Path) -> None:
    ctx1, one = _collect(tmp_path / "one", tiny_llama_dir, HessianConfig(micro_batch=2))
    ctx3, three = _collect(tmp_path / "three", tiny_llama_dir, HessianConfig(micro_batch=2, shards=3))
    assert three.ref == one.ref  # the shard count is not part of any key
    assert three.metadata["blocks"] == one.metadata["blocks"]
    for ref in one.metadata["blocks"]:
        a, b = _tensors(ctx1, ref), _tensors(ctx3, ref)
        assert a.keys() == b.keys()
        for k in a:
            if k.endswith(".x_sum"):  # float64 sums in another association: equal to rounding
                torch.testing.assert_close(a[k], b[k], rtol=1e-12, atol=1e-9)
            else:  # counts, dims and the stored float32 triangles: bit for bit
                assert torch.equal(a[k], b[k]), k
        assert ctx1.store.manifest(ref).metadata == ctx3.store.manifest(ref).metadata
    assert not list(ctx3.store.list("hessian-partial"))  # partials are deleted once reduced


def test_killed_mid_shard_resumes_from_committed_partials(
    tmp_path: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shard 1 dies after committing its partial of block 0: the rerun computes only what is missing (shard 1 from
    block 1 on, then the reduce), and the blocks equal an uninterrupted single-process run's bit for bit."""
    cfg = HessianConfig(micro_batch=2, shards=2)
    real = hessians.ensure_artifact
    calls: list[tuple[str, int, int | None]] = []

    def dying(ctx, stage, version, config, inputs, produce, **kw):
        calls.append((stage, config["block"], config.get("shard")))
        if stage == "hessian-partial" and config["shard"] == 1 and config["block"] == 1:
            raise KeyboardInterrupt("killed")
        return real(ctx, stage, version, config, inputs, produce, **kw)

    monkeypatch.setattr(hessians, "ensure_artifact", dying)
    with pytest.raises(KeyboardInterrupt):
        _collect(tmp_path / "run", tiny_llama_dir, cfg)
    assert ("hessian-partial", 0, 1) in calls and not any(c[0] == "hessian-block" for c in calls)
    calls.clear()

    def _tracked(ctx, stage, version, config, inputs, produce, **kw):
        calls.append((stage, config["block"], config.get("shard")))
        return real(ctx, stage, version, config, inputs, produce, **kw)

    monkeypatch.setattr(hessians, "ensure_artifact", _tracked)
    ctx, out = _collect(tmp_path / "run", tiny_llama_dir, cfg)
    n_blocks = len(out.metadata["blocks"])
    assert sorted(c for c in calls if c[0] == "hessian-partial") == [
        ("hessian-partial", b, 1) for b in range(1, n_blocks)
    ]
    assert sorted(c[1] for c in calls if c[0] == "hessian-block") == list(range(n_blocks))
    clean_ctx, clean = _collect(tmp_path / "clean", tiny_llama_dir, HessianConfig(micro_batch=2))
    assert out.ref == clean.ref
    for ref in out.metadata["blocks"]:
        assert ctx.store.manifest(ref).files[0].sha256 == clean_ctx.store.manifest(ref).files[0].sha256
    assert not list(ctx.store.list("hessian-partial"))


def test_reduces_spread_over_workers_give_the_same_blocks(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """The per-block reduces are independent jobs (the flow submits one task per block): run concurrently, in any
    completion order, they commit the same bits as one process, and the stage sees every block's ref."""
    from concurrent.futures import ThreadPoolExecutor

    seen: list[int] = []

    def map_reduce(jobs):
        assert [j.block for j in jobs] == sorted(j.block for j in jobs) and all(len(j.partials) == 3 for j in jobs)
        with ThreadPoolExecutor(max_workers=3) as pool:
            futures = [pool.submit(hessians.run_hessian_reduce, ctx_box[0], j) for j in reversed(jobs)]
            refs = [f.result() for f in futures][::-1]
        seen.extend(j.block for j in jobs)
        return refs

    ctx_box: list[StageContext] = []
    settings = Settings(home=tmp_path / "par")
    ctx = StageContext(settings=settings, store_url=(tmp_path / "par" / "store").as_uri(), progress=False)
    ctx_box.append(ctx)
    model = resolve_model(str(tiny_llama_dir), settings, progress=False)
    model_ref = str(run_model(ctx, model).ref)
    cal = run_calibration(ctx, model, model_ref, CalibrationConfig(n_samples=10, seq_len=32))
    cfg = HessianConfig(micro_batch=2, shards=3)
    par = run_hessians(ctx, tiny_llama_dir, model_ref, str(cal.ref), cfg, map_reduce=map_reduce)
    ctx1, one = _collect(tmp_path / "one", tiny_llama_dir, HessianConfig(micro_batch=2))
    assert par.ref == one.ref and seen == list(range(len(one.metadata["blocks"])))
    for ref in one.metadata["blocks"]:
        assert ctx.store.manifest(ref).files[0].sha256 == ctx1.store.manifest(ref).files[0].sha256
    assert not list(ctx.store.list("hessian-partial"))
