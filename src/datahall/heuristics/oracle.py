"""Exact worst cases of heuristics: MetaOpt's bilevel problem as one MILP, and grid enumeration.

MetaOpt (Namyar et al., NSDI '24) finds the input on which a heuristic ``H`` is furthest from the
optimum ``OPT`` by solving the bilevel problem ``max_d OPT(d) − H(d)``: the leader picks the demands
``d``, two followers compute ``OPT(d)`` and ``H(d)``. The single-level rewrite used here is
MetaOpt's *quantised primal–dual* encoding:

- **Quantised inputs.** Each demand takes one of a few levels, ``d_i = Σ_q L_q x_iq`` with
  ``Σ_q x_iq <= 1`` and ``x`` binary (level 0 is implied by ``x_i· = 0``).
- **Selective rewriting.** OPT (multi-commodity path max-flow) is aligned with the leader, which
  wants it large, so its constraints are added as they are: ``f_ip >= 0``, ``Σ_p f_ip <= d_i``,
  link loads ``<= c_e``, objective ``+Σ f``.
- **Primal–dual rewrite of H's LP.** The heuristic's max-flow LP is opposed to the leader, so it is
  forced to its optimum by primal feasibility, dual feasibility (``u_i + Σ_{e∈p} v_e >= 1``,
  ``u, v ∈ [0, 1]``) and strong duality (primal objective = dual objective). The dual objective
  ``Σ_i u_i d_i + Σ_e v_e c_e`` multiplies inputs by duals; with quantised inputs every product is
  ``x_iq · u_i`` (binary × bounded) and is linearised exactly: ``w <= u, w <= x, w >= u − (1 − x),
  w >= 0``. The bound ``[0, 1]`` loses nothing: clipping an optimal dual of a unit-weight max-flow
  LP at 1 keeps it feasible and does not raise its objective.

The MILP is solved with HiGHS (highspy). Its answer is then **re-evaluated**: the returned demand
vector is fed to plain LP solves of OPT and H (:func:`scipy.optimize.linprog`, written here
independently of the MILP), so :attr:`OracleResult.gap` is a true gap of that input; the MILP's
own objective is kept beside it and a disagreement is flagged.

For small problems that are not traffic engineering (bin packing, knapsack, matching),
:func:`exhaustive_oracle` enumerates a grid of levels per input instead.

>>> import numpy as np
>>> from datahall.heuristics.te import TEInstance
>>> inst = TEInstance("hand", (0, 1, 2, 3), ((0, 1), (1, 3), (1, 2), (2, 3)),
...                   np.full(4, 100.0), ((0, 3), (1, 3)), (((0, 1),), ((1,), (2, 3))))
>>> r = demand_pinning_oracle(inst, threshold=5, levels=[5, 100, 200])
>>> r.gap, float(r.demands[1]), r.status, r.normalized
(5.0, 5.0, 'optimal', 0.0125)
"""

from __future__ import annotations

import itertools
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .problem import Problem, ProblemError

__all__ = ["OracleResult", "demand_pinning_oracle", "pop_oracle", "exhaustive_oracle"]

#: relative tolerance (of max(1, OPT)) between the MILP objective and the re-evaluated gap
MISMATCH_TOL = 1e-6


@dataclass
class OracleResult:
    """The worst input an oracle found and what it is worth.

    ``gap`` is ``OPT − H`` of ``demands`` as re-evaluated by plain LP solves (for
    :func:`exhaustive_oracle`, the problem's own signed gap); ``optimum`` and ``heuristic`` are
    those two values. ``status`` is ``"optimal"`` (proved, within ``mip_gap``), ``"time_limit"``
    (the best incumbent when time ran out; ``bound`` is then an upper bound on the worst gap) or
    HiGHS's own status text. ``objective`` is the MILP's value for the incumbent; ``mismatch`` is
    true when it differs from ``gap`` by more than ``1e-6 · max(1, optimum)``. ``levels`` are the
    non-zero demand levels (0 is always allowed). ``normalized`` divides by ``scale`` (total
    network capacity for traffic engineering, as MetaOpt reports gaps).
    """

    gap: float
    demands: np.ndarray
    optimum: float
    heuristic: float
    status: str
    mip_gap: float
    seconds: float
    levels: tuple
    objective: float = math.nan
    bound: float = math.nan
    mismatch: bool = False
    scale: float = 1.0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def normalized(self) -> float:
        """``gap / scale``."""
        return self.gap / self.scale


# ------------------------------------------------------------------------------------------------
# A small row-wise MILP builder on highspy


class _Milp:
    """Columns and rows collected in lists, handed to HiGHS in one ``passModel``."""

    def __init__(self) -> None:
        self.lower: list[float] = []
        self.upper: list[float] = []
        self.cost: list[float] = []
        self.integer: list[bool] = []
        self.start: list[int] = [0]
        self.index: list[int] = []
        self.value: list[float] = []
        self.row_lower: list[float] = []
        self.row_upper: list[float] = []

    def var(self, lower: float, upper: float, cost: float = 0.0, integer: bool = False) -> int:
        self.lower.append(lower)
        self.upper.append(upper)
        self.cost.append(cost)
        self.integer.append(integer)
        return len(self.cost) - 1

    def row(self, terms: dict[int, float], lower: float = -math.inf, upper: float = math.inf):
        for j, a in terms.items():
            if a != 0:
                self.index.append(j)
                self.value.append(float(a))
        self.start.append(len(self.index))
        self.row_lower.append(lower)
        self.row_upper.append(upper)

    def product(self, x: int, y: int) -> int:
        """A column equal to binary ``x`` times ``y ∈ [0, 1]`` (exact McCormick)."""
        w = self.var(0.0, 1.0)
        self.row({w: 1.0, y: -1.0}, upper=0.0)  # w <= y
        self.row({w: 1.0, x: -1.0}, upper=0.0)  # w <= x
        self.row({w: 1.0, y: -1.0, x: -1.0}, lower=-1.0)  # w >= y - (1 - x)
        return w

    def solve(self, time_limit: float, mip_gap: float) -> tuple[str, np.ndarray | None, dict]:
        import highspy

        lp = highspy.HighsLp()
        n, m = len(self.cost), len(self.row_lower)
        lp.num_col_, lp.num_row_ = n, m
        lp.col_cost_ = np.asarray(self.cost, dtype=float)
        lp.col_lower_ = np.asarray(self.lower, dtype=float)
        lp.col_upper_ = np.asarray(self.upper, dtype=float)
        lp.row_lower_ = np.asarray(self.row_lower, dtype=float)
        lp.row_upper_ = np.asarray(self.row_upper, dtype=float)
        a = lp.a_matrix_
        a.format_ = highspy.MatrixFormat.kRowwise
        a.num_col_, a.num_row_ = n, m
        a.start_ = np.asarray(self.start, dtype=np.int32)
        a.index_ = np.asarray(self.index, dtype=np.int32)
        a.value_ = np.asarray(self.value, dtype=float)
        lp.sense_ = highspy.ObjSense.kMaximize
        kind = highspy.HighsVarType
        lp.integrality_ = [kind.kInteger if b else kind.kContinuous for b in self.integer]
        h = highspy.Highs()
        h.silent()
        h.setOptionValue("time_limit", float(time_limit))
        h.setOptionValue("mip_rel_gap", float(mip_gap))
        h.passModel(lp)
        h.run()
        status = h.getModelStatus()
        info = h.getInfo()
        has_solution = info.primal_solution_status == 2  # kSolutionStatusFeasible
        stats = {
            "objective": info.objective_function_value if has_solution else math.nan,
            "bound": info.mip_dual_bound,
            "mip_gap": info.mip_gap if has_solution else math.inf,
            "nodes": int(info.mip_node_count),
            "columns": n,
            "rows": m,
            "binaries": int(sum(self.integer)),
        }
        text = {
            highspy.HighsModelStatus.kOptimal: "optimal",
            highspy.HighsModelStatus.kTimeLimit: "time_limit",
            highspy.HighsModelStatus.kInfeasible: "infeasible",
        }.get(status, h.modelStatusToString(status).lower().replace(" ", "_"))
        x = np.asarray(h.getSolution().col_value, dtype=float) if has_solution else None
        return text, x, stats


# ------------------------------------------------------------------------------------------------
# Independent LP evaluation (re-checks the MILP's answer)


def _path_max_flow(
    capacity: np.ndarray, paths: Sequence[Sequence[Sequence[int]]], demands
) -> float:
    """Max Σ flow over the given paths, each commodity at most its demand, loads <= capacity."""
    from scipy.optimize import linprog
    from scipy.sparse import csr_matrix

    demands = np.asarray(demands, dtype=float)
    cols = [(i, p) for i, ps in enumerate(paths) if demands[i] > 0 for p in ps]
    if not cols:
        return 0.0
    rows, cidx = [], []
    n = len(paths)
    for j, (i, p) in enumerate(cols):
        rows.append(i)
        cidx.append(j)
        for e in p:
            rows.append(n + e)
            cidx.append(j)
    a = csr_matrix((np.ones(len(rows)), (rows, cidx)), shape=(n + len(capacity), len(cols)))
    b = np.concatenate([demands, np.asarray(capacity, dtype=float)])
    res = linprog(-np.ones(len(cols)), A_ub=a, b_ub=b, bounds=(0, None), method="highs")
    if res.status != 0:
        raise ProblemError(f"re-evaluation LP failed: {res.message}")
    return float(-res.fun)


def _evaluate_dp(inst, demands: np.ndarray, threshold: float) -> tuple[float, float, dict]:
    """(OPT, DP, {"pinned_load_fits": ...}) for one demand vector: demands in (0, threshold] go
    in full on their shortest path, the rest share the residual capacity by max-flow."""
    cap = np.asarray(inst.capacity, dtype=float)
    opt = _path_max_flow(cap, inst.paths, demands)
    pinned = (demands > 0) & (demands <= threshold)
    load = np.zeros_like(cap)
    for i in np.flatnonzero(pinned):
        for e in inst.paths[i][0]:
            load[e] += demands[i]
    residual = cap - load
    fits = bool(np.all(residual >= -1e-9 * max(1.0, float(cap.max(initial=1.0)))))
    rest = np.where(pinned, 0.0, demands)
    h = float(demands[pinned].sum()) + _path_max_flow(np.maximum(residual, 0.0), inst.paths, rest)
    return opt, h, {"pinned_load_fits": fits}


def _evaluate_pop(
    inst, demands: np.ndarray, draws: list, parts: list[int]
) -> tuple[float, float, dict]:
    """(OPT, mean over draws of Σ over groups of the group's max-flow at capacity / parts, {})."""
    cap = np.asarray(inst.capacity, dtype=float)
    opt = _path_max_flow(cap, inst.paths, demands)
    total = 0.0
    for groups, k in zip(draws, parts, strict=True):
        for g in groups:
            if len(g):
                total += _path_max_flow(cap / k, [inst.paths[i] for i in g], demands[g])
    return opt, total / len(draws), {}


# ------------------------------------------------------------------------------------------------
# Shared pieces of the TE encodings


def _check_instance(inst) -> tuple[np.ndarray, list]:
    cap = np.asarray(inst.capacity, dtype=float)
    m = len(inst.links)
    if cap.shape != (m,) or np.any(~np.isfinite(cap)) or np.any(cap < 0):
        raise ProblemError(
            f"{inst.name}: capacity must be {m} finite non-negative numbers, one per link"
        )
    if len(inst.paths) != len(inst.pairs):
        raise ProblemError(f"{inst.name}: {len(inst.paths)} path lists for {len(inst.pairs)} pairs")
    for i, ps in enumerate(inst.paths):
        if not ps:
            raise ProblemError(
                f"{inst.name}: pair {inst.pairs[i]} has no path; drop the pair or add a path"
            )
        for p in ps:
            if not p or any(not 0 <= e < m for e in p):
                raise ProblemError(
                    f"{inst.name}: pair {inst.pairs[i]} has a path {p} that is empty or names a "
                    f"link outside 0..{m - 1}"
                )
    return cap, [[tuple(int(e) for e in p) for p in ps] for ps in inst.paths]


def _clean_levels(levels, where: str) -> tuple[float, ...]:
    lv = np.asarray(list(levels), dtype=float)
    if lv.ndim != 1 or np.any(~np.isfinite(lv)) or np.any(lv < 0):
        raise ProblemError(f"{where}: levels must be finite non-negative numbers, got {levels!r}")
    out = tuple(float(v) for v in sorted(set(lv.tolist())) if v > 0)
    if not out:
        raise ProblemError(f"{where}: give at least one positive level (0 is always allowed)")
    return out


def _inputs(milp: _Milp, n: int, levels: tuple[float, ...], max_nonzero: int | None) -> list:
    """x[i][q] binaries with Σ_q x_iq <= 1 and, optionally, Σ x <= max_nonzero."""
    x = [[milp.var(0.0, 1.0, integer=True) for _ in levels] for _ in range(n)]
    for row in x:
        milp.row(dict.fromkeys(row, 1.0), upper=1.0)
    if max_nonzero is not None:
        if max_nonzero < 0:
            raise ProblemError(f"max_nonzero must be >= 0, not {max_nonzero}")
        milp.row({j: 1.0 for row in x for j in row}, upper=float(max_nonzero))
    return x


def _opt_follower(milp: _Milp, x: list, levels, cap: np.ndarray, paths: list) -> None:
    """OPT's path max-flow, aligned with the leader: constraints as they are, objective +Σ f."""
    on_link: list[dict[int, float]] = [{} for _ in cap]
    for i, ps in enumerate(paths):
        f = [milp.var(0.0, math.inf, cost=1.0) for _ in ps]
        terms = dict.fromkeys(f, 1.0)
        terms.update({x[i][q]: -lv for q, lv in enumerate(levels)})
        milp.row(terms, upper=0.0)  # Σ_p f_ip <= d_i
        for fp, p in zip(f, ps, strict=True):
            for e in p:
                on_link[e][fp] = 1.0
    for e, terms in enumerate(on_link):
        if terms:
            milp.row(terms, upper=float(cap[e]))


def _dual_feasibility(milp: _Milp, paths: list, pairs, links) -> tuple[dict, dict]:
    """Dual feasibility of a follower's path max-flow LP (unit weights) over `pairs` and the
    `links` their paths use: duals ``u_i`` of the demand rows and ``v_e`` of the link rows, in
    [0, 1], with ``u_i + Σ_{e∈p} v_e >= 1`` for every path ``p`` of every pair. Returns
    ``(u, v)`` as columns by pair and by link."""
    u = {i: milp.var(0.0, 1.0) for i in pairs}
    v = {e: milp.var(0.0, 1.0) for e in links}
    for i in pairs:
        for p in paths[i]:
            terms = {u[i]: 1.0}
            for e in p:
                terms[v[e]] = terms.get(v[e], 0.0) + 1.0
            milp.row(terms, lower=1.0)
    return u, v


def _decode(sol: np.ndarray | None, x: list, levels) -> np.ndarray:
    d = np.zeros(len(x))
    if sol is None:
        return d
    for i, row in enumerate(x):
        for q, j in enumerate(row):
            if sol[j] > 0.5:
                d[i] = levels[q]
    return d


def _solve(
    milp: _Milp,
    x: list,
    levels: tuple[float, ...],
    evaluate: Callable[[np.ndarray], tuple[float, float, dict]],
    *,
    inst,
    t0: float,
    time_limit: float,
    mip_gap: float,
    info: dict[str, Any],
) -> OracleResult:
    """Solve `milp`, decode the demands its binaries `x` choose among `levels`, and re-evaluate
    them with `evaluate` (plain LP solves written apart from the MILP: ``(OPT, H, more info)``),
    so the gap returned is a true gap of its input. A MILP objective that disagrees with it is
    flagged, and warned about when HiGHS claims optimality or more than the input gives."""
    t1 = time.perf_counter()
    status, sol, stats = milp.solve(time_limit, mip_gap)
    t2 = time.perf_counter()
    demands = _decode(sol, x, levels)
    opt, h, checked = evaluate(demands)
    gap = opt - h
    objective = stats["objective"]
    mismatch = sol is not None and abs(gap - objective) > MISMATCH_TOL * max(1.0, abs(opt))
    if mismatch and (status == "optimal" or gap < objective):
        warnings.warn(
            f"oracle: the MILP objective {objective:.9g} differs from the re-evaluated gap "
            f"{gap:.9g} of its input (status {status}); trust the re-evaluated gap, and tighten "
            "HiGHS's tolerances or rescale the instance if the difference matters",
            RuntimeWarning,
            stacklevel=3,
        )
    info = {
        **info,
        "build_seconds": t1 - t0,
        "solve_seconds": t2 - t1,
        **checked,
        **{k: stats[k] for k in ("nodes", "columns", "rows", "binaries")},
    }
    return OracleResult(
        gap=gap,
        demands=demands,
        optimum=opt,
        heuristic=h,
        status=status,
        mip_gap=stats["mip_gap"],
        seconds=time.perf_counter() - t0,
        levels=levels,
        objective=objective,
        bound=stats["bound"],
        mismatch=bool(mismatch),
        scale=inst.total_capacity,
        info=info,
    )


# ------------------------------------------------------------------------------------------------
# Demand pinning


def demand_pinning_oracle(
    inst,
    threshold: float,
    levels: Sequence[float] | None = None,
    max_demand: float | None = None,
    *,
    max_nonzero: int | None = None,
    time_limit: float = 60.0,
    mip_gap: float = 1e-6,
) -> OracleResult:
    """The worst-case demands for demand pinning (DP), by MetaOpt's quantised primal–dual MILP.

    DP (MetaOpt, Namyar et al., NSDI '24) routes every demand with ``0 < d_i <= threshold`` in full
    on its shortest path ``inst.paths[i][0]``, then routes the remaining demands by a max-flow LP
    over the residual capacities. This function solves ``max_d OPT(d) − DP(d)`` over quantised
    demands ``d_i ∈ {0} ∪ levels`` (at most `max_nonzero` non-zero, if given).

    DP's LP is encoded by primal feasibility (unpinned flows ``g``, ``Σ_p g_ip <=`` the unpinned
    part of ``d_i``, link loads ``<= c_e −`` pinned load), dual feasibility and strong duality
    ``Σ g = Σ_i u_i·unpinned_i + Σ_e v_e·(c_e − pinned_e)``, whose products of binaries and duals
    are linearised exactly (see the module doc).

    **Input subspace.** The encoding requires the pinned load to fit every link. A Python DP that
    pins ``min(d, residual)`` and sends the leftover to the LP agrees with this definition exactly
    on that subspace, and the oracle's worst case is the worst case over it; inputs whose pinned
    demands alone overload a link are not considered.

    Beside MetaOpt's encoding, the MILP carries one valid inequality of ours, ``OPT − DP <=`` the
    total pinned link load ``Σ_i pinned_i·|paths[i][0]|``, which tightens HiGHS's bound.

    Parameters
    ----------
    inst : TEInstance
        Links, capacities, pairs and their paths (shortest first).
    threshold : float
        Demands in ``(0, threshold]`` are pinned.
    levels : sequence of float, optional
        Non-zero demand levels (0 is always allowed). Default ``(threshold, max_demand)``.
    max_demand : float, optional
        The top default level; default ``2 × max(capacity)`` (MetaEase's configuration).
    max_nonzero : int, optional
        At most this many non-zero demands (MetaOpt's demand-density constraint).
    time_limit, mip_gap : float
        HiGHS's time limit (seconds) and relative MIP gap tolerance.

    Returns
    -------
    OracleResult
        ``gap``, ``optimum`` and ``heuristic`` re-evaluated by LP on the returned ``demands``;
        ``scale`` is the total capacity.

    Examples
    --------
    Pair 0 (``s → b``) has one path, over ``a → b``; pair 1 (``a → b``) has ``a → b`` and the
    detour ``a → c → b``. Pinning a demand of 1 of pair 1 onto ``a → b`` takes 1 from pair 0:

    >>> import numpy as np
    >>> from datahall.heuristics.te import TEInstance
    >>> inst = TEInstance("detour", ("s", "a", "b", "c"),
    ...                   (("s", "a"), ("a", "b"), ("a", "c"), ("c", "b")), np.full(4, 10.0),
    ...                   (("s", "b"), ("a", "b")), (((0, 1),), ((1,), (2, 3))))
    >>> r = demand_pinning_oracle(inst, threshold=1, levels=[1, 10])
    >>> r.gap, r.demands.tolist(), r.optimum, r.heuristic
    (1.0, [10.0, 1.0], 11.0, 10.0)
    """
    t0 = time.perf_counter()
    cap, paths = _check_instance(inst)
    threshold = float(threshold)
    if not math.isfinite(threshold) or threshold < 0:
        raise ProblemError(f"{inst.name}: threshold must be a finite number >= 0, not {threshold}")
    if levels is None:
        top = 2.0 * float(cap.max(initial=0.0)) if max_demand is None else float(max_demand)
        levels = (threshold, top)
    lv = _clean_levels(levels, f"{inst.name} demand pinning")
    pin = [0 < v <= threshold for v in lv]
    n = len(paths)

    milp = _Milp()
    x = _inputs(milp, n, lv, max_nonzero)
    _opt_follower(milp, x, lv, cap, paths)

    # DP's pinned demands count in H (objective −L_q x_iq) and load their shortest path.
    pinned_on: list[dict[int, float]] = [{} for _ in cap]  # link -> {x column: level}
    for i in range(n):
        for q, v in enumerate(lv):
            if pin[q]:
                milp.cost[x[i][q]] -= v
                for e in paths[i][0]:
                    pinned_on[e][x[i][q]] = v

    # Primal feasibility of DP's LP over the unpinned demands.
    g_on: list[dict[int, float]] = [{} for _ in cap]
    g = []
    for i, ps in enumerate(paths):
        gi = [milp.var(0.0, math.inf, cost=-1.0) for _ in ps]
        g.append(gi)
        terms = dict.fromkeys(gi, 1.0)
        terms.update({x[i][q]: -v for q, v in enumerate(lv) if not pin[q]})
        milp.row(terms, upper=0.0)  # Σ_p g_ip <= unpinned part of d_i
        for gp, p in zip(gi, ps, strict=True):
            for e in p:
                g_on[e][gp] = 1.0
    used = [e for e in range(len(cap)) if g_on[e] or pinned_on[e]]
    for e in used:
        # g load + pinned load <= c_e; with g >= 0 this also keeps the input in the subspace
        # where the pinned load fits.
        milp.row({**g_on[e], **pinned_on[e]}, upper=float(cap[e]))

    u, v = _dual_feasibility(milp, paths, range(n), [e for e in range(len(cap)) if g_on[e]])

    # Strong duality: Σ g − Σ_i u_i·unpinned_i − Σ_e v_e·(c_e − pinned_e) = 0, with the products
    # x_iq·u_i and x_iq·v_e linearised exactly.
    terms: dict[int, float] = {gp: 1.0 for gi in g for gp in gi}
    for i in range(n):
        for q, lvq in enumerate(lv):
            if not pin[q]:
                terms[milp.product(x[i][q], u[i])] = -lvq
    for e, ve in v.items():
        terms[ve] = -float(cap[e])
        for xj, lvq in pinned_on[e].items():
            terms[milp.product(xj, ve)] = lvq
    milp.row(terms, lower=0.0, upper=0.0)

    # A valid inequality (ours, not MetaOpt's) that tightens the relaxation: OPT(d) <= P +
    # OPT_unpinned(c) (drop the pinned flows), and lowering link e's capacity by load_e lowers a
    # max-flow by at most load_e, so OPT − DP <= Σ_e pinned load_e = Σ_i pinned_i·|shortest_i|.
    cut = {j: c for j, c in enumerate(milp.cost) if c != 0}
    for i in range(n):
        for q, lvq in enumerate(lv):
            if pin[q]:
                cut[x[i][q]] = cut.get(x[i][q], 0.0) - lvq * len(paths[i][0])
    milp.row(cut, upper=0.0)

    return _solve(
        milp,
        x,
        lv,
        lambda d: _evaluate_dp(inst, d, threshold),
        inst=inst,
        t0=t0,
        time_limit=time_limit,
        mip_gap=mip_gap,
        info={"threshold": threshold, "max_nonzero": max_nonzero},
    )


# ------------------------------------------------------------------------------------------------
# POP


def _check_partitions(name: str, partitions, n: int, parts: int | None) -> tuple[list, list[int]]:
    draws = []
    if len(partitions) == 0:
        raise ProblemError(f"{name}: POP needs at least one partition (draw)")
    for r, groups in enumerate(partitions):
        gs = [np.asarray(g, dtype=int).reshape(-1) for g in groups]
        seen = np.concatenate(gs) if gs else np.zeros(0, dtype=int)
        if seen.size != n or not np.array_equal(np.sort(seen), np.arange(n)):
            raise ProblemError(
                f"{name}: POP draw {r} must put each of the {n} pairs in exactly one group; give "
                "a list (one per draw) of lists (one per group) of pair indices"
            )
        draws.append(gs)
    ks = [len(gs) if parts is None else int(parts) for gs in draws]
    if any(k < 1 for k in ks):
        raise ProblemError(f"{name}: parts must be >= 1, not {parts}")
    return draws, ks


def pop_oracle(
    inst,
    partitions: Sequence[Sequence[Sequence[int]]],
    parts: int | None = None,
    levels: Sequence[float] | None = None,
    max_demand: float | None = None,
    *,
    max_nonzero: int | None = None,
    time_limit: float = 60.0,
    mip_gap: float = 1e-6,
) -> OracleResult:
    """The worst-case demands for POP averaged over fixed random partitions, by MetaOpt's quantised
    primal–dual MILP.

    POP (Narayanan et al., SOSP '21) splits the demands into ``parts`` groups and solves each
    group's max-flow LP on ``capacity / parts``; MetaOpt (Namyar et al., NSDI '24) analyses its
    expectation over random partitions as the mean over a fixed set of draws. Here
    ``partitions[r][k]`` lists the pair indices of group ``k`` in draw ``r``; ``H(d)`` is the mean
    over draws of the sum of the groups' max-flows, and every group LP gets its own primal–dual
    encoding (see the module doc). The result is the worst ``OPT(d) − H(d)`` over quantised
    demands ``d_i ∈ {0} ∪ levels``.

    Parameters
    ----------
    inst : TEInstance
    partitions : list of draws, each a list of groups of pair indices
        Each draw must put every pair in exactly one group (groups may be empty).
    parts : int, optional
        Capacity divisor; default: the number of groups of each draw.
    levels : sequence of float, optional
        Non-zero demand levels. Default ``(max(capacity) / parts, max_demand)``.
    max_demand : float, optional
        Default ``2 × max(capacity)``.
    max_nonzero, time_limit, mip_gap
        As for :func:`demand_pinning_oracle`.

    Examples
    --------
    Two pairs share a link of capacity 100. Split into two groups, each sees 50, so one demand of
    100 alone loses 50:

    >>> import numpy as np
    >>> from datahall.heuristics.te import TEInstance
    >>> inst = TEInstance("y", (0, 1, 2, 3), ((0, 2), (1, 2), (2, 3)), np.full(3, 100.0),
    ...                   ((0, 3), (1, 3)), (((0, 2),), ((1, 2),)))
    >>> r = pop_oracle(inst, [[[0], [1]]], levels=[50, 100])
    >>> r.gap, r.optimum, r.heuristic
    (50.0, 100.0, 50.0)
    """
    t0 = time.perf_counter()
    cap, paths = _check_instance(inst)
    n = len(paths)
    draws, ks = _check_partitions(inst.name, partitions, n, parts)
    if levels is None:
        top = 2.0 * float(cap.max(initial=0.0)) if max_demand is None else float(max_demand)
        levels = (float(cap.max(initial=0.0)) / max(ks), top)
    lv = _clean_levels(levels, f"{inst.name} POP")

    milp = _Milp()
    x = _inputs(milp, n, lv, max_nonzero)
    _opt_follower(milp, x, lv, cap, paths)
    weight = 1.0 / len(draws)
    for groups, k in zip(draws, ks, strict=True):
        for members in groups:
            if not len(members):
                continue
            # Primal feasibility of the group's LP, capacities c_e / parts.
            g_on: dict[int, dict[int, float]] = {}
            g_all: list[int] = []
            for i in members:
                gi = [milp.var(0.0, math.inf, cost=-weight) for _ in paths[i]]
                g_all += gi
                terms = dict.fromkeys(gi, 1.0)
                terms.update({x[i][q]: -v for q, v in enumerate(lv)})
                milp.row(terms, upper=0.0)
                for gp, p in zip(gi, paths[i], strict=True):
                    for e in p:
                        g_on.setdefault(e, {})[gp] = 1.0
            for e, terms in g_on.items():
                milp.row(terms, upper=float(cap[e]) / k)
            # Dual feasibility and strong duality of the group's LP.
            u, v = _dual_feasibility(milp, paths, members, g_on)
            terms = dict.fromkeys(g_all, 1.0)
            for i in members:
                for q, lvq in enumerate(lv):
                    terms[milp.product(x[i][q], u[i])] = -lvq
            for e, ve in v.items():
                terms[ve] = -float(cap[e]) / k
            milp.row(terms, lower=0.0, upper=0.0)

    return _solve(
        milp,
        x,
        lv,
        lambda d: _evaluate_pop(inst, d, draws, ks),
        inst=inst,
        t0=t0,
        time_limit=time_limit,
        mip_gap=mip_gap,
        info={"draws": len(draws), "parts": ks, "max_nonzero": max_nonzero},
    )


# ------------------------------------------------------------------------------------------------
# Enumeration for small problems


def exhaustive_oracle(
    problem: Problem,
    levels: Sequence[float] | Sequence[Sequence[float]],
    *,
    max_points: int = 100_000,
    time_limit: float | None = None,
) -> OracleResult:
    """The exact worst case of a small problem over a grid of levels, by enumeration.

    For heuristics with no MILP encoding here (bin packing, knapsack, matching), the worst gap over
    a grid is found by evaluating every grid point that satisfies ``problem.feasible``: the same
    ground truth MetaOpt's quantised MILP gives on a quantised input space (Namyar et al.,
    NSDI '24), for problems of up to about 8 inputs.

    Parameters
    ----------
    problem : Problem
    levels : sequence of float, or one sequence per input
        The values each input may take (one grid shared by all inputs, or ``problem.dim`` grids).
        Points outside the problem's box or constraints are skipped.
    max_points : int
        Refuse grids larger than this (:class:`ProblemError`).
    time_limit : float, optional
        Stop early with ``status="time_limit"`` and the best point so far.

    Returns
    -------
    OracleResult
        ``gap`` is the problem's signed gap (``H − OPT`` for ``"min"`` problems); ``demands`` is
        the worst input; the first worst point in grid order wins ties.

    Examples
    --------
    >>> from datahall.heuristics.problem import problem
    >>> @problem(optimum=lambda x: max(x), lower=0, upper=9, dim=3)
    ... def first(x):
    ...     return x[0]
    >>> r = exhaustive_oracle(first, [0, 4, 9])
    >>> r.gap, r.demands.tolist(), r.info["points"]
    (9.0, [0.0, 0.0, 9.0], 27)
    """
    t0 = time.perf_counter()
    dim = problem.dim
    seq = list(levels)
    if seq and all(isinstance(g, (Sequence, np.ndarray)) for g in seq):
        if len(seq) != dim:
            raise ProblemError(
                f"{problem.name}: {len(seq)} level grids for {dim} inputs; give one grid for all "
                "inputs or one per input"
            )
        grids = [tuple(float(v) for v in g) for g in seq]
    else:
        grids = [tuple(float(v) for v in seq)] * dim
    if any(len(g) == 0 for g in grids):
        raise ProblemError(f"{problem.name}: every input needs at least one level")
    size = math.prod(len(g) for g in grids)
    if size > max_points:
        raise ProblemError(
            f"{problem.name}: the grid has {size} points ({' x '.join(str(len(g)) for g in grids)}"
            f"), more than max_points={max_points}; use fewer levels or inputs, or raise max_points"
        )
    best = None
    evaluated = skipped = 0
    status = "optimal"
    for combo in itertools.product(*grids):
        if time_limit is not None and time.perf_counter() - t0 > time_limit:
            status = "time_limit"
            break
        x = np.asarray(combo, dtype=float)
        if not problem.feasible(x):
            skipped += 1
            continue
        gap, h, opt = problem.evaluate(x)
        evaluated += 1
        if best is None or gap > best[0]:
            best = (gap, x, h, opt.value)
    if best is None:
        raise ProblemError(
            f"{problem.name}: no grid point is feasible ({skipped} skipped); choose levels inside "
            "the bounds and constraints"
        )
    gap, x, h, opt = best
    return OracleResult(
        gap=float(gap),
        demands=x,
        optimum=float(opt),
        heuristic=float(h),
        status=status,
        mip_gap=0.0 if status == "optimal" else math.inf,
        seconds=time.perf_counter() - t0,
        levels=tuple(grids) if len({*grids}) > 1 else grids[0],
        objective=float(gap),
        bound=float(gap) if status == "optimal" else math.inf,
        scale=problem.scale,
        info={"points": size, "evaluated": evaluated, "skipped": skipped},
    )
