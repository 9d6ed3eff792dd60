"""Guided search for the performance gap within a code path (MetaEase, NSDI '26, §2.2 of the brief).

From a seed, :func:`guided_search` climbs ``gap = OPT − H`` (``H − OPT`` for minimisation) by
gradient ascent that stays on the seed's code path:

- ∇OPT comes from the optimum's LP duals (envelope theorem) when it reports them, else from
  finite differences;
- ∇H comes from finite differences on a random subset of coordinates, each probe kept only if it
  stays on the code path (``+h`` first, then ``−h``), or, with ``surrogate=True``, from the mean of
  a Gaussian process fitted on same-path samples around the point;
- the path-aware step: take ``x + η·∇gap``; if it leaves the path or does not improve, move to
  the same-path sample with the smallest angle (< 90°) to the gradient that improves the gap;
  if there is none, halve η;
- where the gradient vanishes (gaps that are step functions, such as bins used), random moves
  that raise the gap, or same-path moves that keep it (ours, see :func:`_plateau_move`);
- when the path is exhausted, a hop to a neighbouring path: one branch flipped by z3, kept if
  the gap rises (ours, see :func:`_hop`); ``hop=False`` never leaves the seed's path, which is
  MetaEase's rule;
- the search on this seed has converged after `patience` iterations without improvement.

Every point evaluated counts: the best gap seen anywhere is returned, even off the path. The
rule is MetaEase's as its released code implements it; step sizes and the convergence test are
ours.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from .concolic import PathSolver, trace
from .problem import Optimum, Problem, ProblemError, SearchResult

__all__ = ["Evaluator", "guided_search", "gp_gradient"]


class Evaluator:
    """Counts evaluations, remembers the best point, and gives each point's code path.

    Exceptions from the user's code propagate; callers decide whether to stop. The best point is
    kept on the object so that it survives them.
    """

    def __init__(self, problem: Problem, method: str, deadline: float) -> None:
        self.problem = problem
        self.method = method
        self.deadline = deadline
        self.start = time.monotonic()
        self.evaluations = 0
        self.best: tuple[float, np.ndarray, float, float] | None = None
        self.history: list[tuple[float, float]] = []
        self._solver: PathSolver | None = None

    def path_solver(self) -> PathSolver:
        if self._solver is None:
            p = self.problem
            self._solver = PathSolver(
                p.heuristic,
                p.lower,
                p.upper,
                integer=p.integer,
                max_nonzero=p.max_nonzero,
                A=p.A,
                b=p.b,
            )
        return self._solver

    def expired(self) -> bool:
        return time.monotonic() >= self.deadline

    def path(self, x: np.ndarray) -> tuple[str, float]:
        """The code path of `x` and H(x), from one cheap traced run (outcomes only)."""
        t = trace(self.problem.heuristic, x.tolist(), symbolic=False, integer=self.problem.integer)
        try:
            h = float(t.value)
        except (TypeError, ValueError):
            raise ProblemError(
                f"{self.problem.name}: the heuristic returned {type(t.value).__name__}, "
                "not a number"
            ) from None
        if not math.isfinite(h):
            raise ProblemError(f"{self.problem.name}: the heuristic returned {h} at {x.tolist()}")
        return t.path, h

    def optimum(self, x: np.ndarray) -> Optimum:
        opt = self.problem.optimum(x.tolist() if not isinstance(x, np.ndarray) else x)
        if not isinstance(opt, Optimum):
            opt = Optimum(float(opt))
        if not math.isfinite(opt.value):
            raise ProblemError(f"{self.problem.name}: the optimum returned {opt.value}")
        return opt

    def gap(self, x: np.ndarray, h: float, opt: Optimum | None = None) -> tuple[float, Optimum]:
        opt = opt or self.optimum(x)
        self.evaluations += 1
        g = self.problem.signed(float(opt.value) - h)
        if self.best is None or g > self.best[0]:
            self.best = (g, x.copy(), h, float(opt.value))
            self.history.append((time.monotonic() - self.start, g))
        return g, opt

    def result(self, **info) -> SearchResult:
        if self.best is None:
            raise ProblemError(f"{self.problem.name}: no input could be evaluated")
        g, x, h, o = self.best
        return SearchResult(
            self.method,
            g,
            x,
            h,
            o,
            self.evaluations,
            time.monotonic() - self.start,
            self.history,
            info,
        )


@dataclass
class _Sample:
    x: np.ndarray
    h: float
    coord: int


@dataclass
class _Step:
    """What one iteration learnt about the neighbourhood of the current point."""

    grad: np.ndarray
    samples: list[_Sample] = field(default_factory=list)
    tried: bool = False


def _fd_step(problem: Problem) -> np.ndarray:
    span = problem.upper - problem.lower
    if problem.integer:
        return np.maximum(1.0, np.round(span * 0.01))
    return np.maximum(span * 1e-3, 1e-9)


def _gradient(
    ev: Evaluator,
    x: np.ndarray,
    path: str,
    h: float,
    opt: Optimum,
    coords: np.ndarray,
    surrogate: bool,
    rng: np.random.Generator,
) -> _Step:
    """∇gap on `coords` at `x`: duals for OPT, same-path finite differences (or a GP) for H."""
    p = ev.problem
    step = _fd_step(p)
    grad_h = np.zeros(p.dim)
    grad_opt = np.zeros(p.dim)
    out = _Step(np.zeros(p.dim))
    usable = np.zeros(p.dim, dtype=bool)
    for k in coords:
        if ev.expired():
            break
        for sign in (1.0, -1.0):
            y = x.copy()
            y[k] = np.clip(y[k] + sign * step[k], p.lower[k], p.upper[k])
            if y[k] == x[k] or not p.feasible(y):
                continue
            ypath, yh = ev.path(y)
            if ypath != path:
                continue
            d = y[k] - x[k]
            grad_h[k] = (yh - h) / d
            out.samples.append(_Sample(y, yh, int(k)))
            usable[k] = True
            if opt.gradient is None:
                yopt = ev.optimum(y)
                grad_opt[k] = (float(yopt.value) - float(opt.value)) / d
            break
    if opt.gradient is not None:
        grad_opt[usable] = np.asarray(opt.gradient, dtype=float)[usable]
    if surrogate and out.samples:
        extra = _box_samples(ev, x, path, coords, step, rng)
        pts = [s.x for s in out.samples] + [s.x for s in extra]
        hs = [s.h for s in out.samples] + [s.h for s in extra]
        g = gp_gradient(np.array(pts), np.array(hs), x, h, p.upper - p.lower)
        grad_h[usable] = g[usable]
        out.samples += extra
    sign = 1.0 if p.sense == "max" else -1.0
    out.grad = np.where(usable, sign * (grad_opt - grad_h), 0.0)
    return out


def _box_samples(
    ev: Evaluator,
    x: np.ndarray,
    path: str,
    coords: np.ndarray,
    step: np.ndarray,
    rng: np.random.Generator,
    n: int = 12,
) -> list[_Sample]:
    """Random same-path points in a box around `x` (the GP's training set, as MetaEase samples)."""
    p = ev.problem
    out = []
    for _ in range(n):
        if ev.expired():
            break
        y = x.copy()
        y[coords] += rng.uniform(-3, 3, coords.size) * step[coords]
        y = p.project(y)
        if not p.feasible(y):
            continue
        ypath, yh = ev.path(y)
        if ypath == path:
            out.append(_Sample(y, yh, -1))
    return out


def gp_gradient(
    X: np.ndarray, y: np.ndarray, x0: np.ndarray, y0: float, span: np.ndarray
) -> np.ndarray:
    """The gradient at `x0` of the posterior mean of a Gaussian process (RBF kernel plus white
    noise, lengthscale the median distance between samples) fitted on ``(X, y)`` and ``(x0, y0)``.

    A smooth stand-in for ∇H where finite differences are noisy, as MetaEase's GP option
    (scikit-learn ``C·RBF + White``); ours fixes the hyper-parameters instead of fitting them.

    >>> X = np.array([[1.0], [2.0], [-1.0], [-2.0]])
    >>> round(float(gp_gradient(X, 3 * X[:, 0], np.zeros(1), 0.0, np.ones(1))[0]))  # y = 3x
    3
    """
    P = np.vstack([x0, X]) / np.maximum(span, 1e-12)
    v = np.concatenate([[y0], y])
    mu = v.mean()
    d2 = ((P[:, None, :] - P[None, :, :]) ** 2).sum(-1)
    pos = d2[d2 > 0]
    ell2 = float(np.median(pos)) if pos.size else 1.0
    K = np.exp(-d2 / (2 * ell2)) + 1e-6 * np.eye(len(P))
    alpha = np.linalg.solve(K, v - mu)
    k0 = K[0] - np.eye(len(P))[0] * 1e-6
    return ((alpha * k0)[:, None] * (P - P[0])).sum(0) / ell2 / np.maximum(span, 1e-12)


def guided_search(
    problem: Problem,
    seed: np.ndarray,
    budget_s: float,
    *,
    rng: np.random.Generator | int = 0,
    max_iters: int = 1000,
    coords: int = 20,
    surrogate: bool = False,
    patience: int = 12,
    hop: bool = True,
    deadline: float | None = None,
    method: str = "metaease",
) -> SearchResult:
    """MetaEase's gradient ascent on the gap from one seed, staying on the seed's code path.

    Returns the best input seen (on or off the path). Exceptions from the heuristic or the
    optimum end the search on this seed and come back in ``info["error"]`` with the best point
    found before them; only a failure at the seed itself raises.

    >>> from datahall.heuristics.problem import problem
    >>> @problem(optimum=lambda x: x[0] + x[1], lower=0, upper=10, dim=2)
    ... def capped(x):  # counts the second input only while the first stays at most 5
    ...     return x[0] + (x[1] if x[0] <= 5 else 0)
    >>> r = guided_search(capped, np.array([6.0, 0.0]), budget_s=5)
    >>> r.gap, float(r.x[1])  # any first input above 5 gives the whole second one away
    (10.0, 10.0)
    """
    rng = np.random.default_rng(rng)
    stop = time.monotonic() + budget_s
    ev = Evaluator(problem, method, min(stop, deadline) if deadline else stop)
    x = problem.project(np.asarray(seed, dtype=float))
    path, h = ev.path(x)
    gap, opt = ev.gap(x, h)
    span = problem.upper - problem.lower
    eta = 0.25 * float(np.mean(span))
    floor = 1.0 if problem.integer else 1e-4 * float(np.mean(span))
    stalls = iters = hops = 0
    error = None
    try:
        while iters < max_iters and not ev.expired() and stalls < patience:
            iters += 1
            subset = rng.choice(problem.dim, size=min(coords, problem.dim), replace=False)
            st = _gradient(ev, x, path, h, opt, subset, surrogate, rng)
            moved = None
            norm = float(np.max(np.abs(st.grad)))
            while moved is None and norm > 0 and eta >= floor and not ev.expired():
                cand = problem.project(x + eta * st.grad / norm)
                if not np.array_equal(cand, x):
                    cpath, ch = ev.path(cand)
                    cgap, copt = ev.gap(cand, ch)
                    if cpath == path and cgap > gap + 1e-9:
                        moved = cand, ch, cgap, copt
                        eta *= 1.5
                        break
                    if cpath != path:
                        moved = _angle_move(ev, x, st, gap)
                eta /= 2
            if moved is None:
                moved = _angle_move(ev, x, st, gap)
            if moved is None and hop:
                hopped = _hop(ev, x, gap, rng)
                if hopped is not None:
                    *moved, path = hopped
                    hops += 1
                    eta = 0.25 * float(np.mean(span))
            if moved is None:
                better, drift = _plateau_move(ev, x, path, gap, eta, rng, leave=hop)
                if better is not None:
                    *moved, path = better
                elif drift is not None:
                    x, h, gap, opt, path = drift
            if moved is None:
                stalls += 1
                eta = max(eta, 4 * floor)
            else:
                x, h, gap, opt = moved
                stalls = 0
    except Exception as e:  # the user's code may raise anything: keep the best point so far
        error = f"{type(e).__name__}: {e}"
    info = {"iterations": iters, "path": path, "hops": hops, "converged": stalls >= patience}
    if error:
        info["error"] = error
    return ev.result(**info)


def _angle_move(ev: Evaluator, x: np.ndarray, st: _Step, gap: float):
    """Move to the same-path sample with the smallest angle (< 90°) to the gradient whose gap is
    larger, evaluating samples in angle order; ``None`` when there is none. Samples are tried
    once per step."""
    if st.tried:
        return None
    st.tried = True
    gnorm = float(np.linalg.norm(st.grad))
    if gnorm == 0:
        return None
    ranked = []
    for s in st.samples:
        d = s.x - x
        dn = float(np.linalg.norm(d))
        cos = float(d @ st.grad) / (dn * gnorm) if dn else 0.0
        if cos > 0:
            ranked.append((-cos, len(ranked), s))
    for _, _, s in sorted(ranked)[:4]:
        if ev.expired():
            break
        sgap, sopt = ev.gap(s.x, s.h)
        if sgap > gap + 1e-9:
            return s.x, s.h, sgap, sopt
    return None


def _plateau_move(
    ev: Evaluator,
    x: np.ndarray,
    path: str,
    gap: float,
    eta: float,
    rng: np.random.Generator,
    leave: bool = True,
    tries: int = 16,
):
    """Random moves of one to three inputs, for when the gradient vanishes (gaps that are step
    functions, such as bins used). Returns (better, sideways): the first move that raises the
    gap, on any path, as (x, h, gap, optimum, path); else the last same-path move that keeps the
    gap, as (x, h, gap, optimum), so the search drifts across a plateau. ``leave=False`` keeps
    even the better moves on the path. This step is ours;
    MetaEase's released code declares convergence here."""
    p = ev.problem
    sideways = None
    for _ in range(tries):
        if ev.expired():
            break
        y = x.copy()
        ks = rng.choice(p.dim, size=min(p.dim, int(rng.integers(1, 4))), replace=False)
        y[ks] += rng.uniform(-1, 1, ks.size) * max(eta, 1.0)
        y = p.project(y)
        if np.array_equal(y, x) or not p.feasible(y):
            continue
        ypath, yh = ev.path(y)
        ygap, yopt = ev.gap(y, yh)
        if ygap > gap + 1e-9 and (leave or ypath == path):
            return (y, yh, ygap, yopt, ypath), None
        if (leave or ypath == path) and ygap >= gap - 1e-9:
            sideways = (y, yh, ygap, yopt, ypath)
    return None, sideways


def _hop(ev: Evaluator, x: np.ndarray, gap: float, rng: np.random.Generator, tries: int = 8):
    """Move to a neighbouring code path: flip one branch of the current run with z3 (inputs the
    flip does not involve keep their values), stretch the flipped inputs to the ends of the new
    path's range (:func:`_stretch`), and keep the first flip that raises the gap.
    Returns (x, h, gap, optimum, path) or None. Ours: MetaEase stays on the seed's path and
    relies on many seeds; hopping lets one seed's climb go on where its path runs out."""
    p = ev.problem
    ps = ev.path_solver()
    t = ps.trace(x)
    if not t.branches:
        return None
    for i in rng.choice(t.branches, size=min(tries, t.branches), replace=False):
        if ev.expired():
            break
        y = ps.flip(t, int(i), x)
        if y is None:
            continue
        y = p.project(y)
        if not p.feasible(y) or np.array_equal(y, x):
            continue
        ypath, yh = ev.path(y)
        best = None
        for z, zh in [(y, yh), *_stretch(ev, x, y, ypath)]:
            zgap, zopt = ev.gap(z, zh)
            if zgap > gap + 1e-9 and (best is None or zgap > best[2]):
                best = (z, zh, zgap, zopt, ypath)
        if best is not None:
            return best
    return None


def _stretch(ev: Evaluator, x: np.ndarray, y: np.ndarray, path: str, steps: int = 8):
    """The two ends, within code path `path`, of the line through the inputs that differ
    between `x` and `y`: as far as the bounds allow away from `x`, and as close to `x` as the
    path allows (a pinned demand is worth most at the threshold). Found by bisection on the
    path id, which assumes the path is one interval along the line."""
    p = ev.problem
    d = y - x
    if not np.any(d):
        return []
    out = []
    ahead = np.where(d > 0, p.upper, np.where(d < 0, p.lower, y))
    for target in (ahead, x):
        lo, hi = 0.0, 1.0
        z = p.project(y + (target - y))
        zpath, zh = ev.path(z)
        if zpath != path:
            best = None
            for _ in range(steps):
                mid = (lo + hi) / 2
                z = p.project(y + mid * (target - y))
                zpath, zh = ev.path(z)
                if zpath == path:
                    lo, best = mid, (z, zh)
                else:
                    hi = mid
            if best is None:
                continue
            z, zh = best
        if not np.array_equal(z, y) and p.feasible(z):
            out.append((z, zh))
    return out
