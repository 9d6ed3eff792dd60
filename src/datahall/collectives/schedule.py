"""The data model of a collective schedule: trees of compute nodes, each arc a physical path.

A :class:`Schedule` is what the planner produces and what the exporters, the evaluators and the
CLI consume. It holds one or two :class:`Phase` s:

- ``broadcast`` phase: out-trees; data flows from the root down, parent → child.
- ``reduce`` phase: in-trees; data flows from the leaves up, child → parent, reduced on the way.

allgather = one broadcast phase with k trees per root; reduce_scatter = one reduce phase with k
trees per root; allreduce = reduce then broadcast; broadcast / reduce = one phase, one root.

How much data a tree moves: a phase's M bytes (the collective's output size M for allgather,
reduce_scatter and allreduce; the buffer for broadcast/reduce) are split evenly among the
phase's roots, and a root's part among its trees by multiplicity/k (see
:meth:`Schedule.tree_bytes`). With N roots that is the per-shard M/N of ForestColl; NCCL's double
binary tree is two roots with M/2 each.

Every :class:`TreeArc` carries the physical ``path`` the data takes, in the direction it moves,
from the sending compute node through switches to the receiving one.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Literal

__all__ = ["Collective", "COLLECTIVES", "TreeArc", "Tree", "Phase", "Schedule"]

Collective = Literal["allgather", "reduce_scatter", "allreduce", "broadcast", "reduce"]
COLLECTIVES: tuple[str, ...] = ("allgather", "reduce_scatter", "allreduce", "broadcast", "reduce")


@dataclass(frozen=True)
class TreeArc:
    """Tree arc parent → child; `path` is the physical node sequence in the data's direction
    (parent … child in a broadcast phase, child … parent in a reduce phase)."""

    parent: str
    child: str
    path: tuple[str, ...]


@dataclass(frozen=True)
class Tree:
    """A spanning arborescence of the compute nodes rooted at `root`.

    `multiplicity` says how many of the root's k identical trees this object stands for; each
    carries 1/k of the root's shard. `arcs` are listed parents before children.
    """

    root: str
    index: int
    multiplicity: int
    arcs: tuple[TreeArc, ...]

    def children(self) -> dict[str, list[str]]:
        """Each node's children, in arc order."""
        out: dict[str, list[str]] = defaultdict(list)
        for a in self.arcs:
            out[a.parent].append(a.child)
        return dict(out)

    def parent(self) -> dict[str, str]:
        """Each non-root node's parent."""
        return {a.child: a.parent for a in self.arcs}

    def depth(self) -> dict[str, int]:
        """Tree depth of every node (root 0)."""
        d = {self.root: 0}
        for a in self.arcs:
            d[a.child] = d[a.parent] + 1
        return d

    def height(self) -> int:
        """The longest root-to-leaf arc count."""
        return max(self.depth().values())

    def nodes(self) -> list[str]:
        return [self.root, *(a.child for a in self.arcs)]


@dataclass(frozen=True)
class Phase:
    """One pass of data over trees: ``broadcast`` (down) or ``reduce`` (up)."""

    kind: Literal["broadcast", "reduce"]
    trees: tuple[Tree, ...]

    def roots(self) -> list[str]:
        return list(dict.fromkeys(t.root for t in self.trees))


@dataclass(frozen=True)
class Schedule:
    """A complete collective schedule on a topology.

    `x_star` is the optimal per-compute-node rate (GB/s) the schedule was planned for, `k` the
    number of trees per root and `U` the tree-slot scale (arc e carries ⌊U·b_e⌋ trees), so that
    one phase moving M bytes takes U·M/(N·k) seconds-per-GB. `algbw` follows nccl-tests: output
    bytes over time.
    """

    collective: Collective
    topology: str
    compute_nodes: tuple[str, ...]
    k: int
    U: Fraction
    x_star: Fraction
    phases: tuple[Phase, ...]
    meta: dict = field(default_factory=dict, compare=False)

    @property
    def N(self) -> int:
        return len(self.compute_nodes)

    @property
    def algbw(self) -> Fraction:
        """Optimal algorithm bandwidth in GB/s for this collective at the planned rate."""
        if self.collective in ("broadcast", "reduce"):
            return self.x_star
        rate = self.N * self.x_star
        return rate / 2 if self.collective == "allreduce" else rate

    def trees(self) -> list[Tree]:
        return [t for p in self.phases for t in p.trees]

    def tree_bytes(self, phase: Phase, tree: Tree, M: float) -> float:
        """Bytes tree `tree` of `phase` moves when the collective's size is M bytes."""
        per_root_trees = sum(t.multiplicity for t in phase.trees if t.root == tree.root)
        return M / len(phase.roots()) * tree.multiplicity / per_root_trees
