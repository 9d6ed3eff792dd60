"""Endpoint picking (brief ai-gateway.md §2.3, invariants §2.6.3, oracles §3)."""

from __future__ import annotations

import math
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datahall.gateway.orca import OrcaLoadReport, orca_headers
from datahall.gateway.resilience import CircuitBreaker, VllmMetrics
from datahall.gateway.routing import (
    PROFILES,
    SCORERS,
    ConsistentHashPicker,
    Endpoint,
    LoadGapFilter,
    NoEndpoint,
    PickContext,
    Profile,
    RequestInfo,
    Router,
    Saturation,
    compose,
    kv_cache_score,
    lora_affinity_score,
    make_profile,
    queue_scores,
)


def endpoints(n: int, **kw) -> list[Endpoint]:
    return [Endpoint(f"http://e{i}", **kw) for i in range(n)]


def scraped(waiting: float, kv: float | None = None, **kw) -> VllmMetrics:
    return VllmMetrics(num_requests_waiting=waiting, num_requests_running=0.0,
                       kv_cache_usage_perc=kv, **kw)  # fmt: skip


PROMPT = "system: You are a careful assistant for the ACME support desk. " * 8


# --- oracle values (brief §3) -----------------------------------------------------------------


def test_queue_and_kv_oracles():
    assert queue_scores([0, 5, 10]) == [1.0, 0.5, 0.0]
    assert queue_scores([7, 7, 7]) == [1.0, 1.0, 1.0]
    assert kv_cache_score(0.4) == 0.6


def test_oracles_through_the_router_with_scraped_metrics(clock):
    eps = endpoints(3)
    # GIE's saturation detector would drop the queue of 10 (> 5): raise its limit here
    router = Router(eps, "kv-aware", clock=clock, saturation=Saturation(queue_depth=128))
    for e, (q, kv) in zip(eps, [(0, 0.4), (5, 0.4), (10, 0.4)], strict=True):
        e.observe_metrics(scraped(q, kv), clock.now)
    assert router.pick(RequestInfo(model="m")) is eps[0]
    assert [e.last_scores["queue"] for e in eps] == [1.0, 0.5, 0.0]
    assert [e.last_scores["kv-cache"] for e in eps] == [0.6, 0.6, 0.6]
    assert [e.last_scores["lora-affinity"] for e in eps] == [1.0, 1.0, 1.0]
    assert eps[0].last_scores["total"] == pytest.approx(2.6)


def test_lora_affinity_values():
    assert lora_affinity_score("a", {"a"}, set(), 1) == 1.0
    assert lora_affinity_score("a", {"b"}, set(), 2) == 0.8
    assert lora_affinity_score("a", {"b"}, {"a"}, 2) == 0.6
    assert lora_affinity_score("a", {"b", "c"}, set(), 2) == 0.0


def test_lora_affinity_sends_an_adapter_where_it_is_active(clock):
    eps = endpoints(3)
    router = Router(eps, "kv-aware", clock=clock)
    eps[0].observe_metrics(scraped(0, 0.1, max_lora=1, running_lora_adapters=("chat",)), 0.0)
    eps[1].observe_metrics(scraped(0, 0.1, max_lora=1, running_lora_adapters=("sql",)), 0.0)
    eps[2].observe_metrics(scraped(0, 0.1, max_lora=2, running_lora_adapters=("chat",)), 0.0)
    info = RequestInfo(model="base", adapter="sql")
    assert router.pick(info) is eps[1]
    assert [e.last_scores["lora-affinity"] for e in eps] == [0.0, 1.0, 0.8]


# --- scorers stay in [0, 1] (§2.6.3) ----------------------------------------------------------

loads = st.tuples(
    st.floats(0, 1e6, allow_nan=False),  # waiting
    st.one_of(st.none(), st.floats(-1.0, 3.0, allow_nan=False)),  # kv usage, even bogus
    st.integers(0, 50),  # local in flight
    st.booleans(),  # has a fresh scrape
)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(loads, min_size=1, max_size=6),
    st.sampled_from([None, "a", "b"]),
    st.integers(0, 3),
)
def test_every_scorer_stays_in_unit_interval(states, adapter, shared_blocks):
    now = 100.0
    eps = endpoints(len(states))
    for e, (waiting, kv, in_flight, has_scrape) in zip(eps, states, strict=True):
        e.in_flight = in_flight
        if has_scrape:
            e.observe_metrics(scraped(waiting, kv, max_lora=1, running_lora_adapters=("a",)), now)
    scorers = [factory() for factory in SCORERS.values()]
    router = Router(eps, compose({s: 1.0 for s in scorers}), clock=lambda: now)
    # teach the prefix index something about one endpoint
    info = RequestInfo(model="m", adapter=adapter, prompt="x" * 64 * 4)
    ctx = PickContext(info, now, router)
    seen = ctx.hashes()[:shared_blocks]
    for s in scorers:
        if hasattr(s, "index"):
            s.index.record(eps[0].url, seen)
    for s in scorers:
        values = s.score(ctx, eps)
        assert len(values) == len(eps)
        assert all(0.0 <= v <= 1.0 for v in values), (s.name, values)


# --- the picker never returns a filtered-out endpoint (§2.6.3) --------------------------------

endpoint_specs = st.lists(
    st.fixed_dictionaries(
        {
            "healthy": st.booleans(),
            "model": st.sampled_from(["m", "other", None]),
            "pool": st.sampled_from(["p", "q"]),
            "priority": st.integers(0, 2),
            "broken": st.booleans(),
            "in_flight": st.integers(0, 3),
            "cap": st.sampled_from([None, 1, 2]),
        }
    ),
    min_size=1,
    max_size=7,
)


@settings(max_examples=150, deadline=None)
@given(
    endpoint_specs,
    st.sampled_from(sorted(PROFILES)),
    st.sets(st.integers(0, 6), max_size=3),
    st.sampled_from([None, "p"]),
    st.sampled_from(["standard", "sheddable"]),
    st.integers(1, 5),
)
def test_picks_obey_the_hard_rules(specs, policy, excluded, pool, priority, rounds):
    now = 50.0
    eps = []
    for i, spec in enumerate(specs):
        e = Endpoint(
            f"http://e{i}",
            pool=spec["pool"],
            priority=spec["priority"],
            models=frozenset() if spec["model"] is None else {spec["model"]},
            max_in_flight=spec["cap"],
            breaker=CircuitBreaker(clock=lambda: now),
        )
        e.healthy = spec["healthy"]
        e.in_flight = spec["in_flight"]
        if spec["broken"]:
            e.breaker.trip(30.0, now=now)
        eps.append(e)
    router = Router(eps, policy, clock=lambda: now)
    exclude = [eps[i].url for i in excluded if i < len(eps)]
    info = RequestInfo(model="m", pool=pool, priority=priority, session_id="s1", prompt=PROMPT)

    def allowed(e: Endpoint) -> bool:
        return (
            e.url not in exclude
            and e.healthy
            and e.breaker.allows(now)
            and (pool is None or e.pool == pool)
            and e.serves("m")
        )

    for _ in range(rounds):
        try:
            chosen = router.pick(info, exclude=exclude)
        except NoEndpoint as exc:
            unsaturated = [
                e
                for e in eps
                if allowed(e) and (e.max_in_flight is None or e.in_flight < e.max_in_flight)
            ]
            if exc.reason == "saturated":
                assert priority == "sheddable" and not unsaturated
            else:
                assert not any(allowed(e) for e in eps)
            return
        assert allowed(chosen)
        free = [e for e in eps if allowed(e) and not router.saturation.saturated(e, router.load(e))]
        if free:
            assert chosen in free
            assert chosen.priority == min(e.priority for e in free)
        router.on_start(chosen)


# --- deterministic tie-breaks (llm-d-router#2515) ---------------------------------------------


@pytest.mark.parametrize("policy", ["kv-aware", "prefix-load", "least-request"])
def test_a_burst_on_tied_endpoints_is_spread_round_robin(policy, clock):
    eps = endpoints(4)
    router = Router(eps, policy, clock=clock)
    # no on_start between the picks: every pick sees the same, tied, scores
    picks = [router.pick(RequestInfo(model="m")).url for _ in range(8)]
    assert picks == [e.url for e in eps] * 2


def test_round_robin_follows_static_weights():
    eps = [Endpoint("http://a", weight=3), Endpoint("http://b", weight=1)]
    router = Router(eps, "round-robin")
    picks = [router.pick(RequestInfo()).url for _ in range(8)]
    assert Counter(picks) == {"http://a": 6, "http://b": 2}
    assert picks[:4].count("http://b") == 1  # smooth: b is not starved for a whole cycle


def test_least_request_and_p2c_avoid_the_busy_endpoint():
    for policy in ("least-request", "p2c"):
        eps = endpoints(2)
        eps[0].in_flight = 5
        router = Router(eps, policy)
        assert all(router.pick(RequestInfo()) is eps[1] for _ in range(10))


def test_p2c_is_seeded_and_balances_a_burst():
    def run() -> list[str]:
        router = Router(endpoints(4), "p2c")
        out = []
        for _ in range(40):
            e = router.pick(RequestInfo())
            router.on_start(e)
            out.append(e.url)
        return out

    first = run()
    assert first == run()
    assert max(Counter(first).values()) - min(Counter(first).values()) <= 2


# --- prefix affinity with its load gate -------------------------------------------------------


def test_repeated_prefix_sticks_to_one_endpoint_until_the_gate_diverts_it(clock):
    eps = endpoints(3)
    profile = compose({"queue": 1, "kv": 1, "prefix": 3}, filters=[LoadGapFilter(2)])
    router = Router(eps, profile, clock=clock)
    info = RequestInfo(model="m", prompt=PROMPT + "question 1")
    picks = []
    for _ in range(12):
        e = router.pick(info)
        router.on_start(e)  # the requests stay open: load builds up
        picks.append(e)
    # the first three share the cached endpoint; the fourth would put it 3 ahead of an idle one
    assert picks[:3] == [eps[0]] * 3
    assert picks[3] is not eps[0]
    counts = [e.in_flight for e in eps]
    assert max(counts) - min(counts) <= 3  # never more than gap + 1 apart
    assert eps[0].last_scores["prefix"] == 1.0


def test_prefix_affinity_without_load_keeps_the_endpoint(clock):
    eps = endpoints(4)
    router = Router(eps, "prefix-load", clock=clock)
    first = router.pick(RequestInfo(model="m", prompt=PROMPT + "q0"))
    router.on_start(first)
    router.on_finish(first)
    for i in range(1, 20):  # same system prompt, different questions, sequential
        e = router.pick(RequestInfo(model="m", prompt=PROMPT + f"q{i}"))
        router.on_start(e)
        router.on_finish(e)
        assert e is first
    # a different prefix does not follow it (tie among the four: round robin goes on)
    other = router.pick(RequestInfo(model="m", prompt="user: " + "z" * 300))
    assert other.last_scores["prefix"] == 0.0


def test_every_profile_with_prefix_affinity_is_gated():
    assert any(f.is_load_gate for f in make_profile("prefix-load").filters)
    assert any(f.is_load_gate for f in compose({"prefix": 1}).filters)
    assert any(f.is_load_gate for f in Profile("x", scorers=[(SCORERS["prefix"](), 5)]).filters)


def test_loadaware_prefix_moves_away_from_a_hot_endpoint(clock):
    eps = endpoints(2)
    router = Router(eps, "prefix-loadaware", clock=clock)
    info = RequestInfo(model="m", prompt=PROMPT)
    picks = []
    for _ in range(6):
        e = router.pick(info)
        router.on_start(e)
        picks.append(e)
    assert {eps[0], eps[1]} <= set(picks)
    assert abs(eps[0].in_flight - eps[1].in_flight) <= 2


# --- session affinity with bounded load -------------------------------------------------------


def test_session_affinity_sticks_and_spills_within_the_bound(clock):
    eps = endpoints(4)
    router = Router(eps, "session", clock=clock)
    picker = router.profile.picker
    assert isinstance(picker, ConsistentHashPicker)
    home = router.pick(RequestInfo(session_id="alice"))
    for _ in range(10):  # sequential: always home
        e = router.pick(RequestInfo(session_id="alice"))
        router.on_start(e)
        router.on_finish(e)
        assert e is home
    for _ in range(40):  # concurrent: home until the bound, then spill, bound always held
        bound = picker.capacity(eps)
        e = router.pick(RequestInfo(session_id="alice"))
        assert e.in_flight < bound
        router.on_start(e)
        assert max(x.in_flight for x in eps) <= bound
    assert home.in_flight == max(x.in_flight for x in eps)
    assert sum(x.in_flight > 0 for x in eps) >= 3  # it spilled, along the ring


def test_sessions_spread_over_endpoints_and_no_key_falls_back(clock):
    eps = endpoints(4)
    router = Router(eps, "session", clock=clock)
    homes = {router.pick(RequestInfo(session_id=f"user{i}")).url for i in range(40)}
    assert len(homes) == 4
    assert [router.pick(RequestInfo()).url for _ in range(4)] == [e.url for e in eps]


# --- priority and fallback pools --------------------------------------------------------------


def test_priority_tiers_fall_back_when_the_first_is_down_or_saturated(clock):
    primary = [Endpoint("http://p0", max_in_flight=1), Endpoint("http://p1", max_in_flight=1)]
    backup = Endpoint("http://backup", priority=1)
    router = Router([*primary, backup], "least-request", clock=clock)
    info = RequestInfo()
    assert {router.pick(info).url for _ in range(4)} == {"http://p0", "http://p1"}
    for e in primary:
        router.on_start(e)  # both primaries at their cap: saturated
    assert router.pick(info) is backup
    for e in primary:
        router.on_finish(e)
    router.on_health_change(primary[0], False)
    primary[1].breaker.trip(10.0, now=clock.now)
    assert router.pick(info) is backup
    clock.now = 10.0  # the breaker half-opens: the primary takes its probe
    assert router.pick(info) is primary[1]


def test_sheddable_requests_are_refused_when_all_are_saturated():
    eps = endpoints(2, max_in_flight=1)
    router = Router(eps, "kv-aware")
    for e in eps:
        router.on_start(e)
    with pytest.raises(NoEndpoint) as exc:
        router.pick(RequestInfo(priority="sheddable"))
    assert exc.value.reason == "saturated"
    assert router.pick(RequestInfo(priority="critical")) in eps


def test_saturation_from_server_reports(clock):
    eps = endpoints(2)
    eps.append(Endpoint("http://spare", priority=1))
    router = Router(eps, "kv-aware", clock=clock)
    eps[0].observe_metrics(scraped(9, 0.2), clock.now)  # queue above GIE's 5
    eps[1].observe_metrics(scraped(0, 0.95), clock.now)  # KV above GIE's 0.8
    assert router.pick(RequestInfo()) is eps[2]
    clock.now = 5.0  # the scrapes went stale: the local counts say all is idle
    assert router.pick(RequestInfo()).priority == 0


# --- NoEndpoint -------------------------------------------------------------------------------


def test_no_endpoint_says_why(clock):
    eps = [Endpoint("http://a", models={"llama"}), Endpoint("http://b", models={"llama"})]
    router = Router(eps, "round-robin", clock=clock)
    with pytest.raises(NoEndpoint, match="no endpoint serves model 'gpt'") as exc:
        router.pick(RequestInfo(model="gpt"))
    assert exc.value.reason == "unknown"
    with pytest.raises(NoEndpoint, match="already tried") as exc:
        router.pick(RequestInfo(model="llama"), exclude=eps)
    assert exc.value.reason == "exhausted"
    eps[0].healthy = False
    eps[1].breaker.trip(4.0, now=0.0)
    with pytest.raises(NoEndpoint, match="are down") as exc:
        router.pick(RequestInfo(model="llama"))
    assert exc.value.reason == "down"
    assert exc.value.retry_after == 4.0
    clock.now = 4.0
    assert router.pick(RequestInfo(model="llama")) is eps[1]


def test_exclude_accepts_endpoints_and_urls():
    eps = endpoints(3)
    router = Router(eps, "round-robin")
    for _ in range(5):
        assert router.pick(RequestInfo(), exclude=[eps[0], "http://e1/"]) is eps[2]


# --- ORCA ingestion and ORCA-WRR --------------------------------------------------------------


def test_orca_wrr_pick_shares_follow_reported_weights(clock):
    eps = endpoints(3)
    router = Router(eps, "orca-wrr", clock=clock)
    utilizations = [0.25, 0.5, 1.0]  # weights 400, 200, 100
    for second in range(12):  # reports keep coming through the 10 s blackout
        clock.now = float(second)
        for e, u in zip(eps, utilizations, strict=True):
            report = OrcaLoadReport(cpu_utilization=u, rps_fractional=100.0)
            assert router.on_response_headers(e, orca_headers(report, "TEXT")) == report
    counts = Counter(router.pick(RequestInfo()).url for _ in range(7000))
    shares = [counts[e.url] / 7000 for e in eps]
    assert shares == pytest.approx([4 / 7, 2 / 7, 1 / 7], abs=0.005)


def test_orca_wrr_uses_measured_qps_for_vllm_reports_and_skips_filtered_endpoints(clock):
    eps = endpoints(2)
    router = Router(eps, "orca-wrr", clock=clock)
    for second in range(12):
        clock.now = float(second)
        for e, kv in zip(eps, [0.2, 0.6], strict=True):
            router.on_start(e)
            router.on_finish(e)  # one response a second from each: qps 0.1 over 10 s
            header = {
                "endpoint-load-metrics": "TEXT named_metrics.kv_cache_usage_perc="
                f"{kv}, named_metrics.num_requests_waiting=0"
            }
            router.on_response_headers(e, header)
    picker = router.profile.picker
    weights = picker.wrr.weights()
    assert weights[eps[0].url] / weights[eps[1].url] == pytest.approx(3.0)
    counts = Counter(router.pick(RequestInfo()).url for _ in range(400))
    assert counts[eps[0].url] == pytest.approx(300, abs=3)
    assert {router.pick(RequestInfo(), exclude=[eps[0]]).url for _ in range(5)} == {eps[1].url}


def test_orca_wrr_keeps_only_the_responses_of_its_rate_window(clock):
    eps = endpoints(1)
    router = Router(eps, "orca-wrr", clock=clock)
    for half in range(200):  # two responses a second for 100 s, and no ORCA report
        clock.now = half / 2
        router.on_start(eps[0])
        router.on_finish(eps[0])
    picker = router.profile.picker
    assert len(picker._done[eps[0].url]) == 21  # 89.5 s to 99.5 s, both ends included
    assert picker.qps(eps[0].url, clock.now) == 2.1


def test_a_bad_orca_header_never_breaks_routing(clock):
    eps = endpoints(2)
    router = Router(eps, "kv-aware", clock=clock)
    good = {"endpoint-load-metrics": "TEXT named_metrics.num_requests_waiting=7"}
    router.on_response_headers(eps[0], good)
    for bad in (
        {"endpoint-load-metrics": "XML <load/>"},
        {"endpoint-load-metrics": "TEXT cpu_utilization=NaN"},
        {"endpoint-load-metrics": "JSON {"},
        {"endpoint-load-metrics-bin": "!!!"},
        {"endpoint-load-metrics": "TEXT named_metrics.kv_cache_usage_perc=abc"},
    ):
        assert router.on_response_headers(eps[0], bad) is None
    assert eps[0].orca_errors == 5
    assert router.load(eps[0]).waiting == 7.0  # the good snapshot still stands
    assert router.pick(RequestInfo()) is eps[1]


def test_load_source_precedence_and_expiry(clock):
    e = Endpoint("http://a")
    router = Router([e], "kv-aware", clock=clock, orca_ttl=2.0, metrics_ttl=1.0)
    e.in_flight = 1
    assert router.load(e).source == "local"
    e.observe_metrics(scraped(4, 0.3), clock.now)
    assert (router.load(e).source, router.load(e).waiting) == ("metrics", 4)
    router.on_response_headers(
        e, {"endpoint-load-metrics": "TEXT named_metrics.num_requests_waiting=9"}
    )
    load = router.load(e)
    assert (load.source, load.waiting, load.kv_cache) == ("orca", 9.0, 0.3)
    clock.now = 1.5  # scrape stale, ORCA fresh
    assert router.load(e).kv_cache is None
    clock.now = 2.5  # both stale
    assert router.load(e).source == "local"
    # a report without a queue length leaves the scrape in charge of it
    e.observe_metrics(scraped(2, 0.1), clock.now)
    router.on_response_headers(e, {"endpoint-load-metrics": "TEXT cpu_utilization=0.5"})
    assert router.load(e).source == "metrics"


# --- feedback and bookkeeping -----------------------------------------------------------------


def test_retry_after_opens_the_breaker_for_exactly_that_long(clock):
    eps = endpoints(2)
    router = Router(eps, "round-robin", clock=clock)
    router.on_start(eps[0])
    router.on_finish(eps[0], ok=False, status=429, retry_after="3")
    assert eps[0].breaker.state(clock.now) == "open"
    assert all(router.pick(RequestInfo()) is eps[1] for _ in range(4))
    clock.now = 2.999
    assert router.pick(RequestInfo()) is eps[1]
    clock.now = 3.0
    assert eps[0] in {router.pick(RequestInfo()) for _ in range(2)}


def test_client_errors_do_not_count_against_the_endpoint():
    eps = endpoints(1)
    router = Router(eps, "round-robin")
    for _ in range(10):
        router.on_start(eps[0])
        router.on_finish(eps[0], ok=False, status=400)
    assert eps[0].breaker.state() == "closed"
    for _ in range(5):
        router.on_start(eps[0])
        router.on_finish(eps[0], ok=False, status=None)  # connect errors
    assert eps[0].breaker.state() == "open"
    assert eps[0].in_flight == 0


def test_snapshot_exposes_picks_and_scores():
    eps = endpoints(2)
    router = Router(eps, "kv-aware")
    for _ in range(3):
        router.pick(RequestInfo())
    snap = {row["url"]: row for row in router.snapshot()}
    assert snap["http://e0"]["picks"] + snap["http://e1"]["picks"] == 3
    assert set(snap["http://e0"]["scores"]) == {"queue", "kv-cache", "lora-affinity", "total"}
    assert snap["http://e0"]["breaker"] == "closed"


def test_configuration_errors_are_clear():
    with pytest.raises(ValueError, match="unknown routing policy 'fastest'"):
        make_profile("fastest")
    with pytest.raises(ValueError, match="unknown scorer 'latency'"):
        compose({"latency": 1})
    with pytest.raises(ValueError, match="repeated: http://a"):
        Router([Endpoint("http://a"), Endpoint("http://a/")])
    with pytest.raises(ValueError, match="priority must be one of"):
        RequestInfo(priority="urgent")
    with pytest.raises(ValueError, match="weight must be positive"):
        Endpoint("http://a", weight=0)
    assert math.isclose(kv_cache_score(0.0), 1.0)


def test_update_keeps_prefix_state_of_staying_endpoints(clock):
    eps = endpoints(3)
    router = Router(eps, "prefix-load", clock=clock)
    info = RequestInfo(model="m", prompt=PROMPT)
    home = router.pick(info)
    router.update([e for e in eps if e is not eps[2]])
    assert router.pick(info) is home
    router.update([e for e in eps if e is not home])
    assert router.pick(info) is not home


def test_request_info_from_an_openai_body_routes_by_its_prefix(clock):
    system = {"role": "system", "content": "You answer questions about the ACME API. " * 10}
    eps = endpoints(3)
    router = Router(eps, "prefix-load", clock=clock)
    homes = set()
    for i in range(5):
        body = {"model": "m", "messages": [system, {"role": "user", "content": f"q{i}?"}]}
        info = RequestInfo.from_openai(body, tenant="t")
        assert info.prompt_tokens > 100 and len(info.prefix_hashes) >= 6
        e = router.pick(info)
        router.on_start(e)
        router.on_finish(e)
        homes.add(e.url)
    assert len(homes) == 1
    embeddings = RequestInfo.from_openai({"model": "m", "input": "hello"})
    assert embeddings.prefix_hashes == () and router.pick(embeddings) in eps
