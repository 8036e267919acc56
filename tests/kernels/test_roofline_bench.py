"""Roofline arithmetic (``kernels.roofline``) and the GPU benchmark's no-CUDA / interpreter-smoke paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels.roofline import LLAMA_SHAPES, frac_of_limit, roofline_bytes, roofline_us, speedup

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "kernels_gpu.py"
PEER_BW = 3.089e12  # read bandwidth of shared/bench/roofline-h100-2026-11-22.json (the larger of copy/read)


def test_roofline_bytes_formula() -> None:
    # BENCHMARKS.md: N·K·bits/8 + (N·K/g)·4 + M·K·2 + M·N·2
    assert roofline_bytes(4096, 4096, 1, 4, 128) == 4096 * 4096 / 2 + 4096 * 32 * 4 + 4096 * 2 + 4096 * 2
    assert roofline_bytes(4096, 4096, 16, 16) == 4096 * 4096 * 2 + 16 * 4096 * 4  # fp16: no group metadata
    assert roofline_bytes(576, 64, 1, 4, -1) == 576 * 64 / 2 + 64 * 4 + 576 * 2 + 64 * 2  # per-channel: G = 1
    assert roofline_bytes(4096, 4096, 1, 2) < roofline_bytes(4096, 4096, 1, 3) < roofline_bytes(4096, 4096, 1, 4)
    with pytest.raises(ValueError):
        roofline_bytes(0, 4096, 1, 4)


@pytest.mark.parametrize(
    ("K", "N", "M", "bits", "want_us"),
    # roofline_us values that shared/bench/roofline_peer.py wrote into roofline-h100-2026-11-22.json
    [(4096, 4096, 1, 16, 10.87), (4096, 4096, 1, 4, 2.89), (4096, 4096, 1, 2, 1.53), (4096, 4096, 16, 4, 2.97)],
)
def test_roofline_us_reproduces_peer_json(K, N, M, bits, want_us) -> None:
    assert roofline_us(K, N, M, bits, PEER_BW) == pytest.approx(want_us, abs=0.006)


def test_fractions_and_speedups() -> None:
    assert frac_of_limit(2.89, 7.78) == pytest.approx(0.371, abs=1e-3)  # gemlite W4 4096² M=1 in that JSON
    assert speedup(10.55, 7.78) == pytest.approx(1.356, abs=1e-3)
    with pytest.raises(ValueError):
        frac_of_limit(1.0, 0.0)
    assert len(LLAMA_SHAPES) == 8 and (28672, 8192) in LLAMA_SHAPES


def _run(args: list[str], env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=180, env=env, cwd=REPO
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_bench_without_cuda_says_unmeasured_and_writes_nothing(tmp_path) -> None:
    res = _run(["--out", str(tmp_path)], {"CUDA_VISIBLE_DEVICES": ""})
    assert res.returncode == 2
    assert "no CUDA device: speed unmeasured" in res.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_quantpipe_bench_command_is_registered() -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    res = CliRunner().invoke(app, ["bench"])
    assert res.exit_code == 2
    assert "no CUDA device: speed unmeasured" in res.output


def test_interpret_smoke_runs_every_measurement(tmp_path) -> None:
    """The whole measurement path on CPU under TRITON_INTERPRET=1 (tiny shapes); results only where asked."""
    results = REPO / "benchmarks" / "results"
    before = sorted(p.name for p in results.iterdir()) if results.is_dir() else []
    res = _run(["--interpret-smoke", "--out", str(tmp_path)])
    assert res.returncode == 0, res.stderr[-2000:]
    (path,) = list(tmp_path.glob("kernels_gpu-*.json"))
    payload = json.loads(path.read_text())
    assert payload["environment"]["interpreted"] is True and payload["environment"]["torch"] == torch.__version__
    kinds = {r["kind"] for r in payload["rows"]}
    assert {"bandwidth", "fp16", "quantpipe_w4g64", "quantpipe_w3g64", "quantpipe_w2g64"} <= kinds
    assert {"hadamard_w2", "decode", "decode_linear_stack"} <= kinds
    for r in payload["rows"]:
        if r["kind"].startswith("quantpipe_"):
            assert r["roofline_us"] > 0 and r["frac_of_limit"] > 0 and r["M"] in (1, 16)
    assert "K×N" in res.stdout  # the summary table
    after = sorted(p.name for p in results.iterdir()) if results.is_dir() else []
    assert after == before  # smoke never writes into benchmarks/results
    refused = _run(["--interpret-smoke", "--out", str(results)])
    assert refused.returncode == 3
