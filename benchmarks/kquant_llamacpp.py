"""quantpipe's GPTQ k-quant GGUFs vs llama.cpp's ``llama-quantize --imatrix`` at Q4_K_M / Q3_K_M / Q2_K.

SmolLM2-135M (the demo model). Both sides see the same calibration text (the first ``--calib-chunks`` windows of
``--ctx`` tokens of WikiText-2 validation) and are measured by the same ``llama-perplexity`` on WikiText-2 test at
the same context. llama.cpp: F32 GGUF (our writer's header and tensors; the vendored ``convert_hf_to_gguf.py``
tries sentencepiece first for a llama model and stops when it is not installed) → ``llama-imatrix`` → ``llama-quantize
--imatrix``. quantpipe: proxy Hessians of every linear from the same windows (fp model, one pass) →
:func:`tasks.export.kquant_gguf.quantize_mix` with llama-quantize's own tensor-type mix (checked equal, tensor by
tensor, to the file llama-quantize wrote) → GGUF. Our file is also loaded in llama-cpp-python and its logits
compared with the torch model carrying our dequantized weights.

Build the tools once (not in CI; ~40 min on 2 busy cores) from the vendored source of the llama-cpp-python sdist::

    mkdir -p .cache/llamacpp && cd .cache/llamacpp
    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d . && tar xzf llama_cpp_python-0.3.36.tar.gz
    cd llama_cpp_python-0.3.36/vendor/llama.cpp && cmake -B build -DLLAMA_BUILD_TOOLS=ON -DLLAMA_CURL=OFF \\
        -DCMAKE_BUILD_TYPE=Release && cmake --build build -j2 --target llama-quantize llama-imatrix llama-perplexity

    .venv/bin/python benchmarks/kquant_llamacpp.py [--calib-chunks 16] [--ppl-chunks 20] [--types Q3_K_M,Q2_K,Q4_K_M]

Writes ``benchmarks/results/kquant_llamacpp.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
LLAMA = ROOT / ".cache" / "llamacpp" / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
WORK = ROOT / ".cache" / "llamacpp" / "bench"


def _tool(name: str) -> str:
    path = LLAMA / "build" / "bin" / name
    if not path.is_file():
        raise SystemExit(f"{path} is missing: build llama.cpp's tools first (see this file's docstring)")
    return str(path)


def _run(cmd: list[str], log: Path) -> str:
    t0 = time.time()
    with log.open("w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, text=True)
    text = log.read_text()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:2])} failed ({proc.returncode}); see {log}:\n{text[-2000:]}")
    print(f"  {Path(cmd[0]).name}: {time.time() - t0:.0f}s", flush=True)
    return text


def _ppl(gguf_file: Path, test: Path, ctx: int, chunks: int, threads: int) -> float:
    log = gguf_file.with_suffix(f".ppl-c{ctx}-n{chunks}.log")
    if not log.is_file() or "Final estimate" not in log.read_text():
        cmd = [_tool("llama-perplexity"), "-m", str(gguf_file), "-f", str(test), "-c", str(ctx), "-b", str(ctx)]
        _run([*cmd, "--chunks", str(chunks), "-t", str(threads)], log)
    match = re.search(r"Final estimate: PPL = ([0-9.]+)", log.read_text())
    if match is None:
        raise SystemExit(f"no perplexity in {log}")
    return float(match.group(1))


def _tensor_types(gguf_file: Path) -> dict[str, str]:
    import gguf

    reader = gguf.GGUFReader(str(gguf_file))
    return {t.name: t.tensor_type.name for t in reader.tensors}


def _hessians(model, tokenizer, text: str, ctx: int, chunks: int) -> dict:
    """H = 2/N Σ x xᵀ of every linear's input (and the LM head's), fp model, on the windows llama-imatrix reads:
    the text tokenized once, cut into ``chunks`` windows of ``ctx`` tokens, the first replaced by BOS when the
    vocabulary adds one (SmolLM2's does not)."""
    import torch

    from quant.hessian import accumulate

    ids = tokenizer(text).input_ids
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and ids[:1] == [bos]
    acc: dict[str, list] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):

            def hook(_m, inp, _out, name=name):
                H, n = acc.get(name, [None, 0])
                acc[name] = list(accumulate(H, n, inp[0].detach()))

            hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        for c in range(chunks):
            window = ids[c * ctx : (c + 1) * ctx]
            if adds_bos:
                window = [bos, *window[1:]]
            model(torch.tensor([window]))
    for h in hooks:
        h.remove()
    return {name: 2.0 / n * H for name, (H, n) in acc.items()}


def _llama_logits_vs_torch(gguf_file: Path, model, text: str) -> dict:
    import numpy as np
    import torch
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_file), logits_all=True, n_ctx=512, n_batch=512, n_threads=2, verbose=False)
    toks = llm.tokenize(text.encode(), add_bos=False, special=False)[:256]
    llm.eval(toks)
    lc = np.array(llm.scores[: len(toks)], dtype=np.float32)
    with torch.no_grad():
        ref = model(torch.tensor([toks])).logits[0].float().numpy()
    return {
        "max_abs_dlogit": float(np.abs(lc - ref).max()),
        "mean_abs_dlogit": float(np.abs(lc - ref).mean()),
        "mean_abs_logit": float(np.abs(ref).mean()),
        "top1_agreement": float((lc.argmax(-1) == ref.argmax(-1)).mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--types", default="Q3_K_M,Q2_K,Q4_K_M")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--calib-chunks", type=int, default=16)
    parser.add_argument("--ppl-chunks", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from infra.settings import get_settings
    from tasks.export.kquant_gguf import kquant_mix, quantize_mix, write_kquant_gguf
    from tasks.models import fetch_demo_model, load_model

    torch.set_num_threads(args.threads)
    settings = get_settings()
    src = fetch_demo_model("smollm2-135m", settings, progress=False)
    config = json.loads((src / "config.json").read_text())
    wiki = settings.wikitext_dir
    if wiki is None:
        raise SystemExit("no WikiText-2 directory (settings.wikitext_dir)")
    calib_text, test = (wiki / "wiki.valid.raw").read_text(), wiki / "wiki.test.raw"
    WORK.mkdir(parents=True, exist_ok=True)
    calib_file = WORK / "calib.txt"
    calib_file.write_text(calib_text)

    f32 = WORK / "smollm2-135m-f32.gguf"
    if not f32.is_file():  # llama.cpp's convert_hf_to_gguf.py wants sentencepiece for this vocab; same header
        write_kquant_gguf(f32, src, "F32", {}, config)
    imatrix = WORK / f"imatrix-c{args.ctx}-n{args.calib_chunks}.gguf"
    if not imatrix.is_file():
        cmd = [_tool("llama-imatrix"), "-m", str(f32), "-f", str(calib_file), "-o", str(imatrix)]
        _run(
            [*cmd, "-c", str(args.ctx), "--chunks", str(args.calib_chunks), "-t", str(args.threads)],
            WORK / "imatrix.log",
        )

    tok = AutoTokenizer.from_pretrained(src)
    model = load_model(src).float().eval()
    t0 = time.time()
    cached = WORK / f"hessians-c{args.ctx}-n{args.calib_chunks}.pt"
    if cached.is_file():
        hessians = torch.load(cached)
    else:
        hessians = _hessians(model, tok, calib_text, args.ctx, args.calib_chunks)
        torch.save(hessians, cached)
    hessian_s = time.time() - t0
    weights = {n: m.weight.data for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    weights["model.embed_tokens"] = model.get_input_embeddings().weight.data
    tied = bool(config.get("tie_word_embeddings", True))

    results: dict = {
        "model": "SmolLM2-135M (demo checkpoint)",
        "ctx": args.ctx,
        "calibration": f"WikiText-2 validation, first {args.calib_chunks} windows of {args.ctx} tokens",
        "perplexity": f"llama-perplexity, WikiText-2 test, -c {args.ctx}, first {args.ppl_chunks} chunks",
        "hessian_seconds": round(hessian_s, 1),
        "f32": {"size_bytes": f32.stat().st_size, "ppl": _ppl(f32, test, args.ctx, args.ppl_chunks, args.threads)},
        "types": {},
    }
    n_weights = sum(w.numel() for n, w in weights.items() if n != "lm_head" or not tied)
    for ftype in args.types.split(","):
        print(ftype, flush=True)
        theirs = WORK / f"llamacpp-imatrix-{ftype}.gguf"
        if not theirs.is_file():
            cmd = [_tool("llama-quantize"), "--imatrix", str(imatrix), str(f32), str(theirs), ftype]
            _run([*cmd, str(args.threads)], WORK / f"quantize-{ftype}.log")
        ours = WORK / f"quantpipe-gptq-{ftype}.gguf"
        mix = kquant_mix(ftype, config)
        their_types = _tensor_types(theirs)
        from gguf import MODEL_ARCH, get_tensor_name_map

        names = get_tensor_name_map(MODEL_ARCH.LLAMA, int(config["num_hidden_layers"]))
        mismatched = {
            n: (t, their_types.get(f"{names.get_name(n)}.weight"))
            for n, t in mix.items()
            if their_types.get(f"{names.get_name(n)}.weight") != t
        }
        t0 = time.time()
        quantized = quantize_mix(weights, mix, hessians, tied=tied)
        quant_s = time.time() - t0
        if ours.exists():
            ours.unlink()
        write_kquant_gguf(ours, src, ftype, quantized, config)
        row: dict = {"mix_mismatches_vs_llama_quantize": {k: list(v) for k, v in mismatched.items()}}
        for label, path in (("llama.cpp imatrix", theirs), ("quantpipe GPTQ", ours)):
            size = path.stat().st_size
            row[label] = {
                "size_bytes": size,
                "bits_per_weight": round(8 * size / n_weights, 3),
                "ppl": _ppl(path, test, args.ctx, args.ppl_chunks, args.threads),
            }
        row["quantpipe GPTQ"]["quantize_seconds"] = round(quant_s, 1)
        # our file in llama.cpp vs the torch model carrying our dequantized weights
        import copy

        deq = copy.deepcopy(model)
        mods = dict(deq.named_modules())
        for name, kw in quantized.items():
            target = deq.get_input_embeddings() if name == "model.embed_tokens" else mods[name]
            target.weight.data = kw.dequantize().to(target.weight.dtype)
        row["quantpipe GPTQ"]["llama_cpp_vs_torch_dequant"] = _llama_logits_vs_torch(ours, deq, calib_text[:4000])
        results["types"][ftype] = row
        print(json.dumps(row, indent=1), flush=True)
        out = ROOT / "benchmarks" / "results" / "kquant_llamacpp.json"
        out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
