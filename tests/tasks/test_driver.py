"""The block driver's true-sequential pass against the obvious two-forward reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from quant.hessian import finalize
from quant.rtn import quantize_rtn
from quant.types import GridConfig
from tasks.driver import BlockStreamer, GroupStats, collect_block_hessians, quantize_block_by_group


def _rtn(w: torch.Tensor) -> torch.Tensor:
    return quantize_rtn(w, GridConfig(bits=3, group_size=16)).dequantize().to(w.dtype)


@pytest.fixture(scope="module")
def streamer(tiny_llama_dir: Path) -> BlockStreamer:
    return BlockStreamer(tiny_llama_dir)


def _hidden(streamer: BlockStreamer, n: int = 5, seq: int = 24) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return streamer.embed(torch.randint(0, streamer.config.vocab_size, (n, seq), generator=gen))


def test_untouched_weights_match_one_plain_forward(streamer: BlockStreamer) -> None:
    hidden = _hidden(streamer)
    with streamer.loaded(streamer.block_name(0)) as block:
        ref_stats, ref_out = collect_block_hessians(streamer, block, hidden, micro_batch=2)
        got: dict[str, GroupStats] = {}
        out = quantize_block_by_group(streamer, block, hidden, lambda g, s: got.__setitem__(g, s), micro_batch=2)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    assert list(got) == ["attn_in", "o_in", "mlp_in", "down_in"]
    for g, s in got.items():
        assert s.n == ref_stats[g].n
        torch.testing.assert_close(finalize(s.H, s.n), finalize(ref_stats[g].H, ref_stats[g].n), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("keep_bytes", [2 << 30, 0])  # kept down_proj inputs, and recomputed ones
def test_each_group_sees_the_quantized_groups_before_it(streamer: BlockStreamer, keep_bytes: int) -> None:
    """Reference: quantize the groups one at a time, re-running the whole block to collect the next Hessian."""
    hidden = _hidden(streamer)
    groups = streamer.mapping.groups
    with streamer.loaded(streamer.block_name(1)) as block:
        fp = {n: p.detach().clone() for n, p in block.named_parameters()}
        ref_H = {}
        for g in groups:
            stats, _ = collect_block_hessians(streamer, block, hidden, micro_batch=3)
            ref_H[g.name] = finalize(stats[g.name].H, stats[g.name].n)
            for lin in g.linears:
                w = block.get_submodule(lin).weight
                w.data.copy_(_rtn(w.data))
        ref_out = streamer.run_block(block, hidden, micro_batch=3)

        with torch.no_grad():
            for n, p in block.named_parameters():
                p.copy_(fp[n])
        got_H = {}

        def quantize_group(name: str, s: GroupStats) -> None:
            got_H[name] = finalize(s.H, s.n)
            for lin in next(g for g in groups if g.name == name).linears:
                w = block.get_submodule(lin).weight
                w.data.copy_(_rtn(w.data))

        out = quantize_block_by_group(streamer, block, hidden, quantize_group, micro_batch=3, keep_bytes=keep_bytes)
        with torch.no_grad():
            for n, p in block.named_parameters():
                p.copy_(fp[n])
        fp_stats, _ = collect_block_hessians(streamer, block, hidden, micro_batch=3)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for g in groups:
        torch.testing.assert_close(got_H[g.name], ref_H[g.name], rtol=1e-5, atol=1e-7)
    # the o_proj Hessian differs from the fp-weights one: q/k/v were quantized first
    assert not torch.allclose(ref_H["o_in"], finalize(fp_stats["o_in"].H, fp_stats["o_in"].n), rtol=1e-3)


def test_bf16_calibration_forward_sees_weights_written_after_it(streamer: BlockStreamer) -> None:
    """Under the calibration's bf16 autocast a forward after a weight was overwritten (a block-scope sequential
    step: collect, quantize, re-forward) uses the new weight, and blocks freed inside the context leave no bf16
    copies behind. With autocast's weight-cast cache on, the second forward reused the stale fp cast."""
    from tasks.hessians import forward_context
    from tasks.recipe import HessianConfig

    hidden = _hidden(streamer)
    with forward_context("cpu", HessianConfig(compute_dtype="bfloat16")):
        with streamer.loaded(streamer.block_name(0)) as block:
            _stats, before = collect_block_hessians(streamer, block, hidden, micro_batch=2)
            for mod in block.modules():
                if isinstance(mod, torch.nn.Linear):
                    mod.weight.data.copy_(_rtn(mod.weight.data))
            after = streamer.run_block(block, hidden, micro_batch=2)
        with streamer.loaded(streamer.block_name(0)) as fp_block:  # fresh fp parameters
            again = streamer.run_block(fp_block, hidden, micro_batch=2)
    assert not torch.equal(before, after)  # the quantized weights were used
    torch.testing.assert_close(again, before, rtol=0, atol=0)


def test_the_last_block_quantizes_without_computing_outputs(streamer: BlockStreamer) -> None:
    """``outputs=False`` (the last block: its outputs feed nothing) sees the same statistics and returns None."""
    hidden = _hidden(streamer)
    runs: list[dict[str, GroupStats]] = [{}, {}]
    for run, outputs in zip(runs, (True, False), strict=True):
        with streamer.loaded(streamer.block_name(0)) as block:

            def quantize_group(name: str, s: GroupStats, block: torch.nn.Module = block, run: dict = run) -> None:
                run[name] = s
                for lin in next(g for g in streamer.mapping.groups if g.name == name).linears:
                    w = block.get_submodule(lin).weight
                    w.data.copy_(_rtn(w.data))

            out = quantize_block_by_group(streamer, block, hidden, quantize_group, micro_batch=2, outputs=outputs)
        assert (out is None) == (not outputs)
    assert list(runs[0]) == list(runs[1])
    for g in runs[0]:
        torch.testing.assert_close(runs[1][g].H, runs[0][g].H, rtol=0, atol=0)


def test_for_each_block_does_not_forward_past_what_is_needed(
    streamer: BlockStreamer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blocks after ``until`` are not loaded, and the last block run is not forwarded when its visit leaves no
    outputs; every earlier block is (its outputs are the next one's inputs)."""
    from tasks.driver import for_each_block

    forwarded: list[int] = []
    visited: list[int] = []
    run_block = streamer.run_block

    def counting(block: torch.nn.Module, hidden: torch.Tensor, **kw: object) -> torch.Tensor:
        forwarded.append(visited[-1])
        return run_block(block, hidden, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(streamer, "run_block", counting)
    ids = torch.randint(0, streamer.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    assert streamer.n_blocks == 2
    for_each_block(streamer, ids, lambda i, _b, _h: visited.append(i), micro_batch=2)
    assert (visited, forwarded) == ([0, 1], [0])
    visited.clear()
    forwarded.clear()
    for_each_block(streamer, ids, lambda i, _b, _h: visited.append(i), micro_batch=2, until=0)
    assert (visited, forwarded) == ([0], [])
