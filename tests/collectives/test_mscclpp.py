"""MSCCL++ execution-plan export: counts, self-consistency, and symbolic execution.

The oracle :func:`run_plan` executes a plan: ``put`` copies chunks into the peer's buffer,
``signal`` bumps the semaphore of the channel pair (the i-th channel of a to b with the i-th of
b to a), ``wait`` consumes one signal or blocks. A plan is right when it finishes, every signal
is waited for, and the buffers hold the collective's result.
"""

from __future__ import annotations

import copy
import json
import re
from collections import Counter
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from datahall.collectives.mscclpp import MscclppError, check_mscclpp_plan, to_mscclpp_json
from datahall.collectives.schedule import Phase, Schedule, Tree, TreeArc
from datahall.core.topologies import dgx_a100

PHASES = {
    "allgather": ("broadcast",),
    "broadcast": ("broadcast",),
    "reduce_scatter": ("reduce",),
    "allreduce": ("reduce", "broadcast"),
}


def direct(a, b):
    return (a, "sw", b)


def make_schedule(coll, nodes, trees, k=1, path=direct, mult=None) -> Schedule:
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


def gpus(n):
    return [f"g{i}" for i in range(n)]


def chain(nodes, r):
    o = [nodes[(r + i) % len(nodes)] for i in range(len(nodes))]
    return list(zip(o, o[1:], strict=False))


def fork(nodes, r):
    o = [nodes[(r + i) % len(nodes)] for i in range(len(nodes))]
    return [(o[0], o[1])] + [(o[1], v) for v in o[2:]]


def per_root(coll, nodes, shape, k=1):
    return make_schedule(
        coll,
        nodes,
        {(nodes[r], i): shape(nodes, r) for r in range(len(nodes)) for i in range(k)},
        k,
    )


class Deadlock(AssertionError):
    pass


def run_plan(plan: dict, root: int = 0) -> None:
    """Execute `plan` symbolically and assert the collective's result."""
    coll, inplace, G = plan["collective"], plan["inplace"], plan["gpus"]
    N = len(G)
    C = G[0]["input_chunks"] if coll == "reducescatter" else G[0]["output_chunks"]
    share = C // N

    def key(g, buf, off):
        if inplace and buf == "i" and coll == "allgather":
            return (g, "o", g * share + off)
        if inplace and buf == "o" and coll == "reducescatter":
            return (g, "i", g * share + off)
        if inplace and buf == "i" and coll in ("allreduce", "broadcast"):
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
    pair = {}
    for a, gp in enumerate(G):
        for ch in gp["channels"]:
            nth = Counter()
            for idx, b in enumerate(ch["connected_to"]):
                pair[a, ch["channel_type"], idx] = (b, nth[b])
                nth[b] += 1
    sem, used = Counter(), Counter()
    tbs = []
    for a, gp in enumerate(G):
        for tb in gp["threadblocks"]:
            chans = {c["channel_type"]: c["channel_ids"] for c in tb["channels"]}
            refs = {
                r["access_channel_type"]: r["remote_buffer_ids"] for r in tb["remote_buffer_refs"]
            }
            tbs.append({"g": a, "ops": tb["ops"], "pc": 0, "chans": chans, "refs": refs})

    def read(g, buf, i):
        assert key(g, buf, i) in store, f"gpu {g} reads {buf}[{i}] before it is written"
        return store[key(g, buf, i)]

    progress = True
    while progress:
        progress = False
        for tb in tbs:
            a = tb["g"]
            while tb["pc"] < len(tb["ops"]):
                op = tb["ops"][tb["pc"]]
                name = op["name"]
                if "channel_ids" in op:
                    t = op["channel_type"]
                    b, nth = pair[a, t, tb["chans"][t][op["channel_ids"][0]]]
                if name == "wait":
                    if sem[b, a, t, nth] <= used[b, a, t, nth]:
                        break
                    used[b, a, t, nth] += 1
                elif name == "signal":
                    sem[a, b, t, nth] += 1
                elif name == "put":
                    src, dst = op["src_buff"][0], op["dst_buff"][0]
                    rb = G[a]["remote_buffers"][tb["refs"][t][dst["buffer_id"]]]
                    assert rb["rank"] == b
                    for c in range(src["size"]):
                        store[key(b, rb["type"], dst["index"] + c)] = read(
                            a, src["type"], src["index"] + c
                        )
                elif name in ("copy", "re"):
                    dst = op["dst_buff"][0]
                    for c in range(dst["size"]):
                        vals = [read(a, s["type"], s["index"] + c) for s in op["src_buff"]]
                        store[key(a, dst["type"], dst["index"] + c)] = sum(vals, Counter())
                tb["pc"] += 1
                progress = True
    stuck = [(tb["g"], tb["pc"]) for tb in tbs if tb["pc"] < len(tb["ops"])]
    if stuck:
        raise Deadlock(f"threadblocks stuck at (gpu, op) {stuck[:4]}")
    assert sem == used, "signals nobody waits for"
    everyone = lambda j: Counter({(h, j): 1 for h in range(N)})  # noqa: E731
    for g in range(N):
        out = lambda j: store.get(key(g, "o", j))  # noqa: B023, E731
        if coll == "allgather":
            assert all(out(j) == Counter({(j // share, j): 1}) for j in range(C)), g
        elif coll == "allreduce":
            assert all(out(j) == everyone(j) for j in range(C)), g
        elif coll == "reducescatter":
            assert all(out(x) == everyone(g * share + x) for x in range(share)), g
        elif coll == "broadcast":
            assert all(out(j) == Counter({(root, j): 1}) for j in range(C)), g


def ops(plan, gpu, tb=None):
    tbs = plan["gpus"][gpu]["threadblocks"]
    return [op["name"] for t in (tbs if tb is None else [tbs[tb]]) for op in t["ops"]]


# ---------------------------------------------------------------------------------------------
# Shape and counts
# ---------------------------------------------------------------------------------------------


def test_top_level_fields_and_chunks():
    plan = to_mscclpp_json(
        per_root("allgather", gpus(4), chain), name="ag", num_threads_per_block=512
    )
    assert {
        k: plan[k]
        for k in (
            "name",
            "collective",
            "protocol",
            "inplace",
            "num_threads_per_block",
            "use_double_scratch_buffer",
            "min_message_size",
            "max_message_size",
        )
    } == {
        "name": "ag",
        "collective": "allgather",
        "protocol": "Simple",
        "inplace": True,
        "num_threads_per_block": 512,
        "use_double_scratch_buffer": False,
        "min_message_size": 0,
        "max_message_size": 2**64 - 1,
    }
    g0 = plan["gpus"][0]
    assert (g0["id"], g0["input_chunks"], g0["output_chunks"], g0["scratch_chunks"]) == (0, 1, 4, 0)
    assert len(g0["threadblocks"]) == 4  # one per tree
    # One channel per tree arc at gpu 0, in tree order: root of tree 0 (to 1), leaf of tree 1
    # (from 3), middle of trees 2 and 3 (parent 3, child 1).
    assert g0["channels"] == [{"channel_type": "memory", "connected_to": [1, 3, 3, 1, 3, 1]}]
    assert g0["remote_buffers"] == [{"rank": 1, "type": "o", "access_channel_types": ["memory"]}]
    json.dumps(plan)  # JSON-ready
    assert check_mscclpp_plan(plan) == []
    run_plan(plan)


def test_broadcast_ops_put_signal_and_acknowledge():
    plan = to_mscclpp_json(per_root("allgather", gpus(3), chain))
    # gpu 0 in its own tree (root): put + signal to gpu 1, wait for the acknowledgement.
    assert ops(plan, 0, 0) == ["put", "signal", "wait"]
    # gpu 1 in tree 0 (middle): wait for data, forward, acknowledge, wait for the child's ack.
    assert ops(plan, 1, 0) == ["wait", "put", "signal", "signal", "wait"]
    assert ops(plan, 2, 0) == ["wait", "signal"]


def test_reduce_ops_and_scratch():
    plan = to_mscclpp_json(per_root("reduce_scatter", gpus(4), fork))
    assert plan["collective"] == "reducescatter"
    g = plan["gpus"][0]
    assert (g["input_chunks"], g["output_chunks"]) == (4, 1)
    # root (1 child slot), fork node (2 child slots + its partial), 2 leaves: 1 + 3 = 4 chunks.
    assert g["scratch_chunks"] == 4
    # the fork node: wait for both children, reduce, acknowledge both, put up, wait for ack
    assert ops(plan, 1, 0) == ["wait", "wait", "re", "signal", "signal", "put", "signal", "wait"]
    re_op = next(op for op in plan["gpus"][1]["threadblocks"][0]["ops"] if op["name"] == "re")
    assert (
        re_op["src_buff"][0] == {"type": "i", "index": 0, "size": 1} and len(re_op["src_buff"]) == 3
    )
    assert check_mscclpp_plan(plan) == []
    run_plan(plan)


def test_allreduce_skips_acknowledgements():
    plan = to_mscclpp_json(per_root("allreduce", gpus(3), chain))
    assert ops(plan, 0, 0) == ["wait", "re", "put", "signal"]  # root: reduce, then broadcast
    assert ops(plan, 1, 0) == ["wait", "re", "put", "signal", "wait", "put", "signal"]
    assert ops(plan, 2, 0) == ["put", "signal", "wait"]
    assert check_mscclpp_plan(plan) == []
    run_plan(plan)


@pytest.mark.parametrize("coll", ["allgather", "reduce_scatter", "allreduce"])
@pytest.mark.parametrize("inplace", [True, False])
@pytest.mark.parametrize("shape", [chain, fork])
def test_every_collective_moves_the_right_data(coll, inplace, shape):
    plan = to_mscclpp_json(per_root(coll, gpus(4), shape, k=2), inplace=inplace, ninstance=2)
    assert check_mscclpp_plan(plan) == []
    run_plan(json.loads(json.dumps(plan)))


@pytest.mark.parametrize("inplace", [True, False])
def test_broadcast(inplace):
    nodes = gpus(5)
    s = make_schedule("broadcast", nodes, {(nodes[2], i): fork(nodes, 2) for i in range(2)}, k=2)
    plan = to_mscclpp_json(s, inplace=inplace)
    assert plan["gpus"][0]["output_chunks"] == 2
    assert check_mscclpp_plan(plan) == []
    run_plan(plan, root=2)


def test_multiplicity_moves_several_chunks_at_once():
    nodes = gpus(3)
    trees = {(v, 0): chain(nodes, i) for i, v in enumerate(nodes)} | {
        (v, 1): fork(nodes, i) for i, v in enumerate(nodes)
    }
    s = make_schedule("allreduce", nodes, trees, k=3, mult={(v, 0): 2 for v in nodes})
    plan = to_mscclpp_json(s)
    sizes = {
        b["size"]
        for g in plan["gpus"]
        for t in g["threadblocks"]
        for op in t["ops"]
        for b in op.get("dst_buff", [])
    }
    assert sizes == {1, 2}
    assert plan["gpus"][0]["output_chunks"] == 9
    assert check_mscclpp_plan(plan) == []
    run_plan(plan)


def test_port_channels_across_boxes():
    nodes = [f"box{b}/gpu{i}" for b in range(2) for i in range(8)]

    def path(p, c):
        bp, ip = re.findall(r"\d+", p)
        bc, ic = re.findall(r"\d+", c)
        if bp == bc:
            return (p, f"box{bp}/nvswitch", c)
        return (p, f"box{bp}/nic{ip}", f"ib{int(ip) % 2}", f"box{bc}/nic{ic}", c)

    trees = {}
    for b in range(2):
        for i in range(8):
            own = [f"box{b}/gpu{(i + s) % 8}" for s in range(8)]
            far = [f"box{1 - b}/gpu{(i + s) % 8}" for s in range(8)]
            trees[own[0], 0] = (
                [(own[0], far[0])]
                + list(zip(own, own[1:], strict=False))
                + list(zip(far, far[1:], strict=False))
            )
    s = make_schedule("allgather", nodes, trees, path=path)
    for topo in (None, dgx_a100(boxes=2)):
        plan = to_mscclpp_json(s, topology=topo)
        g0 = {c["channel_type"]: c["connected_to"] for c in plan["gpus"][0]["channels"]}
        assert set(g0["port"]) == {8}  # only the NIC path to box1/gpu0 is a port channel
        assert all(p < 8 for p in g0["memory"])
        assert "flush" in ops(plan, 0)
        assert check_mscclpp_plan(plan) == []
        run_plan(plan)


@pytest.mark.parametrize(
    ("coll", "kwargs", "message"),
    [
        ("allgather", {"protocol": "LL"}, "needs LL packet operations"),
        ("allgather", {"ninstance": 0}, "ninstance must be a positive integer"),
        ("allgather", {"num_threads_per_block": 1000}, "multiple of 32 up to 1024"),
        ("allgather", {"min_message_size": 5, "max_message_size": 4}, "min_message_size"),
    ],
)
def test_bad_arguments(coll, kwargs, message):
    with pytest.raises(MscclppError, match=message):
        to_mscclpp_json(per_root(coll, gpus(3), chain), **kwargs)


def test_reduce_is_not_an_mscclpp_collective():
    nodes = gpus(3)
    s = Schedule(
        "reduce",
        "hand",
        tuple(nodes),
        1,
        Fraction(1),
        Fraction(1),
        (
            Phase(
                "reduce",
                (
                    Tree(
                        "g0",
                        0,
                        1,
                        (TreeArc("g0", "g1", ("g1", "g0")), TreeArc("g0", "g2", ("g2", "g0"))),
                    ),
                ),
            ),
        ),
    )
    with pytest.raises(MscclppError, match="not for reduce"):
        to_mscclpp_json(s)


# ---------------------------------------------------------------------------------------------
# check_mscclpp_plan catches inconsistent plans
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good() -> dict:
    return to_mscclpp_json(per_root("allgather", gpus(3), fork))


def broken(plan, edit):
    p = copy.deepcopy(plan)
    edit(p)
    return check_mscclpp_plan(p)


def test_good_plan_is_consistent(good):
    assert check_mscclpp_plan(good) == []


def test_missing_wait_unbalances_the_channel(good):
    def edit(p):
        p["gpus"][1]["threadblocks"][0]["ops"].pop(0)  # gpu 1 no longer waits for gpu 0's put

    (problem,) = broken(good, edit)
    assert re.match(
        r"gpu 0 signals memory channel #0 to gpu 1 1 time\(s\) but gpu 1 waits on it 0 time\(s\)",
        problem,
    )


def test_put_without_signal(good):
    def edit(p):
        tb = p["gpus"][0]["threadblocks"][0]["ops"]
        del tb[tb.index(next(o for o in tb if o["name"] == "signal"))]

    assert any("is never followed by a signal" in m for m in broken(good, edit))


def test_chunk_out_of_range(good):
    def edit(p):
        next(o for o in p["gpus"][0]["threadblocks"][0]["ops"] if o["name"] == "put")["dst_buff"][
            0
        ]["index"] = 3

    assert any(
        "dst chunks 3..3 of gpu 1's 'o' buffer, which has 3" in m for m in broken(good, edit)
    )


def test_unknown_channel_and_buffer(good):
    def edit(p):
        put = next(o for o in p["gpus"][0]["threadblocks"][0]["ops"] if o["name"] == "put")
        put["channel_ids"] = [7]
        put["dst_buff"][0]["buffer_id"] = 5

    problems = broken(good, edit)
    assert any("channel_ids outside the threadblock's memory channels" in m for m in problems)
    assert any("buffer_id 5 not in the threadblock's refs" in m for m in problems)


def test_unpaired_channels_and_ids(good):
    n = good["gpus"][0]["channels"][0]["connected_to"].count(2)

    def edit(p):
        p["gpus"][0]["channels"][0]["connected_to"].append(2)
        p["gpus"][2]["id"] = 5

    problems = broken(good, edit)
    assert any(
        f"gpu 0 has {n + 1} memory channel(s) to gpu 2 but gpu 2 has {n} to gpu 0" in m
        for m in problems
    )
    assert any("gpus[2] has id 5" in m for m in problems)


def test_put_into_the_wrong_peer(good):
    def edit(p):
        p["gpus"][0]["remote_buffers"][0]["rank"] = 2

    assert any("writes gpu 2's buffer over a channel to gpu 1" in m for m in broken(good, edit))


def test_missing_top_level_field(good):
    assert broken(good, lambda p: p.pop("max_message_size")) == [
        "missing top-level 'max_message_size'"
    ]


# ---------------------------------------------------------------------------------------------
# Property: random schedules give consistent, correct plans
# ---------------------------------------------------------------------------------------------


@st.composite
def random_schedules(draw):
    n = draw(st.integers(2, 5))
    nodes = gpus(n)
    coll = draw(st.sampled_from(sorted(PHASES)))
    ntrees = draw(st.integers(1, 2))
    mult = [draw(st.integers(1, 2)) for _ in range(ntrees)]
    roots = [nodes[draw(st.integers(0, n - 1))]] if coll == "broadcast" else nodes
    trees, m = {}, {}
    for r in roots:
        for i in range(ntrees):
            order = [r] + draw(st.permutations([v for v in nodes if v != r]))
            trees[r, i] = [(order[draw(st.integers(0, j - 1))], order[j]) for j in range(1, n)]
            m[r, i] = mult[i]
    s = make_schedule(coll, nodes, trees, k=sum(mult), mult=m)
    return s, nodes.index(roots[0]), draw(st.booleans()), draw(st.integers(1, 2))


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_schedules())
def test_random_schedules_give_consistent_correct_plans(case):
    s, root, inplace, ninstance = case
    plan = to_mscclpp_json(s, inplace=inplace, ninstance=ninstance)
    assert check_mscclpp_plan(plan) == []
    run_plan(plan, root=root)


def test_planned_dgx_a100_plan_is_consistent():
    plan_mod = pytest.importorskip("datahall.collectives.plan")
    G = dgx_a100(boxes=2)
    for coll in ("allgather", "allreduce"):
        plan = to_mscclpp_json(plan_mod.plan(G, coll), topology=G)  # any k: no fixed_k needed
        assert check_mscclpp_plan(plan) == []
        run_plan(plan)
