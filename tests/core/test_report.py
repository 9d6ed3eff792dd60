import json
from fractions import Fraction
from pathlib import Path

import numpy as np

from datahall.core.report import DemoResult, cell, jsonable, write_json


def test_jsonable_converts_results():
    data = {
        "x": Fraction(65, 3),
        "s": frozenset({"b", "a"}),
        "p": Path("r/x.png"),
        "a": np.arange(3),
        "f": np.float64(2.5),
    }
    assert jsonable(data) == {
        "x": 65 / 3,
        "s": ["a", "b"],
        "p": "r/x.png",
        "a": [0, 1, 2],
        "f": 2.5,
    }


def test_write_json_creates_folders(tmp_path):
    path = write_json(tmp_path / "a" / "b.json", {"r": DemoResult("s", "w", "h", 2, "b", 1, "u")})
    assert json.loads(path.read_text())["r"]["baseline_value"] == 1


def test_ratio_respects_direction():
    assert DemoResult("s", "w", "t", 2.0, "b", 8.0, "s", higher_is_better=False).ratio == 4.0
    assert DemoResult("s", "w", "bw", 300.0, "b", 200.0, "GB/s").ratio == 1.5


def test_cell_formats():
    assert cell(Fraction(65, 3)) == "21.67" and cell(25.0) == "25" and cell(None) == ""
