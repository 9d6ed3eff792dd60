"""0/1 knapsack: the greedy by value density against the exact optimum.

MetaEase (Karimi et al., NSDI '26) analyses a sort-based greedy for knapsack, one of its five
domains. ``n`` items have integer values and weights; a knapsack of fixed integer `capacity`
holds a set of items whose weights sum to at most `capacity`, and more value is better
(``sense="max"``, gap OPT − H).

- :func:`greedy_knapsack`: items by value / weight, decreasing (ties by index), each taken when
  it still fits. The gap is unbounded: a light item of high density can block one heavy item
  that alone fills the knapsack.
- :func:`optimal_knapsack`: the exact optimum by dynamic programming over the integer capacity.

The input is flat: ``x = [value[0], ..., value[n-1], weight[0], ..., weight[n-1]]``. The greedy
is plain Python over ``x`` (it divides, compares and adds the elements directly), so the concolic
tracer sees its branches.

>>> greedy_knapsack([2, 10], [1, 10], capacity=10)
[0]
>>> optimal_knapsack([2, 10], [1, 10], capacity=10)
(10, [1])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .problem import Optimum, Problem, ProblemError

__all__ = [
    "GreedyKnapsack",
    "KnapsackReport",
    "OptimalKnapsack",
    "greedy_knapsack",
    "knapsack_problem",
    "optimal_knapsack",
]


def greedy_knapsack(values: Sequence[Any], weights: Sequence[Any], capacity: float) -> list[int]:
    """The items the density greedy takes, in the order it takes them.

    Items are sorted by ``values[i] / weights[i]``, decreasing, ties by index (a stable sort);
    each is taken if it fits in what is left of `capacity`. Weights must be positive.

    The example of the MetaEase brief (capacity 10): the item of value 2 and weight 1 has
    density 2 and goes first, after which the item of value 10 and weight 10 no longer fits.

    >>> greedy_knapsack([2, 10], [1, 10], capacity=10)
    [0]
    >>> greedy_knapsack([6, 10, 12], [1, 2, 3], capacity=5)  # densities 6, 5, 4
    [0, 1]
    """
    order = sorted(range(len(values)), key=lambda i: values[i] / weights[i], reverse=True)
    load = 0
    taken = []
    for i in order:
        if load + weights[i] <= capacity:
            load = load + weights[i]
            taken.append(i)
    return taken


def optimal_knapsack(
    values: Sequence[float], weights: Sequence[float], capacity: int
) -> tuple[float, list[int]]:
    """The best total value and the items achieving it (sorted indices), exact.

    Dynamic programming over the integer capacity: ``best[c]`` is the most value within weight
    ``c`` using the items seen so far; O(n · capacity). Weights and capacity must be integers
    (values may be any non-negative numbers). Among optimal sets, one is returned
    deterministically.

    >>> optimal_knapsack([6, 10, 12], [1, 2, 3], capacity=5)
    (22, [1, 2])
    """
    v = np.asarray(values, dtype=float)
    w = np.asarray(weights, dtype=float)
    if v.shape != w.shape or v.ndim != 1:
        raise ProblemError(f"knapsack: {v.size} values for {w.size} weights")
    if np.any(w < 0) or np.any(w != np.round(w)) or capacity != int(capacity) or capacity < 0:
        raise ProblemError(
            "knapsack: the exact optimum needs integer weights >= 0 and an integer capacity >= 0 "
            f"(got weights {w.tolist()}, capacity {capacity!r}); round them first"
        )
    if np.any(v < 0) or not np.all(np.isfinite(v)):
        raise ProblemError("knapsack: values must be finite and >= 0")
    cap = int(capacity)
    wi = w.astype(int)
    best = np.zeros(cap + 1)
    keep = np.zeros((v.size, cap + 1), dtype=bool)
    for i in range(v.size):
        if wi[i] > cap:
            continue
        cand = best.copy()
        cand[wi[i] :] = best[: cap + 1 - wi[i]] + v[i]
        keep[i] = cand > best
        best = np.where(keep[i], cand, best)
    chosen, c = [], cap
    for i in range(v.size - 1, -1, -1):
        if keep[i, c]:
            chosen.append(i)
            c -= wi[i]
    total = float(best[cap])
    return (int(total) if total.is_integer() else total), sorted(chosen)


@dataclass(frozen=True)
class GreedyKnapsack:
    """The heuristic H(x) = value packed by :func:`greedy_knapsack`, over the flat input
    ``x = values + weights`` of `items` items."""

    items: int
    capacity: int

    def taken(self, x: Sequence[Any]) -> list[int]:
        n = self.items
        return greedy_knapsack(x[:n], x[n : 2 * n], self.capacity)

    def __call__(self, x: Sequence[Any]) -> Any:
        return sum(x[i] for i in self.taken(x))


@dataclass(frozen=True)
class OptimalKnapsack:
    """OPT(x) = the most value that fits (:func:`optimal_knapsack`).

    No gradient: OPT is a step function of the integer weights, so finite differences are the
    honest derivative there."""

    items: int
    capacity: int

    def solve(self, x: Sequence[float]) -> tuple[float, list[int]]:
        n = self.items
        x = np.asarray(x, dtype=float)
        return optimal_knapsack(x[:n], x[n : 2 * n], self.capacity)

    def __call__(self, x: Sequence[float]) -> Optimum:
        return Optimum(float(self.solve(x)[0]))


def _num(v: float) -> int | float:
    v = float(v)
    return int(v) if v.is_integer() else v


@dataclass(frozen=True)
class KnapsackReport:
    """``describe(x)``: the value the greedy and the optimum pack, their ratio H/OPT, and the
    items each takes (index, value, weight, density)."""

    heuristic: GreedyKnapsack
    optimum: OptimalKnapsack

    def __call__(self, x: Sequence[float]) -> dict[str, Any]:
        n = self.heuristic.items
        xs = [float(a) for a in np.asarray(x, dtype=float)]
        values, weights = xs[:n], xs[n : 2 * n]
        taken = self.heuristic.taken(xs)
        opt, chosen = self.optimum.solve(xs)
        h = sum(values[i] for i in taken)

        def show(items: list[int]) -> list[dict[str, Any]]:
            return [
                {
                    "item": i,
                    "value": _num(values[i]),
                    "weight": _num(weights[i]),
                    "density": values[i] / weights[i] if weights[i] else None,
                }
                for i in items
            ]

        return {
            "capacity": _num(self.heuristic.capacity),
            "value_heuristic": _num(h),
            "value_optimal": _num(opt),
            "gap": _num(opt - h),
            "ratio": h / opt if opt else None,
            "heuristic_items": show(taken),
            "heuristic_weight": _num(sum(weights[i] for i in taken)),
            "optimal_items": show(chosen),
            "optimal_weight": _num(sum(weights[i] for i in chosen)),
        }


def knapsack_problem(items: int = 8, capacity: int = 20, max_value: int = 100) -> Problem:
    """The knapsack :class:`~.problem.Problem`: the density greedy against the exact optimum.

    Inputs are ``values[0..n-1]`` in ``[0, max_value]`` then ``weights[0..n-1]`` in
    ``[1, capacity]``, integers, named ``value[i]`` and ``weight[i]``; the capacity is fixed.
    The gap is OPT − H in units of value (``sense="max"``, scale 1).

    >>> p = knapsack_problem(items=2, capacity=10)
    >>> p.gap([2, 10, 1, 10])
    8.0
    >>> p.describe([2, 10, 1, 10])["ratio"]
    0.2
    """
    if items < 1:
        raise ProblemError(f"knapsack: need items >= 1, not {items}")
    if capacity != int(capacity) or capacity < 1:
        raise ProblemError(f"knapsack: capacity must be an integer >= 1, not {capacity!r}")
    if not max_value > 0:
        raise ProblemError(f"knapsack: max_value must be > 0, not {max_value!r}")
    h = GreedyKnapsack(items, int(capacity))
    opt = OptimalKnapsack(items, int(capacity))
    return Problem(
        "knapsack",
        heuristic=h,
        optimum=opt,
        lower=[0] * items + [1] * items,
        upper=[max_value] * items + [capacity] * items,
        integer=True,
        sense="max",
        names=[f"value[{i}]" for i in range(items)] + [f"weight[{i}]" for i in range(items)],
        scale=1.0,
        scale_label="value",
        describe=KnapsackReport(h, opt),
        info={
            "domain": "0/1 knapsack",
            "heuristic": "greedy by value density",
            "items": items,
            "capacity": int(capacity),
            "max_value": max_value,
            "paper": "MetaEase (NSDI '26) knapsack domain",
        },
    )
