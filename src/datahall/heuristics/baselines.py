"""Black-box search baselines: maximise the performance gap without looking at the heuristic's code.

MetaEase (Karimi et al., NSDI '26) reports that it "won in 88% of settings" against black-box
optimisation baselines; its repository compares against random sampling, hill climbing and
simulated annealing, and the brief adds the off-the-shelf optimisers ``nevergrad`` and ``optuna``.
Each function here maximises ``problem.gap(x)`` over the problem's input space under a wall-clock
budget (and optionally a cap on evaluations) and returns a :class:`~.problem.SearchResult`, so
every method, MetaEase's included, is compared on the same terms.

Common rules:

- every candidate is projected with :meth:`Problem.project` and evaluated only if
  :meth:`Problem.feasible` holds, so reported inputs always satisfy the realistic-input
  constraints;
- an evaluation that raises (the user's heuristic or optimum, or a NaN that
  :meth:`Problem.evaluate` rejects) counts as an evaluation and is skipped; ``info["errors"]`` and
  ``info["first_error"]`` say what happened. If the first 50 attempts all fail, or none succeeds
  within the budget, the search raises :class:`~.problem.ProblemError` with the first error;
- the clock is checked before every evaluation; the first evaluation always runs. The clock of
  ``nevergrad_search`` and ``optuna_search`` starts after their library is imported;
- one integer seed fixes every random draw, so a search limited by ``max_evals`` is reproducible.

>>> from datahall.heuristics.problem import Optimum, Problem
>>> p = Problem("first", heuristic=lambda x: x[0], optimum=lambda x: Optimum(max(x)),
...             lower=[0, 0], upper=[9, 9])
>>> r = BASELINES["hill-climbing"](p, budget_s=5.0, max_evals=300)
>>> r.method, r.gap, r.x.tolist(), r.evaluations
('hill-climbing', 9.0, [0.0, 9.0], 300)
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .problem import Problem, ProblemError, SearchResult

__all__ = [
    "BASELINES",
    "hill_climbing",
    "nevergrad_search",
    "optuna_search",
    "random_search",
    "simulated_annealing",
]

_GIVE_UP = 50  # attempts, all failed, after which a search stops and reports the first error


class _Stop(Exception):
    """Raised by the evaluator when the budget is spent; caught by :func:`_run`."""


class _Evaluator:
    """Projects, checks, counts and evaluates candidates; keeps the best result and its history."""

    def __init__(
        self, problem: Problem, method: str, budget_s: float, max_evals: int | None, seed: int
    ) -> None:
        if not budget_s > 0:
            raise ValueError(
                f"{method}: budget_s must be a positive number of seconds, not {budget_s!r}"
            )
        if max_evals is not None and max_evals < 1:
            raise ValueError(f"{method}: max_evals must be at least 1, not {max_evals!r}")
        self.problem, self.method = problem, method
        self.budget_s, self.max_evals = float(budget_s), max_evals
        self.evaluations = self.successes = self.errors = self.infeasible = 0
        self.first_error: str | None = None
        self.stopped = "budget"
        self.best_gap = -math.inf
        self.best_x: np.ndarray | None = None
        self.best_h = self.best_opt = math.nan
        self.history: list[tuple[float, float]] = []
        self.info: dict[str, Any] = {"seed": seed}
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def check(self) -> None:
        """Raise :class:`_Stop` if no further evaluation fits the budget."""
        attempts = self.evaluations + self.infeasible
        if self.max_evals is not None and self.evaluations >= self.max_evals:
            self.stopped = "max_evals"
        elif attempts and self.elapsed() >= self.budget_s:
            self.stopped = "budget"
        elif not self.successes and attempts >= _GIVE_UP:
            self.stopped = "failures"
        else:
            return
        raise _Stop

    def __call__(self, x: Sequence[float] | np.ndarray) -> tuple[float | None, np.ndarray]:
        """Evaluate the projection of `x`: (gap, or None if it failed; the point evaluated)."""
        self.check()
        p = self.problem
        y = p.project(np.asarray(x, dtype=float))
        if not p.feasible(y):
            self.infeasible += 1
            self._failed(f"the projection of a candidate is infeasible: {p.show(y)}")
            return None, y
        self.evaluations += 1
        try:
            gap, h, opt = p.evaluate(y)
        except Exception as exc:  # the user's code: keep searching, keep the best so far
            self.errors += 1
            where = "" if isinstance(exc, ProblemError) else f" at {p.show(y)}"
            self._failed(f"{type(exc).__name__}: {exc}{where}")
            return None, y
        self.successes += 1
        if gap > self.best_gap:
            self.best_gap, self.best_x = gap, y.copy()
            self.best_h, self.best_opt = h, float(opt.value)
            self.history.append((self.elapsed(), gap))
        return gap, y

    def _failed(self, message: str) -> None:
        if self.first_error is None:
            self.first_error = message

    def result(self) -> SearchResult:
        if self.best_x is None:
            raise ProblemError(
                f"{self.method} on {self.problem.name}: no evaluation succeeded "
                f"({self.evaluations} evaluated, {self.errors} raised, {self.infeasible} infeasible "
                f"after projection); the first failure was: {self.first_error}. Fix the heuristic "
                f"or optimum at such inputs, or narrow the bounds to where they work"
            )
        info = dict(self.info, stopped=self.stopped, errors=self.errors, infeasible=self.infeasible)
        if self.first_error is not None:
            info["first_error"] = self.first_error
        return SearchResult(
            method=self.method,
            gap=self.best_gap,
            x=self.best_x,
            heuristic=self.best_h,
            optimum=self.best_opt,
            evaluations=self.evaluations,
            seconds=self.elapsed(),
            history=self.history,
            info=info,
        )


def _run(
    problem: Problem,
    method: str,
    budget_s: float,
    max_evals: int | None,
    seed: int,
    search: Callable[[_Evaluator, np.random.Generator], None],
) -> SearchResult:
    """Run `search` until it returns or the budget stops it; a one-point space is evaluated once."""
    ev = _Evaluator(problem, method, budget_s, max_evals, seed)
    rng = np.random.default_rng(seed)
    try:
        if not np.any(problem.upper > problem.lower):
            ev(problem.lower)
            ev.stopped = "exhausted"
        else:
            search(ev, rng)
    except _Stop:
        pass
    return ev.result()


def _sample(problem: Problem, rng: np.random.Generator) -> np.ndarray:
    """A uniform point of the box (integers when the problem is integer), not yet projected."""
    if problem.integer:
        return rng.integers(problem.lower, problem.upper, endpoint=True).astype(float)
    return rng.uniform(problem.lower, problem.upper)


def _random_start(ev: _Evaluator, rng: np.random.Generator) -> tuple[float, np.ndarray]:
    """Sample until one evaluation succeeds (the evaluator stops hopeless searches)."""
    while True:
        g, x = ev(_sample(ev.problem, rng))
        if g is not None:
            return g, x


def _neighbour(
    problem: Problem, x: np.ndarray, rng: np.random.Generator, step: float, coords: int
) -> np.ndarray:
    """Perturb 1..`coords` free coordinates by Gaussian steps of ``step × range``, halved 0-3 times
    at random so that coarse and fine moves mix; integer moves are at least ±1."""
    free = np.flatnonzero(problem.upper > problem.lower)
    k = int(rng.integers(1, min(coords, free.size), endpoint=True))
    idx = rng.choice(free, size=k, replace=False)
    width = (problem.upper - problem.lower)[idx]
    delta = rng.normal(0.0, step * width * 0.5 ** rng.integers(0, 4, size=k))
    if problem.integer:
        delta = np.round(delta)
        zero = delta == 0
        delta[zero] = rng.choice([-1.0, 1.0], size=int(zero.sum()))
    y = x.copy()
    y[idx] += delta
    return y


def _stop_recast(opt: Any) -> None:
    """Stop the worker thread of nevergrad's scipy-based ("recast") optimisers, nested ones
    included: a thread left waiting for a loss keeps the interpreter from exiting."""
    seen: set[int] = set()
    while opt is not None and id(opt) not in seen:
        seen.add(id(opt))
        thread = getattr(opt, "_messaging_thread", None)
        if thread is not None:
            with contextlib.suppress(Exception):
                thread.stop()
                thread._thread.join(timeout=1.0)  # let it wind down while warnings are filtered
        opt = getattr(opt, "_optim", None)


def random_search(
    problem: Problem, budget_s: float, seed: int = 0, max_evals: int | None = None
) -> SearchResult:
    """Uniform random sampling of the input box, projected to the constraints.

    The simplest baseline of MetaEase's repository (Karimi et al., NSDI '26): draw inputs
    uniformly (integers when ``problem.integer``), project each with :meth:`Problem.project`,
    keep the largest gap.

    Parameters
    ----------
    problem : Problem
    budget_s : float
        Wall-clock budget in seconds, checked before every evaluation.
    seed : int
        Seeds a :func:`numpy.random.default_rng`.
    max_evals : int, optional
        Stop after this many evaluations.

    Examples
    --------
    >>> from datahall.heuristics.problem import Optimum, Problem
    >>> p = Problem("first", heuristic=lambda x: x[0], optimum=lambda x: Optimum(max(x)),
    ...             lower=[0, 0], upper=[9, 9])
    >>> r = random_search(p, budget_s=5.0, max_evals=500)
    >>> r.method, r.gap, r.x.tolist(), r.evaluations
    ('random', 9.0, [0.0, 9.0], 500)
    """

    def search(ev: _Evaluator, rng: np.random.Generator) -> None:
        while True:
            ev(_sample(problem, rng))

    return _run(problem, "random", budget_s, max_evals, seed, search)


def hill_climbing(
    problem: Problem,
    budget_s: float,
    seed: int = 0,
    max_evals: int | None = None,
    *,
    step: float = 0.1,
    coords: int = 3,
    patience: int | None = None,
) -> SearchResult:
    """Stochastic hill climbing on the gap, with random restarts.

    From a uniform random start, each neighbour changes 1 to `coords` coordinates by a Gaussian
    step of ``step × (upper − lower)`` (scaled down by 1, 2, 4 or 8 at random; integer steps are
    at least 1) and is projected to the constraints. A neighbour whose gap is at least the current
    one is accepted (equal gaps let the climb cross plateaus, common when a heuristic's gap is zero
    on most of the space); after `patience` tries without a strict improvement the climb restarts
    from a new random point. A baseline of MetaEase's repository (Karimi et al., NSDI '26).

    Parameters
    ----------
    problem, budget_s, seed, max_evals
        As in :func:`random_search`.
    step : float
        Standard deviation of a move, as a fraction of each coordinate's range.
    coords : int
        At most this many coordinates change per move.
    patience : int, optional
        Non-improving tries before a restart; default ``max(50, 2 × dim)``.

    ``info["restarts"]`` counts the restarts.

    Examples
    --------
    >>> from datahall.heuristics.problem import Optimum, Problem
    >>> p = Problem("first", heuristic=lambda x: x[0], optimum=lambda x: Optimum(max(x)),
    ...             lower=[0, 0], upper=[99, 99])
    >>> r = hill_climbing(p, budget_s=5.0, max_evals=1000)
    >>> r.gap, r.x.tolist()
    (99.0, [0.0, 99.0])
    """
    patience = max(50, 2 * problem.dim) if patience is None else patience
    if not (step > 0 and coords >= 1 and patience >= 1):
        raise ValueError("hill_climbing: step must be > 0, coords and patience >= 1")

    def search(ev: _Evaluator, rng: np.random.Generator) -> None:
        ev.info["restarts"] = -1
        while True:
            ev.info["restarts"] += 1
            g, x = _random_start(ev, rng)
            stale = 0
            while stale < patience:
                gy, y = ev(_neighbour(problem, x, rng, step, coords))
                stale = 0 if gy is not None and gy > g else stale + 1
                if gy is not None and gy >= g:
                    g, x = gy, y

    return _run(problem, "hill-climbing", budget_s, max_evals, seed, search)


def simulated_annealing(
    problem: Problem,
    budget_s: float,
    seed: int = 0,
    max_evals: int | None = None,
    *,
    t0: float = 1.0,
    cooling: float = 0.995,
    t_min: float = 1e-3,
    step: float = 0.1,
    coords: int = 3,
) -> SearchResult:
    """Simulated annealing on the gap (Kirkpatrick et al., Science 1983), with restarts.

    Neighbours are drawn as in :func:`hill_climbing`. A move that lowers the gap by ``Δ`` is
    accepted with probability ``exp(−Δ / T)``. The temperature is ``T = τ · m``: ``m`` is the mean
    absolute gap change observed so far (so the schedule does not depend on the gap's units) and
    ``τ`` cools geometrically from `t0`, ``τ ← cooling · τ`` per evaluation. When ``τ`` falls below
    `t_min` the search reheats and restarts, alternately from the best input found and from a new
    random one. A baseline of MetaEase's repository (Karimi et al., NSDI '26).

    Parameters
    ----------
    problem, budget_s, seed, max_evals
        As in :func:`random_search`.
    t0, cooling, t_min : float
        Initial relative temperature, geometric cooling factor per evaluation, and the relative
        temperature that triggers a restart (defaults: about 1400 evaluations per restart).
    step, coords
        As in :func:`hill_climbing`.

    ``info["restarts"]`` counts the restarts.

    Examples
    --------
    >>> from datahall.heuristics.problem import Optimum, Problem
    >>> p = Problem("first", heuristic=lambda x: x[0], optimum=lambda x: Optimum(max(x)),
    ...             lower=[0, 0], upper=[99, 99])
    >>> r = simulated_annealing(p, budget_s=5.0, max_evals=2000)
    >>> r.method, r.gap
    ('annealing', 99.0)
    """
    if not (t0 > 0 and 0 < cooling < 1 and 0 < t_min < t0 and step > 0 and coords >= 1):
        raise ValueError(
            "simulated_annealing: need t0 > t_min > 0, 0 < cooling < 1, step > 0, coords >= 1"
        )

    def search(ev: _Evaluator, rng: np.random.Generator) -> None:
        ev.info["restarts"] = 0
        g, x = _random_start(ev, rng)
        tau, mean_change, changes = t0, 0.0, 0
        while True:
            gy, y = ev(_neighbour(problem, x, rng, step, coords))
            tau *= cooling
            if gy is not None:
                d = gy - g
                if d != 0:
                    changes += 1
                    mean_change += (abs(d) - mean_change) / changes
                if d >= 0 or rng.random() < math.exp(d / (tau * mean_change)):
                    g, x = gy, y
            if tau < t_min:
                ev.info["restarts"] += 1
                tau = t0
                if ev.info["restarts"] % 2:
                    g, x = ev.best_gap, ev.best_x.copy()
                else:
                    g, x = _random_start(ev, rng)

    return _run(problem, "annealing", budget_s, max_evals, seed, search)


def nevergrad_search(
    problem: Problem,
    budget_s: float,
    seed: int = 0,
    max_evals: int | None = None,
    *,
    optimizer: str = "NGOpt",
    planned_evals: int | None = None,
    fallback: str | None = "OnePlusOne",
) -> SearchResult:
    """Maximise the gap with a `nevergrad <https://facebookresearch.github.io/nevergrad/>`_
    optimiser (ask/tell), one of the black-box baselines MetaEase is compared against.

    The free coordinates (``lower < upper``) form a bounded ``ng.p.Array``, cast to integers when
    ``problem.integer``; each candidate is projected to the constraints before evaluation and the
    optimiser is told ``−gap`` (a failed evaluation is told a loss worse than any seen).
    nevergrad's optimisers plan for a number of evaluations (``NGOpt`` picks its algorithm from
    it): `planned_evals`, else `max_evals`, else an estimate from the time of one evaluation of
    the box's centre.

    Parameters
    ----------
    problem, budget_s, seed, max_evals
        As in :func:`random_search`; `seed` seeds the parametrization's random state.
    optimizer : str
        A name in ``nevergrad.optimizers.registry`` (``"NGOpt"``, ``"CMA"``, ``"TwoPointsDE"``, ...).
    planned_evals : int, optional
        The budget announced to the optimiser.
    fallback : str or None
        If the optimiser itself raises (nevergrad 1.0.12's metamodel, which ``NGOpt`` picks for
        small continuous problems, fails under numpy 2), the search goes on with this optimiser
        from the best input so far; ``None`` ends the search there, keeping its best result.

    ``info["optimizer"]`` is the name asked for; ``info["chosen"]`` the algorithm ``NGOpt``
    picked, when it is a wrapper; ``info["optimizer_error"]`` and ``info["fallback"]`` are set
    when the optimiser failed.

    Raises
    ------
    ImportError
        If nevergrad is not installed.

    Examples
    --------
    >>> from datahall.heuristics.problem import Optimum, Problem
    >>> p = Problem("first", heuristic=lambda x: x[0], optimum=lambda x: Optimum(max(x)),
    ...             lower=[0, 0], upper=[9, 9])
    >>> r = nevergrad_search(p, budget_s=5.0, max_evals=1000)
    >>> r.method, r.gap, r.evaluations, r.info["chosen"]
    ('nevergrad', 9.0, 1000, '_OnePlusOne')
    """
    try:
        import nevergrad as ng
    except ImportError as exc:
        raise ImportError(
            "nevergrad_search needs the nevergrad package: pip install nevergrad "
            "(or use another baseline: random, hill-climbing, annealing)"
        ) from exc
    if optimizer not in ng.optimizers.registry:
        close = difflib.get_close_matches(optimizer, list(ng.optimizers.registry), n=3)
        raise ValueError(
            f"nevergrad_search: no optimizer named {optimizer!r} in nevergrad.optimizers.registry"
            + (f"; did you mean {', '.join(close)}?" if close else "")
        )

    def search(ev: _Evaluator, rng: np.random.Generator) -> None:
        lo, hi = problem.lower, problem.upper
        free = np.flatnonzero(hi > lo)
        full = problem.project(lo.copy())
        centre = (lo + hi) / 2
        planned = planned_evals or max_evals
        if planned is None:  # time one evaluation to guess how many fit, with ~0.5 ms of overhead
            t = time.perf_counter()
            ev(centre)
            planned = int(np.clip(budget_s / (time.perf_counter() - t + 5e-4), 30, 100_000))
        pad = 0.4999 if problem.integer else 0.0  # every integer gets an equal share of the box

        def make(name: str, init: np.ndarray) -> Any:
            param = ng.p.Array(init=init, lower=lo[free] - pad, upper=hi[free] + pad)
            if problem.integer:
                param.set_integer_casting()
            param.random_state = np.random.RandomState(seed)
            budget = max(planned - ev.evaluations, 30)
            return ng.optimizers.registry[name](parametrization=param, budget=budget, num_workers=1)

        name = optimizer
        opt = make(name, centre[free])
        ev.info.update(optimizer=optimizer, planned_evals=planned)
        worst: float | None = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ng.errors.NevergradWarning)
            warnings.filterwarnings("ignore", module=r"cma(\.|$)")  # CMA's injection notices
            warnings.filterwarnings("ignore", module=r"scipy\._lib\.pyprima")  # COBYLA's RHOEND
            try:
                while True:
                    ev.check()  # before asking too: some optimisers take a while to ask
                    try:
                        cand = opt.ask()
                        x = full.copy()
                        x[free] = cand.value
                        g, _ = ev(x)
                        if g is not None:
                            worst = g if worst is None else min(worst, g)
                        fail = 0.0 if worst is None else -worst + abs(worst) + 1.0
                        opt.tell(cand, fail if g is None else -g)
                    except _Stop:
                        raise
                    except Exception as exc:  # a failure inside nevergrad: keep what was found
                        ev.info.setdefault(
                            "optimizer_error", f"{name}: {type(exc).__name__}: {exc}"
                        )
                        _stop_recast(opt)
                        if fallback is None or name == fallback:
                            ev.stopped = "optimizer_error"
                            return
                        name = ev.info["fallback"] = fallback
                        opt = make(name, (centre if ev.best_x is None else ev.best_x)[free])
            finally:
                with contextlib.suppress(Exception):  # NGOpt and kin wrap the algorithm they pick
                    ev.info["chosen"] = type(opt.optim).__name__
                _stop_recast(opt)

    return _run(problem, "nevergrad", budget_s, max_evals, seed, search)


def optuna_search(
    problem: Problem, budget_s: float, seed: int = 0, max_evals: int | None = None
) -> SearchResult:
    """Maximise the gap with `optuna <https://optuna.org>`_'s TPE sampler (Bergstra et al.,
    NeurIPS 2011), one of the black-box baselines MetaEase is compared against.

    Each free coordinate is one parameter (``suggest_int`` for integer problems, else
    ``suggest_float``), driven by ask/tell; each trial is projected to the constraints before
    evaluation, and a failed evaluation is told as a failed trial. optuna's log messages are
    silenced for the search and its verbosity restored afterwards.

    Parameters
    ----------
    problem, budget_s, seed, max_evals
        As in :func:`random_search`; `seed` seeds the ``TPESampler``.

    Raises
    ------
    ImportError
        If optuna is not installed.

    Examples
    --------
    >>> from datahall.heuristics.problem import Optimum, Problem
    >>> p = Problem("first", heuristic=lambda x: x[0], optimum=lambda x: Optimum(max(x)),
    ...             lower=[0, 0], upper=[9, 9])
    >>> r = optuna_search(p, budget_s=5.0, max_evals=100)
    >>> r.method, r.gap, r.evaluations
    ('optuna', 9.0, 100)
    """
    try:
        import optuna
    except ImportError as exc:
        raise ImportError(
            "optuna_search needs the optuna package: pip install optuna "
            "(or use another baseline: random, hill-climbing, annealing)"
        ) from exc

    def search(ev: _Evaluator, rng: np.random.Generator) -> None:
        lo, hi = problem.lower, problem.upper
        free = np.flatnonzero(hi > lo)
        full = problem.project(lo.copy())
        study = optuna.create_study(
            direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed)
        )
        while True:
            ev.check()  # before asking: TPE's ask gets slower as trials accumulate
            trial = study.ask()
            x = full.copy()
            for i in free:
                ev.check()  # each suggestion costs O(trials): many inputs make a trial slow
                if problem.integer:
                    x[i] = trial.suggest_int(f"x{i}", int(lo[i]), int(hi[i]))
                else:
                    x[i] = trial.suggest_float(f"x{i}", float(lo[i]), float(hi[i]))
            g, _ = ev(x)
            if g is None:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
            else:
                study.tell(trial, g)

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(logging.WARNING)
    try:
        return _run(problem, "optuna", budget_s, max_evals, seed, search)
    finally:
        optuna.logging.set_verbosity(verbosity)


BASELINES: dict[str, Callable[..., SearchResult]] = {
    "random": random_search,
    "hill-climbing": hill_climbing,
    "annealing": simulated_annealing,
    "nevergrad": nevergrad_search,
    "optuna": optuna_search,
}
"""The baselines by name; each is called as ``f(problem, budget_s, seed=0, max_evals=None)``."""
