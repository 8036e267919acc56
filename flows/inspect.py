"""Read-only views over the store and registry for the CLI (lineage trees)."""

from __future__ import annotations

from typing import Any

from rich.tree import Tree

from infra.errors import ConfigError
from infra.keys import ArtifactRef
from infra.manifest import Manifest
from infra.settings import Settings
from infra.store import open_store

__all__ = ["lineage_tree"]


def _summary(manifest: Manifest) -> str:
    cfg = ", ".join(f"{k}={v}" for k, v in list(manifest.config.items())[:6] if not isinstance(v, dict | list))
    return f"[bold]{manifest.stage}[/] {manifest.key[:12]}  [dim]{cfg}[/]"


def lineage_tree(target: str, settings: Settings) -> tuple[Tree, dict[str, Any]]:
    """Tree of ``target``'s ancestors; ``target`` is ``stage/key`` or a registered ``NAME/VERSION``."""
    store = open_store(settings=settings, check=True)
    roots: list[str]
    title = target
    try:
        roots = [str(ArtifactRef(target))]
    except ConfigError:
        from registry.models import lineage_tags

        name, _, version = target.rpartition("/")
        if not name:
            raise ConfigError(f"{target!r} is neither '<stage>/<key>' nor a registered model 'NAME/VERSION'") from None
        tags = lineage_tags(name, version, settings=settings)
        # evaluate's ancestry covers every stage; fall back to all recorded keys for partial builds
        roots = [tags["key.evaluate"]] if "key.evaluate" in tags else [v for _, v in sorted(tags.items())]
        title = f"model {name} version {version}"
    tree = Tree(title)
    data: dict[str, Any] = {"target": target, "artifacts": {}}
    by_ref: dict[str, Manifest] = {}
    for root in roots:
        for m in store.lineage(root):
            by_ref[str(m.ref)] = m

    shown: set[str] = set()

    def add(node: Tree, ref: str, role: str) -> None:
        m = by_ref[ref]
        label = f"[dim]{role}:[/] {_summary(m)}" if role else _summary(m)
        if ref in shown:
            node.add(f"{label} [dim](above)[/]")
            return
        shown.add(ref)
        child = node.add(label)
        provenance = m.metadata.get("provenance")
        if provenance:
            child.add(f"[dim]data: {provenance}[/]")
        for parent_role, parent in sorted(m.inputs.items()):
            if parent in by_ref:
                add(child, parent, parent_role)

    for ref in (r for r in roots if r in by_ref):
        add(tree, ref, "")
    for ref, m in by_ref.items():
        data["artifacts"][ref] = {
            "stage": m.stage,
            "config": m.config,
            "inputs": m.inputs,
            "created_at": m.created_at,
            "metadata": m.metadata,
        }
    return tree, data
