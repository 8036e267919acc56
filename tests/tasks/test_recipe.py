"""Recipes: shipped files validate; bad recipes get one-line errors naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra.errors import ConfigError
from tasks.recipe import Recipe, load_recipe, parse_recipe

SHIPPED = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipes_validate(name: str) -> None:
    recipe = load_recipe(name)
    assert recipe.name == name


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_bytes(text.encode() if isinstance(text, str) else text)
    return p


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("quantize: {bits: 0}", r"quantize\.bits"),
        ("quantize: {bits: 5}", "bits must be one of 2, 3, 4, 8"),
        ("quantize: {bitz: 4}", r"quantize\.bitz: Extra inputs"),
        ("quantize: {group_size: -7}", r"quantize\.group_size"),
        ("quantize: {method: magic}", r"quantize\.method"),
        ("quantize: {damp: -1}", r"quantize\.damp"),
        ("quantize: {skip: ['(']}", "not a valid regex"),
        ("calibration: {n_samples: 0}", r"calibration\.n_samples"),
        ("calibration: {seq_len: 'long'}", r"calibration\.seq_len"),
        ("eval: {seq_len: 2}", r"eval\.seq_len"),
        ("name: ../../etc", "recipe name"),
        ("unknown_section: 1", "unknown_section"),
        ("- just\n- a list", "mapping at the top level"),
        ("quantize: {bits: [4", "not valid YAML"),
    ],
)
def test_bad_recipes_one_line(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as exc:
        load_recipe(_write(tmp_path, text))
    assert "\n" not in str(exc.value)


def test_non_utf8_recipe(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8|not valid YAML"):
        load_recipe(p)


def test_missing_recipe() -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_recipe("no-such-recipe")


def test_overrides_and_digest() -> None:
    base = load_recipe("gptq-w4g64")
    changed = base.with_overrides(["quantize.bits=3", "eval.n_windows=2"])
    assert changed.quantize.bits == 3 and changed.eval.n_windows == 2
    assert changed.digest() != base.digest()
    with pytest.raises(ConfigError, match="unknown section"):
        base.with_overrides(["nosuch.field=1"])
    with pytest.raises(ConfigError, match=r"quantize\.bits"):
        base.with_overrides(["quantize.bits=0"])


def test_rtn_refuses_gptq_fields_and_gptq_keys_them() -> None:
    with pytest.raises(ConfigError, match=r"quantize\.damp: method rtn has no field 'damp' \(damp belongs to gptq"):
        parse_recipe({"quantize": {"method": "rtn", "damp": 0.01}}, source="r.yaml")
    g1 = Recipe.model_validate({"quantize": {"method": "gptq", "damp": 0.01}})
    g2 = Recipe.model_validate({"quantize": {"method": "gptq", "damp": 0.1}})
    assert g1.quantize.key_config() != g2.quantize.key_config()
    assert "workers" not in g1.quantize.key_config()


def test_set_method_keeps_the_fields_the_new_method_has() -> None:
    """``--set quantize.method=rtn`` on a GPTQ recipe drops GPTQ's sweep fields; set explicitly they are refused."""
    base = load_recipe("gptq-w4g64")
    rtn = base.with_overrides(["quantize.method=rtn"])
    assert rtn.quantize.method == "rtn" and (rtn.quantize.group_size, rtn.quantize.mse_clip) == (64, True)
    with pytest.raises(ConfigError, match="method rtn has no field 'damp'"):
        base.with_overrides(["quantize.method=rtn", "quantize.damp=0.1"])


def test_gptqt_one_bit_is_accepted_and_only_for_gptqt(tmp_path: Path) -> None:
    """README documents GPTQT's binary coding down to k = 1; the bits check rejected it for every method."""
    one = load_recipe(_write(tmp_path, "quantize: {method: gptqt, bits: 1, gptqt: {linear_bits: 2}}"))
    assert one.quantize.bits == 1
    with pytest.raises(ConfigError, match="1 only with gptqt"):
        load_recipe(_write(tmp_path, "quantize: {method: rtn, bits: 1}"))


def test_one_bit_gptqt_quantizes_and_stores(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load

    from tasks.qlayer import load_coded
    from tasks.quantize import _qlayer_payload, _quantize_tensor
    from tests.quant.reference import random_spd, random_weight

    recipe = load_recipe(
        _write(tmp_path, "quantize: {method: gptqt, bits: 1, group_size: 32, gptqt: {linear_bits: 2}}")
    )
    q = _quantize_tensor(random_weight(16, 64, 1), random_spd(64, 2) * 2, recipe.quantize, "layer")
    from safetensors import safe_open

    payload = _qlayer_payload(q)
    path = tmp_path / "q.safetensors"
    path.write_bytes(payload)
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    back = load_coded(load(payload), meta, {})
    assert torch.equal(back.weight.dequantize(), q.weight.dequantize())  # type: ignore[union-attr]
    assert q.weight.planes.shape[0] == 1  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("override", "check"),
    [
        ("quantize.outliers.gamma=0.1", lambda r: r.quantize.outliers.gamma == 0.1),
        ("quantize.bitalloc.avg_bits=3", lambda r: r.quantize.bitalloc.avg_bits == 3),
    ],
)
def test_set_opens_an_optional_section(override: str, check) -> None:
    """README: ``--set`` overrides any field, including those of sections a recipe leaves out (default None)."""
    assert check(load_recipe("gptq-w4g64").with_overrides(["quantize.mode=parallel", override]))


def test_set_on_a_scalar_is_still_refused() -> None:
    with pytest.raises(ConfigError, match="unknown section 'bits'"):
        load_recipe("gptq-w4g64").with_overrides(["quantize.bits.x=1"])
