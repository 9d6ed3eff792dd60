"""Wide-area (WAN) backbones from SNDlib and the Internet Topology Zoo, via PyPI ``topohub``.

Traffic-engineering studies (MetaOpt, Namyar et al., NSDI '24; MetaEase, Karimi et al., NSDI '26;
POP, Narayanan et al., SOSP '21) evaluate heuristics on public backbones: Abilene, B4, SWAN,
Cogentco, Uninett2010. ``topohub`` packages SNDlib and the Topology Zoo as node-link JSON; it has
Abilene, GEANT, Germany50, Uninett2010 and TataNld, but **not** Cogentco, B4 or SWAN. TataNld
(143 nodes, 181 links) is our stand-in for the large Cogentco topology (197 nodes, 245 links).
"""

from __future__ import annotations

import networkx as nx

from ..topology import NodeKind, TopologyError, add_link, add_node, new_topology

__all__ = ["WAN_CATALOG", "wan"]

#: Short names for the backbones the TE literature uses, as ``topohub`` keys.
WAN_CATALOG: dict[str, str] = {
    "abilene": "sndlib/abilene",
    "geant": "sndlib/geant",
    "germany50": "sndlib/germany50",
    "uninett2010": "topozoo/Uninett2010",
    "tatanld": "topozoo/TataNld",
}

#: Propagation delay in fibre: about 5 µs per km (light at ~2/3 c).
_SECONDS_PER_KM = 5e-6


def wan(name: str = "abilene", capacity: float | str = 100) -> nx.DiGraph:
    """A WAN backbone: routers joined by links of uniform `capacity` in both directions.

    `name` is a short name (``abilene``, ``geant``, ``germany50``, ``uninett2010``, ``tatanld``)
    or any ``topohub`` key ``"group/name"`` (``"sndlib/polska"``, ``"topozoo/Uninett2011"``). Each undirected link becomes two arcs of `capacity` (a number, or a string
    with units as in :func:`~datahall.core.topology.add_link`); the latency is the link's length
    at 5 µs/km when ``topohub`` gives it. Nodes are ``router`` nodes named as in the source when
    the names are unique, else by their ``topohub`` id as a string; ``pos`` is (longitude,
    latitude) where known.

    ``topohub`` has no Cogentco, B4 or SWAN: ``tatanld`` (143 nodes, 181 links) is the large
    stand-in for the Cogentco results of MetaOpt (NSDI '24) and MetaEase (NSDI '26).

    Raises :class:`~datahall.core.topology.TopologyError` for an unknown name, or when the
    optional package ``topohub`` (extra ``heuristics``) is missing.

    >>> G = wan("abilene")
    >>> G.number_of_nodes(), G.number_of_edges() // 2, G["ATLAng"]["HSTNng"]["capacity"]
    (12, 15, 100)
    """
    try:
        import topohub
    except ImportError:
        raise TopologyError(
            "wan topologies need the topohub package; install it with "
            "`pip install topohub` (or the `heuristics` extra)"
        ) from None
    key = WAN_CATALOG.get(name, name)
    try:
        data = topohub.get(key) if "/" in key else None
    except (KeyError, OSError):
        data = None
    if data is None:
        raise TopologyError(
            f"unknown WAN topology {name!r}; choose one of {', '.join(WAN_CATALOG)} or a topohub "
            'key "group/name" such as "sndlib/polska" (topohub has no Cogentco, B4 or SWAN)'
        )
    src = nx.node_link_graph(data, edges="edges")
    names = {n: src.nodes[n].get("name") for n in src}
    labels = list(names.values())
    unique = all(isinstance(s, str) and s for s in labels) and len(set(labels)) == len(labels)
    label = {n: (names[n] if unique else str(n)) for n in src}
    short = str(src.graph.get("name") or key.rsplit("/", 1)[-1])
    G = new_topology(short, generator="wan", source=f"topohub:{key}")
    for n in src:
        pos = src.nodes[n].get("pos")
        extra = {"pos": tuple(pos)} if pos is not None else {}
        add_node(G, label[n], NodeKind.ROUTER, **extra)
    for u, v, d in src.edges(data=True):
        a, b = label[u], label[v]
        if a == b or G.has_edge(a, b) or G.has_edge(b, a):
            continue  # self-loops and parallel links: one link of uniform capacity
        dist = d.get("dist")
        latency = float(dist) * _SECONDS_PER_KM if dist is not None else 0.0
        add_link(G, a, b, capacity, latency)
    return G
