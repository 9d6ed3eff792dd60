"""`datahall kvshare`: bad input ends in one line and exit code 2; `run` shows three modes."""

import json

import pytest

pytest.importorskip("torch")

CONTEXT = "The for statement iterates over the items of a sequence, in order. " * 6


def one_line_error(code, err, *fragments):
    assert code == 2
    assert err.startswith("error:") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["run", "tiny-llama", "tiny-qwen2"], ["different architectures", "model_type"]),
        (["run", "tiny-llama", "tiny-llama:1"], ["has no tokenizer"]),
        (["run", "nosuch", "tiny-llama"], ["unknown model 'nosuch'"]),
        (["finetune", "poet"], ["unknown variant 'poet'", "coder-mid"]),
    ],
)
def test_bad_models_are_one_line(cli, args, fragments):
    one_line_error(*cli("kvshare", *args)[::2], *fragments)


def test_group_outside_the_layers_is_one_line(cli, smollm2_dir):
    code, _, err = cli("kvshare", "run", "smollm2", "smollm2", "-c", CONTEXT, "-g", "0,99")
    one_line_error(code, err, "[0, 99)", "30")
    code, _, err = cli("kvshare", "run", "smollm2", "smollm2", "-c", CONTEXT, "-g", "three")
    one_line_error(code, err, "--group must be S,E")


def test_unknown_task_is_one_line(cli, smollm2_dir):
    code, _, err = cli("kvshare", "eval", "smollm2", "smollm2", "-g", "0,2", "-t", "poetry")
    one_line_error(code, err, "unknown task 'poetry'", "docs-qa")


def test_run_with_sender_as_receiver_gives_three_equal_answers(cli, smollm2_dir, tmp_path):
    """Any group of a model reusing its own cache is its full prefill (issue 4 identity)."""
    out = tmp_path / "run.json"
    code, stdout, _ = cli(
        "kvshare", "run", "smollm2", "smollm2", "-c", CONTEXT, "-g", "4,9", "-n", "6",
        "-o", str(out), "--json",
    )  # fmt: skip
    assert code == 0
    result = json.loads(stdout)
    assert result == json.loads(out.read_text())
    assert result["group"] == [4, 9]
    modes = result["modes"]
    assert [modes[m]["recomputed_layers"] for m in modes] == [30, 0, 5]
    assert (
        modes["full-prefill"]["text"] == modes["full-reuse"]["text"] == modes["droidspeak"]["text"]
    )
    assert modes["full-prefill"]["text"]
    assert result["transfer_bytes"] > 0


def test_auto_group_without_a_group_in_budget_is_one_line(cli, smollm2_dir):
    """The shipped coder-mid profile has no group within 2%: `--group auto` says so."""
    code, _, err = cli("kvshare", "run", "smollm2", "coder-mid", "-c", CONTEXT)
    one_line_error(code, err, "no profiled group of smollm2 -> coder-mid", "--max-group")


def test_run_has_a_default_context(cli, smollm2_dir):
    code, stdout, err = cli(
        "kvshare", "run", "smollm2", "smollm2", "-g", "25,30", "-n", "2", "--json"
    )
    assert code == 0, err
    assert json.loads(stdout)["context_tokens"] > 500
