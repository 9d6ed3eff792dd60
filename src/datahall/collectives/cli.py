"""``datahall collectives``: bound, plan, simulate, compare, lint and draw collective schedules."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import networkx as nx
import typer

from ..core.cli import emit_json, resolve_topology
from ..core.report import console, err_console, print_table
from ..core.topology import TopologyError, egress
from ..core.units import format_bytes, parse_bytes
from .baselines import BASELINES
from .bound import fixed_k_bound, optimal_bound
from .compare import DEFAULT_SIZES, compare, draw_compare
from .draw import draw_trees
from .export import save_schedule, to_forestcoll_xml
from .msccl import lint_msccl_xml, to_msccl_xml
from .mscclpp import to_mscclpp_json
from .plan import achieved_algbw, degrade, plan
from .schedule import COLLECTIVES, Schedule
from .simulate import LINKS, simulate

app = typer.Typer(
    help="ForestColl: throughput-optimal collective schedules for any GPU fabric.",
    no_args_is_help=True,
)


class Format(StrEnum):
    json = "json"
    msccl = "msccl"
    mscclpp = "mscclpp"
    forestcoll = "forestcoll-xml"


Topology = Annotated[
    str | None,
    typer.Option("--topology", "-t", help="generator name (`datahall topology list`)"),
]
TopologyFile = Annotated[
    Path | None, typer.Option("--topology-file", "-f", help="topology file (.json/.yaml/.graphml)")
]
Boxes = Annotated[int | None, typer.Option("--boxes", "-b", help="boxes, for box generators")]
Params = Annotated[
    list[str] | None, typer.Option("--param", "-p", help="generator parameter KEY=VALUE")
]
CollectiveOpt = Annotated[
    str,
    typer.Option(
        "--collective", "-c", help="allgather, reduce_scatter, allreduce, broadcast, reduce"
    ),
]
FixedK = Annotated[
    int | None,
    typer.Option("--fixed-k", help="trees per root (1 for MSCCL XML); default: optimal k"),
]
Root = Annotated[str | None, typer.Option("--root", help="root node, for broadcast and reduce")]
FailLink = Annotated[
    list[str] | None,
    typer.Option("--fail-link", help="A,B: re-plan without the link between A and B (repeatable)"),
]
Json = Annotated[bool, typer.Option("--json", help="print the result as JSON")]


def _fabric(
    topology: str | None,
    topology_file: Path | None,
    boxes: int | None,
    params: list[str] | None,
    fail_links: list[str] | None = None,
) -> nx.DiGraph:
    if (topology is None) == (topology_file is None):
        raise TopologyError("give exactly one of --topology NAME or --topology-file FILE")
    if topology_file is not None:
        G = resolve_topology(str(topology_file))
    else:
        G = resolve_topology(topology, boxes, params)
    return degrade(G, fail_links) if fail_links else G


def _collective(name: str) -> str:
    name = name.replace("-", "_")
    if name not in COLLECTIVES:
        raise ValueError(f"unknown collective {name!r}; choose one of {', '.join(COLLECTIVES)}")
    return name


@app.command()
def bound(
    topology: Topology = None,
    topology_file: TopologyFile = None,
    boxes: Boxes = None,
    param: Params = None,
    collective: CollectiveOpt = "allgather",
    fixed_k: FixedK = None,
    root: Root = None,
    fail_link: FailLink = None,
    as_json: Json = False,
) -> None:
    """The optimal throughput x* (exact), algbw, the bottleneck cut and the tree slots (U, k)."""
    G = _fabric(topology, topology_file, boxes, param, fail_link)
    coll = _collective(collective)
    b = optimal_bound(G, coll, root)
    fk = fixed_k_bound(G, fixed_k, coll, root) if fixed_k else None
    gpus = {n for n, kind in G.nodes(data="kind") if kind == "gpu"}
    data = {
        "topology": G.graph.get("name"),
        "collective": coll,
        "x_star": str(b.x_star),
        "x_star_GBps": float(b.x_star),
        "algbw_GBps": float(b.algbw),
        "U": str(b.U),
        "k": b.k,
        "bottleneck_cut": sorted(map(str, b.cut)),
        "cut_compute_nodes": len(gpus & b.cut),
        "cut_exit_GBps": float(egress(G.reverse() if b.transposed else G, b.cut)),
    }
    if fk:
        data |= {"fixed_k": fixed_k, "fixed_k_U": str(fk.U), "fixed_k_algbw_GBps": float(fk.algbw)}
    if as_json:
        emit_json(data)
        return
    rows = [
        ["x* (per compute node)", f"{data['x_star']} = {data['x_star_GBps']:.4g} GB/s"],
        ["optimal algbw", f"{data['algbw_GBps']:.6g} GB/s"],
        ["tree slots (U, k)", f"U = {data['U']}, k = {data['k']}"],
        [
            "bottleneck cut",
            f"{data['cut_compute_nodes']} compute nodes (+{len(b.cut) - data['cut_compute_nodes']}"
            f" others) leaving {data['cut_exit_GBps']:.6g} GB/s",
        ],
    ]
    if fk:
        rows.append(
            [
                f"best with k = {fixed_k}",
                f"{data['fixed_k_algbw_GBps']:.6g} GB/s (U = {data['fixed_k_U']})",
            ]
        )
    print_table(f"{coll} on {data['topology']}", ["quantity", "value"], rows)


def _summary(G: nx.DiGraph, s: Schedule) -> dict:
    achieved = achieved_algbw(G, s)
    return {
        "topology": s.topology,
        "collective": s.collective,
        "k": s.k,
        "U": str(s.U),
        "algbw_GBps": float(s.algbw),
        "achieved_algbw_GBps": float(achieved),
        "optimal": achieved == s.algbw,
        "trees": sum(len(p.trees) for p in s.phases),
        "max_height": s.meta.get("max_height"),
        "symmetry": s.meta.get("symmetry"),
        "seconds": round(s.meta["timings_s"]["total"], 3),
        "optimal_algbw_GBps": s.meta.get("optimal_algbw_GBps"),
    }


@app.command("plan")
def plan_cmd(
    topology: Topology = None,
    topology_file: TopologyFile = None,
    boxes: Boxes = None,
    param: Params = None,
    collective: CollectiveOpt = "allgather",
    fixed_k: FixedK = None,
    root: Root = None,
    fail_link: FailLink = None,
    fmt: Annotated[Format, typer.Option("--format", help="output format")] = Format.json,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="file to write")] = None,
    as_json: Json = False,
) -> None:
    """Plan the optimal schedule and export it (schedule JSON, MSCCL XML, MSCCL++ JSON, tree XML)."""
    G = _fabric(topology, topology_file, boxes, param, fail_link)
    if fmt == Format.msccl and fixed_k is None:
        fixed_k = 1
        err_console.print("MSCCL XML needs one tree per root: planning with --fixed-k 1")
    s = plan(G, _collective(collective), fixed_k=fixed_k, root=root)
    ext = {"json": "json", "msccl": "xml", "mscclpp": "json", "forestcoll-xml": "xml"}[fmt.value]
    out = out or Path(f"{s.topology}-{s.collective}-{fmt.value}.{ext}")
    if fmt == Format.json:
        save_schedule(s, out)
    elif fmt == Format.msccl:
        out.write_text(to_msccl_xml(s, topology=G))
    elif fmt == Format.mscclpp:
        out.write_text(json.dumps(to_mscclpp_json(s), indent=1) + "\n")
    else:
        out.write_text(to_forestcoll_xml(s))
    summary = _summary(G, s) | {"written": str(out)}
    if as_json:
        emit_json(summary)
        return
    print_table(
        f"ForestColl {s.collective} on {s.topology}",
        ["quantity", "value"],
        [[k, v] for k, v in summary.items()],
    )


@app.command("simulate")
def simulate_cmd(
    topology: Topology = None,
    topology_file: TopologyFile = None,
    boxes: Boxes = None,
    param: Params = None,
    collective: CollectiveOpt = "allgather",
    fixed_k: FixedK = None,
    root: Root = None,
    fail_link: FailLink = None,
    size: Annotated[str, typer.Option("--size", "-s", help="message size, e.g. 1GiB")] = "1GiB",
    algorithm: Annotated[
        str,
        typer.Option("--algorithm", "-a", help=f"forestcoll or a baseline: {', '.join(BASELINES)}"),
    ] = "forestcoll",
    link: Annotated[
        str,
        typer.Option(
            "--link", help="edf (earliest deadline first), fifo or ps (processor sharing)"
        ),
    ] = "edf",
    as_json: Json = False,
) -> None:
    """Simulate one collective chunk by chunk (alpha-beta links, store-and-forward switches)."""
    G = _fabric(topology, topology_file, boxes, param, fail_link)
    coll = _collective(collective)
    M = float(parse_bytes(size))
    if link not in LINKS:
        raise ValueError(f"unknown link model {link!r}; use one of {', '.join(LINKS)}")
    s = _schedule(G, algorithm, coll, fixed_k, root)
    r = simulate(s, G, M, link=link)
    best = optimal_bound(G, coll, root).algbw
    data = {
        "algorithm": algorithm,
        "collective": coll,
        "topology": s.topology,
        "size_bytes": M,
        "time_s": r.time,
        "algbw_GBps": r.algbw,
        "busbw_GBps": r.busbw,
        "optimal_algbw_GBps": float(best),
        "fraction_of_optimal": r.algbw / float(best),
        "chunks": r.chunks,
        "transfers": r.transfers,
        "wall_s": r.wall,
    }
    if as_json:
        emit_json(data)
        return
    print_table(
        f"{algorithm} {coll} on {s.topology}, {format_bytes(M)}",
        ["quantity", "value"],
        [[k, v] for k, v in data.items()],
    )


def _schedule(G: nx.DiGraph, algorithm: str, coll: str, fixed_k: int | None, root: str | None):
    if algorithm == "forestcoll":
        return plan(G, coll, fixed_k=fixed_k, root=root)
    if algorithm not in BASELINES:
        raise ValueError(
            f"unknown algorithm {algorithm!r}; choose forestcoll or one of {', '.join(BASELINES)}"
        )
    kwargs = {"root": root} if root else {}
    return BASELINES[algorithm](G, coll, **kwargs)


@app.command("compare")
def compare_cmd(
    topology: Topology = None,
    topology_file: TopologyFile = None,
    boxes: Boxes = None,
    param: Params = None,
    collective: CollectiveOpt = "allgather",
    fail_link: FailLink = None,
    simulated: Annotated[
        bool, typer.Option("--simulate", help="use the chunk simulator (slower) not the evaluator")
    ] = False,
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG of algbw vs size")] = Path(
        "compare.png"
    ),
    as_json: Json = False,
) -> None:
    """algbw vs message size (1 KiB .. 8 GiB) for ForestColl and the baselines; draws the curve."""
    G = _fabric(topology, topology_file, boxes, param, fail_link)
    result = compare(G, _collective(collective), DEFAULT_SIZES, simulated=simulated)
    png = draw_compare(result, out)
    if as_json:
        emit_json(result | {"figure": str(png)})
        return
    algos = list(result["algbw_GBps"])
    rows = [
        [format_bytes(M), *(f"{result['algbw_GBps'][a][i]:.4g}" for a in algos)]
        for i, M in enumerate(result["sizes"])
    ]
    print_table(
        f"{result['collective']} algbw (GB/s) on {result['topology']}", ["size", *algos], rows
    )
    console.print(f"optimal algbw {result['optimal_algbw_GBps']:.6g} GB/s; figure: {png}")


@app.command()
def lint(
    file: Annotated[Path, typer.Argument(help="MSCCL XML file")],
    as_json: Json = False,
) -> None:
    """Find the reasons MSCCL would silently ignore an algorithm XML file. Exit 1 on errors."""
    if not file.exists():
        raise FileNotFoundError(f"{file}: no such file")
    findings = lint_msccl_xml(file)
    if as_json:
        emit_json(findings)
    elif findings:
        print_table(
            f"{file}",
            ["severity", "where", "message"],
            [[f.severity, f.where, f.message] for f in findings],
        )
    else:
        console.print(f"{file}: no problems found")
    if any(f.severity == "error" for f in findings):
        raise typer.Exit(1)


@app.command()
def draw(
    topology: Topology = None,
    topology_file: TopologyFile = None,
    boxes: Boxes = None,
    param: Params = None,
    collective: CollectiveOpt = "allgather",
    fixed_k: FixedK = None,
    root: Root = None,
    fail_link: FailLink = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG to write")] = Path("trees.png"),
) -> None:
    """Draw the trees of one root (default: the first compute node) to a PNG."""
    G = _fabric(topology, topology_file, boxes, param, fail_link)
    coll = _collective(collective)
    s = plan(G, coll, fixed_k=fixed_k, root=root if coll in ("broadcast", "reduce") else None)
    console.print(f"wrote {draw_trees(s, out, root=root)}")
