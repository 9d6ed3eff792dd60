"""Pictures of a schedule's trees: one panel per tree of a root, drawn top-down from the root."""

from __future__ import annotations

import math
from pathlib import Path

import networkx as nx

from ..core.report import new_figure, save_figure
from .schedule import Schedule, Tree

__all__ = ["tree_layout", "draw_trees"]


def tree_layout(tree: Tree) -> dict[str, tuple[float, float]]:
    """Root on top, each depth a row, children centred under their parent's span of leaves."""
    children = tree.children()
    width: dict[str, int] = {}

    def leaves(n: str) -> int:
        width[n] = sum(leaves(c) for c in children.get(n, [])) or 1
        return width[n]

    leaves(tree.root)
    pos: dict[str, tuple[float, float]] = {}

    def place(n: str, left: float, depth: int) -> None:
        pos[n] = (left + width[n] / 2, -depth)
        for c in children.get(n, []):
            place(c, left, depth + 1)
            left += width[c]

    place(tree.root, 0.0, 0)
    return pos


def _short(node: str) -> str:
    return node.replace("box", "b").replace("/gpu", ".").replace("/gcd", ".")


def draw_trees(
    schedule: Schedule, path: str | Path, root: str | None = None, limit: int = 9
) -> Path:
    """Draw up to `limit` trees of `root` (default: the first root) of the schedule's last phase.

    Edge labels count the switches a tree arc crosses (its physical path's inner nodes).
    """
    phase = schedule.phases[-1]
    root = root or phase.roots()[0]
    trees = [t for t in phase.trees if t.root == root][:limit]
    if not trees:
        raise ValueError(
            f"no tree is rooted at {root!r}; roots are {', '.join(phase.roots()[:4])}..."
        )
    cols = min(3, len(trees))
    rows = math.ceil(len(trees) / cols)
    fig, _ = new_figure(5 * cols, 3.6 * rows)
    fig.clf()  # one panel per tree, added below
    for i, tree in enumerate(trees):
        ax = fig.add_subplot(rows, cols, i + 1)
        T = nx.DiGraph()
        T.add_nodes_from(tree.nodes())
        T.add_edges_from((a.parent, a.child, {"hops": len(a.path) - 2}) for a in tree.arcs)
        pos = tree_layout(tree)
        nx.draw_networkx(
            T,
            pos,
            ax=ax,
            node_size=320,
            font_size=6,
            arrows=True,
            labels={n: _short(n) for n in T},
            node_color=["#c44e52" if n == root else "#4c72b0" for n in T],
            font_color="white",
        )
        nx.draw_networkx_edge_labels(
            T,
            pos,
            ax=ax,
            font_size=5,
            edge_labels={(u, v): d["hops"] for u, v, d in T.edges(data=True) if d["hops"]},
        )
        ax.set_title(f"tree {tree.index}: x{tree.multiplicity}, height {tree.height()}", fontsize=8)
        ax.axis("off")
    fig.suptitle(
        f"ForestColl {phase.kind} trees of {_short(root)} on {schedule.topology} "
        f"(k = {schedule.k}; edge label = switches crossed)",
        fontsize=9,
    )
    return save_figure(fig, path)
