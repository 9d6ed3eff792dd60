"""The tour's heuristics demo, on a short budget: a result the tour can print and a figure."""

import json

from rich.progress import Progress

from datahall.heuristics import demo


def test_demo_reports_a_true_gap_beside_random_search(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "BUDGET_S", 2.0)
    with Progress(disable=True) as progress:
        r = demo.run(tmp_path, progress)
    assert r.system == "heuristics" and r.unit == "%"
    assert r.value > 0 and r.baseline_value >= 0
    assert all(f.exists() and f.stat().st_size > 0 for f in r.figures)
    saved = json.loads((tmp_path / "results.json").read_text())
    found = saved["problem"]
    assert abs(100 * found["normalized_gap"] - r.value) < 1e-6
    assert saved["random_search"]["seconds"] <= 3.0
    # the adversarial input is a real input: re-evaluating it gives the reported gap
    from datahall.heuristics.builtins import build

    p = build("dp", topology="abilene")
    x = [found["input"].get(p.label(i), 0.0) for i in range(p.dim)]
    assert abs(p.gap(x) - found["gap"]) < 1e-6
