"""One exception family for everything a user can fix.

Every message is a single line that names the setting, key or file to fix, so the CLI can print it
without a traceback and a Prefect run log stays readable.
"""

from __future__ import annotations

__all__ = [
    "ArtifactNotFoundError",
    "ConfigError",
    "CorruptArtifactError",
    "QuantpipeError",
    "StoreError",
    "StoreUnreachableError",
]


class QuantpipeError(Exception):
    """Base class: a problem with input, configuration or environment that the user can fix."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


class ConfigError(QuantpipeError, ValueError):
    """A setting, recipe field or CLI argument is invalid."""


class StoreError(QuantpipeError):
    """The artifact store refused an operation."""


class StoreUnreachableError(StoreError):
    """The store's endpoint cannot be reached or the credentials are rejected."""


class ArtifactNotFoundError(StoreError, KeyError):
    """No committed artifact exists under the requested key."""

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0] if self.args else ""


class CorruptArtifactError(StoreError):
    """A committed artifact's files do not match its manifest."""
