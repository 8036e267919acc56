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
        "block; execution only: the artifacts' keys are the same whatever the count (not keyed).",
    )

    def key_config(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"micro_batch", "shards"})


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


class QuantizeConfig(BaseModel):
    model_config = _FROZEN

    method: Literal["rtn", "gptq", "quip", "hadamard-gptq", "hadamard-e8p", "icquant-rtn", "icquant-gptq", "gptqt"] = (
        Field(
            default="gptq",
            description="Per-layer quantization method (quip: incoherence + LDLQ; hadamard-gptq: randomized Hadamard "
            "+ GPTQ; hadamard-e8p: randomized Hadamard + block LDLQ on QuIP#'s E8P lattice codebook, 2 bits "
            "(3: plus an E8 residual codeword); "
            "icquant-rtn/icquant-gptq: index-coded outliers on two grids; gptqt: linear n-bit GPTQ then "
            "k-bit binary coding, k = bits).",
        )
    )
    bits: int = Field(default=4, ge=1, le=8, description="Bits per weight code.")
    group_size: int = Field(default=128, ge=-1, description="Columns per grid; -1/0 = one grid per output channel.")
    sym: bool = Field(default=False, description="Symmetric grid (zero point fixed at 2^(bits-1)).")
    mse_clip: bool = Field(default=False, description="Search a clipped range minimising |err|^2.4.")
    scale_mode: Literal["minmax", "rms"] = Field(
        default="minmax", description="Grid range: minmax (max|w|), or rms: ±2.4·RMS(w) (needs sym; for rotations)."
    )
    fp16_min: bool = Field(
        default=False,
        description="W4 asymmetric grids whose minimum −scale·zero is also an fp16 number (scales keep fewer "
        "significand bits where needed), so llama.cpp's Q4_1 (fp16 d and m) holds them exactly (rtn/gptq).",
    )
    transform: TransformConfig = Field(
        default_factory=TransformConfig, description="Incoherence transforms (quip, hadamard-gptq, hadamard-e8p only)."
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
    sequential_scope: Literal["group", "block"] = Field(
        default="group",
        description="Sequential mode: group — each linear group's Hessian comes from the outputs of the already "
        "quantized groups before it in the block (GPTQ's true-sequential; one calibration forward per block); "
        "block — all groups of a block see its fp weights (llm-compressor's pipeline; two forwards per block).",
    )
    skip: tuple[str, ...] = Field(default=("lm_head",), description="Regexes of linears left in full precision.")
    outliers: OutlierConfig | None = Field(
        default=None,
        description="ICQuant outliers (ALGORITHMS.md §6). Implied with defaults by icquant-rtn/icquant-gptq; "
        "given with method rtn/gptq it turns them into icquant-rtn/icquant-gptq.",
    )
    gptqt: GPTQTRecipeConfig = Field(
        default_factory=lambda: GPTQTRecipeConfig(), description="GPTQT settings (method gptqt only)."
    )
    e8p: E8PRecipeConfig = Field(
        default_factory=lambda: E8PRecipeConfig(), description="E8P lattice settings (method hadamard-e8p only)."
    )
    bitalloc: BitAllocRecipeConfig | None = Field(
        default=None,
        description="Mixed precision (ALGORITHMS.md §8): bits per layer under an average budget, from the cached "
        "Hessians; replaces `bits` (methods rtn, gptq, icquant-*; parallel mode).",
    )
    workers: int = Field(default=2, ge=1, le=64, description="Concurrent layer tasks (not keyed).")

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if v not in (1, 2, 3, 4, 8):  # 1 only for gptqt's binary coding (checked with the method below)
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

    @model_validator(mode="after")
    def _method_options(self) -> QuantizeConfig:
        if self.fp16_min and (self.effective_method() not in ("rtn", "gptq") or self.bits != 4 or self.sym):
            raise ValueError(
                "fp16_min is for W4 asymmetric rtn/gptq grids (llama.cpp Q4_1), not "
                f"{self.effective_method()} W{self.bits} {'sym' if self.sym else 'asym'}"
            )
        if self.outliers is not None and self.method not in ("rtn", "gptq", *ICQUANT_METHODS):
            raise ValueError(f"outliers (ICQuant) combine with rtn/gptq/icquant-*, not with method {self.method}")
        if self.icquant_base() is not None and self.scale_mode != "minmax":
            raise ValueError("ICQuant fits its two grids by min/max (scale_mode: minmax)")
        if self.method == "hadamard-e8p" and self.bits not in (2, 3):
            raise ValueError(
                f"hadamard-e8p codes 8 weights in 16 bits (bits: 2) or 16 + 8 bits with the residual codebook "
                f"(bits: 3), not bits: {self.bits}"
            )
        if self.bits == 1 and self.method != "gptqt":
            raise ValueError(f"bits must be one of 2, 3, 4, 8 for method {self.method} (1 only with gptqt), got 1")
        if self.method == "gptqt":
            n = self.gptqt.linear_bits
            if not (1 <= self.bits <= 3 and self.bits < n):
                raise ValueError(f"gptqt needs bits (binary k) in 1..3, below gptqt.linear_bits={n}; got {self.bits}")
        if self.bitalloc is not None:
            if self.icquant_base() is None and self.method not in ("rtn", "gptq"):
                raise ValueError(f"bitalloc combines with rtn, gptq and icquant-*, not with method {self.method}")
            if self.mode != "parallel":
                raise ValueError("bitalloc needs mode 'parallel' (the allocation reads the cached fp Hessians)")
            if self.bitalloc.granularity == "group":
                if self.effective_method() not in ("rtn", "gptq"):
                    raise ValueError(f"bitalloc granularity 'group' needs method rtn or gptq, not {self.method}")
                if self.group_size <= 0 or not self.static_groups:
                    raise ValueError("bitalloc granularity 'group' needs group_size > 0 and static_groups: true")
        return self

    def icquant_base(self) -> Literal["rtn", "gptq"] | None:
        """The ICQuant base quantizer when outliers are index-coded, else None."""
        if self.method in ICQUANT_METHODS:
            return "rtn" if self.method == "icquant-rtn" else "gptq"
        if self.outliers is not None and self.method in ("rtn", "gptq"):
            return "rtn" if self.method == "rtn" else "gptq"
        return None

    def effective_method(self) -> str:
        """The method that runs: rtn/gptq with an ``outliers`` block are icquant-rtn/icquant-gptq."""
        base = self.icquant_base()
        return f"icquant-{base}" if base is not None else self.method

    def outlier_config(self) -> OutlierConfig:
        return self.outliers or OutlierConfig()

    def at_bits(self, bits: int) -> QuantizeConfig:
        """This scheme at a fixed bit-width (one layer of a mixed-precision allocation): shares keys with the
        uniform recipe at those bits, so layers already quantized there are reused."""
        return self.model_copy(update={"bits": bits, "bitalloc": None})

    def transform_kind(self) -> str | None:
        """The transform kind this method uses (None: no transforms)."""
        if self.method not in TRANSFORM_METHODS:
            return None
        return self.transform.kind or TRANSFORM_METHODS[self.method]

    def key_config(self) -> dict[str, Any]:
        """What changes the quantized weights: everything but scheduling knobs and other methods' fields."""
        exclude = {"workers"}
        if self.mode != "sequential" or self.sequential_scope == "block":  # block: keys of earlier sequential builds
            exclude.add("sequential_scope")
        if self.method == "rtn":
            exclude |= {"damp", "block_size", "act_order", "static_groups"}
        if self.method == "quip":  # LDLQ: columns in order, no lazy batches
            exclude |= {"block_size", "act_order"}
        if self.method == "hadamard-e8p":  # one lattice, one scale per row, columns in order
            exclude |= {"group_size", "sym", "mse_clip", "scale_mode", "act_order", "static_groups"}
        if self.method not in TRANSFORM_METHODS:
            exclude.add("transform")
        if self.scale_mode == "minmax":  # default: keeps the keys of recipes written before scale_mode existed
            exclude.add("scale_mode")
        if not self.fp16_min:  # default: keeps the keys of recipes written before fp16_min existed
            exclude.add("fp16_min")
        exclude |= {"outliers", "gptqt", "bitalloc", "e8p"}  # added below only where they change the weights
        out = self.model_dump(mode="json", exclude=exclude)
        base = self.icquant_base()
        if base is not None:  # method gptq + outliers ≡ icquant-gptq: one key
            out["method"] = f"icquant-{base}"
            from quant.icquant import STREAM_VERSION

            out["outliers"] = {**self.outlier_config().model_dump(mode="json"), "stream_version": STREAM_VERSION}
            if base == "rtn":
                for k in ("damp", "block_size", "act_order", "static_groups"):
                    out.pop(k, None)
            out.pop("static_groups", None)  # ICQuant grids are always static
        if self.method == "hadamard-e8p":
            out["e8p"] = self.e8p.model_dump(mode="json")
        if self.method == "gptqt":
            out["gptqt"] = self.gptqt.model_dump(mode="json")
            out.pop("static_groups", None)
        if self.bitalloc is not None:
            out["bitalloc"] = self.bitalloc.model_dump(mode="json")
            out.pop("bits")  # per layer, from the allocation
        return out


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

    name: str = Field(default="custom", description="Recipe name; the registered model is '<model>.<name>'.")
    description: str = Field(default="", description="Free text.")
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    hessians: HessianConfig = Field(default_factory=HessianConfig)
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig)
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
        for section in ("rotation", "activations", "kv_cache"):  # defaults: digests of older recipes unchanged
            if getattr(self, section) == type(getattr(self, section))():
                data.pop(section)
        if not self.quantize.fp16_min:  # fields added later, at their defaults: digests of older recipes unchanged
            data["quantize"].pop("fp16_min")
        for fmt in ("gptq", "gguf"):
            if getattr(self.pack, fmt):
                data["pack"].pop(fmt)
        if not self.activations.group_size and "activations" in data:
            data["activations"].pop("group_size")
        return hashlib.sha256(canonical_json(data).encode()).hexdigest()[:16]

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
                if part in node and node[part] is None:  # an optional section left out (outliers, bitalloc): open it
                    node[part] = {}
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


SHIPPED_RECIPES = Path(__file__).resolve().parents[1] / "recipes"


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
