"""CLI pieces every system shares: topology options, ``--json`` output, and ``datahall topology``."""

from __future__ import annotations

import ast
import json
import math
import sys
from pathlib import Path
from typing import Annotated, Any

import networkx as nx
import typer

from . import topologies
from .flow import bottleneck_cut
from .report import console, jsonable, new_figure, print_table, save_figure
from .topology import TopologyError, compute_nodes, egress, ingress, load, to_dict

__all__ = [
    "app",
    "TopologyArg",
    "BoxesOpt",
    "ParamOpt",
    "resolve_topology",
    "emit_json",
]

app = typer.Typer(
    help="Fabric topologies: list the generators, show or draw one.", no_args_is_help=True
)

TopologyArg = Annotated[
    str,
    typer.Argument(
        help="a generator name (see `datahall topology list`) or a .json/.yaml/.graphml file"
    ),
]
BoxesOpt = Annotated[
    int | None, typer.Option("--boxes", "-b", help="number of boxes, for box generators")
]
ParamOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--param", "-p", help="generator parameter KEY=VALUE (repeatable), e.g. -p rails=8"
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print the result as JSON")]


def parse_params(name: str, items: list[str] | None) -> dict[str, Any]:
    """Turn ``KEY=VALUE`` strings into generator keyword arguments (numbers, tuples and strings)."""
    known = topologies.parameters(name)
    params: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise TopologyError(f"bad --param {item!r}: write KEY=VALUE, e.g. -p rails=8")
        if key not in known:
            raise TopologyError(
                f"topology {name!r} has no parameter {key!r}; it takes {', '.join(known)}"
            )
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw  # a string such as "25GB/s"
        default = known[key]
        wanted = {int: int, float: (int, float), bool: bool, tuple: (tuple, list)}.get(
            type(default)
        )
        if wanted and not isinstance(value, wanted):
            raise TopologyError(
                f"--param {key}={raw}: expected {type(default).__name__} like {default!r}"
            )
        params[key] = value
    return params


def resolve_topology(
    topology: str, boxes: int | None = None, params: list[str] | None = None
) -> nx.DiGraph:
    """A generator name with its options, or a topology file: the user's fabric, validated."""
    path = Path(topology)
    if path.suffix.lower() in (".json", ".yaml", ".yml", ".graphml") or path.exists():
        if boxes is not None or params:
            raise TopologyError(f"{topology}: --boxes/--param apply to generators, not files")
        return load(path)
    kwargs = parse_params(topology, params)
    if boxes is not None:
        kwargs["boxes"] = boxes
    G = topologies.build(topology, **kwargs)
    from .topology import validate

    validate(G)
    return G


def emit_json(data: Any) -> None:
    """Print `data` as JSON on stdout (for ``--json``)."""
    sys.stdout.write(json.dumps(jsonable(data), indent=2) + "\n")


@app.command("list")
def list_cmd(as_json: JsonOpt = False) -> None:
    """List the topology generators and their parameters."""
    rows = []
    for name, gen in sorted(topologies.GENERATORS.items()):
        doc = (gen.__doc__ or "").strip().splitlines()[0]
        params = ", ".join(f"{k}={v}" for k, v in topologies.parameters(name).items())
        rows.append([name, doc, params])
    if as_json:
        emit_json([{"name": n, "description": d, "parameters": p} for n, d, p in rows])
    else:
        print_table("topology generators", ["name", "description", "parameters"], rows)


def describe(G: nx.DiGraph) -> dict[str, Any]:
    """Nodes with their exit/entry bandwidth, links, and the bottleneck cut of the compute nodes."""
    gpus = compute_nodes(G)
    nodes = [
        {"id": n, "kind": k, "egress_GBps": egress(G, [n]), "ingress_GBps": ingress(G, [n])}
        for n, k in G.nodes(data="kind")
    ]
    summary: dict[str, Any] = {
        "name": G.graph.get("name"),
        "nodes": G.number_of_nodes(),
        "arcs": G.number_of_edges(),
        "compute_nodes": len(gpus),
    }
    if len(gpus) > 1:
        b = bottleneck_cut(G, gpus)
        summary |= {
            "min_cut_exit_bandwidth_per_compute_node_GBps": b.ratio,
            "bottleneck_cut_compute_nodes": sum(1 for n in b.cut if n in set(gpus)),
            "bottleneck_cut_exit_GBps": egress(G, b.cut),
            "bottleneck_cut": sorted(b.cut),
        }
    return {"summary": summary, "nodes": nodes, "links": to_dict(G)["links"]}


@app.command()
def show(
    topology: TopologyArg,
    boxes: BoxesOpt = None,
    param: ParamOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print a topology's nodes, links and capacities, and its bottleneck cut: the minimum over
    cuts S of the exit bandwidth B+(S) per compute node inside S."""
    G = resolve_topology(topology, boxes, param)
    info = describe(G)
    if as_json:
        emit_json(info)
        return
    print_table(
        f"{G.graph.get('name')}: nodes",
        ["node", "kind", "egress GB/s", "ingress GB/s"],
        [[n["id"], n["kind"], n["egress_GBps"], n["ingress_GBps"]] for n in info["nodes"]],
    )
    print_table(
        "links (GB/s)",
        ["source", "target", "capacity", "latency (us)", "both ways"],
        [
            [
                lk["source"],
                lk["target"],
                lk["capacity"],
                lk.get("latency", 0) * 1e6,
                "no" if lk.get("bidirectional") is False else "yes",
            ]
            for lk in info["links"]
        ],
    )
    s = info["summary"]
    lines = [f"{s['nodes']} nodes, {s['arcs']} arcs, {s['compute_nodes']} compute nodes"]
    if "bottleneck_cut" in s:
        x = s["min_cut_exit_bandwidth_per_compute_node_GBps"]
        lines.append(
            f"min over cuts of exit bandwidth per compute node: {float(x):.4g} GB/s (= {x}); "
            f"bottleneck cut: {s['bottleneck_cut_compute_nodes']} compute nodes leaving "
            f"{float(s['bottleneck_cut_exit_GBps']):.4g} GB/s"
        )
    console.print("\n".join(lines))


_LAYER = {"gpu": 0, "nic": 1, "nvswitch": 1, "host": 1, "tor": 2, "leaf": 2, "switch": 2,
          "ib": 2, "mpd": 2, "roadm": 3, "spine": 3}  # fmt: skip
_COLOR = {0: "#4c72b0", 1: "#55a868", 2: "#dd8452", 3: "#c44e52"}


def _layout(G: nx.DiGraph) -> dict[str, tuple[float, float]]:
    """GPUs of each box on a circle, boxes side by side; other nodes in rows above by layer, so
    direct GPU-GPU links (MI250 xGMI, rings) stay visible."""
    boxes: dict[int, list[str]] = {}
    for n in compute_nodes(G):
        boxes.setdefault(int(G.nodes[n].get("box", 0)), []).append(n)
    pos: dict[str, tuple[float, float]] = {}
    for col, members in enumerate(boxes[b] for b in sorted(boxes)):
        for i, n in enumerate(members):
            angle = 2 * math.pi * i / len(members)
            pos[n] = (3.0 * col + math.cos(angle), math.sin(angle))
    width = 3.0 * max(len(boxes) - 1, 0)
    column = {b: col for col, b in enumerate(sorted(boxes))}
    rows: dict[int, list[str]] = {}
    for n, k in G.nodes(data="kind"):
        if k == "nvswitch" and G.nodes[n].get("box") in column:
            pos[n] = (3.0 * column[G.nodes[n]["box"]], 0.0)  # the hub of its box's circle
        elif n not in pos:
            rows.setdefault(_LAYER.get(k, 2), []).append(n)
    for layer, members in rows.items():
        for i, n in enumerate(members):
            x = width * (i + 0.5) / len(members) if width else i - (len(members) - 1) / 2
            pos[n] = (x, 1.0 + 1.6 * layer)
    return pos


def draw_topology(G: nx.DiGraph, path: Path) -> Path:
    """Draw `G` to a PNG: boxes of GPUs as circles, switches in rows above, width ∝ capacity."""
    H = G.to_undirected()
    pos = _layout(G)
    fig, ax = new_figure(max(7, min(24, 2.2 * len({p[0] // 3 for p in pos.values()}))), 5)
    caps = [float(c) for _, _, c in H.edges(data="capacity")]
    top = max(caps, default=1)
    nx.draw_networkx_edges(H, pos, ax=ax, width=[0.4 + 2.6 * c / top for c in caps], alpha=0.45)
    nx.draw_networkx_nodes(
        H,
        pos,
        ax=ax,
        node_size=60 if len(H) > 100 else 200,
        node_color=[_COLOR[_LAYER.get(k, 2)] for _, k in H.nodes(data="kind")],
    )
    if len(H) <= 80:
        labels = {n: n.split("/")[-1] for n in H}
        nx.draw_networkx_labels(H, pos, ax=ax, labels=labels, font_size=6)
    ax.set_title(f"{G.graph.get('name')}: edge width proportional to capacity")
    ax.axis("off")
    return save_figure(fig, path)


@app.command()
def draw(
    topology: TopologyArg,
    boxes: BoxesOpt = None,
    param: ParamOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG file to write")] = Path(
        "topology.png"
    ),
) -> None:
    """Draw a topology to a PNG file."""
    G = resolve_topology(topology, boxes, param)
    console.print(f"wrote {draw_topology(G, out)}")
