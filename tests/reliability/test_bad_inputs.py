"""Bad-input corpus: every case goes through the real CLI (``typer.testing.CliRunner``) against a home whose store
already holds a complete run. Each must exit with status 2 and one ``error:`` line naming what to fix, print no
traceback, and leave the store byte-for-byte as it was (same files, same paths).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.conftest import Reference
from tests.reliability.harness import PipelineInputs, record

pytestmark = pytest.mark.slow


@dataclass
class Ctx:
    tmp: Path
    inputs: PipelineInputs

    def recipe(self, text: str | bytes, name: str = "bad.yaml") -> str:
        path = self.tmp / name
        path.write_bytes(text.encode() if isinstance(text, str) else text)
        return str(path)

    def model(self, edit: Callable[[Path], Any] | None = None, name: str = "model") -> str:
        dest = self.tmp / name
        shutil.copytree(self.inputs.model_dir, dest)
        if edit is not None:
            edit(dest)
        return str(dest)

    def quantize(self, *, model: str | None = None, recipe: str | None = None, extra: list[str] | None = None):
        return [
            "quantize",
            "--model",
            model or str(self.inputs.model_dir),
            "--recipe",
            recipe or str(self.inputs.recipe),
            *(extra or []),
        ]

    def text(self, name: str, data: bytes) -> str:
        path = self.tmp / name
        path.write_bytes(data)
        return str(path)


@dataclass
class Case:
    id: str
    build: Callable[[Ctx], list[str]]
    expect: str  # regex the error line must match (names the thing to fix)
    env: dict[str, str] = field(default_factory=dict)


def _edit_config(**changes: Any) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(changes)
        (d / "config.json").write_text(json.dumps(cfg))

    return edit


def _nan_weights(d: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(d / "model.safetensors"))
    name = next(n for n in sorted(tensors) if n.endswith("mlp.up_proj.weight"))
    tensors[name][0, 0] = float("nan")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / "model.safetensors"), metadata={"format": "pt"})
    del torch


def _corrupt_header(d: Path) -> None:
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[:8] = struct.pack("<Q", 1 << 40)
    f.write_bytes(bytes(data))


def _garbage_header(d: Path) -> None:
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8 : 8 + min(n, 32)] = b"\x00{not json at all, sorry!!!!!!!!"[: min(n, 32)]
    f.write_bytes(bytes(data))


def _truncate(d: Path) -> None:
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _pickle_only(d: Path) -> None:
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")


def _no_tokenizer(d: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (d / name).unlink(missing_ok=True)


def _tokenizer_remote_code(d: Path) -> None:
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))


def _shape_lie(d: Path) -> None:
    """A header whose tensor shape x dtype size does not match the bytes its data_offsets span."""
    f = d / "model.safetensors"
    data = f.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    name = next(k for k in sorted(header) if k.endswith("mlp.up_proj.weight"))
    header[name]["shape"] = [header[name]["shape"][0], header[name]["shape"][1] * 2]
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def _non_utf8_name(d: Path) -> None:
    fd = os.open(os.fsencode(d) + b"/\xff\xfe.json", os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, b"{}")
    os.close(fd)


def _tokenizer_symlink_out(d: Path) -> None:
    secret = d.parent / "secret.json"
    secret.write_text('{"aws_secret_access_key": "abc"}')
    (d / "special_tokens_map.json").unlink(missing_ok=True)
    (d / "special_tokens_map.json").symlink_to(secret)


def _weights_symlink_out(d: Path) -> None:
    outside = d.parent / "weights-elsewhere.safetensors"
    os.replace(d / "model.safetensors", outside)
    (d / "model.safetensors").symlink_to(outside)


def _calib_symlink_out(c: Ctx) -> list[str]:
    secret = c.tmp.parent / f"{c.tmp.name}-secret.txt"  # outside the allowed data dir (tmp)
    secret.write_text("aws_secret_access_key = abc\n" * 400)
    link = c.tmp / "calib.txt"
    link.symlink_to(secret)
    return c.quantize(extra=["--set", f"calibration.dataset={link}"])


def _recipe(body: str) -> Callable[[Ctx], list[str]]:
    return lambda c: c.quantize(recipe=c.recipe(body))


def _model(edit: Callable[[Path], Any], name: str = "model") -> Callable[[Ctx], list[str]]:
    return lambda c: c.quantize(model=c.model(edit, name))


def _set(*overrides: str) -> Callable[[Ctx], list[str]]:
    return lambda c: c.quantize(extra=[x for o in overrides for x in ("--set", o)])


def _calib(name: str, data: bytes, *more: str) -> Callable[[Ctx], list[str]]:
    return lambda c: c.quantize(extra=["--set", f"calibration.dataset={c.text(name, data)}", *more])


CASES = [
    # recipes
    Case("yaml-malformed", _recipe("name: x\nquantize: {bits: 4\n"), r"not valid YAML at line"),
    Case("yaml-not-mapping", _recipe("- a\n- b\n"), r"expected a mapping"),
    Case("yaml-not-utf8", _recipe("name: caf\xe9\n".encode("latin-1").decode("latin-1")), r"."),
    Case("recipe-not-utf8", lambda c: c.quantize(recipe=c.recipe(b"name: \xff\xfe\n")), r"not UTF-8"),
    Case("recipe-missing", lambda c: c.quantize(recipe="/nonexistent/recipe.yaml"), r"recipe .* not found"),
    Case("unknown-field", _recipe("quantize: {bitz: 4}\n"), r"quantize\.bitz"),
    Case("unknown-section", _recipe("quantise: {bits: 4}\n"), r"quantise"),
    Case("wrong-type-bits", _recipe("quantize: {bits: four}\n"), r"quantize\.bits"),
    Case("wrong-type-section", _recipe("quantize: 4\n"), r"quantize"),
    Case("bits-zero", _recipe("quantize: {bits: 0}\n"), r"quantize\.bits"),
    Case("bits-unpackable", _recipe("quantize: {bits: 5}\n"), r"bits must be one of"),
    Case("group-larger-than-layer", _set("quantize.group_size=4096"), r"group_size=4096 is larger"),
    Case("n-samples-zero", _set("calibration.n_samples=0"), r"calibration\.n_samples"),
    Case("seq-len-tiny", _set("calibration.seq_len=2"), r"calibration\.seq_len"),
    Case("damp-zero", _set("quantize.damp=0"), r"quantize\.damp"),
    Case("method-unknown", _set("quantize.method=awq"), r"quantize\.method"),
    Case("skip-regex-invalid", _recipe("quantize: {skip: ['([']}\n"), r"skip pattern"),
    Case("max-ppl-negative", _set("registry.max_ppl=-1"), r"registry\.max_ppl"),
    Case("recipe-name-traversal", _recipe("name: ../../etc/passwd\n"), r"recipe name"),
    Case("override-malformed", _set("quantize.bits"), r"must look like section\.field=value"),
    Case("override-unknown-section", _set("nosuch.bits=3"), r"unknown section 'nosuch'"),
    # models
    Case("model-dir-missing", lambda c: c.quantize(model="/nonexistent/model-dir"), r"does not exist"),
    Case("model-is-a-file", lambda c: c.quantize(model=c.model() + "/config.json"), r"is a file"),
    Case("model-no-config", _model(lambda d: (d / "config.json").unlink()), r"no config\.json"),
    Case("config-not-json", _model(lambda d: (d / "config.json").write_text("{oops")), r"config\.json is not valid"),
    Case("unsupported-arch", _model(_edit_config(architectures=["GPT2LMHeadModel"])), r"architecture.*supported"),
    Case("remote-code", _model(_edit_config(auto_map={"AutoModel": "evil.Model"})), r"remote code.*refused"),
    Case("pickle-only", _model(_pickle_only), r"only pickle weights.*refused"),
    Case("safetensors-header-length", _model(_corrupt_header), r"not a valid safetensors file"),
    Case("safetensors-header-garbage", _model(_garbage_header), r"not a valid safetensors file"),
    Case("safetensors-truncated", _model(_truncate), r"not a valid safetensors file"),
    Case("config-weights-hidden", _model(_edit_config(hidden_size=128)), r"does not belong to these weights"),
    Case("config-weights-layers", _model(_edit_config(num_hidden_layers=3)), r"num_hidden_layers=3"),
    Case("nan-weights", _model(_nan_weights), r"NaN/Inf"),
    Case("model-name-not-registrable", _model(lambda d: None, "tiny llama!"), r"invalid registry name"),
    Case("hub-id-offline", lambda c: c.quantize(model="no-such-org/no-such-model"), r"Hugging Face hub"),
    Case("model-no-tokenizer", _model(_no_tokenizer), r"has no tokenizer"),
    Case("tokenizer-remote-code", _model(_tokenizer_remote_code), r"auto_map in tokenizer_config\.json.*refused"),
    Case("safetensors-shape-lie", _model(_shape_lie), r"not a valid safetensors file.*does not fit"),
    Case("model-file-name-not-utf8", _model(_non_utf8_name), r"file name .* is not UTF-8"),
    Case("tokenizer-symlink-escapes", _model(_tokenizer_symlink_out), r"symlink .*outside the model directory"),
    Case("weights-symlink-escapes", _model(_weights_symlink_out), r"symlink .*outside the model directory"),
    # calibration and eval data
    Case("calib-path-missing", _set("calibration.dataset=/nonexistent/calib.txt"), r"neither 'wikitext2' nor"),
    Case("calib-empty", _calib("empty.txt", b"  \n\n \n"), r"is empty"),
    Case("calib-non-utf8", _calib("latin1.txt", "caf\xe9 ".encode("latin-1") * 400), r"not UTF-8"),
    Case("calib-jsonl-no-field", _calib("rows.jsonl", b'{"content": "hi"}\n'), r"no field 'text'"),
    Case("calib-wrong-suffix", _calib("table.csv", b"a,b\n1,2\n"), r"must be \.txt/\.raw or \.jsonl"),
    Case("calib-no-suffix", _calib("credentials", b"aws_secret_access_key = abc\n" * 400), r"got \(no suffix\)"),
    Case("calib-outside-data-dirs", _set("calibration.dataset=/etc/passwd"), r"QUANTPIPE_DATA_DIRS"),
    Case("calib-symlink-escapes", _calib_symlink_out, r"QUANTPIPE_DATA_DIRS"),
    Case("calib-seq-len-beyond-positions", _set("calibration.seq_len=1024"), r"calibration\.seq_len=1024 .*max_pos"),
    Case("eval-seq-len-beyond-positions", _set("eval.seq_len=1024"), r"eval\.seq_len=1024 .*max_position_embed"),
    Case("wikitext-dir-missing", lambda c: c.quantize(), r"QUANTPIPE_WIKITEXT_DIR", {"QUANTPIPE_WIKITEXT_DIR": "/nx"}),
    # stores
    Case("s3-url-no-bucket", lambda c: c.quantize(extra=["--store", "s3:///prefix"]), r"has no bucket"),
    Case("s3-bucket-too-short", lambda c: c.quantize(extra=["--store", "s3://ab/x"]), r"3 to 63 characters"),
    Case("s3-prefix-traversal", lambda c: c.quantize(extra=["--store", "s3://bucket/../x"]), r"must not contain"),
    Case("store-unknown-scheme", lambda c: c.quantize(extra=["--store", "ftp://host/x"]), r"unknown store scheme"),
    Case("store-file-url-no-path", lambda c: c.quantize(extra=["--store", "file://"]), r"has no path"),
    # settings
    Case("setting-bad-device", lambda c: c.quantize(), r"QUANTPIPE_DEVICE", {"QUANTPIPE_DEVICE": "tpu"}),
    Case(
        "setting-bad-attempts", lambda c: c.quantize(), r"QUANTPIPE_S3_MAX_ATTEMPTS", {"QUANTPIPE_S3_MAX_ATTEMPTS": "0"}
    ),
    # path traversal in artifact keys and registry names (other commands)
    Case("verify-ref-traversal", lambda c: ["verify", "../../etc/passwd"], r"invalid artifact reference"),
    Case("verify-key-traversal", lambda c: ["verify", "calibration/../../../etc"], r"invalid artifact"),
    Case("lineage-ref-traversal", lambda c: ["lineage", "calibration/../x"], r"invalid|expected"),
    Case("registry-name-traversal", lambda c: ["registry", "show", "../../evil.x", "1"], r"invalid registry name"),
]
# "yaml-not-utf8" above is a valid latin-1 *string* (UTF-8 on disk): it must simply not crash; drop it from the table.
CASES = [c for c in CASES if c.id != "yaml-not-utf8"]


class _LogCapture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def _snapshot(root: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def bad_home(reference: Reference, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return reference.copy_home(tmp_path_factory.mktemp("bad-inputs") / "home")


_results: dict[str, bool] = {}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_rejected_cleanly(
    case: Case,
    prefect_harness: None,
    rel_inputs: PipelineInputs,
    bad_home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from typer.testing import CliRunner

    from flows.cli import app
    from infra.settings import _cached

    argv = case.build(Ctx(tmp_path, rel_inputs))
    monkeypatch.setenv("QUANTPIPE_HOME", str(bad_home))
    monkeypatch.setenv("QUANTPIPE_WIKITEXT_DIR", str(rel_inputs.wikitext_dir))
    monkeypatch.setenv("QUANTPIPE_DATA_DIRS", json.dumps([str(tmp_path)]))  # where the _calib cases write
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    before = _snapshot(bad_home / "store")
    _cached.cache_clear()
    # Prefect's console handler keeps the stream of the first CliRunner invocation (closed since): capture its
    # run logs ourselves, formatted with any traceback, and silence the stale-stream noise.
    logs = _LogCapture()
    loggers = [logging.getLogger(n) for n in ("prefect.flow_runs", "prefect.task_runs", "quantpipe")]
    monkeypatch.setattr(logging, "raiseExceptions", False)
    for lg in loggers:
        lg.addHandler(logs)
    try:
        result = CliRunner().invoke(app, argv)
    finally:
        for lg in loggers:
            lg.removeHandler(logs)
        monkeypatch.undo()
        _cached.cache_clear()
    output = result.output + "\n".join(logs.lines)
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    clean = (
        result.exit_code == 2
        and "Traceback" not in output
        and len(errors) == 1
        and re.search(case.expect, errors[0], re.IGNORECASE) is not None
        and _snapshot(bad_home / "store") == before
    )
    _results[case.id] = clean
    record("bad-input", case.id, tried=1, rejected_cleanly=int(clean), message=errors[0] if errors else output[-300:])
    assert result.exit_code == 2, output
    assert "Traceback" not in output, output
    assert len(errors) == 1, output
    assert re.search(case.expect, errors[0], re.IGNORECASE), errors[0]
    assert _snapshot(bad_home / "store") == before


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 30
