"""Generators of common GPU fabrics, by name.

>>> sorted(GENERATORS)[:3]
['dgx-a100', 'dgx-h100', 'direct-connect']
>>> G = build("dgx-a100", boxes=2)
>>> G.number_of_nodes(), G.number_of_edges()
(36, 96)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import networkx as nx

from ..topology import TopologyError
from .boxes import dgx_a100, dgx_h100, mi250
from .clusters import leaf_spine, rail_optimized
from .simple import direct_connect, random_fabric, ring, torus
from .wan import wan

__all__ = [
    "GENERATORS",
    "build",
    "dgx_a100",
    "dgx_h100",
    "mi250",
    "leaf_spine",
    "rail_optimized",
    "ring",
    "torus",
    "direct_connect",
    "random_fabric",
    "wan",
]

GENERATORS: dict[str, Callable[..., nx.DiGraph]] = {
    "dgx-a100": dgx_a100,
    "dgx-h100": dgx_h100,
    "mi250": mi250,
    "leaf-spine": leaf_spine,
    "rail-optimized": rail_optimized,
    "ring": ring,
    "torus": torus,
    "direct-connect": direct_connect,
    "random": random_fabric,
    "wan": wan,
}


def parameters(name: str) -> dict[str, Any]:
    """The keyword parameters of generator `name` with their defaults."""
    sig = inspect.signature(_generator(name))
    return {p.name: p.default for p in sig.parameters.values()}


def _generator(name: str) -> Callable[..., nx.DiGraph]:
    try:
        return GENERATORS[name]
    except KeyError:
        raise TopologyError(
            f"unknown topology {name!r}; choose one of {', '.join(sorted(GENERATORS))} "
            "(see `datahall topology list`) or pass a file"
        ) from None


def build(name: str, /, **params: Any) -> nx.DiGraph:
    """Build the topology `name` with generator keyword arguments; unknown names or parameters
    raise :class:`TopologyError` naming the choices."""
    gen = _generator(name)
    known = parameters(name)
    for key in params:
        if key not in known:
            raise TopologyError(
                f"topology {name!r} has no parameter {key!r}; it takes {', '.join(known) or 'none'}"
            )
    return gen(**params)
