"""Small direct-connect fabrics (ring, torus, full mesh) and a seeded random heterogeneous one."""

from __future__ import annotations

import itertools
import random

import networkx as nx

from ..topology import TopologyError, add_link, add_node, new_topology

__all__ = ["ring", "torus", "direct_connect", "random_fabric"]


def _gpus(G: nx.DiGraph, names: list[str]) -> None:
    for i, n in enumerate(names):
        add_node(G, n, "gpu", box=0, rail=i)


def _at_least(name: str, value: int, low: int) -> None:
    if not isinstance(value, int) or value < low:
        raise TopologyError(f"{name} must be an integer >= {low}, got {value!r}")


def ring(n: int = 8, capacity: float | str = "50GB/s", bidirectional: bool = True) -> nx.DiGraph:
    """`n` GPUs in a ring, each link of `capacity`; ``bidirectional=False`` gives a one-way ring.

    >>> ring(4).number_of_edges(), ring(4, bidirectional=False).number_of_edges()
    (8, 4)
    """
    _at_least("n", n, 2)
    G = new_topology(f"ring-{n}", generator="ring")
    names = [f"gpu{i}" for i in range(n)]
    _gpus(G, names)
    for i in range(n):
        if n > 2 or i == 0:
            add_link(
                G,
                names[i],
                names[(i + 1) % n],
                capacity,
                "0.7us",
                bidirectional=bidirectional or n == 2,
            )
    return G


def torus(dims: tuple[int, ...] = (4, 4), capacity: float | str = "50GB/s") -> nx.DiGraph:
    """A wrap-around torus of GPUs with the given dimensions (2-D or more).

    >>> torus((2, 3)).number_of_nodes()
    6
    """
    dims = tuple(dims)
    for d in dims:
        _at_least("every torus dimension", d, 2)
    G = new_topology("torus-" + "x".join(map(str, dims)), generator="torus")
    coords = list(itertools.product(*(range(d) for d in dims)))
    name = {c: "gpu" + "-".join(map(str, c)) for c in coords}
    _gpus(G, [name[c] for c in coords])
    for c in coords:
        for axis, d in enumerate(dims):
            nxt = list(c)
            nxt[axis] = (c[axis] + 1) % d
            if d > 2 or c[axis] == 0:
                add_link(G, name[c], name[tuple(nxt)], capacity, "0.7us")
    return G


def direct_connect(n: int = 8, capacity: float | str = "50GB/s") -> nx.DiGraph:
    """`n` GPUs with a direct link between every pair (a full mesh)."""
    _at_least("n", n, 2)
    G = new_topology(f"direct-connect-{n}", generator="direct-connect")
    names = [f"gpu{i}" for i in range(n)]
    _gpus(G, names)
    for u, v in itertools.combinations(names, 2):
        add_link(G, u, v, capacity, "0.7us")
    return G


def random_fabric(
    gpus: int = 8,
    switches: int = 2,
    extra_links: int = 8,
    capacities: tuple[float, ...] = (25, 50, 100, 300),
    seed: int = 0,
) -> nx.DiGraph:
    """A seeded random heterogeneous fabric: a GPU ring as backbone, `extra_links` random GPU
    pairs, and `switches` switches each joined to a random half of the GPUs. All links are
    bidirectional with capacities drawn from `capacities` (GB/s)."""
    _at_least("gpus", gpus, 2)
    _at_least("switches", switches, 0)
    rng = random.Random(seed)
    G = new_topology(f"random-{gpus}-s{seed}", generator="random", seed=seed)
    names = [f"gpu{i}" for i in range(gpus)]
    _gpus(G, names)
    for i in range(gpus):
        if gpus > 2 or i == 0:
            add_link(G, names[i], names[(i + 1) % gpus], rng.choice(capacities), "0.7us")
    for _ in range(extra_links):
        u, v = rng.sample(names, 2)
        add_link(G, u, v, rng.choice(capacities), "0.7us")
    for s in range(switches):
        sw = f"switch{s}"
        add_node(G, sw, "switch", box=-1, rail=-1)
        for g in rng.sample(names, max(1, gpus // 2)):
            add_link(G, g, sw, rng.choice(capacities), "1us")
    return G
