"""The MetaEase pipeline end to end: check the problem, explore code paths, climb the gap from one
seed per path in parallel, and report the worst input found (Karimi et al., NSDI '26).

>>> from datahall.heuristics.problem import problem
>>> @problem(optimum=lambda x: sum(x), lower=0, upper=10, dim=3)
... def pinned(x):  # inputs at most 2 are "pinned" and lost
...     return sum(d for d in x if d > 2)
>>> a = analyze(pinned, budget_s=5, workers=1)
>>> a.gap, a.best.x.tolist(), a.exploration.complete
(6.0, [2.0, 2.0, 2.0], True)
"""

from __future__ import annotations

import math
import os
import pickle
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Any

import numpy as np

from .concolic import Exploration, explore_paths, trace
from .problem import Problem, ProblemError, SearchResult
from .search import guided_search

__all__ = ["Analysis", "Seed", "analyze", "check_problem"]


@dataclass
class Seed:
    """A starting point of the guided search: where it came from and what the search made of it."""

    source: str  # "path", "all-min", "all-max" or "random"
    x: np.ndarray
    path: str
    gap: float
    result: SearchResult | None = None
    error: str | None = None


@dataclass
class Analysis:
    """What :func:`analyze` found: the best gap and input, the paths and seeds behind it."""

    problem: Problem
    best: SearchResult
    exploration: Exploration
    seeds: list[Seed]
    seconds: float
    budget_s: float
    workers: int
    evaluations: int
    notes: list[str] = field(default_factory=list)

    @property
    def gap(self) -> float:
        return self.best.gap

    @property
    def normalized(self) -> float:
        """The gap divided by the problem's scale (total capacity for TE, as MetaOpt reports)."""
        return self.best.gap / self.problem.scale

    def to_json(self) -> dict[str, Any]:
        p, b = self.problem, self.best
        nz = np.flatnonzero(b.x)
        return {
            "problem": p.name,
            "sense": p.sense,
            "gap": _clean(b.gap),
            "normalized_gap": _clean(self.normalized),
            "scale": p.scale,
            "scale_label": p.scale_label,
            "heuristic": _clean(b.heuristic),
            "optimum": _clean(b.optimum),
            "input": {p.label(int(i)): float(b.x[i]) for i in nz},
            "description": p.describe(b.x) if p.describe else None,
            "found_by": b.method,
            "paths": {
                "explored": len(self.exploration.paths),
                "complete": self.exploration.complete,
                "runs": self.exploration.runs,
                "solver_calls": self.exploration.solver_calls,
                "max_branches": self.exploration.max_branches,
                "seconds": self.exploration.seconds,
            },
            "seeds": [
                {
                    "source": s.source,
                    "path": s.path,
                    "seed_gap": s.gap,
                    "gap": s.result.gap if s.result else None,
                    "evaluations": s.result.evaluations if s.result else 0,
                    "seconds": s.result.seconds if s.result else 0.0,
                    "error": s.error,
                }
                for s in self.seeds
            ],
            "evaluations": self.evaluations,
            "seconds": self.seconds,
            "budget_s": self.budget_s,
            "workers": self.workers,
            "notes": self.notes,
        }


def _clean(v: float) -> float:
    """`v` without the last digits of LP round-off (62.99999999999909 is 63.0)."""
    return float(f"{v:.10g}")


def _user_error(problem: Problem, what: str, x: np.ndarray, e: BaseException) -> ProblemError:
    return ProblemError(
        f"{problem.name}: the {what} raised {type(e).__name__}: {e} at input "
        f"{problem.show(x)}; fix it or narrow the bounds"
    )


def check_problem(problem: Problem, seed: int = 0) -> list[str]:
    """Check that `problem` can be analysed: its input space is not empty, the heuristic and the
    optimum run and return finite numbers, and the heuristic is deterministic (same value and
    same code path twice on each of eight inputs: all-min, all-max and six random ones). Raises :class:`ProblemError` naming the first
    failure; returns notes (e.g. that the heuristic's branches are invisible to the tracer).
    """
    notes: list[str] = []
    x_min = problem.project(problem.lower.copy())
    if not problem.feasible(x_min):
        raise ProblemError(
            f"{problem.name}: cannot find an input that meets the bounds and the constraints "
            f"together (tried {problem.show(x_min)}); relax the constraints or the bounds"
        )
    rng = np.random.default_rng(seed)
    points = [x_min, problem.project(problem.upper.copy())]
    points += [problem.project(rng.uniform(problem.lower, problem.upper)) for _ in range(6)]
    branches = 0
    for x in points:
        try:
            t1 = trace(problem.heuristic, x.tolist(), symbolic=False, integer=problem.integer)
            t2 = trace(problem.heuristic, x.tolist(), symbolic=False, integer=problem.integer)
        except Exception as e:
            raise _user_error(problem, "heuristic", x, e) from e
        for t in (t1, t2):
            try:
                ok = math.isfinite(float(t.value))
            except (TypeError, ValueError):
                raise ProblemError(
                    f"{problem.name}: the heuristic returned {type(t.value).__name__}, "
                    "not a number; return the objective value"
                ) from None
            if not ok:
                raise ProblemError(
                    f"{problem.name}: the heuristic returned {t.value} at {problem.show(x)}"
                )
        if float(t1.value) != float(t2.value) or t1.path != t2.path:
            raise ProblemError(
                f"{problem.name}: the heuristic is not deterministic: two runs on "
                f"{problem.show(x)} gave {t1.value} and {t2.value}"
                + (" on different code paths" if t1.path != t2.path else "")
                + "; fix its random seed"
            )
        branches = max(branches, t1.branches)
        try:
            problem.evaluate(x)
        except ProblemError:
            raise
        except Exception as e:
            raise _user_error(problem, "optimum", x, e) from e
    if branches == 0:
        notes.append(
            "the heuristic took no branch on its inputs that the tracer could see (it has "
            "none, or converts its inputs with float() before branching): one code path, so the "
            "seeds are the all-min, all-max and random inputs"
        )
    return notes


def _run_seed(problem: Problem, seed: Seed, budget_s: float, deadline_s: float, opts: dict):
    # Deadlines cross processes as wall-clock seconds (monotonic clocks are per-process in
    # spirit, though Linux shares them).
    left = deadline_s - time.time()
    if left <= 0:
        return None, "not started: the budget ran out"
    try:
        r = guided_search(problem, seed.x, min(budget_s, left), **opts)
    except Exception as e:  # the seed itself failed; other seeds go on
        return None, f"{type(e).__name__}: {e}"
    return r, r.info.get("error")


def analyze(
    problem: Problem,
    budget_s: float = 60.0,
    *,
    workers: int | None = None,
    explore_share: float = 0.2,
    max_paths: int = 500,
    max_seeds: int = 64,
    random_seeds: int = 4,
    seed: int = 0,
    surrogate: bool = False,
    coords: int = 20,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> Analysis:
    """Find an input where `problem`'s heuristic is far from its optimum, within `budget_s`.

    1. :func:`check_problem` (bad inputs fail fast with one clear error);
    2. code-path exploration (:func:`.concolic.explore_paths`) from the all-min, all-max and
       random inputs for up to ``explore_share`` of the budget, one seed per path;
    3. the seeds with the largest gaps (plus all-max, all-min and `random_seeds` random inputs,
       as MetaEase adds them) each get :func:`.search.guided_search` in a pool of `workers`
       processes until the budget ends. A seed that crashes loses only itself.

    ``on_progress(stage, done, total)`` reports ``"paths"`` and ``"seeds"``.
    """
    start = time.monotonic()
    wall_deadline = time.time() + budget_s
    notes = check_problem(problem, seed)
    rng = np.random.default_rng(seed)
    randoms = [
        problem.project(rng.uniform(problem.lower, problem.upper)) for _ in range(random_seeds)
    ]
    x_min, x_max = problem.project(problem.lower.copy()), problem.project(problem.upper.copy())

    found = 0

    def on_path(_p) -> None:
        nonlocal found
        found += 1
        if on_progress:
            on_progress("paths", found, max_paths)

    exploration = explore_paths(
        problem.heuristic,
        problem.lower,
        problem.upper,
        integer=problem.integer,
        seeds=[x_min, x_max, *randoms],
        max_nonzero=problem.max_nonzero,
        A=problem.A,
        b=problem.b,
        budget_s=explore_share * budget_s,
        max_paths=max_paths,
        on_path=on_path,
    )
    if exploration.errors:
        notes.append(
            f"{len(exploration.errors)} traced runs raised; first: {exploration.errors[0]}"
        )
    # Rank the paths by the gap at their seed, for as long as a tenth of the budget allows.
    seeds: list[Seed] = []
    rank_until = time.monotonic() + 0.1 * budget_s
    for p in exploration.paths:
        if time.monotonic() > rank_until:
            break
        x = problem.project(p.seed)
        if not problem.feasible(x):
            continue
        try:
            g = problem.evaluate(x)[0]
        except Exception as e:  # noqa: BLE001 — keep going; the note says what happened
            notes.append(f"seed of path {p.id} failed: {type(e).__name__}: {e}")
            continue
        seeds.append(Seed("path", x, p.id, g))
    seeds.sort(key=lambda s: -s.gap)
    paths = seeds[: max(1, max_seeds - 2 - random_seeds)]
    later = seeds[len(paths) :]
    have = {s.path for s in paths}
    extras = []
    for source, x in [("all-max", x_max), ("all-min", x_min)] + [("random", r) for r in randoms]:
        try:  # random seeds beyond the six check_problem tried may fail
            pid = trace(problem.heuristic, x.tolist(), symbolic=False, integer=problem.integer).path
            if source == "random" or pid not in have:
                extras.append(Seed(source, x, pid, problem.evaluate(x)[0]))
                have.add(pid)
        except Exception as e:  # noqa: BLE001 — keep going; the note says what happened
            notes.append(f"{source} seed failed: {type(e).__name__}: {e}")
    # The two best path seeds, then all-max, all-min and a random input (MetaEase's extra
    # seeds), then the rest: short budgets reach only the first few.
    first = paths[:2] + extras[:3] + paths[2:] + extras[3:]

    def seed_stream():
        """The first round, then the other paths' seeds, then fresh random inputs, for as long
        as the budget lasts."""
        yield from first
        yield from later
        while True:
            x = problem.project(rng.uniform(problem.lower, problem.upper))
            pid = trace(problem.heuristic, x.tolist(), symbolic=False, integer=problem.integer)
            yield Seed("random", x, pid.path, problem.evaluate(x)[0])

    workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
    if workers > 1:
        try:
            pickle.dumps(problem)
        except Exception as e:  # noqa: BLE001 — lambdas and closures do not pickle
            notes.append(f"problem does not pickle ({type(e).__name__}); ran in one process")
            workers = 1
    left = max(0.0, wall_deadline - time.time())
    # The best-ranked seeds may take half the budget each: a climb with hops needs seconds,
    # and seeds that converge sooner hand their time to the next ones.
    per_seed = max(left * workers / min(len(first), 2), min(left, 1.0))
    opts = {"coords": coords, "surrogate": surrogate}
    chosen: list[Seed] = []
    stream = seed_stream()

    def next_seed() -> tuple[Seed, dict] | None:
        if wall_deadline - time.time() < 0.05:
            return None
        try:
            s = next(stream)
        except Exception as e:  # noqa: BLE001 — a random seed the user's code rejects
            notes.append(f"a fresh seed failed: {type(e).__name__}: {e}")
            return None
        chosen.append(s)
        return s, {**opts, "rng": seed + len(chosen)}

    def finished(s: Seed, r, err) -> None:
        s.result, s.error = r, err
        if on_progress:
            on_progress(
                "seeds", sum(1 for c in chosen if c.result or c.error), max(len(chosen), len(first))
            )

    def in_process(jobs) -> None:
        for s, o in jobs:
            finished(s, *_run_seed(problem, s, per_seed, wall_deadline, o))

    if workers == 1:
        in_process(iter(next_seed, None))
    else:
        ctx = get_context("spawn")  # highspy and z3 hold threads; forking them is unsafe
        running: dict = {}
        try:
            with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                for _ in range(workers):
                    if (job := next_seed()) is not None:
                        f = pool.submit(_run_seed, problem, job[0], per_seed, wall_deadline, job[1])
                        running[f] = job
                while running:
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    for f in done:
                        r, err = f.result()  # before the pop: a broken pool keeps the job
                        finished(running.pop(f)[0], r, err)
                        if (job := next_seed()) is not None:
                            g = pool.submit(
                                _run_seed, problem, job[0], per_seed, wall_deadline, job[1]
                            )
                            running[g] = job
        except BrokenProcessPool as e:
            # A worker died, or could not load the problem (a function of a notebook's
            # __main__ pickles, but a spawned process cannot import it): the seeds it held
            # and the rest of the budget go on in this process.
            notes.append(f"a worker process died ({e}); went on in this process")
            left = max(0.0, wall_deadline - time.time())
            per_seed = max(left / min(len(first), 2), min(left, 1.0))
            in_process([*running.values(), *iter(next_seed, None)])
    ranked = chosen
    if not chosen:
        # The checks and the exploration of a large problem can outlast a short budget: the
        # seeds found so far are then the result, unsearched.
        ranked = first + later
        notes.append(
            "the budget ran out before the guided search began; the result is the best seed, "
            "unsearched: give a larger budget"
        )
    if not ranked:
        raise ProblemError(
            f"{problem.name}: no seed could be evaluated within the budget of {budget_s:g} s; "
            "give a larger budget"
        )
    results = [s.result for s in chosen if s.result is not None]
    for s in ranked:  # the seeds' own gaps count too: a seed the search never improved
        results.append(SearchResult("seed:" + s.source, s.gap, s.x, math.nan, math.nan, 1, 0.0))
    best = max(results, key=lambda r: r.gap)
    if math.isnan(best.heuristic):
        g, h, opt = problem.evaluate(best.x)
        best = SearchResult(best.method, g, best.x, h, float(opt.value), 1, 0.0)
    evaluations = sum(r.evaluations for r in results)
    return Analysis(
        problem,
        best,
        exploration,
        chosen,
        time.monotonic() - start,
        budget_s,
        workers,
        evaluations,
        notes,
    )
