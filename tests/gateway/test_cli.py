"""``datahall gateway``: check, serve and sim, through datahall's own entry point (bad input is
one line and exit code 2), and ``serve`` for real in a subprocess stopped with Ctrl-C."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import textwrap
import threading

import httpx
import pytest

import datahall.cli as root
from datahall.gateway.cli import app as gateway_app
from datahall.gateway.cli import parse_speeds
from datahall.gateway.config import EXAMPLE_CONFIG
from datahall.gateway.simulate import SimConfig, serve_backends


@pytest.fixture
def gw(cli):
    """`datahall gateway ...` as it runs once the registry lists the gateway as ready."""
    root.app.add_typer(gateway_app, name="gateway")
    try:
        yield lambda *args: cli("gateway", *args)
    finally:
        root.app.registered_groups.pop()


BAD = """\
backends:
  - url: http://127.0.0.1:8001
  - url: ftp://127.0.0.1:8002
"""


def test_check_summarises_a_valid_config(gw, monkeypatch):
    monkeypatch.delenv("ACME_APP_KEY", raising=False)
    # the example tells its reader the command that checks it
    assert "datahall gateway check --config" in EXAMPLE_CONFIG.read_text().split("\n\n")[0]
    code, out, _ = gw("check", "--config", str(EXAMPLE_CONFIG))
    assert code == 0
    assert "valid" in out and "sim-fast" in out and "prefix-load" in out
    assert "$ACME_APP_KEY is not set" in out  # serve would refuse it: say so now
    code, out, _ = gw("check", "--config", str(EXAMPLE_CONFIG), "--json")
    assert code == 0
    info = json.loads(out)
    assert info["valid"] is True and info["routing"] == "prefix-load"
    assert [b["name"] for b in info["pools"]["local"]] == ["sim-fast", "sim-slow", "sim-spare"]
    assert info["aliases"]["gpt-4o"] == "local/smollm2"
    assert info["cache"]["semantic"] is True


def test_a_bad_config_is_one_line_at_its_line_and_exit_2(gw, tmp_path):
    path = tmp_path / "gateway.yaml"
    path.write_text(BAD)
    for command in ("check", "serve"):
        code, out, err = gw(command, "--config", str(path))
        assert code == 2 and out == ""
        assert f"{path}:3: backends[1].url: must be an http:// or https:// URL" in err
        assert "Traceback" not in err
    code, _, err = gw("serve", "--config", str(tmp_path / "missing.yaml"))
    assert code == 2 and "missing.yaml: no such file" in err


def test_serve_names_an_unset_key_variable(gw, tmp_path, monkeypatch):
    monkeypatch.delenv("DATAHALL_TEST_KEY", raising=False)
    path = tmp_path / "keys.yaml"
    path.write_text(
        "backends: [{url: 'http://127.0.0.1:8001'}]\n"
        "api_keys: [{name: app, key_env: DATAHALL_TEST_KEY}]\n"
    )
    code, _, err = gw("serve", "--config", str(path))
    assert code == 2 and f"{path}: api_keys[0].key_env: $DATAHALL_TEST_KEY is not set" in err


def test_sim_runs_backends_and_checks_its_options(gw):
    code, out, _ = gw("sim", "--count", "2", "--speeds", "1,0.5", "--duration", "0.2", "--json")
    assert code == 0
    rows = json.loads(out)
    assert [(r["name"], r["speed"]) for r in rows] == [("sim-0", 1.0), ("sim-1", 0.5)]
    assert [r["response_tokens"] for r in rows] == [12, 12]  # answers end by themselves
    assert rows[0]["url"] != rows[1]["url"] and rows[0]["url"].startswith("http://127.0.0.1:")
    code, _, err = gw("sim", "--count", "3", "--speeds", "1,2")
    assert code == 2 and "--speeds needs one positive number, or 3 of them" in err
    code, _, err = gw("sim", "--count", "0")
    assert code == 2 and "--count must be at least 1" in err
    code, out, _ = gw("sim", "--count", "1", "--response-tokens", "0", "--duration", "0", "--json")
    assert code == 0 and json.loads(out)[0]["response_tokens"] is None
    code, _, err = gw("sim", "--response-tokens", "-1")
    assert code == 2 and "--response-tokens must be 0" in err
    assert parse_speeds("2", 2) == [2.0, 2.0]


def _lines(stream, sink: queue.Queue) -> None:
    for line in stream:
        sink.put(line)


def _sim(*options: str):
    """`datahall gateway sim` in a subprocess with one backend: (process, its URL)."""
    code = "from datahall.gateway.cli import app; app()"
    args = [sys.executable, "-c", code, "sim", "--count", "1", "--duration", "30", *options]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stdout, out), daemon=True).start()
    first = out.get(timeout=30)
    assert first.startswith("sim-0 http://127.0.0.1:"), first
    return proc, first.split()[1]


@pytest.mark.parametrize(
    "options, cases",
    [
        # the default: 12 tokens, within the default max_tokens of 16, unless cut short
        ((), [(None, "stop", 12), (16, "stop", 12), (8, "length", 8)]),
        (("--response-tokens", "0"), [(16, "length", 16)]),  # writes until max_tokens
    ],
)
def test_sim_answers_end_by_themselves_so_the_cache_can_keep_them(options, cases):
    proc, url = _sim(*options)
    try:
        for max_tokens, finish, tokens in cases:
            body = {"model": "sim-llm", "messages": [{"role": "user", "content": "Hi"}]}
            if max_tokens is not None:
                body["max_tokens"] = max_tokens
            r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=10)
            assert r.status_code == 200
            answer = r.json()
            assert answer["choices"][0]["finish_reason"] == finish, max_tokens
            assert answer["usage"]["completion_tokens"] == tokens
    finally:
        proc.terminate()
        proc.wait(10)


def test_serve_answers_until_ctrl_c(tmp_path):
    fast = {"ttft_base_s": 0.001, "prefill_s_per_token": 0.0, "itl_s": 0.001, "response_tokens": 3}
    with serve_backends([SimConfig(name="a", **fast)]) as backends:
        path = tmp_path / "gateway.yaml"
        path.write_text(
            textwrap.dedent(
                f"""\
                backends:
                  - {{name: a, url: "{backends[0].url}", models: [sim-llm]}}
                aliases: {{gpt-4o: {{pool: default, model: sim-llm}}}}
                health_checks: {{enabled: false}}
                """
            )
        )
        code = "from datahall.gateway.cli import app; app()"
        args = [sys.executable, "-c", code, "serve", "--config", str(path), "--port", "0"]
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out: queue.Queue = queue.Queue()
        threading.Thread(target=_lines, args=(proc.stdout, out), daemon=True).start()
        try:
            first = out.get(timeout=30)
            assert first.startswith("gateway on http://127.0.0.1:"), first
            url = first.split()[2]
            r = httpx.post(
                f"{url}/v1/chat/completions",
                json={"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}]},
                timeout=10,
            )
            assert r.status_code == 200 and r.headers["x-gateway-backend"] == "a"
            record = json.loads(out.get(timeout=10))  # the access log: one JSON line
            assert record["status"] == 200 and record["endpoint"] == "a"
            assert record["output_tokens"] == 3
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
