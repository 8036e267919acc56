"""The code version recorded in manifests and MLflow tags (package version + git commit when known)."""

from __future__ import annotations

import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path

__all__ = ["code_version", "git_commit"]

_REPO_ROOT = Path(__file__).resolve().parents[1]


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    if not (_REPO_ROOT / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(_REPO_ROOT), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


@lru_cache(maxsize=1)
def code_version() -> str:
    try:
        version = metadata.version("quantpipe")
    except metadata.PackageNotFoundError:
        version = "0+unknown"
    commit = git_commit()
    return f"{version}+g{commit}" if commit else version
