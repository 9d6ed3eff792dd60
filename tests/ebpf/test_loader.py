import json
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from datahall.ebpf.btf import BtfError, encode_minimal_btf, parse_btf
from datahall.ebpf.fixtures import FIXTURES, libxdp_objects
from datahall.ebpf.loader import MAP_TYPES, LoadError, load, program_type

# (section, type, entry function, attach_to) per fixture; `.text` holds noinline callees.
PROGRAMS = {
    "firewall": {(".text", "subprog", "count_verdict", ""), ("xdp", "xdp", "xdp_firewall", "")},
    "flow_counter": {("tc", "sched_cls", "count_flows", "")},
    "retina_observer": {("classifier", "sched_cls", "observe_ingress", "")},
    "rewriter": {("xdp", "xdp", "xdp_rewrite_ttl", "")},
    "l4lb": {(".text", "subprog", "flow_hash", ""), ("xdp", "xdp", "xdp_l4lb", "")},
    "malicious": {
        ("kprobe/do_sys_openat2", "kprobe", "hijack_open", "do_sys_openat2"),
        ("kretprobe/do_sys_openat2", "kprobe", "open_ret", "do_sys_openat2"),
    },
    "interfere_a": {("xdp", "xdp", "xdp_tenant_a", "")},
    "interfere_b": {("xdp", "xdp", "xdp_tenant_b", "")},
}

# name: (type, key_size, value_size, max_entries, flags, pinning, section, key_type, value_type)
MAPS = {
    "firewall": {
        "deny_list": ("hash", 4, 8, 1024, 0, 0, ".maps", "__u32", "__u64"),
        "verdict_count": ("array", 4, 8, 5, 0, 0, "maps", None, None),
    },
    "flow_counter": {
        "flows": (
            "percpu_hash",
            16,
            16,
            65536,
            0,
            0,
            ".maps",
            "struct flow_key",
            "struct flow_stats",
        ),
    },
    "retina_observer": {"flow_events": ("ringbuf", 0, 0, 262144, 0, 0, ".maps", None, None)},
    "rewriter": {},
    "l4lb": {
        "vips": ("hash", 8, 8, 256, 0, 0, ".maps", "struct vip_key", "struct vip_meta"),
        "backends": ("array", 4, 16, 64, 0, 0, ".maps", "__u32", "struct backend"),
    },
    "malicious": {},
    "interfere_a": {"shared_stats": ("array", 4, 8, 8, 0, 1, ".maps", "__u32", "__u64")},
    "interfere_b": {"shared_stats": ("array", 4, 8, 8, 0, 1, ".maps", "__u32", "__u64")},
}

# Relocations per section, in instruction order: (kind, target, symbol).
RELOCATIONS = {
    ("firewall", ".text"): [("map", "verdict_count", "verdict_count")],
    ("firewall", "xdp"): [
        ("map", "deny_list", "deny_list"),
        ("call", ".text", ""),
        ("global", ".rodata", "blocked_port"),
    ],
    ("flow_counter", "tc"): [
        ("global", ".bss", "other_packets"),
        ("map", "flows", "flows"),
        ("map", "flows", "flows"),
    ],
    ("retina_observer", "classifier"): [
        ("global", ".bss", "seen_packets"),
        ("global", ".data", "sample_rate"),
        ("map", "flow_events", "flow_events"),
        ("global", ".bss", "lost_events"),
    ],
    ("rewriter", "xdp"): [],
    ("l4lb", ".text"): [],
    ("l4lb", "xdp"): [
        ("map", "vips", "vips"),
        ("call", ".text", ""),
        ("map", "backends", "backends"),
    ],
    ("malicious", "kprobe/do_sys_openat2"): [
        ("global", ".rodata", "target_tgid"),
        ("global", ".rodata", ""),
        ("global", ".rodata", ""),
    ],
    ("malicious", "kretprobe/do_sys_openat2"): [("global", ".rodata", "")],
    ("interfere_a", "xdp"): [("map", "shared_stats", "shared_stats")],
    ("interfere_b", "xdp"): [("map", "shared_stats", "shared_stats")],
}

LICENSES = {"retina_observer": "Dual MIT/GPL"}


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_fixture_programs_maps_license(loaded, name):
    obj = loaded[name]
    assert obj.license == LICENSES.get(name, "GPL")
    got = {(p.section, p.type, p.name, p.attach_to) for p in obj.programs.values()}
    assert got == PROGRAMS[name]
    maps = {
        m.name: (
            m.type_name,
            m.key_size,
            m.value_size,
            m.max_entries,
            m.map_flags,
            m.pinning,
            m.section,
        )
        + (m.key_type, m.value_type)
        for m in obj.maps.values()
    }
    assert maps == MAPS[name]
    for prog in obj.programs.values():
        assert len(prog.insns) == 8 * prog.n_insns > 0
        # one function per section here, covering it entirely
        assert [(f.name, f.offset, f.size) for f in prog.functions] == [
            (prog.name, 0, len(prog.insns))
        ]
        assert [fi.name for fi in prog.func_info] == [prog.name]


@pytest.mark.parametrize("key", sorted(RELOCATIONS))
def test_fixture_relocations(loaded, key):
    name, section = key
    obj = loaded[name]
    prog = obj.programs[section]
    assert [(r.kind, r.target, r.symbol) for r in prog.relocations] == RELOCATIONS[key]
    for r in prog.relocations:
        opcode = prog.insns[r.offset]
        if r.kind == "call":
            assert (
                opcode == 0x85 and prog.insns[r.offset + 1] >> 4 == 1
            )  # call, src = BPF_PSEUDO_CALL
            callee = obj.programs[r.target]
            assert r.addend in {f.offset for f in callee.functions}
        else:
            assert opcode == 0x18  # lddw
        if r.kind == "global" and r.symbol:
            var = obj.globals[r.symbol]
            assert (var.section, var.offset) == (r.target, r.addend)
        if r.kind == "map":
            assert r.target in obj.maps


def test_globals_and_data_sections(loaded):
    fw = loaded["firewall"]
    assert fw.data[".rodata"] == struct.pack("<H", 23)  # blocked_port = 23
    assert fw.globals["blocked_port"].size == 2
    ro = loaded["retina_observer"]
    assert ro.data[".data"] == struct.pack("<I", 1)  # sample_rate = 1
    assert sorted(ro.globals) == ["lost_events", "sample_rate", "seen_packets"]
    assert ro.data[".bss"] == bytes(16)
    mal = loaded["malicious"]
    # Section-symbol relocations (brief §7): the immediate gives the offset inside .rodata.
    addends = [r.addend for r in mal.programs["kprobe/do_sys_openat2"].relocations]
    rodata = mal.data[".rodata"]
    strings = {rodata[a : rodata.index(b"\0", a)] for a in addends[1:]}
    assert strings == {b"open %s", b"/tmp/decoy"}
    ret = mal.programs["kretprobe/do_sys_openat2"].relocations[0].addend
    assert rodata[ret : rodata.index(b"\0", ret)] == b"openat2 returned %ld"


def test_shared_pinned_map_is_identical(loaded):
    a, b = loaded["interfere_a"].maps["shared_stats"], loaded["interfere_b"].maps["shared_stats"]
    assert a == b and a.pinning == 1


def _source_line(name, needle):
    lines = FIXTURES[name].read_text().splitlines()
    hits = [i + 1 for i, text in enumerate(lines) if needle in text]
    assert len(hits) == 1, hits
    return hits[0]


@pytest.mark.parametrize(
    ("name", "section", "map_name", "needle"),
    [
        ("firewall", "xdp", "deny_list", "bpf_map_lookup_elem(&deny_list"),
        ("l4lb", "xdp", "backends", "bpf_map_lookup_elem(&backends"),
        ("retina_observer", "classifier", "flow_events", "bpf_ringbuf_reserve(&flow_events"),
    ],
)
def test_line_info_maps_instruction_to_source(loaded, name, section, map_name, needle):
    prog = loaded[name].programs[section]
    reloc = next(r for r in prog.relocations if r.kind == "map" and r.target == map_name)
    rec = prog.line_at(reloc.offset)
    assert rec is not None
    assert Path(rec.file).name == f"{name}.c"
    assert rec.line == _source_line(name, needle)
    assert needle in rec.text
    offsets = [li.offset for li in prog.lines]
    assert offsets == sorted(offsets) and offsets[0] == 0
    assert all(o % 8 == 0 and o < len(prog.insns) for o in offsets)


def test_line_info_of_callee(loaded):
    text = loaded["firewall"].programs[".text"]
    reloc = text.relocations[0]
    assert text.line_at(reloc.offset).line == _source_line(
        "firewall", "bpf_map_lookup_elem(&verdict_count"
    )


def test_map_type_names_match_uapi_header():
    header = Path("/usr/include/linux/bpf.h")
    if not header.exists():
        pytest.skip("linux-libc-dev is not installed")
    body = re.search(r"enum bpf_map_type \{(.*?)\};", header.read_text(), re.S).group(1)
    names = re.findall(r"^\s*BPF_MAP_TYPE_(\w+),", body, re.M)
    # Deprecated aliases (CGROUP_STORAGE_DEPRECATED = CGROUP_STORAGE) carry '=' and are skipped.
    assert [n.lower() for n in names] == MAP_TYPES[: len(names)]


def _bpftool_types(path):
    out = subprocess.run(
        ["bpftool", "-j", "btf", "dump", "file", str(path)], capture_output=True, check=True
    )
    return json.loads(out.stdout)["types"]


@pytest.mark.skipif(shutil.which("bpftool") is None, reason="bpftool is not installed")
def test_btf_agrees_with_bpftool(fixture_objects):
    paths = list(fixture_objects.values()) + libxdp_objects()[:4]
    for path in paths:
        btf = load(path).btf
        ref = _bpftool_types(path)
        assert len(btf.types) - 1 == len(ref), path
        for t in ref:
            mine = btf.types[t["id"]]
            assert mine.kind == t["kind"], (path, t)
            assert (mine.name or "(anon)") == t["name"], (path, t)
            if "type_id" in t and t["kind"] not in ("FUNC_PROTO", "ARRAY"):
                assert mine.ref == t["type_id"], (path, t)
            if t["kind"] in ("INT", "STRUCT", "UNION", "ENUM", "FLOAT"):
                assert mine.size == t["size"], (path, t)
            if t["kind"] == "ARRAY":
                assert mine.array == (t["type_id"], t["index_type_id"], t["nr_elems"])
            if t["kind"] in ("STRUCT", "UNION"):
                assert [
                    (
                        m["name"].replace("(anon)", ""),
                        m["type_id"],
                        m["bits_offset"],
                        m.get("bitfield_size", 0),
                    )
                    for m in t["members"]
                ] == list(mine.members)
            if t["kind"] == "DATASEC":
                assert [(v["type_id"], v["offset"], v["size"]) for v in t["vars"]] == list(
                    mine.members
                )


@pytest.mark.skipif(shutil.which("bpftool") is None, reason="bpftool is not installed")
def test_btf_maps_agree_with_bpftool(loaded, fixture_objects):
    """Map max_entries read by hand from bpftool's JSON equal the loader's."""
    for name, path in fixture_objects.items():
        types = {t["id"]: t for t in _bpftool_types(path)}
        sec = next(
            (t for t in types.values() if t["kind"] == "DATASEC" and t["name"] == ".maps"), None
        )
        btf_maps = [m for m in loaded[name].maps.values() if m.section == ".maps"]
        if sec is None:
            assert btf_maps == []
            continue
        seen = {}
        for v in sec["vars"]:
            var = types[v["type_id"]]
            members = {m["name"]: m["type_id"] for m in types[var["type_id"]]["members"]}
            arr = types[types[members["max_entries"]]["type_id"]]
            seen[var["name"]] = arr["nr_elems"]
        assert seen == {m.name: m.max_entries for m in btf_maps}


def test_libxdp_objects_load():
    objs = libxdp_objects()
    if not objs:
        pytest.skip("libxdp1 is not installed (no /usr/lib/*/bpf/*.o)")
    for path in objs:
        obj = load(path)
        assert obj.license == "GPL"
        assert obj.entry_programs, path
        for prog in obj.programs.values():
            assert prog.type != "unknown", (path, prog.section)
            for r in prog.relocations:
                if r.kind == "map":
                    assert r.target in obj.maps
        if path.name.startswith("xdpfilt_"):
            assert set(obj.programs) == {"xdp"}
            assert "xdp_stats_map" in obj.maps
        if path.name.startswith("xsk_def_xdp_prog"):
            assert obj.maps["xsks_map"].type_name == "xskmap"
        if path.name == "xdpdump_bpf.o":
            assert {p.type for p in obj.programs.values()} == {"tracing"}


@pytest.mark.parametrize(
    ("section", "ptype"),
    [
        ("xdp", "xdp"),
        ("xdp.frags", "xdp"),
        ("xdp/devmap", "xdp"),
        ("tc", "sched_cls"),
        ("classifier", "sched_cls"),
        ("action", "sched_act"),
        ("socket", "socket_filter"),
        ("kprobe/tcp_v4_connect", "kprobe"),
        ("kretprobe/tcp_v4_connect", "kprobe"),
        ("uprobe/bin:func", "kprobe"),
        ("tracepoint/syscalls/sys_enter_openat", "tracepoint"),
        ("tp/sched/sched_switch", "tracepoint"),
        ("raw_tracepoint/sched_switch", "raw_tracepoint"),
        ("raw_tp/sched_switch", "raw_tracepoint"),
        ("fentry/tcp_connect", "tracing"),
        ("fexit/tcp_connect", "tracing"),
        ("tp_btf/sched_switch", "tracing"),
        ("lsm/bpf", "lsm"),
        ("cgroup_skb/ingress", "cgroup_skb"),
        ("cgroup/connect4", "cgroup_sock_addr"),
        ("cgroup/sock_create", "cgroup_sock"),
        ("cgroup/dev", "cgroup_device"),
        ("perf_event", "perf_event"),
        ("sockops", "sock_ops"),
        ("sk_skb/stream_verdict", "sk_skb"),
        ("sk_msg", "sk_msg"),
        ("flow_dissector", "flow_dissector"),
        ("xdp_filter", "xdp"),
        (".text", "subprog"),
        ("kprobe", "kprobe"),
        ("my_own_section", "unknown"),
    ],
)
def test_program_type_from_section_name(section, ptype):
    assert program_type(section) == ptype


# --- bad input -------------------------------------------------------------------------------


def test_text_file_is_not_elf(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("hello, not an object\n")
    with pytest.raises(LoadError, match="not an ELF file"):
        load(p)
    with pytest.raises(LoadError, match="cannot read"):
        load(tmp_path / "missing.o")
    assert issubclass(LoadError, ValueError)


def test_x86_elf_is_refused():
    if not Path("/bin/true").exists():
        pytest.skip("/bin/true is missing")
    with pytest.raises(LoadError, match="not eBPF"):
        load("/bin/true")


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9, 0.99])
def test_truncated_object(fixture_objects, tmp_path, fraction):
    raw = fixture_objects["firewall"].read_bytes()
    p = tmp_path / "cut.o"
    p.write_bytes(raw[: int(len(raw) * fraction)])
    with pytest.raises(LoadError):
        load(p)


def _section_file_range(path, name):
    with open(path, "rb") as f:
        sec = ELFFile(f).get_section_by_name(name)
        return sec["sh_offset"], sec["sh_size"]


def test_corrupt_btf(fixture_objects, tmp_path):
    src = fixture_objects["firewall"]
    raw = bytearray(src.read_bytes())
    off, _ = _section_file_range(src, ".BTF")
    raw[off : off + 2] = b"\x00\x00"
    p = tmp_path / "badbtf.o"
    p.write_bytes(raw)
    with pytest.raises(LoadError, match="corrupt BTF"):
        load(p)
    # a type referring past the type table
    with pytest.raises(BtfError):
        parse_btf(encode_minimal_btf()[:30])


def test_unknown_relocation_type(fixture_objects, tmp_path):
    src = fixture_objects["firewall"]
    raw = bytearray(src.read_bytes())
    off, _ = _section_file_range(src, ".relxdp")
    (info,) = struct.unpack_from("<Q", raw, off + 8)
    struct.pack_into("<Q", raw, off + 8, (info & ~0xFFFFFFFF) | 99)
    p = tmp_path / "badrel.o"
    p.write_bytes(raw)
    with pytest.raises(LoadError, match="unknown relocation type 99"):
        load(p)


def test_relocation_against_unknown_section(fixture_objects, tmp_path):
    """Point the deny_list lddw relocation at the `license` section symbol instead."""
    src = fixture_objects["firewall"]
    raw = bytearray(src.read_bytes())
    with open(src, "rb") as f:
        elf = ELFFile(f)
        syms = list(elf.get_section_by_name(".symtab").iter_symbols())
        lic_idx = next(i for i, s in enumerate(elf.iter_sections()) if s.name == "license")
        sym = next(i for i, s in enumerate(syms) if s["st_shndx"] == lic_idx)
    off, _ = _section_file_range(src, ".relxdp")
    (info,) = struct.unpack_from("<Q", raw, off + 8)
    struct.pack_into("<Q", raw, off + 8, (sym << 32) | (info & 0xFFFFFFFF))
    p = tmp_path / "badtarget.o"
    p.write_bytes(raw)
    with pytest.raises(LoadError, match="unsupported section 'license'"):
        load(p)
