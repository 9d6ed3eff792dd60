"""The admission broker (datahall.ebpf.broker) on a Unix socket in a private folder."""

import base64
import json
import os
import socket
import tempfile
import threading
from pathlib import Path

import pytest

from datahall.ebpf import kernel
from datahall.ebpf.broker import Broker, BrokerError, request
from datahall.ebpf.policy import Policy, resolve_policy


@pytest.fixture
def serve():
    """Start a broker in a thread; stop and join it after the test."""
    running = []

    def start(policy="tenant-xdp", **kw):
        folder = Path(tempfile.mkdtemp(prefix="kg", dir="/tmp"))  # short: AF_UNIX paths <= 107
        pol = resolve_policy(policy) if isinstance(policy, str) else policy
        b = Broker(folder / "s.sock", pol, folder / "audit.jsonl", time_budget_s=20, **kw)
        b.start()
        t = threading.Thread(target=b.serve_forever, daemon=True)
        t.start()
        running.append((b, t))
        return b

    yield start
    for b, t in running:
        b.stop()
        t.join(timeout=10)
        assert not t.is_alive()


def audit(b):
    return [json.loads(line) for line in b.audit_log.read_text().splitlines()]


def test_health_and_verify(serve, fixture_objects):
    b = serve()
    health = request(b.socket_path, {"op": "health"})
    assert health["ok"] and health["load"] is False
    ok = request(b.socket_path, {"op": "verify", "object": str(fixture_objects["interfere_b"])})
    assert (ok["ok"], ok["verdict"], ok["exit_code"]) == (True, "COMPLIANT", 0)
    bad = request(b.socket_path, {"op": "verify", "object": str(fixture_objects["interfere_a"])})
    assert (bad["verdict"], bad["exit_code"]) == ("VIOLATION", 1)
    assert bad["report"]["programs"][0]["violations"][0]["source"].startswith("interfere_a.c:42")
    data = fixture_objects["interfere_a"].read_bytes()
    inline = request(b.socket_path, {"op": "verify", "object_b64": base64.b64encode(data).decode()})
    assert inline["verdict"] == "VIOLATION" and inline["sha256"] == bad["sha256"]
    lines = audit(b)
    assert [e["op"] for e in lines] == ["health", "verify", "verify", "verify"]
    assert all(e["peer"]["uid"] == os.getuid() and e["peer"]["pid"] == os.getpid() for e in lines)
    assert lines[2]["verdict"] == "VIOLATION" and len(lines[2]["sha256"]) == 64


def test_errors_are_one_line_and_the_connection_survives(serve, fixture_objects, tmp_path):
    b = serve()
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(str(b.socket_path))
        f = s.makefile("rwb")
        answers = []
        for line in [b"{not json\n", b'{"op": "fly"}\n',
                     json.dumps({"op": "verify", "object": str(text)}).encode() + b"\n",
                     json.dumps({"op": "verify", "object": str(tmp_path / "none.o")}).encode() + b"\n",
                     b'{"op": "health"}\n']:  # fmt: skip
            f.write(line)
            f.flush()
            answers.append(json.loads(f.readline()))
    assert [a["ok"] for a in answers] == [False, False, False, False, True]
    assert answers[0]["error"].startswith("not JSON")
    assert answers[1]["error"] == "unknown op 'fly'; use health, verify, load or interfere"
    assert "not an ELF file" in answers[2]["error"]
    assert answers[3]["error"].startswith("cannot read ")
    assert all("\n" not in a.get("error", "") for a in answers)


def test_client_policies_are_refused_unless_allowed(serve, fixture_objects):
    obj = str(fixture_objects["interfere_a"])
    lenient = {"packet": {"write": [[15, 15]]}}
    b = serve()
    refused = request(b.socket_path, {"op": "verify", "object": obj, "policy": lenient})
    assert not refused["ok"] and "clients may not send one" in refused["error"]
    open_b = serve(client_policies=True)
    taken = request(open_b.socket_path, {"op": "verify", "object": obj, "policy": lenient})
    assert taken["verdict"] == "COMPLIANT"


def test_load_needs_allow_load_and_a_compliant_verdict(serve, fixture_objects):
    b = serve()
    ans = request(b.socket_path, {"op": "load", "object": str(fixture_objects["interfere_b"])})
    assert ans["verdict"] == "COMPLIANT" and ans["loaded"] is False
    assert ans["why_not"] == "the broker runs without --allow-load (verification only)"
    if kernel.available() is not None:
        pytest.skip(kernel.available())
    loader = serve(allow_load=True)
    ok = request(loader.socket_path, {"op": "load", "object": str(fixture_objects["interfere_b"])})
    assert ok["loaded"] is True and ok["programs"][0]["fd"] > 0
    bad = request(loader.socket_path, {"op": "load", "object": str(fixture_objects["interfere_a"])})
    assert bad["loaded"] is False and bad["why_not"].startswith("verdict VIOLATION")
    tight = serve(Policy.model_validate({"budget": {"max_paths": 1}}), allow_load=True)
    unknown = request(tight.socket_path, {"op": "load", "object": str(fixture_objects["firewall"])})
    assert unknown["verdict"] == "UNKNOWN" and unknown["loaded"] is False
    assert [e["loaded"] for e in audit(loader)] == [True, False]


def test_interfere_request(serve, fixture_objects):
    b = serve()
    ans = request(b.socket_path, {"op": "interfere", "first": str(fixture_objects["interfere_a"]),
                                  "second": str(fixture_objects["interfere_b"])})  # fmt: skip
    assert ans["verdict"] == "INTERFERE" and len(ans["result"]["conflicts"]) == 3


def test_socket_path_rules(serve, tmp_path):
    b = serve()
    path = b.socket_path
    b.stop()
    for _ in range(100):
        if not path.exists():
            break
        threading.Event().wait(0.05)
    assert not path.exists()  # removed on stop
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # a socket file nobody listens on
    again = Broker(path, Policy(), path.with_name("again.jsonl"))
    again.start()  # replaces the stale socket
    t = threading.Thread(target=again.serve_forever, daemon=True)
    t.start()
    assert request(path, {"op": "health"})["ok"]
    again.stop()
    t.join(timeout=10)
    regular = Path(tempfile.mkdtemp(prefix="kg", dir="/tmp")) / "file"
    regular.write_text("mine")
    with pytest.raises(BrokerError, match="exists and is not a socket"):
        Broker(regular, Policy(), regular.with_name("a.jsonl")).start()
    assert regular.read_text() == "mine"
