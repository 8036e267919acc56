"""Mixed precision inside the quantize stage: bits per layer (or per column group) from the cached fp Hessians
(no forward pass).

Each linear's sensitivity L(b) is the expected proxy loss of b-bit rounding on its own grids
(``quant.bitalloc.hessian_sensitivity``: Σ_{r,g} Δ_{r,g}²/12 · Σ_{j∈g} H_jj), and ``allocate_bits`` picks the
bits minimising Σ L under the recipe's average-bits budget (weighted by parameter count). The allocation and the
realised average are recorded in the quantize artifact (``allocation.json``) and logged as metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from infra.errors import ConfigError
from tasks.recipe import QuantizeConfig
from tasks.stage import StageContext

__all__ = ["allocate_layers"]


def allocate_layers(
    ctx: StageContext, model_path: Path, jobs: Sequence[Any], cfg: QuantizeConfig
) -> tuple[list[Any], dict[str, Any]]:
    """(jobs with ``bits`` set, summary {budget, avg_bits, bits, loss, uniform_*}) for ``cfg.bitalloc``."""
    from quant.bitalloc import GROUP_SEP, BitAllocConfig, allocate_bits, hessian_group_sensitivity, hessian_sensitivity
    from quant.hessian import finalize
    from tasks.driver import _WeightIndex
    from tasks.hessians import load_block_hessians
    from tasks.moe import expert_hessian, pooled_stats_name

    ba = cfg.bitalloc
    assert ba is not None
    index = _WeightIndex(Path(model_path))
    items = []
    by_block: dict[str, list[Any]] = {}
    for job in jobs:
        if job.hessian_ref is None:
            raise ConfigError("bit allocation needs the hessians stage output (parallel mode)")
        by_block.setdefault(job.hessian_ref, []).append(job)
    for ref, block_jobs in by_block.items():
        names = {j.group for j in block_jobs}
        pooled = {j.group: pooled_stats_name(j.group) for j in block_jobs}  # MoE experts: topped up (tasks.moe)
        hs = load_block_hessians(ctx, ref, sorted(names | {p for p in pooled.values() if p}))
        for job in block_jobs:
            p = pooled[job.group]
            H_sum, n, _ = expert_hessian(job.group, *hs[job.group], hs[p] if p else None)
            W = index.get(f"{job.name}.weight").float()
            args = (job.name, W, finalize(H_sum, n), ba.candidate_bits, cfg.group_size)
            relative = ba.sensitivity == "relative"
            if ba.granularity == "group":
                items.extend(hessian_group_sensitivity(*args, relative=relative))
            else:
                items.append(hessian_sensitivity(*args, relative=relative))
    try:
        res = allocate_bits(
            items, BitAllocConfig(avg_bits=ba.avg_bits, candidate_bits=ba.candidate_bits, method=ba.method)
        )
    except ValueError as exc:
        raise ConfigError(f"quantize.bitalloc: {exc}") from None
    summary = {
        "budget": res.budget,
        "avg_bits": res.avg_bits,
        "bits": res.bits,
        "estimated_loss": res.total_loss,
        "uniform_bits": res.uniform_bits,
        "uniform_estimated_loss": res.uniform_loss,
        "method": res.method,
        "exact": res.exact,
        "granularity": ba.granularity,
        "sensitivity": ba.sensitivity,
    }
    if ba.granularity == "layer":
        return [replace(j, bits=res.bits[j.name]) for j in jobs], summary
    n_params = {it.name: it.n_params for it in items}
    groups: dict[str, dict[int, int]] = {}
    stored: dict[str, list[int]] = {}  # layer → [Σ n·b, Σ n]
    for item, b in res.bits.items():
        name, _, g = item.rpartition(GROUP_SEP)
        groups.setdefault(name, {})[int(g)] = b
        acc = stored.setdefault(name, [0, 0])
        acc[0] += b * n_params[item]
        acc[1] += n_params[item]
    widths = {name: tuple(gb[g] for g in range(len(gb))) for name, gb in groups.items()}
    summary["layer_avg_bits"] = {name: nb / n for name, (nb, n) in stored.items()}
    return [replace(j, group_bits=widths[j.name]) for j in jobs], summary
