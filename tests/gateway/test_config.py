"""gateway.yaml: schema, helpers, and errors that point at the line (issue 6 item 1)."""

from __future__ import annotations

import textwrap

import pytest
from pydantic import ValidationError

from datahall.gateway.config import (
    EXAMPLE_CONFIG,
    ROUTING_POLICIES,
    ConfigError,
    GatewayConfig,
    load_config,
    parse_config,
)
from datahall.gateway.ratelimit import RateLimit, SizeLimits
from datahall.gateway.routing import make_profile
from datahall.gateway.server import build_profile
from datahall.gateway.transform import ModelTarget


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_config(textwrap.dedent(text))
    return str(e.value).splitlines()


# --- the example and the defaults ---------------------------------------------------------------


def test_the_example_validates_and_means_what_it_says():
    config = load_config(EXAMPLE_CONFIG)
    assert [b.name for b in config.backends] == ["sim-fast", "sim-slow", "sim-spare", "claude"]
    assert {pool: [b.name for b in bs] for pool, bs in config.pools().items()} == {
        "local": ["sim-fast", "sim-slow", "sim-spare"],
        "anthropic": ["claude"],
    }
    assert config.backends[3].api == "anthropic" and config.backends[3].metrics_path is None
    targets = config.alias_targets()
    assert targets["gpt-4o"] == ModelTarget("local", "smollm2")
    assert targets["smollm2"] == ModelTarget("local", None)  # the bare-string shorthand
    assert config.routing.policy in ROUTING_POLICIES
    assert config.semantic_cache.min_cosine_similarity == 0.90
    assert config.cache_redis_url() == "redis://127.0.0.1:6379/0"
    assert config.limits.size_limits() == SizeLimits(8388608, 1024, 32000)


def test_minimal_config_gets_the_defaults():
    config = parse_config("backends: [{url: 'http://127.0.0.1:8001/'}]")
    assert config.backends[0].url == "http://127.0.0.1:8001"
    assert config.backends[0].name == "127.0.0.1:8001"
    assert (config.listeners[0].host, config.listeners[0].port) == ("127.0.0.1", 8080)
    assert config.routing.scorer_weights.model_dump() == {
        "queue": 1.0,
        "kv_cache": 1.0,
        "prefix": 3.0,
        "lora": 1.0,
    }
    assert config.routing.orca.blackout_period_s == 10.0
    assert config.routing.orca.weight_expiration_period_s == 180.0
    assert not config.semantic_cache.enabled and config.cache_redis_url() is None
    assert config.retries.on_status == [429, 502, 503, 504]
    assert config.rate_limits(None) == {}


@pytest.mark.parametrize("policy", ["prefix-load", "kv-aware"])
def test_default_weights_build_the_routing_presets(policy):
    # the config's defaults and routing's presets are one setting, LoRA affinity included
    config = parse_config(f"backends: [{{url: 'http://a:1'}}]\nrouting: {{policy: {policy}}}")
    built, preset = build_profile(config), make_profile(policy)
    assert [(s.name, w) for s, w in built.scorers] == [(s.name, w) for s, w in preset.scorers]
    assert [f.name for f in built.filters] == [f.name for f in preset.filters]
    assert ("lora-affinity", 1.0) in [(s.name, w) for s, w in built.scorers]
    example = load_config(EXAMPLE_CONFIG).routing
    assert example.scorer_weights == config.routing.scorer_weights  # it shows the defaults
    assert example.imbalance_threshold == config.routing.imbalance_threshold


def test_cache_settings_build_the_semantic_cache_config():
    config = parse_config(
        "backends: [{url: 'http://a:1'}]\n"
        "semantic_cache: {enabled: true, min_cosine_similarity: 0.95, redis_url: 'redis://r:6379/1'}"
    )
    cache = config.semantic_cache.cache_config()
    assert cache.min_cosine_similarity == 0.95 and cache.max_entries == 10_000
    assert config.cache_redis_url() == "redis://r:6379/1"


def test_keys_tenants_and_their_rate_limits():
    config = load_config(EXAMPLE_CONFIG)
    keys = config.keys_by_secret({"ACME_APP_KEY": "sk-acme", "GLOBEX_KEY": "sk-globex"})
    assert [k.name for k in keys.values()] == ["acme-app", "acme-ci", "globex"]
    assert config.rate_limits(keys["sk-acme"]) == {
        "key:acme-app": RateLimit(20000, 60),
        "tenant:acme": RateLimit(100000, None),
    }
    # a key without its own limit gets the default one
    assert config.rate_limits(keys["sk-local-ci-only"]) == {
        "key:acme-ci": RateLimit(10000, 30),
        "tenant:acme": RateLimit(100000, None),
    }
    assert config.rate_limits(None) == {"key:anonymous": RateLimit(10000, 30)}
    with pytest.raises(ConfigError, match=r"api_keys\[0\].key_env: \$ACME_APP_KEY is not set"):
        config.keys_by_secret({})
    with pytest.raises(ConfigError, match=r"\$ANTHROPIC_API_KEY is not set"):
        config.backends[3].resolved_api_key({})
    assert config.backends[3].resolved_api_key({"ANTHROPIC_API_KEY": "k"}) == "k"


def test_x_keys_hold_anchors():
    config = parse_config(
        textwrap.dedent(
            """\
            x-sim: &sim {pool: local, models: [smollm2]}
            backends:
              - {<<: *sim, url: 'http://a:1'}
              - {<<: *sim, url: 'http://b:2', weight: 2}
            """
        )
    )
    assert [(b.pool, b.weight) for b in config.backends] == [("local", 1.0), ("local", 2.0)]


# --- errors point at the line -----------------------------------------------------------------


def test_a_bad_url_points_at_its_line():
    lines = errors_of(
        """\
        listeners:
          - port: 8080
        backends:
          - name: a
            url: http://127.0.0.1:8001
          - name: b
            url: ftp://127.0.0.1:8002
        """
    )
    assert lines == [
        "gateway.yaml:7: backends[1].url: must be an http:// or https:// URL with a host, like "
        "http://127.0.0.1:8000 (got 'ftp://127.0.0.1:8002')"
    ]


def test_an_orca_metric_name_that_gives_no_utilization_points_at_its_line():
    lines = errors_of(
        """\
        backends: [{url: 'http://127.0.0.1:8001'}]
        routing:
          orca:
            metric_names_for_computing_utilization: [named_metrics.kv, gpu_util]
        """
    )
    assert lines == [
        "gateway.yaml:4: routing.orca.metric_names_for_computing_utilization: metric name "
        "'gpu_util' cannot give a utilization; use one of cpu_utilization, mem_utilization, "
        "application_utilization or named_metrics.<name>, utilization.<name>, "
        "request_cost.<name>"
    ]


def test_every_error_is_listed_in_line_order():
    lines = errors_of(
        """\
        backends:
          - url: http://a:1
            poool: p
          - url: http://b:2/v1
            weight: -1
            api: grpc
        routing:
          policy: round-robbin
          scorer_weights: {queue: fast}
        semantic_cache:
          score_threshold: 0.2
          min_cosine_similarity: 1.5
        """
    )
    assert lines == [
        "gateway.yaml:3: backends[0].poool: unknown field 'poool' (did you mean 'pool'?); allowed: "
        "name, url, pool, weight, priority, api, models, adapters, api_key, api_key_env, headers, "
        "metrics_path",
        "gateway.yaml:4: backends[1].url: give the server's root without /v1 (the gateway adds "
        "/v1/...): 'http://b:2'",
        "gateway.yaml:5: backends[1].weight: Input should be greater than 0 (got -1)",
        "gateway.yaml:6: backends[1].api: Input should be 'openai' or 'anthropic' (got 'grpc')",
        "gateway.yaml:8: routing.policy: unknown routing policy 'round-robbin' (did you mean "
        f"'round-robin'?); choose one of {', '.join(ROUTING_POLICIES)}",
        "gateway.yaml:9: routing.scorer_weights.queue: Input should be a valid number, unable to "
        "parse string as a number (got 'fast')",
        "gateway.yaml:11: semantic_cache.score_threshold: unknown field 'score_threshold': use "
        "min_cosine_similarity: a cosine similarity, higher is stricter (Azure API Management's "
        "score-threshold is a distance, lower is stricter: min_cosine_similarity = 1 - "
        "score_threshold)",
        "gateway.yaml:12: semantic_cache.min_cosine_similarity: Input should be less than or "
        "equal to 1 (got 1.5)",
    ]


def test_transform_errors_point_at_the_template_and_the_pattern():
    lines = errors_of(
        """\
        backends: [{url: 'http://a:1'}]
        transforms:
          templates:
            t:
              messages:
                - role: user
                  content: "{{ text }"
          system_prompt:
            text: |
              You help {{ tenant }}.
            mode: before
          guard:
            deny:
              - ok
              - "(unclosed"
          redaction:
            kinds: [email, passport]
            extra: {SECRET: "(?i)secret"}
        """
    )
    assert lines == [
        "gateway.yaml:7: transforms.templates.t.messages[0].content: template line 1: "
        "unexpected '}'",
        "gateway.yaml:11: transforms.system_prompt.mode: Input should be 'prepend', 'append', "
        "'replace' or 'decorate' (got 'before')",
        "gateway.yaml:15: transforms.guard.deny[1]: not a valid regular expression: missing ), "
        "unterminated subpattern at position 0",
        "gateway.yaml:17: transforms.redaction.kinds[1]: Input should be 'email', 'iban', "
        "'credit_card', 'ssn', 'ipv6', 'ipv4' or 'phone' (got 'passport')",
    ]


def test_cross_references_point_at_the_line():
    lines = errors_of(
        """\
        backends:
          - {name: a, url: 'http://a:1', pool: local}
          - {name: a, url: 'http://b:2', pool: local}
        aliases:
          gpt-4o: {pool: locl, model: smollm2}
          llama-3: remote
        api_keys:
          - {name: k, key: s1, tenant: acme}
          - {name: k, key: s1, tenant: acmee}
        tenants:
          acme: {rate_limit: {tokens_per_minute: 1000}}
        """
    )
    assert lines == [
        "gateway.yaml:3: backends[1].name: backend name 'a' is also backends[0]'s; give each a "
        "unique name",
        "gateway.yaml:5: aliases.gpt-4o.pool: no backend is in pool 'locl' (did you mean "
        "'local'?) (pools: local)",
        "gateway.yaml:6: aliases.llama-3.pool: no backend is in pool 'remote' (pools: local)",
        "gateway.yaml:9: api_keys[1].name: key name 'k' is used twice",
        "gateway.yaml:9: api_keys[1].key: same key as api_keys[0]",
        "gateway.yaml:9: api_keys[1].tenant: tenant 'acmee' is not under tenants: (did you mean "
        "'acme'?)",
    ]


def test_model_level_errors_point_at_their_section():
    lines = errors_of(
        """\
        backends:
          - url: http://a:1
            api_key: k
            api_key_env: K
        api_keys:
          - name: nokey
        timeouts:
          ttft_s: 100
          total_s: 10
        """
    )
    assert lines == [
        "gateway.yaml:2: backends[0]: give api_key or api_key_env, not both",
        "gateway.yaml:6: api_keys[0]: give exactly one of key (the secret) or key_env (its "
        "variable)",
        "gateway.yaml:7: timeouts: ttft_s (100.0) cannot exceed total_s (10.0)",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ["gateway.yaml:1: backends: required, but missing"]),
        (
            "listeners: []\n",
            [
                "gateway.yaml:1: listeners: List should have at least 1 item after validation, not 0",
                "gateway.yaml:1: backends: required, but missing",
            ],
        ),
        ("- a\n- b\n", ["gateway.yaml:1: the file must be a mapping of settings"]),
        (
            "backends: [\n",
            [
                "gateway.yaml:2: not valid YAML: while parsing a flow node expected the node content, "
                "but found '<stream end>'"
            ],
        ),
        (
            "backends: []\nrouting: {}\nbackends: []\n",
            ["gateway.yaml:3: backends: duplicate key (first at line 1)"],
        ),
        (
            "backends: [{url: 'http://a:1'}]\nredis_url: http://r:6379\n",
            [
                "gateway.yaml:2: redis_url: must be a redis://, rediss:// or unix:// URL "
                "(got 'http://r:6379')"
            ],
        ),
        (
            "backends: [{url: 'http://a:1'}]\nbackend_pools: {}\n",
            [
                "gateway.yaml:2: backend_pools: unknown field 'backend_pools' (did you mean "
                "'backends'?); allowed: listeners, "
                "backends, aliases, routing, semantic_cache, transforms, api_keys, tenants, "
                "default_rate_limit, limits, timeouts, retries, circuit_breaker, health_checks, "
                "redis_url"
            ],
        ),
        (
            "backends:\n  - url: http://a:1\n    api_key_env: 1BAD\n",
            ["gateway.yaml:3: backends[0].api_key_env: '1BAD' is not an environment variable name"],
        ),
    ],
)
def test_file_level_errors(text, expected):
    assert errors_of(text) == expected


def test_load_config_names_the_file(tmp_path):
    path = tmp_path / "gateway.yaml"
    path.write_text("backends:\n  - url: nope\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}:2: backends[0].url: must be an http:// or https://")
    assert e.value.issues[0].line == 2 and e.value.issues[0].path == "backends[0].url"
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")


def test_the_python_api_checks_references_too():
    with pytest.raises(ValidationError, match=r"aliases.x.pool: no backend is in pool 'nope'"):
        GatewayConfig.model_validate(
            {"backends": [{"url": "http://a:1"}], "aliases": {"x": "nope"}}
        )
