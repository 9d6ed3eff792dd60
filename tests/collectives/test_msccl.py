"""MSCCL-IR XML export, lint and explainer.

The oracle is a small symbolic MSCCL interpreter (:func:`run_msccl`): chunks hold multisets of
(GPU, chunk) contributions, sends and receives meet in FIFOs per (src, dst, channel), and
``depid``/``deps``/``hasdep`` gate steps as in msccl_interpreter.h. An exported algorithm is
right when the interpreter finishes (no deadlock, no undelivered send) with every output chunk
holding exactly the contributions the collective promises.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections import Counter, deque
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from datahall.collectives.msccl import (
    Finding,
    MscclError,
    Verdict,
    explain_msccl_xml,
    lint_msccl_xml,
    to_msccl_xml,
)
from datahall.collectives.schedule import Phase, Schedule, Tree, TreeArc
from datahall.core.topologies import dgx_a100

# ---------------------------------------------------------------------------------------------
# Building schedules by hand
# ---------------------------------------------------------------------------------------------

PHASES = {
    "allgather": ("broadcast",),
    "broadcast": ("broadcast",),
    "reduce_scatter": ("reduce",),
    "reduce": ("reduce",),
    "allreduce": ("reduce", "broadcast"),
}


def direct(a: str, b: str) -> tuple[str, ...]:
    return (a, "sw", b)


def make_schedule(coll, nodes, trees, k=1, path=direct, mult=None) -> Schedule:
    """`trees`: {(root, index): [(parent, child), ...]} (parents before children)."""
    phases = []
    for kind in PHASES[coll]:
        ts = []
        for (root, index), edges in trees.items():
            arcs = tuple(
                TreeArc(p, c, path(p, c) if kind == "broadcast" else tuple(reversed(path(p, c))))
                for p, c in edges
            )
            ts.append(Tree(root, index, (mult or {}).get((root, index), 1), arcs))
        phases.append(Phase(kind, tuple(ts)))
    return Schedule(coll, "hand", tuple(nodes), k, Fraction(1), Fraction(1), tuple(phases))


def gpus(n: int) -> list[str]:
    return [f"g{i}" for i in range(n)]


def chain(nodes, r):
    o = [nodes[(r + i) % len(nodes)] for i in range(len(nodes))]
    return list(zip(o, o[1:], strict=False))


def star(nodes, r):
    return [(nodes[r], v) for v in nodes if v != nodes[r]]


def fork(nodes, r):
    """root → a → {b, c, ...}: one inner node with extra children."""
    o = [nodes[(r + i) % len(nodes)] for i in range(len(nodes))]
    return [(o[0], o[1])] + [(o[1], v) for v in o[2:]]


def per_root(coll, nodes, shape, k=1):
    return make_schedule(
        coll,
        nodes,
        {(nodes[r], i): shape(nodes, r) for r in range(len(nodes)) for i in range(k)},
        k,
    )


def single_root(coll, nodes, shape, root=1, k=2):
    return make_schedule(coll, nodes, {(nodes[root], i): shape(nodes, root) for i in range(k)}, k)


def two_boxes(coll: str) -> Schedule:
    """2 DGX boxes: a tree per GPU chains through its own box's NVSwitch, and crosses to the
    same-index GPU of the other box over its NIC and IB rail (ib0 / ib1)."""
    nodes = [f"box{b}/gpu{i}" for b in range(2) for i in range(8)]

    def path(p, c):
        (bp, ip), (bc, ic) = (re.findall(r"\d+", x) for x in (p, c))
        if bp == bc:
            return (p, f"box{bp}/nvswitch", c)
        return (p, f"box{bp}/nic{ip}", f"ib{int(ip) % 2}", f"box{bc}/nic{ic}", c)

    trees = {}
    for b in range(2):
        for i in range(8):
            root, other = f"box{b}/gpu{i}", f"box{1 - b}/gpu{i}"
            own = [f"box{b}/gpu{(i + s) % 8}" for s in range(8)]
            far = [f"box{1 - b}/gpu{(i + s) % 8}" for s in range(8)]
            edges = [(root, other)] + list(zip(own, own[1:], strict=False))
            edges += list(zip(far, far[1:], strict=False))
            trees[root, 0] = edges
    return make_schedule(coll, nodes, trees, path=path)


# ---------------------------------------------------------------------------------------------
# A symbolic MSCCL interpreter (the oracle)
# ---------------------------------------------------------------------------------------------

SENDS = {"s", "rcs", "rrs", "rrcs"}
RECVS = {"r", "rcs", "rrs", "rrc", "rrcs"}


class Deadlock(AssertionError):
    pass


def run_msccl(xml: str, root: int = 0) -> None:
    """Run `xml` symbolically and assert the collective's result on every GPU."""
    algo = ET.fromstring(xml)
    N, C = int(algo.get("ngpus")), int(algo.get("nchunksperloop"))
    coll, inplace = algo.get("coll"), algo.get("inplace") == "1"
    share = C // N

    def key(g, buf, off):  # in place, input and output alias
        if inplace and buf == "i" and coll == "allgather":
            return (g, "o", g * share + off)
        if inplace and buf == "o" and coll == "reduce_scatter":
            return (g, "i", g * share + off)
        if inplace and buf == "i" and coll not in ("allgather", "reduce_scatter"):
            return (g, "o", off)
        return (g, buf, off)

    store = {}
    for g in range(N):
        if coll == "allgather":
            for loc in range(share):
                store[key(g, "i", loc)] = Counter({(g, g * share + loc): 1})
        elif coll != "broadcast" or g == root:
            for j in range(C):
                store[key(g, "i", j)] = Counter({(g, j): 1})
    tbs = {}
    for gel in algo.iter("gpu"):
        g = int(gel.get("id"))
        for t in gel.iter("tb"):
            tbs[g, int(t.get("id"))] = {
                "send": int(t.get("send")),
                "recv": int(t.get("recv")),
                "chan": int(t.get("chan")),
                "steps": [s.attrib for s in t.iter("step")],
                "pc": 0,
                "flag": -1,
            }
    fifo: dict[tuple[int, int, int], deque] = {}

    def read(g, buf, off):
        assert key(g, buf, off) in store, f"gpu {g} reads {buf}[{off}] before it is written"
        return store[key(g, buf, off)]

    progress = True
    while progress:
        progress = False
        for (g, _), tb in tbs.items():
            while tb["pc"] < len(tb["steps"]):
                s = tb["steps"][tb["pc"]]
                depid, deps = int(s["depid"]), int(s["deps"])
                if depid >= 0 and tbs[g, depid]["flag"] < deps:
                    break
                typ, cnt = s["type"], int(s["cnt"])
                inbox = fifo.setdefault((tb["recv"], g, tb["chan"]), deque())
                if typ in RECVS and not inbox:
                    break
                got = inbox.popleft() if typ in RECVS else None
                src = (
                    [read(g, s["srcbuf"], int(s["srcoff"]) + c) for c in range(cnt)]
                    if typ in ("s", "rrs", "rrc", "rrcs", "cpy")
                    else None
                )
                if typ in ("rrs", "rrc", "rrcs"):
                    got = [a + b for a, b in zip(src, got, strict=True)]
                value = got if typ in RECVS else src
                if typ in ("r", "rcs", "rrc", "rrcs", "cpy"):
                    for c, v in enumerate(value):
                        store[key(g, s["dstbuf"], int(s["dstoff"]) + c)] = v
                if typ in SENDS:
                    fifo.setdefault((g, tb["send"], tb["chan"]), deque()).append(value)
                if s["hasdep"] == "1":
                    tb["flag"] = tb["pc"]
                tb["pc"] += 1
                progress = True
    stuck = [k for k, tb in tbs.items() if tb["pc"] < len(tb["steps"])]
    if stuck:
        raise Deadlock(f"threadblocks (gpu, tb) {stuck[:4]} never finish")
    assert not [k for k, q in fifo.items() if q], "sends nobody receives"
    everyone = lambda j: Counter({(h, j): 1 for h in range(N)})  # noqa: E731
    for g in range(N):
        out = lambda j: store.get(key(g, "o", j))  # noqa: B023, E731
        if coll == "allgather":
            assert all(out(j) == Counter({(j // share, j): 1}) for j in range(C)), g
        elif coll == "allreduce":
            assert all(out(j) == everyone(j) for j in range(C)), g
        elif coll == "reduce_scatter":
            assert all(out(x) == everyone(g * share + x) for x in range(share)), g
        elif coll == "broadcast":
            assert all(out(j) == Counter({(root, j): 1}) for j in range(C)), g
        elif coll == "reduce" and g == root:
            assert all(out(j) == everyone(j) for j in range(C)), g


def parse(xml: str):
    algo = ET.fromstring(xml)
    return algo, {int(g.get("id")): g.findall("tb") for g in algo.iter("gpu")}


def clean(findings: list[Finding]) -> bool:
    return not [f for f in findings if f.severity != "info"]


# ---------------------------------------------------------------------------------------------
# Export: counts on hand-built schedules
# ---------------------------------------------------------------------------------------------


def test_chain_allgather_counts():
    nodes = gpus(4)
    xml = to_msccl_xml(per_root("allgather", nodes, chain))
    algo, tbs = parse(xml)
    a = algo.attrib
    assert (a["ngpus"], a["nchunksperloop"], a["coll"], a["proto"]) == (
        "4",
        "4",
        "allgather",
        "Simple",
    )
    # Every two chains of a 4-ring share a link, so each needs its own channel.
    assert a["nchannels"] == "4"
    assert (a["inplace"], a["outofplace"], a["minBytes"], a["maxBytes"]) == (
        "1",
        "0",
        "0",
        str(1 << 40),
    )
    for g, tb in tbs.items():
        assert len(tb) == 4  # one threadblock per tree
        assert all(len(t.findall("step")) == 1 for t in tb)
        types = Counter(t.find("step").get("type") for t in tb)
        assert types == Counter({"s": 1, "rcs": 2, "r": 1}), g
        assert algo.find(f"gpu[@id='{g}']").attrib == {
            "id": str(g),
            "i_chunks": "1",
            "o_chunks": "4",
            "s_chunks": "0",
        }
    assert lint_msccl_xml(xml) == []
    run_msccl(xml)


def test_chain_allreduce_uses_rrcs_at_the_root_and_two_tbs_elsewhere():
    nodes = gpus(4)
    xml = to_msccl_xml(per_root("allreduce", nodes, chain))
    algo, tbs = parse(xml)
    for tb in tbs.values():
        assert len(tb) == 2 * 4 - 1  # 2 per tree, 1 (rrcs) where the GPU is the root
        types = Counter(t.find("step").get("type") for t in tb)
        assert types == Counter({"rrcs": 1, "rrs": 2, "s": 1, "rcs": 2, "r": 1})
    assert algo.get("nchunksperloop") == "4"
    assert lint_msccl_xml(xml) == []
    run_msccl(xml)


def test_reduce_scatter_step_types_and_extra_children():
    nodes = gpus(4)
    xml = to_msccl_xml(per_root("reduce_scatter", nodes, fork))
    algo, tbs = parse(xml)
    assert algo.get("coll") == "reduce_scatter"
    # Per tree: root rrc from its one child; the fork node rrc (extra child) + rrs (main child);
    # two leaves s. Each GPU plays each role once: 1 + 2 + 1 + 1 = 5 threadblocks.
    for g, tb in tbs.items():
        assert len(tb) == 5
        assert Counter(t.find("step").get("type") for t in tb) == Counter(
            {"rrc": 2, "rrs": 1, "s": 2}
        )
        assert algo.find(f"gpu[@id='{g}']").get("o_chunks") == "1"
    assert clean(lint_msccl_xml(xml))
    run_msccl(xml)


def test_extra_children_get_their_own_threadblock_and_wait_for_the_receive():
    nodes = gpus(4)
    xml = to_msccl_xml(per_root("allgather", nodes, fork))
    _, tbs = parse(xml)
    # fork: root (1 tb), inner node with one main + one extra child (2 tbs), 2 leaves (1 each).
    assert {len(t) for t in tbs.values()} == {5}
    g1 = tbs[1]  # in tree 0, g1 is the inner node: rcs (hasdep=1) and an s that waits for it
    deps = [(t.get("id"), t.find("step").attrib) for t in g1 if t.find("step").get("depid") != "-1"]
    assert deps
    for _, step in deps:
        target = next(t for t in g1 if t.get("id") == step["depid"])
        assert target.find("step").get("hasdep") == "1"
    run_msccl(xml)


def test_star_root_serves_every_child():
    nodes = gpus(5)
    for coll in ("allgather", "allreduce", "reduce_scatter"):
        xml = to_msccl_xml(per_root(coll, nodes, star))
        _, tbs = parse(xml)
        per_tree_root = {"allgather": 4, "allreduce": 1 + 2 * 3, "reduce_scatter": 4}[coll]
        per_tree_leaf = {"allgather": 1, "allreduce": 2, "reduce_scatter": 1}[coll]
        assert {len(t) for t in tbs.values()} == {per_tree_root + 4 * per_tree_leaf}
        assert clean(lint_msccl_xml(xml))
        run_msccl(xml)


@pytest.mark.parametrize("coll", ["allgather", "reduce_scatter", "allreduce"])
@pytest.mark.parametrize("inplace", [True, False])
@pytest.mark.parametrize("shape", [chain, star, fork])
def test_every_collective_moves_the_right_data(coll, inplace, shape):
    xml = to_msccl_xml(per_root(coll, gpus(4), shape, k=2), inplace=inplace, ninstance=2)
    assert clean(lint_msccl_xml(xml))
    run_msccl(xml)


@pytest.mark.parametrize("coll", ["broadcast", "reduce"])
@pytest.mark.parametrize("inplace", [True, False])
def test_single_root_collectives(coll, inplace):
    xml = to_msccl_xml(single_root(coll, gpus(5), fork, root=2, k=2), inplace=inplace)
    algo, _ = parse(xml)
    assert algo.get("nchunksperloop") == "2"  # one shard: ninstance·k
    assert clean(lint_msccl_xml(xml))
    run_msccl(xml, root=2)


def test_out_of_place_uses_the_input_and_scratch():
    nodes = gpus(4)
    xml = to_msccl_xml(per_root("allgather", nodes, chain), inplace=False)
    algo, tbs = parse(xml)
    assert (algo.get("inplace"), algo.get("outofplace")) == ("0", "1")
    root_steps = [s for t in tbs[0] for s in t.findall("step") if s.get("srcbuf") == "i"]
    assert [s.get("type") for s in root_steps] == ["s", "cpy"]  # send own shard, copy it home
    xml = to_msccl_xml(per_root("reduce_scatter", nodes, fork), inplace=False)
    algo, _ = parse(xml)
    assert {g.get("s_chunks") for g in algo.iter("gpu")} == {"1"}  # the fork node's partial sum
    run_msccl(xml)


def test_chunk_index_formula_and_instances():
    nodes = gpus(3)
    xml = to_msccl_xml(per_root("allgather", nodes, chain, k=2), ninstance=2)
    algo, tbs = parse(xml)
    assert algo.get("nchunksperloop") == str(2 * 2 * 3)
    # The root's sends: chunk = root·k·ninstance + inst·k + tree offset.
    for g, tb in tbs.items():
        sent = sorted(
            int(t.find("step").get("srcoff")) for t in tb if t.find("step").get("type") == "s"
        )
        assert sent == [g * 4 + inst * 2 + off for inst in range(2) for off in range(2)]
    run_msccl(xml)


def test_no_link_channel_pair_repeats():
    xml = to_msccl_xml(per_root("allreduce", gpus(6), fork, k=2), ninstance=2)
    _, tbs = parse(xml)
    for tb in tbs.values():
        sends = Counter((t.get("send"), t.get("chan")) for t in tb if t.get("send") != "-1")
        recvs = Counter((t.get("recv"), t.get("chan")) for t in tb if t.get("recv") != "-1")
        assert max(sends.values()) == 1 and max(recvs.values()) == 1


def test_two_boxes_keep_ib_paths_on_their_rail_parity():
    s = two_boxes("allgather")
    xml = to_msccl_xml(s, topology=dgx_a100(boxes=2))
    _, tbs = parse(xml)
    for g, tb in tbs.items():
        for t in tb:
            for peer in (int(t.get("send")), int(t.get("recv"))):
                if peer >= 0 and peer // 8 != g // 8:  # crosses boxes: NIC g%8, rail g%2
                    assert int(t.get("chan")) % 2 == g % 8 % 2
        assert len(tb) == 16 + 1  # one per tree, plus the root's second child
    assert lint_msccl_xml(xml) == []
    run_msccl(xml)
    plain = parse(to_msccl_xml(s))[0]  # without the topology no parity is kept
    assert int(plain.get("nchannels")) <= int(parse(xml)[0].get("nchannels"))


def test_two_boxes_allreduce():
    xml = to_msccl_xml(two_boxes("allreduce"), topology=dgx_a100(boxes=2), comments=False)
    algo, tbs = parse(xml)
    assert {len(t) for t in tbs.values()} == {2 * 16 - 1 + 2}
    assert "<!--" not in xml
    assert lint_msccl_xml(xml) == []
    run_msccl(xml)


def test_allreduce_with_different_reduce_and_broadcast_trees():
    nodes = gpus(4)
    b = make_schedule("allgather", nodes, {(nodes[r], 0): chain(nodes, r) for r in range(4)})
    r = make_schedule("reduce_scatter", nodes, {(nodes[r], 0): star(nodes, r) for r in range(4)})
    s = Schedule(
        "allreduce", "hand", tuple(nodes), 1, Fraction(1), Fraction(1), (r.phases[0], b.phases[0])
    )
    xml = to_msccl_xml(s)
    types = Counter(st.get("type") for st in ET.fromstring(xml).iter("step"))
    assert "rrcs" not in types  # the root reduces (rrc), then its broadcast send waits for it
    assert clean(lint_msccl_xml(xml))
    run_msccl(xml)


def test_options_reach_the_file():
    s = per_root("reduce_scatter", gpus(3), chain)
    xml = to_msccl_xml(
        s,
        proto="LL128",
        min_bytes=1024,
        max_bytes=1 << 30,
        name="mine",
        nthreads=512,
        coll_name="reducescatter",
    )
    a = ET.fromstring(xml).attrib
    assert (a["proto"], a["minBytes"], a["maxBytes"], a["name"], a["nthreads"], a["coll"]) == (
        "LL128",
        "1024",
        str(1 << 30),
        "mine",
        "512",
        "reducescatter",
    )
    assert [f.rule for f in lint_msccl_xml(xml)] == ["coll-spelling"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"proto": "LL64"}, "proto must be one of"),
        ({"ninstance": 0}, "ninstance must be a positive integer"),
        ({"min_bytes": 10, "max_bytes": 5}, "min_bytes <= max_bytes"),
        ({"nthreads": 100}, "multiple of 32"),
        ({"name": 'a"b'}, "algorithm name"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(MscclError, match=message):
        to_msccl_xml(per_root("allgather", gpus(3), chain), **kwargs)


def test_multiplicity_needs_fixed_k():
    nodes = gpus(3)
    s = make_schedule(
        "allgather",
        nodes,
        {(v, 0): chain(nodes, i) for i, v in enumerate(nodes)},
        k=2,
        mult={(v, 0): 2 for v in nodes},
    )
    with pytest.raises(MscclError, match=r"multiplicity 2.*fixed_k=1"):
        to_msccl_xml(s)


def test_schedules_that_are_not_trees_are_refused():
    nodes = gpus(3)
    s = make_schedule(
        "allgather", nodes, {(v, 0): chain(nodes, i)[:1] for i, v in enumerate(nodes)}
    )
    with pytest.raises(MscclError, match="misses"):
        to_msccl_xml(s)
    s = make_schedule("allgather", nodes, {(nodes[0], 0): chain(nodes, 0)})
    with pytest.raises(MscclError, match="every GPU"):
        to_msccl_xml(s)


def test_limits_are_enforced(monkeypatch):
    s = per_root("allgather", gpus(4), chain)
    with pytest.raises(MscclError, match=r"needs 36 channels and MSCCL has 32"):
        to_msccl_xml(s, ninstance=9)
    import datahall.collectives.msccl as m

    monkeypatch.setattr(m, "MAX_TBS", 3)
    with pytest.raises(MscclError, match="needs 4 threadblocks and MSCCL allows 3"):
        to_msccl_xml(s)


# ---------------------------------------------------------------------------------------------
# Lint: every rule fires on a broken file
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base() -> str:
    """4 GPUs, fork-shaped allgather trees: has extra children, so dependencies too."""
    return to_msccl_xml(per_root("allgather", gpus(4), fork), comments=False)


def first_tb(xml: str, gpu: int = 0) -> str:
    return re.search(rf'<gpu id="{gpu}".*?</tb>', xml, re.S).group()


def sub(xml: str, old: str, new: str, count: int = 1) -> str:
    assert old in xml, old
    return xml.replace(old, new, count)


def set_attr(xml: str, elem: str, attr: str, value: str | None, nth: int = 0) -> str:
    """Set (or with None delete) attribute `attr` of the nth <elem>."""
    tags = list(re.finditer(rf"<{elem} [^>]*>", xml))
    tag = tags[nth].group()
    if value is None:
        new = re.sub(rf' {attr}="[^"]*"', "", tag)
    elif f' {attr}="' in tag:
        new = re.sub(rf' {attr}="[^"]*"', f' {attr}="{value}"', tag)
    else:
        new = tag.replace(f"<{elem} ", f'<{elem} {attr}="{value}" ', 1)
    return xml[: tags[nth].start()] + new + xml[tags[nth].end() :]


def step(**attrs) -> str:
    a = {
        "s": 0,
        "type": "nop",
        "srcbuf": "o",
        "srcoff": 0,
        "dstbuf": "o",
        "dstoff": 0,
        "cnt": 1,
        "depid": -1,
        "deps": -1,
        "hasdep": 0,
    } | attrs
    return "<step " + " ".join(f'{k}="{v}"' for k, v in a.items()) + "/>"


def add_tb(xml: str, gpu: int, body: str, send=-1, recv=-1, chan=0, tid: int | None = None) -> str:
    g = re.search(rf'<gpu id="{gpu}"[^>]*>', xml)
    n = len(re.findall(r"<tb ", first_gpu_block(xml, gpu)))
    tid = n if tid is None else tid
    tb = f'\n    <tb id="{tid}" send="{send}" recv="{recv}" chan="{chan}">\n      {body}\n    </tb>'
    return xml[: g.end()] + tb + xml[g.end() :]


def first_gpu_block(xml: str, gpu: int) -> str:
    return re.search(rf'<gpu id="{gpu}".*?</gpu>', xml, re.S).group()


def rules(xml: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for f in lint_msccl_xml(xml):
        out.setdefault(f.rule, []).append(f.message)
    return out


def test_base_is_clean(base):
    assert lint_msccl_xml(base) == []


def test_not_xml_and_not_msccl_raise_one_clear_line(tmp_path):
    with pytest.raises(MscclError, match="not well-formed XML"):
        lint_msccl_xml("<algo><gpu></algo>")
    with pytest.raises(MscclError, match=r"not MSCCL XML: the top element is <graph>"):
        lint_msccl_xml('<graph id="1"/>')
    with pytest.raises(MscclError, match="MSCCL_CONFIG file"):
        lint_msccl_xml('<msccl_algos><load path="a.xml"/></msccl_algos>')
    with pytest.raises(MscclError, match="ForestColl's tree XML"):
        lint_msccl_xml('<Algo nchunkspernode="1"/>')
    with pytest.raises(MscclError, match="neither MSCCL XML text nor a readable file"):
        lint_msccl_xml(tmp_path / "missing.xml")
    with pytest.raises(MscclError, match="neither MSCCL XML text nor a readable file"):
        lint_msccl_xml("allgather please")
    for exc in (MscclError("x"),):
        assert isinstance(exc, ValueError)


def test_lint_reads_files_and_bytes(tmp_path, base):
    p = tmp_path / "a.xml"
    p.write_text(base)
    assert (
        lint_msccl_xml(p) == []
        and lint_msccl_xml(str(p)) == []
        and lint_msccl_xml(base.encode()) == []
    )


@pytest.mark.parametrize(
    "attr", ["ngpus", "coll", "proto", "nchunksperloop", "nchannels", "name", "inplace"]
)
def test_missing_algo_attribute(base, attr):
    assert any(
        f"missing {attr}=" in m for m in rules(set_attr(base, "algo", attr, None))["missing-attr"]
    )


@pytest.mark.parametrize("attr", ["minBytes", "maxBytes"])
def test_missing_byte_range(base, attr):
    (msg,) = rules(set_attr(base, "algo", attr, None))["missing-attr"]
    assert f"missing {attr}=" in msg and "silently fall back to NCCL" in msg


def test_missing_outofplace_is_a_warning(base):
    (f,) = lint_msccl_xml(set_attr(base, "algo", "outofplace", None))
    assert (f.severity, f.rule) == ("warning", "missing-attr")


@pytest.mark.parametrize(
    ("elem", "attr"), [("gpu", "s_chunks"), ("tb", "chan"), ("step", "hasdep")]
)
def test_missing_inner_attribute(base, elem, attr):
    assert any(
        f"missing {attr}=" in m for m in rules(set_attr(base, elem, attr, None))["missing-attr"]
    )


def test_unknown_coll(base):
    (msg,) = rules(set_attr(base, "algo", "coll", "AllGather"))["coll"]
    assert "coll='AllGather' is not a collective MSCCL knows" in msg


def test_unknown_proto(base):
    (msg,) = rules(set_attr(base, "algo", "proto", "simple"))["proto"]
    assert "proto='simple'" in msg


def test_unknown_step_type(base):
    (msg,) = rules(sub(base, 'type="rcs"', 'type="recvcopysend"'))["step-type"]
    assert "type='recvcopysend'; MSCCL knows" in msg


def test_allgather_chunk_consistency(base):
    msgs = rules(set_attr(base, "gpu", "i_chunks", "4"))["chunk-consistency"]
    assert "i_chunks=4 does not fit coll=allgather with nchunksperloop=4" in msgs[0]
    assert "i_chunks·4 = nchunksperloop" in msgs[0]


def test_reduce_scatter_chunk_consistency():
    xml = to_msccl_xml(per_root("reduce_scatter", gpus(4), chain), comments=False)
    (msg,) = rules(set_attr(xml, "gpu", "o_chunks", "4"))["chunk-consistency"]
    assert (
        "o_chunks=4 does not fit coll=reduce_scatter" in msg
        and "o_chunks·4 = nchunksperloop" in msg
    )


def test_gpu_count_differs_from_ngpus(base):
    (msg,) = rules(set_attr(base, "algo", "ngpus", "8"))["ngpus-count"]
    assert "ngpus=8 but the file has 4 <gpu> elements" in msg


def test_too_many_steps(base):
    body = "".join(step(s=i) for i in range(257))
    msgs = rules(add_tb(base, 0, body, chan=0))["step-limit"]
    assert any("257 steps; MSCCL allows 256 per threadblock" in m for m in msgs)
    assert any("s=256; MSCCL allows steps 0..255" in m for m in msgs)


def test_too_many_threadblocks(base):
    xml = base
    for _ in range(213):
        xml = add_tb(xml, 0, step())
    (msg,) = rules(xml)["tb-limit"]
    assert "218 threadblocks; MSCCL allows 216" in msg


def test_more_threadblocks_than_sms_is_a_warning(base):
    xml = base
    for _ in range(110):
        xml = add_tb(xml, 0, step())
    (f,) = [f for f in lint_msccl_xml(xml) if f.rule == "tb-limit"]
    assert f.severity == "warning" and "108 SMs" in f.message


def test_too_many_threadblocks_per_channel(base):
    xml = set_attr(base, "algo", "ngpus", "40")
    for i in range(33):
        xml = add_tb(xml, 0, step(), send=4 + i, chan=0)
    before = len(
        re.findall(r'<tb id="\d+" send="\d+" recv="-?\d+" chan="0"', first_gpu_block(base, 0))
    )
    msg = f"{before + 33} threadblocks send on channel 0; MSCCL allows 32"
    assert msg in rules(xml)["tbs-per-channel"][0]


def test_nthreads_not_a_multiple_of_32(base):
    (msg,) = rules(set_attr(base, "algo", "nthreads", "100"))["nthreads"]
    assert "nthreads=100 is not a multiple of 32" in msg


def test_send_to_self(base):
    xml = set_attr(base, "tb", "send", "0")  # gpu 0's first threadblock
    assert "sends to or receives from its own GPU 0" in rules(xml)["self-peer"][0]


def test_several_peers_in_one_threadblock(base):
    xml = set_attr(base, "tb", "send", "1,2")
    assert "names several peers; a threadblock has one send peer" in rules(xml)["multi-peer"][0]


def test_two_threadblocks_on_one_connection(base):
    tb0 = re.search(r'<tb id="0" send="(\d+)" recv="-1" chan="(\d+)"', base)
    xml = add_tb(base, 0, step(), send=tb0.group(1), chan=tb0.group(2))
    (msg,) = rules(xml)["duplicate-connection"]
    assert f"send to gpu {tb0.group(1)} on channel {tb0.group(2)}" in msg


def test_unmatched_send_and_receive(base):
    # Turn gpu 1's first receive into a nop: gpu 0's send to it is never received.
    tb = re.search(
        r'<tb id="\d+" send="-?\d+" recv="0" chan="(\d+)">\s*<step [^>]*type="(r|rcs)"',
        first_gpu_block(base, 1),
    )
    xml = base.replace(tb.group(), tb.group().replace(f'type="{tb.group(2)}"', 'type="nop"'), 1)
    msgs = rules(xml)["unmatched-send-recv"]
    assert any(
        f"gpu 0 sends 1 step(s) (1 chunks) to gpu 1 on channel {tb.group(1)} but gpu 1 receives 0"
        in m
        for m in msgs
    )


def test_deps_on_a_missing_threadblock(base):
    xml = add_tb(base, 0, step(depid=99, deps=0))
    assert "depid=99: gpu 0 has no threadblock 99" in rules(xml)["deps"][0]


def test_deps_on_a_missing_step(base):
    xml = add_tb(base, 0, step(depid=0, deps=5))
    assert "deps=5: threadblock 0 has steps 0..0" in rules(xml)["deps"][0]


def test_deps_on_a_step_without_hasdep(base):
    xml = add_tb(base, 0, step(depid=0, deps=0))  # gpu 0 tb 0 (the root's send) has hasdep=0
    assert 'does not set hasdep="1"; the wait never ends' in rules(xml)["deps"][0]


def test_min_above_max(base):
    (msg,) = rules(set_attr(base, "algo", "minBytes", str(1 << 41)))["bytes-range"]
    assert "is above maxBytes" in msg


def test_neither_in_place_nor_out_of_place(base):
    xml = set_attr(base, "algo", "inplace", "0")
    assert "inplace and outofplace are both 0" in rules(xml)["inplace-flags"][0]


def test_channel_outside_nchannels(base):
    assert "outside 0..nchannels-1" in rules(set_attr(base, "tb", "chan", "9"))["channel-range"][0]


def test_nchannels_above_32(base):
    assert "between 1 and 32" in rules(set_attr(base, "algo", "nchannels", "33"))["nchannels"][0]


def test_peer_out_of_range(base):
    assert (
        "send=7 is not -1 or a rank below ngpus"
        in rules(set_attr(base, "tb", "send", "7"))["peer-range"][0]
    )


def test_send_step_without_a_send_peer(base):
    xml = add_tb(base, 0, step(type="s"))
    assert "a s step in a threadblock without a send peer" in rules(xml)["step-peer"][0]


def test_buffer_out_of_range(base):
    xml = add_tb(base, 0, step(type="cpy", srcbuf="i", srcoff=1, dstbuf="o", dstoff=3, cnt=2))
    msgs = rules(xml)["buffer"]
    assert "src chunks 1..2 are outside the input (i_chunks=1)" in msgs[0]
    assert "dst chunks 3..4 are outside the output (o_chunks=4)" in msgs[1]
    xml = add_tb(base, 0, step(type="cpy", srcbuf="x"))
    assert "srcbuf='x'; MSCCL knows i, o and s" in rules(xml)["buffer"][0]


def test_count_limit(base):
    xml = add_tb(base, 0, step(cnt=72))
    assert "cnt=72; it must be between 1 and 71" in rules(xml)["count"][0]


def test_hasdep_must_be_0_or_1(base):
    assert (
        "hasdep=2; it must be 0 or 1" in rules(set_attr(base, "step", "hasdep", "2"))["hasdep"][0]
    )


def test_threadblock_ids_without_gaps(base):
    assert "is missing or negative" in rules(add_tb(base, 0, step(), tid=10))["tb-ids"][0]
    dup = add_tb(base, 0, step(), tid=0)
    assert any("2 threadblocks have id 0" in m for m in rules(dup)["tb-ids"])


def test_step_numbers_out_of_order(base):
    xml = add_tb(base, 0, step(s=0) + step(s=2))
    (f,) = [f for f in lint_msccl_xml(xml) if f.rule == "step-order"]
    assert f.severity == "warning" and "s=2 but it is step #1" in f.message


def test_duplicate_gpu_id(base):
    xml = set_attr(base, "gpu", "id", "1")
    assert any("2 <gpu> elements have id 1" in m for m in rules(xml)["gpu-ids"])


# NCCL's own XML reader (src/graph/xml.cc) is stricter than XML.


def test_xml_declaration(base):
    msgs = rules('<?xml version="1.0"?>\n' + base)["declaration"]
    assert "not understood by NCCL's XML reader" in msgs[0]


def test_byte_order_mark(base):
    assert "byte-order mark" in rules("\ufeff" + base)["bom"][0]


def test_tab_indentation(base):
    assert "tab between elements" in rules(base.replace("  <gpu", "\t<gpu", 1))["tab"][0]


def test_tag_spanning_lines(base):
    xml = base.replace(' proto="Simple"', '\n  proto="Simple"', 1)
    assert "on one line" in rules(xml)["attr-separator"][0]


def test_single_quotes(base):
    xml = base.replace('proto="Simple"', "proto='Simple'", 1)
    assert "single-quoted attribute value" in rules(xml)["single-quote"][0]


def test_value_too_long(base):
    xml = set_attr(base, "algo", "name", "x" * 300)
    assert "longer than 255 characters" in rules(xml)["value-too-long"][0]


def test_text_between_elements(base):
    xml = base.replace("</tb>", "oops</tb>", 1)
    assert "text 'oops' between elements" in rules(xml)["text-content"][0]


def test_not_an_integer(base):
    (msg,) = rules(set_attr(base, "algo", "ngpus", "four"))["not-int"]
    assert "ngpus='four' is not an integer; NCCL's reader (strtol) reads it as 0" in msg


def test_leading_zero_is_octal(base):
    xml = set_attr(base, "algo", "minBytes", "010")
    (f,) = [f for f in lint_msccl_xml(xml) if f.rule == "octal-int"]
    assert f.severity == "warning" and "reads it as octal (8)" in f.message


def test_finding_prints_one_line(base):
    f = lint_msccl_xml(set_attr(base, "algo", "ngpus", "8"))[0]
    assert str(f).startswith("error: algo: ngpus=8") and "\n" not in str(f)


# ---------------------------------------------------------------------------------------------
# Why wasn't my algorithm picked?
# ---------------------------------------------------------------------------------------------

ENV = {"MSCCL_XML_FILES": "ar.xml", "NCCL_ALGO": "MSCCL,Ring,Tree"}


@pytest.fixture(scope="module")
def allreduce_xml() -> str:
    return to_msccl_xml(per_root("allreduce", gpus(4), chain), max_bytes=1 << 30)


def test_explain_picked(allreduce_xml):
    v = explain_msccl_xml(allreduce_xml, nbytes=1 << 20, ngpus=4, coll="allreduce", env=ENV)
    assert v == Verdict(True) and str(v) == "MSCCL would run this algorithm"


def test_explain_size_outside_the_range(allreduce_xml):
    v = explain_msccl_xml(allreduce_xml, nbytes=1 << 30, ngpus=4, env=ENV)
    assert not v.picked
    assert v.reasons == (
        f"{1 << 30} bytes is outside [minBytes, maxBytes) = [0, {1 << 30}); export with min_bytes <= {1 << 30} < max_bytes",
    )


def test_explain_missing_max_bytes_means_128_mib(allreduce_xml):
    xml = set_attr(allreduce_xml, "algo", "maxBytes", None)
    v = explain_msccl_xml(xml, nbytes=1 << 28, ngpus=4, env=ENV)
    assert any("maxBytes is absent, so MSCCL assumes 128 MiB" in r for r in v.reasons)
    assert any("does not load" in r for r in v.reasons)


def test_explain_ngpus_mismatch(allreduce_xml):
    (r,) = explain_msccl_xml(allreduce_xml, nbytes=4096, ngpus=8, env=ENV).reasons
    assert "the communicator has 8 ranks but the algorithm has ngpus=4" in r


@pytest.mark.parametrize(
    ("algo", "why"),
    [
        (None, "NCCL_ALGO is not set"),
        ("Ring,Tree", "does not enable MSCCL"),
        ("^MSCCL", "does not enable MSCCL"),
    ],
)
def test_explain_nccl_algo_override(allreduce_xml, algo, why):
    env = {"MSCCL_XML_FILES": "ar.xml"} | ({"NCCL_ALGO": algo} if algo else {})
    (r,) = explain_msccl_xml(allreduce_xml, nbytes=4096, ngpus=4, env=env).reasons
    assert why in r
    assert explain_msccl_xml(
        allreduce_xml, nbytes=4096, ngpus=4, env=env | {"NCCL_ALGO": "msccl"}
    ).picked


def test_explain_other_reasons(allreduce_xml):
    v = explain_msccl_xml(
        allreduce_xml,
        nbytes=4006,
        ngpus=4,
        coll="allgather",
        in_place=False,
        redop="avg",
        group_size=2,
        env={"MSCCL_XML_FILES": "ar.xml", "NCCL_ALGO": "MSCCL", "NCCL_PROTO": "LL,LL128"},
    )
    text = "\n".join(v.reasons)
    for why in (
        "the call is allgather but the algorithm is coll='allreduce'",
        "MSCCL only runs sum, prod, max, min",
        "one of 2 collectives in an NCCL group",
        'the call is out of place but the algorithm says inplace="1"',
        "not a multiple of nchunksperloop=4",
        "NCCL_PROTO=LL,LL128 disables the algorithm's proto=Simple",
    ):
        assert why in text
    assert str(v).startswith("MSCCL would not pick it:\n  - ")


def test_explain_environment(tmp_path, allreduce_xml):
    p = tmp_path / "ar.xml"
    p.write_text(allreduce_xml)
    (r,) = explain_msccl_xml(p, nbytes=4096, ngpus=4, env={"NCCL_ALGO": "MSCCL"}).reasons
    assert "neither MSCCL_XML_FILES nor MSCCL_CONFIG is set" in r
    (r,) = explain_msccl_xml(
        p, nbytes=4096, ngpus=4, env={"NCCL_ALGO": "MSCCL", "MSCCL_XML_FILES": "other.xml"}
    ).reasons
    assert "is not in MSCCL_XML_FILES" in r
    files = ":".join([*(str(tmp_path / f"x{i}.xml") for i in range(4)), str(p)])
    (r,) = explain_msccl_xml(
        p, nbytes=4096, ngpus=4, env={"NCCL_ALGO": "MSCCL", "MSCCL_XML_FILES": files}
    ).reasons
    assert "file #5 in MSCCL_XML_FILES; MSCCL loads only the first 4" in r
    v = explain_msccl_xml(p, nbytes=4096, ngpus=4)  # no environment: notes, not reasons
    assert v.picked and any("NCCL_ALGO lists MSCCL" in n for n in v.notes)


def test_explain_a_broken_file(allreduce_xml):
    (r,) = explain_msccl_xml(
        set_attr(allreduce_xml, "tb", "send", "0"), nbytes=4096, ngpus=4, env=ENV
    ).reasons
    assert r.startswith(
        "the file does not load ('failed to initialize. Will be ignored'): error: gpu 0 / tb 0"
    )


# ---------------------------------------------------------------------------------------------
# Property: random tree schedules always export to clean, correct XML
# ---------------------------------------------------------------------------------------------


@st.composite
def random_schedules(draw):
    n = draw(st.integers(2, 6))
    nodes = gpus(n)
    coll = draw(st.sampled_from(sorted(PHASES)))
    k = draw(st.integers(1, 2))
    roots = [nodes[draw(st.integers(0, n - 1))]] if coll in ("broadcast", "reduce") else nodes
    trees = {}
    for r in roots:
        for i in range(k):
            order = [r] + draw(st.permutations([v for v in nodes if v != r]))
            trees[r, i] = [(order[draw(st.integers(0, j - 1))], order[j]) for j in range(1, n)]
    hop = draw(st.sampled_from([lambda a, b: (a, b), direct]))
    s = make_schedule(coll, nodes, trees, k=k, path=hop)
    return s, nodes.index(roots[0]), draw(st.booleans()), draw(st.integers(1, 2))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_schedules())
def test_random_tree_schedules_lint_clean_and_run(case):
    s, root, inplace, ninstance = case
    xml = to_msccl_xml(s, inplace=inplace, ninstance=ninstance)
    assert clean(lint_msccl_xml(xml))
    run_msccl(xml, root=root)


# ---------------------------------------------------------------------------------------------
# Against the planner (brief §2.8 [measured]: dgx_a100(boxes=2), fixed_k=1)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def planned():
    plan_mod = pytest.importorskip("datahall.collectives.plan")
    G = dgx_a100(boxes=2)
    return G, {c: plan_mod.plan(G, c, fixed_k=1) for c in ("allgather", "allreduce")}


def tbs_by_tree_shape(s: Schedule, gpu: str) -> int:
    """Allgather threadblocks on `gpu` by the mapping's rule (no rail splits): one per tree per
    child, at least one (a leaf still receives)."""
    return sum(max(1, len(t.children().get(gpu, []))) for t in s.phases[-1].trees)


def test_two_boxes_match_the_reference_counts_for_chain_trees():
    """Chains inside each box (height 8, as the reference's fixed_k=1 trees) give the reference's
    threadblock counts on GPU 0: allgather 17, allreduce 33 (brief §2.8 [measured])."""
    G = dgx_a100(boxes=2)
    ag, ar = (parse(to_msccl_xml(two_boxes(c), topology=G)) for c in ("allgather", "allreduce"))
    assert (len(ag[1][0]), len(ar[1][0])) == (17, 33)
    # Channels are ours: 16 for both here (the reference measured 15 / 16 on its own trees).
    assert (ag[0].get("nchannels"), ar[0].get("nchannels")) == ("16", "16")


def test_planned_dgx_a100_exports(planned):
    """The reference measured, on GPU 0, allreduce 16 channels / 33 tbs and allgather 15 / 17.

    Our planner's k=1 trees are not the reference's chains: every root feeds its 7 box-mates
    through the NVSwitch and its rail peer, which feeds its own box (height 2). With the same
    mapping that gives 29 / 57 threadblocks on GPU 0 and 3 / 5 channels. What is asserted is the
    mapping's rule, not tie-breaking: allgather tbs = Σ over trees of max(1, children of the GPU),
    allreduce = twice that minus the root's fused rrcs; lint clean; the data arrives.
    """
    G, scheds = planned
    ag = to_msccl_xml(scheds["allgather"], topology=G)
    ar = to_msccl_xml(scheds["allreduce"], topology=G)
    for xml in (ag, ar):
        assert lint_msccl_xml(xml) == []
        run_msccl(xml)
    (ag_algo, ag_tbs), (ar_algo, ar_tbs) = parse(ag), parse(ar)
    assert len(scheds["allgather"].phases[0].trees) == 16
    for rank, v in enumerate(scheds["allgather"].compute_nodes):
        assert len(ag_tbs[rank]) == tbs_by_tree_shape(scheds["allgather"], v)
    same = [t.parent() for t in scheds["allreduce"].phases[0].trees] == [
        t.parent() for t in scheds["allreduce"].phases[1].trees
    ]
    if same:
        for rank, v in enumerate(scheds["allreduce"].compute_nodes):
            assert len(ar_tbs[rank]) == 2 * tbs_by_tree_shape(scheds["allreduce"], v) - 1
    assert int(ag_algo.get("nchannels")) <= 32 and int(ar_algo.get("nchannels")) <= 32
    print(
        f"\nGPU 0: allgather {ag_algo.get('nchannels')} channels / {len(ag_tbs[0])} tbs "
        f"(reference 15 / 17); allreduce {ar_algo.get('nchannels')} / {len(ar_tbs[0])} "
        "(reference 16 / 33)"
    )
