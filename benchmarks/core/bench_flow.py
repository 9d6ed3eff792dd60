"""Max-flow backends on a 1,024-GPU leaf-spine (128 DGX-A100-like boxes, 8 spines).

Goal (issue 2): the scipy backend is at least 20x faster than networkx on one max-flow.
The flow is the ForestColl feasibility probe: a super-source feeds x* to every GPU and the
sink is one GPU; the network is compiled once per backend, as the algorithms do.
"""

from __future__ import annotations

from datahall.core.flow import SUPER_SOURCE, FlowNetwork, bottleneck_cut
from datahall.core.topologies import leaf_spine
from datahall.core.topology import compute_nodes

from ..goals import Goal, best_time, report


def main() -> None:
    G = leaf_spine(boxes=128, boxes_per_leaf=4, spines=8)
    gpus = compute_nodes(G)
    x = bottleneck_cut(G, gpus).ratio
    caps = {(u, v): c for u, v, c in G.edges(data="capacity")}
    caps |= {(SUPER_SOURCE, g): x for g in gpus}
    sinks = gpus[::128]
    nets = {b: FlowNetwork(caps, G.nodes, backend=b) for b in ("scipy", "networkx")}
    times, values = {}, {}
    for backend, net in nets.items():
        t, flows = best_time(
            lambda net=net: [net.maximum_flow(SUPER_SOURCE, v) for v in sinks],
            repeat=3 if backend == "scipy" else 1,
        )
        times[backend] = t / len(sinks)
        values[backend] = [f.value for f in flows]
    assert values["scipy"] == values["networkx"], "backends disagree"
    speedup = times["networkx"] / times["scipy"]
    report(
        "core",
        "maxflow_1024",
        [
            Goal(
                "scipy max-flow, 1,024-GPU leaf-spine (per call)",
                ">= 20x faster than networkx",
                times["scipy"],
                "s",
                speedup >= 20,
                baseline=times["networkx"],
            ),
        ],
        {
            "nodes": G.number_of_nodes(),
            "arcs": G.number_of_edges() + len(gpus),
            "x_star": x,
            "flow_value": values["scipy"][0],
            "sinks": len(sinks),
            "speedup": speedup,
        },
    )


if __name__ == "__main__":
    main()
