"""The problem interface: a heuristic, an optimum for the same problem, and the input space.

MetaEase (Karimi et al., NSDI '26) searches for inputs ``x`` that maximise the *performance gap*
between an optimal algorithm and a heuristic. A :class:`Problem` is everything the search needs:

- ``heuristic(x) -> float``: plain Python over the sequence ``x``. The concolic tracer
  (:mod:`.concolic`) runs it on tracked numbers, so its branches on ``x`` name the code path;
  converting an input with ``float()`` (to hand it to numpy or an LP solver) is allowed and ends
  tracking for that value.
- ``optimum(x) -> Optimum``: the optimal value, with ``gradient`` = ∂OPT/∂x when it is known (the
  LP duals of the demand rows, by the envelope theorem) or ``None`` (then finite differences).
- the box ``lower <= x <= upper``, integer or real inputs, and realistic-input constraints: at most
  ``max_nonzero`` non-zero inputs (MetaOpt's demand density) and linear rows ``A x <= b``.

``sense`` says which side is better: for ``"max"`` problems (flow carried, value packed) the gap
is OPT − H; for ``"min"`` problems (bins used) it is H − OPT. Either way the gap is >= 0 when the
heuristic's answer is feasible, and larger means worse for the heuristic. ``scale`` normalises it
the way the domain reports it (total network capacity for traffic engineering, as MetaOpt does).

>>> p = Problem("double", heuristic=lambda x: x[0], optimum=lambda x: Optimum(2 * x[0]),
...             lower=[0], upper=[10])
>>> p.gap([3])
3.0
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

__all__ = ["Optimum", "Problem", "ProblemError", "SearchResult", "problem"]


class ProblemError(ValueError):
    """The problem cannot be analysed as given; the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class Optimum:
    """OPT(x), and ∂OPT/∂x when known (a subgradient at degenerate LP points)."""

    value: float
    gradient: np.ndarray | None = None


@dataclass
class SearchResult:
    """The best input one search method found, with the budget it used.

    ``history`` is ``[(seconds since start, best gap so far), ...]``, one entry per improvement.
    """

    method: str
    gap: float
    x: np.ndarray
    heuristic: float
    optimum: float
    evaluations: int
    seconds: float
    history: list[tuple[float, float]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(eq=False)
class Problem:
    """A heuristic and the optimum it approximates, over a box of inputs (see the module doc)."""

    name: str
    heuristic: Callable[[Sequence[Any]], float]
    optimum: Callable[[Sequence[float]], Optimum]
    lower: Sequence[float] | np.ndarray
    upper: Sequence[float] | np.ndarray
    integer: bool = True
    sense: Literal["max", "min"] = "max"
    names: list[str] | None = None
    scale: float = 1.0
    scale_label: str = "gap"
    max_nonzero: int | None = None
    A: np.ndarray | None = None
    b: np.ndarray | None = None
    describe: Callable[[np.ndarray], dict[str, Any]] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.lower = np.asarray(self.lower, dtype=float)
        self.upper = np.asarray(self.upper, dtype=float)
        n = self.lower.size
        if self.lower.shape != (n,) or self.upper.shape != (n,) or n == 0:
            raise ProblemError(
                f"{self.name}: lower and upper must be 1-D and the same non-zero length "
                f"(got {self.lower.shape} and {self.upper.shape})"
            )
        if not (np.all(np.isfinite(self.lower)) and np.all(np.isfinite(self.upper))):
            raise ProblemError(f"{self.name}: bounds must be finite numbers")
        bad = np.flatnonzero(self.lower > self.upper)
        if bad.size:
            i = int(bad[0])
            raise ProblemError(
                f"{self.name}: bound of {self.label(i)} is empty "
                f"(lower {self.lower[i]:g} > upper {self.upper[i]:g}); swap or widen it"
            )
        if self.integer:
            self.lower, self.upper = np.ceil(self.lower), np.floor(self.upper)
            if np.any(self.lower > self.upper):
                raise ProblemError(f"{self.name}: an integer bound contains no integer")
        if self.names is not None and len(self.names) != n:
            raise ProblemError(f"{self.name}: {len(self.names)} names for {n} inputs")
        if self.sense not in ("max", "min"):
            raise ProblemError(f"{self.name}: sense must be 'max' or 'min', not {self.sense!r}")
        if not self.scale > 0:
            raise ProblemError(f"{self.name}: scale must be positive, not {self.scale!r}")
        if self.max_nonzero is not None:
            forced = int(np.sum(self.lower > 0) + np.sum(self.upper < 0))
            if forced > self.max_nonzero:
                raise ProblemError(
                    f"{self.name}: the bounds force {forced} non-zero inputs but max_nonzero is "
                    f"{self.max_nonzero}; let more inputs reach 0 or raise max_nonzero"
                )
        if (self.A is None) != (self.b is None):
            raise ProblemError(f"{self.name}: give both A and b for linear constraints, or neither")
        if self.A is not None:
            self.A = np.atleast_2d(np.asarray(self.A, dtype=float))
            self.b = np.atleast_1d(np.asarray(self.b, dtype=float))
            if self.A.shape != (self.b.size, n):
                raise ProblemError(
                    f"{self.name}: A must be {self.b.size}x{n} for {n} inputs, got {self.A.shape}"
                )
            self._anchor = self._feasible_point()

    def _feasible_point(self) -> np.ndarray:
        """A point of the box that satisfies ``A x <= b`` (an LP), the anchor projections
        shrink toward: the one of least sum, so that demands stay small where they can."""
        from scipy.optimize import linprog

        res = linprog(
            np.ones(self.dim),
            A_ub=self.A,
            b_ub=self.b,
            bounds=list(zip(self.lower, self.upper, strict=True)),
            method="highs",
        )
        if res.status != 0:
            raise ProblemError(
                f"{self.name}: no input in the bounds satisfies A x <= b; the bounds contradict "
                "the constraints: relax one or the other"
            )
        x = np.asarray(res.x, dtype=float)
        if self.integer:
            r = np.clip(np.round(x), self.lower, self.upper)
            if np.all(self.A @ r <= self.b + 1e-7):
                x = r
        return x

    @property
    def dim(self) -> int:
        return int(self.lower.size)

    def label(self, i: int) -> str:
        return self.names[i] if self.names else f"x[{i}]"

    def gap(self, x: Sequence[float]) -> float:
        """The performance gap at `x` (OPT − H for ``max``, H − OPT for ``min``)."""
        return self.evaluate(x)[0]

    def evaluate(self, x: Sequence[float]) -> tuple[float, float, Optimum]:
        """(gap, heuristic value, optimum) at `x`, with clear errors for bad values."""
        x = np.asarray(x, dtype=float)
        h = self.heuristic_value(x)
        opt = self.optimum(x)
        if not isinstance(opt, Optimum):
            opt = Optimum(opt)
        try:  # numpy scalars are numbers too (np.int64 is no int)
            value = float(opt.value)
        except (TypeError, ValueError):
            value = math.nan
        if isinstance(opt.value, (str, bytes)) or not math.isfinite(value):
            raise ProblemError(f"{self.name}: the optimum returned {opt.value} at {self.show(x)}")
        return self.signed(value - h), h, opt

    def heuristic_value(self, x: Sequence[float]) -> float:
        v = self.heuristic(list(x))
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise ProblemError(
                f"{self.name}: the heuristic returned {type(v).__name__}, not a number"
            ) from None
        if not math.isfinite(v):
            raise ProblemError(f"{self.name}: the heuristic returned {v} at {self.show(x)}")
        return v

    def signed(self, opt_minus_h: float) -> float:
        # + 0.0 turns the -0.0 of a "min" problem's zero gap into 0.0
        return (opt_minus_h if self.sense == "max" else -opt_minus_h) + 0.0

    def feasible(self, x: np.ndarray, tol: float = 1e-9) -> bool:
        """Whether `x` lies in the box and satisfies the realistic-input constraints."""
        if np.any(x < self.lower - tol) or np.any(x > self.upper + tol):
            return False
        if self.integer and np.any(np.abs(x - np.round(x)) > tol):
            return False
        if self.max_nonzero is not None and np.count_nonzero(np.abs(x) > tol) > self.max_nonzero:
            return False
        return self.A is None or bool(np.all(self.A @ x <= self.b + 1e-7))

    def project(self, x: np.ndarray) -> np.ndarray:
        """A feasible point near `x`: clipped, rounded, the smallest inputs zeroed beyond
        ``max_nonzero``, then moved toward a point that satisfies ``A x <= b`` until it does."""
        x = np.clip(np.asarray(x, dtype=float), self.lower, self.upper)
        if self.integer:
            x = np.clip(np.round(x), self.lower, self.upper)
        if self.max_nonzero is not None:
            nz = np.flatnonzero(x != 0)
            if nz.size > self.max_nonzero:
                # Inputs whose bounds exclude 0 stay (the constructor checked that they fit the
                # budget); of the others, the smallest are zeroed.
                can_zero = (self.lower[nz] <= 0) & (self.upper[nz] >= 0)
                size = np.where(can_zero, np.abs(x[nz]), np.inf)
                x[nz[np.argsort(size, kind="stable")[: nz.size - self.max_nonzero]]] = 0.0
        if self.A is not None and not np.all(self.A @ x <= self.b + 1e-7):
            base = self._anchor
            lo, hi = 0.0, 1.0
            for _ in range(40):
                mid = (lo + hi) / 2
                ok = np.all(self.A @ self._toward(base, x, mid) <= self.b + 1e-7)
                lo, hi = (mid, hi) if ok else (lo, mid)
            x = self._toward(base, x, lo)
        return x

    def _toward(self, base: np.ndarray, x: np.ndarray, t: float) -> np.ndarray:
        """The point a share `t` of the way from `base` to `x`; for integer problems rounded
        toward `base`, and tested for ``A x <= b`` rounded, since rounding can break a row whose
        coefficients have mixed signs."""
        y = base + t * (x - base)
        return np.where(y > base, np.floor(y), np.ceil(y)) if self.integer else y

    def show(self, x: Sequence[float], top: int = 4) -> str:
        """A short text of the largest inputs of `x`, for messages."""
        x = np.asarray(x, dtype=float)
        order = np.argsort(-np.abs(x), kind="stable")[:top]
        parts = [f"{self.label(int(i))}={x[i]:g}" for i in order if x[i] != 0]
        if not parts:
            return "all zero"
        more = np.count_nonzero(x) - len(parts)
        return "{" + ", ".join(parts) + (f", {more} more non-zero" if more > 0 else "") + "}"


def problem(
    *,
    optimum: Callable[[Sequence[float]], Optimum | float],
    lower: Sequence[float] | float,
    upper: Sequence[float] | float,
    dim: int | None = None,
    **options: Any,
) -> Callable[[Callable[[Sequence[Any]], float]], Problem]:
    """Decorator: turn a heuristic function into a :class:`Problem`.

    Scalar bounds need `dim`. Other keywords are :class:`Problem` fields.

    >>> @problem(optimum=lambda x: max(x), lower=0, upper=9, dim=3)
    ... def first(x):
    ...     return x[0]
    >>> first.name, first.dim, first.gap([1, 5, 2])
    ('first', 3, 4.0)
    """

    def wrap(fn: Callable[[Sequence[Any]], float]) -> Problem:
        sizes = {np.size(b) for b in (lower, upper) if np.ndim(b) == 1}
        n = dim if dim is not None else next(iter(sizes), None)
        if n is None:
            raise ProblemError(f"{fn.__name__}: scalar bounds need dim=")
        if sizes - {n}:
            raise ProblemError(
                f"{fn.__name__}: {max(sizes - {n})} bounds for dim={n}; give one per input"
            )
        lo = np.broadcast_to(np.asarray(lower, dtype=float), (n,)).copy()
        hi = np.broadcast_to(np.asarray(upper, dtype=float), (n,)).copy()

        # The Problem replaces the function in its module; renaming the function to the
        # attribute path that reaches it keeps it picklable for worker processes.
        fn.__qualname__ = f"{fn.__qualname__}.heuristic"
        name = options.pop("name", fn.__name__)
        return Problem(name, fn, AsOptimum(optimum), lo, hi, **options)

    return wrap


class AsOptimum:
    """Wraps an optimum that returns a bare number."""

    def __init__(self, fn: Callable[[Sequence[float]], Optimum | float]) -> None:
        self.fn = fn

    def __call__(self, x: Sequence[float]) -> Optimum:
        v = self.fn(x)
        return v if isinstance(v, Optimum) else Optimum(float(v))
