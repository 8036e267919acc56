"""Stages ``eval-fp`` and ``evaluate``: WikiText-2 perplexity by the GPTQ protocol (BENCHMARKS.md).

Protocol: lines of ``wiki.test.raw`` (whitespace-only → ""), joined by blank lines, tokenized once without special
tokens; non-overlapping windows of ``seq_len`` (tail dropped), each scored alone; ppl = exp(ΣNLL / #predicted).
The fp baseline is its own artifact keyed by (model, protocol), computed once. The quantized model is evaluated
from the packed checkpoint (``QuantLinear`` modules), never from in-memory fake-quantized weights.
"""

from __future__ import annotations

import functools
import json
import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from tasks.recipe import EvalConfig
from tasks.stage import StageContext, StageResult, ensure_artifact, run_stage

__all__ = [
    "FP_VERSION",
    "STAGE_VERSION",
    "check_fits_in_memory",
    "check_not_degenerate",
    "eval_windows",
    "perplexity",
    "run_eval_fp",
    "run_evaluate",
]

STAGE_VERSION = 2  # 2: hub-identical text (rows keep line breaks)
FP_VERSION = 2


def eval_windows(model_path: Path, cfg: EvalConfig, ctx: StageContext) -> torch.Tensor:
    from tasks.calibration import load_texts
    from tasks.models import load_tokenizer

    text, _ = load_texts(cfg.dataset, ctx.settings, split="test")
    ids = load_tokenizer(model_path)(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    n = ids.numel() // cfg.seq_len
    if cfg.n_windows:
        n = min(n, cfg.n_windows)
    if n == 0:
        from infra.errors import ConfigError

        raise ConfigError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {cfg.seq_len}")
    return ids[: n * cfg.seq_len].reshape(n, cfg.seq_len)


@torch.no_grad()
def perplexity(
    model: Any,
    windows: torch.Tensor,
    *,
    batch_size: int = 1,
    device: str = "cpu",
    progress: Callable[[int], None] | None = None,
) -> dict[str, float]:
    nll, count = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size].to(device)
        logits = model(batch, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        nll += float(loss)
        count += batch[:, 1:].numel()
        if progress is not None:
            progress(start + batch.shape[0])
    return {
        "ppl": math.exp(nll / count),
        "nll_sum": nll,
        "predicted_tokens": float(count),
        "windows": float(windows.shape[0]),
    }


WINDOW_VERSION = 1


def cached_perplexity(
    ctx: StageContext,
    target_ref: str,
    make_model: Callable[[], Any],
    windows: torch.Tensor,
    cfg: EvalConfig,
    *,
    device: str = "cpu",
    progress: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Perplexity from per-window ``eval-window`` artifacts (keyed by target, protocol and window index).

    Windows already scored for this target are read back, so changing ``n_windows`` only scores the new ones
    (fewer windows: nothing at all); the model is loaded only if some window is missing.
    """
    model: Any = None
    scored: dict[int, dict[str, Any]] = {}

    def score(i: int) -> dict[str, Any]:
        """Window ``i``'s result; a missing window is scored together with the next ``batch_size - 1`` ones."""
        nonlocal model
        if i not in scored:
            if model is None:
                model = make_model()
            batch = windows[i : i + cfg.batch_size].to(device)
            with torch.no_grad():
                logits = model(batch, use_cache=False).logits.float()
            losses = torch.nn.functional.cross_entropy(
                logits[:, :-1].transpose(1, 2), batch[:, 1:], reduction="none"
            ).sum(dim=1)
            for j, loss in enumerate(losses.tolist()):
                scored[i + j] = {"nll": float(loss), "tokens": int(batch.shape[1] - 1)}
        return scored.pop(i)

    nll, count = 0.0, 0
    for i in range(windows.shape[0]):

        def produce(w: Any, _run: Any, i: int = i) -> None:
            result = score(i)
            w.add_bytes("nll.json", json.dumps(result).encode())
            w.metadata.update(result)

        config = {"dataset": cfg.dataset, "seq_len": cfg.seq_len, "window": i}
        ref, _ = ensure_artifact(ctx, "eval-window", WINDOW_VERSION, config, {"target": target_ref}, produce)
        meta = ctx.store.manifest(ref).metadata
        nll += float(meta["nll"])
        count += int(meta["tokens"])
        if progress is not None:
            progress(i)
    return {
        "ppl": math.exp(nll / count),
        "nll_sum": nll,
        "predicted_tokens": float(count),
        "windows": float(windows.shape[0]),
    }


def _safetensors_bytes(model_dir: Path, *, as_float32: bool) -> int:
    """Bytes the tensors of a checkpoint take once loaded (headers only): as stored, or every float as fp32.
    Each header is first validated by the model loader's checks (length, offsets, dtypes), so a lying header is a
    one-line error here too, never a huge read."""
    import struct

    from tasks.models import _safetensors_shapes

    sizes = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
    total = 0
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        _safetensors_shapes(f)
        with f.open("rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            n = math.prod(entry["shape"])
            dtype = entry["dtype"]
            total += n * (4 if as_float32 and dtype in ("F16", "BF16", "F32") else sizes.get(dtype, 4))
    return total


def check_not_degenerate(ppl: float, ppl_fp: float, vocab: int | None, what: str) -> None:
    """Refuse to record (and so to register) a build that predicts no better than chance while its fp model
    does: NaN/inf perplexity, or ppl within 10 % of the vocabulary size (a uniform guess) when the fp model is
    below half of it. Such a build is broken (uninitialised buffers, inf activations), not merely bad: a
    Gemma-3 pack once registered with ppl 262,143.5 = its vocabulary size. Random test models, whose fp ppl is
    itself near the vocabulary size, are not affected."""
    from infra.errors import QuantpipeError

    uniform = vocab is not None and ppl_fp < 0.5 * vocab and ppl >= 0.9 * vocab
    if not math.isfinite(ppl) or uniform:
        raise QuantpipeError(
            f"{what} scores ppl {ppl:.6g} (fp {ppl_fp:.4g}, vocabulary {vocab}): no better than a uniform guess, so "
            "the packed model is broken (NaN/inf or uninitialised weights or buffers); not recording or registering it"
        )


def check_fits_in_memory(need_bytes: int, what: str, *, available_bytes: int | None = None) -> None:
    """Refuse in one line, before loading, a model that cannot fit: evaluation holds the whole model (plus
    ~20 % for activations and loader copies), and an OOM kill would lose the run with no message at all."""
    if available_bytes is None:
        import psutil

        available_bytes = int(psutil.virtual_memory().available)
    need = int(need_bytes * 1.2) + (256 << 20)
    if need > available_bytes:
        from infra.errors import ConfigError

        raise ConfigError(
            f"evaluating {what} needs about {need / 2**30:.1f} GiB of memory but {available_bytes / 2**30:.1f} GiB "
            "is available: evaluate on a machine with more memory (or a GPU: QUANTPIPE_DEVICE=cuda), or free memory"
        )


def run_eval_fp(
    ctx: StageContext, model_path: Path, model_ref: str, cfg: EvalConfig, progress: Callable[[int], None] | None = None
) -> StageResult:
    from tasks.models import load_model

    def produce(w: Any, run: Any) -> None:
        device = ctx.settings.resolved_device()
        if device == "cpu":
            check_fits_in_memory(_safetensors_bytes(model_path, as_float32=True), f"the fp model {model_path.name}")
        windows = eval_windows(model_path, cfg, ctx)
        metrics = cached_perplexity(
            ctx,
            model_ref,
            lambda: load_model(model_path, device=device),
            windows,
            cfg,
            device=device,
            progress=progress,
        )
        w.add_bytes("metrics.json", json.dumps(metrics, indent=1).encode())
        w.metadata.update(metrics)
        if run is not None:
            run.log_metrics(metrics)

    def after(ref: Any, run: Any, hit: bool) -> dict[str, Any]:
        return {"ppl": ctx.store.manifest(ref).metadata["ppl"]}

    return run_stage(ctx, "eval-fp", FP_VERSION, cfg.key_config(), {"model": model_ref}, produce, after=after)


# pyplot's figure registry and matplotlib's mathtext parser (log-axis tick labels) are not thread-safe: two builds
# evaluated in threads of one process (a thread task runner, tests/reliability/test_concurrency.py) drew into each
# other's state and failed with a pyparsing ParseException. Plots are tiny; draw them one at a time.
_PLOT_LOCK = threading.Lock()
_T = TypeVar("_T")


def _serialized(fn: Callable[..., _T]) -> Callable[..., _T]:
    @functools.wraps(fn)
    def locked(*args: Any, **kwargs: Any) -> _T:
        with _PLOT_LOCK:
            return fn(*args, **kwargs)

    return locked


@_serialized
def _plots(out: Path, layers: dict[str, Any], ppl: float, ppl_fp: float, bits: float, title: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(layers, key=lambda n: (layers[n].get("block", 0), n))
    losses = [float(layers[n].get("proxy_loss_exact", layers[n].get("proxy_loss", float("nan")))) for n in names]
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.12), 3.5))
    ax.bar(range(len(names)), losses, color="tab:blue")
    ax.set_yscale("log")
    ax.set_xlabel("layer (block order)")
    ax.set_ylabel("proxy loss tr(ΔW H ΔWᵀ)")
    ax.set_title(f"{title}: per-layer proxy loss")
    fig.tight_layout()
    fig.savefig(out / "layer_error.png", dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.axhline(ppl_fp, color="gray", linestyle="--", label=f"fp ({ppl_fp:.2f})")
    ax.scatter([bits], [ppl], color="tab:red", zorder=3, label=f"{title} ({ppl:.2f})")
    ax.set_xlabel("stored bits / weight")
    ax.set_ylabel("WikiText-2 ppl")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "ppl_vs_bits.png", dpi=100)
    plt.close(fig)
    return ["layer_error.png", "ppl_vs_bits.png"]


_BPW_PARTS = ("codes", "positions", "offsets", "grids", "other")


@_serialized
def _bits_plot(out: Path, layer_bpw: dict[str, dict[str, float]], layers: dict[str, Any], title: str) -> str:
    """Block x linear heatmap of the measured bits/weight of every packed layer (:mod:`tasks.plots`: readable
    at any depth), titled with the average of each stored part (codes, positions, grids, other)."""
    from tasks.plots import bits_title, layer_heatmap

    totals = {
        n: float(v.get("bpw_total", sum(v.get(f"bpw_{p}", 0.0) for p in _BPW_PARTS))) for n, v in layer_bpw.items()
    }
    layer_heatmap(out / "layer_bits.png", totals, title=bits_title(title, layer_bpw, _BPW_PARTS), unit="bits / weight")
    return "layer_bits.png"


def _layer_bits(ctx: StageContext, pack_ref: str) -> dict[str, dict[str, float]]:
    """Per-layer measured bits/weight from the pack artifact ({} for packs written before it was recorded)."""
    names = {f.name for f in ctx.store.manifest(pack_ref).files}
    if "layer_bits.json" not in names:
        return {}
    return dict(json.loads(ctx.store.read_bytes(pack_ref, "layer_bits.json")))


def run_evaluate(
    ctx: StageContext,
    model_path: Path,
    pack_ref: str,
    quant_ref: str,
    fp_ref: str,
    cfg: EvalConfig,
    *,
    title: str = "",
    progress: Callable[[int], None] | None = None,
) -> StageResult:
    from tasks.checkpoint import load_packed_model

    inputs = {"pack": pack_ref, "quantize": quant_ref, "eval_fp": fp_ref}

    def produce(w: Any, run: Any) -> None:
        device = ctx.settings.resolved_device()
        packed = ctx.store.get(pack_ref)
        native_dir = packed.root / packed.manifest.file("native/config.json").path.rsplit("/", 1)[0]
        if device == "cpu":
            check_fits_in_memory(_safetensors_bytes(native_dir, as_float32=False), f"the packed build {pack_ref}")
        windows = eval_windows(model_path, cfg, ctx)
        metrics = cached_perplexity(
            ctx,
            pack_ref,
            lambda: load_packed_model(native_dir, device=device),
            windows,
            cfg,
            device=device,
            progress=progress,
        )
        ppl_fp = float(ctx.store.manifest(fp_ref).metadata["ppl"])
        vocab = json.loads((native_dir / "config.json").read_text()).get("vocab_size")
        check_not_degenerate(float(metrics["ppl"]), ppl_fp, int(vocab) if vocab else None, pack_ref)
        pack_meta = packed.manifest.metadata
        metrics.update(
            {
                "ppl_fp": ppl_fp,
                "ppl_delta_rel": metrics["ppl"] / ppl_fp - 1.0,
                "bits_per_weight_stored": float(pack_meta["bits_per_weight_stored"]),
            }
        )
        for key in ("bits_per_weight_codes", *(f"bits_per_weight_stored_{p}" for p in _BPW_PARTS)):
            if key in pack_meta:  # realised average code bits (mixed precision) and the storage breakdown
                metrics[key] = float(pack_meta[key])
        layers = json.loads(ctx.store.read_bytes(quant_ref, "index.json"))["layers"]
        layer_bpw = _layer_bits(ctx, pack_ref)
        table = [
            {"layer": n, **{k: v for k, v in layers[n].items() if k != "ref"}, **layer_bpw.get(n, {})}
            for n in sorted(layers)
        ]
        w.add_bytes("metrics.json", json.dumps(metrics, indent=1).encode())
        w.add_bytes("layers.json", json.dumps(table, indent=1).encode())
        plots = _plots(w.dir, layers, metrics["ppl"], ppl_fp, metrics["bits_per_weight_stored"], title or "build")
        if layer_bpw:
            plots.append(_bits_plot(w.dir, layer_bpw, layers, title or "build"))
        for p in plots:
            w.path(p)
        w.metadata.update(metrics)
        if run is not None:
            run.log_metrics(metrics)
            for step, row in enumerate(r for r in table if "bpw_total" in r):
                run.log_metrics({"layer_bits_per_weight": float(row["bpw_total"])}, step=step)
            for p in plots:
                run.log_figure_png(w.dir / p)
            run.log_artifact(w.dir / "layers.json")

    def after(ref: Any, run: Any, hit: bool) -> dict[str, Any]:
        meta = ctx.store.manifest(ref).metadata
        keys = ("ppl", "ppl_fp", "ppl_delta_rel", "bits_per_weight_stored", "bits_per_weight_codes")
        return {k: meta[k] for k in (*keys, *(f"bits_per_weight_stored_{p}" for p in _BPW_PARTS)) if k in meta}

    return run_stage(ctx, "evaluate", STAGE_VERSION, cfg.key_config(), inputs, produce, after=after)
