"""``quantpipe export``: where a registered build's serving export is, optionally copied out.

Every format is written by the pack stage (:mod:`tasks.export`), so it is part of the pack artifact — content-
addressed, hashed in its manifest, in the lineage of the registered version (tag ``key.pack``). Exporting is
resolving that artifact (verified on read) and pointing at, or copying, its ``<format>/`` directory. A format the
build has not got is refused with the pack's recorded reason (or, for packs older than the format, how to get it).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from infra.errors import ConfigError
from infra.keys import ArtifactRef
from infra.settings import Settings
from tasks.export import EXPORTS

__all__ = ["FORMATS", "export_build", "pack_ref"]

FORMATS = ("native", *(fmt.name for fmt in EXPORTS))


def pack_ref(target: str, settings: Settings) -> str:
    """``pack/<key>`` of ``target``: a registered ``NAME/VERSION`` (number or alias) or a ``pack/<key>`` ref."""
    if target.startswith("pack/"):
        return str(ArtifactRef(target))
    from registry.models import lineage_tags

    name, _, version = target.rpartition("/")
    if not name or not version:
        raise ConfigError(f"{target!r} is neither a registered model 'NAME/VERSION' nor 'pack/<key>'")
    ref = lineage_tags(name, version, settings=settings).get("key.pack")
    if not ref:
        raise ConfigError(f"{target} records no pack artifact (tag key.pack)")
    return str(ref)


def export_build(
    target: str, fmt: str, out: Path | None, settings: Settings, *, gguf_type: str | None = None
) -> dict[str, Any]:
    """The location of ``target``'s ``fmt`` export (``out`` when given: the export's files copied there).

    Returns ``{"target", "format", "pack", "location", "files"}``; ``location`` is the ``.gguf`` file for GGUF and
    the checkpoint directory otherwise. Raises ConfigError (one line) when the build has no such export.
    ``gguf_type`` (GGUF only): a llama.cpp k-quant file type, made by :func:`export_kquant`.
    """
    from infra.store import open_store

    if gguf_type is not None:
        if fmt != "gguf":
            raise ConfigError(f"--gguf-type is a GGUF option, not one of --format {fmt}")
        return export_kquant(target, gguf_type, out, settings)
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; one of {', '.join(FORMATS)}")
    ref = pack_ref(target, settings)
    art = open_store(settings=settings).get(ref)
    meta = art.manifest.metadata
    if fmt not in meta.get("formats", ["native"]):
        flag = next(e.flag for e in EXPORTS if e.name == fmt)
        reason = meta.get(f"{flag}_skipped") or (
            f"packed by pack stage v{art.manifest.stage_version}, before the {fmt} export existed; rebuild it "
            "(quantpipe quantize with the same recipe) to write it"
        )
        raise ConfigError(f"{target} has no {fmt} export: {reason}")
    prefix = art.manifest.file("native/config.json").path.removesuffix("native/config.json")
    src = art.root / prefix / fmt
    files = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
    root = src
    if out is not None:
        out = Path(out)
        if out.exists() and any(out.iterdir()):
            raise ConfigError(f"--out {out} exists and is not empty")
        out.mkdir(parents=True, exist_ok=True)
        for name in files:
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / name, out / name)
        root = out
    gguf = [f for f in files if f.endswith(".gguf")]
    location = root / gguf[0] if fmt == "gguf" and gguf else root
    return {"target": target, "format": fmt, "pack": ref, "location": str(location), "files": files}


# 2: Hessians held in float32 (quant.hessian.HELD_DTYPE): half the memory of the whole model's set, ULP-level changes
KQUANT_STAGE, KQUANT_VERSION = "gguf-kquant", 3  # 3: quant.gptq.sweep_factor reversed Cholesky


def export_kquant(target: str, ftype: str, out: Path | None, settings: Settings) -> dict[str, Any]:
    """A llama.cpp k-quant GGUF (``Q2_K``, ``Q3_K_M``, ``Q4_K_M``) of ``target``'s base model, every weight GPTQ'd
    onto llama-quantize's tensor-type mix (:mod:`tasks.export.kquant_gguf`) with the build's proxy Hessians.

    The k-quant grids are not the build's grids, so this re-quantizes from the base checkpoint: the Hessians are the
    build's ``hessians`` artifact (parallel mode) or, for sequential builds, the hessians stage run on the build's
    calibration tokens with its ``first_token_weight`` (content-addressed, reused next time). A build made with
    ``hessians.first_token_weight=16`` gives the files that beat ``llama-quantize --imatrix`` in RESULTS.md.
    The GGUF is its own artifact ``gguf-kquant/<key>``
    keyed on the model, the Hessians and the file type. Same return shape as :func:`export_build`."""
    import json

    import torch

    from infra.store import open_store
    from tasks.export.kquant_gguf import FTYPES, kquant_mix, kquant_reason, quantize_mix, write_kquant_gguf
    from tasks.hessians import load_block_hessians, run_hessians
    from tasks.recipe import HessianConfig
    from tasks.stage import StageContext, ensure_artifact

    if ftype not in FTYPES:
        raise ConfigError(f"unknown k-quant GGUF type {ftype!r}; one of {', '.join(FTYPES)}")
    ref = pack_ref(target, settings)
    store = open_store(settings=settings)
    quant = store.get(store.get(ref).manifest.inputs["quantize"]).manifest
    model_ref = quant.inputs["model"]
    model_path = Path(store.get(model_ref).manifest.metadata["path"])
    if not (model_path / "config.json").is_file():
        raise ConfigError(f"the base checkpoint of {target} is no longer at {model_path}")
    config = json.loads((model_path / "config.json").read_text())
    reason = kquant_reason(model_path, config)
    if reason is not None:
        raise ConfigError(f"{target} has no {ftype} GGUF: {reason}")
    ctx = StageContext(settings=settings, store_url=settings.effective_store_url, progress=False)
    hes_ref = quant.inputs.get("hessians")
    if hes_ref is None:  # a sequential build: its own first-token weight (keyed in its config when set)
        hcfg = HessianConfig(first_token_weight=float(quant.config.get("first_token_weight", 1.0)))
        hes_ref = run_hessians(ctx, model_path, model_ref, quant.inputs["calibration"], hcfg).ref
    file_name = f"model-{ftype}.gguf"

    def produce(w: Any, _run: Any) -> None:
        from quant.arch import mapping_for
        from quant.hessian import HELD_DTYPE, finalize
        from tasks.models import load_model

        mapping = mapping_for(config.get("architectures") or [])
        hessians: dict[str, torch.Tensor] = {}
        for i, block_ref in enumerate(store.get(str(hes_ref)).manifest.metadata["blocks"]):
            for group, (H_sum, n) in load_block_hessians(ctx, block_ref).items():
                H = finalize(H_sum, max(n, 1), in_place=True, dtype=HELD_DTYPE)  # one tensor per group, shared
                g = next(g for g in mapping.groups if g.name == group)
                for linear in g.linears:
                    hessians[f"{mapping.blocks}.{i}.{linear}"] = H
        model = load_model(model_path)
        weights = {n: m.weight.data.float() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        weights["model.embed_tokens"] = model.get_input_embeddings().weight.data.float()
        tied = bool(config.get("tie_word_embeddings", True))
        quantized = quantize_mix(weights, kquant_mix(ftype, config), hessians, tied=tied)
        info = write_kquant_gguf(w.path(file_name), model_path, ftype, quantized, config)
        w.metadata.update(info)

    art_ref, _hit = ensure_artifact(
        ctx, KQUANT_STAGE, KQUANT_VERSION, {"ftype": ftype}, {"model": model_ref, "hessians": str(hes_ref)}, produce
    )
    src = store.get(art_ref).file(file_name)
    location = src
    if out is not None:
        out = Path(out)
        if out.exists() and any(out.iterdir()):
            raise ConfigError(f"--out {out} exists and is not empty")
        out.mkdir(parents=True, exist_ok=True)
        location = out / file_name
        shutil.copyfile(src, location)
    return {"target": target, "format": f"gguf:{ftype}", "pack": ref, "location": str(location), "files": [file_name]}
