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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from infra.errors import ConfigError

__all__ = [
    "ActivationQuantConfig",
    "KVCacheQuantConfig",
    "ROTATION_WEIGHT_METHODS",
    "RotationConfig",
    "BitAllocRecipeConfig",
    "CalibrationConfig",
    "E8PRecipeConfig",
    "GPTQTRecipeConfig",
    "ICQUANT_METHODS",
    "OutlierConfig",
    "EvalConfig",
    "HessianConfig",
    "PackConfig",
    "GPTQQuantizeConfig",
    "GPTQTQuantizeConfig",
    "HadamardE8PQuantizeConfig",
    "HadamardGPTQQuantizeConfig",
    "ICQuantGPTQQuantizeConfig",
    "ICQuantRTNQuantizeConfig",
    "KeyOmit",
    "METHOD_CONFIGS",
    "NotKeyed",
    "QuIPQuantizeConfig",
    "QuantizeConfig",
    "QuantizeMethodConfig",
    "RTNQuantizeConfig",
    "SHIPPED_RECIPES",
    "field_owners",
    "method_config",
    "parse_recipe",
    "shipped_recipe_names",
    "RecipeName",
    "resolve_recipe",
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
        description="'wikitext2' (wiki.valid.raw from QUANTPIPE_WIKITEXT_DIR, else the copy shipped with "
        "quantpipe), 'wikitext2-hub' (the Hugging Face dataset), or a path to a local .txt/.jsonl file or a "
        "directory of them under QUANTPIPE_DATA_DIRS.",
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
    shards: int = Field(
        default=1,
        ge=1,
        le=256,
        description="Calibration shards collected in parallel (threads, or Dask workers with --dask) and summed per "
        "block; in sequential quantize mode, threads of the quantize stage summed per linear group (or block). "
        "Execution only: the artifacts' keys are the same whatever the count (not keyed).",
    )
    first_token_weight: float = Field(
        default=1.0,
        gt=0,
        le=4096,
        description="Weight of each calibration window's first token in Σ x xᵀ. That token is the attention sink "
        "every later token reads, so its errors count more than one token's; 16 beat llama.cpp's Q2_K on SmolLM2 "
        "(benchmarks/RESULTS.md). Dense layers only (routed MoE expert inputs have no positions).",
    )

    def key_config(self) -> dict[str, Any]:
        exclude = {"micro_batch", "shards"} | ({"first_token_weight"} if self.first_token_weight == 1.0 else set())
        return self.model_dump(mode="json", exclude=exclude)


# method → its default transform kind
TRANSFORM_METHODS = {"quip": "kron", "hadamard-gptq": "hadamard", "hadamard-e8p": "hadamard"}


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


ICQUANT_METHODS = ("icquant-rtn", "icquant-gptq")


class OutlierConfig(BaseModel):
    """ICQuant outlier handling: top γ |w| per row on their own grid, positions index-coded (ALGORITHMS.md §6)."""

    model_config = _FROZEN

    gamma: float = Field(default=0.05, description="Outlier fraction per row, in (0, 0.5).")
    segment: int = Field(
        default=0,
        ge=0,
        description="Columns per index-stream tile (0 = whole rows); tiles decode independently.",
    )
    group_rows: int = Field(
        default=16,
        ge=1,
        description="Rows per index-stream tile: one int32 pair (outliers, escape bits) locates each tile, so a "
        "GPU block decodes R rows; 16 keeps the table ≤ 0.008 bit/weight on 576+ columns.",
    )
    index_bits: int | None = Field(
        default=None, description="Gap-code width B in 1..16 bits; empty = chosen per layer to minimise the bits."
    )

    @field_validator("gamma")
    @classmethod
    def _gamma(cls, v: float) -> float:
        if not (0.0 < v < 0.5):
            raise ValueError(f"gamma (outlier fraction) must be in (0, 0.5), got {v}")
        return v

    @field_validator("index_bits")
    @classmethod
    def _index_bits(cls, v: int | None) -> int | None:
        from quant.icquant import MAX_INDEX_BITS

        if v is not None and not 1 <= v <= MAX_INDEX_BITS:
            raise ValueError(f"index_bits {v} overflows the {MAX_INDEX_BITS}-bit index field (use 1..{MAX_INDEX_BITS})")
        return v


class GPTQTRecipeConfig(BaseModel):
    """GPTQT (ALGORITHMS.md §7): step-1 linear bits n, re-exploration of the step-1 scale, coding share.
    The binary bits k are ``quantize.bits``."""

    model_config = _FROZEN

    linear_bits: int = Field(default=4, ge=2, le=4, description="Step-1 linear (GPTQ) bits n, 2..4 (> bits).")
    multipliers: tuple[float, ...] = Field(
        default=tuple(round(0.8 + 0.05 * i, 3) for i in range(9)),
        description="Multipliers of the step-1 scale searched with the two-step error as criterion.",
    )
    share: Literal["layer", "grid"] = Field(
        default="layer", description="One binary coding per layer (paper) or per (row, group) grid."
    )

    @field_validator("multipliers")
    @classmethod
    def _multipliers(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v or not all(0 < c < 10 for c in v):
            raise ValueError(f"multipliers must be a non-empty list of values in (0, 10), got {list(v)}")
        return v


class E8PRecipeConfig(BaseModel):
    """QuIP#'s E8P codebook (``quant.e8p``): 8 weights per 16-bit codeword, one fp16 scale per output row."""

    model_config = _FROZEN

    scale: float = Field(
        default=1.0,
        gt=0,
        le=4.0,
        description="Row scale = RMS(row) / scale: the codebook's input standard deviation (1.03 minimises plain "
        "rounding error on Gaussian weights; with LDLQ feedback 1.0 measured best on SmolLM2).",
    )


class BitAllocRecipeConfig(BaseModel):
    """Mixed precision: bits per layer under an average-bits budget, sensitivities from the cached Hessians."""

    model_config = _FROZEN

    avg_bits: float = Field(default=3.0, description="Average code bits per weight over the quantized layers.")
    candidate_bits: tuple[int, ...] = Field(default=(2, 3, 4), description="Bit-widths a layer may get (2/3/4/8).")
    method: Literal["dp", "greedy"] = Field(default="dp", description="Exact knapsack DP, or greedy by Δloss/Δbits.")
    granularity: Literal["layer", "group"] = Field(
        default="layer",
        description="Allocation unit: one bit-width per linear layer, or per contiguous group of `group_size` input "
        "columns (methods rtn/gptq with static groups; each width is packed as its own low-bit matrix).",
    )
    sensitivity: Literal["relative", "absolute"] = Field(
        default="relative",
        description="Layer loss estimate: rounding noise relative to the layer's output energy tr(W H Wᵀ) "
        "(relative), or the raw Hessian-weighted noise (absolute, which favours late layers).",
    )

    @field_validator("candidate_bits")
    @classmethod
    def _candidates(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or len(set(v)) != len(v) or any(b not in (2, 3, 4, 8) for b in v):
            raise ValueError(f"candidate_bits must be distinct values of 2, 3, 4, 8 (packed formats), got {list(v)}")
        return tuple(sorted(v))

    @model_validator(mode="after")
    def _budget(self) -> BitAllocRecipeConfig:
        lo = self.candidate_bits[0]
        if not (lo <= self.avg_bits):
            raise ValueError(f"avg_bits budget {self.avg_bits} is below the smallest candidate bit-width {lo}")
        return self


# --- Per-method quantize configs -------------------------------------------------------------------------------
#
# ``quantize`` is a discriminated union keyed on ``method``: each method is one class holding exactly the fields
# its quantizer reads, so a field of another method is refused by name, the Prefect form shows only the chosen
# method's options, and a method's artifact key is its own ``model_dump()`` (``key_config``), never a hand-kept
# exclusion list. Adding a method: one ``quant/`` module, one class here decorated with ``@method_config``, one
# ``@register_method`` quantizer in ``tasks/quantize.py``, one recipe in ``recipes/``, tests.
#
# Key compatibility: stores hold artifacts keyed by the flat class this replaced. Fields that entered that class
# after stores existed were left out of its key at their old value; the same rule is declared here on the field
# (``KeyOmit``), so every shipped method's key bytes are unchanged. ``key_version`` > 1 adds ``method_version``.


class KeyOmit:
    """Field metadata: leave the field out of the artifact key when ``when(config)`` holds (its value then equals
    what keys written before the field existed meant), so older stores stay valid. Changing the field away from
    that value always changes the key."""

    def __init__(self, when: Callable[[Any], bool], why: str) -> None:
        self.when = when
        self.why = why


class NotKeyed:
    """Field metadata: a scheduling knob that never changes the weights (e.g. ``workers``)."""


def _omit_at(field: str, value: Any, why: str) -> KeyOmit:
    return KeyOmit(lambda cfg: getattr(cfg, field) == value, why)


_Bits = Annotated[int, Field(ge=1, le=8, description="Bits per weight code.")]
_GroupSize = Annotated[int, Field(ge=-1, description="Columns per grid; -1/0 = one grid per output channel.")]
_Sym = Annotated[bool, Field(description="Symmetric grid (zero point fixed at 2^(bits-1)).")]
_MseClip = Annotated[bool, Field(description="Search a clipped range minimising |err|^2.4.")]
_ScaleMode = Annotated[
    Literal["minmax", "rms"],
    Field(description="Grid range: minmax (max|w|), or rms: ±2.4·RMS(w) (needs sym; for rotations)."),
    _omit_at("scale_mode", "minmax", "added after stores existed; minmax was the only grid range"),
]
_Fp16Min = Annotated[
    bool,
    Field(
        description="W4 asymmetric grids whose minimum −scale·zero is also an fp16 number (scales keep fewer "
        "significand bits where needed), so llama.cpp's Q4_1 (fp16 d and m) holds them exactly."
    ),
    _omit_at("fp16_min", False, "added after stores existed; false is the plain fp16 scales"),
]
_Damp = Annotated[float, Field(gt=0, le=1.0, description="Hessian damping λ (fraction of mean diag H).")]
_BlockSize = Annotated[int, Field(ge=1, description="Lazy-batch block size of the error-feedback sweep.")]
_ActOrder = Annotated[bool, Field(description="Process columns by descending diag(H).")]
_StaticGroups = Annotated[bool, Field(description="Fit group grids before the sweep (no reordering).")]
_Transform = Annotated[
    TransformConfig, Field(default_factory=TransformConfig, description="Incoherence transforms (ALGORITHMS.md §4).")
]


_Bitalloc = Annotated[
    BitAllocRecipeConfig | None,
    Field(
        description="Mixed precision (ALGORITHMS.md §8): bits per layer under an average budget, from the cached "
        "Hessians; replaces `bits` (parallel mode). Empty: one bit-width."
    ),
    _omit_at("bitalloc", None, "keys of uniform-bit recipes carry no bitalloc"),
]


METHOD_CONFIGS: dict[str, type[QuantizeConfig]] = {}


def method_config(cls: type[_M]) -> type[_M]:
    """Register a method's config class under its ``method`` literal (the union's discriminator)."""
    (name,) = cls.model_fields["method"].annotation.__args__  # type: ignore[union-attr]
    METHOD_CONFIGS[name] = cls
    return cls


# Values the flat QuantizeConfig held for fields a method does not have; readers outside tasks/ written against
# that class (pack/export keys and metadata) still see them. Never keyed, never settable.
_ABSENT: dict[str, Any] = {
    "group_size": 128,
    "sym": False,
    "mse_clip": False,
    "scale_mode": "minmax",
    "fp16_min": False,
    "damp": 0.01,
    "block_size": 128,
    "act_order": True,
    "static_groups": True,
    "outliers": None,
    "bitalloc": None,
}


class QuantizeConfig(BaseModel):
    """Fields every method has. ``QuantizeConfig.model_validate(data)`` returns the method's own class."""

    model_config = _FROZEN

    method: str = Field(description="Per-layer quantization method.")
    bits: _Bits = 4
    mode: Literal["parallel", "sequential"] = Field(
        default="parallel",
        description="parallel: layers independent given fp Hessians; sequential: inputs propagated through "
        "already-quantized blocks (GPTQ-paper style, own keys).",
    )
    sequential_scope: Annotated[
        Literal["group", "block"],
        Field(
            description="Sequential mode: group — each linear group's Hessian comes from the outputs of the already "
            "quantized groups before it in the block (GPTQ's true-sequential; one calibration forward per block); "
            "block — all groups of a block see its fp weights (llm-compressor's pipeline; two forwards per block)."
        ),
        KeyOmit(
            lambda c: c.mode != "sequential" or c.sequential_scope == "block",
            "read in sequential mode only; block was the only order before the field existed",
        ),
    ] = "group"
    skip: tuple[str, ...] = Field(default=("lm_head",), description="Regexes of linears left in full precision.")
    workers: Annotated[int, Field(ge=1, le=64, description="Concurrent layer tasks (not keyed)."), NotKeyed()] = 2

    allowed_bits: ClassVar[tuple[int, ...]] = (2, 3, 4, 8)
    key_version: ClassVar[int] = 1  # bump when the method's output changes for the same fields

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        if cls is QuantizeConfig:  # the base: dispatch on ``method`` to the method's class
            return _QUANTIZE_ADAPTER.validate_python(_normalise_quantize(obj), **kwargs)
        return super().model_validate(obj, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # type: ignore[misc]
        except AttributeError:
            if name in _ABSENT:
                return _ABSENT[name]
            raise

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
    def _common(self) -> QuantizeConfig:
        if self.bits not in self.allowed_bits:
            if self.bits == 1:
                raise ValueError(f"bits must be one of 2, 3, 4, 8 for method {self.method} (1 only with gptqt), got 1")
            raise ValueError(self._bits_message())
        if getattr(self, "scale_mode", "minmax") == "rms" and not getattr(self, "sym", False):
            raise ValueError("scale_mode 'rms' needs a symmetric grid (sym: true)")
        ba = getattr(self, "bitalloc", None)
        if ba is not None:
            if self.mode != "parallel":
                raise ValueError("bitalloc needs mode 'parallel' (the allocation reads the cached fp Hessians)")
            if ba.granularity == "group":
                if self.effective_method() not in ("rtn", "gptq"):
                    raise ValueError(f"bitalloc granularity 'group' needs method rtn or gptq, not {self.method}")
                if self.group_size <= 0 or not self.static_groups:
                    raise ValueError("bitalloc granularity 'group' needs group_size > 0 and static_groups: true")
        return self

    def _bits_message(self) -> str:
        return f"bits must be one of 2, 3, 4, 8 (packed formats), got {self.bits}"

    # -- what readers ask -----------------------------------------------------------------------------------
    def has(self, field: str) -> bool:
        """Whether this method has ``field`` (other methods' fields read as the flat class's defaults)."""
        return field in type(self).model_fields

    def icquant_base(self) -> Literal["rtn", "gptq"] | None:
        """The ICQuant base quantizer when outliers are index-coded, else None."""
        return None

    def effective_method(self) -> str:
        return self.method

    def outlier_config(self) -> OutlierConfig:
        return getattr(self, "outliers", None) or OutlierConfig()

    def transform_kind(self) -> str | None:
        """The transform kind this method uses (None: no transforms)."""
        transform = type(self).model_fields.get("transform")
        if transform is None:
            return None
        return self.transform.kind or TRANSFORM_METHODS[self.method]  # type: ignore[attr-defined]

    def at_bits(self, bits: int) -> QuantizeConfig:
        """This scheme at a fixed bit-width (one layer of a mixed-precision allocation): shares keys with the
        uniform recipe at those bits, so layers already quantized there are reused."""
        update: dict[str, Any] = {"bits": bits}
        if "bitalloc" in type(self).model_fields:
            update["bitalloc"] = None
        return self.model_copy(update=update)

    def key_config(self) -> dict[str, Any]:
        """The artifact key: this method's fields (``model_dump``), less scheduling knobs (``NotKeyed``) and fields
        at the value older keys implied (``KeyOmit``), plus ``method_version`` once ``key_version`` > 1."""
        out = self.model_dump(mode="json")
        for name, info in type(self).model_fields.items():
            for meta in info.metadata:
                if isinstance(meta, NotKeyed) or (isinstance(meta, KeyOmit) and meta.when(self)):
                    out.pop(name, None)
        if getattr(self, "bitalloc", None) is not None:
            out.pop("bits")  # per layer, from the allocation
        if self.key_version > 1:
            out["method_version"] = self.key_version
        return out


_M = TypeVar("_M", bound=QuantizeConfig)


class _Fp16MinCheck(QuantizeConfig):
    @model_validator(mode="after")
    def _fp16_min(self) -> _Fp16MinCheck:
        if getattr(self, "fp16_min", False) and (self.bits != 4 or getattr(self, "sym", False)):
            raise ValueError(
                f"fp16_min is for W4 asymmetric rtn/gptq grids (llama.cpp Q4_1), not {self.effective_method()} "
                f"W{self.bits} {'sym' if getattr(self, 'sym', False) else 'asym'}"
            )
        return self


@method_config
class RTNQuantizeConfig(_Fp16MinCheck):
    """Round to nearest on per-group affine grids (no Hessian)."""

    method: Literal["rtn"] = Field(default="rtn", description="rtn: round to nearest on affine grids.")
    group_size: _GroupSize = 128
    sym: _Sym = False
    mse_clip: _MseClip = False
    scale_mode: _ScaleMode = "minmax"
    fp16_min: _Fp16Min = False
    bitalloc: _Bitalloc = None


@method_config
class GPTQQuantizeConfig(_Fp16MinCheck):
    """GPTQ (ALGORITHMS.md §2): Hessian error feedback, lazy batches, act-order with static groups."""

    method: Literal["gptq"] = Field(default="gptq", description="gptq: Hessian error-feedback rounding.")
    group_size: _GroupSize = 128
    sym: _Sym = False
    mse_clip: _MseClip = False
    scale_mode: _ScaleMode = "minmax"
    fp16_min: _Fp16Min = False
    damp: _Damp = 0.01
    block_size: _BlockSize = 128
    act_order: _ActOrder = True
    static_groups: _StaticGroups = True
    bitalloc: _Bitalloc = None


@method_config
class QuIPQuantizeConfig(QuantizeConfig):
    """QuIP: incoherence processing (kron by default) + LDLQ, columns in order (no lazy batches)."""

    method: Literal["quip"] = Field(default="quip", description="quip: incoherence + LDLQ.")
    group_size: _GroupSize = 128
    sym: _Sym = False
    mse_clip: _MseClip = False
    scale_mode: _ScaleMode = "minmax"
    damp: _Damp = 0.01
    static_groups: _StaticGroups = True
    transform: _Transform


@method_config
class HadamardGPTQQuantizeConfig(QuantizeConfig):
    """Randomized Hadamard incoherence (QuIP#-style) + GPTQ."""

    method: Literal["hadamard-gptq"] = Field(
        default="hadamard-gptq", description="hadamard-gptq: randomized Hadamard + GPTQ."
    )
    group_size: _GroupSize = 128
    sym: _Sym = False
    mse_clip: _MseClip = False
    scale_mode: _ScaleMode = "minmax"
    damp: _Damp = 0.01
    block_size: _BlockSize = 128
    act_order: _ActOrder = True
    static_groups: _StaticGroups = True
    transform: _Transform


@method_config
class HadamardE8PQuantizeConfig(QuantizeConfig):
    """Randomized Hadamard + block LDLQ on QuIP#'s E8P lattice codebook: one fp16 scale per row, no group grids."""

    method: Literal["hadamard-e8p"] = Field(
        default="hadamard-e8p",
        description="hadamard-e8p: randomized Hadamard + block LDLQ on QuIP#'s E8P lattice, 2 bits "
        "(3: plus an E8 residual codeword).",
    )
    bits: _Bits = 2
    damp: _Damp = 0.01
    block_size: _BlockSize = 128
    transform: _Transform
    e8p: E8PRecipeConfig = Field(default_factory=E8PRecipeConfig, description="E8P lattice settings.")

    allowed_bits: ClassVar[tuple[int, ...]] = (2, 3)

    def _bits_message(self) -> str:
        return (
            f"hadamard-e8p codes 8 weights in 16 bits (bits: 2) or 16 + 8 bits with the residual codebook "
            f"(bits: 3), not bits: {self.bits}"
        )


class _ICQuant(QuantizeConfig):
    """ICQuant (ALGORITHMS.md §6): top γ |w| per row on their own grid, positions index-coded; grids are static
    and fitted by min/max."""

    group_size: _GroupSize = 128
    sym: _Sym = False
    mse_clip: _MseClip = False
    outliers: OutlierConfig = Field(default_factory=OutlierConfig, description="Index-coded outliers.")
    bitalloc: _Bitalloc = None

    def icquant_base(self) -> Literal["rtn", "gptq"] | None:
        return "rtn" if self.method == "icquant-rtn" else "gptq"

    def key_config(self) -> dict[str, Any]:
        """Plus the index-stream format version: a new stream layout must not reuse stored layers."""
        from quant.icquant import STREAM_VERSION

        out = super().key_config()
        out["outliers"] = {**out["outliers"], "stream_version": STREAM_VERSION}
        return out


@method_config
class ICQuantRTNQuantizeConfig(_ICQuant):
    method: Literal["icquant-rtn"] = Field(
        default="icquant-rtn", description="icquant-rtn: index-coded outliers on two grids, RTN base."
    )


@method_config
class ICQuantGPTQQuantizeConfig(_ICQuant):
    method: Literal["icquant-gptq"] = Field(
        default="icquant-gptq", description="icquant-gptq: index-coded outliers on two grids, GPTQ base."
    )
    damp: _Damp = 0.01
    block_size: _BlockSize = 128
    act_order: _ActOrder = True


@method_config
class GPTQTQuantizeConfig(QuantizeConfig):
    """GPTQT (ALGORITHMS.md §7): linear n-bit GPTQ, then k-bit binary coding (k = ``bits``)."""

    method: Literal["gptqt"] = Field(
        default="gptqt", description="gptqt: linear n-bit GPTQ then k-bit binary coding, k = bits."
    )
    bits: Annotated[int, Field(ge=1, le=8, description="Binary coding bits k, 1..3 (below gptqt.linear_bits).")] = 2
    group_size: _GroupSize = 128
    sym: _Sym = False
    mse_clip: _MseClip = False
    scale_mode: _ScaleMode = "minmax"
    damp: _Damp = 0.01
    block_size: _BlockSize = 128
    act_order: _ActOrder = True
    gptqt: GPTQTRecipeConfig = Field(default_factory=GPTQTRecipeConfig, description="GPTQT settings.")

    allowed_bits: ClassVar[tuple[int, ...]] = (1, 2, 3)

    def _bits_message(self) -> str:
        return self._gptqt_message()

    def _gptqt_message(self) -> str:
        n = self.gptqt.linear_bits
        return f"gptqt needs bits (binary k) in 1..3, below gptqt.linear_bits={n}; got {self.bits}"

    @model_validator(mode="after")
    def _below_linear(self) -> GPTQTQuantizeConfig:
        if self.bits >= self.gptqt.linear_bits:
            raise ValueError(self._gptqt_message())
        return self


QuantizeMethodConfig = Annotated[
    RTNQuantizeConfig
    | GPTQQuantizeConfig
    | QuIPQuantizeConfig
    | HadamardGPTQQuantizeConfig
    | HadamardE8PQuantizeConfig
    | ICQuantRTNQuantizeConfig
    | ICQuantGPTQQuantizeConfig
    | GPTQTQuantizeConfig,
    Field(discriminator="method"),
]
_QUANTIZE_ADAPTER: TypeAdapter[QuantizeConfig] = TypeAdapter(QuantizeMethodConfig)
assert {c.__name__ for c in METHOD_CONFIGS.values()} == {
    c.__name__
    for c in QuantizeMethodConfig.__origin__.__args__  # type: ignore[attr-defined]
}, "every @method_config class belongs to QuantizeMethodConfig"
METHODS_ALL = tuple(METHOD_CONFIGS)


def _normalise_quantize(data: Any) -> Any:
    """A ``quantize`` mapping as the union reads it: ``method`` defaults to gptq, and rtn/gptq with an
    ``outliers`` block are icquant-rtn/icquant-gptq (README)."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    data.setdefault("method", "gptq")
    if data["method"] in ("rtn", "gptq") and data.get("outliers") is not None:
        data["method"] = f"icquant-{data['method']}"
        for name, implied in _ICQUANT_IMPLIED.items():
            if data.get(name, implied) == implied:
                data.pop(name, None)
    return data


# what ICQuant's grids always are (static, min/max, plain fp16 scales): given at these values with rtn/gptq +
# outliers they are dropped; any other value is refused by the icquant class
_ICQUANT_IMPLIED: dict[str, Any] = {"static_groups": True, "scale_mode": "minmax", "fp16_min": False}


def field_owners(field: str) -> list[str]:
    """Methods whose config has ``field`` (for the one-line refusal of another method's field)."""
    return [m for m, cls in METHOD_CONFIGS.items() if field in cls.model_fields]


class PackConfig(BaseModel):
    model_config = _FROZEN

    compressed_tensors: bool = Field(
        default=True, description="Also export compressed-tensors (pack-quantized) when the scheme is representable."
    )
    gptq: bool = Field(
        default=True,
        description="Also export a GPTQ checkpoint (quant_method gptq: qweight/qzeros/scales/g_idx) when it fits.",
    )
    gguf: bool = Field(
        default=True,
        description="Also export a GGUF file for llama.cpp when every layer's grid is a llama.cpp type "
        "(W4 g32 asym: Q4_1, W4 g32 sym: Q4_0, W8 g32 sym: Q8_0).",
    )


class EvalConfig(BaseModel):
    model_config = _FROZEN

    dataset: Literal["wikitext2", "wikitext2-hub"] = Field(
        default="wikitext2",
        description="Perplexity text: wiki.test.raw (QUANTPIPE_WIKITEXT_DIR, else the copy shipped with quantpipe), "
        "or 'wikitext2-hub' for the Hugging Face dataset.",
    )
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


ROTATION_WEIGHT_METHODS = ("rtn", "gptq")  # weight quantizers QuaRot runs on the rotated model


class RotationConfig(BaseModel):
    """Whole-model rotation before quantization (QuaRot, ALGORITHMS.md §5).

    ``quarot`` folds the RMSNorms, untie the embedding, rotates the residual stream (R1), V/O and down_proj into a
    derived fp checkpoint (a ``rotated-model`` artifact) with online Hadamards before o_proj/down_proj. Its
    activations differ from the original's, so Hessians are collected on it: the hessians/quantize/pack keys take
    the rotated model's key as input and differ from the unrotated recipe's. Sample YAML::

        rotation: {kind: quarot, seed: 0, fallback: random_orthogonal}
    """

    model_config = _FROZEN

    kind: Literal["none", "quarot"] = Field(
        default="none", description="none, or quarot (RMSNorm folding + randomized Hadamard rotations)."
    )
    seed: int = Field(default=0, description="Seed of R1 and the online transforms (hash of seed and role).")
    fallback: Literal["error", "random_orthogonal"] = Field(
        default="random_orthogonal",
        description="Sizes with no Hadamard matrix (e.g. 9 heads): a seeded random orthogonal factor, or refuse.",
    )

    @property
    def enabled(self) -> bool:
        return self.kind != "none"


class ActivationQuantConfig(BaseModel):
    """Per-token symmetric fake quantization of every block linear's input (lm_head stays 16-bit), applied at
    evaluation by the packed model (``kernels.actquant.ref``). Sample YAML: ``activations: {bits: 4, clip_ratio: 0.9}``.
    """

    model_config = _FROZEN

    bits: int = Field(default=16, description="Activation bits, 2..8; 16 = not quantized.")
    clip_ratio: float = Field(default=1.0, gt=0, le=1.0, description="Scale = clip_ratio·max|x| / (2^(b-1)-1).")
    group_size: int = Field(
        default=0,
        ge=0,
        description="0: one scale per token; g > 0: per token and group of g channels (QuaRot's a_groupsize; "
        "must divide every linear's input width). Fake-quantized on every device (no int GEMM kernel for groups).",
    )

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if v != 16 and not 2 <= v <= 8:
            raise ValueError(f"activation bits must be in 2..8 or 16 (off), got {v}")
        return v

    @property
    def enabled(self) -> bool:
        return self.bits < 16


class KVCacheQuantConfig(BaseModel):
    """KV-cache fake quantization (K after RoPE and, when rotated, the q/k Hadamard; V at v_proj's output), per
    token and head in groups of ``group_size`` along the head dim. Sample YAML::

        kv_cache: {bits: 4, group_size: 64, sym: false, clip_ratio: 0.95}
    """

    model_config = _FROZEN

    bits: int = Field(default=16, description="KV bits, 2..8; 16 = not quantized.")
    group_size: int = Field(default=0, ge=0, description="Entries per grid along the head dim; 0 = the head dim.")
    sym: bool = Field(default=False, description="Symmetric grid (QuaRot uses asymmetric for the KV cache).")
    clip_ratio: float = Field(default=1.0, gt=0, le=1.0, description="Range shrink factor of each group.")

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if v != 16 and not 2 <= v <= 8:
            raise ValueError(f"kv_cache bits must be in 2..8 or 16 (off), got {v}")
        return v

    @property
    def enabled(self) -> bool:
        return self.bits < 16


class Recipe(BaseModel):
    model_config = _FROZEN

    name: str = Field(
        default="custom",
        description="Recipe name; the registered model is MODEL.NAME (e.g. smollm2-135m.gptq-w4g64).",
    )
    description: str = Field(default="", description="Free text.")
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    hessians: HessianConfig = Field(default_factory=HessianConfig)
    quantize: QuantizeMethodConfig = Field(
        default_factory=GPTQQuantizeConfig,
        description="Per-layer quantization: the method's own options (pick `method` first).",
    )
    pack: PackConfig = Field(default_factory=PackConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    registry: RegisterConfig = Field(default_factory=RegisterConfig)
    rotation: RotationConfig = Field(default_factory=RotationConfig, description="QuaRot model rotation.")
    activations: ActivationQuantConfig = Field(
        default_factory=ActivationQuantConfig, description="Activation fake quantization at evaluation (A4)."
    )
    kv_cache: KVCacheQuantConfig = Field(
        default_factory=KVCacheQuantConfig, description="KV-cache fake quantization at evaluation (KV4)."
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", v) or ".." in v:
            raise ValueError(f"recipe name {v!r} must match [A-Za-z0-9][A-Za-z0-9._-]* (no '..')")
        return v

    @field_validator("quantize", mode="before")
    @classmethod
    def _quantize_method(cls, v: Any) -> Any:
        return _normalise_quantize(v)

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        q = self.quantize
        if self.rotation.enabled:
            if q.method not in ROTATION_WEIGHT_METHODS or q.icquant_base() is not None or q.bitalloc is not None:
                raise ValueError(
                    f"rotation.kind {self.rotation.kind} rotates the whole model; combine it with quantize.method "
                    f"rtn or gptq, not {q.effective_method()}{' + bitalloc' if q.bitalloc is not None else ''}"
                )
            if q.mode != "parallel":
                raise ValueError("rotation.kind quarot needs quantize.mode parallel (Hessians of the rotated model)")
        return self

    def runtime_config(self) -> dict[str, Any] | None:
        """What the packed model applies online besides its weights (A/KV fake quantization); None if nothing."""
        out: dict[str, Any] = {}
        if self.activations.enabled:  # group_size 0 left out: keys of per-token recipes unchanged
            out["activations"] = self.activations.model_dump(
                mode="json", exclude=set() if self.activations.group_size else {"group_size"}
            )
        if self.kv_cache.enabled:
            out["kv_cache"] = self.kv_cache.model_dump(mode="json")
        return out or None

    def digest(self) -> str:
        import hashlib

        from infra.keys import canonical_json

        data = self.model_dump(mode="json")
        data["quantize"] = _flat_quantize_dump(self.quantize)
        for section in ("rotation", "activations", "kv_cache"):  # defaults: digests of older recipes unchanged
            if getattr(self, section) == type(getattr(self, section))():
                data.pop(section)
        if not data["quantize"]["fp16_min"]:  # added later, at its default: digests of older recipes unchanged
            data["quantize"].pop("fp16_min")
        for fmt in ("gptq", "gguf"):
            if getattr(self.pack, fmt):
                data["pack"].pop(fmt)
        if not self.activations.group_size and "activations" in data:
            data["activations"].pop("group_size")
        return hashlib.sha256(canonical_json(data).encode()).hexdigest()[:16]

    def with_overrides(self, overrides: list[str]) -> Recipe:
        """Apply ``--set section.field=value`` overrides (values parsed as YAML scalars).

        Any field can be set, including sections a recipe leaves out (``quantize.outliers.gamma=0.1``). Setting
        ``quantize.method`` keeps the recipe's quantize fields the new method has and drops the others; a field
        the chosen method does not have, set explicitly, is refused naming the method and the field."""
        data = self.model_dump(mode="json")
        touched: set[str] = set()
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} must look like section.field=value")
            path, raw = item.split("=", 1)
            value = yaml.safe_load(raw) if raw else ""
            node = data
            parts = path.strip().split(".")
            for depth, part in enumerate(parts[:-1]):
                if node.get(part) is None and (part in node or _is_section(parts[: depth + 1])):
                    node[part] = {}  # an optional section left out (outliers, bitalloc, gptqt): open it
                if not isinstance(node.get(part), dict):
                    raise ConfigError(f"override {item!r}: unknown section {part!r}")
                node = node[part]
            node[parts[-1]] = value
            if parts[0] == "quantize" and len(parts) > 1:
                touched.add(parts[1])
        method = data["quantize"].get("method")
        if method != self.quantize.method and method in METHOD_CONFIGS:
            own = METHOD_CONFIGS[method].model_fields
            data["quantize"] = {k: v for k, v in data["quantize"].items() if k in own or k in touched}
        return parse_recipe(data, source="--set overrides")


def _is_section(path: list[str]) -> bool:
    """``quantize.<name>`` where some method has a nested-section field ``name`` (outliers, bitalloc, …)."""
    if len(path) != 2 or path[0] != "quantize":
        return False
    for cls in METHOD_CONFIGS.values():
        info = cls.model_fields.get(path[1])
        if info is not None:
            ann = info.annotation
            args = getattr(ann, "__args__", (ann,))
            if any(isinstance(a, type) and issubclass(a, BaseModel) for a in args):
                return True
    return False


def _format_validation(exc: ValidationError, source: str) -> str:
    first = exc.errors()[0]
    parts = [str(p) for p in first["loc"]]
    msg = first["msg"].removeprefix("Value error, ")
    if parts[:1] == ["quantize"] and len(parts) > 1 and parts[1] in METHOD_CONFIGS:
        method = parts.pop(1)  # the union's tag: quantize.<field>, as the recipe spells it
        if first["type"] == "extra_forbidden" and len(parts) == 2:
            owners = field_owners(parts[1])
            if owners:
                msg = f"method {method} has no field {parts[1]!r} ({parts[1]} belongs to {', '.join(owners)})"
            else:
                msg = f"{msg} (no method has a field {parts[1]!r})"
    elif parts == ["quantize"] and first["type"] in ("union_tag_invalid", "union_tag_not_found"):
        parts.append("method")
        got = first.get("ctx", {}).get("tag", "")
        msg = f"unknown method {got!r}; one of {', '.join(METHOD_CONFIGS)}"
    loc = ".".join(parts) or "(root)"
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"invalid recipe {source}: {loc}: {msg}{more}"


def parse_recipe(data: Any, *, source: str) -> Recipe:
    if not isinstance(data, dict):
        raise ConfigError(f"invalid recipe {source}: expected a mapping at the top level")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation(exc, source)) from None


# The flat QuantizeConfig's fields, in which recipe digests (registry names and tags, nightly lookups) were
# computed before the per-method classes: a method's config is dumped in that shape (fields it does not have at
# the flat class's defaults) so every recipe keeps its digest. Fields added since join as they are.
_FLAT_QUANTIZE_FIELDS = (
    "method", "bits", "group_size", "sym", "mse_clip", "scale_mode", "fp16_min", "transform", "damp", "block_size",
    "act_order", "static_groups", "mode", "sequential_scope", "skip", "outliers", "gptqt", "e8p", "bitalloc",
    "workers",
)  # fmt: skip


def _flat_quantize_dump(q: QuantizeConfig) -> dict[str, Any]:
    data = q.model_dump(mode="json")
    sections = {"transform": TransformConfig, "gptqt": GPTQTRecipeConfig, "e8p": E8PRecipeConfig}
    flat: dict[str, Any] = {}
    for name in _FLAT_QUANTIZE_FIELDS:
        if name in data:
            flat[name] = data[name]
        elif name in sections:
            flat[name] = sections[name]().model_dump(mode="json")
        else:
            flat[name] = _ABSENT[name]
    flat.update({k: v for k, v in data.items() if k not in flat})
    return flat


SHIPPED_RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def shipped_recipe_names() -> list[str]:
    """The recipes shipped in ``recipes/`` by name (the Prefect form's recipe picker)."""
    return sorted(p.stem for p in SHIPPED_RECIPES.glob("*.yaml"))


RecipeName = Literal[tuple(shipped_recipe_names())]  # type: ignore[valid-type]


def resolve_recipe(recipe: str | Recipe, overrides: Sequence[str] = (), name: str = "") -> Recipe:
    """The effective recipe of a run: a shipped name (or YAML path) or a full recipe, then ``--set``-style
    overrides, then the user's registered name (empty: the recipe's, which ``tasks.register.recipe_identity``
    suffixes with the digest when the overrides changed it)."""
    out = load_recipe(recipe) if isinstance(recipe, str) else recipe
    if overrides:
        out = out.with_overrides(list(overrides))
    if name:
        out = parse_recipe({**out.model_dump(mode="json"), "name": name}, source="(name)")
    return out


def load_recipe(path_or_name: str | Path) -> Recipe:
    """A recipe from a YAML path, or a shipped recipe name (``gptq-w4g64`` → ``recipes/gptq-w4g64.yaml``)."""
    path = Path(path_or_name)
    if not path.is_file():
        shipped = SHIPPED_RECIPES / f"{path_or_name}.yaml"
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
