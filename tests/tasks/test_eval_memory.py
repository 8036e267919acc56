"""Evaluation refuses, before loading, a model that cannot fit in memory (one line, with the numbers)."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors import safe_open

from infra.errors import ConfigError
from tasks.evaluate import _safetensors_bytes, check_fits_in_memory


def test_loaded_size_from_headers_matches_the_tensors(tiny_llama_dir: Path) -> None:
    stored = loaded32 = 0
    for f in tiny_llama_dir.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            for name in h.keys():  # noqa: SIM118
                t = h.get_tensor(name)
                stored += t.numel() * t.element_size()
                loaded32 += t.numel() * (4 if t.is_floating_point() else t.element_size())
    assert _safetensors_bytes(tiny_llama_dir, as_float32=False) == stored
    assert _safetensors_bytes(tiny_llama_dir, as_float32=True) == loaded32


def test_refuses_with_need_and_available() -> None:
    gib = 2**30
    check_fits_in_memory(10 * gib, "a 10 GiB model", available_bytes=13 * gib)
    with pytest.raises(ConfigError, match=r"needs about 96\.2 GiB of memory but 24\.0 GiB is available") as err:
        check_fits_in_memory(80 * gib, "the fp model llama-70b", available_bytes=24 * gib)
    assert "\n" not in str(err.value) and "llama-70b" in str(err.value)


def test_degenerate_builds_are_refused_before_registration() -> None:
    """A pack scoring its vocabulary size (a uniform guess) while the fp model is far better is broken, not bad."""
    from infra.errors import QuantpipeError
    from tasks.evaluate import check_not_degenerate

    check_not_degenerate(38.3, 23.6, 262_144, "pack/x")  # a bad but working W4 build
    check_not_degenerate(900.0, 950.0, 1000, "pack/x")  # a random test model: fp itself near uniform
    with pytest.raises(QuantpipeError, match=r"ppl 262144 .*no better than a uniform guess") as err:
        check_not_degenerate(262_143.5, 23.6, 262_144, "pack/gemma")
    assert "\n" not in str(err.value)
    with pytest.raises(QuantpipeError, match="ppl nan"):
        check_not_degenerate(float("nan"), 23.6, 262_144, "pack/x")


def test_lying_header_is_one_line_error(tmp_path: Path) -> None:
    import struct

    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(ConfigError, match="not a valid safetensors file"):
        _safetensors_bytes(tmp_path, as_float32=True)
