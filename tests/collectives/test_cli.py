import json

import pytest

from datahall.collectives.msccl import lint_msccl_xml


def test_bound_reference_values(cli):
    code, out, _ = cli(
        "collectives", "bound", "-t", "dgx-a100", "-b", "2", "--fixed-k", "1", "--json"
    )
    data = json.loads(out)
    assert code == 0
    assert (data["x_star"], data["k"], data["U"]) == ("65/3", 13, "3/5")
    assert data["algbw_GBps"] == pytest.approx(1040 / 3)
    assert data["fixed_k_algbw_GBps"] == pytest.approx(2400 / 7)
    assert data["cut_compute_nodes"] == 15 and data["cut_exit_GBps"] == 325


def test_allreduce_bound_is_half(cli):
    code, out, _ = cli(
        "collectives", "bound", "-t", "dgx-a100", "-b", "2", "-c", "allreduce", "--json"
    )
    assert json.loads(out)["algbw_GBps"] == pytest.approx(520 / 3)


def test_plan_exports_msccl_that_lints_clean(cli, tmp_path):
    xml = tmp_path / "ag.xml"
    code, out, _ = cli(
        "collectives",
        "plan",
        "-t",
        "dgx-a100",
        "-b",
        "1",
        "--format",
        "msccl",
        "-o",
        str(xml),
        "--json",
    )
    summary = json.loads(out)
    assert code == 0 and summary["optimal"] and summary["k"] == 1
    assert [f for f in lint_msccl_xml(xml) if f.severity == "error"] == []
    code, out, _ = cli("collectives", "lint", str(xml))
    assert code == 0 and "no problems found" in " ".join(out.split())


def test_plan_json_and_fail_link(cli, tmp_path):
    out_file = tmp_path / "s.json"
    code, out, _ = cli(
        "collectives",
        "plan",
        "-t",
        "dgx-a100",
        "-b",
        "2",
        "--fail-link",
        "box0/nic0,ib0",
        "-o",
        str(out_file),
        "--json",
    )
    data = json.loads(out)
    assert code == 0 and data["optimal"]
    # one NIC fewer: box 0 exits through 7 NICs, so the optimum drops below 346.67
    assert data["algbw_GBps"] < 1040 / 3
    assert json.loads(out_file.read_text())["collective"] == "allgather"


def test_simulate_and_compare(cli, tmp_path):
    code, out, _ = cli(
        "collectives", "simulate", "-t", "dgx-a100", "-b", "1", "--size", "64MiB", "--json"
    )
    data = json.loads(out)
    assert code == 0 and 0.9 < data["fraction_of_optimal"] <= 1.0
    png = tmp_path / "c.png"
    code, out, _ = cli(
        "collectives", "compare", "-t", "ring", "-p", "n=4", "-o", str(png), "--json"
    )
    data = json.loads(out)
    assert code == 0 and png.exists() and "forestcoll" in data["algbw_GBps"]
    assert len(data["sizes"]) == 24 and data["sizes"][0] == 1024 and data["sizes"][-1] == 2**33


def test_draw_writes_png(cli, tmp_path):
    png = tmp_path / "t.png"
    code, _, _ = cli("collectives", "draw", "-t", "dgx-a100", "-b", "2", "-o", str(png))
    assert code == 0 and png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["bound", "-t", "dgx-a100", "--fail-link", "box0/gpu0,nowhere"], "no node 'nowhere'"),
        (["bound", "-t", "dgx-a100", "-c", "alltoall"], "unknown collective"),
        (["bound"], "exactly one of --topology"),
        (["simulate", "-t", "ring", "-a", "magic"], "unknown algorithm"),
        (["bound", "-t", "ring", "-p", "capacity=-5"], "capacity"),
    ],
)
def test_bad_input(cli, args, message):
    code, _, err = cli("collectives", *args)
    assert code == 2 and message in err and "Traceback" not in err


def test_disconnected_fabric_and_non_msccl_xml(cli, tmp_path):
    topo = tmp_path / "split.json"
    topo.write_text(
        json.dumps(
            {
                "nodes": [{"id": f"g{i}", "kind": "gpu"} for i in range(4)],
                "links": [
                    {"source": "g0", "target": "g1", "capacity": 10},
                    {"source": "g2", "target": "g3", "capacity": 10},
                ],
            }
        )
    )
    code, _, err = cli("collectives", "bound", "-f", str(topo))
    assert code == 2 and "unreachable" in err
    bad = tmp_path / "x.xml"
    bad.write_text("<html><body/></html>")
    code, _, err = cli("collectives", "lint", str(bad))
    assert code == 2 and "MSCCL" in err
