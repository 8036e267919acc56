"""Hugging Face ships a package imported as ``kernels``; ours must not break transformers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_transformers_loads_llama_with_our_kernels_installed(tiny_llama_dir: Path) -> None:
    code = (
        "import kernels, transformers, torch\n"
        "assert not hasattr(kernels, '__version__'), 'kernels/__init__ must stay light'\n"
        f"m = transformers.AutoModelForCausalLM.from_pretrained({str(tiny_llama_dir)!r})\n"
        "out = m(torch.tensor([[1, 2, 3]])).logits\n"
        "assert out.shape[-1] == m.config.vocab_size\n"
        "print('ok', kernels.__file__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ok" in result.stdout
    assert str(Path(__file__).resolve().parents[1] / "kernels") in result.stdout
