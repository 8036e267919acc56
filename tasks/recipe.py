"""Recipes: one validated, typed description of a quantization scheme (``recipes/*.yaml``).

Every field has a default and a description, so the Prefect UI renders a form from the flow's parameter schema.
Each stage reads only its own section, and only that section enters the stage's artifact key: changing an eval
setting never invalidates Hessians.

Sample YAML (``recipes/gptq-w4g64.yaml``)::

    name: gptq-w4g64
    quantize: {method: gptq, bits: 4, group_size: 64, sym: false}
    calibration: {n_samples: 128, seq_len: 512, seed: 0}
    eval: {seq_len: 2048, n_windows: 16}
    registry: {max_ppl_increase: 0.25}
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from infra.errors import ConfigError

__all__ = [
    "CalibrationConfig",
    "EvalConfig",
    "HessianConfig",
    "PackConfig",
    "QuantizeConfig",
    "Recipe",
    "RegisterConfig",
    "TRANSFORM_METHODS",
    "TransformConfig",
    "load_recipe",
]

_FROZEN = ConfigDict(frozen=True, extra="forbid")


class CalibrationConfig(BaseModel):
    model_config = _FROZEN

    dataset: str = Field(
        default="wikitext2",
        description="'wikitext2' (wiki.valid.raw from the settings' wikitext_dir, or the hub dataset), or a path "
        "to a local .txt/.jsonl file or a directory of them.",
    )
    text_field: str = Field(default="text", description="JSONL field holding the text.")
    n_samples: int = Field(default=128, ge=1, le=100_000, description="Number of token windows.")
    seq_len: int = Field(default=512, ge=8, le=65_536, description="Tokens per window.")
    seed: int = Field(default=0, description="random.seed for the window start positions (GPTQ-repo style).")


class HessianConfig(BaseModel):
    model_config = _FROZEN

    dtype: Literal["float64"] = Field(default="float64", description="Accumulation dtype of Σ x xᵀ.")
    compute_dtype: Literal["float32", "bfloat16"] = Field(
        default="float32",
        description="Dtype of the calibration forward pass (bfloat16: ~2x faster on CPUs with AMX / on GPUs; "
        "Σ x xᵀ is still accumulated from fp32 copies of the activations).",
    )
    micro_batch: int = Field(default=8, ge=1, description="Samples per forward call (memory vs speed; not keyed).")

    def key_config(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"micro_batch"})


TRANSFORM_METHODS = {"quip": "kron", "hadamard-gptq": "hadamard"}  # method → its default transform kind


class TransformConfig(BaseModel):
    """Incoherence processing (ALGORITHMS.md §4), read only by the transform methods (quip, hadamard-gptq)."""

    model_config = _FROZEN

    kind: Literal["kron", "hadamard"] | None = Field(
        default=None,
        description="kron: QuIP Kronecker of random orthogonal factors + permutation; hadamard: randomized Hadamard "
        "(QuIP#). Empty = the method's default (quip → kron, hadamard-gptq → hadamard).",
    )
    seed: int = Field(default=0, description="Seed of the random transforms (per layer: hash of seed and layer name).")
    rescale: bool = Field(default=False, description="QuIP diagonal rescale s = (diag H / diag WᵀW)^(1/4).")
    fallback: Literal["error", "random_orthogonal"] = Field(
        default="random_orthogonal",
        description="Sizes with no Hadamard construction: a random orthogonal factor ⊗ H_2^k, or refuse the recipe.",
    )


class QuantizeConfig(BaseModel):
    model_config = _FROZEN

    method: Literal["rtn", "gptq", "quip", "hadamard-gptq"] = Field(
        default="gptq",
        description="Per-layer quantization method (quip: incoherence + LDLQ; hadamard-gptq: randomized Hadamard "
        "+ GPTQ).",
    )
    bits: int = Field(default=4, ge=1, le=8, description="Bits per weight code.")
    group_size: int = Field(default=128, ge=-1, description="Columns per grid; -1/0 = one grid per output channel.")
    sym: bool = Field(default=False, description="Symmetric grid (zero point fixed at 2^(bits-1)).")
    mse_clip: bool = Field(default=False, description="Search a clipped range minimising |err|^2.4.")
    scale_mode: Literal["minmax", "rms"] = Field(
        default="minmax", description="Grid range: minmax (max|w|), or rms: ±2.4·RMS(w) (needs sym; for rotations)."
    )
    transform: TransformConfig = Field(
        default_factory=TransformConfig, description="Incoherence transforms (quip, hadamard-gptq only)."
    )
    damp: float = Field(default=0.01, gt=0, le=1.0, description="GPTQ damping λ (fraction of mean diag H).")
    block_size: int = Field(default=128, ge=1, description="GPTQ lazy-batch block size.")
    act_order: bool = Field(default=True, description="GPTQ: process columns by descending diag(H).")
    static_groups: bool = Field(default=True, description="GPTQ: fit group grids before the sweep (no reordering).")
    mode: Literal["parallel", "sequential"] = Field(
        default="parallel",
        description="parallel: layers independent given fp Hessians; sequential: inputs propagated through "
        "already-quantized blocks (GPTQ-paper style, own keys).",
    )
    skip: tuple[str, ...] = Field(default=("lm_head",), description="Regexes of linears left in full precision.")
    workers: int = Field(default=2, ge=1, le=64, description="Concurrent layer tasks (not keyed).")

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if v not in (2, 3, 4, 8):
            raise ValueError(f"bits must be one of 2, 3, 4, 8 (packed formats), got {v}")
        return v

    @field_validator("skip")
    @classmethod
    def _regex(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in v:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"skip pattern {pattern!r} is not a valid regex: {exc}") from None
        return v

    @model_validator(mode="after")
    def _rms_needs_sym(self) -> QuantizeConfig:
        if self.scale_mode == "rms" and not self.sym:
            raise ValueError("scale_mode 'rms' needs a symmetric grid (sym: true)")
        return self

    def transform_kind(self) -> str | None:
        """The transform kind this method uses (None: no transforms)."""
        if self.method not in TRANSFORM_METHODS:
            return None
        return self.transform.kind or TRANSFORM_METHODS[self.method]

    def key_config(self) -> dict[str, Any]:
        """What changes the quantized weights: everything but scheduling knobs and other methods' fields."""
        exclude = {"workers"}
        if self.method == "rtn":
            exclude |= {"damp", "block_size", "act_order", "static_groups"}
        if self.method == "quip":  # LDLQ: columns in order, no lazy batches
            exclude |= {"block_size", "act_order"}
        if self.method not in TRANSFORM_METHODS:
            exclude.add("transform")
        if self.scale_mode == "minmax":  # default: keeps the keys of recipes written before scale_mode existed
            exclude.add("scale_mode")
        return self.model_dump(mode="json", exclude=exclude)


class PackConfig(BaseModel):
    model_config = _FROZEN

    compressed_tensors: bool = Field(
        default=True, description="Also export compressed-tensors (pack-quantized) when the scheme is representable."
    )


class EvalConfig(BaseModel):
    model_config = _FROZEN

    dataset: Literal["wikitext2"] = Field(default="wikitext2", description="Perplexity text (wiki.test.raw).")
    seq_len: int = Field(default=2048, ge=8, description="Tokens per non-overlapping window.")
    n_windows: int = Field(default=16, ge=0, description="First N windows; 0 = all.")
    batch_size: int = Field(default=1, ge=1, description="Windows per forward (not keyed).")

    def key_config(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"batch_size"})


class RegisterConfig(BaseModel):
    model_config = _FROZEN

    enabled: bool = Field(default=True, description="Register the build in the MLflow model registry.")
    max_ppl_increase: float | None = Field(
        default=0.25, ge=0, description="Promotion gate: alias 'champion' only if ppl ≤ (1+x)·fp ppl."
    )
    max_ppl: float | None = Field(default=None, gt=0, description="Promotion gate: absolute ppl ceiling.")


class Recipe(BaseModel):
    model_config = _FROZEN

    name: str = Field(default="custom", description="Recipe name; the registered model is '<model>.<name>'.")
    description: str = Field(default="", description="Free text.")
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    hessians: HessianConfig = Field(default_factory=HessianConfig)
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig)
    pack: PackConfig = Field(default_factory=PackConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    registry: RegisterConfig = Field(default_factory=RegisterConfig)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", v) or ".." in v:
            raise ValueError(f"recipe name {v!r} must match [A-Za-z0-9][A-Za-z0-9._-]* (no '..')")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        return self

    def digest(self) -> str:
        import hashlib

        from infra.keys import canonical_json

        return hashlib.sha256(canonical_json(self.model_dump(mode="json")).encode()).hexdigest()[:16]

    def with_overrides(self, overrides: list[str]) -> Recipe:
        """Apply ``--set section.field=value`` overrides (values parsed as YAML scalars)."""
        data = self.model_dump(mode="json")
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} must look like section.field=value")
            path, raw = item.split("=", 1)
            value = yaml.safe_load(raw) if raw else ""
            node = data
            parts = path.strip().split(".")
            for part in parts[:-1]:
                if not isinstance(node.get(part), dict):
                    raise ConfigError(f"override {item!r}: unknown section {part!r}")
                node = node[part]
            node[parts[-1]] = value
        return parse_recipe(data, source="--set overrides")


def _format_validation(exc: ValidationError, source: str) -> str:
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(root)"
    msg = first["msg"].removeprefix("Value error, ")
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"invalid recipe {source}: {loc}: {msg}{more}"


def parse_recipe(data: Any, *, source: str) -> Recipe:
    if not isinstance(data, dict):
        raise ConfigError(f"invalid recipe {source}: expected a mapping at the top level")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation(exc, source)) from None


def load_recipe(path_or_name: str | Path) -> Recipe:
    """A recipe from a YAML path, or a shipped recipe name (``gptq-w4g64`` → ``recipes/gptq-w4g64.yaml``)."""
    path = Path(path_or_name)
    if not path.is_file():
        shipped = Path(__file__).resolve().parents[1] / "recipes" / f"{path_or_name}.yaml"
        if shipped.is_file():
            path = shipped
        else:
            raise ConfigError(f"recipe {str(path_or_name)!r} not found (a YAML path or a name in recipes/)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"recipe {path} is not valid YAML{where}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"recipe {path} is not UTF-8 text") from None
    recipe = parse_recipe(data, source=str(path))
    if "name" not in (data or {}):
        recipe = recipe.model_copy(update={"name": path.stem})
    return recipe
