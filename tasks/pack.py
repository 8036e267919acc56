"""Stage ``pack``: a loadable checkpoint from the ``qlayer`` artifacts.

``native/`` is quantpipe's own format (see :mod:`tasks.checkpoint`), readable by :class:`QuantLinear` and the
kernels. Next to it, every serving format the build can be written in exactly (:mod:`tasks.export`):
``compressed-tensors/`` (pack-quantized, sym and asym: vLLM, transformers), ``gptq/`` (quant_method gptq:
vLLM, GPTQModel) and ``gguf/`` (llama.cpp: W4 g32 → Q4_1/Q4_0, W8 g32 → Q8_0). Each is decoded again by an
independent reader where one is installed before it ships; the manifest lists the written ``formats`` and, per
format not written, ``<format>_skipped`` with the one-line reason.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from kernels.layouts import BPW_COUNTED, layout_of, stored_bits
from tasks.checkpoint import QUANT_METHOD
from tasks.export import ExportInputs, write_exports
from tasks.models import copy_tokenizer
from tasks.qlayer import LayerResult
from tasks.quantize import layer_seed
from tasks.recipe import PackConfig, QuantizeConfig
from tasks.stage import StageContext, StageResult, run_stage

__all__ = ["STAGE_VERSION", "StoredLayers", "run_pack", "skeleton"]

# 2: transform sign vectors bit-packed (1 bit per sign instead of fp32); 3: serving exports (compressed-tensors
# asym too, gptq, gguf), each verified by an independent decoder
STAGE_VERSION = 3


def _layers(ctx: StageContext, quant_ref: str) -> dict[str, str]:
    index = json.loads(ctx.store.read_bytes(quant_ref, "index.json"))
    return {name: v["ref"] for name, v in index["layers"].items()}


def _write_native(
    out: Path, model_path: Path, cfg: QuantizeConfig, qweights: Mapping[str, LayerResult]
) -> dict[str, dict[str, float]]:
    """Write ``native/``; returns the measured bits per weight of every packed linear (``stored_bits``).

    Streams: the base checkpoint's other tensors and then each layer, read from the store, packed and handed
    to a :class:`ShardedWriter`, so a 70B pack holds one layer and one shard, not the model."""
    from safetensors import safe_open

    from infra.safetensors_io import ShardedWriter
    from tasks.moe import native_plain_tensors

    out.mkdir(parents=True)
    writer = ShardedWriter(out, metadata={"format": "pt", "quant_method": QUANT_METHOD})
    # MoE: the unfused model's names (per-expert linears, renamed routers), read through the checkpoint's layout
    plain = native_plain_tensors(model_path, set(qweights)) or {}
    files = [] if plain else sorted(model_path.glob("*.safetensors"))
    for name, t in plain.items():
        writer.add(name, t)
    del plain
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for name in h.keys():  # noqa: SIM118
                if name.removesuffix(".weight") not in qweights:
                    writer.add(name, h.get_tensor(name))
    layer_bpw: dict[str, dict[str, float]] = {}
    layer_bits: dict[str, Any] = {}
    kind = cfg.transform_kind()
    for name, q in qweights.items():
        seed = (layer_seed(cfg, name), kind) if kind is not None else None  # transforms stored as their seed
        layout = layout_of(q)  # kernels.layouts: affine (+ transforms), ICQuant, binary-coded, mixed, E8P
        packed = layout.pack(q, seed)
        for suffix, t in packed.items():
            writer.add(f"{name}.{suffix}", t)
        out_f, in_f = layout.shape(q)
        n = out_f * in_f
        layer_bits[name] = layout.bits(q)
        layer_bpw[name] = {"bits": float(layer_bits[name]), "n_weights": float(n), **stored_bits(packed, n)}
    writer.close()
    config = json.loads((model_path / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": QUANT_METHOD,
        "format": "int32-kpacked",
        "format_version": 1,
        "bits": cfg.bits,
        "group_size": cfg.group_size,
        "sym": cfg.sym,
        "method": cfg.effective_method(),
        "modules": sorted(qweights),
    }
    if cfg.icquant_base() is not None:
        config["quantization_config"]["outliers"] = cfg.outlier_config().model_dump(mode="json")
    if cfg.method == "gptqt":
        config["quantization_config"]["gptqt"] = cfg.gptqt.model_dump(mode="json")
    if cfg.method == "hadamard-e8p":  # kernels.e8p_linear layout; group_size/sym do not apply
        config["quantization_config"]["e8p"] = cfg.e8p.model_dump(mode="json")
        config["quantization_config"]["group_size"] = None
    if cfg.bitalloc is not None or len(set(layer_bits.values())) > 1:  # per-layer bits in the JSON
        config["quantization_config"]["bits"] = None
        config["quantization_config"]["layer_bits"] = dict(sorted(layer_bits.items()))
        if cfg.bitalloc is not None:
            config["quantization_config"]["bitalloc"] = cfg.bitalloc.model_dump(mode="json")
    if kind is not None:  # y = Uᵀ Ŵ̃ V diag(s)⁻¹ x, from each module's transform tensors
        config["quantization_config"]["transform"] = {
            "kind": kind,
            **cfg.transform.model_dump(mode="json", exclude={"kind"}),
        }
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    copy_tokenizer(model_path, out)
    return layer_bpw


class StoredLayers(Mapping[str, LayerResult]):
    """A quantize artifact's layers, each read from the store (digest-checked) when asked for and not kept.

    Packing and every export pass over the layers one at a time; holding them all was 1 byte per weight of codes
    (1.5 GB at 1.5B, 70 GB at 70B) plus grids, the largest item of the pack stage's peak. What is kept is each
    layer's *skeleton* (``skeleton``): the same object with its tensors on the meta device, shapes and dtypes
    only, so the exports' checks of layouts, bit-widths and group shapes do not read every layer again.
    """

    def __init__(self, ctx: StageContext, refs: Mapping[str, str]) -> None:
        self._ctx, self._refs = ctx, dict(refs)
        self._skeletons: dict[str, LayerResult] = {}

    def __getitem__(self, name: str) -> LayerResult:
        from tasks.quantize import load_qlayer

        q = load_qlayer(self._ctx, self._refs[name])
        if name not in self._skeletons:
            self._skeletons[name] = skeleton(q)
        return q

    def skeleton(self, name: str) -> LayerResult:
        """The layer with meta-device tensors (read once, on first use of the layer)."""
        if name not in self._skeletons:
            self[name]
        return self._skeletons[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._refs)

    def __len__(self) -> int:
        return len(self._refs)

    def __contains__(self, name: object) -> bool:  # Mapping's default would read the layer
        return name in self._refs


def skeleton(obj: Any) -> Any:
    """``obj`` with every tensor replaced by an empty meta-device tensor of its shape and dtype (dataclasses, lists,
    tuples and dicts walked; fields set without re-running validation, which may read values)."""
    import copy
    import dataclasses

    import torch

    if isinstance(obj, torch.Tensor):
        return torch.empty(obj.shape, dtype=obj.dtype, device="meta")
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        new = copy.copy(obj)
        for f in dataclasses.fields(obj):
            object.__setattr__(new, f.name, skeleton(getattr(obj, f.name)))
        return new
    if isinstance(obj, dict):
        return {k: skeleton(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [skeleton(v) for v in obj]
    if isinstance(obj, tuple):
        items = [skeleton(v) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    return obj


def run_pack(
    ctx: StageContext,
    model_path: Path,
    model_ref: str,
    quant_ref: str,
    qcfg: QuantizeConfig,
    cfg: PackConfig,
    *,
    runtime: dict[str, Any] | None = None,
) -> StageResult:
    """``runtime``: A/KV fake quantization the packed model applies (``Recipe.runtime_config``); keyed when set."""
    config = {
        **cfg.model_dump(mode="json"),
        "bits": qcfg.bits,
        "sym": qcfg.sym,
        "group_size": qcfg.group_size,
        "method": qcfg.effective_method(),
    }

    if runtime:
        config["runtime"] = runtime
    if qcfg.transform_kind() is not None:  # permutations/factors stored as the layer seed (older packs: explicit)
        config["transform_storage"] = "seed"

    def produce(w: Any, run: Any) -> None:
        qweights = StoredLayers(ctx, _layers(ctx, quant_ref))  # read one at a time, as each writer needs it
        layer_bpw = _write_native(w.dir / "native", model_path, qcfg, qweights)
        if runtime:  # read by load_packed_model → tasks.quarot_runtime.install_runtime
            native_config = json.loads((w.dir / "native" / "config.json").read_text())
            native_config["quantization_config"]["runtime"] = runtime
            (w.dir / "native" / "config.json").write_text(json.dumps(native_config, indent=2, sort_keys=True))
        w.register_tree("native")
        w.add_bytes("layer_bits.json", json.dumps(layer_bpw, indent=1, sort_keys=True).encode())
        n_weights = sum(v["n_weights"] for v in layer_bpw.values())
        meta: dict[str, Any] = {
            "quantized_params": int(n_weights),
            "bits_per_weight_codes": sum(v["bits"] * v["n_weights"] for v in layer_bpw.values()) / max(n_weights, 1),
            "formats": ["native"],
        }
        for part in (
            "total",
            "codes",
            "positions",
            "offsets",
            "grids",
            "other",
            "position_overhead",
        ):  # weighted by layer size = Σ bits / Σ weights
            overall = sum(v[f"bpw_{part}"] * v["n_weights"] for v in layer_bpw.values()) / max(n_weights, 1)
            meta["bits_per_weight_stored" if part == "total" else f"bits_per_weight_stored_{part}"] = overall
        meta["layer_bits_counted"] = {f"bpw_{k}": v for k, v in BPW_COUNTED.items()}  # what layer_bits.json sums
        exports = write_exports(
            w.dir, ExportInputs(model_path, qcfg, qweights, runtime), lambda flag: bool(getattr(cfg, flag))
        )
        for name in exports["formats"]:
            w.register_tree(name)
        meta.update({**exports, "formats": ["native", *exports["formats"]]})
        w.metadata.update(meta)
        if run is not None:
            run.log_metrics({k: float(v) for k, v in meta.items() if isinstance(v, int | float)})

    def after(ref: Any, run: Any, hit: bool) -> dict[str, Any]:
        meta = ctx.store.manifest(ref).metadata
        return {k: meta[k] for k in ("bits_per_weight_stored", "formats") if k in meta}

    return run_stage(
        ctx, "pack", STAGE_VERSION, config, {"model": model_ref, "quantize": quant_ref}, produce, after=after
    )
