"""The profile's online choice, TTFT model and JSON form, on hand-made profiles; the divergence
sweep on tiny decoders."""

import json

import pytest

torch = pytest.importorskip("torch")

from datahall.kvshare.hybrid import full_prefill, generate, hybrid_kv, prefill  # noqa: E402
from datahall.kvshare.models import tiny  # noqa: E402
from datahall.kvshare.profile import (  # noqa: E402
    Config,
    Profile,
    _logp,
    _Probe,
    group_divergence,
    layer_sensitivity,
)


def config(group, quality, kl=0.1):
    return Config(group, kl, quality, quality, {"t": quality}, (group[1] - group[0]) / 30, 1000.0)


def profile(frontier):
    return Profile(
        "a",
        "b",
        "base",
        30,
        [0.0] * 30,
        {c.group: c.kl for c in frontier},
        frontier,
        frontier,
        {"t": 0.5},
        {"layer_s_per_token": 1e-4, "suffix_s": 0.2, "recompute_layer_s": 0.0},
        100.0,
        150.0,
    )


FRONTIER = [config((0, 0), 0.80), config((3, 5), 0.97), config((2, 6), 0.985), config((0, 10), 1.0)]


def test_choice_is_the_fastest_point_within_the_quality_budget():
    p = profile(FRONTIER)
    assert p.choose(0.02).group == (2, 6)
    assert p.choose(0.05).group == (3, 5)
    assert p.choose(0.25).group == (0, 0)
    assert p.choose(0.0).group == (0, 10)
    assert p.best().group == (0, 10)
    tie = profile([config((0, 0), 0.8), config((4, 8), 0.99), config((1, 9), 0.99)])
    assert tie.best().group == (4, 8)  # equal quality: fewer layers


def test_ttft_target_and_the_error_when_nothing_fits():
    p = profile(FRONTIER)
    # compute = layers · 1e-4 s · 1024 tokens, plus a 0.2 s suffix
    assert p.estimate_ttft(FRONTIER[2], 1024) == pytest.approx(4 * 1e-4 * 1024 + 0.2)
    assert p.choose(0.0, ttft_target=2.0).group == (0, 10)
    with pytest.raises(ValueError, match=r"loses at most 0% within 1 s .*best: \[0, 10\]"):
        p.choose(0.0, ttft_target=1.0)


def test_pipelined_transfer_model():
    p = profile(FRONTIER)
    c = FRONTIER[1]  # [3, 5): 2 layers, E cache needed
    bw = 1e6
    kv_s = 28 * 100 * 1024 / bw
    e_s = 150 * 1024 / bw
    compute = 2 * 1e-4 * 1024
    assert p.estimate_ttft(c, 1024, bw) == pytest.approx(max(e_s + compute, kv_s) + 0.2)
    # full reuse needs no E cache, full recompute no transfer at all
    assert p.estimate_ttft(FRONTIER[0], 1024, bw) == pytest.approx(30 * 100 * 1024 / bw + 0.2)


def test_json_round_trip(tmp_path):
    p = profile(FRONTIER)
    path = p.save(tmp_path / "x" / "p.json")
    q = Profile.load(path)
    assert q.frontier == p.frontier and q.divergence == p.divergence and q.timing == p.timing
    assert json.loads(path.read_text())["divergence"][1] == [3, 5, 0.1]
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not a readable kvshare profile"):
        Profile.load(path)


def probes(S, R, n=2):
    out = []
    for seed in range(n):
        prefix = torch.randint(
            1, 250, (24,), generator=torch.Generator().manual_seed(seed)
        ).tolist()
        suffix = [5, 6, 7]
        own = full_prefill(R, prefix)
        answer = generate(R, own, suffix, 3).ids
        p = _Probe(prefill(S, prefix), torch.tensor([suffix + answer]), len(answer), torch.empty(0))
        p.reference = _logp(R, own, p)
        out.append(p)
    return out


class _M:  # the few attributes of datahall.kvshare.models.Model the sweep uses
    def __init__(self, model):
        self.model, self.num_layers = model, model.config.num_hidden_layers


def test_divergence_sweep_matches_direct_hybrid_caches():
    S, R = tiny(seed=0), tiny(seed=1)
    ps = probes(S, R)
    div = group_divergence(_M(R), ps, max_group=2)
    assert set(div) == {(0, 0)} | {
        (s, e) for s in range(4) for e in range(s + 1, min(4, s + 2) + 1)
    }
    for group in [(1, 3), (0, 1), (0, 0)]:
        direct = sum(
            float(
                (p.reference.exp() * (p.reference - _logp(R, hybrid_kv(R, p.sent, group), p)))
                .sum(-1)
                .mean()
            )
            for p in ps
        ) / len(ps)
        assert div[group] == pytest.approx(direct, rel=1e-6, abs=1e-9)
    assert div[(0, 2)] >= 0 and div[(0, 0)] > 0
    sens = layer_sensitivity(_M(R), ps)
    assert len(sens) == 4 and sens[0] == pytest.approx(div[(0, 1)], rel=1e-6)


def test_divergence_is_zero_when_sender_is_receiver():
    S = tiny(seed=2)
    div = group_divergence(_M(S), probes(S, S, 1), max_group=4)
    assert max(div.values()) == pytest.approx(0.0, abs=1e-6)
