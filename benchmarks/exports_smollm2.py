"""Serving exports of SmolLM2-135M: which formats each scheme maps to, write/load time, logits vs the native pack.

RTN grids (the exporters are method-agnostic: they write codes and grids, whatever chose them) for two schemes:
W4 g32 asym with ``fp16_min`` (gptq-w4g32's grid: every format) and W4 g64 asym (gptq-w4g64's grid: no llama.cpp
type). For each written format: write time (including the pack-time verification by its independent reader),
load time in its reader (plain transformers for compressed-tensors and GGUF; the format-documentation reader of
``tests/helpers/gptq_reader.py`` for GPTQ, assembled into a transformers model), max |Δ logit| against the native
pack on 256 WikiText-2-free random tokens, whether every quantized weight is bit for bit ours, and the size.
Writes ``benchmarks/results/exports_smollm2.json``.

    .venv/bin/python benchmarks/exports_smollm2.py
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SCHEMES = {
    "W4 g32 asym fp16_min (gptq-w4g32 grid)": {"sym": False, "group_size": 32, "fp16_min": True},
    "W4 g64 asym (gptq-w4g64 grid)": {"sym": False, "group_size": 64},
}


def _size_mb(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6, 1)


def main() -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from infra.settings import get_settings
    from tasks.checkpoint import load_packed_model
    from tasks.export import EXPORTS, ExportInputs
    from tasks.models import fetch_demo_model, load_model
    from tasks.pack import _write_native
    from tasks.quantize import METHODS
    from tasks.recipe import QuantizeConfig
    from tests.helpers.gptq_reader import read_gptq_checkpoint

    torch.manual_seed(0)
    src = fetch_demo_model("smollm2-135m", get_settings(), progress=False)
    ids = torch.randint(0, 49152, (1, 256), generator=torch.Generator().manual_seed(0))
    results: dict = {"model": "SmolLM2-135M-Instruct (dequantized Q4_1 GGUF release)", "host": platform.node()}
    work = Path(tempfile.mkdtemp(prefix="exports-"))
    try:
        for label, scheme in SCHEMES.items():
            cfg = QuantizeConfig.model_validate({"method": "rtn", "bits": 4, **scheme})
            model = load_model(src)
            qweights = {
                n: METHODS["rtn"](m.weight.data, None, cfg, n)
                for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and ".layers." in n
            }
            del model
            inputs = ExportInputs(src, cfg, qweights)
            d = work / label.split(" (")[0].replace(" ", "-")
            d.mkdir()
            _write_native(d / "native", src, cfg, qweights)
            t = time.perf_counter()
            native = load_packed_model(d / "native")
            row: dict = {"native": {"load_s": round(time.perf_counter() - t, 2), "mb": _size_mb(d / "native")}}
            with torch.no_grad():
                ref = native(ids).logits
            del native
            for fmt in EXPORTS:
                reason = fmt.reason(inputs)
                if reason is not None:
                    row[fmt.name] = {"refused": reason}
                    continue
                t = time.perf_counter()
                info = fmt.write(d / fmt.name, inputs)
                bad = fmt.verify(d / fmt.name, inputs) if fmt.verify else None
                entry: dict = {"write_and_verify_s": round(time.perf_counter() - t, 1), "info": info}
                entry["verified"] = bad is None
                t = time.perf_counter()
                if fmt.name == "gptq":
                    state = read_gptq_checkpoint(d / "gptq")
                    config = json.loads((d / "gptq" / "config.json").read_text())
                    config.pop("quantization_config")
                    for k in ("dtype", "torch_dtype"):
                        config.pop(k, None)
                    loaded = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
                    loaded.load_state_dict(state, strict=False)
                    loaded.tie_weights()
                elif fmt.name == "gguf":
                    loaded = AutoModelForCausalLM.from_pretrained(d / "gguf", gguf_file=info["file"])
                else:
                    loaded = AutoModelForCausalLM.from_pretrained(d / fmt.name)
                entry["load_s"] = round(time.perf_counter() - t, 2)
                with torch.no_grad():
                    entry["max_abs_dlogit_vs_native"] = float((loaded(ids).logits - ref).abs().max())
                if fmt.name != "compressed-tensors":  # its weights are decompressed lazily inside the modules
                    sd = loaded.state_dict()
                    entry["weights_bit_exact"] = all(
                        torch.equal(sd[f"{n}.weight"].to(torch.float32), q.dequantize()) for n, q in qweights.items()
                    )
                entry["mb"] = _size_mb(d / fmt.name)
                row[fmt.name] = entry
                del loaded
            results[label] = row
            print(json.dumps({label: row}, indent=1), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = ROOT / "benchmarks" / "results" / "exports_smollm2.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
