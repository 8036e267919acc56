"""Stages ``model`` (the lineage root) and ``calibration`` (token windows + provenance).

Text is read through ``datasets`` for every source (``text``/``json`` builders for local files, the hub
``wikitext`` dataset when no local copy is configured) so local and hub sources share one code path. Windows are
drawn GPTQ-repo style: ``random.seed(seed)``, then ``n_samples`` random start positions in the token stream.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

from infra.errors import ConfigError
from infra.settings import Settings
from tasks.models import ResolvedModel, model_file
from tasks.recipe import CalibrationConfig
from tasks.stage import StageContext, StageResult, run_stage

__all__ = [
    "MODEL_VERSION",
    "STAGE_VERSION",
    "check_text_source",
    "load_texts",
    "run_calibration",
    "run_model",
    "tokenizer_digest",
]

MODEL_VERSION = 1
STAGE_VERSION = 2  # 2: rows keep their line breaks (hub-identical text)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json")


def tokenizer_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for name in _TOKENIZER_FILES:
        f = model_file(path, name)  # never a file outside the model dir
        if f is not None:
            digest.update(name.encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()[:32]


def run_model(ctx: StageContext, model: ResolvedModel) -> StageResult:
    """A small artifact naming the model (identity, revision, config): the root of every lineage."""
    config = {**model.key_config(), "tokenizer": tokenizer_digest(model.path)}

    def produce(w: Any, _run: Any) -> None:
        from tasks.models import check_weights_finite

        check_weights_finite(model.path)  # once per checkpoint content: the model key hashes every file
        config_json = model_file(model.path, "config.json")
        if config_json is None:
            raise ConfigError(f"model directory {model.path} has no config.json")
        w.add_file("config.json", config_json)
        w.metadata.update({"source": model.source, "path": str(model.path)})

    return run_stage(ctx, "model", MODEL_VERSION, config, {}, produce)


_WIKITEXT_FILES = {"validation": "wiki.valid.raw", "test": "wiki.test.raw"}
HUB_WIKITEXT = "wikitext2-hub"  # the Hugging Face ``wikitext`` dataset through ``datasets`` (needs the hub)


def describe_text_source(dataset: str, settings: Settings) -> str:
    """One line saying where a dataset name's text comes from (the demo prints it)."""
    if dataset == HUB_WIKITEXT:
        return "WikiText-2 raw from the Hugging Face hub ('wikitext' dataset)"
    if dataset == "wikitext2":
        if settings.wikitext_dir is None:
            return "WikiText-2 raw shipped with quantpipe (CC BY-SA 3.0, tasks/data/wikitext-2-raw)"
        return f"WikiText-2 raw from {settings.wikitext_dir} (QUANTPIPE_WIKITEXT_DIR)"
    return f"local text {dataset}"


def _source_files(dataset: str, settings: Settings, split: str) -> tuple[str, list[Path]]:
    """(builder, files) for a local source; builder '' means the hub dataset."""
    if dataset == HUB_WIKITEXT:
        return "", []
    if dataset == "wikitext2":
        if settings.wikitext_dir is None:  # no local copy configured: the one shipped with quantpipe (offline)
            from tasks.bundled_data import bundled_wikitext_dir

            f = bundled_wikitext_dir(settings.effective_cache_dir) / _WIKITEXT_FILES[split]
            return "text", [f]
        f = settings.wikitext_dir / _WIKITEXT_FILES[split]
        if not f.is_file():
            raise ConfigError(f"{f} not found; set QUANTPIPE_WIKITEXT_DIR to a dir with wiki.valid.raw/wiki.test.raw")
        return "text", [f]
    files = _local_files(dataset, settings)
    suffixes = {p.suffix for p in files}
    if suffixes <= _JSON_SUFFIXES:
        return "json", files
    if suffixes <= _TEXT_SUFFIXES:
        return "text", files
    shown = sorted(s or "(no suffix)" for s in suffixes - _JSON_SUFFIXES - _TEXT_SUFFIXES) or ["a mix of text and JSON"]
    raise ConfigError(f"calibration files must be .txt/.raw or .jsonl/.json, got {', '.join(shown)} in {dataset!r}")


_TEXT_SUFFIXES = {".txt", ".raw", ".text"}
_JSON_SUFFIXES = {".jsonl", ".json"}


def _local_files(dataset: str, settings: Settings) -> list[Path]:
    """The regular files of a local source, resolved (symlinks included) and all inside ``settings.data_dirs``:
    a recipe (or a Prefect UI form) must not be able to read any other file of the worker into the store. A
    directory contributes its files, hidden ones excepted; a symlinked subdirectory is not descended into."""
    roots = [r.resolve() for r in settings.effective_data_dirs]

    def allowed(p: Path) -> bool:
        return any(p.is_relative_to(r) for r in roots)

    path = Path(dataset).expanduser().resolve()
    if not allowed(path) or not path.exists():  # one message for both: no probing of paths outside the roots
        raise ConfigError(
            f"calibration dataset {dataset!r} is neither 'wikitext2' nor an existing file/directory under the "
            f"allowed data directories (QUANTPIPE_DATA_DIRS: {', '.join(map(str, roots)) or 'none'})"
        )
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ConfigError(f"calibration dataset {dataset!r} is not a regular file or directory")
    files = []
    for entry in sorted(path.rglob("*")):
        if any(part.startswith(".") for part in entry.relative_to(path).parts):
            continue
        real = entry.resolve()
        if not allowed(real):
            raise ConfigError(
                f"calibration file {str(entry)!r} links outside the allowed data directories; refused "
                "(QUANTPIPE_DATA_DIRS)"
            )
        if real.is_file():
            files.append(real)
        elif not real.is_dir():
            raise ConfigError(f"calibration file {str(entry)!r} is not a regular file")
    if not files:
        raise ConfigError(f"calibration dataset {dataset!r} is an empty directory")
    return files


def check_text_source(dataset: str, settings: Settings, *, split: str = "validation", text_field: str = "text") -> None:
    """Cheap pre-flight of a local text source (exists, UTF-8, not blank, has the JSONL field), so a bad source
    fails before any stage commits an artifact. Hub sources are checked when they are loaded."""
    builder, files = _source_files(dataset, settings, split)
    blank = True
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"calibration text {str(f)!r} is not UTF-8") from None
        if builder == "json":
            first = next((line for line in text.splitlines() if line.strip()), None)
            if first is not None:
                try:
                    row = json.loads(first)
                except ValueError:
                    raise ConfigError(f"calibration file {str(f)!r} is not JSON lines (first line)") from None
                if not isinstance(row, dict) or text_field not in row:
                    raise ConfigError(
                        f"calibration file {str(f)!r} has no field {text_field!r} (calibration.text_field)"
                    )
        blank = blank and not text.strip()
    if files and blank:
        raise ConfigError(f"calibration text {dataset!r} is empty")


def load_texts(
    dataset: str, settings: Settings, *, split: str = "validation", text_field: str = "text"
) -> tuple[str, dict[str, Any]]:
    """The source text joined GPTQ-style (lines, whitespace-only → "", joined by blank lines) + provenance."""
    import datasets

    builder, files = _source_files(dataset, settings, split)
    cache = str(settings.effective_cache_dir / "datasets")
    try:
        if builder == "":
            ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split, cache_dir=cache)
            provenance: dict[str, Any] = {"source": "hf:wikitext/wikitext-2-raw-v1", "split": split}
        else:
            # keep_linebreaks: rows end in "\n" like the hub's wikitext rows (the GPTQ protocol's 304,986 SmolLM2
            # tokens for wiki.test.raw depend on it); whitespace-only rows still become "" below.
            kwargs: dict[str, Any] = {"keep_linebreaks": True} if builder == "text" else {}
            ds = datasets.load_dataset(
                builder, data_files=[str(f) for f in files], split="train", cache_dir=cache, **kwargs
            )
            provenance = {
                "source": [str(f) for f in files],
                "sha256": {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files},
            }
    except UnicodeDecodeError:
        raise ConfigError(f"calibration text {dataset!r} is not UTF-8") from None
    except (FileNotFoundError, ConnectionError) as exc:
        raise ConfigError(
            f"cannot load calibration dataset {dataset!r} ({type(exc).__name__}); offline? set "
            "QUANTPIPE_WIKITEXT_DIR or use local files"
        ) from None
    except datasets.exceptions.DatasetGenerationError as exc:
        cause = exc.__cause__
        if isinstance(cause, UnicodeDecodeError):
            raise ConfigError(f"calibration text {dataset!r} is not UTF-8") from None
        raise ConfigError(f"cannot read calibration dataset {dataset!r}: {cause or exc}") from None
    if text_field not in ds.column_names:
        raise ConfigError(f"calibration dataset {dataset!r} has no field {text_field!r} (has {ds.column_names})")
    lines = ["" if not (t or "").strip() else t for t in ds[text_field]]
    text = "\n\n".join(lines)
    if not text.strip():
        raise ConfigError(f"calibration text {dataset!r} is empty")
    return text, provenance


def _sample_windows(ids: list[int], cfg: CalibrationConfig) -> list[list[int]]:
    if len(ids) <= cfg.seq_len + 1:
        raise ConfigError(f"calibration text has {len(ids)} tokens, fewer than seq_len={cfg.seq_len}+1")
    rng = random.Random(cfg.seed)
    windows = []
    for _ in range(cfg.n_samples):
        start = rng.randint(0, len(ids) - cfg.seq_len - 1)
        windows.append(ids[start : start + cfg.seq_len])
    return windows


def run_calibration(ctx: StageContext, model: ResolvedModel, model_ref: str, cfg: CalibrationConfig) -> StageResult:
    import torch
    from safetensors.torch import save

    from tasks.models import load_tokenizer

    config = {**cfg.model_dump(mode="json"), "tokenizer": tokenizer_digest(model.path)}

    def produce(w: Any, run: Any) -> None:
        tokenizer = load_tokenizer(model.path)
        model_cfg = json.loads((model.path / "config.json").read_text())
        if len(tokenizer) > int(model_cfg.get("vocab_size", 0)):
            raise ConfigError(
                f"tokenizer of {model.name} has {len(tokenizer)} tokens but the model's vocab_size is "
                f"{model_cfg.get('vocab_size')}; tokenizer/model mismatch"
            )
        text, provenance = load_texts(cfg.dataset, ctx.settings, text_field=cfg.text_field)
        ids = tokenizer(text, add_special_tokens=False).input_ids
        windows = torch.tensor(_sample_windows(ids, cfg), dtype=torch.int64)
        w.add_bytes("tokens.safetensors", save({"input_ids": windows}))
        w.metadata.update({"provenance": provenance, "source_tokens": len(ids), "shape": list(windows.shape)})

    def after(ref: Any, run: Any, hit: bool) -> dict[str, Any]:
        meta = ctx.store.manifest(ref).metadata
        if run is not None:
            run.log_metrics({"source_tokens": float(meta["source_tokens"])})
        return {"shape": meta["shape"]}

    return run_stage(ctx, "calibration", STAGE_VERSION, config, {"model": model_ref}, produce, after=after)
