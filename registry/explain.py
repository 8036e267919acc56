"""Why a registry lookup found nothing, in terms an operator can act on.

A lookup that answers only "no registered version matches" leaves the operator to guess which criterion was
wrong: a misspelt base model, a recipe that was never built, or — the common case behind ``--alias champion`` —
a build that exists as ``candidate`` but whose gate failed. This module reads what the registry holds and says,
per criterion, what it would have matched without it, and for alias lookups each near miss with its gate and
promotion reasons. It runs only after a miss, so it may read every version instead of one filtered search.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from infra.settings import Settings
from registry.models import (
    TAG_BASE_MODEL,
    TAG_BASE_REVISION,
    TAG_BITS,
    TAG_GATE,
    TAG_GATE_REASON,
    TAG_PROMOTION,
    TAG_RECIPE,
    TAG_RECIPE_DIGEST,
    ModelVersionInfo,
    list_versions,
)

__all__ = ["explain_miss", "miss_lines"]

_FLAG = {
    TAG_BASE_MODEL: "--model",
    TAG_BASE_REVISION: "--revision",
    TAG_RECIPE: "--recipe",
    TAG_BITS: "--bits",
    TAG_RECIPE_DIGEST: "recipe digest",
    "name": "--name",
}
_SHOWN = 5  # near misses and distinct values listed per line


def _value(info: ModelVersionInfo, field: str) -> str | None:
    return info.name if field == "name" else info.tags.get(field)


def _matches(info: ModelVersionInfo, wanted: Mapping[str, str], skip: str | None = None) -> bool:
    return all(_value(info, f) == v for f, v in wanted.items() if f != skip)


def _listing(values: Sequence[str]) -> str:
    distinct = sorted(set(values))
    more = f" and {len(distinct) - _SHOWN} more" if len(distinct) > _SHOWN else ""
    return ", ".join(distinct[:_SHOWN]) + more


def _describe(info: ModelVersionInfo) -> str:
    aliases = ",".join(info.aliases) or "no alias"
    gate = info.tags.get(TAG_GATE, "?")
    why = info.tags.get(TAG_PROMOTION) or info.tags.get(TAG_GATE_REASON) or ""
    ppl = info.metrics.get("ppl")
    ppl_text = f", ppl {ppl:.4g}" if ppl is not None else ""
    return f"{info.name} v{info.version} ({aliases}{ppl_text}): gate {gate}" + (f" — {why}" if why else "")


def miss_lines(versions: Sequence[ModelVersionInfo], wanted: Mapping[str, str], alias: str | None) -> list[str]:
    """The explanation for ``versions`` (everything the registry holds), as lines; pure, so it is testable."""
    if not versions:
        return ["the registry holds no versions at all: run `quantpipe quantize` or `quantpipe demo` first"]
    lines: list[str] = []
    exact = [v for v in versions if _matches(v, wanted)]
    if alias is not None and exact:
        lines.append(f"{len(exact)} version(s) match the criteria but none holds alias {alias!r}:")
        lines += [f"  {_describe(v)}" for v in exact[:_SHOWN]]
        if len(exact) > _SHOWN:
            lines.append(f"  … and {len(exact) - _SHOWN} more (`quantpipe registry list`)")
        return lines
    for field, value in wanted.items():
        near = [v for v in versions if _matches(v, wanted, skip=field)]
        if not near:
            continue
        have = [x for v in near if (x := _value(v, field)) is not None]
        lines.append(
            f"{len(near)} version(s) match everything but {_FLAG.get(field, field)} {value!r}; "
            f"they have {_listing(have) if have else 'no such tag'}"
        )
    if not lines:
        models = [x for v in versions if (x := v.tags.get(TAG_BASE_MODEL)) is not None]
        lines.append(
            f"no version matches even one criterion less; the registry holds {len(versions)} version(s) of "
            f"{len({v.name for v in versions})} model(s), base models: {_listing(models) or '-'}"
        )
    return lines


def explain_miss(
    wanted: Mapping[str, str], *, name: str | None, alias: str | None, settings: Settings | None = None
) -> list[str]:
    """Lines saying what exists near a lookup that matched nothing (``wanted``: tag → value, as ``lookup`` reads)."""
    criteria = dict(wanted)
    if name is not None:
        criteria["name"] = name
    return miss_lines(list_versions(None, settings=settings), criteria, alias)
