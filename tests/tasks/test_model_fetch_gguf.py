"""A local GGUF (``--model file.gguf``): converted once to a safetensors fp32 checkpoint, cached by its sha256.

The GGUF is a tiny random Llama written by the ``gguf`` package in the test (with a byte-level BPE tokenizer), so
the real transformers GGUF loader and our conversion run end to end; an untied output layer must survive.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from infra.errors import ConfigError
from infra.settings import Settings
from tasks.models import fetch_gguf_file, load_model, resolve_model

V, H, F, L, HEADS, KV_HEADS = 64, 32, 64, 2, 4, 2


def write_tiny_gguf(path: Path, *, tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """A 2-layer Llama GGUF with F32 tensors; returns the embedding and output matrices written."""
    import gguf

    rng = np.random.default_rng(seed)

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(H)
    w.add_block_count(L)
    w.add_feed_forward_length(F)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(H // HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(V)
    tokens = ["<s0>", "<s1>", "<|endoftext|>", *(chr(97 + i) for i in range(26)), "ab", "bc"]
    tokens += [f"x{i}" for i in range(V - len(tokens))]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (V - 3))
    w.add_token_merges(["a b", "b c"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    written = {"embed": rand(V, H)}
    w.add_tensor("token_embd.weight", written["embed"])
    kv = H * KV_HEADS // HEADS
    for i in range(L):
        for name, shape in (
            ("attn_q", (H, H)),
            ("attn_k", (kv, H)),
            ("attn_v", (kv, H)),
            ("attn_output", (H, H)),
            ("ffn_gate", (F, H)),
            ("ffn_up", (F, H)),
            ("ffn_down", (H, F)),
        ):
            w.add_tensor(f"blk.{i}.{name}.weight", rand(*shape))
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(H, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(H, np.float32))
    w.add_tensor("output_norm.weight", np.ones(H, np.float32))
    if not tied:
        written["output"] = rand(V, H)
        w.add_tensor("output.weight", written["output"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


def test_untied_gguf_converts_once_and_keeps_its_output_layer(tmp_path: Path) -> None:
    gguf_file = tmp_path / "in" / "tiny.gguf"
    gguf_file.parent.mkdir()
    written = write_tiny_gguf(gguf_file, tied=False)
    settings = Settings(home=tmp_path / "home")
    path, sha = fetch_gguf_file(gguf_file, settings, progress=False)
    model = load_model(path)
    assert not model.config.tie_word_embeddings
    assert torch.equal(model.lm_head.weight, torch.from_numpy(written["output"]))
    assert torch.equal(model.model.embed_tokens.weight, torch.from_numpy(written["embed"]))
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    marker = path / ".quantpipe-complete"
    stamp_time = marker.stat().st_mtime_ns
    # cached by content: a second fetch and resolve_model on the file reuse the checkpoint; the revision is the
    # converted checkpoint's content digest, so the converted dir given as a path is the same model
    assert fetch_gguf_file(gguf_file, settings, progress=False) == (path, sha)
    resolved = resolve_model(str(gguf_file), settings, progress=False)
    assert resolved.path == path and resolved.revision.startswith("sha256:") and resolved.name == "tiny"
    assert resolve_model(str(path), settings, progress=False).key_config() == resolved.key_config()
    assert resolve_model(str(path), settings, progress=False).name == "tiny"
    assert marker.stat().st_mtime_ns == stamp_time
    # a different file is a different checkpoint
    write_tiny_gguf(gguf_file, tied=False, seed=1)
    other, other_sha = fetch_gguf_file(gguf_file, settings, progress=False)
    assert other_sha != sha and other != path


def test_tied_gguf_stays_tied(tmp_path: Path) -> None:
    gguf_file = tmp_path / "tied.gguf"
    written = write_tiny_gguf(gguf_file, tied=True)
    path, _ = fetch_gguf_file(gguf_file, Settings(home=tmp_path / "home"), progress=False)
    model = load_model(path)
    assert model.config.tie_word_embeddings
    assert torch.equal(model.lm_head.weight, torch.from_numpy(written["embed"]))


def test_not_a_gguf_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ConfigError, match="not a GGUF file"):
        fetch_gguf_file(fake, Settings(home=tmp_path), progress=False)
    with pytest.raises(ConfigError, match="does not exist"):
        fetch_gguf_file(tmp_path / "absent.gguf", Settings(home=tmp_path), progress=False)


def test_cli_fetch_takes_a_name_or_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    monkeypatch.setenv("QUANTPIPE_HOME", str(tmp_path / "home"))
    gguf_file = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf_file, tied=False)
    runner = CliRunner()
    ok = runner.invoke(app, ["models", "fetch", "--model", str(gguf_file)])
    assert ok.exit_code == 0, ok.output
    assert Path(ok.stdout.strip().splitlines()[-1]).joinpath("model.safetensors").is_file()
    assert "dequantized" in ok.output
    both = runner.invoke(app, ["models", "fetch", "smollm2-135m", "--model", str(gguf_file)])
    assert both.exit_code == 2 and "one of them" in both.output
    unknown = runner.invoke(app, ["models", "fetch", "llama-9000"])
    assert unknown.exit_code == 2 and "qwen2.5-coder-1.5b" in unknown.output
