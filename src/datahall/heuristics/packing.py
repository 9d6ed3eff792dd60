"""Vector bin packing: First Fit and First Fit Decreasing against the exact optimum.

MetaOpt (Namyar et al., NSDI '24) analyses FFD for virtual-machine placement and proves a new
lower bound on its ratio for vector bin packing; MetaEase (Karimi et al., NSDI '26) finds such
gaps from the heuristic's code. Here ``n`` items each have ``dims`` integer sizes in
``[0, capacity]`` (one capacity for every dimension), given as a flat input, item-major:
``x = [item0.d0, item0.d1, ..., item1.d0, ...]``. An item fits a bin when it fits in every
dimension; an item whose sizes are all 0 needs no bin. Fewer bins is better, so the problem's
sense is ``"min"`` and the gap is H − OPT bins.

- :func:`first_fit`: items in input order, each into the first open bin where it fits.
- :func:`first_fit_decreasing`: items by the sum of their sizes, decreasing (ties by index),
  then first fit. In one dimension FFD(I) <= 11/9 · OPT(I) + 6/9, and the bound is tight
  (Dósa, "The tight bound of first fit decreasing bin-packing algorithm is FFD(I) <=
  11/9 OPT(I) + 6/9", ESCAPE 2007).
- :func:`optimal_packing`: the fewest bins, exact, by a MILP on HiGHS (``scipy.optimize.milp``)
  with symmetry breaking and the better of FF and FFD as the incumbent.

The heuristics are plain Python over ``x``: they compare and add its elements directly, so the
concolic tracer sees every branch ("does item i fit bin b?", "is item i larger than item j?").

>>> ffd = first_fit_decreasing([6, 5, 3, 2, 2, 2], capacity=10)
>>> ffd
[[0, 2], [1, 3, 4], [5]]
>>> x = [6, 5, 3, 2, 2, 2]
>>> [[x[i] for i in b] for b in optimal_packing(x, capacity=10)]  # {6, 2, 2} and {5, 3, 2}
[[6, 2, 2], [5, 3, 2]]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from .problem import Optimum, Problem, ProblemError

__all__ = [
    "FirstFit",
    "FirstFitDecreasing",
    "OptimalBins",
    "PackingReport",
    "bin_packing_problem",
    "first_fit",
    "first_fit_decreasing",
    "lower_bound",
    "optimal_packing",
]

DIM_NAMES = ("cpu", "mem", "disk", "net")


# -- heuristics (plain Python over x, traced) ---------------------------------------------------


def first_fit(
    x: Sequence[Any], capacity: float, dims: int = 1, order: Sequence[int] | None = None
) -> list[list[int]]:
    """Pack items by First Fit; return the bins, each a list of item indices.

    Items are taken in `order` (default: input order); each goes into the first open bin where
    every dimension still fits, else into a new bin. Items of size 0 in every dimension are left
    out (they need no bin). `x` is flat, item-major: item ``i`` has sizes
    ``x[i * dims : (i + 1) * dims]``.

    The FF example of the MetaEase brief (items 1, 1, 9, 9, capacity 10): the two small items
    share a bin, so each large item needs its own; the optimum pairs 1 with 9.

    >>> first_fit([1, 1, 9, 9], capacity=10)
    [[0, 1], [2], [3]]
    >>> first_fit([3, 1, 0, 0, 2, 2], capacity=4, dims=2)  # (3,1), (0,0), (2,2)
    [[0], [2]]
    """
    if dims < 1 or len(x) % dims:
        raise ProblemError(
            f"first_fit: {len(x)} sizes do not split into items of {dims} dimensions"
        )
    n = len(x) // dims
    bins: list[list[int]] = []
    loads: list[list[Any]] = []
    for i in range(n) if order is None else order:
        size = [x[i * dims + d] for d in range(dims)]
        if not any(s > 0 for s in size):
            continue
        for b, load in enumerate(loads):
            if all(load[d] + size[d] <= capacity for d in range(dims)):
                bins[b].append(i)
                loads[b] = [load[d] + size[d] for d in range(dims)]
                break
        else:
            bins.append([i])
            loads.append(size)
    return bins


def first_fit_decreasing(x: Sequence[Any], capacity: float, dims: int = 1) -> list[list[int]]:
    """Pack items by First Fit Decreasing; return the bins, each a list of item indices.

    Items are sorted by the sum of their sizes over the dimensions, decreasing, ties by index
    (the sort is stable), then packed by :func:`first_fit`: an item-centric FFD, the family
    MetaOpt (NSDI '24) encodes for vector bin packing (its exact sort key may differ).

    The FFD example of the MetaEase brief: FFD uses 3 bins where 2 suffice
    ({6, 2, 2} and {5, 3, 2}).

    >>> first_fit_decreasing([2, 6, 2, 5, 3, 2], capacity=10)
    [[1, 4], [3, 0, 2], [5]]
    """
    if dims < 1 or len(x) % dims:
        raise ProblemError(
            f"first_fit_decreasing: {len(x)} sizes do not split into items of {dims} dimensions"
        )
    n = len(x) // dims
    order = sorted(range(n), key=lambda i: sum(x[i * dims + d] for d in range(dims)), reverse=True)
    return first_fit(x, capacity, dims, order)


# -- the optimum (exact MILP) -------------------------------------------------------------------


def _sizes(x: Sequence[float], capacity: float, dims: int) -> np.ndarray:
    s = np.asarray(x, dtype=float)
    if dims < 1 or s.ndim != 1 or s.size % dims:
        raise ProblemError(
            f"bin packing: {s.size} sizes do not split into items of {dims} dimensions"
        )
    s = s.reshape(-1, dims)
    if not np.all(np.isfinite(s)) or np.any(s < 0):
        raise ProblemError("bin packing: item sizes must be finite and >= 0")
    over = np.flatnonzero(np.any(s > capacity + 1e-9, axis=1))
    if over.size:
        i = int(over[0])
        raise ProblemError(
            f"bin packing: item {i} (sizes {s[i].tolist()}) exceeds the bin capacity {capacity:g}; "
            "no packing exists, keep every size <= capacity"
        )
    return s


def lower_bound(x: Sequence[float], capacity: float, dims: int = 1) -> int:
    """A lower bound on the number of bins: the largest of ⌈total size / capacity⌉ per
    dimension and the number of items larger than half a bin in one dimension.

    >>> lower_bound([6, 5, 3, 2, 2, 2], capacity=10)
    2
    """
    s = _sizes(x, capacity, dims)
    if not np.any(s > 0):
        return 0
    by_volume = max(math.ceil(t / capacity - 1e-9) for t in s.sum(axis=0))
    by_size = int(max(np.sum(s[:, d] > capacity / 2) for d in range(dims)))
    return max(1, by_volume, by_size)


def optimal_packing(x: Sequence[float], capacity: float, dims: int = 1) -> list[list[int]]:
    """A packing with the fewest bins, exact; return the bins, each a list of item indices.

    The incumbent is the better of First Fit and FFD; if it meets :func:`lower_bound` it is
    optimal. Otherwise a MILP on HiGHS decides whether one bin fewer suffices: binary
    ``z[i, b]`` (item i in bin b) and ``y[b]`` (bin b used), minimise Σ y subject to every
    item in one bin and Σ_i size[i, d] · z[i, b] <= capacity · y[b]. Symmetry breaking: with
    the items sorted by decreasing total size, item ``p`` may only use bins ``0..p``, and
    ``y[b] >= y[b + 1]``. Exact for small instances (tens of items).

    >>> optimal_packing([1, 1, 9, 9], capacity=10)
    [[0, 2], [1, 3]]
    """
    s = _sizes(x, capacity, dims)
    lb = lower_bound(x, capacity, dims)
    heur = min(
        first_fit(s.ravel().tolist(), capacity, dims),
        first_fit_decreasing(s.ravel().tolist(), capacity, dims),
        key=len,
    )
    if len(heur) <= lb:
        return sorted(sorted(b) for b in heur)
    items = [i for i in range(len(s)) if np.any(s[i] > 0)]
    items.sort(key=lambda i: -float(s[i].sum()))
    m, nb = len(items), len(heur) - 1
    zvars = [(p, b) for p in range(m) for b in range(min(p + 1, nb))]
    nz = len(zvars)
    entries: list[tuple[int, int, float]] = []  # (row, column, coefficient)
    lo: list[float] = []
    hi: list[float] = []

    def row(coefs: list[tuple[int, float]], low: float, high: float) -> None:
        entries.extend((len(lo), k, v) for k, v in coefs)
        lo.append(low)
        hi.append(high)

    for p in range(m):  # each item in exactly one bin
        row([(k, 1.0) for k, (q, _) in enumerate(zvars) if q == p], 1.0, 1.0)
    for b in range(nb):  # capacity per bin and dimension
        for d in range(dims):
            coefs = [
                (k, float(s[items[p], d]))
                for k, (p, bb) in enumerate(zvars)
                if bb == b and s[items[p], d] > 0
            ]
            row([*coefs, (nz + b, -float(capacity))], -np.inf, 0.0)
    for b in range(nb - 1):  # bins used in order
        row([(nz + b, 1.0), (nz + b + 1, -1.0)], 0.0, np.inf)
    rows, cols, vals = zip(*entries, strict=True)
    r = len(lo)
    A = coo_matrix((vals, (rows, cols)), shape=(r, nz + nb)).tocsr()
    c = np.concatenate([np.zeros(nz), np.ones(nb)])
    ylo = np.concatenate([np.zeros(nz), (np.arange(nb) < lb).astype(float)])
    res = milp(
        c,
        constraints=LinearConstraint(A, lo, hi),
        integrality=np.ones(nz + nb),
        bounds=Bounds(ylo, np.ones(nz + nb)),
    )
    if res.status == 2:  # infeasible: the incumbent is optimal
        return sorted(sorted(b) for b in heur)
    if res.status != 0:
        raise RuntimeError(f"optimal_packing: HiGHS stopped without a proof ({res.message})")
    bins: list[list[int]] = [[] for _ in range(nb)]
    for k, (p, b) in enumerate(zvars):
        if res.x[k] > 0.5:
            bins[b].append(items[p])
    bins = sorted(sorted(b) for b in bins if b)
    for b in bins:  # HiGHS works to a tolerance; the packing must fit exactly
        if np.any(s[b].sum(axis=0) > capacity + 1e-9):
            raise RuntimeError(f"optimal_packing: HiGHS returned an overfull bin {b}")
    return bins


# -- Problem parts (module-level classes, so a Problem pickles) ---------------------------------


@dataclass(frozen=True)
class FirstFit:
    """The heuristic H(x) = number of bins :func:`first_fit` uses, over a flat input `x`."""

    items: int
    dims: int
    capacity: float

    def bins(self, x: Sequence[Any]) -> list[list[int]]:
        return first_fit(x, self.capacity, self.dims)

    def __call__(self, x: Sequence[Any]) -> int:
        return len(self.bins(x))


@dataclass(frozen=True)
class FirstFitDecreasing(FirstFit):
    """The heuristic H(x) = number of bins :func:`first_fit_decreasing` uses."""

    def bins(self, x: Sequence[Any]) -> list[list[int]]:
        return first_fit_decreasing(x, self.capacity, self.dims)


@dataclass(frozen=True)
class OptimalBins:
    """OPT(x) = the fewest bins (:func:`optimal_packing`); a step function of the sizes, so
    no gradient is given."""

    items: int
    dims: int
    capacity: float

    def bins(self, x: Sequence[float]) -> list[list[int]]:
        return optimal_packing(x, self.capacity, self.dims)

    def __call__(self, x: Sequence[float]) -> Optimum:
        return Optimum(float(len(self.bins(x))))


def _num(v: float) -> int | float:
    v = float(v)
    return int(v) if v.is_integer() else v


@dataclass(frozen=True)
class PackingReport:
    """``describe(x)``: bins used by the heuristic and the optimum, their ratio, and both
    packings (bins as item indices, with their loads)."""

    heuristic: FirstFit
    optimum: OptimalBins

    def __call__(self, x: Sequence[float]) -> dict[str, Any]:
        s = np.asarray(x, dtype=float).reshape(-1, self.heuristic.dims)
        xs = [float(v) for v in np.asarray(x, dtype=float)]
        hb, ob = self.heuristic.bins(xs), self.optimum.bins(xs)

        def show(bins: list[list[int]]) -> list[dict[str, Any]]:
            out = []
            for b in bins:
                load = s[b].sum(axis=0)
                out.append(
                    {
                        "items": list(b),
                        "load": _num(load[0]) if s.shape[1] == 1 else [_num(v) for v in load],
                    }
                )
            return out

        sizes = [_num(r[0]) if s.shape[1] == 1 else [_num(v) for v in r] for r in s]
        return {
            "heuristic": "ffd" if isinstance(self.heuristic, FirstFitDecreasing) else "ff",
            "capacity": _num(self.heuristic.capacity),
            "bins_heuristic": len(hb),
            "bins_optimal": len(ob),
            "gap_bins": len(hb) - len(ob),
            "ratio": len(hb) / len(ob) if ob else None,
            "sizes": sizes,
            "empty_items": [i for i in range(len(s)) if not np.any(s[i] > 0)],
            "heuristic_packing": show(hb),
            "optimal_packing": show(ob),
        }


def bin_packing_problem(
    heuristic: str = "ffd",
    items: int = 8,
    dims: int = 1,
    capacity: int = 10,
    dim_names: Sequence[str] | None = None,
) -> Problem:
    """The bin-packing :class:`~.problem.Problem`: FF or FFD against the fewest bins.

    Inputs are ``items × dims`` integer sizes in ``[0, capacity]``, item-major, named
    ``item3`` (one dimension) or ``item3.cpu`` (dimensions `dim_names`, by default cpu, mem,
    disk, net, then d4, d5, ...). The gap is H − OPT in bins (``sense="min"``, scale 1);
    ``describe(x)`` also gives the ratio H/OPT and both packings.

    >>> p = bin_packing_problem("ffd", items=6, capacity=10)
    >>> p.gap([6, 5, 3, 2, 2, 2])
    1.0
    >>> p.describe([6, 5, 3, 2, 2, 2])["ratio"]
    1.5
    """
    kinds = {"ff": FirstFit, "ffd": FirstFitDecreasing}
    if heuristic not in kinds:
        raise ProblemError(f"bin packing: unknown heuristic {heuristic!r}; use 'ff' or 'ffd'")
    if items < 1 or dims < 1:
        raise ProblemError(f"bin packing: need items >= 1 and dims >= 1 (got {items}, {dims})")
    if not capacity >= 1:
        raise ProblemError(f"bin packing: capacity must be >= 1, not {capacity!r}")
    if dim_names is None:
        dim_names = [DIM_NAMES[d] if d < len(DIM_NAMES) else f"d{d}" for d in range(dims)]
    if len(dim_names) != dims:
        raise ProblemError(f"bin packing: {len(dim_names)} dim_names for {dims} dimensions")
    if dims == 1:
        names = [f"item{i}" for i in range(items)]
    else:
        names = [f"item{i}.{dim_names[d]}" for i in range(items) for d in range(dims)]
    h = kinds[heuristic](items, dims, capacity)
    opt = OptimalBins(items, dims, capacity)
    return Problem(
        heuristic,
        heuristic=h,
        optimum=opt,
        lower=[0] * (items * dims),
        upper=[capacity] * (items * dims),
        integer=True,
        sense="min",
        names=names,
        scale=1.0,
        scale_label="bins",
        describe=PackingReport(h, opt),
        info={
            "domain": "vector bin packing",
            "heuristic": {"ff": "First Fit", "ffd": "First Fit Decreasing"}[heuristic],
            "items": items,
            "dims": dims,
            "capacity": capacity,
            "paper": "MetaOpt (NSDI '24) analyses FFD for VM placement",
        },
    )
