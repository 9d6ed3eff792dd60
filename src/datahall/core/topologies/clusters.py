"""Multi-box clusters: a two-tier leaf-spine fabric and a rail-optimized fabric.

Both put 8-GPU NVSwitch boxes (A100 numbers by default) behind their NICs. In the leaf-spine
fabric a box's NICs all go to its leaf; in the rail-optimized one NIC i of every box goes to rail
switch i, so same-rail traffic crosses one switch. Spine links carry the leaves' downlink
bandwidth divided by `oversubscription`.
"""

from __future__ import annotations

import math

import networkx as nx

from ..topology import TopologyError, add_link, add_node, new_topology
from ..units import GB, exact, parse_bandwidth

__all__ = ["leaf_spine", "rail_optimized"]


def _box(G: nx.DiGraph, a: int, gpus: int, nvlink: float | str, nic: float | str) -> list[str]:
    """Add box `a` (GPUs, NVSwitch when gpus > 1, one NIC per GPU); return its NICs."""
    nics = []
    if gpus > 1:
        add_node(G, f"box{a}/nvswitch", "nvswitch", box=a, rail=-1)
    for i in range(gpus):
        gpu, nic_node = f"box{a}/gpu{i}", f"box{a}/nic{i}"
        add_node(G, gpu, "gpu", box=a, rail=i)
        add_node(G, nic_node, "nic", box=a, rail=i)
        if gpus > 1:
            add_link(G, gpu, f"box{a}/nvswitch", nvlink, "0.7us")
        add_link(G, gpu, nic_node, nic, "1us")
        nics.append(nic_node)
    return nics


def _check(boxes: int, gpus_per_box: int, oversubscription: float, spines: int) -> None:
    for name, value in [("boxes", boxes), ("gpus_per_box", gpus_per_box)]:
        if not isinstance(value, int) or value < 1:
            raise TopologyError(f"{name} must be a positive integer, got {value!r}")
    if oversubscription <= 0:
        raise TopologyError(f"oversubscription must be > 0, got {oversubscription}")
    if spines < 1:
        raise TopologyError(f"spines must be >= 1, got {spines}")


def _uplinks(G, lower: list[str], spines: int, down_bw, oversubscription: float) -> None:
    """Join each switch in `lower` to every spine, each uplink carrying down_bw/(o·spines)."""
    for s in range(spines):
        add_node(G, f"spine{s}", "spine", box=-1, rail=-1)
    up = exact(down_bw) / exact(oversubscription) / spines
    for sw in lower:
        for s in range(spines):
            add_link(G, sw, f"spine{s}", up, "1us")


def leaf_spine(
    boxes: int = 8,
    gpus_per_box: int = 8,
    boxes_per_leaf: int = 4,
    spines: int = 4,
    oversubscription: float = 1.0,
    nvlink: float | str = "300GB/s",
    nic: float | str = "200Gb/s",
) -> nx.DiGraph:
    """Two-tier leaf-spine: `boxes_per_leaf` boxes per leaf switch, every leaf to every spine.

    >>> G = leaf_spine(boxes=128, boxes_per_leaf=4, spines=8)
    >>> sum(1 for _, k in G.nodes(data="kind") if k == "gpu")
    1024
    """
    _check(boxes, gpus_per_box, oversubscription, spines)
    G = new_topology(f"leaf-spine-{boxes * gpus_per_box}", generator="leaf-spine", boxes=boxes)
    nic_bw = parse_bandwidth(nic) / GB if isinstance(nic, str) else exact(nic)
    leaves = math.ceil(boxes / boxes_per_leaf)
    for leaf in range(leaves):
        add_node(G, f"leaf{leaf}", "leaf", box=-1, rail=-1)
    for a in range(boxes):
        for nic_node in _box(G, a, gpus_per_box, nvlink, nic):
            add_link(G, nic_node, f"leaf{a // boxes_per_leaf}", nic, "1us")
    if leaves > 1:
        down = nic_bw * gpus_per_box * boxes_per_leaf
        _uplinks(G, [f"leaf{i}" for i in range(leaves)], spines, down, oversubscription)
    return G


def rail_optimized(
    boxes: int = 8,
    gpus_per_box: int = 8,
    boxes_per_group: int | None = None,
    spines: int = 4,
    oversubscription: float = 1.0,
    nvlink: float | str = "300GB/s",
    nic: float | str = "200Gb/s",
) -> nx.DiGraph:
    """Rail-optimized: NIC i of every box in a group joins rail switch i of that group; with
    several groups (`boxes_per_group` < boxes) every rail switch also joins every spine.

    >>> G = rail_optimized(boxes=4)
    >>> sorted(G.successors("box2/nic5"))
    ['box2/gpu5', 'group0/rail5']
    """
    boxes_per_group = boxes_per_group or boxes
    _check(boxes, gpus_per_box, oversubscription, spines)
    G = new_topology(
        f"rail-optimized-{boxes * gpus_per_box}", generator="rail-optimized", boxes=boxes
    )
    nic_bw = parse_bandwidth(nic) / GB if isinstance(nic, str) else exact(nic)
    groups = math.ceil(boxes / boxes_per_group)
    rails = [f"group{g}/rail{i}" for g in range(groups) for i in range(gpus_per_box)]
    for g in range(groups):
        for i in range(gpus_per_box):
            add_node(G, f"group{g}/rail{i}", "leaf", box=-1, rail=i)
    for a in range(boxes):
        for i, nic_node in enumerate(_box(G, a, gpus_per_box, nvlink, nic)):
            add_link(G, nic_node, f"group{a // boxes_per_group}/rail{i}", nic, "1us")
    if groups > 1:
        _uplinks(G, rails, spines, nic_bw * boxes_per_group, oversubscription)
    return G
