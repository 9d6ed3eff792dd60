"""The tour's eBPF step: every tenant program gets the verdict its operator intended."""

import json

from rich.progress import Progress

from datahall.ebpf import demo


def test_demo_decides_every_case_as_intended(tmp_path, fixture_objects):
    with Progress(disable=True) as progress:
        result = demo.run(tmp_path, progress)
    assert (result.system, result.value, result.unit) == ("ebpf", 100.0, "%")
    assert round(result.baseline_value, 2) == 57.14 and round(result.ratio, 2) == 1.75
    rows = {r["program"]: r["verdict"] for r in result.details["programs"]}
    assert rows == {name: expected for name, _, expected in demo.CASES}
    assert "interfere_a.c:42: iph->tos = DSCP_AF41 | (iph->tos & 3);" in result.what
    assert result.details["interference"]["verdict"] == "INTERFERE"
    assert [f.name for f in result.figures] == ["counterexample.png"]
    assert (
        json.loads((tmp_path / "results.json").read_text())["programs"][0]["program"] == "rewriter"
    )
