"""Errors raised by the registry package.

They extend :class:`infra.errors.QuantpipeError` so the CLI prints them as one line without a traceback, and
they never wrap MLflow's own exception text verbatim (that text is often multi-line and mentions internals).
"""

from __future__ import annotations

from infra.errors import QuantpipeError
from infra.redact import redact

__all__ = ["RegistryError", "RegistryNotFoundError"]


class RegistryError(QuantpipeError):
    """The tracking server or model registry refused an operation.

    The message is redacted (:func:`infra.redact.redact`): it often quotes a tracking URI, an artifact location or
    MLflow's own text, any of which may carry ``user:password@`` or a signed-URL signature.
    """

    def __init__(self, message: str) -> None:
        super().__init__(redact(message))


class RegistryNotFoundError(RegistryError, LookupError):
    """A registered model, version, alias or run that was named explicitly does not exist."""
