"""The one redaction mechanism: credentials never reach a terminal, a log file or a log line we pass through.

:func:`redact` hides, in any text:

* passwords in URL userinfo wherever a URL-looking substring occurs (``scheme://user:pw@host`` becomes
  ``scheme://user:***@host``), and secret query parameters (``?password=``, ``X-Amz-Signature=``, ``token=``,
  ``access_token=`` ...);
* credentials in HTTP-client debug output (``Authorization: ...``, ``Credential=<key id>/...``,
  ``X-Amz-Security-Token``, ``Basic``/``Bearer`` values);
* every *known secret value* wherever it occurs: values handed to :func:`register_secret` (the ``SecretStr``
  settings, passwords found in configured URLs, the credentials an S3 client resolved; see
  :func:`register_settings` and :func:`register_url`).

:class:`RedactingFilter` applies it to log records (message and formatted traceback);
:func:`install_log_redaction` attaches it to quantpipe's loggers and to those of the libraries whose messages we
pass through (MLflow, Prefect, botocore, urllib3, requests, httpx ...). Standard library only: every layer can
import it without pulling in torch, MLflow or Prefect.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote, unquote

__all__ = [
    "LOGGER_NAMESPACES",
    "MIN_SECRET_LENGTH",
    "REDACTED",
    "RedactingFilter",
    "install_log_redaction",
    "known_secrets",
    "redact",
    "redact_record",
    "redact_url",
    "register_secret",
    "register_settings",
    "register_url",
    "url_password",
]

REDACTED = "***"
# Registered values shorter than this are ignored: replacing a 3-letter password everywhere would mangle every
# message (and a short value is no secret worth the damage). URL passwords of any length are still hidden by the
# URL pattern wherever they appear inside a URL.
MIN_SECRET_LENGTH = 8

# Loggers that get the filter: quantpipe's own packages and every library whose messages we emit or pass through.
LOGGER_NAMESPACES = (
    "quantpipe",
    "infra",
    "tasks",
    "flows",
    "registry",
    "quant",
    "kernels",
    "benchmarks",
    "mlflow",
    "prefect",
    "botocore",
    "boto3",
    "s3transfer",
    "urllib3",
    "requests",
    "httpx",
    "httpcore",
    "alembic",
    "sqlalchemy",
    "huggingface_hub",
)

_SCHEME = r"\b[a-zA-Z][a-zA-Z0-9+.\-]*://"
# userinfo ends at the last '@' of the authority (RFC 3986: the authority ends at '/', '?' or '#'); the user part
# has no ':', the password may contain ':' and an unescaped '@'. Quotes, '<', '>' and whitespace end a URL in text.
_URL_USERINFO = re.compile(rf"({_SCHEME}[^\s/?#:\"'<>`]*):[^\s/?#\"'<>`]*@")
_QUERY_SECRET = re.compile(
    r"([?&;](?:password|passwd|pwd|pass|secret|client_secret|token|access_token|refresh_token|id_token|auth_token"
    r"|api_key|apikey|api-key|sig|signature|x-amz-signature|x-amz-credential|x-amz-security-token|awsaccesskeyid"
    r"|x-goog-signature|x-goog-credential)=)[^&#\s\"'<>`]*",
    re.IGNORECASE,
)
_HEADER_PATTERNS = (
    # botocore DEBUG: "Authorization: AWS4-HMAC-SHA256 Credential=<key id>/<scope>, SignedHeaders=..., Signature=<hex>"
    (re.compile(r"Credential=[^/,\s'\"&]+"), "Credential=***"),
    (re.compile(r"Signature=[0-9a-fA-F]+"), "Signature=***"),
    # header dicts printed as {'X-Amz-Security-Token': b'...', 'Authorization': b'...'}
    (re.compile(r"((?:X-Amz-Security-Token|Authorization)'?\s*[:=]\s*b?')[^']*"), r"\1***"),
    (re.compile(r"\b(Basic|Bearer)\s+[A-Za-z0-9._~+/=\-]{8,}"), r"\1 ***"),
)

_lock = threading.Lock()
_known: set[str] = set()
_by_length: tuple[str, ...] = ()  # snapshot, longest first (a secret inside a longer one is replaced after it)


def _value(secret: Any) -> str | None:
    if secret is None:
        return None
    getter = getattr(secret, "get_secret_value", None)  # pydantic SecretStr / SecretBytes
    value = getter() if callable(getter) else secret
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None


def register_secret(*secrets: Any) -> None:
    """Remember secret values (``str``, ``SecretStr`` or ``None``): :func:`redact` replaces them by ``***``.

    Their percent-encoded and -decoded forms are registered too (a password appears encoded in URLs). Values
    shorter than :data:`MIN_SECRET_LENGTH` are ignored.
    """
    global _by_length
    found: set[str] = set()
    for secret in secrets:
        value = _value(secret)
        if not value:
            continue
        value = value.strip()
        for form in (value, quote(value, safe=""), unquote(value)):
            if len(form) >= MIN_SECRET_LENGTH:
                found.add(form)
    if not found - _known:
        return
    with _lock:
        _known.update(found)
        _by_length = tuple(sorted(_known, key=len, reverse=True))


def known_secrets() -> frozenset[str]:
    """The registered secret values (for tests and diagnostics; never print them)."""
    return frozenset(_known)


def _forget_all() -> None:
    """Tests only: drop every registered value."""
    global _by_length
    with _lock:
        _known.clear()
        _by_length = ()


def _password_span(url: str) -> tuple[int, int] | None:
    """Start and end of the password in one URL's userinfo, leniently (see :func:`url_password`)."""
    match = re.match(r"\s*[a-zA-Z][a-zA-Z0-9+.\-]*://", url)
    if match is None:
        return None
    start = match.end()
    rest = url[start:]
    # The userinfo ends at the *last* '@': a password may hold an unescaped '@', '/', '?' or '#'. An '@' in a path
    # without userinfo ("http://host:80/a@b") is then over-redacted, never under-redacted.
    at = rest.rfind("@")
    colon = rest.find(":", 0, at)
    if at < 0 or colon < 0 or "/" in rest[:colon]:  # no userinfo, or the ':' belongs to a path
        return None
    return start + colon + 1, start + at


def url_password(url: str) -> str | None:
    """The password in ``url``'s userinfo exactly as written (percent-encoded or not), or ``None``.

    Lenient, for one configured URL (not free text): a password holding an unescaped ``@``, ``/``, ``?`` or ``#``
    (``http://u:pa/ss@host``, invalid but seen in the wild) is still found.
    """
    span = _password_span(url)
    return url[span[0] : span[1]] if span is not None and span[1] > span[0] else None


def register_url(url: str | None) -> None:
    """Register the password of a configured URL (raw and decoded) as a known secret."""
    if url and "://" in url:
        register_secret(url_password(url))


def register_settings(settings: Any) -> None:
    """Register every secret a settings object holds: its ``SecretStr`` fields and passwords in its URL fields.

    Duck-typed (any pydantic model, no import of :mod:`infra.settings`), so a field added later is covered.
    """
    fields: Iterable[str] = getattr(type(settings), "model_fields", None) or vars(settings)
    for name in fields:
        value = getattr(settings, name, None)
        if hasattr(value, "get_secret_value"):
            register_secret(value)
        elif isinstance(value, str) and "://" in value:
            register_url(value)


def redact(text: Any) -> str:
    """``text`` (``str()`` of anything) with URL passwords, secret query values, credential headers and every
    registered secret value replaced by ``***``."""
    out = text if isinstance(text, str) else str(text)
    if "://" in out:
        out = _URL_USERINFO.sub(rf"\1:{REDACTED}@", out)
    if "=" in out:
        out = _QUERY_SECRET.sub(rf"\1{REDACTED}", out)
    for pattern, repl in _HEADER_PATTERNS:
        out = pattern.sub(repl, out)
    for secret in _by_length:
        if secret in out:
            out = out.replace(secret, REDACTED)
    return out


def redact_url(url: str) -> str:
    """One configured URL with its password (and secret query values) replaced by ``***``; lenient like
    :func:`url_password`, so a password that breaks URL syntax is hidden too."""
    span = _password_span(url)
    if span is not None:
        url = f"{url[: span[0]]}{REDACTED}{url[span[1] :]}"
    return redact(url)


def redact_record(record: logging.LogRecord) -> None:
    """Redact a log record in place: its message (``msg`` % ``args``), formatted traceback and stack."""
    try:
        message = record.getMessage()
    except Exception:  # a record that cannot be formatted: the handler reports it, we leave it alone
        message = None
    if message is not None:
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
    if record.exc_text:
        record.exc_text = redact(record.exc_text)
    elif record.exc_info and record.exc_info[1] is not None:
        # Exception texts (MLflow's, requests') carry URLs: format the traceback now, redacted; formatters use a
        # ready ``exc_text`` as is. Left untouched when there is nothing to hide (handlers format as usual).
        trace = _FORMATTER.formatException(record.exc_info)
        cleaned = redact(trace)
        if cleaned != trace:
            record.exc_text = cleaned
    if record.stack_info:
        record.stack_info = redact(record.stack_info)


_FORMATTER = logging.Formatter()


class RedactingFilter(logging.Filter):
    """Redacts every record it sees (never drops one): see :func:`redact_record`."""

    def filter(self, record: logging.LogRecord) -> bool:
        redact_record(record)
        return True


_FILTER = RedactingFilter()
_factory_installed = False


def _watched(name: str) -> bool:
    return name.split(".", 1)[0] in LOGGER_NAMESPACES


def install_log_redaction(*secrets: Any) -> RedactingFilter:
    """Register ``secrets`` and make sure every record of the watched loggers is redacted. Idempotent, cheap.

    A filter on a logger only sees records logged on that very logger, not those propagated from its children
    (``botocore.endpoint``), and loggers are created lazily. So the filter goes on every watched logger that
    exists now, and the log-record factory is wrapped once so records of watched loggers created later are
    redacted as they are made.
    """
    global _factory_installed
    register_secret(*secrets)
    names = set(LOGGER_NAMESPACES) | {n for n in list(logging.Logger.manager.loggerDict) if _watched(n)}
    for name in names:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    with _lock:
        if not _factory_installed:
            previous = logging.getLogRecordFactory()

            def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
                record = previous(*args, **kwargs)
                if _watched(record.name):
                    redact_record(record)
                return record

            logging.setLogRecordFactory(factory)
            _factory_installed = True
    return _FILTER
