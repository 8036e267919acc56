"""Per-method quantize configs: every field a method's quantizer reads is part of its artifact key, and a field
of another method cannot be set.

The reads are recorded, not listed: each method's registered quantizer runs on a small layer with a config whose
attribute reads are logged, so a field added to a method and read by its quantizer but left out of the key (a
``NotKeyed`` mark, a ``KeyOmit`` that holds at the wrong value) fails here.
"""

from __future__ import annotations

from typing import Any, Literal, get_args, get_origin

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from infra.errors import ConfigError
from tasks.recipe import (
    METHOD_CONFIGS,
    BitAllocRecipeConfig,
    E8PRecipeConfig,
    GPTQTRecipeConfig,
    OutlierConfig,
    QuantizeConfig,
    TransformConfig,
    parse_recipe,
)
from tests.quant.reference import random_spd, random_weight

# candidate values per field name (types alone do not bound ints/floats); Literal and bool fields use all values
_VALUES: dict[str, list[Any]] = {
    "bits": [1, 2, 3, 4, 8],
    "group_size": [-1, 16, 32],
    "damp": [0.01, 0.1],
    "block_size": [8, 128],
    "skip": [("lm_head",), ()],
    "workers": [1, 3],
    "transform": [
        TransformConfig(),
        TransformConfig(kind="kron"),
        TransformConfig(kind="hadamard", seed=1),
        TransformConfig(rescale=True),
        TransformConfig(fallback="error"),
    ],
    "e8p": [E8PRecipeConfig(), E8PRecipeConfig(scale=1.03)],
    "gptqt": [
        GPTQTRecipeConfig(),
        GPTQTRecipeConfig(linear_bits=3),
        GPTQTRecipeConfig(multipliers=(1.0,)),
        GPTQTRecipeConfig(share="grid"),
    ],
    "outliers": [
        OutlierConfig(),
        OutlierConfig(gamma=0.1),
        OutlierConfig(segment=32),
        OutlierConfig(group_rows=4),
        OutlierConfig(index_bits=3),
    ],
    "bitalloc": [None, BitAllocRecipeConfig(avg_bits=3.0), BitAllocRecipeConfig(avg_bits=2.5, method="greedy")],
}


def _candidates(cls: type[QuantizeConfig], name: str) -> list[Any]:
    if name in _VALUES:
        return _VALUES[name]
    ann = cls.model_fields[name].annotation
    if ann is bool:
        return [False, True]
    if get_origin(ann) is Literal:
        return list(get_args(ann))
    raise AssertionError(f"{cls.__name__}.{name}: add candidate values to _VALUES")


def _config(cls: type[QuantizeConfig], values: dict[str, Any]) -> QuantizeConfig | None:
    try:
        return cls.model_validate(values)
    except ValueError:
        return None


@st.composite
def _configs(draw: st.DrawFn, cls: type[QuantizeConfig]) -> QuantizeConfig:
    values = {name: draw(st.sampled_from(_candidates(cls, name))) for name in cls.model_fields if name != "method"}
    cfg = _config(cls, values)
    assume(cfg is not None)
    assert cfg is not None
    return cfg


_RECORDERS: dict[type, type] = {}
_READS: set[str] = set()


def _recording(cfg: QuantizeConfig) -> QuantizeConfig:
    """The same config as an instance whose field reads land in ``_READS`` (including reads inside its methods)."""
    cls = type(cfg)
    if cls not in _RECORDERS:
        fields = set(cls.model_fields)

        def __getattribute__(self: Any, name: str) -> Any:  # noqa: N807
            if name in fields:
                _READS.add(name)
            return super(rec, self).__getattribute__(name)

        rec = type(f"Recording{cls.__name__}", (cls,), {"__getattribute__": __getattribute__})
        _RECORDERS[cls] = rec
    return _RECORDERS[cls].model_validate(cfg.model_dump())  # type: ignore[no-any-return]


_W = random_weight(16, 64, 0)
_H = random_spd(64, 1) * 100


def _reads(cfg: QuantizeConfig) -> set[str]:
    """Fields the method's quantizer (``tasks.quantize.METHODS``) reads to quantize one layer with ``cfg``."""
    from tasks.quantize import METHODS

    layer = cfg.at_bits(cfg.bits)  # a layer of a mixed allocation runs at its own bits: the uniform config
    rec = _recording(layer)
    _READS.clear()
    with torch.no_grad():
        METHODS[layer.effective_method()](_W.clone(), _H.clone(), rec, "model.layers.0.mlp.up_proj")
    return set(_READS)


@pytest.mark.parametrize("method", sorted(METHOD_CONFIGS))
def test_every_field_the_quantizer_reads_is_keyed(method: str) -> None:
    cls = METHOD_CONFIGS[method]

    @settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
    @given(_configs(cls))
    def check(cfg: QuantizeConfig) -> None:
        reads = _reads(cfg)
        assert "bits" in reads  # the recorder sees the quantizer's reads
        layer = cfg.at_bits(cfg.bits)
        key = layer.key_config()
        for name in sorted(reads - {"method"}):
            for value in _candidates(cls, name):
                if value == getattr(layer, name):
                    continue
                other = _config(cls, {**layer.model_dump(), name: value})
                if other is None:  # not a valid combination with the other fields
                    continue
                assert other.key_config() != key, f"{method}: {name}={value!r} is read but leaves the key unchanged"

    check()


@pytest.mark.parametrize("method", sorted(METHOD_CONFIGS))
def test_stage_level_fields_are_keyed(method: str) -> None:
    """Fields the quantize stage reads around the layer quantizer: mode, sequential_scope (sequential), skip and
    bitalloc (which layers, which bits, which Hessians)."""
    cls = METHOD_CONFIGS[method]
    base = cls.model_validate({})
    seq = cls.model_validate({"mode": "sequential"})
    assert seq.key_config() != base.key_config()
    assert cls.model_validate({"mode": "sequential", "sequential_scope": "block"}).key_config() != seq.key_config()
    assert cls.model_validate({"skip": ["lm_head", "down_proj"]}).key_config() != base.key_config()
    assert cls.model_validate({"workers": 7}).key_config() == base.key_config()  # scheduling only
    if base.has("bitalloc"):
        mixed = cls.model_validate({"bitalloc": {"avg_bits": 3}})
        assert mixed.key_config() != base.key_config() and "bits" not in mixed.key_config()


def _foreign_fields() -> list[tuple[str, str]]:
    every = {name for cls in METHOD_CONFIGS.values() for name in cls.model_fields}
    pairs = []
    for method, cls in METHOD_CONFIGS.items():
        for name in sorted(every - set(cls.model_fields)):
            if method in ("rtn", "gptq") and name == "outliers":  # README's alias: rtn/gptq + outliers = icquant-*
                continue
            pairs.append((method, name))
    return pairs


@pytest.mark.parametrize(("method", "field"), _foreign_fields())
def test_fields_of_other_methods_are_refused_in_one_line(method: str, field: str) -> None:
    owner = next(cls for cls in METHOD_CONFIGS.values() if field in cls.model_fields)
    value = owner.model_validate({}).model_dump(mode="json")[field]
    with pytest.raises(ConfigError) as exc:
        parse_recipe({"quantize": {"method": method, field: value}}, source="r.yaml")
    text = str(exc.value)
    assert f"quantize.{field}: method {method} has no field {field!r}" in text and "\n" not in text


def test_rtn_or_gptq_with_outliers_is_icquant() -> None:
    a = parse_recipe({"quantize": {"method": "gptq", "outliers": {"gamma": 0.1}}}, source="r.yaml").quantize
    b = parse_recipe({"quantize": {"method": "icquant-gptq", "outliers": {"gamma": 0.1}}}, source="r.yaml").quantize
    assert a == b and a.key_config()["method"] == "icquant-gptq"
    with pytest.raises(ConfigError, match="method icquant-rtn has no field 'static_groups'"):
        parse_recipe({"quantize": {"method": "rtn", "static_groups": False, "outliers": {}}}, source="r.yaml")


def test_base_class_dispatches_on_method() -> None:
    cfg = QuantizeConfig.model_validate({"method": "hadamard-e8p", "bits": 3})
    assert type(cfg) is METHOD_CONFIGS["hadamard-e8p"] and cfg.transform_kind() == "hadamard"
    assert type(QuantizeConfig.model_validate({})) is METHOD_CONFIGS["gptq"]
    with pytest.raises(ValueError, match="hadamard-e8p codes 8 weights"):
        QuantizeConfig.model_validate({"method": "hadamard-e8p", "bits": 4})


def test_unknown_method_is_one_line() -> None:
    with pytest.raises(ConfigError, match=r"quantize\.method: unknown method 'magic'; one of rtn, gptq"):
        parse_recipe({"quantize": {"method": "magic"}}, source="r.yaml")
