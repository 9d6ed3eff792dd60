"""GPU boxes: NVIDIA DGX A100 / H100 and AMD MI250, alone or joined by InfiniBand.

Constants follow the ForestColl brief (``shared/papers/forestcoll.md`` §3): an A100 GPU has
300 GB/s to its box's NVSwitch and a 25 GB/s (200 Gb/s) NIC; NICs join IB switches by rail. The
H100 numbers (450 GB/s NVLink per direction, 400 Gb/s NICs) are not verified by the brief, so they
are parameters.
"""

from __future__ import annotations

import networkx as nx

from ..topology import TopologyError, add_link, add_node, new_topology

__all__ = ["dgx_a100", "dgx_h100", "mi250", "MI250_LINKS"]

# Undirected GCD pairs (i, j, multiplicity) of one MI250 box; each multiplicity is 50 GB/s.
MI250_LINKS = [
    (0, 1, 4), (0, 4, 2), (0, 8, 1), (1, 5, 1), (1, 9, 1), (1, 10, 1), (2, 3, 4), (2, 6, 1),
    (2, 9, 1), (2, 10, 1), (3, 7, 2), (3, 11, 1), (4, 5, 4), (4, 6, 1), (5, 6, 1), (5, 7, 1),
    (6, 7, 4), (8, 9, 4), (8, 12, 2), (9, 13, 1), (10, 11, 4), (10, 14, 1), (11, 15, 2),
    (12, 13, 4), (12, 14, 1), (13, 14, 1), (13, 15, 1), (14, 15, 4),
]  # fmt: skip


def _check_boxes(boxes: int) -> None:
    if not isinstance(boxes, int) or boxes < 1:
        raise TopologyError(f"boxes must be a positive integer, got {boxes!r}")


def _nvswitch_box(
    name: str,
    boxes: int,
    gpus: int,
    nvlink: float | str,
    nic: float | str,
    rails: int,
    nvlink_latency: str,
    nic_latency: str,
) -> nx.DiGraph:
    """Boxes of `gpus` GPUs on one NVSwitch each; with several boxes, GPU i has NIC i, and NIC i
    joins IB switch ``ib{i mod rails}``."""
    _check_boxes(boxes)
    if rails < 1:
        raise TopologyError(f"rails must be >= 1, got {rails}")
    G = new_topology(f"{name}x{boxes}", generator=name, boxes=boxes)
    if boxes > 1:
        for r in range(min(rails, gpus)):
            add_node(G, f"ib{r}", "ib", box=-1, rail=r)
    for a in range(boxes):
        sw = f"box{a}/nvswitch"
        add_node(G, sw, "nvswitch", box=a, rail=-1)
        for i in range(gpus):
            gpu = f"box{a}/gpu{i}"
            add_node(G, gpu, "gpu", box=a, rail=i)
            add_link(G, gpu, sw, nvlink, nvlink_latency)
            if boxes > 1:
                nic_node = f"box{a}/nic{i}"
                add_node(G, nic_node, "nic", box=a, rail=i)
                add_link(G, gpu, nic_node, nic, nic_latency)
                add_link(G, nic_node, f"ib{i % rails}", nic, nic_latency)
    return G


def dgx_a100(
    boxes: int = 1,
    nvlink: float | str = "300GB/s",
    nic: float | str = "200Gb/s",
    rails: int = 2,
    nvlink_latency: str = "0.7us",
    nic_latency: str = "1.5us",
) -> nx.DiGraph:
    """NVIDIA DGX A100 boxes: 8 GPUs on an NVSwitch (300 GB/s each), 8 NICs of 25 GB/s.

    `rails` IB switches join the NICs (NIC i to switch i mod rails). The default 2 matches the
    ForestColl reference cluster (an odd and an even rail); ``rails=8`` is fully rail-matched.
    """
    return _nvswitch_box("dgx-a100", boxes, 8, nvlink, nic, rails, nvlink_latency, nic_latency)


def dgx_h100(
    boxes: int = 1,
    nvlink: float | str = "450GB/s",
    nic: float | str = "400Gb/s",
    rails: int = 8,
    nvlink_latency: str = "0.7us",
    nic_latency: str = "1.5us",
) -> nx.DiGraph:
    """NVIDIA DGX H100 boxes: 8 GPUs on NVSwitch (450 GB/s per direction) and 8 NICs of
    400 Gb/s, one rail-matched IB switch per NIC index by default. Bandwidths are parameters
    because the brief could not verify them."""
    return _nvswitch_box("dgx-h100", boxes, 8, nvlink, nic, rails, nvlink_latency, nic_latency)


def mi250(
    boxes: int = 1,
    xgmi: float | str = "50GB/s",
    ib: float | str = "16GB/s",
    xgmi_latency: str = "0.7us",
    ib_latency: str = "1.5us",
) -> nx.DiGraph:
    """AMD MI250 boxes: 16 GCDs on the xGMI mesh of `MI250_LINKS` (multiplicity × 50 GB/s);
    with several boxes every GCD also links to one IB switch at 16 GB/s."""
    _check_boxes(boxes)
    G = new_topology(f"mi250x{boxes}", generator="mi250", boxes=boxes)
    if boxes > 1:
        add_node(G, "ib", "ib", box=-1, rail=-1)
    for a in range(boxes):
        for i in range(16):
            add_node(G, f"box{a}/gcd{i}", "gpu", box=a, rail=i)
        for i, j, m in MI250_LINKS:
            for _ in range(m):
                add_link(G, f"box{a}/gcd{i}", f"box{a}/gcd{j}", xgmi, xgmi_latency)
        if boxes > 1:
            for i in range(16):
                add_link(G, f"box{a}/gcd{i}", "ib", ib, ib_latency)
    return G
