"""A small discrete-event engine shared by the datahall systems.

Three pieces, in the style of SimPy but a fraction of its size:

- :class:`Simulator`: a clock and a heap of timed callbacks. Callbacks due at the same time run
  in the order they were scheduled (every entry carries a sequence number), so a run is
  deterministic.
- :class:`Event` and processes: an event is triggered once with :meth:`Event.succeed`; a
  *process* is a generator that yields a delay in seconds (a number) or an event to wait for,
  and receives the event's value back. :meth:`Simulator.all_of` waits for several events.
- Links: :class:`FifoLink` (transmissions serialise; one of `size` bytes that starts at t
  arrives at t + size/bandwidth + latency), :class:`PriorityLink` (transmissions serialise,
  the waiting one with the smallest priority goes next) and :class:`ProcessorSharingLink`
  (transfers in progress share the bandwidth equally; rates change whenever one starts or
  ends).

Units are the caller's: datahall uses seconds, bytes and bytes per second.

>>> sim = Simulator()
>>> link = FifoLink(sim, bandwidth=10.0, latency=1.0)
>>> def sender(sim, link):
...     first = link.transmit(20)   # on the wire 0..2, arrives at 3
...     second = link.transmit(10)  # waits for the first: on the wire 2..3, arrives at 4
...     sizes = yield sim.all_of([first, second])
...     return sim.now, sizes
>>> p = sim.process(sender(sim, link))
>>> sim.run()
4.0
>>> p.value
(4.0, [20, 10])
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable, Generator, Hashable, Iterable
from numbers import Real
from typing import Any

__all__ = [
    "Simulator",
    "Timer",
    "Event",
    "Process",
    "FifoLink",
    "PriorityLink",
    "ProcessorSharingLink",
]


class Timer:
    """A scheduled callback; :meth:`cancel` stops it from running."""

    __slots__ = ("_entry",)

    def __init__(self, entry: list) -> None:
        self._entry = entry

    @property
    def time(self) -> float:
        """When the callback is (or was) due."""
        return self._entry[0]

    @property
    def cancelled(self) -> bool:
        return self._entry[2] is None

    def cancel(self) -> None:
        """Drop the callback; cancelling twice, or after it ran, does nothing."""
        self._entry[2] = None


class Simulator:
    """A discrete-event clock: a heap of (time, sequence, callback, args) entries.

    >>> sim = Simulator()
    >>> seen = []
    >>> _ = sim.schedule(2.0, seen.append, "b")
    >>> _ = sim.schedule(1.0, seen.append, "a")
    >>> _ = sim.schedule(2.0, seen.append, "c")   # same time as "b": runs after it
    >>> sim.run(), seen
    (2.0, ['a', 'b', 'c'])
    """

    def __init__(self) -> None:
        self.now: float = 0.0
        self.processed: int = 0
        self._queue: list[list] = []
        self._seq = itertools.count()

    def _at(self, time: float, callback: Callable[..., Any], args: tuple = ()) -> list:
        """Fast path for the engine's own parts: schedule at an absolute time (≥ now)."""
        entry = [time, next(self._seq), callback, args]
        heapq.heappush(self._queue, entry)
        return entry

    def schedule(self, delay: float, callback: Callable[..., Any], *args: Any) -> Timer:
        """Run ``callback(*args)`` `delay` seconds from now."""
        if not delay >= 0:
            raise ValueError(f"delay must be a number >= 0, got {delay!r}")
        return Timer(self._at(self.now + delay, callback, args))

    def event(self) -> Event:
        """A new, untriggered :class:`Event`."""
        return Event(self)

    def timeout(self, delay: float, value: Any = None) -> Event:
        """An event that succeeds with `value` `delay` seconds from now."""
        ev = Event(self)
        self.schedule(delay, ev.succeed, value)
        return ev

    def process(self, generator: Generator[Any, Any, Any]) -> Process:
        """Start `generator` as a process (it runs from the current time on)."""
        return Process(self, generator)

    def all_of(self, events: Iterable[Event]) -> Event:
        """An event that succeeds, with the list of their values, once all `events` have."""
        events = list(events)
        done = Event(self)
        remaining = [len(events)]
        if not events:
            done.succeed([])
            return done

        def one(_: Event) -> None:
            remaining[0] -= 1
            if remaining[0] == 0:
                done.succeed([e.value for e in events])

        for e in events:
            e.add_callback(one)
        return done

    def step(self) -> bool:
        """Run the next pending callback; False when none is left."""
        queue = self._queue
        while queue:
            time, _, callback, args = heapq.heappop(queue)
            if callback is None:
                continue
            self.now = time
            self.processed += 1
            callback(*args)
            return True
        return False

    def peek(self) -> float:
        """The time of the next pending callback (``inf`` when none)."""
        queue = self._queue
        while queue and queue[0][2] is None:
            heapq.heappop(queue)
        return queue[0][0] if queue else float("inf")

    def run(self, until: float | None = None) -> float:
        """Run callbacks in time order until none is left, or until the next one is due after
        `until` (the clock then stands at `until`). Returns the clock."""
        queue = self._queue
        pop = heapq.heappop
        while queue:
            entry = queue[0]
            if until is not None and entry[0] > until:
                break
            pop(queue)
            callback = entry[2]
            if callback is None:
                continue
            self.now = entry[0]
            self.processed += 1
            callback(*entry[3])
        if until is not None and until > self.now:
            self.now = until
        return self.now


class Event:
    """Something that happens once. Waiters (callbacks and processes) are resumed at the time
    it succeeds, in the order they started waiting.

    >>> sim = Simulator()
    >>> ev = sim.event()
    >>> def waiter(sim, ev):
    ...     value = yield ev
    ...     return f"{value} at {sim.now}"
    >>> p = sim.process(waiter(sim, ev))
    >>> _ = sim.schedule(5, ev.succeed, "done")
    >>> sim.run(), p.value
    (5.0, 'done at 5.0')
    """

    __slots__ = ("sim", "triggered", "value", "_callbacks")

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.triggered = False
        self.value: Any = None
        self._callbacks: list[Callable[[Event], Any]] = []

    def succeed(self, value: Any = None) -> Event:
        """Trigger the event with `value`; its waiters run at the current time."""
        if self.triggered:
            raise RuntimeError("event already triggered; an Event succeeds only once")
        self.triggered = True
        self.value = value
        sim = self.sim
        for callback in self._callbacks:
            sim._at(sim.now, callback, (self,))
        self._callbacks = []
        return self

    def add_callback(self, callback: Callable[[Event], Any]) -> None:
        """Call ``callback(event)`` when the event succeeds (at once, in sim time, if it has)."""
        if self.triggered:
            self.sim._at(self.sim.now, callback, (self,))
        else:
            self._callbacks.append(callback)


class Process(Event):
    """A generator run as a process; the process is itself an event that succeeds with the
    generator's return value.

    The generator yields a number (wait that many seconds) or an :class:`Event` (wait for it;
    the ``yield`` expression evaluates to the event's value).
    """

    __slots__ = ("_generator",)

    def __init__(self, sim: Simulator, generator: Generator[Any, Any, Any]) -> None:
        super().__init__(sim)
        if not hasattr(generator, "send"):
            raise TypeError(
                f"process() needs a generator, got {type(generator).__name__}; "
                "call the generator function: sim.process(fn(...))"
            )
        self._generator = generator
        sim._at(sim.now, self._resume, (None,))

    def _resume(self, value: Any) -> None:
        try:
            target = self._generator.send(value)
        except StopIteration as stop:
            self.succeed(stop.value)
            return
        sim = self.sim
        if isinstance(target, Event):
            target.add_callback(self._wake)
        elif isinstance(target, Real) and target >= 0:
            sim._at(sim.now + float(target), self._resume, (None,))
        else:
            raise TypeError(
                f"a process yielded {target!r}; yield a delay in seconds (>= 0) or an Event"
            )

    def _wake(self, event: Event) -> None:
        self._resume(event.value)


def _check_link(bandwidth: float, latency: float) -> None:
    if not bandwidth > 0:
        raise ValueError(f"link bandwidth must be > 0, got {bandwidth!r}")
    if not latency >= 0:
        raise ValueError(f"link latency must be >= 0, got {latency!r}")


class FifoLink:
    """A link that sends one transmission at a time, first come first served.

    A transmission of `size` that reaches the link at t starts at s = max(t, end of the previous
    one), occupies the link until s + size/bandwidth and arrives at s + size/bandwidth +
    latency (latency is propagation: it does not occupy the link).

    >>> sim = Simulator()
    >>> link = FifoLink(sim, bandwidth=2.0, latency=1.0)
    >>> arrivals = []
    >>> for size in (4, 2):
    ...     _ = link.send(size, lambda: arrivals.append(sim.now))
    >>> sim.run(), arrivals
    (4.0, [3.0, 4.0])
    """

    __slots__ = ("sim", "bandwidth", "latency", "free_at", "bytes_sent", "busy_time")

    def __init__(self, sim: Simulator, bandwidth: float, latency: float = 0.0) -> None:
        _check_link(bandwidth, latency)
        self.sim = sim
        self.bandwidth = float(bandwidth)
        self.latency = float(latency)
        self.free_at = 0.0
        self.bytes_sent = 0.0
        self.busy_time = 0.0

    def send(
        self,
        size: float,
        callback: Callable[..., Any],
        *args: Any,
        flow: Hashable | None = None,
        priority: float = 0.0,
    ) -> float:
        """Queue `size` bytes; ``callback(*args)`` runs on arrival, whose time is returned.
        `flow` and `priority` are accepted so the three links are interchangeable (a FIFO
        link serves every transmission in arrival order anyway)."""
        sim = self.sim
        start = self.free_at if self.free_at > sim.now else sim.now
        duration = size / self.bandwidth
        self.free_at = start + duration
        self.bytes_sent += size
        self.busy_time += duration
        arrival = self.free_at + self.latency
        sim._at(arrival, callback, args)
        return arrival

    def transmit(self, size: float) -> Event:
        """Queue `size` bytes; the returned event succeeds with `size` on arrival."""
        ev = Event(self.sim)
        self.send(size, ev.succeed, size)
        return ev


class PriorityLink:
    """A link that sends one transmission at a time, the waiting one with the smallest
    `priority` first (ties in arrival order); a transmission on the wire is never preempted.

    With deadlines as priorities this is earliest-deadline-first, the order that lets several
    pipelines share a link each at its planned rate (a FIFO link serves whoever queued first).

    >>> sim = Simulator()
    >>> link = PriorityLink(sim, bandwidth=1.0)
    >>> order = []
    >>> for name, prio in (("a", 5), ("b", 9), ("c", 1)):
    ...     link.send(2, order.append, name, priority=prio)
    >>> sim.run(), order                # a is on the wire when b and c queue; c overtakes b
    (6.0, ['a', 'c', 'b'])
    """

    __slots__ = (
        "sim",
        "bandwidth",
        "latency",
        "bytes_sent",
        "busy_time",
        "_queue",
        "_busy",
        "_seq",
    )

    def __init__(self, sim: Simulator, bandwidth: float, latency: float = 0.0) -> None:
        _check_link(bandwidth, latency)
        self.sim = sim
        self.bandwidth = float(bandwidth)
        self.latency = float(latency)
        self.bytes_sent = 0.0
        self.busy_time = 0.0
        self._queue: list[tuple] = []  # heap of (priority, seq, size, callback, args)
        self._busy = False
        self._seq = itertools.count()

    def send(
        self,
        size: float,
        callback: Callable[..., Any],
        *args: Any,
        flow: Hashable | None = None,
        priority: float = 0.0,
    ) -> None:
        """Queue `size` bytes at `priority`; ``callback(*args)`` runs on arrival. `flow` is
        accepted so the links are interchangeable."""
        heapq.heappush(self._queue, (priority, next(self._seq), size, callback, args))
        if not self._busy:
            self._next()

    def transmit(self, size: float, priority: float = 0.0) -> Event:
        """Queue `size` bytes; the returned event succeeds with `size` on arrival."""
        ev = Event(self.sim)
        self.send(size, ev.succeed, size, priority=priority)
        return ev

    def _next(self) -> None:
        if not self._queue:
            self._busy = False
            return
        _, _, size, callback, args = heapq.heappop(self._queue)
        duration = size / self.bandwidth
        self._busy = True
        self.bytes_sent += size
        self.busy_time += duration
        sim = self.sim
        sim._at(sim.now + duration + self.latency, callback, args)
        sim._at(sim.now + duration, self._next)


class ProcessorSharingLink:
    """A link whose transfers in progress share its bandwidth equally (processor sharing).

    With n transfers in progress each is served at bandwidth/n; the rates change when a
    transfer starts or finishes. A transfer arrives `latency` after its last byte is served.
    Transfers tagged with the same `flow` are served one after another (FIFO within a flow,
    sharing across flows), which models one connection pipelining its chunks.

    Implementation: virtual time. V(t) is the service each in-progress transfer has received
    since t=0, growing at bandwidth/n; a transfer that starts at V₀ finishes when V reaches
    V₀ + size, so the next completion is the smallest tag in a heap.

    >>> sim = Simulator()
    >>> link = ProcessorSharingLink(sim, bandwidth=1.0)
    >>> done = {}
    >>> _ = link.send(4, lambda: done.setdefault("a", sim.now))             # alone on 0..1
    >>> _ = sim.schedule(1, link.send, 2, lambda: done.setdefault("b", sim.now))
    >>> sim.run(), done                 # from t=1 both at rate 1/2: b ends at 5, a at 6
    (6.0, {'b': 5.0, 'a': 6.0})
    """

    __slots__ = (
        "sim",
        "bandwidth",
        "latency",
        "bytes_sent",
        "_v",
        "_t",
        "_active",
        "_flows",
        "_timer",
        "_seq",
    )

    def __init__(self, sim: Simulator, bandwidth: float, latency: float = 0.0) -> None:
        _check_link(bandwidth, latency)
        self.sim = sim
        self.bandwidth = float(bandwidth)
        self.latency = float(latency)
        self.bytes_sent = 0.0
        self._v = 0.0  # virtual time: service per in-progress transfer so far
        self._t = 0.0  # real time at which _v was last brought up to date
        self._active: list[tuple] = []  # heap of (finish tag, seq, flow, callback, args)
        self._flows: dict[Hashable, deque] = {}  # flows with a transfer in progress
        self._timer: list | None = None
        self._seq = itertools.count()

    @property
    def in_progress(self) -> int:
        """How many transfers share the link now."""
        return len(self._active)

    def _advance(self) -> None:
        now = self.sim.now
        if self._active:
            self._v += (now - self._t) * self.bandwidth / len(self._active)
        self._t = now

    def _start(self, size: float, flow: Hashable | None, callback: Callable, args: tuple) -> None:
        self.bytes_sent += size
        heapq.heappush(self._active, (self._v + size, next(self._seq), flow, callback, args))

    def _reschedule(self) -> None:
        if self._timer is not None:
            self._timer[2] = None
            self._timer = None
        if self._active:
            tag = self._active[0][0]
            at = self._t + (tag - self._v) * len(self._active) / self.bandwidth
            now = self.sim.now
            self._timer = self.sim._at(at if at > now else now, self._complete)

    def send(
        self,
        size: float,
        callback: Callable[..., Any],
        *args: Any,
        flow: Hashable | None = None,
        priority: float = 0.0,
    ) -> None:
        """Start (or, behind an earlier transfer of the same `flow`, queue) `size` bytes;
        ``callback(*args)`` runs on arrival. `priority` is accepted so the links are
        interchangeable (sharing is equal)."""
        if flow is not None:
            waiting = self._flows.get(flow)
            if waiting is not None:
                waiting.append((size, callback, args))
                return
            self._flows[flow] = deque()
        self._advance()
        self._start(size, flow, callback, args)
        self._reschedule()

    def transmit(self, size: float, flow: Hashable | None = None) -> Event:
        """Send `size` bytes; the returned event succeeds with `size` on arrival."""
        ev = Event(self.sim)
        self.send(size, ev.succeed, size, flow=flow)
        return ev

    def _complete(self) -> None:
        self._timer = None
        self._advance()
        active = self._active
        tag = active[0][0]
        if tag > self._v:
            self._v = tag  # float drift: the head is due now
        finished = []
        while active and active[0][0] <= self._v:
            finished.append(heapq.heappop(active))
        sim = self.sim
        arrival = sim.now + self.latency
        for _, _, flow, callback, args in finished:
            sim._at(arrival, callback, args)
            if flow is not None:
                waiting = self._flows[flow]
                if waiting:
                    size, cb, a = waiting.popleft()
                    self._start(size, flow, cb, a)
                else:
                    del self._flows[flow]
        self._reschedule()
