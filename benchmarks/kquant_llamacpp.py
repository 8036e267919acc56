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

    .venv/bin/python benchmarks/kquant_llamacpp.py [--model qwen2.5-coder-0.5b] [--calib-chunks 16] [--ppl-chunks 20] \
        [--types Q3_K_M,Q2_K,Q4_K_M]

Writes ``benchmarks/results/kquant_llamacpp.json`` (SmolLM2) or ``kquant_llamacpp-<model>.json``. The logits check
of our files inside llama.cpp needs ``llama_cpp`` (llama-cpp-python) in the venv; without it that entry says so.
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
BENCH = ROOT / ".cache" / "llamacpp"


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


def _hessians(model, tokenizer, text: str, ctx: int, chunks: int, first_token_weight: float = 1.0) -> dict:
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
                x = inp[0].detach()
                if first_token_weight != 1.0:  # as hessians.first_token_weight does in the pipeline
                    x = x.clone()
                    x[:, 0] *= first_token_weight**0.5
                acc[name] = list(accumulate(H, n, x.reshape(-1, x.shape[-1])))

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

    try:
        from llama_cpp import Llama
    except ImportError:
        return {"skipped": "llama_cpp (llama-cpp-python) is not installed in this venv"}

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


def _gguf_weights(path: Path, config: dict) -> dict:
    """{HF name: float32 weight} of every block-quantized tensor of ``path`` as the ``gguf`` package decodes it,
    q/k rows permuted back to the Hugging Face order."""
    import gguf
    import torch

    from tasks.export.gguf import _rows_permutation

    n_head = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_head)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, int(config["num_hidden_layers"]))
    hf = {}
    for i in range(int(config["num_hidden_layers"])):
        for kind in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"):
            hf[f"{names.get_name(f'model.layers.{i}.{kind}')}.weight"] = f"model.layers.{i}.{kind}"
        for kind in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            hf[f"{names.get_name(f'model.layers.{i}.{kind}')}.weight"] = f"model.layers.{i}.{kind}"
    hf["token_embd.weight"], hf["output.weight"] = "model.embed_tokens", "lm_head"
    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        if t.tensor_type.name in ("F32", "F16", "BF16"):
            continue
        w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(int(t.shape[1]), int(t.shape[0]))
        heads = n_head if ".attn_q." in t.name else n_kv if ".attn_k." in t.name else None
        if heads is not None:
            w = w[torch.argsort(_rows_permutation(w.shape[0], heads))]
        out[hf[t.name]] = w
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m", help="a quantpipe model name (models fetch) ")
    parser.add_argument("--types", default="Q3_K_M,Q2_K,Q4_K_M")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--calib-chunks", type=int, default=16)
    parser.add_argument("--ppl-chunks", type=int, default=8)
    parser.add_argument(
        "--hessian-chunks", type=int, default=None, help="quantpipe's calibration windows (default: --calib-chunks)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--first-token-weight", type=float, default=1.0, help="our Hessians: weight of each window's first token"
    )
    parser.add_argument("--ours-only", action="store_true", help="write quantpipe's GGUFs and stop")
    parser.add_argument("--fp-ppl", action="store_true", help="also measure the F32 file's perplexity")
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from infra.settings import get_settings
    from tasks.export.kquant_gguf import kquant_mix, quantize_mix, write_kquant_gguf
    from tasks.models import fetch_demo_model, load_model

    torch.set_num_threads(args.threads)
    settings = get_settings()
    src = fetch_demo_model(args.model, settings, progress=False)
    smol = args.model == "smollm2-135m"
    WORK = BENCH / ("bench" if smol else f"bench-{args.model}")
    config = json.loads((src / "config.json").read_text())
    wiki = settings.wikitext_dir
    if wiki is None:
        raise SystemExit("no WikiText-2 directory (settings.wikitext_dir)")
    calib_text, test = (wiki / "wiki.valid.raw").read_text(), wiki / "wiki.test.raw"
    WORK.mkdir(parents=True, exist_ok=True)
    calib_file = WORK / "calib.txt"
    if not calib_file.is_file():
        calib_file.write_text(calib_text)
    f32 = WORK / f"{args.model}-f32.gguf"
    if not f32.is_file():  # llama.cpp's convert_hf_to_gguf.py wants sentencepiece for this vocab; same header
        write_kquant_gguf(f32, src, "F32", {}, config)
    tied = bool(config.get("tie_word_embeddings", True))
    model = load_model(src).float().eval()
    weights = {n: m.weight.data for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    weights["model.embed_tokens"] = model.get_input_embeddings().weight.data
    n_weights = sum(w.numel() for n, w in weights.items() if n != "lm_head" or not tied)
    types = args.types.split(",")

    # 1. quantpipe: Hessians from the calibration windows, GPTQ onto llama-quantize's mix
    seconds: dict[str, float] = {}
    tag = "" if args.first_token_weight == 1.0 else f"-ftw{args.first_token_weight:g}"
    todo = [t for t in types if not (WORK / f"quantpipe-gptq{tag}-{t}.gguf").is_file()]
    if todo:
        n_h = args.hessian_chunks or args.calib_chunks
        cached = WORK / f"hessians-c{args.ctx}-n{n_h}{tag}.pt"
        if cached.is_file():
            hessians = torch.load(cached, weights_only=True)  # tensors and containers only: nothing executed
        else:
            t0 = time.time()
            tok = AutoTokenizer.from_pretrained(src)
            hessians = _hessians(model, tok, calib_text, args.ctx, n_h, args.first_token_weight)
            torch.save(hessians, cached)
            seconds["hessians"] = time.time() - t0
        for ftype in todo:
            t0 = time.time()
            quantized = quantize_mix(weights, kquant_mix(ftype, config), hessians, tied=tied)
            part = WORK / f"quantpipe-gptq{tag}-{ftype}.gguf.part"
            write_kquant_gguf(part, src, ftype, quantized, config)
            part.rename(WORK / f"quantpipe-gptq{tag}-{ftype}.gguf")
            seconds[ftype] = time.time() - t0
            print(f"  quantpipe {ftype}: {seconds[ftype]:.0f}s", flush=True)
    (WORK / f"quantpipe-seconds{tag}.json").write_text(json.dumps(seconds))
    if args.ours_only:
        return

    # 2. llama.cpp: imatrix on the same text, llama-quantize --imatrix
    imatrix = WORK / f"imatrix-c{args.ctx}-n{args.calib_chunks}.gguf"
    if not imatrix.is_file():
        cmd = [_tool("llama-imatrix"), "-m", str(f32), "-f", str(calib_file), "-o", str(imatrix), "-c", str(args.ctx)]
        _run([*cmd, "--chunks", str(args.calib_chunks), "-t", str(args.threads)], WORK / "imatrix.log")
    results: dict = {
        "model": "SmolLM2-135M (demo checkpoint)" if smol else f"{args.model} (dequantized GGUF bundle)",
        "ctx": args.ctx,
        "calibration": f"WikiText-2 validation, first windows of {args.ctx} tokens: llama-imatrix {args.calib_chunks}, "
        f"quantpipe Hessians {args.hessian_chunks or args.calib_chunks}",
        "perplexity": f"llama-perplexity, WikiText-2 test, -c {args.ctx}, first {args.ppl_chunks} chunks",
        "f32": {"size_bytes": f32.stat().st_size},
        "types": {},
    }
    if args.fp_ppl:
        results["f32"]["ppl"] = _ppl(f32, test, args.ctx, args.ppl_chunks, args.threads)
    for ftype in types:
        print(ftype, flush=True)
        theirs, ours = WORK / f"llamacpp-imatrix-{ftype}.gguf", WORK / f"quantpipe-gptq{tag}-{ftype}.gguf"
        if not theirs.is_file():
            cmd = [_tool("llama-quantize"), "--imatrix", str(imatrix), str(f32), str(theirs), ftype]
            _run([*cmd, str(args.threads)], WORK / f"quantize-{ftype}.log")
        their_types, our_types = _tensor_types(theirs), _tensor_types(ours)
        row: dict = {
            "tensor_types_equal_llama_quantize": their_types == our_types,
            "mix_mismatches": {n: [our_types.get(n), t] for n, t in their_types.items() if our_types.get(n) != t},
        }
        for label, path in (("llama.cpp imatrix", theirs), ("quantpipe GPTQ", ours)):
            size = path.stat().st_size
            row[label] = {
                "size_bytes": size,
                "bits_per_weight": round(8 * size / n_weights, 3),
                "ppl": _ppl(path, test, args.ctx, args.ppl_chunks, args.threads),
            }
        # our file in llama.cpp vs torch carrying the weights the gguf package decodes from the same file
        deq = load_model(src).float().eval()
        mods = dict(deq.named_modules())
        for name, w in _gguf_weights(ours, config).items():
            target = deq.get_input_embeddings() if name == "model.embed_tokens" else mods[name]
            target.weight.data = w
        row["quantpipe GPTQ"]["llama_cpp_vs_torch_dequant"] = _llama_logits_vs_torch(ours, deq, calib_text[:4000])
        results["types"][ftype] = row
        print(json.dumps(row, indent=1), flush=True)
        name = ("kquant_llamacpp" if smol else f"kquant_llamacpp-{args.model}") + f"{tag}.json"
        out = ROOT / "benchmarks" / "results" / name
        out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
