"""`registry lookup` misses explained: which criterion is off, and near-miss candidates with their gate reasons."""

from __future__ import annotations

from registry.explain import explain_miss, miss_lines
from registry.models import PromotionGate, lookup
from tests.registry.test_models import NAME, _register

SMALL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_alias_miss_lists_candidates_with_gate_reasons(settings, checkpoint_dir):
    _register(settings, checkpoint_dir, "k1", ppl=13.0, gate=PromotionGate(max_ppl_increase=0.2))
    assert lookup(model=SMALL, alias="champion", settings=settings) is None
    lines = explain_miss({"base_model": SMALL}, name=None, alias="champion", settings=settings)
    assert "none holds alias 'champion'" in lines[0]
    assert f"{NAME} v1 (candidate, ppl 13)" in lines[1]
    assert ": gate failed — gate failed: champion unchanged" in lines[1]


def test_criterion_miss_names_the_flag_and_what_exists(settings, checkpoint_dir):
    _register(settings, checkpoint_dir, "k1", bits=4, recipe="gptq-w4g64")
    _register(settings, checkpoint_dir, "k2", bits=3, recipe="gptq-w3g64", name="SmolLM2-135M-Instruct.gptq-w3g64")
    lines = explain_miss({"base_model": SMALL, "bits": "2"}, name=None, alias=None, settings=settings)
    assert lines == ["2 version(s) match everything but --bits '2'; they have 3, 4"]
    lines = explain_miss({"base_model": "org/Nope", "bits": "5"}, name=None, alias=None, settings=settings)
    assert lines[0].startswith("no version matches even one criterion less; the registry holds 2 version(s)")
    assert SMALL in lines[0]


def test_empty_registry_says_so():
    assert "no versions at all" in miss_lines([], {"bits": "4"}, None)[0]
