"""Plain JSON of schedules (exact round trip) and ForestColl's tree XML."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datahall.collectives.export import (
    ScheduleFormatError,
    dumps_schedule,
    load_schedule,
    loads_schedule,
    save_schedule,
    schedule_from_json,
    schedule_to_json,
    to_forestcoll_xml,
)
from datahall.collectives.schedule import Phase, Schedule, Tree, TreeArc

NODES = ("box0/gpu0", "box0/gpu1", "box1/gpu0", "box1/gpu1")


def hop(a: str, b: str) -> tuple[str, ...]:
    if a[:4] == b[:4]:
        return (a, f"{a[:4]}/nvswitch", b)
    return (a, f"{a[:4]}/nic{a[-1]}", f"ib{a[-1]}", f"{b[:4]}/nic{b[-1]}", b)


def chain_tree(root: int, kind: str, index: int = 0, mult: int = 1) -> Tree:
    order = [NODES[(root + i) % 4] for i in range(4)]
    arcs = []
    for p, c in zip(order, order[1:], strict=False):
        path = hop(p, c) if kind == "broadcast" else hop(c, p)
        arcs.append(TreeArc(p, c, path))
    return Tree(order[0], index, mult, tuple(arcs))


def schedule(coll: str = "allreduce", meta: dict | None = None) -> Schedule:
    kinds = {
        "allreduce": ("reduce", "broadcast"),
        "allgather": ("broadcast",),
        "reduce_scatter": ("reduce",),
    }[coll]
    phases = tuple(
        Phase(k, tuple(chain_tree(r, k, i, 1 + i) for r in range(4) for i in range(2)))
        for k in kinds
    )
    return Schedule(
        coll, "dgx-a100x2", NODES, 3, Fraction(3, 5), Fraction(65, 3), phases, meta or {}
    )


META = {
    "bottleneck_cut": ("box0/gpu0", "box0/nvswitch"),
    "gap": Fraction(1, 7),
    "times": [0.5, float("inf")],
    "per_arc": {("box0/gpu0", "box0/gpu1"): 2, 3: "three"},
    "nested": {"$weird": [1, (2, Fraction(3, 4))], "ok": None, "flag": True},
    "numpy": [np.int64(5), np.float64(0.25)],
}


@pytest.mark.parametrize("coll", ["allreduce", "allgather", "reduce_scatter"])
def test_round_trip_is_exact_including_meta(coll):
    s = schedule(coll, META)
    back = schedule_from_json(json.loads(json.dumps(schedule_to_json(s))))
    assert back == s
    assert back.meta["bottleneck_cut"] == ("box0/gpu0", "box0/nvswitch")
    assert back.meta["gap"] == Fraction(1, 7) and isinstance(back.meta["gap"], Fraction)
    assert back.meta["times"][0] == 0.5 and math.isinf(back.meta["times"][1])
    assert back.meta["per_arc"] == {("box0/gpu0", "box0/gpu1"): 2, 3: "three"}
    assert back.meta["nested"] == {"$weird": [1, (2, Fraction(3, 4))], "ok": None, "flag": True}
    assert back.meta["numpy"] == [5, 0.25] and type(back.meta["numpy"][0]) is int
    for a, b in zip(back.trees(), s.trees(), strict=True):
        assert type(a.arcs) is tuple and type(a.arcs[0].path) is tuple and a.arcs == b.arcs
    assert type(back.compute_nodes) is tuple and Fraction(3, 5) == back.U


def test_every_field_is_in_the_json():
    d = schedule_to_json(schedule("allgather"))
    assert set(d) == {
        "format",
        "version",
        "collective",
        "topology",
        "compute_nodes",
        "k",
        "U",
        "x_star",
        "phases",
        "meta",
    }
    assert (d["U"], d["x_star"], d["k"]) == ("3/5", "65/3", 3)
    tree = d["phases"][0]["trees"][1]
    assert (tree["root"], tree["index"], tree["multiplicity"]) == ("box0/gpu0", 1, 2)
    assert tree["arcs"][0] == {
        "parent": "box0/gpu0",
        "child": "box0/gpu1",
        "path": ["box0/gpu0", "box0/nvswitch", "box0/gpu1"],
    }
    s = Schedule("allgather", "t", NODES, 1, Fraction(13), Fraction(2), (), {})
    assert schedule_to_json(s)["U"] == "13/1"


def test_text_and_file_round_trip(tmp_path):
    s = schedule("allreduce", {"gap": Fraction(2, 3)})
    assert loads_schedule(dumps_schedule(s)) == s
    p = save_schedule(s, tmp_path / "s.json")
    for source in (p, str(p), p.read_text()):
        back = schedule_from_json(source)
        assert back == s and back.meta == s.meta
    assert load_schedule(p) == s


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(format="other"), "not a datahall schedule"),
        (lambda d: d.update(version=9), "format version 9 is not supported"),
        (lambda d: d.pop("k"), "schedule has no 'k'"),
        (lambda d: d.update(k="3"), "schedule.k must be int"),
        (lambda d: d.update(k=True), "schedule.k must be int"),
        (lambda d: d.update(U="three fifths"), 'schedule.U must be a fraction string like "3/5"'),
        (lambda d: d.update(x_star="1/0"), "schedule.x_star must be a fraction"),
        (lambda d: d.update(collective="allgatherv"), "'allgatherv' is not one of"),
        (lambda d: d["phases"][0].update(kind="scatter"), "kind must be broadcast or reduce"),
        (
            lambda d: d["phases"][1]["trees"][0]["arcs"][0].update(path=["box0/gpu1", "box0/gpu0"]),
            r"phases\[1\].trees\[0\].arcs\[0\].path must run box0/gpu0 ... box0/gpu1",
        ),
        (
            lambda d: d["phases"][0]["trees"][0].pop("multiplicity"),
            r"phases\[0\].trees\[0\] has no 'multiplicity'",
        ),
        (lambda d: d.update(compute_nodes=[1, 2]), "list of strings"),
    ],
)
def test_bad_files_name_the_field(edit, message):
    d = json.loads(json.dumps(schedule_to_json(schedule())))
    edit(d)
    with pytest.raises(ScheduleFormatError, match=message):
        schedule_from_json(d)


def test_bad_text_and_paths(tmp_path):
    with pytest.raises(ScheduleFormatError, match="not JSON: Expecting"):
        loads_schedule('{"format": ')
    with pytest.raises(ScheduleFormatError, match="holds a JSON object, not list"):
        loads_schedule("[1, 2]")
    with pytest.raises(ScheduleFormatError, match="cannot read schedule file"):
        load_schedule(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "x"}')
    with pytest.raises(ScheduleFormatError, match=rf"^{bad}: not a datahall schedule"):
        load_schedule(bad)
    assert issubclass(ScheduleFormatError, ValueError)


def test_meta_that_json_cannot_hold():
    with pytest.raises(ScheduleFormatError, match=r"meta.graph is a object"):
        schedule_to_json(schedule(meta={"graph": object()}))


@st.composite
def random_schedules(draw):
    n = draw(st.integers(2, 5))
    nodes = tuple(f"n{i}" for i in range(n))
    coll = draw(
        st.sampled_from(["allgather", "reduce_scatter", "allreduce", "broadcast", "reduce"])
    )
    kinds = {
        "allreduce": ("reduce", "broadcast"),
        "allgather": ("broadcast",),
        "broadcast": ("broadcast",),
    }.get(coll, ("reduce",))
    phases = []
    for kind in kinds:
        trees = []
        for r in nodes[: draw(st.integers(1, n))]:
            order = [r] + draw(st.permutations([v for v in nodes if v != r]))
            arcs = []
            for j in range(1, n):
                p, c = order[draw(st.integers(0, j - 1))], order[j]
                mid = tuple(draw(st.lists(st.sampled_from(["sw", "nic", "ib0"]), max_size=2)))
                path = (p, *mid, c) if kind == "broadcast" else (c, *mid, p)
                arcs.append(TreeArc(p, c, path))
            trees.append(Tree(r, draw(st.integers(0, 3)), draw(st.integers(1, 4)), tuple(arcs)))
        phases.append(Phase(kind, tuple(trees)))
    fr = st.fractions(min_value=Fraction(1, 1000), max_value=1000)
    meta = draw(
        st.dictionaries(
            st.text(max_size=5),
            st.one_of(st.integers(), fr, st.text(max_size=5), st.tuples(st.integers(), fr)),
            max_size=3,
        )
    )
    return Schedule(
        coll, "t", nodes, draw(st.integers(1, 8)), draw(fr), draw(fr), tuple(phases), meta
    )


@settings(max_examples=80, deadline=None)
@given(random_schedules())
def test_random_round_trip(s):
    back = loads_schedule(dumps_schedule(s))
    assert back == s and back.meta == s.meta


# ---------------------------------------------------------------------------------------------
# ForestColl tree XML
# ---------------------------------------------------------------------------------------------


def test_forestcoll_xml_of_the_broadcast_phase():
    s = schedule("allreduce")
    algo = ET.fromstring(to_forestcoll_xml(s))
    assert algo.tag == "Algo" and algo.attrib == {"nchunkspernode": "3"}
    trees = algo.findall("tree")
    assert len(trees) == 8
    assert trees[1].attrib == {"root": "0", "index": "1", "nchunks": "2", "height": "3"}
    sends = trees[0].findall("send")
    assert [(x.get("src"), x.get("dst")) for x in sends] == [("0", "1"), ("1", "2"), ("2", "3")]
    assert sends[1].get("path") == "box0/gpu1,box0/nic1,ib1,box1/nic0,box1/gpu0"
    assert {t.get("root") for t in trees} == {"0", "1", "2", "3"}


def test_forestcoll_xml_of_a_reduce_phase_sends_towards_the_root():
    s = schedule("reduce_scatter")
    algo = ET.fromstring(to_forestcoll_xml(s))
    first = algo.find("tree").findall("send")
    assert (first[0].get("src"), first[0].get("dst")) == ("1", "0")
    assert first[0].get("path") == "box0/gpu1,box0/nvswitch,box0/gpu0"
    assert (
        ET.fromstring(to_forestcoll_xml(schedule("allreduce"), phase=0))
        .find("tree/send")
        .get("src")
        == "1"
    )


def test_forestcoll_xml_sends_in_breadth_first_order():
    nodes = ("a", "b", "c", "d")
    arcs = (
        TreeArc("a", "b", ("a", "b")),
        TreeArc("b", "d", ("b", "d")),
        TreeArc("a", "c", ("a", "c")),
    )
    s = Schedule(
        "broadcast",
        "t",
        nodes,
        1,
        Fraction(1),
        Fraction(1),
        (Phase("broadcast", (Tree("a", 0, 1, arcs),)),),
    )
    sends = ET.fromstring(to_forestcoll_xml(s)).findall("tree/send")
    assert [(x.get("src"), x.get("dst")) for x in sends] == [("0", "1"), ("0", "2"), ("1", "3")]
    assert ET.fromstring(to_forestcoll_xml(s)).find("tree").get("height") == "2"


def test_forestcoll_xml_bad_phase():
    with pytest.raises(ValueError, match="phase 2 does not exist"):
        to_forestcoll_xml(schedule("allreduce"), phase=2)


def test_planned_schedule_round_trips():
    plan_mod = pytest.importorskip("datahall.collectives.plan")
    from datahall.core.topologies import dgx_a100

    s = plan_mod.plan(dgx_a100(boxes=1), "allreduce")
    back = loads_schedule(dumps_schedule(s))
    assert back == s and back.meta == s.meta
    assert ET.fromstring(to_forestcoll_xml(s)).tag == "Algo"
