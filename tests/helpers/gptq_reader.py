"""An independent GPTQ checkpoint reader, written from the format's documentation (AutoGPTQ / GPTQModel).

Not the writer's inverse: qweight/qzeros words are read as little-endian int32 bit strings with numpy (code j of
a column at bits [b·j, b·j + b): AutoGPTQ's ``(w >> b·j) & mask`` for b = 2/4/8, 32 codes over 3 words for
b = 3), the zero point is ``stored + 1`` in v1 (``checkpoint_format: gptq``) and ``stored`` in ``gptq_v2``, and
W[n, k] = scales[g_idx[k], n] · (q[k, n] − z[g_idx[k], n]).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

__all__ = ["read_gptq", "read_gptq_checkpoint", "unpack_words"]


def _bits_le(words: np.ndarray) -> np.ndarray:
    """[rows, n_words] int32 → [rows, 32·n_words] bits, word 0's bit 0 first (little-endian words)."""
    raw = np.ascontiguousarray(words.astype("<i4")).view(np.uint8)
    return np.unpackbits(raw, axis=-1, bitorder="little").reshape(words.shape[0], -1)


def unpack_words(words: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Codes [rows, count] from each row's bit string: code j = bits [bits·j, bits·j + bits), LSB first."""
    b = _bits_le(words)[:, : count * bits].reshape(words.shape[0], count, bits).astype(np.int64)
    return (b << np.arange(bits)).sum(-1)


def read_gptq(t: dict[str, torch.Tensor], bits: int, fmt: str) -> torch.Tensor:
    """W [N, K] float32 from GPTQ tensors, per the format documentation."""
    qweight, qzeros = t["qweight"].numpy(), t["qzeros"].numpy()
    scales, g_idx = t["scales"].to(torch.float32).numpy(), t["g_idx"].numpy().astype(np.int64)
    n = qweight.shape[1]
    k = qweight.shape[0] * 32 // bits
    q = unpack_words(qweight.T, bits, k)  # [N, K]: column n of qweight is output row n's bit string
    z = unpack_words(qzeros, bits, n)  # [G, N]
    if fmt == "gptq":
        z = z + 1  # v1: stored zero − 1
    w = scales[g_idx].T * (q - z[g_idx].T).astype(np.float32)  # [N, K]
    return torch.from_numpy(w.astype(np.float32))


def read_gptq_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a GPTQ checkpoint dir as a plain state dict: quantized linears dequantized to ``.weight``."""
    from safetensors.torch import load_file

    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq"
    state: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(f)))
    out = {k: v for k, v in state.items() if k.rsplit(".", 1)[-1] not in ("qweight", "qzeros", "scales", "g_idx")}
    for key in [k for k in state if k.endswith(".qweight")]:
        name = key.removesuffix(".qweight")
        parts = {s: state[f"{name}.{s}"] for s in ("qweight", "qzeros", "scales", "g_idx")}
        out[f"{name}.weight"] = read_gptq(parts, qc["bits"], qc["checkpoint_format"])
    return out
