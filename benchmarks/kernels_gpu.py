"""Low-bit kernel speed, measured side by side in ONE run on a CUDA GPU (issue 8 targets, BENCHMARKS.md "Speed").

    python benchmarks/kernels_gpu.py [--smollm2 DIR] [--layers 32] [--no-gemlite] [--out benchmarks/results]
    python benchmarks/kernels_gpu.py --interpret-smoke     # CPU, TRITON_INTERPRET=1, tiny shapes, writes nothing
    quantpipe bench [same options]

Measures: HBM copy/read bandwidth; fp16 ``torch.matmul``; our W4/W3/W2 g128 kernels (``kernels.wgemm``) at
M = 1, 16, 64 on the eight Llama shapes; gemlite 0.6 as the Triton peer (if importable); the FWHT kernel chained
before the W2 matmul vs the plain W2 matmul; end-to-end greedy decode tokens/s of a packed SmolLM2 checkpoint
(``--smollm2``, a quantpipe-native packed dir; without it a SmolLM2-*shaped* random-weight model, labelled so) and
of a random-weight Llama-7B-shaped model, QuantLinear W4 g128 vs fp16 (HF eager decode, so Python and launch
overhead are included), plus the Llama-7B-shaped stack of decoder linears alone under one CUDA graph (fp16 vs
W4 vs W2). Every kernel time is set against its
roofline (``kernels.roofline``); results go to ``<out>/kernels_gpu-<gpu>-<date>.json`` with the GPU name and the
torch/triton versions. Without CUDA (and without ``--interpret-smoke``) it prints "no CUDA device: speed
unmeasured" and exits 2 without writing anything. The smoke mode runs the same code path on the CPU with the
Triton interpreter; its timings are meaningless and are never written under ``benchmarks/results``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

NO_CUDA_MESSAGE = "no CUDA device: speed unmeasured"
BITS = (4, 3, 2)
GROUP = 128
BATCHES = (1, 16, 64)


class Bench:
    """Timing + result rows. CUDA: triton's do_bench (CUDA-graph variant when it works); CPU: perf_counter median."""

    def __init__(self, device: str, reps: int) -> None:
        self.device, self.reps = device, reps
        self.rows: list[dict[str, Any]] = []

    def time_us(self, fn: Callable[[], object]) -> float:
        if self.device == "cuda":
            import torch
            from triton.testing import do_bench

            try:
                from triton.testing import do_bench_cudagraph

                with torch.cuda.stream(torch.cuda.Stream()):
                    return float(do_bench_cudagraph(fn, rep=50)) * 1e3
            except Exception as e:  # graph capture of some paths fails; time them plainly
                print("cudagraph bench failed, plain do_bench:", repr(e)[:160])
            return float(do_bench(fn, warmup=25, rep=100)) * 1e3
        fn()
        times = []
        for _ in range(self.reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
        return statistics.median(times)

    def emit(self, **row: Any) -> None:
        row = {k: (float(f"{v:.5g}") if isinstance(v, float) else v) for k, v in row.items()}  # 5 significant
        self.rows.append(row)
        print(json.dumps(row), flush=True)


# ---- measurements ---------------------------------------------------------------------------------------------


def measure_bandwidth(b: Bench, nbytes: int) -> float:
    """Device-to-device copy (read + write counted) and a pure read (sum); returns the larger, in bytes/s."""
    import torch

    a = torch.empty(nbytes // 4, dtype=torch.float32, device=b.device).normal_()
    c = torch.empty_like(a)
    copy_bps = 2 * nbytes / (b.time_us(lambda: c.copy_(a)) * 1e-6)
    read_bps = nbytes / (b.time_us(lambda: a.sum()) * 1e-6)
    b.emit(kind="bandwidth", bytes=nbytes, copy_TBps=copy_bps / 1e12, read_TBps=read_bps / 1e12)
    return max(copy_bps, read_bps)


def _random_packed(K: int, N: int, bits: int, group: int, device: str) -> dict[str, Any]:
    """Random INT32_KPACKED tensors (speed does not depend on the values; symmetric zero 2^(b-1))."""
    import torch

    from kernels.packing import num_groups, packed_rows

    G = num_groups(K, group)
    gen = torch.Generator(device="cpu").manual_seed(K * 7 + N + bits)
    qweight = torch.randint(-(2**31), 2**31 - 1, (packed_rows(K, bits), N), generator=gen, dtype=torch.int32)
    if bits == 3:  # 3-bit words use the low 30 bits only
        qweight &= (1 << 30) - 1
    scales = (torch.rand(G, N, generator=gen) * 0.01 + 1e-3).half()
    zeros = torch.full((G, N), float(1 << (bits - 1))).half()
    return {k: v.to(device) for k, v in {"qweight": qweight, "scales": scales, "zeros": zeros}.items()}


def emit_quantized_matmul(
    b: Bench, kind: str, K: int, N: int, M: int, bits: int, group: int, t: float, t16: float, bw: float
) -> None:
    """One row for a quantized matmul that took ``t`` µs: its roofline bound and the speedup over fp16 (``t16``)."""
    from kernels.roofline import frac_of_limit, roofline_us, speedup

    rl = roofline_us(K, N, M, bits, bw, group)
    b.emit(
        kind=kind,
        K=K,
        N=N,
        M=M,
        us=t,
        roofline_us=rl,
        frac_of_limit=frac_of_limit(rl, t),
        speedup_vs_fp16=speedup(t16, t),
    )


def measure_matmuls(
    b: Bench, bw: float, shapes: list[tuple[int, int]], batches: tuple[int, ...], gemlite: Any, group: int = GROUP
) -> None:
    """fp16 matmul, our W4/W3/W2 kernels and gemlite per shape and M, each against the roofline."""
    import torch

    from kernels.roofline import frac_of_limit, roofline_us
    from kernels.wgemm.launch import wgemm

    dt = torch.float16
    for K, N in shapes:
        W = (torch.randn(N, K, device=b.device) / math.sqrt(K)).to(dt)
        packed = {bits: _random_packed(K, N, bits, group, b.device) for bits in BITS}
        for M in batches:
            x = torch.randn(M, K, device=b.device).to(dt)
            t16 = b.time_us(lambda x=x, W=W: torch.matmul(x, W.t()))
            rl = roofline_us(K, N, M, 16, bw)
            b.emit(kind="fp16", K=K, N=N, M=M, us=t16, roofline_us=rl, frac_of_limit=frac_of_limit(rl, t16))
            for bits in BITS:
                p = packed[bits]
                args = (x, p["qweight"], p["scales"], p["zeros"], None, bits, group, K)
                t = b.time_us(lambda a=args: wgemm(*a))
                emit_quantized_matmul(b, f"quantpipe_w{bits}g{group}", K, N, M, bits, group, t, t16, bw)
            if gemlite is not None:
                measure_gemlite(b, gemlite, x, K, N, M, t16, bw, group)


def measure_gemlite(b: Bench, gemlite: Any, x: Any, K: int, N: int, M: int, t16: float, bw: float, group: int) -> None:
    """The peer, exactly as ``shared/bench/roofline_peer.py`` drives it."""
    import torch

    for bits in (4, 2):
        try:
            lin = gemlite.GemLiteLinear(
                bits,
                group_size=group,
                in_features=K,
                out_features=N,
                input_dtype=gemlite.DType.FP16,
                output_dtype=gemlite.DType.FP16,
            )
            Wq = torch.randint(0, 2**bits, (N, K), dtype=torch.uint8, device=b.device)
            scales = torch.rand(N, K // group, dtype=torch.float16, device=b.device) * 0.01
            zeros = torch.full((N, K // group), 2 ** (bits - 1), dtype=torch.float16, device=b.device)
            lin.pack(Wq, scales, zeros, None)
            lin(x)
            t = b.time_us(lambda lin=lin: lin(x))
            emit_quantized_matmul(b, f"gemlite_w{bits}g{group}", K, N, M, bits, group, t, t16, bw)
        except Exception as e:  # the peer failing must not stop our measurements
            b.emit(kind=f"gemlite_w{bits}g{group}", K=K, N=N, M=M, error=repr(e)[:300])


def measure_hadamard_w2(b: Bench, shapes: list[tuple[int, int]], batches: tuple[int, ...], group: int = GROUP) -> None:
    """Randomized Hadamard (FWHT kernel, signs fused) chained before the W2 matmul vs the plain W2 matmul."""
    import torch

    from kernels.hadamard.launch import hadamard_transform
    from kernels.wgemm.launch import wgemm

    use = True if b.device == "cpu" else None  # CPU smoke: force the (interpreted) kernel
    for K, N in shapes:
        p = _random_packed(K, N, 2, group, b.device)
        signs = (torch.randint(0, 2, (K,), device=b.device) * 2 - 1).float()
        for M in batches:
            x = torch.randn(M, K, device=b.device).half()
            args = (p["qweight"], p["scales"], p["zeros"], None, 2, group, K)
            plain = b.time_us(lambda a=args, x=x: wgemm(x, *a))
            fused = b.time_us(lambda a=args, x=x, d=signs: wgemm(hadamard_transform(x, signs=d, use_kernel=use), *a))
            had = b.time_us(lambda x=x, d=signs: hadamard_transform(x, signs=d, use_kernel=use))
            b.emit(
                kind="hadamard_w2",
                K=K,
                N=N,
                M=M,
                w2_us=plain,
                hadamard_us=had,
                hadamard_plus_w2_us=fused,
                ratio_vs_w2=fused / plain,
                mode="chained (FWHT kernel, then W2 kernel)",
            )


def _quantize_linears(model: Any, bits: int, group: int) -> int:
    """Swap every decoder-layer nn.Linear for a QuantLinear with random packed weights (speed only)."""
    from torch import nn

    from kernels.quant_linear import QuantLinear

    n = 0
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and ".layers." in f".{name}":
            K, N = mod.in_features, mod.out_features
            q = QuantLinear(K, N, bits, group, device=mod.weight.device)
            for k, v in _random_packed(K, N, bits, q.group_size, str(mod.weight.device)).items():
                getattr(q, k).copy_(v)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, q)
            n += 1
    return n


def _decode_tokens_per_s(b: Bench, model: Any, steps: int, prompt: int = 8) -> float:
    """Greedy decode with a KV cache: median time of one step (a forward of 1 token), as tokens/s."""
    import torch
    from transformers import DynamicCache

    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, prompt), device=b.device)
    with torch.inference_mode():
        cache = DynamicCache()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        times = []
        for _ in range(steps):
            if b.device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = model(input_ids=tok, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
            if b.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return 1.0 / statistics.median(times)


def _llama(cfg_kw: dict[str, Any], device: str, dtype: Any) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**cfg_kw), dtype=dtype)
    return model.eval()


def measure_linear_stack(b: Bench, label: str, hidden: int, inter: int, layers: int, group: int = GROUP) -> None:
    """One decode token through the seven linears of every layer (q, k, v, o, gate, up, down; no attention, norms
    or lm_head), fp16 nn.Linear vs W4/W2 QuantLinear, timed as one CUDA graph: the weight-streaming part of decode
    without Python/launch overhead, so it shows what the kernels alone give end to end."""
    import torch
    from torch import nn

    from kernels.quant_linear import QuantLinear

    dims = [(hidden, hidden)] * 4 + [(hidden, inter)] * 2 + [(inter, hidden)]
    dtype = torch.float16 if b.device == "cuda" else torch.float32

    def build(bits: int | None) -> list[nn.Module]:
        mods: list[nn.Module] = []
        for _ in range(layers):
            for K, N in dims:
                if bits is None:
                    lin = nn.Linear(K, N, bias=False, device=b.device, dtype=dtype)
                    nn.init.normal_(lin.weight, std=K**-0.5)
                    mods.append(lin)
                else:
                    q = QuantLinear(K, N, bits, group, device=b.device)
                    for k, v in _random_packed(K, N, bits, q.group_size, b.device).items():
                        getattr(q, k).copy_(v)
                    mods.append(q)
        return mods

    def step(mods: list[nn.Module], x: Any) -> Any:
        for i in range(0, len(mods), 7):
            q, k, v, o, g, u, d = mods[i : i + 7]
            h = x + o(q(x) + k(x) + v(x))
            x = h + d(torch.nn.functional.silu(g(h)) * u(h))
        return x

    x = torch.randn(1, hidden, device=b.device, dtype=dtype) * 0.01
    res: dict[str, float] = {}
    for name, bits in (("fp16", None), ("w4", 4), ("w2", 2)):
        mods = build(bits)
        with torch.inference_mode():
            res[f"{name}_tok_s"] = 1e6 / b.time_us(lambda m=mods: step(m, x))
        del mods
    b.emit(
        kind="decode_linear_stack",
        model=label,
        layers=layers,
        group_size=group,
        **res,
        w4_speedup=res["w4_tok_s"] / res["fp16_tok_s"],
        w2_speedup=res["w2_tok_s"] / res["fp16_tok_s"],
    )


def measure_decode(b: Bench, label: str, cfg_kw: dict[str, Any], steps: int, group: int = GROUP) -> None:
    """fp16 model vs the same architecture with W4 g128 QuantLinear decoder linears (random weights)."""
    import torch

    dtype = torch.float16 if b.device == "cuda" else torch.float32
    model = _llama(cfg_kw, b.device, dtype)
    fp = _decode_tokens_per_s(b, model, steps)
    n = _quantize_linears(model, 4, group)
    q = _decode_tokens_per_s(b, model, steps)
    b.emit(
        kind="decode",
        model=label,
        weights="random",
        mode="HF eager, KV cache",
        group_size=group,
        linears_quantized=n,
        fp16_tok_s=fp,
        w4_tok_s=q,
        speedup=q / fp,
    )
    del model


def measure_decode_packed(b: Bench, path: Path, steps: int) -> None:
    """Decode tokens/s of a quantpipe-native packed checkpoint vs its dequantized fp16 copy."""
    import torch
    from torch import nn

    from tasks.checkpoint import load_packed_model

    dtype = torch.float16 if b.device == "cuda" else torch.float32
    model = load_packed_model(path, device=b.device, dtype=dtype)
    q = _decode_tokens_per_s(b, model, steps)
    from kernels.quant_linear import QuantLinear

    for name, mod in list(model.named_modules()):
        if isinstance(mod, QuantLinear) and type(mod) is QuantLinear:
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device=b.device, dtype=dtype)
            lin.weight.data.copy_(mod.dequantized_weight(dtype))
            if mod.bias is not None:
                lin.bias.data.copy_(mod.bias.to(dtype))
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, lin)
    fp = _decode_tokens_per_s(b, model, steps)
    b.emit(kind="decode", model=str(path), weights="packed checkpoint", fp16_tok_s=fp, packed_tok_s=q, speedup=q / fp)


SMOLLM2_SHAPE = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    tie_word_embeddings=True,
)
LLAMA7B_SHAPE = dict(
    hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000
)


# ---- report ---------------------------------------------------------------------------------------------------


def summary_table(rows: list[dict[str, Any]]) -> str:
    """One line per (shape, M): fp16 and each kernel as 'us (frac of limit)'."""
    kinds = sorted({r["kind"] for r in rows if "frac_of_limit" in r and r["kind"] != "fp16"})
    head = f"{'K×N':>12} {'M':>3} | {'fp16':>16} | " + " | ".join(f"{k:>22}" for k in kinds)
    lines = [head, "-" * len(head)]
    keys = sorted({(r["K"], r["N"], r["M"]) for r in rows if r["kind"] == "fp16"})
    for K, N, M in keys:
        cell = {r["kind"]: r for r in rows if (r.get("K"), r.get("N"), r.get("M")) == (K, N, M)}
        f16 = cell["fp16"]
        parts = []
        for k in kinds:
            r = cell.get(k)
            ok = r is not None and "us" in r
            parts.append(f"{r['us']:9.2f} ({r['frac_of_limit']:.2f}, {r['speedup_vs_fp16']:.2f}x)" if ok else "-")
        fp16 = f"{f16['us']:9.2f} ({f16['frac_of_limit']:.2f})"
        lines.append(f"{f'{K}x{N}':>12} {M:>3} | {fp16:>16} | " + " | ".join(f"{p:>22}" for p in parts))
    for r in rows:
        if r["kind"] == "hadamard_w2":
            lines.append(f"hadamard+W2 {r['K']}x{r['N']} M={r['M']}: {r['ratio_vs_w2']:.2f}x the plain W2 time")
        if r["kind"].startswith("decode"):
            lines.append(f"decode {r['model']}: " + ", ".join(f"{k}={v}" for k, v in r.items() if "tok_s" in k))
    return "\n".join(lines)


def environment(device: str) -> dict[str, Any]:
    import torch
    import triton

    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "cpu (TRITON_INTERPRET=1)"
    return {
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "interpreted": device != "cuda",
    }


def _import_gemlite(enabled: bool) -> tuple[Any, str]:
    if not enabled:
        return None, "disabled"
    try:
        import gemlite
        from gemlite import DType, GemLiteLinear  # noqa: F401 - checks the API this script uses
    except Exception as e:
        return None, f"unavailable: {e!r}"[:200]
    return gemlite, str(getattr(gemlite, "__version__", "?"))


def run(args: argparse.Namespace) -> int:
    """The whole measurement; returns the process exit code."""
    smoke = args.interpret_smoke
    results_dir = REPO / "benchmarks" / "results"
    out_dir = Path(args.out) if args.out else (None if smoke else results_dir)
    if smoke and out_dir is not None and out_dir.resolve() == results_dir.resolve():
        print("--interpret-smoke never writes to benchmarks/results", file=sys.stderr)
        return 3
    if smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel modules are first imported, below
    import torch

    if not smoke and not torch.cuda.is_available():
        print(NO_CUDA_MESSAGE, file=sys.stderr)
        return 2
    device = "cuda" if not smoke else "cpu"
    if smoke:
        from kernels._triton_util import is_interpreted
        from kernels.wgemm.triton import wgemm_kernel

        if not is_interpreted(wgemm_kernel):
            print("--interpret-smoke: kernels were imported before TRITON_INTERPRET=1 was set", file=sys.stderr)
            return 3
    b = Bench(device, reps=1 if smoke else 0)
    env = environment(device)
    gemlite, gemlite_version = _import_gemlite(args.gemlite and not smoke)
    env["gemlite"] = gemlite_version
    print(json.dumps(env))
    if smoke:
        shapes, batches, group, nbytes = [(128, 48)], (1, 16), 64, 1 << 20
    else:
        from kernels.roofline import LLAMA_SHAPES

        shapes, batches, group, nbytes = list(LLAMA_SHAPES), BATCHES, GROUP, 1 << 32
    bw = measure_bandwidth(b, nbytes)
    measure_matmuls(b, bw, shapes, batches, gemlite, group)
    measure_hadamard_w2(b, shapes, batches[:1] if smoke else batches, group)
    steps = 2 if smoke else args.steps
    if smoke:
        tiny = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
        measure_decode(b, "tiny-llama (smoke)", {**tiny, "num_key_value_heads": 2, "vocab_size": 256}, steps, group)
        measure_linear_stack(b, "tiny stack (smoke)", 128, 256, 2, group)
    else:
        if args.smollm2:
            measure_decode_packed(b, Path(args.smollm2), steps)
        else:
            measure_decode(b, "SmolLM2-135M-shaped", SMOLLM2_SHAPE, steps)
        measure_decode(b, "Llama-7B-shaped", {**LLAMA7B_SHAPE, "num_hidden_layers": args.layers}, steps)
        measure_linear_stack(b, "Llama-7B-shaped linears", 4096, 11008, args.layers)
    print(summary_table(b.rows))
    payload = {"environment": env, "bandwidth_Bps": bw, "group_size": group, "rows": b.rows}
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        slug = "".join(c if c.isalnum() else "-" for c in env["gpu"]).strip("-").lower()
        path = out_dir / f"kernels_gpu-{slug}-{env['date'][:10]}.json"
        path.write_text(json.dumps(payload, indent=1))
        print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--interpret-smoke", action="store_true", help="CPU + TRITON_INTERPRET=1 on tiny shapes")
    p.add_argument("--smollm2", default=None, help="quantpipe-native packed SmolLM2 checkpoint dir")
    p.add_argument("--layers", type=int, default=32, help="decoder layers of the Llama-7B-shaped model")
    p.add_argument("--steps", type=int, default=64, help="decode steps timed per model")
    p.add_argument("--no-gemlite", dest="gemlite", action="store_false", help="skip the gemlite peer")
    p.add_argument("--out", default=None, help="results dir (default benchmarks/results; smoke: none)")
    return p


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
