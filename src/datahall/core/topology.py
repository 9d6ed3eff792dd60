"""Typed capacitated directed graphs for datacenter fabrics.

A topology is a plain :class:`networkx.DiGraph`. Every node has a ``kind`` (``gpu``, ``nic``,
``nvswitch``, ``tor``, ...); compute nodes are the ``gpu`` ones (an AMD GCD is a ``gpu``). Every
arc has a ``capacity`` in GB/s (10**9 bytes per second, a number) and a ``latency`` in seconds. A
bidirectional link is two arcs. Generators may add ``box`` and ``rail`` to nodes; algorithms that
exploit symmetry (ForestColl's tree replication) read them.

Files: JSON, YAML and GraphML. In JSON/YAML a capacity may carry units (``"200Gb/s"``) and a link
is bidirectional unless it says ``"bidirectional": false``::

    {"name": "two-gpus",
     "nodes": [{"id": "g0", "kind": "gpu"}, {"id": "g1", "kind": "gpu"}],
     "links": [{"source": "g0", "target": "g1", "capacity": "25GB/s", "latency": "1us"}]}

>>> G = new_topology("pair")
>>> add_node(G, "g0", "gpu"); add_node(G, "g1", "gpu")
>>> add_link(G, "g0", "g1", "200Gb/s")
>>> compute_nodes(G), G["g0"]["g1"]["capacity"], G.number_of_edges()
(['g0', 'g1'], 25, 2)
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from enum import StrEnum
from fractions import Fraction
from pathlib import Path
from typing import Any

import networkx as nx
import yaml

from .units import GB, UnitError, exact, parse_bandwidth, parse_time

__all__ = [
    "NodeKind",
    "COMPUTE_KINDS",
    "TopologyError",
    "new_topology",
    "add_node",
    "add_link",
    "compute_nodes",
    "capacity",
    "egress",
    "ingress",
    "validate",
    "to_dict",
    "from_dict",
    "load",
    "save",
]


class NodeKind(StrEnum):
    """What a node is. Only ``gpu`` nodes compute; the others forward."""

    GPU = "gpu"
    NIC = "nic"
    NVSWITCH = "nvswitch"
    SWITCH = "switch"
    HOST = "host"
    TOR = "tor"
    LEAF = "leaf"
    SPINE = "spine"
    IB = "ib"
    MPD = "mpd"
    ROADM = "roadm"
    ROUTER = "router"


COMPUTE_KINDS = frozenset({NodeKind.GPU})


class TopologyError(ValueError):
    """A topology that cannot be used; the message names the place and the fix."""


def new_topology(name: str = "topology", **attrs: Any) -> nx.DiGraph:
    """An empty topology named `name`; extra keyword arguments become graph attributes."""
    return nx.DiGraph(name=name, **attrs)


def _kind(kind: str | NodeKind, where: str) -> NodeKind:
    try:
        return NodeKind(kind)
    except ValueError:
        kinds = ", ".join(k.value for k in NodeKind)
        raise TopologyError(f"{where}: unknown node kind {kind!r}; use one of {kinds}") from None


def add_node(G: nx.DiGraph, node: str, kind: str | NodeKind, **attrs: Any) -> None:
    """Add `node` of `kind` (a :class:`NodeKind` value) with extra attributes."""
    G.add_node(node, kind=_kind(kind, f"node {node!r}").value, **attrs)


def _gbps(value: Any, where: str) -> float | int:
    """A capacity in GB/s as a plain number: strings carry units, numbers are GB/s already."""
    try:
        v = parse_bandwidth(value) / GB if isinstance(value, str) else exact(value)
    except (UnitError, ValueError, TypeError) as e:
        raise TopologyError(f"{where}: bad capacity {value!r}: {e}") from None
    return int(v) if v.denominator == 1 else float(v)


def _seconds(value: Any, where: str) -> float:
    try:
        return float(parse_time(value))
    except (UnitError, ValueError, TypeError) as e:
        raise TopologyError(f"{where}: bad latency {value!r}: {e}") from None


def add_link(
    G: nx.DiGraph,
    u: str,
    v: str,
    capacity: float | str,
    latency: float | str = 0.0,
    *,
    bidirectional: bool = True,
    **attrs: Any,
) -> None:
    """Add a link u→v (and v→u unless `bidirectional` is false).

    `capacity` is GB/s when a number, or a string with units (``"200Gb/s"``). Adding a link where
    one exists adds capacities: parallel cables are one arc of their summed bandwidth.
    """
    where = f"link {u!r} -> {v!r}"
    cap = _gbps(capacity, where)
    lat = _seconds(latency, where)
    for a, b in [(u, v), (v, u)] if bidirectional else [(u, v)]:
        if G.has_edge(a, b):
            G[a][b]["capacity"] = _gbps(exact(G[a][b]["capacity"]) + exact(cap), where)
        else:
            G.add_edge(a, b, capacity=cap, latency=lat, **attrs)


def compute_nodes(G: nx.DiGraph) -> list[str]:
    """The compute nodes (GPUs/GCDs) of `G` in insertion order."""
    return [n for n, k in G.nodes(data="kind") if k in COMPUTE_KINDS]


def capacity(G: nx.DiGraph, u: str, v: str) -> Fraction:
    """The exact capacity of arc u→v in GB/s."""
    return exact(G[u][v]["capacity"])


def egress(G: nx.DiGraph, nodes: Iterable[str]) -> Fraction:
    """B⁺(S): total capacity of arcs leaving the node set S, in GB/s."""
    S = set(nodes)
    return sum(
        (exact(c) for u in S for _, v, c in G.out_edges(u, data="capacity") if v not in S),
        Fraction(0),
    )


def ingress(G: nx.DiGraph, nodes: Iterable[str]) -> Fraction:
    """B⁻(S): total capacity of arcs entering the node set S, in GB/s."""
    S = set(nodes)
    return sum(
        (exact(c) for v in S for u, _, c in G.in_edges(v, data="capacity") if u not in S),
        Fraction(0),
    )


def validate(G: nx.DiGraph) -> None:
    """Raise :class:`TopologyError` unless `G` is a usable fabric.

    Checks: every node has a known kind; every arc a positive capacity and non-negative latency;
    at least one compute node; every compute node reaches, and is reached from, every other. A
    WAN has no compute nodes: there its routers are the endpoints that must reach each other.
    """
    name = G.graph.get("name", "topology")
    for n, kind in G.nodes(data="kind"):
        if kind is None:
            raise TopologyError(
                f"{name}: node {n!r} has no kind; give it one of gpu, nic, switch, ..."
            )
        _kind(kind, f"{name}: node {n!r}")
    for u, v, d in G.edges(data=True):
        where = f"{name}: link {u!r} -> {v!r}"
        if "capacity" not in d:
            raise TopologyError(f'{where} has no capacity; add e.g. "capacity": "25GB/s"')
        cap = exact(_gbps(d["capacity"], where))
        if cap <= 0:
            raise TopologyError(
                f"{where}: capacity must be > 0, got {d['capacity']}; fix it or remove the link"
            )
        if float(d.get("latency", 0.0)) < 0:
            raise TopologyError(f"{where}: latency must be >= 0, got {d['latency']}")
    gpus = compute_nodes(G) or [n for n, k in G.nodes(data="kind") if k == NodeKind.ROUTER]
    if not gpus:
        raise TopologyError(
            f'{name}: no compute nodes; mark GPUs with "kind": "gpu" (got kinds '
            f"{sorted({k for _, k in G.nodes(data='kind')})})"
        )
    first = gpus[0]
    down = nx.descendants(G, first) | {first}
    up = nx.ancestors(G, first) | {first}
    for g in gpus:
        if g not in down:
            raise TopologyError(
                f"{name}: compute node {g!r} is unreachable from {first!r}; "
                "connect it (a link may be missing its reverse direction)"
            )
        if g not in up:
            raise TopologyError(
                f"{name}: compute node {g!r} cannot reach {first!r}; "
                "add the reverse direction of its links"
            )


def to_dict(G: nx.DiGraph) -> dict[str, Any]:
    """The JSON/YAML form of `G`; arc pairs with equal attributes become one bidirectional link."""
    nodes = [{"id": n, **d} for n, d in G.nodes(data=True)]
    links, seen = [], set()
    for u, v, d in G.edges(data=True):
        if (u, v) in seen:
            continue
        back = G.get_edge_data(v, u)
        both = back is not None and back == d
        links.append({"source": u, "target": v, **d, **({} if both else {"bidirectional": False})})
        seen.add((u, v))
        if both:
            seen.add((v, u))
    graph = {k: v for k, v in G.graph.items() if k != "name"}
    return {"name": G.graph.get("name", "topology"), **graph, "nodes": nodes, "links": links}


def from_dict(data: Any, source: str = "topology") -> nx.DiGraph:
    """Build a topology from its JSON/YAML form; errors name `source` and the offending entry."""
    if not isinstance(data, dict) or "nodes" not in data or "links" not in data:
        raise TopologyError(f'{source}: expected an object with "nodes" and "links" lists')
    extra = {k: v for k, v in data.items() if k not in ("name", "nodes", "links")}
    G = new_topology(str(data.get("name", Path(source).stem)), **extra)
    for i, node in enumerate(data["nodes"]):
        if not isinstance(node, dict) or "id" not in node:
            raise TopologyError(f'{source}: nodes[{i}] needs an "id"')
        attrs = {k: v for k, v in node.items() if k not in ("id", "kind")}
        if "kind" not in node:
            raise TopologyError(f'{source}: nodes[{i}] ({node["id"]!r}) needs a "kind", e.g. "gpu"')
        add_node(G, str(node["id"]), _kind(node["kind"], f"{source}: nodes[{i}]"), **attrs)
    for i, link in enumerate(data["links"]):
        where = f"{source}: links[{i}]"
        if not isinstance(link, dict) or not {"source", "target", "capacity"} <= link.keys():
            raise TopologyError(f'{where} needs "source", "target" and "capacity"')
        u, v = str(link["source"]), str(link["target"])
        for end in (u, v):
            if end not in G:
                raise TopologyError(
                    f'{where} refers to node {end!r}, which is not in "nodes"; '
                    "declare it or fix the name"
                )
        attrs = {
            k: w
            for k, w in link.items()
            if k not in ("source", "target", "capacity", "latency", "bidirectional")
        }
        add_link(
            G,
            u,
            v,
            link["capacity"],
            link.get("latency", 0.0),
            bidirectional=bool(link.get("bidirectional", True)),
            **attrs,
        )
    return G


def load(path: str | Path) -> nx.DiGraph:
    """Read a topology from ``.json``, ``.yaml``/``.yml`` or ``.graphml`` and validate it."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".json", ".yaml", ".yml", ".graphml"):
        raise TopologyError(f"{path}: unknown format {suffix!r}; use .json, .yaml or .graphml")
    if not path.exists():
        raise TopologyError(f"{path}: no such file")
    try:
        if suffix == ".json":
            G = from_dict(json.loads(path.read_text()), str(path))
        elif suffix in (".yaml", ".yml"):
            G = from_dict(yaml.safe_load(path.read_text()), str(path))
        else:
            G = _from_graphml(path)
    except json.JSONDecodeError as e:
        raise TopologyError(f"{path}:{e.lineno}:{e.colno}: not valid JSON: {e.msg}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise TopologyError(f"{path}{at}: not valid YAML: {getattr(e, 'problem', e)}") from None
    validate(G)
    return G


def _from_graphml(path: Path) -> nx.DiGraph:
    try:
        H = nx.read_graphml(path)
    except Exception as e:  # networkx raises several types for malformed XML
        raise TopologyError(f"{path}: not valid GraphML: {e}") from None
    data = {
        "name": H.graph.get("name", path.stem),
        "nodes": [{"id": n, **d} for n, d in H.nodes(data=True)],
        "links": [
            {"source": u, "target": v, **d, "bidirectional": not H.is_directed()}
            for u, v, d in H.edges(data=True)
        ],
    }
    return from_dict(data, str(path))


def save(G: nx.DiGraph, path: str | Path) -> Path:
    """Write `G` as JSON, YAML or GraphML, chosen by the file suffix."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        path.write_text(json.dumps(to_dict(G), indent=1) + "\n")
    elif suffix in (".yaml", ".yml"):
        path.write_text(yaml.safe_dump(to_dict(G), sort_keys=False))
    elif suffix == ".graphml":
        H = G.copy()
        H.graph = {k: v for k, v in G.graph.items() if isinstance(v, str | int | float | bool)}
        nx.write_graphml(H, path)
    else:
        raise TopologyError(f"{path}: unknown format {suffix!r}; use .json, .yaml or .graphml")
    return path
