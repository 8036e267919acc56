"""Registered names say what was built: overrides of a shipped recipe never register under its plain name."""

from __future__ import annotations

import json

from tasks.recipe import load_recipe
from tasks.register import eval_protocol, recipe_identity


def test_shipped_recipe_keeps_its_name() -> None:
    assert recipe_identity(load_recipe("gptq-w4g64")) == ("gptq-w4g64", {})


def test_overridden_build_gets_a_digest_suffix_and_override_tags() -> None:
    shipped = load_recipe("rtn-w4g64")
    changed = shipped.with_overrides(["quantize.group_size=32"])
    name, tags = recipe_identity(changed)
    assert name == f"rtn-w4g64-{changed.digest()[:8]}" and name != "rtn-w4g64"
    assert tags["recipe_base"] == "rtn-w4g64"
    assert json.loads(tags["recipe_overrides"]) == {"quantize.group_size": 32}
    sym = shipped.with_overrides(["quantize.sym=true"])
    assert recipe_identity(sym)[0] != name  # two different overrides, two different names


def test_a_users_own_recipe_name_is_kept() -> None:
    mine = load_recipe("rtn-w4g64").with_overrides(["name=my-rtn", "quantize.group_size=32"])
    assert recipe_identity(mine) == ("my-rtn", {})


def test_eval_protocol_changes_with_what_ppl_is_measured_on() -> None:
    r = load_recipe("gptq-w4g64")
    assert eval_protocol(r) == eval_protocol(r.with_overrides(["quantize.bits=3"]))
    assert eval_protocol(r) != eval_protocol(r.with_overrides(["eval.n_windows=2"]))
