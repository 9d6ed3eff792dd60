"""The three-mode evaluation on tiny decoders with SmolLM2's real tokenizer and chat template."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from datahall.kvshare.evaluate import MODES, evaluate_pair, loss_interval  # noqa: E402
from datahall.kvshare.models import Model, tiny  # noqa: E402
from datahall.kvshare.tasks import build_task  # noqa: E402


@pytest.fixture(scope="module")
def models(tokenizer):
    vocab = len(tokenizer)

    def m(name, seed):
        return Model(name, tiny("llama", seed=seed, vocab=vocab), tokenizer, "tiny")

    return m("sender", 0), m("receiver", 1)


def tasks(tokenizer):
    count = lambda t: len(tokenizer.encode(t, add_special_tokens=False))  # noqa: E731
    return [
        build_task(name, 3, context_tokens=96, count_tokens=count)
        for name in ("definitions", "code")
    ]


def test_full_group_answers_exactly_like_full_prefill(models, tokenizer):
    S, R = models
    rep = evaluate_pair(S, R, tasks(tokenizer), (0, 4), modes=["droidspeak", "full-prefill"])
    by = {(a.task, a.example, a.mode): a for a in rep.answers}
    for (task, ex, _), a in by.items():
        assert a.text == by[task, ex, "full-prefill"].text
        assert a.agreement == 1.0
    for task in ("definitions", "code"):
        assert rep.summary(task, "droidspeak").score == rep.summary(task, "full-prefill").score
    assert [s.mode for s in rep.summaries[:2]] == ["full-prefill", "droidspeak"]  # order fixed


def test_sender_as_receiver_makes_every_mode_agree(models, tokenizer):
    S, _ = models
    rep = evaluate_pair(S, S, tasks(tokenizer), (1, 3))
    assert {a.mode for a in rep.answers} == set(MODES)
    assert all(a.agreement == 1.0 for a in rep.answers)
    assert all(a.ttft_s > 0 for a in rep.answers)
    assert len(rep.answers) == 3 * 6
    json = rep.to_json()
    assert json["group"] == (1, 3) and json["num_layers"] == 4


def test_limit_progress_and_bad_modes(models, tokenizer):
    S, R = models
    seen = []
    rep = evaluate_pair(
        S, R, tasks(tokenizer), (0, 1), limit=1, progress=lambda d, t: seen.append((d, t))
    )
    assert seen == [(1, 2), (2, 2)] and len(rep.answers) == 2 * 3
    with pytest.raises(ValueError, match="unknown mode"):
        evaluate_pair(S, R, tasks(tokenizer), (0, 1), modes=["magic"])
    with pytest.raises(ValueError, match="outside the model's layers"):
        evaluate_pair(S, R, tasks(tokenizer), (0, 9))


def test_full_prefill_agrees_fully_with_itself_on_every_task(models, tokenizer):
    # code answers span several lines; agreement reduces both sides to their first line
    S, R = models
    rep = evaluate_pair(S, R, tasks(tokenizer), (0, 1), modes=["full-prefill"])
    assert all(a.agreement == 1.0 for a in rep.answers)


@given(
    st.lists(st.floats(0.01, 1.0), min_size=1, max_size=30),
    st.floats(0.0, 2.0),
)
def test_loss_interval_of_a_scaled_mode_is_the_scale(base, c):
    """Every bootstrap draw of c·scores loses exactly 1 − c, so the interval collapses there."""
    lo, hi = loss_interval(base, [c * x for x in base])
    assert lo == pytest.approx(1 - c, abs=1e-9) and hi == pytest.approx(1 - c, abs=1e-9)


def test_loss_interval_is_seeded_and_brackets_a_noisy_loss():
    base = [0.2, 0.9, 0.4, 0.7, 0.1, 0.8, 0.5, 0.6] * 5
    other = [x - 0.1 if i % 2 else x for i, x in enumerate(base)]
    lo, hi = loss_interval(base, other)
    assert (lo, hi) == loss_interval(base, other)
    assert 0 < lo < 1 - sum(other) / sum(base) < hi < 0.2
    with pytest.raises(ValueError, match="equally long"):
        loss_interval([1.0], [1.0, 2.0])
