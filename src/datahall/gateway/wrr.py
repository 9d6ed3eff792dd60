"""Load-aware endpoint weights: gRPC's weighted round robin over ORCA reports.

gRFC A58 (``weighted_round_robin``) and Envoy's ``client_side_weighted_round_robin`` weigh each
endpoint by the load it reports (brief ``ai-gateway.md`` §2.2)::

    weight = qps / (utilization + eps / qps * error_utilization_penalty)

where qps is the report's ``rps_fractional`` (or a rate the gateway measures itself), and
utilization is ``application_utilization`` when set, else the largest of Envoy's
``metric_names_for_computing_utilization`` (e.g. ``named_metrics.kv_cache_usage_perc`` for vLLM),
else ``cpu_utilization``. A weight counts only once reports have been arriving for
``blackout_period`` (10 s) and stops counting when none arrived for ``weight_expiration_period``
(3 min), after which the blackout starts again. Every ``weight_update_period`` (1 s, at least
100 ms) the weights are read again: endpoints without a weight get the mean of the others, and
with fewer than two weighted endpoints the picker is plain round robin. Picks come from an
earliest-deadline-first (EDF) schedule in which each endpoint's deadline advances by 1/weight.

>>> now = 0.0
>>> wrr = WeightedRoundRobin(["10.0.0.1:8000", "10.0.0.2:8000"], clock=lambda: now)
>>> for now in (0.0, 5.0, 10.0):  # reports keep arriving through the 10 s blackout
...     _ = wrr.report("10.0.0.1:8000", OrcaLoadReport(cpu_utilization=0.25, rps_fractional=100.0))
...     _ = wrr.report("10.0.0.2:8000", OrcaLoadReport(cpu_utilization=0.5, rps_fractional=100.0))
>>> wrr.weights()
{'10.0.0.1:8000': 400.0, '10.0.0.2:8000': 200.0}
>>> picks = [wrr.pick() for _ in range(300)]
>>> picks.count("10.0.0.1:8000"), picks.count("10.0.0.2:8000")
(200, 100)

Weights are kept by address, so a resolver update (`WeightedRoundRobin.update`) keeps the state
of the endpoints that stay. The class is not thread-safe: the gateway drives it from one event
loop.
"""

from __future__ import annotations

import heapq
import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from datahall.gateway.orca import OrcaLoadReport

__all__ = [
    "EdfScheduler",
    "EndpointWeight",
    "WeightedRoundRobin",
    "WrrConfig",
    "orca_utilization",
    "orca_weight",
    "scheduling_weights",
]

_MIN_WEIGHT_UPDATE_PERIOD = 0.1  # A58: "Values less than 100ms are capped at 100ms."
_SCALAR_UTILIZATIONS = ("cpu_utilization", "mem_utilization", "application_utilization")
_MAP_PREFIXES = ("named_metrics.", "utilization.", "request_cost.")


@dataclass(frozen=True, slots=True)
class WrrConfig:
    """The knobs of A58's ``WeightedRoundRobinLbConfig`` and Envoy's CSWRR, in seconds.

    ``metric_names_for_computing_utilization`` lists ``cpu_utilization``, ``mem_utilization``,
    ``application_utilization``, ``named_metrics.<name>``, ``utilization.<name>`` or
    ``request_cost.<name>``. A ``weight_update_period`` under 100 ms is raised to 100 ms, as in A58.

    >>> WrrConfig(weight_update_period=0.01).weight_update_period
    0.1
    >>> WrrConfig(error_utilization_penalty=-1)
    Traceback (most recent call last):
    ...
    ValueError: error_utilization_penalty must be >= 0 (gRFC A58 rejects negative values), got -1
    """

    blackout_period: float = 10.0
    weight_expiration_period: float = 180.0
    weight_update_period: float = 1.0
    error_utilization_penalty: float = 1.0
    metric_names_for_computing_utilization: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.error_utilization_penalty >= 0:
            raise ValueError(
                "error_utilization_penalty must be >= 0 (gRFC A58 rejects negative values), "
                f"got {self.error_utilization_penalty}"
            )
        if not self.blackout_period >= 0:
            raise ValueError(f"blackout_period must be >= 0 s, got {self.blackout_period}")
        if not self.weight_expiration_period > 0:
            raise ValueError(
                f"weight_expiration_period must be > 0 s, got {self.weight_expiration_period}"
            )
        if not self.weight_update_period > 0:
            raise ValueError(f"weight_update_period must be > 0 s, got {self.weight_update_period}")
        # frozen: set the normalised values through object.__setattr__.
        object.__setattr__(
            self,
            "weight_update_period",
            max(float(self.weight_update_period), _MIN_WEIGHT_UPDATE_PERIOD),
        )
        names = tuple(self.metric_names_for_computing_utilization)
        for name in names:
            _check_metric_name(name)
        object.__setattr__(self, "metric_names_for_computing_utilization", names)


def _check_metric_name(name: str) -> None:
    if name in _SCALAR_UTILIZATIONS:
        return
    for prefix in _MAP_PREFIXES:
        if name.startswith(prefix) and len(name) > len(prefix):
            return
    raise ValueError(
        f"metric name {name!r} cannot give a utilization; use one of "
        f"{', '.join(_SCALAR_UTILIZATIONS)} or named_metrics.<name>, utilization.<name>, "
        "request_cost.<name>"
    )


def _metric(report: OrcaLoadReport, name: str) -> float:
    if name in _SCALAR_UTILIZATIONS:
        return getattr(report, name)
    prefix, _, key = name.partition(".")
    return getattr(report, prefix).get(key, 0.0)


def orca_utilization(report: OrcaLoadReport, metric_names: Sequence[str] = ()) -> float:
    """The utilization that weighs an endpoint, in Envoy CSWRR's order of preference.

    ``application_utilization`` if > 0; else the largest of `metric_names` if > 0; else
    ``cpu_utilization``.

    >>> report = OrcaLoadReport(cpu_utilization=0.9, named_metrics={"kv_cache_usage_perc": 0.4})
    >>> orca_utilization(report)
    0.9
    >>> orca_utilization(report, ["named_metrics.kv_cache_usage_perc"])
    0.4
    """
    if report.application_utilization > 0:
        return report.application_utilization
    if metric_names:
        largest = max(_metric(report, name) for name in metric_names)
        if largest > 0:
            return largest
    return report.cpu_utilization


def orca_weight(
    report: OrcaLoadReport,
    *,
    qps: float | None = None,
    error_utilization_penalty: float = 1.0,
    metric_names_for_computing_utilization: Sequence[str] = (),
) -> float:
    """The A58 weight ``qps / (utilization + eps/qps * error_utilization_penalty)`` of a report.

    `qps` defaults to the report's ``rps_fractional``; pass the rate the gateway measured for
    servers that report no rate (vLLM sends only named metrics). Returns 0.0, meaning "ignore
    this report", when qps or utilization is not positive, as A58's ``UpdateWeight`` does.

    >>> orca_weight(OrcaLoadReport(cpu_utilization=0.5, rps_fractional=100.0))
    200.0
    >>> round(orca_weight(OrcaLoadReport(cpu_utilization=0.5, rps_fractional=100.0, eps=10.0)), 2)
    166.67
    """
    rate = report.rps_fractional if qps is None else qps
    utilization = orca_utilization(report, metric_names_for_computing_utilization)
    if not (rate > 0 and utilization > 0):
        return 0.0
    if report.eps > 0 and error_utilization_penalty > 0:
        # Errors count as extra utilization, so a failing endpoint loses traffic.
        utilization += report.eps / rate * error_utilization_penalty
    weight = rate / utilization
    # A subnormal utilization can overflow the quotient; such a report cannot be trusted.
    return weight if math.isfinite(weight) else 0.0


@dataclass(slots=True)
class EndpointWeight:
    """One endpoint's weight with the two timestamps of A58 §"Subchannel Weights".

    ``non_empty_since`` is when the current run of usable reports began (None: no run, A58's
    "infinity"); ``last_updated`` is when the last usable report arrived.

    >>> w = EndpointWeight()
    >>> w.update_weight(200.0, now=0.0, weight_expiration_period=180.0)
    >>> w.get_weight(now=5.0, blackout_period=10.0, weight_expiration_period=180.0)
    0.0
    >>> w.get_weight(now=10.0, blackout_period=10.0, weight_expiration_period=180.0)
    200.0
    >>> w.get_weight(now=180.0, blackout_period=10.0, weight_expiration_period=180.0)
    0.0
    """

    weight: float = 0.0
    non_empty_since: float | None = None
    last_updated: float | None = None

    def update_weight(self, weight: float, now: float, weight_expiration_period: float) -> None:
        """Record a weight computed from a report received at `now`; a zero weight is ignored."""
        if weight <= 0:
            return
        # A58 resets non_empty_since when a lookup finds the weight expired. Lookups here happen
        # only on picks, so check expiry on arrival too: a report after a long silence must start
        # a fresh blackout however the lookups were timed.
        if self.last_updated is not None and now - self.last_updated >= weight_expiration_period:
            self.non_empty_since = None
        if self.non_empty_since is None:
            self.non_empty_since = now
        self.last_updated = now
        self.weight = weight

    def get_weight(
        self, now: float, blackout_period: float, weight_expiration_period: float
    ) -> float:
        """The weight usable at `now`: 0.0 while in blackout, when expired, or never reported."""
        if self.last_updated is None or self.non_empty_since is None:
            return 0.0
        if now - self.last_updated >= weight_expiration_period:
            self.non_empty_since = None  # stale: the next report starts a new blackout
            return 0.0
        if blackout_period > 0 and now - self.non_empty_since < blackout_period:
            return 0.0
        return self.weight

    def reset(self) -> None:
        """A58's ``OnSubchannelBecomesReady``: a reconnected endpoint goes through blackout."""
        self.non_empty_since = None


def scheduling_weights(weights: Sequence[float]) -> list[float] | None:
    """The weights to schedule with, or None when A58 says to use plain round robin.

    Endpoints whose weight is 0 (no usable report) are picked with the mean of the non-zero
    weights; with fewer than two non-zero weights there is nothing to balance by, so None.

    >>> scheduling_weights([100.0, 0.0, 300.0])
    [100.0, 200.0, 300.0]
    >>> scheduling_weights([100.0, 0.0, 0.0]) is None
    True
    """
    known = [w for w in weights if w > 0]
    if len(known) < 2:
        return None
    mean = math.fsum(known) / len(known)
    return [w if w > 0 else mean for w in weights]


class EdfScheduler:
    """Earliest-deadline-first over positive weights (A58 §"EDF Scheduler").

    Each index is a job whose period is 1/weight; its first deadline is a random point in
    [0, period], so that endpoints do not start in lockstep; `pick` returns the index with the
    earliest deadline (the lower index on a tie) and moves that deadline one period on.

    >>> edf = EdfScheduler([3.0, 1.0], random.Random(0))
    >>> "".join("ab"[edf.pick()] for _ in range(8))
    'aabaaaba'
    """

    __slots__ = ("_heap", "_periods")

    def __init__(self, weights: Sequence[float], rng: random.Random) -> None:
        if not weights:
            raise ValueError("an EDF schedule needs at least one weight")
        for weight in weights:
            if not (weight > 0 and math.isfinite(weight)):
                raise ValueError(f"EDF weights must be positive and finite, got {weight}")
        self._periods = [1.0 / w for w in weights]
        self._heap = [(rng.random() * period, i) for i, period in enumerate(self._periods)]
        heapq.heapify(self._heap)

    def pick(self) -> int:
        deadline, index = self._heap[0]
        heapq.heapreplace(self._heap, (deadline + self._periods[index], index))
        return index


class WeightedRoundRobin:
    """A58 weighted round robin over endpoint addresses, fed with ORCA reports.

    `report` records a response's load; `pick` returns the next address. The weights are read
    and the schedule rebuilt at most every ``weight_update_period``, lazily on `pick` (or on
    `rebuild`), so there is no timer to run. `clock` returns seconds (``time.monotonic`` by
    default; tests pass a fake); `seed` fixes the random EDF offsets and the round-robin start.
    """

    def __init__(
        self,
        addresses: Iterable[str],
        *,
        config: WrrConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        seed: int | None = 0,
    ) -> None:
        self.config = config or WrrConfig()
        self._clock = clock
        self._rng = random.Random(seed)
        self._endpoints: dict[str, EndpointWeight] = {}
        self._addresses: list[str] = []
        self._scheduler: EdfScheduler | None = None
        self._rr_next = 0
        self._built_at = -math.inf
        self.update(addresses)
        if self._addresses:
            # gRPC's round robin starts at a random index, so that clients do not all start on
            # the same endpoint.
            self._rr_next = self._rng.randrange(len(self._addresses))

    @property
    def addresses(self) -> tuple[str, ...]:
        """The current endpoint addresses, in the order given."""
        return tuple(self._addresses)

    def update(self, addresses: Iterable[str]) -> None:
        """Replace the address list (a resolver update), keeping the weights of known addresses.

        Duplicates are dropped, as in A58; removed addresses lose their state, and the schedule is
        rebuilt now.
        """
        self._addresses = list(dict.fromkeys(addresses))
        self._endpoints = {a: self._endpoints.get(a) or EndpointWeight() for a in self._addresses}
        if self._addresses:
            self._rr_next %= len(self._addresses)
        self.rebuild()

    def endpoint(self, address: str) -> EndpointWeight:
        """The weight state kept for `address` (KeyError for an unknown address)."""
        return self._endpoints[address]

    def report(self, address: str, report: OrcaLoadReport, *, qps: float | None = None) -> float:
        """Record `report` from `address`; return the weight it gave (0.0: report ignored).

        `qps` replaces the report's ``rps_fractional`` (see `orca_weight`). A report from an
        address no longer in the list is ignored: it raced a resolver update.
        """
        state = self._endpoints.get(address)
        if state is None:
            return 0.0
        weight = orca_weight(
            report,
            qps=qps,
            error_utilization_penalty=self.config.error_utilization_penalty,
            metric_names_for_computing_utilization=self.config.metric_names_for_computing_utilization,
        )
        state.update_weight(weight, self._clock(), self.config.weight_expiration_period)
        return weight

    def on_ready(self, address: str) -> None:
        """`address` (re)connected or passed its health check again: its blackout restarts."""
        if address in self._endpoints:
            self._endpoints[address].reset()

    def endpoint_weights(self) -> dict[str, float]:
        """Each address's usable weight now (0.0 in blackout, expired, or never reported)."""
        now = self._clock()
        cfg = self.config
        return {
            address: state.get_weight(now, cfg.blackout_period, cfg.weight_expiration_period)
            for address, state in self._endpoints.items()
        }

    def weights(self) -> dict[str, float]:
        """The weights picks follow now: usable weights with zeros filled by their mean, or 1.0
        for every address when fewer than two have a usable weight (round robin)."""
        usable = self.endpoint_weights()
        filled = scheduling_weights(list(usable.values()))
        if filled is None:
            return dict.fromkeys(usable, 1.0)
        return dict(zip(usable, filled, strict=True))

    def rebuild(self) -> None:
        """Read the weights now and start a new schedule (A58's ``weight_update_period`` tick)."""
        self._built_at = self._clock()
        filled = scheduling_weights(list(self.endpoint_weights().values()))
        self._scheduler = None if filled is None else EdfScheduler(filled, self._rng)

    def pick(self) -> str:
        """The address to send the next request to."""
        if not self._addresses:
            raise LookupError("no endpoints to pick from: give WeightedRoundRobin an address")
        if self._clock() - self._built_at >= self.config.weight_update_period:
            self.rebuild()
        if self._scheduler is not None:
            return self._addresses[self._scheduler.pick()]
        address = self._addresses[self._rr_next]
        self._rr_next = (self._rr_next + 1) % len(self._addresses)
        return address
