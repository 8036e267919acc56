"""The Prefect run form of ``quantize-model``: a recipe picker, described parameters, per-method options."""

from __future__ import annotations

import json
from typing import Any

import pytest
from prefect.utilities.callables import parameter_schema

from flows.quantize import quantize_model
from tasks.recipe import METHOD_CONFIGS, load_recipe, resolve_recipe, shipped_recipe_names


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return parameter_schema(quantize_model.fn).model_dump_for_openapi()


def _recipe_enum(schema: dict[str, Any]) -> list[str]:
    for option in schema["properties"]["recipe"]["anyOf"]:
        if "enum" in option:
            return list(option["enum"])
    raise AssertionError("no recipe enum in the form")


def test_recipe_picker_lists_the_shipped_recipes(schema: dict[str, Any]) -> None:
    assert _recipe_enum(schema) == shipped_recipe_names() and "rtn-w4g64" in _recipe_enum(schema)
    assert schema["properties"]["recipe"]["default"] == "gptq-w4g64"
    assert schema["required"] == ["model"]


def test_every_top_level_parameter_is_described_with_examples(schema: dict[str, Any]) -> None:
    for name, prop in schema["properties"].items():
        assert prop.get("description"), f"{name} has no description"
        assert prop.get("examples"), f"{name} has no examples"


def test_no_nullable_top_level_parameter(schema: dict[str, Any]) -> None:
    """A null alternative renders as 'Property is type None' in the Prefect UI."""
    for name, prop in schema["properties"].items():
        assert {"type": "null"} not in prop.get("anyOf", []), name


def test_no_angle_bracket_placeholders(schema: dict[str, Any]) -> None:
    text = json.dumps(schema)
    assert "<model>" not in text and "<name>" not in text and "MODEL.NAME" in text


def test_quantize_section_is_one_of_on_method(schema: dict[str, Any]) -> None:
    defs = schema["definitions"]
    quantize = defs["Recipe"]["properties"]["quantize"]
    assert quantize["discriminator"]["propertyName"] == "method"
    assert set(quantize["discriminator"]["mapping"]) == set(METHOD_CONFIGS)
    rtn = defs[METHOD_CONFIGS["rtn"].__name__]["properties"]
    assert "group_size" in rtn and "damp" not in rtn and "outliers" not in rtn
    e8p = defs[METHOD_CONFIGS["hadamard-e8p"].__name__]["properties"]
    assert "e8p" in e8p and "group_size" not in e8p


def test_a_run_with_a_recipe_name_builds_that_recipe() -> None:
    params = quantize_model.validate_parameters({"model": "tiny-llama", "recipe": "rtn-w4g64"})
    recipe = resolve_recipe(params["recipe"], params["overrides"], params["name"])
    assert recipe == load_recipe("rtn-w4g64")
    changed = resolve_recipe("rtn-w4g64", ["quantize.group_size=32"])
    assert changed.quantize.group_size == 32 and changed.name == "rtn-w4g64"
    assert resolve_recipe("rtn-w4g64", (), "my-rtn").name == "my-rtn"


def test_a_registered_name_follows_the_effective_recipe() -> None:
    from tasks.register import recipe_identity

    assert recipe_identity(resolve_recipe("rtn-w4g64"))[0] == "rtn-w4g64"
    changed = resolve_recipe("rtn-w4g64", ["quantize.group_size=32"])
    assert recipe_identity(changed)[0] == f"rtn-w4g64-{changed.digest()[:8]}"
    assert recipe_identity(resolve_recipe("rtn-w4g64", (), "my-rtn"))[0] == "my-rtn"


def test_a_name_outside_the_picker_is_refused() -> None:
    with pytest.raises(Exception, match="recipe"):
        quantize_model.validate_parameters({"model": "x", "recipe": "no-such-recipe"})
