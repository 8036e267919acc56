"""Model registry: one registered model per (base model, recipe), one version per distinct build.

Why it is built this way:

* Versions are created with ``MlflowClient.create_model_version(source=<run artifact uri>/model)``, not
  ``mlflow.register_model``: MLflow 3 refuses ``runs:/`` URIs of plain checkpoint dirs (no ``MLmodel``).
* Registration is idempotent by ``build_key`` (the packed artifact's key): a retried or re-run flow finds the
  version it already made instead of piling up duplicates, while a different build gets a new version.
  ``build_key`` is passed inside ``create_model_version`` itself, so a crash can never leave an untagged
  version; alias updates are completed on the next call if a crash interrupted them (``register_status``).
* Promotion uses aliases (``candidate`` = newest build, ``champion`` = gated best), never the deprecated
  stages. The champion only moves when the gate passes *and* the new build is not worse than the current
  champion (lower or equal ``ppl``), so a nightly rebuild that regressed cannot silently replace a good
  model; :func:`promote` is the manual override.
* Lookups are one ``search_model_versions`` call with a tag filter (plus one call to resolve aliases), never a
  scan, so services can resolve "champion W4 build of model X" quickly.
* Versions are normalised to ``str`` (sqlite stores return ``int``, the REST client ``str``).

Tags on every version (set by :func:`register_build`; ``lookup`` reads the first four, which the caller must
pass in ``tags``):

==================  ===========================================================================
``base_model``      base model id, e.g. ``HuggingFaceTB/SmolLM2-135M-Instruct``   (``lookup(model=)``)
``base_revision``   base model revision / commit                                 (``lookup(revision=)``)
``recipe``          recipe name, e.g. ``gptq-w4g64``                              (``lookup(recipe=)``)
``bits``            weight bit-width as a decimal string, e.g. ``"4"``             (``lookup(bits=)``)
``key.<stage>``     lineage: ``<stage>/<64-hex key>`` of every upstream artifact   (``lineage_tags``)
``build_key``       key of the packed artifact; the idempotency key
``metric.<name>``   every metric passed to ``register_build`` (``repr(float)``)
``gate``            ``passed`` | ``failed`` | ``none`` (no gate given); ``gate_reason`` says why
``promotion``       what happened to ``champion`` for this build and why
``register_status`` ``complete`` once aliases were applied
==================  ===========================================================================
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from pydantic import BaseModel, ConfigDict, Field, computed_field, field_validator

from infra.errors import ConfigError
from infra.settings import Settings, get_settings
from registry._sanitize import MAX_MODEL_TAG_LENGTH, clean_key, is_secret_key, one_line, truncate
from registry.errors import RegistryError, RegistryNotFoundError
from registry.tracking import get_client

__all__ = [
    "ALIAS_CANDIDATE",
    "ALIAS_CHAMPION",
    "LINEAGE_PREFIX",
    "METRIC_PREFIX",
    "TAG_BASE_MODEL",
    "TAG_BASE_REVISION",
    "TAG_BITS",
    "TAG_BUILD_KEY",
    "TAG_GATE",
    "TAG_GATE_REASON",
    "TAG_PROMOTION",
    "TAG_RECIPE",
    "TAG_RECIPE_DIGEST",
    "TAG_STATUS",
    "ModelVersionInfo",
    "PromotionGate",
    "demote",
    "describe_version",
    "download_version",
    "lineage_tags",
    "list_versions",
    "lookup",
    "promote",
    "register_build",
    "registry_name",
    "show",
    "validate_registry_name",
]

log = logging.getLogger(__name__)

ALIAS_CANDIDATE = "candidate"
ALIAS_CHAMPION = "champion"
TAG_BASE_MODEL = "base_model"
TAG_BASE_REVISION = "base_revision"
TAG_RECIPE = "recipe"
TAG_RECIPE_DIGEST = "recipe_digest"
TAG_BITS = "bits"
TAG_BUILD_KEY = "build_key"
TAG_GATE = "gate"
TAG_GATE_REASON = "gate_reason"
TAG_PROMOTION = "promotion"
TAG_STATUS = "register_status"
TAG_EVAL_PROTOCOL = "eval_protocol"  # digest of the evaluation settings: ppl only compares within one
METRIC_PREFIX = "metric."
LINEAGE_PREFIX = "key."
_LOOKUP_TAGS = (TAG_BASE_MODEL, TAG_BASE_REVISION, TAG_RECIPE, TAG_BITS)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_MAX_NAME = 200
_ALIAS_RE = re.compile(r"^[A-Za-z0-9_-]{1,255}$")
_RESERVED_ALIAS = re.compile(r"^([vV]\d+|latest)$")
# Values that go into a search filter string inside single quotes: no quotes, backslashes or control chars.
_FILTER_VALUE_RE = re.compile(r"^[^'\"\\\x00-\x1f]{1,500}$")
_NOT_FOUND_CODES = {"RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "ENDPOINT_NOT_FOUND"}


# --------------------------------------------------------------------------------------------------- names
def validate_registry_name(name: str) -> str:
    """Return ``name`` if it is a safe ``<model>.<recipe>`` registry name, else raise :class:`ConfigError`.

    Allowed: ``[A-Za-z0-9._-]``, starting with a letter or digit, containing a ``.``, no ``..``, at most
    200 characters. The name becomes part of ``models:/`` URIs and download paths, so no ``/`` either.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"invalid registry name {name!r}: expected '<model>.<recipe>'")
    if len(name) > _MAX_NAME:
        raise ConfigError(f"invalid registry name {name[:40]!r}...: longer than {_MAX_NAME} characters")
    if not _NAME_RE.match(name) or ".." in name:
        raise ConfigError(
            f"invalid registry name {name!r}: use only letters, digits, '.', '_' and '-' "
            "(no '/', no '..', first character a letter or digit)"
        )
    if "." not in name.strip("."):
        raise ConfigError(f"invalid registry name {name!r}: expected '<model>.<recipe>' (no '.' found)")
    return name


def registry_name(model_name: str, recipe_name: str) -> str:
    """``<model>.<recipe>``, e.g. ``SmolLM2-135M-Instruct.gptq-w4g64``.

    Only the last path component of ``model_name`` is used (hub ids ``org/name`` and local paths become
    ``name``), matching the names people type; the full id is kept in the ``base_model`` tag.
    """
    base = str(model_name).rstrip("/").rsplit("/", 1)[-1]
    return validate_registry_name(f"{base}.{recipe_name}")


def _validate_alias(alias: str) -> str:
    if not isinstance(alias, str) or not _ALIAS_RE.match(alias) or _RESERVED_ALIAS.match(alias):
        raise ConfigError(f"invalid alias {alias!r}: use letters, digits, '_' and '-' (not 'latest' or 'v<number>')")
    return alias


def _filter_value(field: str, value: str) -> str:
    if not _FILTER_VALUE_RE.match(value):
        raise ConfigError(f"invalid {field} {value!r}: quotes, backslashes and control characters are not allowed")
    return value


# --------------------------------------------------------------------------------------------------- models
class PromotionGate(BaseModel):
    """Conditions a build must meet before it may become ``champion``.

    Reads ``metrics["ppl"]`` (quantized perplexity) and ``metrics["ppl_fp"]`` (full-precision baseline).
    A gate with no limit set passes with reason ``"no gate"``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_ppl_increase: float | None = Field(
        default=None, ge=0, description="Max relative ppl increase over full precision, e.g. 0.2 = +20 %."
    )
    max_ppl: float | None = Field(default=None, gt=0, description="Max absolute perplexity of the build.")

    def evaluate(self, metrics: Mapping[str, float]) -> tuple[bool, str]:
        """``(passed, one-line reason)``; a missing or non-finite metric that a limit needs fails the gate."""
        if self.max_ppl is None and self.max_ppl_increase is None:
            return True, "no gate"
        ppl = _finite(metrics.get("ppl"))
        if ppl is None:
            return False, "metric 'ppl' missing or not finite"
        reasons: list[str] = []
        if self.max_ppl is not None:
            if ppl > self.max_ppl:
                return False, f"ppl {ppl:.4g} > max_ppl {self.max_ppl:.4g}"
            reasons.append(f"ppl {ppl:.4g} <= max_ppl {self.max_ppl:.4g}")
        if self.max_ppl_increase is not None:
            ppl_fp = _finite(metrics.get("ppl_fp"))
            if ppl_fp is None or ppl_fp <= 0:
                return False, "metric 'ppl_fp' missing or not positive (needed by max_ppl_increase)"
            increase = ppl / ppl_fp - 1.0
            if increase > self.max_ppl_increase:
                return False, (
                    f"ppl {ppl:.4g} is {increase:+.1%} over fp {ppl_fp:.4g} (max {self.max_ppl_increase:+.1%})"
                )
            reasons.append(f"{increase:+.1%} over fp {ppl_fp:.4g} <= {self.max_ppl_increase:+.1%}")
        return True, "; ".join(reasons)


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


class ModelVersionInfo(BaseModel):
    """One registered model version, independent of the MLflow client version and backend."""

    model_config = ConfigDict(frozen=True)

    name: str
    version: str
    source: str
    run_id: str | None = None
    aliases: list[str] = Field(default_factory=list)
    tags: dict[str, str] = Field(default_factory=dict)
    creation_timestamp: int | None = None
    description: str = ""

    @field_validator("version", mode="before")
    @classmethod
    def _version_str(cls, value: Any) -> str:
        return str(value)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    @property
    def metrics(self) -> dict[str, float]:
        """The ``metric.<name>`` tags parsed back to floats."""
        out: dict[str, float] = {}
        for key, value in self.tags.items():
            if key.startswith(METRIC_PREFIX):
                number = _finite(value)
                out[key[len(METRIC_PREFIX) :]] = number if number is not None else float("nan")
        return out

    @property
    def lineage(self) -> dict[str, str]:
        """The ``key.<stage>`` tags (stage artifact refs)."""
        return {k: v for k, v in self.tags.items() if k.startswith(LINEAGE_PREFIX)}


def _info(mv: ModelVersion, aliases: Iterable[str] = ()) -> ModelVersionInfo:
    return ModelVersionInfo(
        name=mv.name,
        version=str(mv.version),
        source=mv.source or "",
        run_id=mv.run_id or None,
        aliases=sorted(set(mv.aliases or ()) | set(aliases)),
        tags=dict(mv.tags or {}),
        creation_timestamp=mv.creation_timestamp,
        description=mv.description or "",
    )


# --------------------------------------------------------------------------------------------------- helpers
def _client(settings: Settings | None) -> MlflowClient:
    return get_client(settings)


def _is_not_found(exc: MlflowException) -> bool:
    # A missing alias is INVALID_PARAMETER_VALUE "... alias x not found" on sqlite stores.
    return exc.error_code in _NOT_FOUND_CODES or "not found" in str(exc.message).lower()


def _mlflow_error(action: str, exc: MlflowException) -> RegistryError:
    # MLflow's text repeats the request URL, user:password@ of the tracking URI included: redacted before the cut.
    text = one_line(str(exc.message), 300)
    if _is_not_found(exc):
        return RegistryNotFoundError(f"{action}: {text}")
    return RegistryError(f"{action}: {text}")


def _aliases_by_version(client: MlflowClient, name: str) -> dict[str, list[str]]:
    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if _is_not_found(exc):
            return {}
        raise _mlflow_error(f"cannot read registered model {name!r}", exc) from exc
    return _invert_aliases(model.aliases or {})


def _invert_aliases(aliases: Mapping[str, Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for alias, version in aliases.items():
        out.setdefault(str(version), []).append(alias)
    return out


def _with_aliases(client: MlflowClient, versions: list[ModelVersion]) -> list[ModelVersionInfo]:
    """Search results from sqlite stores carry no aliases: fill them in, one call per registered model."""
    by_name: dict[str, dict[str, list[str]]] = {}
    out = []
    for mv in versions:
        if mv.name not in by_name:
            by_name[mv.name] = _aliases_by_version(client, mv.name)
        out.append(_info(mv, by_name[mv.name].get(str(mv.version), ())))
    return out


def _search(client: MlflowClient, filter_string: str, *, max_results: int | None = None) -> list[ModelVersion]:
    """All versions matching ``filter_string``, newest first (following pages unless ``max_results``)."""
    order = ["creation_timestamp DESC", "version_number DESC"]
    out: list[ModelVersion] = []
    token: str | None = None
    try:
        while True:
            page = client.search_model_versions(
                filter_string, max_results=max_results or 1000, order_by=order, page_token=token
            )
            out.extend(page)
            token = page.token
            if max_results is not None or not token:
                return out
    except MlflowException as exc:
        raise _mlflow_error(f"model version search {filter_string!r} failed", exc) from exc


def _get_version(client: MlflowClient, name: str, version_or_alias: str | int) -> ModelVersion:
    validate_registry_name(name)
    ref = str(version_or_alias)
    try:
        if ref.isdigit():
            return client.get_model_version(name, ref)
        return client.get_model_version_by_alias(name, _validate_alias(ref))
    except MlflowException as exc:
        if _is_not_found(exc):
            what = f"version {ref}" if ref.isdigit() else f"alias {ref!r}"
            raise RegistryNotFoundError(
                f"registered model {name!r} has no {what} (see `quantpipe registry list {name}`)"
            ) from exc
        raise _mlflow_error(f"cannot read {name!r} {ref}", exc) from exc


def _version_tags(
    tags: Mapping[str, Any], metrics: Mapping[str, float], build_key: str, gate: str, reason: str
) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in tags.items():
        if not is_secret_key(key):  # defensive, as for run params: registry tags are widely readable
            out[clean_key(key)] = truncate(str(value), MAX_MODEL_TAG_LENGTH)
    for key, value in metrics.items():
        out[clean_key(f"{METRIC_PREFIX}{key}")] = repr(float(value))
    out[TAG_BUILD_KEY] = build_key
    out[TAG_GATE] = gate
    out[TAG_GATE_REASON] = truncate(reason, MAX_MODEL_TAG_LENGTH)
    return out


def _champion_decision(
    client: MlflowClient,
    name: str,
    version: str,
    metrics: Mapping[str, float],
    gate_passed: bool,
    gated: bool,
    protocol: str | None = None,
) -> tuple[bool, str]:
    """Whether ``version`` becomes champion: gate given and passed, evaluated with the champion's protocol
    (``eval_protocol`` tag) and not worse than the current champion.

    "Worse" compares ``ppl`` (lower is better; equal moves, so a rebuild of the same quality takes over).
    A champion without a ``metric.ppl`` tag is replaced; a new build without ``ppl`` never replaces one that
    has it (it cannot be shown to be at least as good).
    """
    if not gated:
        return False, "no gate given: champion unchanged (pass a PromotionGate to enable promotion)"
    if not gate_passed:
        return False, "gate failed: champion unchanged"
    try:
        current = client.get_model_version_by_alias(name, ALIAS_CHAMPION)
    except MlflowException as exc:
        if not _is_not_found(exc):
            raise _mlflow_error(f"cannot read champion of {name!r}", exc) from exc
        return True, "gate passed; first champion"
    if str(current.version) == version:
        return True, "already champion"
    theirs = (current.tags or {}).get(TAG_EVAL_PROTOCOL)
    if protocol is not None and theirs is not None and theirs != protocol:
        return False, (
            f"gate passed but champion v{current.version} was evaluated with another protocol ({theirs} vs "
            f"{protocol}): perplexities not comparable, champion kept (promote by hand if intended)"
        )
    old = _finite((current.tags or {}).get(f"{METRIC_PREFIX}ppl"))
    new = _finite(metrics.get("ppl"))
    if old is None:
        return True, f"gate passed; previous champion v{current.version} has no ppl"
    if new is None:
        return False, f"gate passed but no ppl to compare with champion v{current.version} (ppl {old:.4g})"
    if new <= old:
        return True, f"gate passed; ppl {new:.4g} <= champion v{current.version} ppl {old:.4g}"
    return False, f"gate passed but ppl {new:.4g} > champion v{current.version} ppl {old:.4g}: champion kept"


def _finish(
    client: MlflowClient, mv: ModelVersion, metrics: Mapping[str, float], gate_passed: bool, gated: bool
) -> None:
    """Apply aliases for a freshly created (or crash-interrupted) version, then mark it complete."""
    name, version = mv.name, str(mv.version)
    try:
        client.set_registered_model_alias(name, ALIAS_CANDIDATE, version)
        protocol = (mv.tags or {}).get(TAG_EVAL_PROTOCOL)
        promote_it, why = _champion_decision(client, name, version, metrics, gate_passed, gated, protocol)
        if promote_it:
            client.set_registered_model_alias(name, ALIAS_CHAMPION, version)
        client.set_model_version_tag(name, version, TAG_PROMOTION, truncate(why, MAX_MODEL_TAG_LENGTH))
        client.set_model_version_tag(name, version, TAG_STATUS, "complete")
    except MlflowException as exc:
        raise _mlflow_error(f"cannot set aliases of {name!r} version {version}", exc) from exc
    log.info("registered %s version %s (%s)", name, version, why)


_GENERIC_DESCRIPTION = "quantpipe builds (see version tags for lineage)"  # what older registrations wrote


def _ensure_registered_model(client: MlflowClient, name: str, description: str | None = None) -> None:
    """Create ``name`` with ``description``; an existing model whose description is empty or the old generic
    line gets ``description`` (one a person wrote is kept)."""
    try:
        model = client.get_registered_model(name)
        if description and (model.description or "").strip() in ("", _GENERIC_DESCRIPTION):
            client.update_registered_model(name, description=description)
        return
    except MlflowException as exc:
        if not _is_not_found(exc):
            raise _mlflow_error(f"cannot read registered model {name!r}", exc) from exc
    try:
        client.create_registered_model(name, description=description or _GENERIC_DESCRIPTION)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":  # lost a creation race: fine
            raise _mlflow_error(f"cannot create registered model {name!r}", exc) from exc


# --------------------------------------------------------------------------------------------------- public
def register_build(
    name: str,
    checkpoint_dir: Path,
    *,
    run_id: str,
    tags: Mapping[str, str],
    metrics: Mapping[str, float],
    build_key: str,
    gate: PromotionGate | None,
    settings: Settings | None = None,
    model_description: str | None = None,
) -> ModelVersionInfo:
    """Register the packed checkpoint in ``checkpoint_dir`` as a new version of ``name`` (idempotent).

    ``run_id`` becomes the version's source run (the flow's parent run, so the MLflow UI links the version to
    the run holding the build's metrics and plots); ``model_description`` is the registered model's description
    (:func:`registry.card.registered_model_description`); the version's card is set afterwards with
    :func:`describe_version`, once its number is known.

    Uploads the directory to ``run_id``'s artifacts under ``model/``, creates the version with all
    ``tags``, ``build_key``, ``metric.<name>`` and gate tags, moves ``candidate`` to it, and moves ``champion``
    to it when the gate passes and it is not worse than the current champion (``gate=None`` never promotes).
    If a version of ``name`` already carries this ``build_key``, that version is returned and nothing is
    uploaded.
    """
    validate_registry_name(name)
    build_key = _filter_value("build_key", str(build_key))
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise RegistryNotFoundError(f"checkpoint directory {checkpoint_dir} does not exist")
    missing = [t for t in _LOOKUP_TAGS if t not in tags]
    if missing:
        log.warning("registering %s without tags %s: lookup() cannot find it by those", name, missing)
    client = _client(settings)
    by_key = f"name = '{name}' and tags.{TAG_BUILD_KEY} = '{build_key}'"

    existing = _search(client, by_key)
    if existing:
        mv = min(existing, key=lambda v: int(v.version))  # the first one wins if a race made two
        if model_description:
            _ensure_registered_model(client, name, model_description)
        if (mv.tags or {}).get(TAG_STATUS) != "complete":
            passed = (mv.tags or {}).get(TAG_GATE) == "passed"
            _finish(client, mv, metrics, passed, (mv.tags or {}).get(TAG_GATE) != "none")
            mv = client.get_model_version(name, str(mv.version))
        return _with_aliases(client, [mv])[0]

    if gate is None:
        gate_passed, gate_tag, reason = False, "none", "no gate given"
    else:
        gate_passed, reason = gate.evaluate(metrics)
        gate_tag = "passed" if gate_passed else "failed"

    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise _mlflow_error(f"cannot register {name!r}: MLflow run {run_id!r}", exc) from exc
    try:
        client.log_artifacts(run_id, str(checkpoint_dir), artifact_path="model")
    except (MlflowException, OSError) as exc:
        raise RegistryError(f"cannot upload {checkpoint_dir} to run {run_id}: {exc}") from exc
    _ensure_registered_model(client, name, model_description)
    source = f"{run.info.artifact_uri.rstrip('/')}/model"
    version_tags = _version_tags(tags, metrics, build_key, gate_tag, reason)
    try:
        mv = client.create_model_version(name, source=source, run_id=run_id, tags=version_tags)
    except MlflowException as exc:
        raise _mlflow_error(f"cannot create a version of {name!r}", exc) from exc

    # Two concurrent registrations of one build both pass the first search; keep the lowest version.
    same = _search(client, by_key)
    keeper = min(same, key=lambda v: int(v.version)) if same else mv
    if str(keeper.version) != str(mv.version):
        client.delete_model_version(name, str(mv.version))
        return _with_aliases(client, [keeper])[0]

    _finish(client, mv, metrics, gate_passed, gate is not None)
    return show(name, str(mv.version), settings=settings)


def describe_version(
    name: str, version: str | int, markdown: str, *, settings: Settings | None = None
) -> ModelVersionInfo:
    """Set a version's description (its model card, :mod:`registry.card`), redacted."""
    from infra.redact import redact

    client = _client(settings)
    mv = _get_version(client, name, version)
    try:
        client.update_model_version(name, str(mv.version), description=redact(markdown))
    except MlflowException as exc:
        raise _mlflow_error(f"cannot describe {name!r} version {mv.version}", exc) from exc
    return show(name, str(mv.version), settings=settings)


def lookup(
    *,
    model: str | None = None,
    revision: str | None = None,
    recipe: str | None = None,
    bits: int | None = None,
    alias: str | None = None,
    name: str | None = None,
    settings: Settings | None = None,
    recipe_digest: str | None = None,
) -> ModelVersionInfo | None:
    """Newest version matching every given criterion, or ``None``.

    ``model``/``revision``/``recipe``/``bits`` match the version tags ``base_model``/``base_revision``/
    ``recipe``/``bits`` (and ``recipe_digest`` the ``recipe_digest`` tag that ``tasks.register`` writes, so a
    recipe edited under the same name is told apart); ``name`` the registered model name. With ``alias``
    (e.g. ``"champion"``) only the version holding that alias qualifies: with ``name`` it is read directly,
    without ``name`` the newest tag-matching version that holds the alias in its registered model wins. One
    search call plus one call per registered model in the result.
    """
    criteria = {
        TAG_BASE_MODEL: model,
        TAG_BASE_REVISION: revision,
        TAG_RECIPE: recipe,
        TAG_BITS: None if bits is None else str(int(bits)),
        TAG_RECIPE_DIGEST: recipe_digest,
    }
    wanted = {k: _filter_value(k, str(v)) for k, v in criteria.items() if v is not None}
    if name is not None:
        validate_registry_name(name)
    if alias is not None:
        _validate_alias(alias)
    if not wanted and name is None:
        raise ConfigError("lookup needs at least one of model, revision, recipe, bits or name")
    client = _client(settings)

    if alias is not None and name is not None:
        try:
            mv = client.get_model_version_by_alias(name, alias)
        except MlflowException as exc:
            if _is_not_found(exc):
                return None
            raise _mlflow_error(f"cannot read {name!r}@{alias}", exc) from exc
        if any((mv.tags or {}).get(k) != v for k, v in wanted.items()):
            return None
        return _with_aliases(client, [mv])[0]

    clauses = [f"tags.{k} = '{v}'" for k, v in wanted.items()]
    if name is not None:
        clauses.insert(0, f"name = '{name}'")
    found = _search(client, " and ".join(clauses), max_results=None if alias else 1)
    if alias is None:
        return _with_aliases(client, found[:1])[0] if found else None
    for info in _with_aliases(client, found):
        if alias in info.aliases:
            return info
    return None


def list_versions(name: str | None = None, *, settings: Settings | None = None) -> list[ModelVersionInfo]:
    """All versions (of ``name``, or of every registered model), sorted by name, newest version first."""
    client = _client(settings)
    if name is not None:
        validate_registry_name(name)
        found = _search(client, f"name = '{name}'")
    else:
        found = _search(client, "")
    infos = _with_aliases(client, found)
    return sorted(infos, key=lambda i: (i.name, -int(i.version) if i.version.isdigit() else 0))


def show(name: str, version: str | int, *, settings: Settings | None = None) -> ModelVersionInfo:
    """One version by number (``"3"``) or alias (``"champion"``); raises RegistryNotFoundError if missing."""
    client = _client(settings)
    mv = _get_version(client, name, version)
    return _with_aliases(client, [mv])[0]


def promote(
    name: str, version: str | int, alias: str = ALIAS_CHAMPION, *, settings: Settings | None = None
) -> ModelVersionInfo:
    """Point ``alias`` at ``version`` (manual override of the automatic champion rule)."""
    _validate_alias(alias)
    client = _client(settings)
    mv = _get_version(client, name, version)
    try:
        client.set_registered_model_alias(name, alias, str(mv.version))
    except MlflowException as exc:
        raise _mlflow_error(f"cannot set alias {alias!r} of {name!r}", exc) from exc
    return show(name, str(mv.version), settings=settings)


def demote(name: str, alias: str = ALIAS_CHAMPION, *, settings: Settings | None = None) -> bool:
    """Remove ``alias`` from ``name``; ``False`` when it was not set. Raises if ``name`` does not exist."""
    validate_registry_name(name)
    _validate_alias(alias)
    client = _client(settings)
    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if _is_not_found(exc):
            raise RegistryNotFoundError(f"registered model {name!r} does not exist") from exc
        raise _mlflow_error(f"cannot read registered model {name!r}", exc) from exc
    if alias not in (model.aliases or {}):
        return False
    try:
        client.delete_registered_model_alias(name, alias)
    except MlflowException as exc:
        raise _mlflow_error(f"cannot remove alias {alias!r} of {name!r}", exc) from exc
    return True


def lineage_tags(name: str, version: str | int, *, settings: Settings | None = None) -> dict[str, str]:
    """``key.<stage>`` tags of a version: the artifact refs (``<stage>/<key>``) it was built from."""
    return show(name, version, settings=settings).lineage


def download_version(name: str, version_or_alias: str | int, dest: Path, *, settings: Settings | None = None) -> Path:
    """Download a version's checkpoint files into ``dest`` and return the directory holding them.

    Downloads from the version's ``source`` URI with explicit tracking/registry URIs: resolving
    ``models:/name/version`` inside MLflow consults the process-global registry URI instead.
    """
    import mlflow.artifacts

    info = show(name, version_or_alias, settings=settings)
    uri = (settings if settings is not None else get_settings()).effective_mlflow_uri
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        path = mlflow.artifacts.download_artifacts(
            artifact_uri=info.source, dst_path=str(dest), tracking_uri=uri, registry_uri=uri
        )
    except MlflowException as exc:
        raise _mlflow_error(f"cannot download {info.uri} from {info.source}", exc) from exc
    except OSError as exc:
        raise RegistryError(f"cannot download {info.uri} from {info.source}: {exc}") from exc
    return Path(path)
