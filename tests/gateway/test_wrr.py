"""Load-aware weights (gRFC A58, Envoy CSWRR; brief ai-gateway.md §2.2, §2.6.2, oracle §3)."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

from datahall.gateway.orca import OrcaLoadReport, parse_orca
from datahall.gateway.wrr import (
    EdfScheduler,
    EndpointWeight,
    WeightedRoundRobin,
    WrrConfig,
    orca_utilization,
    orca_weight,
    scheduling_weights,
)


def load(utilization: float, qps: float = 100.0, eps: float = 0.0) -> OrcaLoadReport:
    return OrcaLoadReport(cpu_utilization=utilization, rps_fractional=qps, eps=eps)


def warm_up(wrr: WeightedRoundRobin, clock, reports: dict[str, OrcaLoadReport]) -> None:
    """Send `reports` every second from the clock's time through the 10 s blackout."""
    start = clock.now
    for step in range(11):
        clock.now = start + step
        for address, report in reports.items():
            wrr.report(address, report)


# --- the weight formula -----------------------------------------------------------------------


def test_brief_oracle_weights():
    assert orca_weight(load(0.5, qps=100.0)) == 200.0
    weight = orca_weight(load(0.5, qps=100.0, eps=10.0), error_utilization_penalty=1.0)
    assert weight == pytest.approx(100 / 0.6)
    assert round(weight, 2) == 166.67


def test_penalty_scales_the_error_term_and_zero_disables_it():
    report = load(0.5, qps=100.0, eps=10.0)
    assert orca_weight(report, error_utilization_penalty=0.0) == 200.0
    assert orca_weight(report, error_utilization_penalty=2.0) == pytest.approx(100 / 0.7)


def test_application_utilization_is_preferred_over_cpu():
    report = OrcaLoadReport(cpu_utilization=0.9, application_utilization=0.25, rps_fractional=10.0)
    assert orca_utilization(report) == 0.25
    assert orca_weight(report) == 40.0


def test_metric_names_take_the_max_when_application_utilization_is_unset():
    report = OrcaLoadReport(
        cpu_utilization=0.9,
        mem_utilization=0.7,
        named_metrics={"kv_cache_usage_perc": 0.4},
        utilization={"gpu": 0.6},
        request_cost={"tokens": 0.2},
    )
    names = ["named_metrics.kv_cache_usage_perc", "utilization.gpu", "request_cost.tokens"]
    assert orca_utilization(report, names) == 0.6
    assert orca_utilization(report, ["named_metrics.kv_cache_usage_perc"]) == 0.4
    assert orca_utilization(report, ["mem_utilization"]) == 0.7
    # Missing or zero metrics fall back to cpu_utilization...
    assert orca_utilization(report, ["named_metrics.absent"]) == 0.9
    # ...and application_utilization still wins.
    report.application_utilization = 0.3
    assert orca_utilization(report, names) == 0.3


@pytest.mark.parametrize(
    "report",
    [
        load(0.5, qps=0.0),
        load(0.0, qps=100.0),
        load(0.0, qps=100.0, eps=5.0),  # A58 adds the penalty only to a positive utilization
        load(-0.5, qps=100.0),
        OrcaLoadReport(),
    ],
)
def test_reports_without_qps_or_utilization_give_no_weight(report):
    assert orca_weight(report) == 0.0


def test_vllm_report_with_measured_qps():
    # vLLM reports no rate and no cpu: the gateway supplies qps and weighs by KV-cache usage.
    report = parse_orca(
        {
            "endpoint-load-metrics": "TEXT named_metrics.kv_cache_usage_perc=0.4, "
            "named_metrics.num_requests_waiting=3.0"
        }
    )
    assert report is not None
    names = ("named_metrics.kv_cache_usage_perc",)
    assert orca_weight(report, metric_names_for_computing_utilization=names) == 0.0
    weight = orca_weight(report, qps=50.0, metric_names_for_computing_utilization=names)
    assert weight == 125.0


# --- configuration ----------------------------------------------------------------------------


def test_config_defaults_are_a58s():
    config = WrrConfig()
    assert config.blackout_period == 10.0
    assert config.weight_expiration_period == 180.0
    assert config.weight_update_period == 1.0
    assert config.error_utilization_penalty == 1.0
    assert config.metric_names_for_computing_utilization == ()


def test_config_validation():
    assert WrrConfig(weight_update_period=0.05).weight_update_period == 0.1
    assert WrrConfig(weight_update_period=0.5).weight_update_period == 0.5
    assert WrrConfig(metric_names_for_computing_utilization=["utilization.gpu"]) == WrrConfig(
        metric_names_for_computing_utilization=("utilization.gpu",)
    )
    with pytest.raises(ValueError, match="error_utilization_penalty"):
        WrrConfig(error_utilization_penalty=-0.1)
    with pytest.raises(ValueError, match="blackout_period"):
        WrrConfig(blackout_period=-1)
    with pytest.raises(ValueError, match="weight_expiration_period"):
        WrrConfig(weight_expiration_period=0)
    with pytest.raises(ValueError, match="weight_update_period"):
        WrrConfig(weight_update_period=0)
    for bad in ("kv_cache_usage_perc", "named_metrics.", "eps", "rps_fractional"):
        with pytest.raises(ValueError, match="cannot give a utilization"):
            WrrConfig(metric_names_for_computing_utilization=(bad,))


# --- blackout and expiry under a fake clock (invariant §2.6.2) --------------------------------


def test_blackout_period_is_ten_seconds(clock):
    wrr = WeightedRoundRobin(["a", "b"], clock=clock)
    for second in range(10):
        clock.now = float(second)
        wrr.report("a", load(0.25))
        wrr.report("b", load(0.5))
        assert wrr.endpoint_weights() == {"a": 0.0, "b": 0.0}
        assert wrr.weights() == {"a": 1.0, "b": 1.0}  # round robin meanwhile
    clock.now = 9.999
    assert wrr.endpoint_weights() == {"a": 0.0, "b": 0.0}
    clock.now = 10.0
    assert wrr.endpoint_weights() == {"a": 400.0, "b": 200.0}
    assert wrr.endpoint("a").non_empty_since == 0.0
    assert wrr.endpoint("a").last_updated == 9.0


def test_blackout_counts_from_the_first_usable_report(clock):
    wrr = WeightedRoundRobin(["a"], clock=clock)
    wrr.report("a", load(0.0))  # no utilization: ignored, starts nothing
    clock.now = 5.0
    wrr.report("a", load(0.5))
    clock.now = 14.0
    assert wrr.endpoint_weights() == {"a": 0.0}
    clock.now = 15.0
    assert wrr.endpoint_weights() == {"a": 200.0}


def test_weight_expires_after_three_minutes_and_blackout_starts_again(clock):
    wrr = WeightedRoundRobin(["a", "b"], clock=clock)
    warm_up(wrr, clock, {"a": load(0.25), "b": load(0.5)})  # last reports at t=10
    clock.now = 10.0 + 179.999
    assert wrr.endpoint_weights() == {"a": 400.0, "b": 200.0}
    clock.now = 10.0 + 180.0
    assert wrr.endpoint_weights() == {"a": 0.0, "b": 0.0}
    assert wrr.endpoint("a").non_empty_since is None
    assert wrr.weights() == {"a": 1.0, "b": 1.0}
    # Fresh reports: a new 10 s blackout before the weights count again.
    clock.now = 200.0
    wrr.report("a", load(0.25))
    wrr.report("b", load(0.5))
    clock.now = 209.0
    assert wrr.endpoint_weights() == {"a": 0.0, "b": 0.0}
    clock.now = 210.0
    assert wrr.endpoint_weights() == {"a": 400.0, "b": 200.0}


def test_a_report_after_expiry_restarts_blackout_even_without_a_lookup_in_between(clock):
    wrr = WeightedRoundRobin(["a"], clock=clock)
    warm_up(wrr, clock, {"a": load(0.5)})
    clock.now = 500.0  # silence far past the expiry, and nobody looked at the weight
    wrr.report("a", load(0.5))
    assert wrr.endpoint("a").non_empty_since == 500.0
    clock.now = 505.0
    assert wrr.endpoint_weights() == {"a": 0.0}


def test_custom_periods(clock):
    config = WrrConfig(blackout_period=0.0, weight_expiration_period=5.0)
    wrr = WeightedRoundRobin(["a", "b"], config=config, clock=clock)
    wrr.report("a", load(0.25))
    wrr.report("b", load(0.5))
    assert wrr.endpoint_weights() == {"a": 400.0, "b": 200.0}  # no blackout
    clock.now = 5.0
    assert wrr.endpoint_weights() == {"a": 0.0, "b": 0.0}


def test_on_ready_restarts_the_blackout(clock):
    wrr = WeightedRoundRobin(["a", "b"], clock=clock)
    warm_up(wrr, clock, {"a": load(0.25), "b": load(0.5)})
    wrr.on_ready("a")
    wrr.on_ready("unknown")  # ignored
    clock.now = 11.0
    wrr.report("a", load(0.25))
    wrr.report("b", load(0.5))
    assert wrr.endpoint_weights() == {"a": 0.0, "b": 200.0}
    clock.now = 21.0
    assert wrr.endpoint_weights()["a"] == 400.0


def test_endpoint_weight_keeps_the_latest_weight():
    state = EndpointWeight()
    state.update_weight(100.0, now=0.0, weight_expiration_period=180.0)
    state.update_weight(0.0, now=1.0, weight_expiration_period=180.0)  # ignored
    state.update_weight(300.0, now=2.0, weight_expiration_period=180.0)
    assert state == EndpointWeight(weight=300.0, non_empty_since=0.0, last_updated=2.0)
    assert state.get_weight(12.0, blackout_period=10.0, weight_expiration_period=180.0) == 300.0


# --- scheduling weights: mean fill and round robin --------------------------------------------


def test_scheduling_weights():
    assert scheduling_weights([]) is None
    assert scheduling_weights([0.0, 0.0]) is None
    assert scheduling_weights([5.0]) is None
    assert scheduling_weights([5.0, 0.0, 0.0]) is None
    assert scheduling_weights([1.0, 3.0]) == [1.0, 3.0]
    assert scheduling_weights([100.0, 0.0, 300.0, 0.0]) == [100.0, 200.0, 300.0, 200.0]


def test_zero_weight_endpoints_get_the_mean_weight(clock):
    wrr = WeightedRoundRobin(["a", "b", "c"], clock=clock)
    warm_up(wrr, clock, {"a": load(1.0), "b": load(1 / 3)})  # weights 100 and 300
    assert wrr.endpoint_weights() == {"a": 100.0, "b": pytest.approx(300.0), "c": 0.0}
    assert wrr.weights() == {"a": 100.0, "b": pytest.approx(300.0), "c": pytest.approx(200.0)}
    counts = Counter(wrr.pick() for _ in range(6000))
    assert counts["a"] == pytest.approx(1000, abs=2)
    assert counts["b"] == pytest.approx(3000, abs=2)
    assert counts["c"] == pytest.approx(2000, abs=2)


def test_round_robin_with_fewer_than_two_weighted_endpoints(clock):
    wrr = WeightedRoundRobin(["a", "b", "c"], clock=clock, seed=3)
    warm_up(wrr, clock, {"a": load(0.01)})  # one endpoint with a (large) weight
    assert wrr.endpoint_weights() == {"a": 10000.0, "b": 0.0, "c": 0.0}
    assert wrr.weights() == {"a": 1.0, "b": 1.0, "c": 1.0}
    picks = [wrr.pick() for _ in range(30)]
    for start in range(0, 30, 3):
        assert sorted(picks[start : start + 3]) == ["a", "b", "c"]
    assert picks[:3] == picks[3:6]  # a fixed rotation


def test_round_robin_with_no_reports_at_all(clock):
    wrr = WeightedRoundRobin(["a", "b"], clock=clock)
    picks = [wrr.pick() for _ in range(10)]
    assert Counter(picks) == {"a": 5, "b": 5}
    assert all(x != y for x, y in zip(picks, picks[1:], strict=False))


# --- long-run share converges to the weight share (invariant §2.6.2) --------------------------


@pytest.mark.parametrize(
    "utilizations",
    [
        {"a": 1.0, "b": 0.5, "c": 1 / 3, "d": 0.25},  # weights 100 : 200 : 300 : 400
        {"a": 0.9, "b": 0.1},  # a 1 : 9 split
        {"a": 0.5, "b": 0.5, "c": 0.5},  # equal weights
    ],
)
def test_pick_share_converges_to_weight_share(utilizations, clock):
    wrr = WeightedRoundRobin(list(utilizations), clock=clock, seed=7)
    warm_up(wrr, clock, {a: load(u) for a, u in utilizations.items()})
    weights = wrr.weights()
    total = sum(weights.values())
    picks = 10_000
    counts = Counter(wrr.pick() for _ in range(picks))
    observed = [counts[a] for a in utilizations]
    expected = [picks * weights[a] / total for a in utilizations]
    assert stats.chisquare(observed, expected).pvalue > 0.05
    # EDF is deterministic, so it is far tighter than sampling: within one pick per address.
    for obs, exp in zip(observed, expected, strict=True):
        assert abs(obs - exp) <= 1.0


@given(
    st.lists(st.floats(min_value=0.01, max_value=100.0), min_size=2, max_size=8),
    st.integers(0, 2**32),
)
def test_edf_share_matches_weights(weights, seed):
    edf = EdfScheduler(weights, random.Random(seed))
    picks = 2000
    counts = Counter(edf.pick() for _ in range(picks))
    total = sum(weights)
    for index, weight in enumerate(weights):
        # After time T each index has T*weight picks, give or take one (its random offset lies
        # within one period), so its share of all picks is off by at most 1 + share*(n - 1).
        share = weight / total
        assert abs(counts[index] - picks * share) <= 1.0 + share * (len(weights) - 1) + 1e-9


def test_edf_offsets_are_seeded():
    a = EdfScheduler([1.0, 1.0, 1.0, 1.0], random.Random(1))
    b = EdfScheduler([1.0, 1.0, 1.0, 1.0], random.Random(1))
    order_a = [a.pick() for _ in range(8)]
    assert order_a == [b.pick() for _ in range(8)]
    orders = set()
    for seed in range(20):
        edf = EdfScheduler([1.0, 1.0, 1.0, 1.0], random.Random(seed))
        orders.add(tuple(edf.pick() for _ in range(4)))
    assert len(orders) > 1  # random offsets: endpoints do not all start in the same order


def test_edf_rejects_bad_weights():
    with pytest.raises(ValueError, match="at least one"):
        EdfScheduler([], random.Random(0))
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="positive and finite"):
            EdfScheduler([1.0, bad], random.Random(0))


# --- weight_update_period: new weights take effect at the next rebuild -------------------------


def test_new_weights_apply_after_the_update_period(clock):
    wrr = WeightedRoundRobin(["a", "b"], clock=clock)
    warm_up(wrr, clock, {"a": load(0.5), "b": load(0.5)})  # equal, t=10
    assert Counter(wrr.pick() for _ in range(100)) == {"a": 50, "b": 50}
    clock.now = 10.5
    wrr.report("a", load(0.5 / 9))  # a is now 9x b
    assert wrr.weights()["a"] == pytest.approx(1800.0)
    # Still the schedule built at t=10: the period (1 s) has not passed.
    assert Counter(wrr.pick() for _ in range(100)) == {"a": 50, "b": 50}
    clock.now = 11.0
    counts = Counter(wrr.pick() for _ in range(100))
    assert counts["a"] == pytest.approx(90, abs=1)


def test_rebuild_applies_new_weights_at_once(clock):
    wrr = WeightedRoundRobin(["a", "b"], clock=clock)
    warm_up(wrr, clock, {"a": load(0.5), "b": load(0.5)})
    wrr.pick()
    wrr.report("a", load(0.5 / 3))
    wrr.rebuild()
    counts = Counter(wrr.pick() for _ in range(400))
    assert counts["a"] == pytest.approx(300, abs=1)


# --- resolver updates: weights are keyed by address --------------------------------------------


def test_update_keeps_weights_of_known_addresses(clock):
    wrr = WeightedRoundRobin(["a", "b"], clock=clock)
    warm_up(wrr, clock, {"a": load(0.25), "b": load(0.5)})
    wrr.update(["b", "a", "c", "a"])  # reordered, one new, one duplicate
    assert wrr.addresses == ("b", "a", "c")
    assert wrr.endpoint_weights() == {"b": 200.0, "a": 400.0, "c": 0.0}
    assert wrr.weights() == {"b": 200.0, "a": 400.0, "c": 300.0}
    counts = Counter(wrr.pick() for _ in range(900))
    assert counts == pytest.approx({"b": 200, "a": 400, "c": 300}, abs=1)


def test_update_drops_removed_addresses(clock):
    wrr = WeightedRoundRobin(["a", "b", "c"], clock=clock)
    warm_up(wrr, clock, {"a": load(0.25), "b": load(0.5), "c": load(0.5)})
    wrr.update(["a", "c"])
    assert {wrr.pick() for _ in range(50)} == {"a", "c"}
    assert wrr.report("b", load(0.5)) == 0.0  # a report racing the update is ignored
    with pytest.raises(KeyError):
        wrr.endpoint("b")
    wrr.update(["a", "b", "c"])  # b comes back: new state, new blackout
    assert wrr.endpoint("b") == EndpointWeight()


def test_pick_with_no_addresses(clock):
    wrr = WeightedRoundRobin([], clock=clock)
    with pytest.raises(LookupError, match="no endpoints"):
        wrr.pick()
    wrr.update(["a"])
    assert wrr.pick() == "a"


def test_report_returns_the_weight_and_uses_config(clock):
    config = WrrConfig(
        error_utilization_penalty=2.0,
        metric_names_for_computing_utilization=("named_metrics.kv_cache_usage_perc",),
    )
    wrr = WeightedRoundRobin(["a"], config=config, clock=clock)
    report = OrcaLoadReport(named_metrics={"kv_cache_usage_perc": 0.4}, eps=1.0)
    assert wrr.report("a", report) == 0.0  # no qps in the report
    assert wrr.report("a", report, qps=10.0) == pytest.approx(10.0 / (0.4 + 0.1 * 2.0))


def test_same_seed_same_picks(clock):
    def run(seed: int) -> list[str]:
        clock.now = 0.0
        wrr = WeightedRoundRobin(["a", "b", "c"], clock=clock, seed=seed)
        warm_up(wrr, clock, {"a": load(0.3), "b": load(0.6), "c": load(0.9)})
        return [wrr.pick() for _ in range(50)]

    assert run(1) == run(1)
