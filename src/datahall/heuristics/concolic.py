"""Code paths of a Python heuristic, from its source, by concolic execution.

MetaEase (Karimi et al., NSDI '26) seeds its search with one input per code path of the heuristic,
found by symbolic execution (KLEE over a hand-written C mirror of the heuristic, with hand-written
path ids). Here the Python heuristic itself is run on :class:`Sym` numbers: each carries its
concrete value and a z3 expression over the inputs, and each comparison records the branch it
decides. The sequence of branch outcomes names the code path (a deterministic program takes the
same branches on the same outcomes, so the sequence *is* the path), and negating a branch and
solving the prefix with z3 gives an input for a new path: generational search (SAGE, Godefroid et
al., NDSS '08). This is our substitute for MetaEase's KLEE stage, not a port of it.

What is tracked: ``+ - * / // % **`` (integer powers), unary minus, ``abs``, comparisons, ``bool``,
``min``/``max``/``sorted`` (through comparisons). ``float()``, ``int()``, ``round()`` and friends
return the concrete value; branches taken on that value afterwards are invisible (they are
counted in :attr:`Trace.concretized`).

>>> t = trace(lambda x: x[0] if x[0] <= 5 else 2 * x[1], [7, 3])
>>> t.value, t.outcomes, t.branches
(6, (False,), 1)
>>> sorted(p.outcomes for p in explore_paths(lambda x: 1 if x[0] <= 5 else 0, [0], [9]).paths)
[(False,), (True,)]
"""

from __future__ import annotations

import hashlib
import math
import operator
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import z3

__all__ = ["Sym", "Trace", "Path", "PathSolver", "Exploration", "trace", "path_id", "explore_paths"]

_NumberTypes = (int, float, np.integer, np.floating)
_NONLINEAR = (operator.mul, operator.truediv, operator.floordiv, operator.mod)


class _Recorder:
    """The branches of one run: predicates as taken (z3) and their outcomes."""

    __slots__ = ("symbolic", "predicates", "deps", "outcomes", "concretized", "nonlinear")

    def __init__(self, symbolic: bool) -> None:
        self.symbolic = symbolic
        self.nonlinear = False
        self.predicates: list[z3.BoolRef] = []
        self.deps: list[int] = []  # per predicate, the bitmask of the inputs it reads
        self.outcomes: list[bool] = []
        self.concretized = 0


def _val(o: Any) -> Any:
    return o.v if isinstance(o, Sym) else o


def _expr(o: Any) -> Any:
    if isinstance(o, Sym):
        return o.e
    if isinstance(o, bool | int | np.integer):
        return z3.IntVal(int(o))
    return z3.RealVal(float(o))


class Sym:
    """A number that remembers how it was computed from the inputs (its z3 expression ``e``,
    ``None`` when only outcomes are recorded, and ``d``, the bitmask of the inputs it reads) and
    records the branches it decides."""

    __slots__ = ("v", "e", "d", "r")

    def __init__(self, v: Any, e: Any, d: int, r: _Recorder) -> None:
        self.v, self.e, self.d, self.r = v, e, d, r

    def _new(self, v: Any, op: Callable, other: Any, reflected: bool = False) -> Sym:
        d = self.d | other.d if isinstance(other, Sym) else self.d
        if not self.r.symbolic:
            return Sym(v, None, d, self.r)
        a, b = (_expr(other), self.e) if reflected else (self.e, _expr(other))
        return Sym(v, op(a, b), d, self.r)

    def _arith(self, other: Any, op: Callable, zop: Callable, reflected: bool = False) -> Any:
        if not isinstance(other, (Sym, *_NumberTypes)):
            return NotImplemented
        a, b = (_val(other), self.v) if reflected else (self.v, _val(other))
        if isinstance(other, Sym) and op in _NONLINEAR:
            self.r.nonlinear = True
        return self._new(op(a, b), zop, other, reflected)

    def __add__(self, o):
        return self._arith(o, operator.add, operator.add)

    def __radd__(self, o):
        return self._arith(o, operator.add, operator.add, True)

    def __sub__(self, o):
        return self._arith(o, operator.sub, operator.sub)

    def __rsub__(self, o):
        return self._arith(o, operator.sub, operator.sub, True)

    def __mul__(self, o):
        return self._arith(o, operator.mul, operator.mul)

    def __rmul__(self, o):
        return self._arith(o, operator.mul, operator.mul, True)

    def __truediv__(self, o):
        return self._arith(o, operator.truediv, _real_div)

    def __rtruediv__(self, o):
        return self._arith(o, operator.truediv, _real_div, True)

    def __floordiv__(self, o):
        return self._arith(o, operator.floordiv, _int_op(operator.truediv))

    def __rfloordiv__(self, o):
        return self._arith(o, operator.floordiv, _int_op(operator.truediv), True)

    def __mod__(self, o):
        return self._arith(o, operator.mod, _int_op(operator.mod))

    def __rmod__(self, o):
        return self._arith(o, operator.mod, _int_op(operator.mod), True)

    def __pow__(self, o):
        if isinstance(o, int) and 0 <= o <= 8:
            out: Any = 1
            for _ in range(o):
                out = self * out
            return out
        self.r.concretized += 1
        return self.v**o

    def __neg__(self):
        return Sym(-self.v, None if self.e is None else -self.e, self.d, self.r)

    def __pos__(self):
        return self

    def __abs__(self):
        return -self if self < 0 else self

    def _cmp(self, other: Any, op: Callable) -> bool:
        if isinstance(other, Sym):
            ov = other.v
        elif isinstance(other, _NumberTypes):
            ov = other
        else:
            return NotImplemented
        outcome = bool(op(self.v, ov))
        r = self.r
        if r.symbolic:
            p = op(self.e, _expr(other))
            r.predicates.append(p if outcome else z3.Not(p))
            r.deps.append(self.d | other.d if isinstance(other, Sym) else self.d)
        r.outcomes.append(outcome)
        return outcome

    def __lt__(self, o):
        return self._cmp(o, operator.lt)

    def __le__(self, o):
        return self._cmp(o, operator.le)

    def __gt__(self, o):
        return self._cmp(o, operator.gt)

    def __ge__(self, o):
        return self._cmp(o, operator.ge)

    def __eq__(self, o):
        return self._cmp(o, operator.eq)

    def __ne__(self, o):
        return self._cmp(o, operator.ne)

    def __bool__(self) -> bool:
        return self != 0

    def __hash__(self) -> int:
        return hash(self.v)

    def _concrete(self) -> Any:
        self.r.concretized += 1
        return self.v

    def __float__(self) -> float:
        return float(self._concrete())

    def __int__(self) -> int:
        return int(self._concrete())

    def __index__(self) -> int:
        return operator.index(self._concrete())

    def __round__(self, ndigits: int | None = None):
        return round(self._concrete(), ndigits)

    def __floor__(self):
        return math.floor(self._concrete())

    def __ceil__(self):
        return math.ceil(self._concrete())

    def __trunc__(self):
        return math.trunc(self._concrete())

    def __repr__(self) -> str:
        return f"Sym({self.v!r})"


def _real(e: Any) -> Any:
    return z3.ToReal(e) if z3.is_int(e) else e


def _real_div(a: Any, b: Any) -> Any:
    return _real(a) / _real(b)


def _int_op(op: Callable) -> Callable:
    # z3's integer division and modulus match Python's for positive divisors; on reals the
    # expression is not linear, so floor division of reals falls back to the real quotient.
    def f(a: Any, b: Any) -> Any:
        if z3.is_int(a) and z3.is_int(b):
            return op(a, b)
        return _real_div(a, b) if op is operator.truediv else a - b * z3.ToInt(_real_div(a, b))

    return f


@dataclass(frozen=True)
class Trace:
    """One run of the heuristic: its value, the branch outcomes (the code path) and, when run
    symbolically, the predicates as taken."""

    value: Any
    outcomes: tuple[bool, ...]
    predicates: tuple[Any, ...] = ()
    deps: tuple[int, ...] = ()
    concretized: int = 0
    nonlinear: bool = False

    @property
    def branches(self) -> int:
        return len(self.outcomes)

    @property
    def path(self) -> str:
        return path_id(self.outcomes)


def path_id(outcomes: Sequence[bool]) -> str:
    """A short stable name for a code path: the hash of its branch outcomes.

    >>> path_id([True, False]) == path_id((True, False)) != path_id([False, True])
    True
    """
    bits = np.packbits(np.asarray(outcomes, dtype=bool)).tobytes() + len(outcomes).to_bytes(4)
    return hashlib.blake2b(bits, digest_size=6).hexdigest()


def variables(n: int, integer: bool) -> list[Any]:
    make = z3.Int if integer else z3.Real
    return [make(f"x{i}") for i in range(n)]


def trace(
    heuristic: Callable[[list[Any]], Any],
    x: Sequence[float],
    *,
    symbolic: bool = True,
    integer: bool | None = None,
    xs: list[Any] | None = None,
) -> Trace:
    """Run `heuristic` on `x` as :class:`Sym` numbers and return its value and code path.

    With ``symbolic=False`` only outcomes are recorded (cheap: for path ids in the search loop).
    `integer` makes the z3 inputs integers (default: whether every input is integral).
    """
    rec = _Recorder(symbolic)
    if integer is None:
        integer = all(float(v).is_integer() for v in x)
    if symbolic and xs is None:
        xs = variables(len(x), integer)
    args = [
        Sym(int(v) if integer else float(v), xs[i] if symbolic else None, 1 << i, rec)
        for i, v in enumerate(x)
    ]
    value = heuristic(args)
    if isinstance(value, Sym):
        value = value.v
    return Trace(
        value,
        tuple(rec.outcomes),
        tuple(rec.predicates),
        tuple(rec.deps),
        rec.concretized,
        rec.nonlinear,
    )


@dataclass(frozen=True)
class Path:
    """A code path and the input that reached it (its seed)."""

    id: str
    outcomes: tuple[bool, ...]
    seed: np.ndarray
    value: float


@dataclass
class Exploration:
    """The code paths found, in the order found, with the solver's statistics."""

    paths: list[Path] = field(default_factory=list)
    runs: int = 0
    solver_calls: int = 0
    unsat: int = 0
    unknown: int = 0
    seconds: float = 0.0
    complete: bool = False
    concretized: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def max_branches(self) -> int:
        return max((len(p.outcomes) for p in self.paths), default=0)


def domain(
    xs: list[Any],
    lower: Sequence[float],
    upper: Sequence[float],
    max_nonzero: int | None = None,
    A: np.ndarray | None = None,
    b: np.ndarray | None = None,
) -> list[tuple[Any, int]]:
    """The z3 constraints of the input space (the box, the non-zero budget, ``A x <= b``), each
    with the bitmask of the inputs it reads."""
    cs = []
    for i, (v, lo, hi) in enumerate(zip(xs, lower, upper, strict=True)):
        cs.append((z3.And(v >= _num(lo, v), v <= _num(hi, v)), 1 << i))
    everyone = (1 << len(xs)) - 1
    if max_nonzero is not None:
        cs.append((z3.Sum([z3.If(v != 0, 1, 0) for v in xs]) <= max_nonzero, everyone))
    if A is not None:
        for row, bound in zip(A, b, strict=True):
            nz = [i for i, a in enumerate(row) if a != 0]
            if nz:
                terms = [float(row[i]) * _real(xs[i]) for i in nz]
                cs.append((z3.Sum(terms) <= float(bound), sum(1 << i for i in nz)))
    return cs


def _num(value: float, var: Any) -> Any:
    return z3.IntVal(int(value)) if z3.is_int(var) else z3.RealVal(float(value))


def _model_point(model: z3.ModelRef, xs: list[Any], parent: np.ndarray) -> np.ndarray:
    """The model's input; inputs the solver left free keep the parent's value (as SAGE keeps
    the bytes a constraint does not mention), so a new seed stays close to where it came from."""
    out = parent.copy()
    for decl in model.decls():
        i = int(decl.name()[1:])
        val = model[decl]
        if z3.is_int_value(val):
            out[i] = val.as_long()
        elif z3.is_rational_value(val):
            out[i] = val.numerator_as_long() / val.denominator_as_long()
        elif z3.is_algebraic_value(val):
            out[i] = float(val.approx(12).as_fraction())
    return out


def _slice(goal: int, constraints: Sequence[tuple[Any, int]]) -> list[Any]:
    """The constraints that share inputs with `goal`, transitively (KLEE's constraint
    independence): the others cannot change whether the goal is satisfiable."""
    chosen = [False] * len(constraints)
    grew = True
    while grew:
        grew = False
        for j, (_, d) in enumerate(constraints):
            if not chosen[j] and d & goal:
                chosen[j] = True
                goal |= d
                grew = True
    return [c for (c, _), keep in zip(constraints, chosen, strict=True) if keep]


class PathSolver:
    """Traces a heuristic symbolically over a fixed input space and solves for inputs that take
    the same branches as a trace up to branch *i* and the other way at *i*.

    One z3 solver serves every query, a scope each (a fresh ``z3.Solver`` costs about 5 ms of
    set-up per check), and each query holds only the constraints that share inputs with the
    flipped branch.
    """

    def __init__(
        self,
        heuristic: Callable[[list[Any]], Any],
        lower: Sequence[float],
        upper: Sequence[float],
        *,
        integer: bool = True,
        max_nonzero: int | None = None,
        A: np.ndarray | None = None,
        b: np.ndarray | None = None,
        timeout_ms: int = 500,
    ) -> None:
        self.heuristic = heuristic
        self.integer = integer
        self.space = (lower, upper, max_nonzero, A, b)
        self.xs = variables(len(lower), integer)
        self.base = domain(self.xs, *self.space)
        self.relaxed = False
        self.solver = z3.SimpleSolver()
        self.solver.set("timeout", timeout_ms)
        self.calls = self.unsat = self.unknown = 0

    def trace(self, x: np.ndarray) -> Trace:
        t = trace(self.heuristic, x.tolist(), integer=self.integer, xs=self.xs)
        if t.nonlinear and self.integer and not self.relaxed:
            # Non-linear integer arithmetic is undecidable and z3 often times out on it (greedy
            # knapsack compares value/weight ratios); over the reals it is decidable and fast.
            # Solve the real relaxation and round: a rounded input may take another path, which
            # the caller sees when it runs it.
            self.relaxed = True
            self.xs = variables(len(self.xs), integer=False)
            self.base = domain(self.xs, *self.space)
            t = trace(self.heuristic, x.tolist(), integer=True, xs=self.xs)
        return t

    def flip(self, t: Trace, i: int, x: np.ndarray) -> np.ndarray | None:
        """An input that agrees with trace `t` (run on `x`) before branch `i` and not at it;
        inputs the query leaves free keep their values from `x`. ``None`` if there is none
        (or z3 gives up: counted in ``unknown``)."""
        held = self.base + list(zip(t.predicates[:i], t.deps[:i], strict=True))
        self.solver.push()
        try:
            self.solver.add(z3.Not(t.predicates[i]), *_slice(t.deps[i], held))
            self.calls += 1
            res = self.solver.check()
            if res == z3.sat:
                y = _model_point(self.solver.model(), self.xs, x)
                return np.round(y) if self.relaxed else y
            if res == z3.unsat:
                self.unsat += 1
            else:
                self.unknown += 1
            return None
        finally:
            self.solver.pop()


def explore_paths(
    heuristic: Callable[[list[Any]], Any],
    lower: Sequence[float],
    upper: Sequence[float],
    *,
    integer: bool = True,
    seeds: Sequence[Sequence[float]] = (),
    max_nonzero: int | None = None,
    A: np.ndarray | None = None,
    b: np.ndarray | None = None,
    budget_s: float = 30.0,
    max_paths: int = 1000,
    solver_timeout_ms: int = 500,
    on_path: Callable[[Path], None] | None = None,
) -> Exploration:
    """Find the code paths of `heuristic` over the box [`lower`, `upper`] by generational search.

    Starting from `seeds` (default: the all-min input), each run's branch predicates are solved
    in order: the prefix up to branch *i* held and branch *i* negated gives an input that takes
    a new path, whose own search starts after *i* (SAGE's bound, so no path is generated twice).
    Each query holds only the constraints that share inputs with the negated branch. Stops when
    no branch is left to negate (``complete``, unless z3 gave up on a query or a run raised), at
    `max_paths`, or after `budget_s`.

    >>> def pin(x):  # demand pinning on two demands, threshold 5
    ...     return sum(1 for d in x if d <= 5)
    >>> e = explore_paths(pin, [0, 0], [9, 9])
    >>> len(e.paths), e.complete
    (4, True)
    """
    start = time.monotonic()
    ps = PathSolver(
        heuristic,
        lower,
        upper,
        integer=integer,
        max_nonzero=max_nonzero,
        A=A,
        b=b,
        timeout_ms=solver_timeout_ms,
    )
    out = Exploration()
    seen: set[str] = set()
    work: deque[tuple[np.ndarray, int]] = deque(
        (np.asarray(s, dtype=float), 0) for s in (seeds or [np.asarray(lower, dtype=float)])
    )

    def spent() -> bool:
        return time.monotonic() - start > budget_s or len(out.paths) >= max_paths

    while work and not spent():
        x, bound = work.popleft()
        try:
            t = ps.trace(x)
        except Exception as e:  # a crash on one input must not end the exploration
            out.errors.append(f"{type(e).__name__}: {e} at input {x.tolist()}")
            continue
        out.runs += 1
        out.concretized = max(out.concretized, t.concretized)
        if t.path in seen:
            continue
        seen.add(t.path)
        p = Path(t.path, t.outcomes, x, float(t.value))
        out.paths.append(p)
        if on_path:
            on_path(p)
        for i in range(bound, t.branches):
            if spent():
                break
            y = ps.flip(t, i, x)
            if y is not None:
                work.append((y, i + 1))
    out.solver_calls, out.unsat, out.unknown = ps.calls, ps.unsat, ps.unknown
    # Complete only if every branch was decided: a z3 "unknown" or a run that raised (whose
    # later branches were never traced) may hide paths.
    out.complete = not work and not spent() and out.unknown == 0 and not out.errors
    out.seconds = time.monotonic() - start
    return out
