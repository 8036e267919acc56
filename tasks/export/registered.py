"""``quantpipe export``: where a registered build's serving export is, optionally copied out.

Every format is written by the pack stage (:mod:`tasks.export`), so it is part of the pack artifact — content-
addressed, hashed in its manifest, in the lineage of the registered version (tag ``key.pack``). Exporting is
resolving that artifact (verified on read) and pointing at, or copying, its ``<format>/`` directory. A format the
build has not got is refused with the pack's recorded reason (or, for packs older than the format, how to get it).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from infra.errors import ConfigError
from infra.keys import ArtifactRef
from infra.settings import Settings
from tasks.export import EXPORTS

__all__ = ["FORMATS", "export_build", "pack_ref"]

FORMATS = ("native", *(fmt.name for fmt in EXPORTS))


def pack_ref(target: str, settings: Settings) -> str:
    """``pack/<key>`` of ``target``: a registered ``NAME/VERSION`` (number or alias) or a ``pack/<key>`` ref."""
    if target.startswith("pack/"):
        return str(ArtifactRef(target))
    from registry.models import lineage_tags

    name, _, version = target.rpartition("/")
    if not name or not version:
        raise ConfigError(f"{target!r} is neither a registered model 'NAME/VERSION' nor 'pack/<key>'")
    ref = lineage_tags(name, version, settings=settings).get("key.pack")
    if not ref:
        raise ConfigError(f"{target} records no pack artifact (tag key.pack)")
    return str(ref)


def export_build(target: str, fmt: str, out: Path | None, settings: Settings) -> dict[str, Any]:
    """The location of ``target``'s ``fmt`` export (``out`` when given: the export's files copied there).

    Returns ``{"target", "format", "pack", "location", "files"}``; ``location`` is the ``.gguf`` file for GGUF and
    the checkpoint directory otherwise. Raises ConfigError (one line) when the build has no such export.
    """
    from infra.store import open_store

    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; one of {', '.join(FORMATS)}")
    ref = pack_ref(target, settings)
    art = open_store(settings=settings).get(ref)
    meta = art.manifest.metadata
    if fmt not in meta.get("formats", ["native"]):
        flag = next(e.flag for e in EXPORTS if e.name == fmt)
        reason = meta.get(f"{flag}_skipped") or (
            f"packed by pack stage v{art.manifest.stage_version}, before the {fmt} export existed; rebuild it "
            "(quantpipe quantize with the same recipe) to write it"
        )
        raise ConfigError(f"{target} has no {fmt} export: {reason}")
    prefix = art.manifest.file("native/config.json").path.removesuffix("native/config.json")
    src = art.root / prefix / fmt
    files = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
    root = src
    if out is not None:
        out = Path(out)
        if out.exists() and any(out.iterdir()):
            raise ConfigError(f"--out {out} exists and is not empty")
        out.mkdir(parents=True, exist_ok=True)
        for name in files:
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / name, out / name)
        root = out
    gguf = [f for f in files if f.endswith(".gguf")]
    location = root / gguf[0] if fmt == "gguf" and gguf else root
    return {"target": target, "format": fmt, "pack": ref, "location": str(location), "files": files}
