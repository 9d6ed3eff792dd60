"""Schedules as plain JSON (exact round trip) and as ForestColl's tree XML.

JSON keeps every field of a :class:`~datahall.collectives.schedule.Schedule`: fractions are
``"a/b"`` strings, trees carry their arcs and physical paths, and ``meta`` survives with its
fractions, tuples and non-string keys tagged (``{"$fraction": "a/b"}``, ``{"$tuple": [...]}``,
``{"$dict": [[key, value], ...]}``), so ``schedule_from_json(schedule_to_json(s))`` equals `s`
including ``meta``.

ForestColl's tree XML (the reference code's ``spanning_trees_to_xml``, brief §2.8) is::

    <Algo nchunkspernode="k">
      <tree root="0" index="0" nchunks="1" height="3">
        <send src="0" dst="1" path="box0/gpu0,box0/nvswitch,box0/gpu1"/>

``root``, ``src`` and ``dst`` are GPU ranks (positions in ``schedule.compute_nodes``) and
``path`` the comma-separated physical nodes, in the data's direction.

>>> from fractions import Fraction
>>> from datahall.collectives.schedule import Phase, Schedule, Tree, TreeArc
>>> t = lambda r, c: Tree(r, 0, 1, (TreeArc(r, c, (r, "sw", c)),))
>>> s = Schedule("allgather", "pair", ("a", "b"), 1, Fraction(3, 5), Fraction(50),
...              (Phase("broadcast", (t("a", "b"), t("b", "a"))),), {"gap": Fraction(1, 3)})
>>> d = schedule_to_json(s)
>>> d["U"], d["x_star"], d["meta"]
('3/5', '50/1', {'gap': {'$fraction': '1/3'}})
>>> schedule_from_json(d) == s
True
>>> print(to_forestcoll_xml(s).splitlines()[2])
    <send src="0" dst="1" path="a,sw,b"/>
"""

from __future__ import annotations

import json
import numbers
import os
from collections.abc import Mapping
from fractions import Fraction
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

from .schedule import COLLECTIVES, Phase, Schedule, Tree, TreeArc

__all__ = [
    "FORMAT",
    "VERSION",
    "ScheduleFormatError",
    "schedule_to_json",
    "schedule_from_json",
    "dumps_schedule",
    "loads_schedule",
    "save_schedule",
    "load_schedule",
    "to_forestcoll_xml",
]

FORMAT = "datahall.collectives.schedule"
VERSION = 1


class ScheduleFormatError(ValueError):
    """A schedule file or dict that cannot be read back; the message says where and why."""


# --------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------


def _fraction(x: Fraction | int) -> str:
    x = Fraction(x)
    return f"{x.numerator}/{x.denominator}"


def _encode(value: Any, where: str) -> Any:
    """meta values → JSON, tagging what JSON cannot hold."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, Fraction):
        return {"$fraction": _fraction(value)}
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return {"$float": repr(value)}
        return float(value)
    if isinstance(value, numbers.Integral):  # numpy integers
        return int(value)
    if isinstance(value, numbers.Real):  # numpy floats
        return _encode(float(value), where)
    if isinstance(value, tuple):
        return {"$tuple": [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        if all(isinstance(k, str) for k in value) and not any(k.startswith("$") for k in value):
            return {k: _encode(v, f"{where}.{k}") for k, v in value.items()}
        return {
            "$dict": [
                [_encode(k, f"{where} key"), _encode(v, f"{where}[{k!r}]")]
                for k, v in value.items()
            ]
        }
    raise ScheduleFormatError(
        f"{where} is a {type(value).__name__}, which a schedule file cannot hold; store numbers, "
        "strings, fractions, lists, tuples or dicts in meta"
    )


def _decode(value: Any, where: str) -> Any:
    if isinstance(value, list):
        return [_decode(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        ((tag, body),) = value.items()
        if tag == "$fraction":
            return _parse_fraction(body, where)
        if tag == "$tuple":
            return tuple(_decode(v, f"{where}[{i}]") for i, v in enumerate(body))
        if tag == "$float":
            return float(body)
        if tag == "$dict":
            return {_hashable(_decode(k, where)): _decode(v, where) for k, v in body}
    return {k: _decode(v, f"{where}.{k}") for k, v in value.items()}


def _hashable(x: Any) -> Any:
    return tuple(_hashable(v) for v in x) if isinstance(x, list) else x


def _parse_fraction(text: Any, where: str) -> Fraction:
    if isinstance(text, int) and not isinstance(text, bool):
        return Fraction(text)
    if not isinstance(text, str):
        raise ScheduleFormatError(f'{where} must be a fraction string like "3/5", got {text!r}')
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        raise ScheduleFormatError(
            f'{where} must be a fraction string like "3/5", got {text!r}'
        ) from None


def schedule_to_json(schedule: Schedule) -> dict[str, Any]:
    """Every field of `schedule` as a JSON-ready dict (see the module docstring)."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "collective": schedule.collective,
        "topology": schedule.topology,
        "compute_nodes": list(schedule.compute_nodes),
        "k": schedule.k,
        "U": _fraction(schedule.U),
        "x_star": _fraction(schedule.x_star),
        "phases": [
            {
                "kind": p.kind,
                "trees": [
                    {
                        "root": t.root,
                        "index": t.index,
                        "multiplicity": t.multiplicity,
                        "arcs": [
                            {"parent": a.parent, "child": a.child, "path": list(a.path)}
                            for a in t.arcs
                        ],
                    }
                    for t in p.trees
                ],
            }
            for p in schedule.phases
        ],
        "meta": _encode(dict(schedule.meta), "meta"),
    }


def _get(d: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(d, dict):
        raise ScheduleFormatError(f"{where} must be an object, got {type(d).__name__}")
    if key not in d:
        raise ScheduleFormatError(f"{where} has no {key!r}")
    v = d[key]
    if not isinstance(v, kind) or (isinstance(v, bool) and kind is int):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ScheduleFormatError(f"{where}.{key} must be {names}, got {v!r}")
    return v


def schedule_from_json(data: Mapping[str, Any] | str | os.PathLike[str]) -> Schedule:
    """The :class:`Schedule` stored by :func:`schedule_to_json` (a dict, JSON text or a path).

    Raises :class:`ScheduleFormatError` naming the first bad field.
    """
    if isinstance(data, os.PathLike) or (
        isinstance(data, str) and not data.lstrip().startswith("{")
    ):
        return load_schedule(data)
    if isinstance(data, str):
        return loads_schedule(data)
    d = dict(data)
    if d.get("format") != FORMAT:
        raise ScheduleFormatError(
            f"not a datahall schedule: format is {d.get('format')!r}, expected {FORMAT!r}"
        )
    if d.get("version") != VERSION:
        raise ScheduleFormatError(
            f"schedule format version {d.get('version')!r} is not supported (this datahall "
            f"reads version {VERSION}); export it again"
        )
    coll = _get(d, "collective", str, "schedule")
    if coll not in COLLECTIVES:
        raise ScheduleFormatError(
            f"schedule.collective {coll!r} is not one of {', '.join(COLLECTIVES)}"
        )
    nodes = _get(d, "compute_nodes", list, "schedule")
    if not all(isinstance(n, str) for n in nodes):
        raise ScheduleFormatError("schedule.compute_nodes must be a list of strings")
    phases = []
    for pi, p in enumerate(_get(d, "phases", list, "schedule")):
        pw = f"phases[{pi}]"
        kind = _get(p, "kind", str, pw)
        if kind not in ("broadcast", "reduce"):
            raise ScheduleFormatError(f"{pw}.kind must be broadcast or reduce, got {kind!r}")
        trees = []
        for ti, t in enumerate(_get(p, "trees", list, pw)):
            tw = f"{pw}.trees[{ti}]"
            arcs = []
            for ai, a in enumerate(_get(t, "arcs", list, tw)):
                aw = f"{tw}.arcs[{ai}]"
                parent, child = _get(a, "parent", str, aw), _get(a, "child", str, aw)
                path = tuple(_get(a, "path", list, aw))
                ends = (parent, child) if kind == "broadcast" else (child, parent)
                if len(path) < 2 or (path[0], path[-1]) != ends:
                    raise ScheduleFormatError(
                        f"{aw}.path must run {ends[0]} ... {ends[1]} (the data's direction in a "
                        f"{kind} phase), got {list(path)}"
                    )
                arcs.append(TreeArc(parent, child, path))
            trees.append(
                Tree(
                    _get(t, "root", str, tw),
                    _get(t, "index", int, tw),
                    _get(t, "multiplicity", int, tw),
                    tuple(arcs),
                )
            )
        phases.append(Phase(kind, tuple(trees)))
    return Schedule(
        collective=coll,
        topology=_get(d, "topology", str, "schedule"),
        compute_nodes=tuple(nodes),
        k=_get(d, "k", int, "schedule"),
        U=_parse_fraction(d.get("U"), "schedule.U"),
        x_star=_parse_fraction(d.get("x_star"), "schedule.x_star"),
        phases=tuple(phases),
        meta=_decode(d.get("meta", {}), "meta"),
    )


def dumps_schedule(schedule: Schedule, *, indent: int | None = 1) -> str:
    """JSON text of `schedule`."""
    return json.dumps(schedule_to_json(schedule), indent=indent)


def loads_schedule(text: str) -> Schedule:
    """The schedule in JSON text `text`."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ScheduleFormatError(
            f"not JSON: {e.msg} at line {e.lineno}, column {e.colno}"
        ) from None
    if not isinstance(data, dict):
        raise ScheduleFormatError(f"a schedule file holds a JSON object, not {type(data).__name__}")
    return schedule_from_json(data)


def save_schedule(schedule: Schedule, path: str | os.PathLike[str]) -> Path:
    """Write `schedule` as JSON to `path`; returns the path."""
    p = Path(path)
    p.write_text(dumps_schedule(schedule) + "\n", encoding="utf-8")
    return p


def load_schedule(path: str | os.PathLike[str]) -> Schedule:
    """Read a schedule JSON file written by :func:`save_schedule`."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ScheduleFormatError(f"cannot read schedule file {p}: {e.strerror or e}") from None
    try:
        return loads_schedule(text)
    except ScheduleFormatError as e:
        raise ScheduleFormatError(f"{p}: {e}") from None


# --------------------------------------------------------------------------------------------
# ForestColl tree XML
# --------------------------------------------------------------------------------------------


def to_forestcoll_xml(schedule: Schedule, phase: int | None = None) -> str:
    """ForestColl's tree XML of one phase (default: the broadcast phase if there is one).

    Broadcast trees send parent → child; reduce trees are written in their data's direction,
    child → parent (``send src=child dst=parent``). ``nchunks`` is a tree's multiplicity and
    ``height`` its longest root-to-leaf arc count.
    """
    if phase is None:
        kinds = [p.kind for p in schedule.phases]
        phase = kinds.index("broadcast") if "broadcast" in kinds else 0
    if not 0 <= phase < len(schedule.phases):
        raise ValueError(f"phase {phase} does not exist; the schedule has {len(schedule.phases)}")
    p = schedule.phases[phase]
    rank = {v: i for i, v in enumerate(schedule.compute_nodes)}
    for v in (n for t in p.trees for n in t.nodes()):
        if v not in rank:
            raise ValueError(f"tree node {v!r} is not in schedule.compute_nodes")
    lines = [f'<Algo nchunkspernode="{schedule.k}">']
    for t in sorted(p.trees, key=lambda t: (rank[t.root], t.index)):
        lines.append(
            f'  <tree root="{rank[t.root]}" index="{t.index}" nchunks="{t.multiplicity}" '
            f'height="{t.height()}">'
        )
        for a in _bfs(t):
            src, dst = (a.parent, a.child) if p.kind == "broadcast" else (a.child, a.parent)
            path = quoteattr(",".join(a.path))
            lines.append(f'    <send src="{rank[src]}" dst="{rank[dst]}" path={path}/>')
        lines.append("  </tree>")
    lines.append("</Algo>")
    return "\n".join(lines) + "\n"


def _bfs(t: Tree) -> list[TreeArc]:
    """Arcs in breadth-first order from the root (the reference's ``bfs_edges`` order)."""
    out_arcs: dict[str, list[TreeArc]] = {}
    for a in t.arcs:
        out_arcs.setdefault(a.parent, []).append(a)
    order, frontier = [], [t.root]
    while frontier:
        nxt = []
        for v in frontier:
            for a in out_arcs.get(v, []):
                order.append(a)
                nxt.append(a.child)
        frontier = nxt
    return order
