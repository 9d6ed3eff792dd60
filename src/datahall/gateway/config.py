"""``gateway.yaml``: the gateway's configuration, validated with pydantic, errors at their line.

The schema (:class:`GatewayConfig`) covers what issue 6 lists and brief ``ai-gateway.md`` §2
describes: listeners; backends (URL, pool, weight, priority, the API they speak, the models and
LoRA adapters they serve, the key to send them); model aliases → pools (``gpt-4o``, ``llama-3``,
``claude-sonnet``); the routing policy and its scorer weights and ORCA settings (§2.1–2.3); the
semantic cache (§2.4; ``min_cosine_similarity`` is a similarity, never a distance: §7.1); prompt
transforms and token rate limits per API key and tenant (§2.5); size limits, TTFT and total
timeouts, retries, a circuit breaker, health checks, and the Redis that replicas share.

:func:`load_config` reads a file and turns every problem into one line that names the file, the
line and the setting, e.g. ``gateway.yaml:12: backends[1].url: ...``: pydantic's error
locations are mapped back to YAML line numbers through the nodes that ``yaml.compose`` builds.

>>> config = parse_config('''
... backends:
...   - url: http://127.0.0.1:8001
...     pool: local
... aliases:
...   llama-3: {pool: local, model: smollm2}
... ''')
>>> config.backends[0].name, config.alias_targets()["llama-3"]
('127.0.0.1:8001', ModelTarget(pool='local', model='smollm2'))
>>> parse_config('''
... backends:
...   - url: ftp://127.0.0.1:8001
... ''')
Traceback (most recent call last):
...
datahall.gateway.config.ConfigError: gateway.yaml:3: backends[0].url: must be an http:// or https:// URL with a host, like http://127.0.0.1:8000 (got 'ftp://127.0.0.1:8001')
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from datahall.core.config import (
    DEFER_CROSS_CHECKS,
    ConfigIssue,
    compose_yaml,
    read_text,
    validate_at_lines,
)
from datahall.core.config import ConfigError as CoreConfigError
from datahall.core.config import did_you_mean as _did_you_mean
from datahall.core.config import yaml_path as _path
from datahall.gateway.ratelimit import RateLimit, SizeLimits
from datahall.gateway.routing import PROFILES
from datahall.gateway.transform import (
    PII_KINDS,
    ModelTarget,
    Redactor,
    TemplateError,
    compile_template,
)
from datahall.gateway.wrr import WrrConfig

__all__ = [
    "EXAMPLE_CONFIG",
    "ROUTING_POLICIES",
    "ApiKey",
    "Backend",
    "CircuitBreakerSettings",
    "ConfigError",
    "ConfigIssue",
    "GatewayConfig",
    "GuardSettings",
    "HealthCheckSettings",
    "Listener",
    "ModelAlias",
    "OrcaSettings",
    "PromptTemplate",
    "RateLimitSettings",
    "RedactionSettings",
    "RetrySettings",
    "RoutingSettings",
    "ScorerWeights",
    "SemanticCacheSettings",
    "SizeLimitSettings",
    "SystemPromptSettings",
    "Tenant",
    "Timeouts",
    "TransformsConfig",
    "load_config",
    "parse_config",
]

EXAMPLE_CONFIG = Path(__file__).parent / "data" / "gateway.example.yaml"
"""A commented example that validates; copy it as a starting point."""

ROUTING_POLICIES: tuple[str, ...] = tuple(PROFILES)
"""Routing policy names ``routing.policy`` accepts: the presets of
:data:`datahall.gateway.routing.PROFILES` (issue 6, item 3; brief §2.3). ``scorer_weights`` and
``imbalance_threshold`` tune the scorer presets (``prefix-load``, ``kv-aware``), and ``orca``
the ``orca-wrr`` picker."""

_DEFER = DEFER_CROSS_CHECKS  # validation context flag: load_config runs them itself


class _Section(BaseModel):
    # a misspelt key is an error, never silently a default
    model_config = ConfigDict(extra="forbid")


def _regex(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"not a valid regular expression: {e}") from None
    return pattern


def _template(source: str) -> str:
    try:
        compile_template(source, name="template")
    except TemplateError as e:
        raise ValueError(str(e).replace("template 'template' ", "template ")) from None
    return source


def _env_name(name: str | None) -> str | None:
    if name is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ValueError(f"{name!r} is not an environment variable name")
    return name


def _redis_url(url: str | None) -> str | None:
    if url is not None and urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"must be a redis://, rediss:// or unix:// URL (got {url!r})")
    return url


RedisUrl = Annotated[str | None, AfterValidator(_redis_url)]


Regex = Annotated[str, AfterValidator(_regex)]
TemplateText = Annotated[str, AfterValidator(_template)]
EnvName = Annotated[str | None, AfterValidator(_env_name)]


# --- listeners and backends -------------------------------------------------------------------


class Listener(_Section):
    """An address the gateway serves on."""

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)


class Backend(_Section):
    """One model server. `url` is its root: the gateway appends ``/v1/chat/completions``
    (``api: openai``) or ``/v1/messages`` (``api: anthropic``). Pools group backends that serve
    the same models; within a pool, lower `priority` is preferred and the next priority serves
    only when all better ones are down; `weight` biases the pick among equals."""

    name: str | None = None
    """Shown in metrics and logs; defaults to the URL's host:port."""
    url: str
    pool: str = "default"
    weight: float = Field(1.0, gt=0)
    priority: int = Field(0, ge=0)
    api: Literal["openai", "anthropic"] = "openai"
    models: list[str] = Field(default_factory=list)
    """Model names it serves ([]: whatever the request names, after alias rewriting)."""
    adapters: list[str] = Field(default_factory=list)
    """LoRA adapters it can load (for LoRA affinity)."""
    api_key: str | None = None
    """Key sent upstream (``Authorization: Bearer`` or Anthropic's ``x-api-key``)."""
    api_key_env: EnvName = None
    """Environment variable holding that key (keeps secrets out of the file)."""
    headers: dict[str, str] = Field(default_factory=dict)
    metrics_path: str | None = "/metrics"
    """Prometheus endpoint scraped when the backend sends no ORCA reports (None: no scrape)."""

    @field_validator("url")
    @classmethod
    def _url(cls, url: str) -> str:
        parts = urlsplit(url)
        try:
            parts.port  # noqa: B018 -- raises for a port that is not a number
        except ValueError:
            parts = parts._replace(netloc="")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                "must be an http:// or https:// URL with a host, like http://127.0.0.1:8000 "
                f"(got {url!r})"
            )
        if parts.path.rstrip("/").endswith("/v1"):
            raise ValueError(
                f"give the server's root without /v1 (the gateway adds /v1/...): "
                f"{url[: url.rstrip('/').rfind('/v1')] or url!r}"
            )
        return url.rstrip("/")

    @model_validator(mode="after")
    def _one_key(self) -> Backend:
        if self.api_key is not None and self.api_key_env is not None:
            raise ValueError("give api_key or api_key_env, not both")
        return self

    def resolved_api_key(self, environ: Mapping[str, str] = os.environ) -> str | None:
        """The key to send: `api_key`, or the value of `api_key_env` (an error if it is unset)."""
        if self.api_key_env is None:
            return self.api_key
        if self.api_key_env not in environ:
            raise ConfigError(
                [
                    ConfigIssue(
                        0, f"backends.{self.name}.api_key_env", f"${self.api_key_env} is not set"
                    )
                ]
            )
        return environ[self.api_key_env]


class ModelAlias(_Section):
    """Where a public model name goes: a pool, and the name its backends know (None: the
    alias itself). A bare string in YAML is the pool."""

    pool: str
    model: str | None = None


# --- routing ----------------------------------------------------------------------------------


class ScorerWeights(_Section):
    """Weights of GIE's scorers (brief §2.3; the typical setting is queue 1, KV cache 1,
    prefix 3), and of LoRA affinity, 1 as in :data:`~datahall.gateway.routing.PROFILES`
    (a request without an adapter scores the same everywhere, so it only steers adapters).
    A weight of 0 turns a scorer off."""

    queue: float = Field(1.0, ge=0)
    kv_cache: float = Field(1.0, ge=0)
    prefix: float = Field(3.0, ge=0)
    lora: float = Field(1.0, ge=0)


class OrcaSettings(_Section):
    """ORCA ingestion and weighted round robin (brief §2.1–2.2; gRFC A58 defaults)."""

    request_format: Literal["text", "json"] = "text"
    """Sent as ``endpoint-load-metrics-format`` on every upstream request."""
    blackout_period_s: float = Field(10.0, ge=0)
    weight_expiration_period_s: float = Field(180.0, gt=0)
    weight_update_period_s: float = Field(1.0, gt=0)
    error_utilization_penalty: float = Field(1.0, ge=0)
    metric_names_for_computing_utilization: list[str] = Field(default_factory=list)
    scrape_interval_s: float = Field(1.0, gt=0)
    """Prometheus scrape period for backends without ORCA."""

    @field_validator("metric_names_for_computing_utilization")
    @classmethod
    def _metric_names(cls, names: list[str]) -> list[str]:
        WrrConfig(metric_names_for_computing_utilization=tuple(names))  # names a bad one
        return names


class RoutingSettings(_Section):
    """The routing policy (one of :data:`ROUTING_POLICIES`) and its knobs."""

    policy: str = "prefix-load"
    scorer_weights: ScorerWeights = Field(default_factory=ScorerWeights)
    imbalance_threshold: int = Field(8, ge=0)
    """Load gate of ``prefix-load``, in requests (waiting + running): a backend more than this
    many requests busier than the least loaded candidate is dropped before the scorers run;
    cache affinity still chooses among the others (AIBrix's gate in filter form,
    :class:`~datahall.gateway.routing.LoadGapFilter`; brief §2.3, §7.4)."""
    session_header: str = "x-session-id"
    orca: OrcaSettings = Field(default_factory=OrcaSettings)

    @field_validator("policy")
    @classmethod
    def _policy(cls, name: str) -> str:
        if name not in ROUTING_POLICIES:
            raise ValueError(
                f"unknown routing policy {name!r}{_did_you_mean(name, ROUTING_POLICIES)}; "
                f"choose one of {', '.join(ROUTING_POLICIES)}"
            )
        return name


# --- cache and transforms ---------------------------------------------------------------------


class SemanticCacheSettings(_Section):
    """The response cache (brief §2.4); the fields after `redis_url` are those of
    :class:`datahall.gateway.semcache.CacheConfig`."""

    enabled: bool = False
    min_cosine_similarity: float = Field(0.90, gt=0, le=1)
    """A cosine *similarity*: higher is stricter (APIM's ``score-threshold`` is a distance)."""
    ttl_s: float | None = Field(3600.0, gt=0)
    max_entries: int = Field(10_000, ge=1)
    redis_url: RedisUrl = None
    """Shared tier; None uses the top-level ``redis_url`` (and none at all: process memory)."""
    semantic: bool = True
    embed: Literal["last_user", "all"] = "last_user"
    max_messages: int = Field(10, ge=1)
    allow_temperature: bool = False
    skip_digits: bool = False
    skip_time_sensitive: bool = True
    guard: bool = True
    """The polarity guard ("turn on" vs "turn off"; brief §7.2)."""

    def cache_config(self) -> Any:
        """The :class:`~datahall.gateway.semcache.CacheConfig` these settings describe."""
        from datahall.gateway.semcache import CacheConfig

        fields = self.model_dump(exclude={"enabled", "redis_url"})
        return CacheConfig(**fields)


class SystemPromptSettings(_Section):
    """The operator's system prompt: a sandboxed template (variables ``tenant``, ``model``,
    ``metadata``, ``variables``, ``system``) put in by `mode`."""

    text: TemplateText
    mode: Literal["prepend", "append", "replace", "decorate"] = "prepend"


class TemplateMessage(_Section):
    role: Literal["system", "user", "assistant"]
    content: TemplateText


class PromptTemplate(_Section):
    """A named template a request selects with ``"template": "<name>"`` and fills from its
    ``"variables"``; its messages go before the request's own."""

    description: str | None = None
    messages: list[TemplateMessage] = Field(min_length=1)


class RedactionSettings(_Section):
    """PII redaction of the texts `roles` speak (:class:`~datahall.gateway.transform.Redactor`)."""

    enabled: bool = False
    kinds: list[Literal[PII_KINDS]] = Field(default_factory=lambda: list(PII_KINDS))  # type: ignore[valid-type]
    extra: dict[str, Regex] = Field(default_factory=dict)
    """More rules, ``NAME: regex``, replaced with ``[NAME]``."""
    roles: list[str] = Field(default_factory=lambda: ["user"])

    @model_validator(mode="after")
    def _rules(self) -> RedactionSettings:
        Redactor(self.kinds, self.extra, self.roles)  # names and self-matching tokens
        return self


class GuardSettings(_Section):
    """Regex allow/deny rules (:class:`~datahall.gateway.transform.Guard`)."""

    deny: list[Regex] = Field(default_factory=list)
    allow: list[Regex] = Field(default_factory=list)
    roles: list[str] = Field(default_factory=lambda: ["user"])
    ignore_case: bool = True


class TransformsConfig(_Section):
    """Prompt transformation (brief §2.5), applied by
    :meth:`~datahall.gateway.transform.Transformer.from_config`."""

    templates: dict[str, PromptTemplate] = Field(default_factory=dict)
    system_prompt: SystemPromptSettings | None = None
    render_message_templates: bool = False
    """Render the texts of the client's messages as sandboxed templates too."""
    redaction: RedactionSettings = Field(default_factory=RedactionSettings)
    guard: GuardSettings = Field(default_factory=GuardSettings)


# --- keys, tenants and limits -----------------------------------------------------------------


class RateLimitSettings(_Section):
    """Per-minute budgets (:class:`~datahall.gateway.ratelimit.RateLimit`); unset is unlimited."""

    tokens_per_minute: int | None = Field(None, ge=1)
    requests_per_minute: int | None = Field(None, ge=1)

    def rate_limit(self) -> RateLimit:
        return RateLimit(self.tokens_per_minute, self.requests_per_minute)


class ApiKey(_Section):
    """A client key (sent as ``Authorization: Bearer`` or ``x-api-key``), its tenant and its
    own limit. With any key configured, requests without a known key get a 401."""

    name: str
    key: str | None = None
    key_env: EnvName = None
    tenant: str = "default"
    rate_limit: RateLimitSettings | None = None

    @model_validator(mode="after")
    def _one_key(self) -> ApiKey:
        if (self.key is None) == (self.key_env is None):
            raise ValueError("give exactly one of key (the secret) or key_env (its variable)")
        return self


class Tenant(_Section):
    rate_limit: RateLimitSettings | None = None


class SizeLimitSettings(_Section):
    """Request size limits (:class:`~datahall.gateway.ratelimit.SizeLimits`); null: no limit."""

    max_body_bytes: int | None = Field(8 * 1024 * 1024, ge=1)
    max_messages: int | None = Field(1024, ge=1)
    max_prompt_tokens: int | None = Field(None, ge=1)

    def size_limits(self) -> SizeLimits:
        return SizeLimits(self.max_body_bytes, self.max_messages, self.max_prompt_tokens)


class Timeouts(_Section):
    """Upstream timeouts: to connect, to the first token (TTFT), and for the whole answer."""

    connect_s: float = Field(5.0, gt=0)
    ttft_s: float = Field(60.0, gt=0)
    total_s: float = Field(600.0, gt=0)

    @model_validator(mode="after")
    def _order(self) -> Timeouts:
        if self.ttft_s > self.total_s:
            raise ValueError(f"ttft_s ({self.ttft_s}) cannot exceed total_s ({self.total_s})")
        return self


class RetrySettings(_Section):
    """Retries on another backend, only before the first byte reached the client (§2.5)."""

    attempts: int = Field(2, ge=1)
    """Tries in all, the first included (1: never retry)."""
    backoff_s: float = Field(0.05, ge=0)
    on_status: list[Annotated[int, Field(ge=400, le=599)]] = Field(
        default_factory=lambda: [429, 502, 503, 504]
    )


class CircuitBreakerSettings(_Section):
    failure_threshold: int = Field(5, ge=1)
    open_s: float = Field(30.0, gt=0)
    honour_retry_after: bool = True
    """An upstream 429/503 with ``Retry-After`` opens the breaker for that long (§2.6.6)."""


class HealthCheckSettings(_Section):
    enabled: bool = True
    path: str = "/health"
    interval_s: float = Field(5.0, gt=0)
    timeout_s: float = Field(2.0, gt=0)
    unhealthy_threshold: int = Field(3, ge=1)
    healthy_threshold: int = Field(1, ge=1)


# --- the whole file -------------------------------------------------------------------------


class GatewayConfig(_Section):
    """The whole ``gateway.yaml``. Only ``backends`` is required; top-level keys starting with
    ``x-`` are ignored by :func:`parse_config`, so they can hold YAML anchors."""

    listeners: list[Listener] = Field(default_factory=lambda: [Listener()], min_length=1)
    backends: list[Backend] = Field(min_length=1)
    aliases: dict[str, ModelAlias] = Field(default_factory=dict)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    semantic_cache: SemanticCacheSettings = Field(default_factory=SemanticCacheSettings)
    transforms: TransformsConfig = Field(default_factory=TransformsConfig)
    api_keys: list[ApiKey] = Field(default_factory=list)
    tenants: dict[str, Tenant] = Field(default_factory=dict)
    default_rate_limit: RateLimitSettings | None = None
    """Limit of each key that has none of its own (keyless requests count as key ``anonymous``)."""
    limits: SizeLimitSettings = Field(default_factory=SizeLimitSettings)
    timeouts: Timeouts = Field(default_factory=Timeouts)
    retries: RetrySettings = Field(default_factory=RetrySettings)
    circuit_breaker: CircuitBreakerSettings = Field(default_factory=CircuitBreakerSettings)
    health_checks: HealthCheckSettings = Field(default_factory=HealthCheckSettings)
    redis_url: RedisUrl = None
    """Redis shared by gateway replicas (rate limits; the cache unless it names its own)."""

    @field_validator("aliases", mode="before")
    @classmethod
    def _alias_shorthand(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: {"pool": v} if isinstance(v, str) else v for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _names_and_references(self, info: ValidationInfo) -> GatewayConfig:
        for b in self.backends:
            if b.name is None:
                b.name = urlsplit(b.url).netloc
        if not (info.context or {}).get(_DEFER):
            problems = self.problems()
            if problems:
                raise ValueError("; ".join(f"{_path(loc)}: {msg}" for loc, msg in problems))
        return self

    def problems(self) -> list[tuple[tuple[str | int, ...], str]]:
        """Checks across sections (names unique, references resolve), as (location, message)."""
        out: list[tuple[tuple[str | int, ...], str]] = []
        seen: dict[str, int] = {}
        for i, b in enumerate(self.backends):
            if b.name in seen:
                where = "name" if "name" in b.model_fields_set else "url"
                out.append(
                    (
                        ("backends", i, where),
                        f"backend name {b.name!r} is also backends[{seen[b.name]}]'s; give each a unique name",
                    )
                )
            seen.setdefault(b.name or "", i)
        pools = sorted({b.pool for b in self.backends})
        for alias, target in self.aliases.items():
            if target.pool not in pools:
                out.append(
                    (
                        ("aliases", alias, "pool"),
                        f"no backend is in pool {target.pool!r}"
                        f"{_did_you_mean(target.pool, pools)} (pools: {', '.join(pools)})",
                    )
                )
        names: dict[str, int] = {}
        secrets: dict[str, int] = {}
        for i, k in enumerate(self.api_keys):
            if k.name in names:
                out.append((("api_keys", i, "name"), f"key name {k.name!r} is used twice"))
            names.setdefault(k.name, i)
            if k.key is not None and k.key in secrets:
                out.append((("api_keys", i, "key"), f"same key as api_keys[{secrets[k.key]}]"))
            if k.key is not None:
                secrets.setdefault(k.key, i)
            if self.tenants and k.tenant not in self.tenants:
                out.append(
                    (
                        ("api_keys", i, "tenant"),
                        f"tenant {k.tenant!r} is not under tenants:"
                        f"{_did_you_mean(k.tenant, list(self.tenants))}",
                    )
                )
        return out

    # --- helpers for the server ---

    def pools(self) -> dict[str, list[Backend]]:
        """Backends by pool, in file order."""
        out: dict[str, list[Backend]] = {}
        for b in self.backends:
            out.setdefault(b.pool, []).append(b)
        return out

    def alias_targets(self) -> dict[str, ModelTarget]:
        """Aliases as :func:`~datahall.gateway.transform.resolve_model` takes them."""
        return {name: ModelTarget(a.pool, a.model) for name, a in self.aliases.items()}

    def keys_by_secret(self, environ: Mapping[str, str] = os.environ) -> dict[str, ApiKey]:
        """Client key secret → its :class:`ApiKey` (``key_env`` read from `environ`)."""
        out = {}
        for i, k in enumerate(self.api_keys):
            secret = k.key if k.key_env is None else environ.get(k.key_env)
            if secret is None:
                raise ConfigError(
                    [ConfigIssue(0, f"api_keys[{i}].key_env", f"${k.key_env} is not set")]
                )
            out[secret] = k
        return out

    def rate_limits(self, key: ApiKey | None) -> dict[str, RateLimit]:
        """The limits a request with `key` (None: no key) is held to, for
        :meth:`~datahall.gateway.ratelimit.TokenRateLimiter.acquire`."""
        out: dict[str, RateLimit] = {}
        own = key.rate_limit if key is not None else None
        chosen = own or self.default_rate_limit
        if chosen is not None:
            out[f"key:{key.name if key else 'anonymous'}"] = chosen.rate_limit()
        tenant = key.tenant if key is not None else "default"
        settings = self.tenants.get(tenant)
        if settings is not None and settings.rate_limit is not None:
            out[f"tenant:{tenant}"] = settings.rate_limit.rate_limit()
        return out

    def cache_redis_url(self) -> str | None:
        return self.semantic_cache.redis_url or self.redis_url


# --- errors that point at the line (the machinery is datahall.core.config) ---------------------


class ConfigError(CoreConfigError):
    """A configuration that cannot be used; one line per problem, sorted by line:
    ``gateway.yaml:12: backends[1].url: must be an http:// or https:// URL ...``."""

    default_source = "gateway.yaml"


_HINTS = {
    "score_threshold": "use min_cosine_similarity: a cosine similarity, higher is stricter "
    "(Azure API Management's score-threshold is a distance, lower is stricter: "
    "min_cosine_similarity = 1 - score_threshold)",
    "similarity_threshold": "use min_cosine_similarity (a cosine similarity in (0, 1])",
    "distance_threshold": "use min_cosine_similarity = 1 - distance",
}


def parse_config(text: str, *, source: str = "gateway.yaml") -> GatewayConfig:
    """Validate YAML `text`; :class:`ConfigError` lists each problem at its line in `source`."""
    root, data = compose_yaml(text, source, ConfigError)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([ConfigIssue(1, "", "the file must be a mapping of settings")], source)
    # top-level x-* keys hold YAML anchors for reuse (Docker Compose's convention)
    data = {k: v for k, v in data.items() if not (isinstance(k, str) and k.startswith("x-"))}
    return validate_at_lines(
        data,
        root,
        GatewayConfig,
        source=source,
        hints=_HINTS,
        error=ConfigError,
        problems=lambda config: config.problems(),
    )


def load_config(path: str | os.PathLike[str]) -> GatewayConfig:
    """Read and validate a ``gateway.yaml``; errors name the file and line, e.g.
    ``gateway.yaml:12: backends[1].url: must be an http:// or https:// URL ...``.

    >>> load_config(EXAMPLE_CONFIG).routing.policy
    'prefix-load'
    """
    return parse_config(read_text(path, ConfigError), source=str(path))
