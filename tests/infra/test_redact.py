"""infra.redact: URL passwords, secret query values, credential headers and registered secrets never get through."""

from __future__ import annotations

import logging
import string
from collections.abc import Iterator
from urllib.parse import quote

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from infra import redact as R
from infra.redact import REDACTED, redact, redact_url, register_secret, url_password


@pytest.fixture(autouse=True)
def _fresh_registry() -> Iterator[None]:
    saved = R.known_secrets()
    R._forget_all()
    yield
    R._forget_all()
    register_secret(*saved)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http://alice:s3cr3tpw@127.0.0.1:9/", "http://alice:***@127.0.0.1:9/"),
        (
            "API request to http://alice:s3cr3tpw@127.0.0.1:9/api/2.0/mlflow/x failed",
            "API request to http://alice:***@127.0.0.1:9/api/2.0/mlflow/x failed",
        ),
        ("postgresql+psycopg2://u:p@ss:w@db:5432/m", "postgresql+psycopg2://u:***@db:5432/m"),
        ("'http://u:pw@h', 'x@y'", "'http://u:***@h', 'x@y'"),
        ('{"a":"https://u:pw@h/x","b":"x@y"}', '{"a":"https://u:***@h/x","b":"x@y"}'),
        ("http://host:8080/a?email=a@b.com", "http://host:8080/a?email=a@b.com"),  # no userinfo: untouched
        ("http://token@host/x", "http://token@host/x"),
        ("sqlite:////tmp/mlflow.db s3://bucket/prefix", "sqlite:////tmp/mlflow.db s3://bucket/prefix"),
        ("https://h/o?X-Amz-Signature=abc123&ok=1", "https://h/o?X-Amz-Signature=***&ok=1"),
        ("https://h/?password=hunter2&user=bob", "https://h/?password=***&user=bob"),
        ("https://h/cb?access_token=xyz.abc&token=t0k&state=s", "https://h/cb?access_token=***&token=***&state=s"),
        ("Authorization: Basic YWxpY2U6czNjcjN0cHc=", "Authorization: Basic ***"),
        (
            "Authorization: AWS4-HMAC-SHA256 Credential=AKIAFAKE1234/20240101/us-east-1/s3/aws4_request, "
            "SignedHeaders=host, Signature=0123abcdef",
            "Authorization: AWS4-HMAC-SHA256 Credential=***/20240101/us-east-1/s3/aws4_request, "
            "SignedHeaders=host, Signature=***",
        ),
        ("{'X-Amz-Security-Token': b'FQoGZXIvYXdzE', 'Host': b'x'}", "{'X-Amz-Security-Token': b'***', 'Host': b'x'}"),
        ("n_tokens=128 tokenizer=llama bos_token_id=1", "n_tokens=128 tokenizer=llama bos_token_id=1"),
    ],
)
def test_redact_text(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_redact_url_is_lenient_for_one_configured_url() -> None:
    assert redact_url("http://u:pa/ss@h:9000") == "http://u:***@h:9000"
    assert url_password("http://u:pa/ss@h:9000") == "pa/ss"
    assert redact_url("http://u:a@b/c@host/p") == "http://u:***@host/p"
    for plain in ("s3://bucket/prefix@v2", "file:///home/u@x/store", "sqlite:////tmp/a:b@c/db", "http://h:80/x"):
        assert redact_url(plain) == plain and url_password(plain) is None


def test_registered_secrets_are_replaced_everywhere() -> None:
    register_secret("not-a-secret"[:3], None, "fake-AWS-secret-0123")  # short values are ignored
    assert redact("key fake-AWS-secret-0123 and nope") == f"key {REDACTED} and nope"
    R.register_url("http://bob:p%40ssw0rd-long@minio:9000")
    assert "p@ssw0rd-long" in R.known_secrets() and "p%40ssw0rd-long" in R.known_secrets()
    assert redact("auth failed for p@ssw0rd-long") == f"auth failed for {REDACTED}"


def test_register_settings_finds_secret_fields_and_url_passwords(tmp_path) -> None:
    from infra.settings import Settings

    settings = Settings(
        home=tmp_path,
        hf_token="hf_fakeTOKEN123456",  # type: ignore[arg-type]
        prefect_api_url="http://pa:prefect-pw-1234@127.0.0.1:4200/api",
    )
    R.register_settings(settings)
    assert {"hf_fakeTOKEN123456", "prefect-pw-1234"} <= R.known_secrets()


_USER = st.text(alphabet=string.ascii_letters + string.digits + "._-", min_size=1, max_size=12)
_HOST = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?(\.[a-z]{2,5}){0,2}", fullmatch=True)
_PORT = st.one_of(st.just(""), st.integers(1, 65535).map(lambda p: f":{p}"))
_SCHEME = st.sampled_from(["http", "https", "postgresql+psycopg2", "mysql", "redis", "s3", "ftp"])
_FRAME = st.text(alphabet=string.ascii_lowercase + string.digits + " .,;()[]", max_size=30)
_TAIL = st.sampled_from(["", "/", "/api/2.0/mlflow/experiments/get?x=1", "#frag", "?a=b"])


@given(
    scheme=_SCHEME,
    user=_USER,
    password=st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=24),
    host=_HOST,
    port=_PORT,
    tail=_TAIL,
    before=_FRAME,
    after=_FRAME,
)
def test_property_url_password_never_survives(
    scheme: str, user: str, password: str, host: str, port: str, tail: str, before: str, after: str
) -> None:
    """Any password, as a URL carries it (percent-encoded), inside any text: redact() hides it and changes
    nothing else."""
    encoded = quote(password, safe="")
    url = f"{scheme}://{user}:{encoded}@{host}{port}{tail}"
    text = f"{before} {url} {after}"
    masked = f"{before} {scheme}://{user}:{REDACTED}@{host}{port}{tail} {after}"
    assert redact(text) == masked
    assume(encoded not in masked)  # a password that is also a word of the surrounding text
    assert encoded not in redact(text)


_RAW = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs", "Zs", "Zl", "Zp", "Cc"), exclude_characters="/?#\"'<>`"),
    min_size=1,
    max_size=24,
)


@given(scheme=_SCHEME, user=_USER, password=_RAW, host=_HOST, port=_PORT, tail=_TAIL, after=_FRAME)
def test_property_raw_password_never_survives(
    scheme: str, user: str, password: str, host: str, port: str, tail: str, after: str
) -> None:
    """Unencoded passwords too (':' and '@' included), in free text and through redact_url()."""
    url = f"{scheme}://{user}:{password}@{host}{port}{tail}"
    masked = f"{scheme}://{user}:{REDACTED}@{host}{port}{tail}"
    assume(password not in f"{masked} {after}")
    assert password not in redact(f"error at {url} {after}")
    assert redact_url(url) == masked


@given(
    user=_USER,
    password=st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=24),
    host=_HOST,
)
def test_property_redact_url_any_raw_password(user: str, password: str, host: str) -> None:
    """One configured URL: even '/', '?', '#', quotes or spaces in an unencoded password are hidden."""
    url = f"http://{user}:{password}@{host}/api"
    assume(password not in f"http://{user}:***@{host}/api")
    assert password not in redact_url(url)


def test_filter_redacts_library_records_created_after_install(caplog: pytest.LogCaptureFixture) -> None:
    """A child logger of a library (created after installation, so without the filter of its own) logging a URL
    with a password, a registered secret and an exception whose text holds one: all redacted."""
    R.install_log_redaction("registered-SECRET-value-42")
    lib = logging.getLogger("mlflow.utils.rest_utils_test_redact")
    caplog.set_level(logging.DEBUG, logger="mlflow.utils.rest_utils_test_redact")
    lib.warning("API request to %s failed", "http://alice:s3cr3tpw@127.0.0.1:9/api")
    lib.info("token is registered-SECRET-value-42")
    try:
        raise ConnectionError("HTTPConnectionPool: http://alice:s3cr3tpw@127.0.0.1:9/api refused")
    except ConnectionError:
        logging.getLogger("botocore.endpoint_test_redact").error("request failed", exc_info=True)
    text = caplog.text + "\n".join(r.getMessage() for r in caplog.records)
    assert "s3cr3tpw" not in text and "registered-SECRET-value-42" not in text
    assert "http://alice:***@127.0.0.1:9/api" in text and "Traceback" in text


def test_filter_redacts_records_of_loggers_it_is_attached_to() -> None:
    flt = R.install_log_redaction()
    for name in ("mlflow", "prefect", "botocore", "urllib3", "requests", "registry", "infra"):
        assert flt in logging.getLogger(name).filters
    record = logging.LogRecord(
        "urllib3.connectionpool", logging.DEBUG, __file__, 1, "GET %s", ("https://u:pw@h/?sig=abc",), None
    )
    assert flt.filter(record) is True
    assert record.getMessage() == "GET https://u:***@h/?sig=***"
