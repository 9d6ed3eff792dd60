"""`datahall ebpf ...`: exit codes 0 / 1 / 3 / 2, JSON output, one-line errors."""

import json

import pytest

from datahall.ebpf.isa import encode, insn


def test_check_compliant_violation_unknown_exit_codes(cli, fixture_objects):
    code, out, _ = cli(
        "ebpf", "check", str(fixture_objects["rewriter"]), "--policy", "ttl-rewriter"
    )
    assert code == 0 and "verdict: COMPLIANT (exit 0)" in out
    code, out, _ = cli("ebpf", "check", str(fixture_objects["interfere_a"]), "-p", "tenant-xdp")
    assert code == 1
    assert "VIOLATION [packet] xdp insn 35: packet write of bytes 15..15" in out
    assert "at interfere_a.c:42: iph->tos = DSCP_AF41 | (iph->tos & 3);" in out
    assert "packet: IPv4 " in out
    code, out, _ = cli("ebpf", "check", str(fixture_objects["firewall"]), "--budget", "0.001")
    assert code == 3 and "UNKNOWN" in out


def test_check_json_and_out(cli, fixture_objects, tmp_path):
    target = tmp_path / "r.json"
    code, out, _ = cli(
        "ebpf", "check", str(fixture_objects["malicious"]), "--policy", "no-kernel-writes",
        "--json", "--out", str(target),
    )  # fmt: skip
    data = json.loads(out)
    assert code == 1 and data["verdict"] == "VIOLATION" and data["exit_code"] == 1
    assert json.loads(target.read_text()) == data
    rules = [v["message"] for p in data["programs"] for v in p["violations"]]
    assert "call to helper probe_write_user (id 36) is not allowed by the policy" in rules


def test_interfere_cli(cli, fixture_objects):
    a, b = str(fixture_objects["interfere_a"]), str(fixture_objects["interfere_b"])
    code, out, _ = cli("ebpf", "interfere", a, b, "--json")
    data = json.loads(out)
    assert code == 1 and [c["kind"] for c in data["conflicts"]] == ["packet", "verdict", "map"]
    code, out, _ = cli("ebpf", "interfere", b, a)
    assert code == 1 and "verdict: INTERFERE (exit 1)" in out


def test_disasm_shows_source_and_relocations(cli, fixture_objects):
    code, out, _ = cli("ebpf", "disasm", str(fixture_objects["firewall"]), "-s", "xdp")
    assert code == 0
    assert "; firewall.c:" in out and "# map deny_list" in out
    code, out, _ = cli("ebpf", "disasm", str(fixture_objects["firewall"]), "--json")
    sections = {s["section"]: s for s in json.loads(out)}
    assert sections["xdp"]["insns"][0]["pc"] == 0 and ".text" in sections


def test_policy_command_converts_an_artifact_policy(cli, tmp_path):
    path = tmp_path / "kg.json"
    path.write_text(json.dumps({"restricted_helpers": ["bpf_probe_write_user"]}))
    code, out, err = cli("ebpf", "policy", str(path))
    assert code == 0 and out == "helpers:\n  deny:\n  - probe_write_user\n" and "valid" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["check", "{missing}"], "no such file"),
        (["check", "{text}"], "not an ELF file"),
        (
            ["check", "{obj}", "--policy", "{bad_policy}"],
            "bad.yaml:2: helpers.allow[0]: unknown helper",
        ),
        (["check", "{obj}", "--policy", "nope"], "no policy file 'nope'; shipped policies:"),
        (["check", "{obj}", "--section", "tc"], "no program section 'tc'"),
        (["check", "{obj}", "--budget", "soon"], "bad --budget 'soon'"),
        (["disasm", "{garbage}"], "not an ELF file"),
        (["serve", "--socket", "{text}", "--policy", "tenant-xdp"], "exists and is not a socket"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(cli, fixture_objects, tmp_path, args, message):
    (tmp_path / "notes.txt").write_text("hello\n")
    (tmp_path / "bad.yaml").write_text("helpers:\n  allow: [bpf_trace_prntk]\n")
    (tmp_path / "garbage.o").write_bytes(encode([insn(0x95)]))
    paths = {
        "missing": tmp_path / "missing.o",
        "text": tmp_path / "notes.txt",
        "obj": fixture_objects["rewriter"],
        "bad_policy": tmp_path / "bad.yaml",
        "garbage": tmp_path / "garbage.o",
    }
    code, out, err = cli("ebpf", *[a.format(**paths) for a in args])
    assert code == 2 and out == ""
    assert message in err and len(err.strip().splitlines()) == 1


def test_an_unknown_instruction_is_bad_input(cli, fixture_objects, tmp_path):
    from elftools.elf.elffile import ELFFile

    data = bytearray(fixture_objects["rewriter"].read_bytes())
    with open(fixture_objects["rewriter"], "rb") as f:
        offset = ELFFile(f).get_section_by_name("xdp")["sh_offset"]
    data[offset + 8] = 0xFF  # the second instruction's opcode: no such opcode
    broken = tmp_path / "broken.o"
    broken.write_bytes(bytes(data))
    code, out, err = cli("ebpf", "check", str(broken))
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "0xff" in err.lower()
