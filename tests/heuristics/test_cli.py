"""``datahall heuristics``: analyze a user's module, the built-ins, and bad input as one line with
exit code 2."""

import json
import textwrap

import pytest

from datahall.heuristics.builtins import build

PINNED = textwrap.dedent(
    """
    from datahall.heuristics import problem

    def total(x):
        return sum(x)

    @problem(optimum=total, lower=0, upper=10, dim=3)
    def pinned(x):
        return sum(d for d in x if d > 2)

    def plain(x):
        return sum(d for d in x if d > 2)

    def coin(x):
        import random
        return random.random()
    """
)


@pytest.fixture
def module(tmp_path, monkeypatch):
    path = tmp_path / "cli_mod_heur.py"
    path.write_text(PINNED)
    monkeypatch.syspath_prepend(str(tmp_path))
    return path


def test_analyze_a_decorated_problem_from_a_file(cli, module, tmp_path):
    out = tmp_path / "res.json"
    code, stdout, _ = cli(
        "heuristics",
        "analyze",
        f"{module}:pinned",
        "--budget",
        "2s",
        "-w",
        "1",
        "--json",
        "--out",
        str(out),
    )
    assert code == 0
    doc = json.loads(stdout)
    assert doc["gap"] == 6.0 and doc["input"] == {"x[0]": 2.0, "x[1]": 2.0, "x[2]": 2.0}
    assert doc["paths"]["explored"] == 8 and doc["paths"]["complete"]
    assert json.loads(out.read_text())["gap"] == 6.0


def test_analyze_a_plain_function_with_opt_and_bounds(cli, module):
    code, stdout, _ = cli(
        "heuristics",
        "analyze",
        "cli_mod_heur:plain",
        "--opt",
        "cli_mod_heur:total",
        "--bounds",
        "0:10",
        "--dim",
        "3",
        "--budget",
        "2s",
        "-w",
        "1",
        "--compare",
        "random",
    )
    assert code == 0
    assert "worst case found" in stdout and "same budget" in stdout and "random" in stdout
    assert "adversarial input: 3 non-zero of 3" in stdout


def test_builtin_json_is_a_true_gap(cli):
    code, stdout, _ = cli(
        "heuristics",
        "builtin",
        "knapsack",
        "-p",
        "items=3",
        "--budget",
        "2s",
        "-w",
        "1",
        "--json",
    )
    assert code == 0
    doc = json.loads(stdout)
    p = build("knapsack", items=3)
    x = [doc["input"].get(p.label(i), 0.0) for i in range(p.dim)]
    assert doc["gap"] == p.gap(x) > 0 and doc["problem"] == "knapsack"


def test_list_names_every_builtin(cli):
    code, stdout, _ = cli("heuristics", "list", "--json")
    assert code == 0
    assert set(json.loads(stdout)) == {"dp", "pop", "ff", "ffd", "knapsack", "matching"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["analyze", "no_such_module_xyz:h", "--opt", "m:o", "--bounds", "0:1", "--dim", "1"],
            "cannot import 'no_such_module_xyz'",
        ),
        (
            [
                "analyze",
                "cli_mod_heur:missing",
                "--opt",
                "cli_mod_heur:total",
                "--bounds",
                "0:1",
                "--dim",
                "1",
            ],
            "has no attribute 'missing'",
        ),
        (["analyze", "cli_mod_heur:plain"], "needs --opt"),
        (
            ["analyze", "cli_mod_heur:plain", "--opt", "cli_mod_heur:total", "--bounds", "0:1"],
            "needs --dim",
        ),
        (
            [
                "analyze",
                "cli_mod_heur:plain",
                "--opt",
                "cli_mod_heur:total",
                "--bounds",
                "a:b",
                "--dim",
                "2",
            ],
            "bad --bounds item",
        ),
        (
            [
                "analyze",
                "cli_mod_heur:coin",
                "--opt",
                "cli_mod_heur:total",
                "--bounds",
                "0:5",
                "--dim",
                "2",
                "--budget",
                "1s",
            ],
            "not deterministic",
        ),
        (["analyze", "cli_mod_heur:pinned", "--budget", "soon"], "bad --budget"),
        (
            ["analyze", "cli_mod_heur:pinned", "--sense", "min", "--budget", "1s", "-w", "1"],
            "already a problem",
        ),
        (["builtin", "sudoku"], "unknown built-in problem 'sudoku'"),
        (["builtin", "knapsack", "-p", "colour=3"], "has no parameter 'colour'"),
        (["builtin", "knapsack", "--topology", "abilene"], "takes no --topology"),
        (["builtin", "dp", "--topology", "atlantis", "--budget", "1s"], "atlantis"),
        (["builtin", "ffd", "--compare", "magic", "--budget", "1s"], "unknown baseline 'magic'"),
        (["builtin", "ff", "-p", "items=abc"], "parameter items must be int, not 'abc'"),
        (["builtin", "matching", "-p", "max_weight=2.5"], "parameter max_weight must be int"),
        (["builtin", "dp", "-p", "pairs=True"], "pairs must be"),
        (["builtin", "dp", "-p", "pairs=[1, 2]"], "pairs must be"),
        (
            [
                "analyze",
                "cli_mod_heur:plain",
                "--opt",
                "cli_mod_heur:total",
                "--bounds",
                "0:1",
                "--dim",
                "0",
            ],
            "--dim must be at least 1",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(cli, module, args, message):
    code, stdout, stderr = cli("heuristics", *args)
    assert code == 2
    assert message in stderr and "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) <= 2  # one message, wrapped at most once


def test_a_file_named_like_an_imported_module_is_refused(cli, tmp_path):
    # importing json.py by name would give the standard library's json, not this file
    path = tmp_path / "json.py"
    path.write_text(PINNED)
    code, _, stderr = cli("heuristics", "analyze", f"{path}:pinned", "--budget", "1s", "-w", "1")
    assert code == 2 and "Traceback" not in stderr
    assert "rename" in stderr and "json" in stderr


def test_a_missing_baseline_package_is_reported_before_the_analysis(cli, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "optuna" else find_spec(name, *a),
    )
    code, _, stderr = cli(
        "heuristics", "builtin", "ffd", "--compare", "random,optuna", "--budget", "1s", "-w", "1"
    )
    assert code == 2 and "Traceback" not in stderr
    assert "optuna" in stderr and "pip install" in stderr
