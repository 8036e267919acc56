"""Everything read from a model directory, a recipe or a UI form is untrusted: local calibration files only from
``data_dirs``, no symlink out of a model dir, every unloadable checkpoint refused by ``resolve_model`` (before any
artifact exists), no calibration/eval window longer than the model's positions."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest

from infra.errors import ConfigError
from infra.settings import Settings
from tasks.calibration import check_text_source, load_texts
from tasks.models import resolve_model, validate_checkpoint_dir

TEXT = b"The quick brown fox jumps over the lazy dog.\n" * 50


# ------------------------------------------------------------------------------------------ calibration sources
@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    return root


def _settings(tmp_path: Path, *roots: Path) -> Settings:
    return Settings(home=tmp_path / "home", data_dirs=list(roots))


def test_calibration_file_inside_data_dirs_is_read(tmp_path: Path, data_root: Path) -> None:
    (data_root / "calib.txt").write_bytes(TEXT)
    settings = _settings(tmp_path, data_root)
    check_text_source(str(data_root / "calib.txt"), settings)
    text, provenance = load_texts(str(data_root / "calib.txt"), settings)
    assert "lazy dog" in text and provenance["source"] == [str((data_root / "calib.txt").resolve())]


def test_calibration_file_outside_data_dirs_is_refused(tmp_path: Path, data_root: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_bytes(TEXT)
    settings = _settings(tmp_path, data_root)
    for source in (str(secret), str(data_root / ".." / "secret.txt")):
        with pytest.raises(ConfigError, match="QUANTPIPE_DATA_DIRS") as err:
            check_text_source(source, settings)
        assert "\n" not in str(err.value)
        with pytest.raises(ConfigError, match="QUANTPIPE_DATA_DIRS"):
            load_texts(source, settings)
    # a missing file inside the roots gets the same message: no probing of what exists outside them
    with pytest.raises(ConfigError, match="QUANTPIPE_DATA_DIRS"):
        check_text_source(str(data_root / "missing.txt"), settings)


def test_calibration_symlink_out_of_data_dirs_is_refused(tmp_path: Path, data_root: Path) -> None:
    secret = tmp_path / "credentials.txt"
    secret.write_bytes(TEXT)
    (data_root / "calib.txt").symlink_to(secret)
    sub = data_root / "corpus"
    sub.mkdir()
    (sub / "a.txt").write_bytes(TEXT)
    (sub / "b.txt").symlink_to(secret)
    settings = _settings(tmp_path, data_root)
    with pytest.raises(ConfigError, match="QUANTPIPE_DATA_DIRS"):
        check_text_source(str(data_root / "calib.txt"), settings)
    with pytest.raises(ConfigError, match="links outside the allowed data directories"):
        check_text_source(str(sub), settings)
    (sub / "b.txt").unlink()
    (sub / "b.txt").symlink_to(sub / "a.txt")  # a link that stays inside is fine
    check_text_source(str(sub), settings)


def test_calibration_file_without_known_suffix_is_refused(tmp_path: Path, data_root: Path) -> None:
    settings = _settings(tmp_path, data_root)
    (data_root / "credentials").write_bytes(b"aws_secret_access_key = abc\n" * 20)
    with pytest.raises(ConfigError, match=r"must be \.txt/\.raw or \.jsonl/\.json, got \(no suffix\)"):
        check_text_source(str(data_root / "credentials"), settings)
    (data_root / "id_rsa.pem").write_bytes(TEXT)
    with pytest.raises(ConfigError, match=r"got \.pem"):
        load_texts(str(data_root / "id_rsa.pem"), settings)


def test_calibration_non_regular_file_is_refused(tmp_path: Path, data_root: Path) -> None:
    fifo = data_root / "pipe.txt"
    os.mkfifo(fifo)  # reading it would block the worker forever
    with pytest.raises(ConfigError, match="not a regular file"):
        check_text_source(str(fifo), _settings(tmp_path, data_root))


def test_data_dirs_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from infra.settings import get_settings

    wiki = tmp_path / "wiki"
    wiki.mkdir()
    monkeypatch.chdir(tmp_path)
    default = Settings(home=tmp_path / "home", wikitext_dir=wiki).effective_data_dirs
    assert default == [(tmp_path / "home" / "data").resolve(), tmp_path.resolve(), wiki.resolve()]
    monkeypatch.chdir("/")  # the filesystem root is never a default root
    assert Path("/") not in Settings(home=tmp_path / "home", wikitext_dir=None).effective_data_dirs

    monkeypatch.setenv("QUANTPIPE_DATA_DIRS", json.dumps([str(tmp_path / "a"), "~/b"]))
    assert Settings().effective_data_dirs == [(tmp_path / "a").resolve(), Path("~/b").expanduser().resolve()]
    monkeypatch.setenv("QUANTPIPE_DATA_DIRS", f"{tmp_path / 'a'}{os.pathsep}{tmp_path / 'c'}")
    assert Settings().effective_data_dirs == [(tmp_path / "a").resolve(), (tmp_path / "c").resolve()]
    monkeypatch.setenv("QUANTPIPE_DATA_DIRS", "[]")  # explicitly none: no local calibration file at all
    assert Settings().effective_data_dirs == []
    monkeypatch.setenv("QUANTPIPE_DATA_DIRS", '["/a", ')
    try:
        with pytest.raises(ConfigError, match="QUANTPIPE_DATA_DIRS"):
            get_settings(refresh=True)
    finally:
        monkeypatch.undo()
        get_settings(refresh=True)


# ------------------------------------------------------------------------------------------ model directories
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _resolve_fails(d: Path, tmp_path: Path, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as err:
        resolve_model(str(d), Settings(home=tmp_path / "home"))
    assert "\n" not in str(err.value)


def test_tokenizer_symlink_out_of_model_dir_is_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from tasks.checkpoint import copy_tokenizer

    d = _copy(tiny_llama_dir, tmp_path / "m")
    secret = tmp_path / "secret.json"
    secret.write_text('{"aws_secret_access_key": "abc"}')
    (d / "special_tokens_map.json").symlink_to(secret)
    _resolve_fails(d, tmp_path, r"special_tokens_map\.json is a symlink to .*outside the model directory")
    out = tmp_path / "pack"
    out.mkdir()
    with pytest.raises(ConfigError, match="outside the model directory"):  # the pack refuses it on its own too
        copy_tokenizer(d, out)
    assert not (out / "special_tokens_map.json").exists()


def test_symlinks_inside_model_dir_and_hf_cache_layout_are_fine(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from tasks.checkpoint import copy_tokenizer

    d = _copy(tiny_llama_dir, tmp_path / "m")
    (d / "real").mkdir()
    os.replace(d / "tokenizer.json", d / "real" / "tokenizer.json")
    (d / "tokenizer.json").symlink_to(Path("real") / "tokenizer.json")
    resolve_model(str(d), Settings(home=tmp_path / "home"))
    out = tmp_path / "pack"
    out.mkdir()
    copy_tokenizer(d, out)
    assert not (out / "tokenizer.json").is_symlink() and (out / "tokenizer.json").stat().st_size > 0
    # a hub cache snapshot: every file links to ../../blobs/<sha>
    repo = tmp_path / "hub" / "models--org--tiny"
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in sorted(tiny_llama_dir.iterdir()):
        shutil.copyfile(f, repo / "blobs" / f.name)
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / f.name)
    validate_checkpoint_dir(snap)


def test_weights_symlink_out_of_model_dir_is_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    d = _copy(tiny_llama_dir, tmp_path / "m")
    outside = tmp_path / "elsewhere.safetensors"
    os.replace(d / "model.safetensors", outside)
    (d / "model.safetensors").symlink_to(outside)
    _resolve_fails(d, tmp_path, r"model\.safetensors is a symlink to .*outside the model directory")
    (d / "model.safetensors").unlink()
    shutil.copyfile(outside, d / "model.safetensors")
    (d / "notes").mkdir()
    (d / "notes" / "passwd").symlink_to("/etc/passwd")  # nested, not a file transformers reads: still refused
    _resolve_fails(d, tmp_path, r"notes/passwd is a symlink")


def test_model_without_tokenizer_is_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    d = _copy(tiny_llama_dir, tmp_path / "m")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (d / name).unlink(missing_ok=True)
    _resolve_fails(d, tmp_path, r"has no tokenizer \(tokenizer\.json or tokenizer\.model\)")


def test_broken_tokenizer_is_refused_by_resolve(tiny_llama_dir: Path, tmp_path: Path) -> None:
    d = _copy(tiny_llama_dir, tmp_path / "m")
    (d / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nope"}}')
    _resolve_fails(d, tmp_path, r"tokenizer cannot be loaded")


def test_tokenizer_remote_code_is_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    d = _copy(tiny_llama_dir, tmp_path / "m")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    _resolve_fails(d, tmp_path, r"remote code \(auto_map in tokenizer_config\.json\); refused")


def _rewrite_header(f: Path, edit) -> None:  # type: ignore[no-untyped-def]
    data = f.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def _up_proj(header: dict) -> str:  # type: ignore[type-arg]
    return next(k for k in sorted(header) if k.endswith("mlp.up_proj.weight"))


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda h: h[_up_proj(h)].update(shape=[128, 128]), r"shape \[128, 128\] of F32 does not fit its 32768 bytes"),
        (lambda h: h[_up_proj(h)].update(dtype="F16"), r"shape \[128, 64\] of F16 does not fit"),
        (lambda h: h[_up_proj(h)].update(dtype="Q4"), r"unknown dtype 'Q4'"),
        (lambda h: h[_up_proj(h)].update(shape=[-128, -64]), r"does not fit"),
        (lambda h: h[_up_proj(h)].update(data_offsets=["0", "8"]), r"is malformed"),
        (lambda h: h[_up_proj(h)].update(data_offsets=[0, 32768]), r"overlaps another or leaves a gap"),
    ],
    ids=["shape", "dtype", "unknown-dtype", "negative", "string-offsets", "overlap"],
)
def test_safetensors_header_that_lies_is_refused(tiny_llama_dir: Path, tmp_path: Path, edit, match: str) -> None:  # type: ignore[no-untyped-def]
    d = _copy(tiny_llama_dir, tmp_path / "m")
    _rewrite_header(d / "model.safetensors", edit)
    _resolve_fails(d, tmp_path, r"model\.safetensors is not a valid safetensors file .*" + match)


def test_safetensors_trailing_bytes_are_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    d = _copy(tiny_llama_dir, tmp_path / "m")
    with (d / "model.safetensors").open("ab") as fh:
        fh.write(b"\0" * 16)
    _resolve_fails(d, tmp_path, r"16 bytes after the last tensor")


def test_non_utf8_file_name_is_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    d = _copy(tiny_llama_dir, tmp_path / "m")
    fd = os.open(os.fsencode(d) + b"/\xff\xfe.json", os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, b"{}")
    os.close(fd)
    _resolve_fails(d, tmp_path, r"file name b'\\xff\\xfe\.json' is not UTF-8")


def test_fifo_in_model_dir_is_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    d = _copy(tiny_llama_dir, tmp_path / "m")
    os.mkfifo(d / "generation_config.json.lock")
    _resolve_fails(d, tmp_path, r"generation_config\.json\.lock is not a regular file")


# ------------------------------------------------------------------------------------------ recipe vs model
@pytest.mark.parametrize("field", ["calibration.seq_len", "eval.seq_len"])
def test_seq_len_beyond_max_positions_is_refused(tiny_llama_dir: Path, field: str) -> None:
    from flows.quantize import validate_recipe_for_model
    from tests.flows.conftest import tiny_recipe

    limit = json.loads((tiny_llama_dir / "config.json").read_text())["max_position_embeddings"]
    validate_recipe_for_model(tiny_recipe().with_overrides([f"{field}={limit}"]), tiny_llama_dir)
    with pytest.raises(ConfigError, match=rf"{field}={limit + 1} is longer than the model's max_position_embeddings"):
        validate_recipe_for_model(tiny_recipe().with_overrides([f"{field}={limit + 1}"]), tiny_llama_dir)
