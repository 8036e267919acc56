"""Peer timing: llm-compressor's ``oneshot`` GPTQ W4 g64 asym on SmolLM2-135M (run in a SIDE venv).

The peer is not a dependency of quantpipe; install it in its own venv and run this script there, back to back
with ``benchmarks/pipeline_smollm2.py`` so both see the same machine state:

    python3 -m venv /tmp/peer-venv
    echo torch==2.13.0 > /tmp/c.txt
    /tmp/peer-venv/bin/pip install -c /tmp/c.txt torch==2.13.0 llmcompressor==0.14.0.1
    /tmp/peer-venv/bin/python benchmarks/peer_llmcompressor.py --model ~/.quantpipe/cache/models/smollm2-135m

Same calibration as our recipe: 128 windows × 512 tokens of wiki.valid.raw, start positions from
``random.seed(0)``; act-order with static groups, damping 0.01, fp32. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path


def windows(tokenizer, text_path: Path, n: int, seq_len: int, seed: int) -> list[list[int]]:
    lines = text_path.read_text(encoding="utf-8").splitlines(keepends=True)
    text = "\n\n".join("" if not line.strip() else line for line in lines)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        start = rng.randint(0, len(ids) - seq_len - 1)
        out.append(ids[start : start + seq_len])
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--wikitext", default=str(Path(__file__).resolve().parents[2] / "shared/data/wikitext-2-raw"))
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--out", default="/tmp/peer-out")
    args = parser.parse_args()

    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    ids = windows(tok, Path(args.wikitext) / "wiki.valid.raw", args.samples, args.seq_len, 0)
    ds = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(w) for w in ids]})
    recipe = GPTQModifier(
        targets="Linear",
        ignore=["lm_head"],
        config_groups={
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": 4,
                    "type": "int",
                    "symmetric": False,
                    "strategy": "group",
                    "group_size": 64,
                    "actorder": "static",
                },
            }
        },
        dampening_frac=0.01,
    )
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=args.seq_len, num_calibration_samples=len(ids))
    oneshot_s = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "peer": "llmcompressor",
                "oneshot_s": round(oneshot_s, 1),
                "total_s": round(time.perf_counter() - started, 1),
                "threads": torch.get_num_threads(),
                "samples": len(ids),
                "seq_len": args.seq_len,
            }
        )
    )


if __name__ == "__main__":
    main()
