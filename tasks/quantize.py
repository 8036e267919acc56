"""Stage ``quantize``: one ``qlayer`` artifact per linear, then an index artifact for the stage.

``parallel`` mode: layers are independent given the fp Hessians, so the flow fans them out through Prefect's
task runner (``map_layers``). ``sequential`` mode (GPTQ-paper style): block inputs are propagated through the
already-quantized blocks, so Hessians are collected inside this stage and its keys include the calibration;
``hessians.shards`` > 1 splits that forward into calibration shards run as threads of this stage, which meet at a
barrier before each linear group is quantized (:func:`_run_sequential`).
Methods are looked up in :data:`METHODS` (``@register_method``), so new methods need no change to the flow.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from infra.errors import ConfigError, QuantpipeError
from quant.gptq import GPTQConfig, quantize_gptq
from quant.hessian import HELD_DTYPE, check_finite, finalize
from quant.incoherence import IncoherenceConfig, check_transform_size, quantize_incoherent
from quant.ldlq import LDLQConfig, quantize_ldlq
from quant.rtn import quantize_rtn
from quant.types import GridConfig, QuantizedWeight
from tasks.moe import expert_hessian, expert_report, pooled_stats_name
from tasks.qlayer import BCQLayer, LayerResult, fake_weight, layer_shape
from tasks.recipe import HessianConfig, QuantizeConfig
from tasks.stage import StageContext, StageResult, ensure_artifact, run_stage, stage_key

__all__ = [
    "LAYER_VERSION",
    "METHODS",
    "STAGE_VERSION",
    "LayerJob",
    "check_transform_sizes",
    "incoherence_config",
    "load_qlayer",
    "plan_layers",
    "quantize_layer",
    "register_method",
    "run_quantize",
]

STAGE_VERSION = 1
# 2: H held in float32 between finalize and the method (quant.hessian.HELD_DTYPE; factorizations stay float64):
#    sequential sums are rounded as parallel mode's stored ones already were (ULP-level changes to codes)
# 3: sweeps factor U = chol(H⁻¹) by a reversed Cholesky and a triangular inverse (quant.gptq.sweep_factor):
#    the same U to float64 rounding at half the flops; the column step in place on transposed columns
#    (ULP-level changes to codes); proxy_loss_exact from float32 products summed in float64
# 4: sequential mode's Grams of bf16 activations by oneDNN's bf16 GEMM (hessians BLOCK_VERSION 3)
LAYER_VERSION = 4

Method = Callable[[Tensor, Tensor | None, QuantizeConfig, str], LayerResult]
METHODS: dict[str, Method] = {}
# methods that can overwrite a Hessian their caller is done with (``_quantize_tensor(owned_h=True)``) instead of
# holding a rotated copy beside it: name -> the method called so
CONSUMING: dict[str, Method] = {}


def register_method(name: str) -> Callable[[Method], Method]:
    def deco(fn: Method) -> Method:
        METHODS[name] = fn
        return fn

    return deco


def register_consuming(name: str) -> Callable[[Method], Method]:
    def deco(fn: Method) -> Method:
        CONSUMING[name] = fn
        return fn

    return deco


def grid_config(cfg: QuantizeConfig, bits: int | None = None) -> GridConfig:
    # fp16 scales: the packed checkpoint stores fp16 scales, so coding against them keeps pack→unpack exact.
    return GridConfig(
        bits=cfg.bits if bits is None else bits,
        group_size=cfg.group_size,
        sym=cfg.sym,
        mse_clip=cfg.mse_clip,
        scale_dtype="float16_min" if cfg.fp16_min else "float16",
        scale_mode=cfg.scale_mode,
    )


@register_method("rtn")
def _rtn(W: Tensor, H: Tensor | None, cfg: QuantizeConfig, name: str) -> QuantizedWeight:
    return quantize_rtn(W, grid_config(cfg), H, name=name)


@register_method("gptq")
def _gptq(W: Tensor, H: Tensor | None, cfg: QuantizeConfig, name: str) -> QuantizedWeight:
    if H is None:
        raise ConfigError(f"GPTQ needs a Hessian for {name}")
    return quantize_gptq(W, H, _gptq_config(cfg), name=name)


def _gptq_config(cfg: QuantizeConfig) -> GPTQConfig:
    return GPTQConfig(
        grid=grid_config(cfg),
        damp=cfg.damp,
        block_size=cfg.block_size,
        act_order=cfg.act_order,
        static_groups=cfg.static_groups,
    )


def incoherence_config(cfg: QuantizeConfig) -> IncoherenceConfig:
    kind = cfg.transform_kind()
    if kind is None:
        raise ConfigError(f"method {cfg.method} uses no incoherence transforms")
    return IncoherenceConfig(kind=kind, rescale=cfg.transform.rescale, fallback=cfg.transform.fallback)


def layer_seed(cfg: QuantizeConfig, name: str) -> int:
    """Per-layer transforms: seeded by a hash of (transform.seed, layer name), independent of scheduling. The pack
    stage stores this seed instead of the drawn permutations and factors."""
    digest = hashlib.sha256(f"{cfg.transform.seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _layer_generator(cfg: QuantizeConfig, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(layer_seed(cfg, name))


def _incoherent(
    method: str, W: Tensor, H: Tensor | None, cfg: QuantizeConfig, name: str, quantizer: Any, consume: bool
) -> Any:
    if H is None:
        raise ConfigError(f"{method} needs a Hessian for {name}")
    return quantize_incoherent(
        W, H, incoherence_config(cfg), quantizer, generator=_layer_generator(cfg, name), consume_h=consume
    )


def _hadamard_gptq_(W: Tensor, H: Tensor | None, cfg: QuantizeConfig, name: str, consume: bool) -> QuantizedWeight:
    gcfg = _gptq_config(cfg)
    return _incoherent("hadamard-gptq", W, H, cfg, name, lambda Wt, Ht: quantize_gptq(Wt, Ht, gcfg, name=name), consume)


def _hadamard_e8p_(W: Tensor, H: Tensor | None, cfg: QuantizeConfig, name: str, consume: bool) -> LayerResult:
    from quant.e8p import E8PConfig, quantize_e8p_ldlq

    # widths not divisible by 8 are refused by the flow's preflight (tasks.method_checks) and by the quantizer
    ecfg = E8PConfig(bits=cfg.bits, scale=cfg.e8p.scale, damp=cfg.damp, block_size=max(8, cfg.block_size // 8 * 8))
    return _incoherent(
        "hadamard-e8p", W, H, cfg, name, lambda Wt, Ht: quantize_e8p_ldlq(Wt, Ht, ecfg, name=name), consume
    )


def _quip_(W: Tensor, H: Tensor | None, cfg: QuantizeConfig, name: str, consume: bool) -> QuantizedWeight:
    lcfg = LDLQConfig(grid=grid_config(cfg), damp=cfg.damp, static_groups=cfg.static_groups)
    return _incoherent("quip", W, H, cfg, name, lambda Wt, Ht: quantize_ldlq(Wt, Ht, lcfg, name=name), consume)


for _name, _fn in (("hadamard-gptq", _hadamard_gptq_), ("hadamard-e8p", _hadamard_e8p_), ("quip", _quip_)):
    register_method(_name)(functools.partial(_fn, consume=False))
    register_consuming(_name)(functools.partial(_fn, consume=True))


@register_method("icquant-rtn")
@register_method("icquant-gptq")
def _icquant(W: Tensor, H: Tensor | None, cfg: QuantizeConfig, name: str) -> LayerResult:
    from quant.icquant import ICQuantConfig, quantize_icquant

    base = cfg.icquant_base()
    assert base is not None
    if base == "gptq" and H is None:
        raise ConfigError(f"icquant-gptq needs a Hessian for {name}")
    o = cfg.outlier_config()
    icfg = ICQuantConfig(
        grid=grid_config(cfg), gamma=o.gamma, segment=o.segment, group_rows=o.group_rows,
        index_bits=o.index_bits, base=base,
        damp=cfg.damp, block_size=cfg.block_size, act_order=cfg.act_order,
    )  # fmt: skip
    return quantize_icquant(W, H, icfg, name=name)


@register_method("gptqt")
def _gptqt(W: Tensor, H: Tensor | None, cfg: QuantizeConfig, name: str) -> LayerResult:
    """Step-1 GPTQ at gptqt.linear_bits, exact binary coding at ``bits``; α', β' rounded to the fp16 the
    checkpoint stores, and the proxy loss measured on exactly that weight."""
    from kernels.bcq_linear import round_bcq_fp16
    from quant.gptqt import GPTQTConfig, quantize_gptqt
    from quant.hessian import proxy_loss

    if H is None:
        raise ConfigError(f"gptqt needs a Hessian for {name}")
    grid = grid_config(cfg, bits=cfg.gptqt.linear_bits)
    tcfg = GPTQTConfig(
        grid=grid, bits=cfg.bits, base="gptq", share=cfg.gptqt.share, multipliers=cfg.gptqt.multipliers,
        damp=cfg.damp, block_size=cfg.block_size, act_order=cfg.act_order,
    )  # fmt: skip
    res = quantize_gptqt(W, H, tcfg, name=name)
    weight = round_bcq_fp16(res.weight)
    stats = {k: float(v) for k, v in res.stats.items()}
    stats["proxy_loss_exact"] = proxy_loss(W, weight.dequantize(torch.float64), H)
    return BCQLayer(weight, stats)


def _mixed(W: Tensor, H: Tensor | None, cfg: QuantizeConfig, name: str, group_bits: Sequence[int]) -> LayerResult:
    from quant.mixed import split_by_bits

    grid = grid_config(cfg)
    if cfg.effective_method() == "rtn":
        qw = quantize_rtn(W, grid, H, name=name, group_bits=group_bits)
    elif cfg.effective_method() == "gptq":
        if H is None:
            raise ConfigError(f"GPTQ needs a Hessian for {name}")
        qw = quantize_gptq(W, H, _gptq_config(cfg), name=name, group_bits=group_bits)
    else:
        raise ConfigError(f"group-wise bit-widths need method rtn or gptq, not {cfg.effective_method()}")
    return split_by_bits(qw, torch.as_tensor(list(group_bits)))


@dataclass(frozen=True)
class LayerJob:
    """One linear to quantize: its full module name, its block and Hessian group, the block's H artifact, and
    (mixed precision) the bits allocated to it."""

    name: str
    block: int
    group: str
    hessian_ref: str | None
    bits: int | None = None
    group_bits: tuple[int, ...] | None = None  # group-wise mixed precision: the width of every column group

    def config(self, cfg: QuantizeConfig) -> QuantizeConfig:
        if self.group_bits is not None:
            return cfg.at_bits(max(self.group_bits))
        return cfg if self.bits is None else cfg.at_bits(self.bits)


def plan_layers(model_path: Path, cfg: QuantizeConfig, block_refs: Sequence[str | None]) -> list[LayerJob]:
    from quant.arch import mapping_for

    config = json.loads((Path(model_path) / "config.json").read_text())
    mapping = mapping_for(config.get("architectures") or [])
    skip = [re.compile(p) for p in cfg.skip]
    jobs = []
    for i, ref in enumerate(block_refs):
        for g in mapping.groups_for_layer(config, i):  # MoE layers: one group pair per expert (tasks.moe)
            for linear in g.linears:
                name = f"{mapping.blocks}.{i}.{linear}"
                if not any(p.search(name) for p in skip):
                    jobs.append(LayerJob(name, i, g.name, ref))
    return jobs


def check_transform_sizes(model_path: Path, cfg: QuantizeConfig) -> None:
    """Fail before any work when a transform method cannot rotate some layer's input or output size."""
    if cfg.transform_kind() is None:
        return
    from tasks.driver import _WeightIndex

    config = json.loads((Path(model_path) / "config.json").read_text())
    index = _WeightIndex(Path(model_path))
    icfg = incoherence_config(cfg)
    for job in plan_layers(model_path, cfg, [None] * int(config.get("num_hidden_layers", 0))):
        for size in index.entries[f"{job.name}.weight"][3]:
            try:
                check_transform_size(int(size), icfg)
            except ValueError as exc:
                raise ConfigError(f"{cfg.method} on {job.name}: {exc}") from None


def _quantize_tensor(
    W: Tensor,
    H: Tensor | None,
    cfg: QuantizeConfig,
    name: str,
    device: str = "cpu",
    group_bits: Sequence[int] | None = None,
    *,
    owned_h: bool = False,
) -> LayerResult:
    """Run the recipe's method on ``device`` (GPTQ on a GPU is what real users run); results come back on CPU.
    ``H``: the finalized proxy Hessian (:func:`quant.hessian.finalize`; the callers finalize their sums in place,
    once per group: at a 70B down_proj a copy is 6.6 GB). ``group_bits``: group-wise mixed precision (rtn/gptq),
    split into one part per width. ``owned_h``: the caller does not read H afterwards (one layer's own Hessian,
    not a group's shared one), so a rotating method may overwrite it (:data:`CONSUMING`)."""
    W = W.to(device)
    if H is not None:
        H = H.to(device)
        try:
            check_finite(H, name)
        except ValueError as exc:
            raise QuantpipeError(str(exc)) from None
    if not bool(torch.isfinite(W).all()):
        raise QuantpipeError(f"weight of {name} has NaN/Inf entries; the checkpoint is corrupt")
    try:
        if group_bits is not None:
            return _mixed(W.float(), H, cfg, name, group_bits)
        method = cfg.effective_method()
        run = CONSUMING[method] if owned_h and method in CONSUMING and H is not None else METHODS[method]
        return run(W.float(), H, cfg, name)
    except ValueError as exc:  # quant/ raises one-line ValueErrors (Cholesky failure, shapes)
        raise QuantpipeError(str(exc)) from None


def _finalized(H_sum: Tensor, n: int, name: str) -> Tensor:
    """finalize(H_sum, n) as the methods get it: float32 (``HELD_DTYPE``), in place when the sum already is (a
    stored block's triangle), and the caller's sum is this layer's (or group's) alone from here."""
    try:
        return finalize(H_sum, n, in_place=True, dtype=HELD_DTYPE)
    except ValueError as exc:
        raise QuantpipeError(f"{name}: {exc}") from None


def _qlayer_payload(q: LayerResult) -> bytes:
    from safetensors.torch import save

    from infra.safetensors_io import canonical_safetensors

    if not isinstance(q, QuantizedWeight):  # ICQuant / binary coding: their lossless packed layout
        from tasks.qlayer import save_coded

        coded, meta = save_coded(q)
        return canonical_safetensors(save({k: v.contiguous() for k, v in coded.items()}, metadata=meta))

    tensors = {
        "codes": q.codes.cpu().contiguous(),
        "scales": q.scales.cpu().contiguous(),
        "zeros": q.zeros.cpu().contiguous(),
    }
    if q.g_idx is not None:
        tensors["g_idx"] = q.g_idx.cpu().contiguous()
    for k, t in (q.transforms or {}).items():
        tensors[f"transform.{k}"] = t.cpu().contiguous()
    from infra.safetensors_io import canonical_safetensors  # metadata order is random in safetensors

    return canonical_safetensors(save(tensors, metadata={"bits": str(q.bits), "group_size": str(q.group_size)}))


def load_qlayer(ctx: StageContext, ref: str) -> LayerResult:
    from safetensors import safe_open

    path = ctx.store.get(ref).file("qweight.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    stats = ctx.store.manifest(ref).metadata.get("stats", {})
    if "format" in meta:
        from infra.errors import CorruptArtifactError
        from tasks.qlayer import load_coded

        try:
            return load_coded(t, meta, stats)
        except ValueError as exc:  # a layout this code cannot read: one line naming the artifact
            raise CorruptArtifactError(
                f"qlayer artifact {ref} cannot be read ({exc}); remove it from the store to recompute the layer"
            ) from None
    transforms = {k.removeprefix("transform."): v for k, v in t.items() if k.startswith("transform.")}
    return QuantizedWeight(
        codes=t["codes"],
        scales=t["scales"],
        zeros=t["zeros"],
        bits=int(meta["bits"]),
        group_size=int(meta["group_size"]),
        g_idx=t.get("g_idx"),
        stats=stats,
        transforms=transforms or None,
    )


def _layer_key_config(cfg: QuantizeConfig, job: LayerJob, extra_key: dict[str, Any] | None = None) -> dict[str, Any]:
    key = {**job.config(cfg).key_config(), **(extra_key or {}), "layer": job.name}
    if job.group_bits is not None:
        key["group_bits"] = list(job.group_bits)
    return key


def _layer_stage(
    ctx: StageContext,
    cfg: QuantizeConfig,
    job: LayerJob,
    inputs: dict[str, str],
    compute: Callable[[], LayerResult],
    extra_key: dict[str, Any] | None = None,
) -> str:
    config = _layer_key_config(cfg, job, extra_key)

    def produce(w: Any, _run: Any) -> None:
        q = compute()
        w.add_bytes("qweight.safetensors", _qlayer_payload(q))
        w.metadata.update(
            {"layer": job.name, "block": job.block, "stats": q.stats, "shape": list(layer_shape(q)), "bits": q.bits}
        )

    ref, _hit = ensure_artifact(ctx, "qlayer", LAYER_VERSION, config, inputs, produce)
    return str(ref)


def quantize_layer(ctx: StageContext, model_path: Path, model_ref: str, job: LayerJob, cfg: QuantizeConfig) -> str:
    """Parallel mode: quantize one linear from the fp weights and its block's Hessian artifact."""
    from tasks.driver import _WeightIndex
    from tasks.hessians import load_block_hessians

    assert job.hessian_ref is not None

    def compute() -> LayerResult:
        W = _WeightIndex(Path(model_path)).get(f"{job.name}.weight")
        pooled = pooled_stats_name(job.group)
        stats = load_block_hessians(ctx, job.hessian_ref, [job.group] + ([pooled] if pooled else []))
        H_sum, n, record = expert_hessian(job.group, *stats[job.group], stats.get(pooled) if pooled else None)
        device = ctx.settings.resolved_device()
        del stats  # H_sum is this layer's alone from here: finalized in place
        H = _finalized(H_sum, n, job.name)
        # H is this layer's alone (loaded for it): a rotating method writes its rotated H into H's memory
        q = _quantize_tensor(W, H, job.config(cfg), job.name, device, job.group_bits, owned_h=True)
        return _with_stats(q, record)

    return _layer_stage(ctx, cfg, job, {"model": model_ref, "hessians": job.hessian_ref}, compute)


def _with_stats(q: LayerResult, record: dict[str, float]) -> LayerResult:
    """An expert's routed and pooled token counts join the layer's stats (so the artifact and index record them)."""
    q.stats.update(record)
    return q


MapLayers = Callable[[list[LayerJob]], list[str]]


def run_quantize(
    ctx: StageContext,
    model_path: Path,
    model_ref: str,
    cfg: QuantizeConfig,
    *,
    hessians_ref: str | None,
    cal_ref: str | None,
    block_refs: Sequence[str] | None,
    map_layers: MapLayers | None = None,
    progress: Callable[[int], None] | None = None,
    forward: HessianConfig | None = None,
) -> StageResult:
    """``map_layers`` runs the per-layer jobs (Prefect task runner in flows; a plain loop by default).

    ``forward`` (the recipe's ``hessians`` section) sets the calibration forward of ``sequential`` mode, which
    collects its Hessians itself; a non-default compute dtype is part of the sequential keys."""
    if cfg.mode == "parallel":
        if hessians_ref is None or block_refs is None:
            raise ConfigError("parallel quantization needs the hessians stage output")
        inputs = {"model": model_ref, "hessians": hessians_ref}
    else:
        if cal_ref is None:
            raise ConfigError("sequential quantization needs the calibration stage output")
        inputs = {"model": model_ref, "calibration": cal_ref}
    config = {**cfg.key_config(), **_sequential_forward_key(cfg, forward)}

    def produce(w: Any, run: Any) -> None:
        allocation: dict[str, Any] | None = None
        if cfg.mode == "parallel":
            assert block_refs is not None
            jobs = plan_layers(model_path, cfg, list(block_refs))
            if cfg.bitalloc is not None:  # mixed precision: bits per layer from the cached Hessians
                from tasks.allocation import allocate_layers

                jobs, allocation = allocate_layers(ctx, model_path, jobs, cfg)

            def default_map(js: list[LayerJob]) -> list[str]:
                return [quantize_layer(ctx, model_path, model_ref, j, cfg) for j in js]

            refs = (map_layers or default_map)(jobs)
        else:
            jobs, refs = _run_sequential(ctx, model_path, model_ref, cal_ref or "", cfg, progress, forward)
        layers = {}
        for job, ref in zip(jobs, refs, strict=True):
            meta = ctx.store.manifest(ref).metadata
            bits = meta.get("bits", job.bits or cfg.bits)
            layers[job.name] = {"ref": ref, "block": job.block, "bits": bits, **meta.get("stats", {})}
        w.add_bytes("index.json", json.dumps({"layers": layers}, indent=1, sort_keys=True).encode())
        if any("routed_tokens" in v for v in layers.values()):  # MoE: expert policy and token counts
            report = expert_report(layers)
            w.add_bytes("experts.json", json.dumps(report, indent=1, sort_keys=True).encode())
            w.metadata.update({"expert_policy": report["policy"], "experts_topped_up": len(report["topped_up"])})
        total = sum(float(v.get("proxy_loss_exact", v.get("proxy_loss", 0.0))) for v in layers.values())
        w.metadata.update({"n_layers": len(layers), "proxy_loss_total": total})
        if allocation is not None:
            w.add_bytes("allocation.json", json.dumps(allocation, indent=1, sort_keys=True).encode())
            w.metadata.update({"bitalloc_budget": allocation["budget"], "bitalloc_avg_bits": allocation["avg_bits"]})
            if run is not None:
                run.log_metrics({"bitalloc_avg_bits": allocation["avg_bits"], "bitalloc_budget": allocation["budget"]})
                for step, (_name, b) in enumerate(sorted(allocation["bits"].items())):
                    run.log_metrics({"layer_bits": float(b)}, step=step)
        if run is not None:
            for step, (_name, v) in enumerate(sorted(layers.items())):
                if "proxy_loss" in v:
                    run.log_metrics({"layer_proxy_loss": float(v["proxy_loss"])}, step=step)
            run.log_metrics({"proxy_loss_total": total, "n_layers": float(len(layers))})

    def after(ref: Any, run: Any, hit: bool) -> dict[str, Any]:
        return {"n_layers": ctx.store.manifest(ref).metadata["n_layers"]}

    return run_stage(ctx, "quantize", STAGE_VERSION, config, inputs, produce, after=after)


def _sequential_forward_key(cfg: QuantizeConfig, forward: HessianConfig | None) -> dict[str, Any]:
    """Sequential mode collects its own Hessians, so the collector's version and the forward's dtype (when not
    the default fp32) are part of what its layers depend on."""
    if cfg.mode != "sequential":
        return {}
    from tasks.hessians import STAGE_VERSION as HESSIANS_VERSION

    key: dict[str, Any] = {"hessians_version": HESSIANS_VERSION}
    if forward is not None and forward.first_token_weight != 1.0:
        key["first_token_weight"] = forward.first_token_weight
    if forward is not None and forward.compute_dtype != "float32":
        key["forward_dtype"] = forward.compute_dtype
        # 2: the sweep no longer inherits the bf16 forward's autocast (quant.precision); layers swept partly in
        # bf16 by earlier versions must not be reused.
        key["sweep"] = 2
    return key


def _run_sequential(
    ctx: StageContext,
    model_path: Path,
    model_ref: str,
    cal_ref: str,
    cfg: QuantizeConfig,
    progress: Callable[[int], None] | None,
    forward: HessianConfig | None = None,
) -> tuple[list[LayerJob], list[str]]:
    """Hessians from the activations of the already-quantized model: per linear group (``sequential_scope:
    group``, one forward per block) or per block (``block``: collect, quantize, re-forward).

    ``hessians.shards`` = k > 1 splits the calibration samples into k contiguous shards aligned to ``micro_batch``
    (:func:`tasks.hessians.shard_ranges`), each with its own copy of the streamed block and its own slice of the
    hidden states, run as k threads inside this stage (on whatever worker runs the stage: with ``--dask`` the
    stage is one task, not one task per shard — the shards meet at a barrier several times per block, which a
    task per shard could only do by round-tripping hidden states and intermediates through the store). At each
    barrier (per group with scope ``group``, per block with ``block``; every group of a sparse MoE block) the
    shards hand in partial statistics, the last one to arrive sums them in shard order and quantizes the group's
    layers, and every shard writes the same quantized weights into its copy before it forwards on. Each shard
    runs the very micro-batches one process would, so only the float64 association of the per-chunk Gram
    products changes (see :func:`tasks.driver.merge_group_stats`); layer keys do not depend on the shard count,
    and a killed run resumes at the first block whose layers are not all stored, as with one shard."""

    from tasks.driver import KEEP_BYTES, BlockStreamer, for_each_block
    from tasks.hessians import forward_context, load_tokens, shard_ranges

    fwd = forward or HessianConfig()
    device = ctx.settings.resolved_device()
    streamer = BlockStreamer(model_path, device=device)
    jobs = plan_layers(model_path, cfg, [None] * streamer.n_blocks)
    inputs = {"model": model_ref, "calibration": cal_ref}
    fkey = _sequential_forward_key(cfg, forward)
    refs: dict[str, str] = {}

    def layer_ref(job: LayerJob) -> str:
        return str(stage_key("qlayer", LAYER_VERSION, _layer_key_config(cfg, job, fkey), inputs))

    # decided once, before any shard starts, so every shard takes the same path through every block
    done = [all(ctx.store.exists(layer_ref(j)) for j in jobs if j.block == i) for i in range(streamer.n_blocks)]
    # the forward stops at the last block still to quantize, whose outputs are not computed (they feed nothing)
    last = max((i for i, d in enumerate(done) if not d), default=-1)

    def weights_of(i: int, block_jobs: Sequence[LayerJob]) -> dict[str, Tensor]:
        """The stored layers' fake-quantized weights, by module name inside block ``i``."""
        prefix = streamer.block_name(i) + "."
        return {job.name[len(prefix) :]: fake_weight(load_qlayer(ctx, refs[job.name])) for job in block_jobs}

    def stored(i: int, block_jobs: Sequence[LayerJob]) -> dict[str, Tensor]:
        for job in block_jobs:
            refs[job.name] = layer_ref(job)
        return weights_of(i, block_jobs)

    def quantize_jobs(
        i: int, block: Any, block_jobs: Sequence[LayerJob], stats_of: Callable[[LayerJob], Any]
    ) -> dict[str, Tensor]:
        """Quantize ``block_jobs`` (stored layers are reused) from ``block``'s fp weights; their fake weights.

        Each group's sum is finalized once, when its first linear needs it, into the float32 H its linears (q/k/v,
        gate/up) share, and the float64 sum is dropped: at a 70B down_proj that is 3.3 GB held instead of the
        sum plus one copy per linear (6.6 GB each)."""
        prefix = streamer.block_name(i) + "."
        hessians: dict[str, tuple[Tensor, dict[str, float]]] = {}

        def group_hessian(job: LayerJob, s: Any) -> tuple[Tensor, dict[str, float]]:
            if job.group not in hessians:
                pooled = (s.pooled.H, s.pooled.n) if s.pooled is not None else None
                H_sum, n, record = expert_hessian(job.group, s.H, s.n, pooled)
                s.H = None  # the float64 sum is freed once its float32 H exists (pooled sums are other objects)
                hessians[job.group] = (_finalized(H_sum, n, job.name), record)
                del H_sum
            return hessians[job.group]

        for job in block_jobs:
            # the live weight, not a copy: the block is only overwritten (``install``) after every job is quantized
            W = block.get_submodule(job.name[len(prefix) :]).weight.detach()
            s = stats_of(job)

            def compute(W: Tensor = W, s: Any = s, job: LayerJob = job) -> LayerResult:
                H, record = group_hessian(job, s)
                return _with_stats(_quantize_tensor(W, H, cfg, job.name, streamer.device.type), record)

            refs[job.name] = _layer_stage(ctx, cfg, job, inputs, compute, fkey)
        return weights_of(i, block_jobs)

    def shard_visit(st: BlockStreamer, meet: _Meet, keep_bytes: int) -> Callable[[int, Any, Tensor], Tensor | None]:
        """One shard's block visit; ``meet(partial, step)`` returns ``step`` run once on every shard's partial.
        ``keep_bytes``: this shard's share of the intermediates one process keeps (memory only, same results)."""
        from tasks.driver import collect_block_hessians, merge_group_stats, quantize_block_by_group

        def visit(i: int, block: Any, hidden: Tensor) -> Tensor | None:
            block_jobs = [j for j in jobs if j.block == i]
            merged: dict[tuple[int, ...], Any] = {}  # MoE: the pooled statistics every expert of a role shares

            def install(weights: dict[str, Tensor]) -> None:
                for name, w in weights.items():
                    block.get_submodule(name).weight.data.copy_(w)

            def merged_stats(parts: list[Any]) -> Callable[[LayerJob], Any]:
                """Each group's statistics, merged once (the shards' partials are a dict per shard in block scope)."""
                cache: dict[str, Any] = {}

                def of(job: LayerJob) -> Any:
                    if job.group not in cache:
                        shards = [p[job.group] if isinstance(p, dict) else p for p in parts]
                        cache[job.group] = merge_group_stats(shards, merged)
                    return cache[job.group]

                return of

            def quantize_group(group: str, s: Any) -> None:
                group_jobs = [j for j in block_jobs if j.group == group]
                install(meet(s, lambda parts: quantize_jobs(i, block, group_jobs, merged_stats(parts))))

            if done[i]:
                install(meet(None, lambda _parts: stored(i, block_jobs)))
            elif cfg.sequential_scope == "group":  # one forward: each group quantized before the next one's input
                return quantize_block_by_group(
                    st,
                    block,
                    hidden,
                    quantize_group,
                    micro_batch=fwd.micro_batch,
                    keep_bytes=keep_bytes,
                    first_token_weight=fwd.first_token_weight,
                    outputs=i < last,
                )
            else:  # llm-compressor's order: every group's Hessian from the block's fp weights, then re-forward
                stats, _ = collect_block_hessians(
                    st, block, hidden, micro_batch=fwd.micro_batch, first_token_weight=fwd.first_token_weight
                )

                install(meet(stats, lambda parts: quantize_jobs(i, block, block_jobs, merged_stats(parts))))
            return st.run_block(block, hidden, micro_batch=fwd.micro_batch) if i < last else None

        return visit

    def autocast() -> Any:  # thread-local: entered by every shard's thread
        return forward_context(streamer.device.type, fwd)

    ids = load_tokens(ctx, cal_ref)
    ranges = shard_ranges(int(ids.shape[0]), fwd.shards, fwd.micro_batch)
    if len(ranges) == 1:
        with autocast():
            visit = shard_visit(streamer, lambda partial, step: step([partial]), KEEP_BYTES)
            for_each_block(streamer, ids, visit, progress=progress, micro_batch=fwd.micro_batch, until=last)
    else:
        streamers = [streamer] + [BlockStreamer(model_path, device=device) for _ in ranges[1:]]
        threads = torch.get_num_threads()  # what the flow gave this stage (all the cores it may use)
        meeting = _ShardMeeting(len(ranges), forward_threads=max(1, threads // len(ranges)), step_threads=threads)

        def run_shard(s: int) -> None:
            a, b = ranges[s]
            try:
                with autocast():
                    visit = shard_visit(
                        streamers[s], lambda partial, step: meeting.meet(s, partial, step), KEEP_BYTES // len(ranges)
                    )
                    for_each_block(
                        streamers[s],
                        ids[a:b],
                        visit,
                        progress=progress if s == 0 else None,
                        micro_batch=fwd.micro_batch,
                        until=last,
                    )
            except BaseException:
                meeting.abort()  # the other shards would wait at the next barrier for ever
                raise

        torch.set_num_threads(meeting.forward_threads)
        try:
            _run_threads(run_shard, len(ranges), "sequential-shard", on_error=meeting.abort)
        finally:
            torch.set_num_threads(threads)
    for job in jobs:  # the stored blocks after ``last`` were not visited
        refs.setdefault(job.name, layer_ref(job))
    return jobs, [refs[j.name] for j in jobs]


_Meet = Callable[[Any, Callable[[list[Any]], Any]], Any]


class _ShardMeeting:
    """The barrier of sequential shards (threads): every shard hands in its partial; when the last one arrives,
    shard 0's ``step`` runs once on all partials in shard order (in the arriving thread, while the others wait),
    and every shard gets its result. torch's intra-op threads (one process-wide setting) are split between the
    shards while they forward, and all given to the step, which runs alone."""

    def __init__(self, parties: int, *, forward_threads: int, step_threads: int) -> None:
        import threading

        self.forward_threads, self.step_threads = forward_threads, step_threads
        self._partials: list[Any] = [None] * parties
        self._steps: list[Callable[[list[Any]], Any] | None] = [None] * parties
        self._result: Any = None
        self._barrier = threading.Barrier(parties, action=self._act)

    def _act(self) -> None:
        step = self._steps[0]
        assert step is not None
        parts, self._partials = self._partials, [None] * len(self._partials)
        torch.set_num_threads(self.step_threads)
        try:
            self._result = step(parts)
        finally:
            torch.set_num_threads(self.forward_threads)

    def meet(self, shard: int, partial: Any, step: Callable[[list[Any]], Any]) -> Any:
        self._partials[shard] = partial
        self._steps[shard] = step
        self._barrier.wait()  # BrokenBarrierError when another shard failed or the step raised
        return self._result  # read before this shard can reach the next barrier, so no later step overwrites it

    def abort(self) -> None:
        self._barrier.abort()


def _run_threads(fn: Callable[[int], None], n: int, name: str, *, on_error: Callable[[], None]) -> None:
    """``fn(0) … fn(n-1)`` in n threads; the first real failure is raised (not the broken barriers it caused).
    ``on_error``: what stops the threads at their next barrier when this thread is interrupted (Ctrl-C)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=n, thread_name_prefix=name) as pool:
        futures = [pool.submit(fn, s) for s in range(n)]
        try:
            errors = [e for e in (f.exception() for f in futures) if e is not None]
        except BaseException:
            on_error()
            raise
    real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
    if real or errors:
        raise (real or errors)[0]
