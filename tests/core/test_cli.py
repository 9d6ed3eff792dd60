import json
import sys
import textwrap

import pytest

from datahall import systems
from datahall.cli import main
from datahall.core.topologies import build
from datahall.core.topology import save


def test_systems_lists_all_thirteen(cli):
    code, out, _ = cli("systems", "--json")
    rows = json.loads(out)
    assert code == 0 and len(rows) == 13
    assert {r["title"] for r in rows} >= {"ForestColl", "DroidSpeak", "AVA", "Eywa", "HEDGE"}
    for r in rows:
        assert r["status"] in ("ready", "planned")
        assert (r["command"] == "") == (r["status"] == "planned")


def test_topology_show_dgx_a100_two_boxes(cli):
    code, out, _ = cli("topology", "show", "dgx-a100", "--boxes", "2", "--json")
    info = json.loads(out)
    s = info["summary"]
    assert code == 0
    assert (s["nodes"], s["arcs"], s["compute_nodes"]) == (36, 96, 16)
    assert s["min_cut_exit_bandwidth_per_compute_node_GBps"] == pytest.approx(65 / 3)
    assert s["bottleneck_cut_compute_nodes"] == 15 and s["bottleneck_cut_exit_GBps"] == 325
    gpu0 = next(n for n in info["nodes"] if n["id"] == "box0/gpu0")
    assert gpu0["egress_GBps"] == 325 and gpu0["kind"] == "gpu"
    assert len(info["links"]) == 48
    code, out, _ = cli("topology", "show", "dgx-a100", "--boxes", "2")
    assert "65/3" in out and "box1/nic7" in out


def test_topology_list_and_files(cli, tmp_path):
    code, out, _ = cli("topology", "list", "--json")
    assert code == 0 and "mi250" in {g["name"] for g in json.loads(out)}
    path = save(build("mi250"), tmp_path / "mi.yaml")
    code, out, _ = cli("topology", "show", str(path), "--json")
    assert code == 0 and json.loads(out)["summary"]["compute_nodes"] == 16


def test_topology_draw_writes_a_png(cli, tmp_path):
    png = tmp_path / "a.png"
    code, out, _ = cli("topology", "draw", "dgx-a100", "-b", "2", "-o", str(png))
    assert code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["topology", "show", "dgx-z"], "unknown topology 'dgx-z'"),
        (["frobnicate"], "No such command 'frobnicate'"),
        (["topology", "show", "dgx-a100", "-p", "rails=x"], "expected int"),
        (["topology", "show", "dgx-a100", "-p", "colour=1"], "no parameter 'colour'"),
        (["tour", "--only", "nosuch"], "unknown system 'nosuch'"),
    ],
)
def test_bad_input_is_one_line_exit_2(cli, args, message):
    code, out, err = cli(*args)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_bad_files(cli, tmp_path):
    neg = tmp_path / "neg.json"
    neg.write_text(
        json.dumps(
            {
                "nodes": [{"id": "a", "kind": "gpu"}, {"id": "b", "kind": "gpu"}],
                "links": [{"source": "a", "target": "b", "capacity": -5}],
            }
        )
    )
    code, _, err = cli("topology", "show", str(neg))
    assert code == 2 and "capacity must be > 0" in err
    broken = tmp_path / "broken.json"
    broken.write_text("{nodes: ")
    code, _, err = cli("topology", "show", str(broken))
    assert code == 2 and "not valid JSON" in err


def test_debug_shows_the_traceback(cli):
    with pytest.raises(ValueError, match="unknown topology"):
        main(["--debug", "topology", "show", "dgx-z"])


def test_tour_runs_ready_demos_and_writes_the_report(cli, tmp_path, monkeypatch):
    (tmp_path / "fake_demo.py").write_text(
        textwrap.dedent("""
        from datahall.core.report import DemoResult, new_figure, save_figure
        def run(out_dir, progress):
            task = progress.add_task("fake", total=1)
            fig, ax = new_figure()
            ax.plot([1, 2], [3, 4])
            png = save_figure(fig, out_dir / "f.png")
            progress.advance(task)
            return DemoResult("fake", "a made-up run", "speed", 30.0, "old", 10.0, "GB/s",
                              figures=[png])
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    fake = systems.System("fake", "Fake", "fake", "x", "none", "ready", None, "fake_demo:run")
    monkeypatch.setattr(systems, "ready", lambda: [fake])
    code, out, _ = cli("tour", "--out", str(tmp_path / "r"))
    assert code == 0 and "3.00x" in out
    html = (tmp_path / "r" / "index.html").read_text()
    assert "data:image/png;base64," in html and "a made-up run" in html
    results = json.loads((tmp_path / "r" / "results.json").read_text())["results"]
    assert results[0]["ratio"] == 3.0 and results[0]["value"] == 30.0
    sys.modules.pop("fake_demo", None)
