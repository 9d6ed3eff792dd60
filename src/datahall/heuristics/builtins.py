"""The built-in problems, by name: each a plain Python heuristic beside its optimum.

======== ============================================================ ==========================
name     heuristic                                                    optimum
======== ============================================================ ==========================
dp       demand pinning (MetaOpt, NSDI '24) on a WAN from topohub     multi-commodity max-flow
pop      POP, random partitions (Narayanan et al., SOSP '21)          multi-commodity max-flow
ff       first-fit vector bin packing                                 MILP
ffd      first-fit-decreasing vector bin packing                      MILP
knapsack greedy by value density                                      dynamic programming
matching greedy maximum-weight matching                               blossom (networkx)
======== ============================================================ ==========================

>>> sorted(BUILTINS)
['dp', 'ff', 'ffd', 'knapsack', 'matching', 'pop']
>>> build("knapsack", items=3).dim
6
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from typing import Any

import numpy as np

from .problem import Problem, ProblemError

__all__ = ["BUILTINS", "build", "parameters"]


def _dp(
    topology: str = "abilene",
    pairs: Any = "all",
    k: int = 4,
    capacity: float | str = 100,
    threshold: float | None = None,
    max_demand: float | None = None,
    seed: int = 0,
) -> Problem:
    from .te import builtin_te

    return builtin_te(
        "dp",
        topology,
        pairs,
        k,
        capacity=capacity,
        seed=seed,
        threshold=threshold,
        max_demand=max_demand,
    )


def _pop(
    topology: str = "abilene",
    pairs: Any = "all",
    k: int = 4,
    capacity: float | str = 100,
    parts: int = 2,
    draws: int = 5,
    max_demand: float | None = None,
    seed: int = 0,
) -> Problem:
    from .te import builtin_te

    return builtin_te(
        "pop",
        topology,
        pairs,
        k,
        capacity=capacity,
        seed=seed,
        parts=parts,
        draws=draws,
        max_demand=max_demand,
    )


def _ff(items: int = 8, dims: int = 1, capacity: int = 10) -> Problem:
    from .packing import bin_packing_problem

    return bin_packing_problem("ff", items=items, dims=dims, capacity=capacity)


def _ffd(items: int = 8, dims: int = 1, capacity: int = 10) -> Problem:
    from .packing import bin_packing_problem

    return bin_packing_problem("ffd", items=items, dims=dims, capacity=capacity)


def _knapsack(items: int = 8, capacity: int = 20, max_value: int = 100) -> Problem:
    from .knapsack import knapsack_problem

    return knapsack_problem(items=items, capacity=capacity, max_value=max_value)


def _matching(max_weight: int = 10, seed: int = 0) -> Problem:
    from .matching import matching_problem

    return matching_problem(max_weight=max_weight, seed=seed)


BUILTINS: dict[str, Callable[..., Problem]] = {
    "dp": _dp,
    "pop": _pop,
    "ff": _ff,
    "ffd": _ffd,
    "knapsack": _knapsack,
    "matching": _matching,
}


def parameters(name: str) -> dict[str, Any]:
    """The keyword parameters of built-in `name` with their defaults."""
    sig = inspect.signature(_get(name))
    return {p.name: p.default for p in sig.parameters.values()}


def _get(name: str) -> Callable[..., Problem]:
    try:
        return BUILTINS[name]
    except KeyError:
        raise ProblemError(
            f"unknown built-in problem {name!r}; choose one of {', '.join(sorted(BUILTINS))}"
        ) from None


#: The values each annotated parameter type accepts (``-p`` values are Python literals).
_ACCEPTS: dict[Any, tuple[type, ...]] = {
    int: (int, np.integer),
    float: (int, float, np.integer, np.floating),
    str: (str,),
    type(None): (type(None),),
}


def build(name: str, **params: Any) -> Problem:
    """The built-in problem `name` with its parameters; unknown names or parameters, or values
    of the wrong type, raise :class:`ProblemError` naming the choices.

    >>> build("ff", items="8")
    Traceback (most recent call last):
    ...
    datahall.heuristics.problem.ProblemError: built-in 'ff': parameter items must be int, not '8'
    """
    known = parameters(name)
    hints = typing.get_type_hints(_get(name))
    for key, value in params.items():
        if key not in known:
            raise ProblemError(
                f"built-in {name!r} has no parameter {key!r}; it takes {', '.join(known)}"
            )
        kinds = typing.get_args(hints[key]) or (hints[key],)
        if Any in kinds:
            continue
        if isinstance(value, bool) or not any(isinstance(value, _ACCEPTS[k]) for k in kinds):
            want = " or ".join("None" if k is type(None) else k.__name__ for k in kinds)
            raise ProblemError(f"built-in {name!r}: parameter {key} must be {want}, not {value!r}")
    return _get(name)(**params)
