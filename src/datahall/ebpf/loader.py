"""Read an eBPF ELF object (``clang -target bpf``) into programs, maps and relocations.

This is the first stage of KrakenGuard's pipeline (NSDI '26; brief §2.4 item 1): before a
program can be executed symbolically against a policy, the object is split into its programs
(one per executable section, typed by libbpf's section-name conventions), their functions
(``STT_FUNC`` symbols), the relocated instruction slots (which map, global variable or
bpf-to-bpf call each refers to), the map definitions (BTF ``.maps`` or the legacy 20-byte
``maps`` records), the license, and the source line of each instruction from ``.BTF.ext``.

Nothing is loaded into a kernel; the object file is only read.

Examples
--------
>>> from datahall.ebpf.fixtures import build, clang_path
>>> if clang_path() is None:
...     import pytest; pytest.skip("clang is not installed")
>>> obj = load(build("firewall"))
>>> obj.license, sorted(obj.programs)  # .text holds the noinline callee
('GPL', ['.text', 'xdp'])
>>> prog = obj.programs["xdp"]
>>> prog.type, prog.name
('xdp', 'xdp_firewall')
>>> m = obj.maps["deny_list"]
>>> m.type_name, m.key_size, m.value_size, m.max_entries
('hash', 4, 8, 1024)
>>> sorted({r.kind for r in prog.relocations})
['call', 'global', 'map']
"""

from __future__ import annotations

import dataclasses
import io
import struct
from dataclasses import dataclass, field
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.constants import SH_FLAGS
from elftools.elf.elffile import ELFFile

from datahall.ebpf.btf import Btf, BtfError, BtfExt, FuncInfo, LineInfo, parse_btf, parse_btf_ext

__all__ = [
    "EM_BPF",
    "MAP_TYPES",
    "BpfFunction",
    "BpfMap",
    "BpfObject",
    "BpfProgram",
    "FuncInfo",
    "GlobalVar",
    "LineInfo",
    "LoadError",
    "Relocation",
    "load",
    "program_type",
]

EM_BPF = 247
R_BPF_64_64 = 1  # lddw imm64: map, global, or callback function address
R_BPF_64_32 = 10  # call imm32: bpf-to-bpf call (or an extern kfunc)

MAP_TYPES = [
    "unspec",
    "hash",
    "array",
    "prog_array",
    "perf_event_array",
    "percpu_hash",
    "percpu_array",
    "stack_trace",
    "cgroup_array",
    "lru_hash",
    "lru_percpu_hash",
    "lpm_trie",
    "array_of_maps",
    "hash_of_maps",
    "devmap",
    "sockmap",
    "cpumap",
    "xskmap",
    "sockhash",
    "cgroup_storage",
    "reuseport_sockarray",
    "percpu_cgroup_storage",
    "queue",
    "stack",
    "sk_storage",
    "devmap_hash",
    "struct_ops",
    "ringbuf",
    "inode_storage",
    "task_storage",
    "bloom_filter",
    "user_ringbuf",
    "cgrp_storage",
]
"""``enum bpf_map_type`` names in value order (``MAP_TYPES[1] == 'hash'``), lower case."""

PIN_TYPES = {0: "none", 1: "by_name"}

# libbpf's section-name conventions (libbpf 1.x ``section_defs``): (prefix, program type).
# A name matches a prefix when it is the prefix itself or starts with "prefix/" (an attach
# target such as "kprobe/do_sys_open"); "+" marks prefixes that usually carry a target; a
# prefix ending in "/" matches any name that starts with it.
_SECTION_TYPES = (
    ("socket", "socket_filter"),
    ("sk_reuseport/migrate", "sk_reuseport"),
    ("sk_reuseport", "sk_reuseport"),
    ("kprobe.multi+", "kprobe"),
    ("kretprobe.multi+", "kprobe"),
    ("kprobe+", "kprobe"),
    ("kretprobe+", "kprobe"),
    ("uprobe.s+", "kprobe"),
    ("uretprobe.s+", "kprobe"),
    ("uprobe+", "kprobe"),
    ("uretprobe+", "kprobe"),
    ("usdt+", "kprobe"),
    ("ksyscall+", "kprobe"),
    ("kretsyscall+", "kprobe"),
    ("tc", "sched_cls"),
    ("classifier", "sched_cls"),
    ("action", "sched_act"),
    ("tracepoint+", "tracepoint"),
    ("tp+", "tracepoint"),
    ("raw_tracepoint.w+", "raw_tracepoint_writable"),
    ("raw_tp.w+", "raw_tracepoint_writable"),
    ("raw_tracepoint+", "raw_tracepoint"),
    ("raw_tp+", "raw_tracepoint"),
    ("tp_btf+", "tracing"),
    ("fentry.s+", "tracing"),
    ("fmod_ret.s+", "tracing"),
    ("fexit.s+", "tracing"),
    ("fentry+", "tracing"),
    ("fmod_ret+", "tracing"),
    ("fexit+", "tracing"),
    ("iter.s+", "tracing"),
    ("iter+", "tracing"),
    ("freplace+", "ext"),
    ("lsm_cgroup+", "lsm"),
    ("lsm.s+", "lsm"),
    ("lsm+", "lsm"),
    ("syscall", "syscall"),
    ("xdp.frags/devmap", "xdp"),
    ("xdp.frags/cpumap", "xdp"),
    ("xdp.frags", "xdp"),
    ("xdp", "xdp"),
    ("perf_event", "perf_event"),
    ("lwt_in", "lwt_in"),
    ("lwt_out", "lwt_out"),
    ("lwt_xmit", "lwt_xmit"),
    ("lwt_seg6local", "lwt_seg6local"),
    ("sockops", "sock_ops"),
    ("sk_skb", "sk_skb"),
    ("sk_msg", "sk_msg"),
    ("lirc_mode2", "lirc_mode2"),
    ("flow_dissector", "flow_dissector"),
    ("cgroup_skb", "cgroup_skb"),
    ("cgroup/skb", "cgroup_skb"),
    ("cgroup/sock_create", "cgroup_sock"),
    ("cgroup/sock_release", "cgroup_sock"),
    ("cgroup/sock", "cgroup_sock"),
    ("cgroup/post_bind4", "cgroup_sock"),
    ("cgroup/post_bind6", "cgroup_sock"),
    ("cgroup/dev", "cgroup_device"),
    ("cgroup/sysctl", "cgroup_sysctl"),
    ("cgroup/getsockopt", "cgroup_sockopt"),
    ("cgroup/setsockopt", "cgroup_sockopt"),
    ("cgroup/", "cgroup_sock_addr"),  # bind4/6, connect4/6, sendmsg4/6, recvmsg4/6, get*name*
    ("struct_ops+", "struct_ops"),
    ("sk_lookup", "sk_lookup"),
)
# Pre-1.0 libbpf matched by bare prefix ("xdp_filter", "classifier_ingress", "socket1").
_LEGACY_PREFIXES = ("xdp", "classifier", "action", "socket", "kprobe", "kretprobe", "tracepoint")


class LoadError(ValueError):
    """The file is not a well-formed eBPF object; the message says what and where."""


def program_type(section: str) -> str:
    """The eBPF program type of an executable section, by libbpf's naming conventions.

    Returns the kernel's ``bpf_prog_type`` name in lower case (``xdp``, ``sched_cls``,
    ``kprobe``, ``tracing``, ``lsm``, ...), ``subprog`` for ``.text`` (callees only), and
    ``unknown`` for a name no convention covers.

    Examples
    --------
    >>> [program_type(s) for s in ["xdp", "tc", "kprobe/do_sys_open", "fentry/tcp_connect"]]
    ['xdp', 'sched_cls', 'kprobe', 'tracing']
    >>> program_type("cgroup/connect4"), program_type("xdp_filter"), program_type("mystery")
    ('cgroup_sock_addr', 'xdp', 'unknown')
    """
    if section == ".text":
        return "subprog"
    for prefix, ptype in _SECTION_TYPES:
        if prefix.endswith("+"):
            if section == prefix[:-1] or section.startswith(prefix[:-1] + "/"):
                return ptype
        elif prefix.endswith("/"):
            if section.startswith(prefix):
                return ptype
        elif section == prefix or section.startswith(prefix + "/"):
            return ptype
    for prefix in _LEGACY_PREFIXES:
        if section.startswith(prefix):
            return program_type(
                prefix + ("/x" if prefix in ("kprobe", "kretprobe", "tracepoint") else "")
            )
    return "unknown"


@dataclass(frozen=True)
class BpfFunction:
    """A function (``STT_FUNC`` symbol) inside an executable section; offsets and sizes in bytes."""

    name: str
    offset: int
    size: int
    is_global: bool


@dataclass(frozen=True)
class Relocation:
    """A relocated instruction slot at byte ``offset`` of a program section.

    ``kind`` is one of:

    - ``map``: an ``lddw`` of a map; ``target`` is the map name.
    - ``global``: an ``lddw`` of a global variable; ``target`` is the data section
      (``.rodata``, ``.data``, ``.bss``, ``.rodata.str1.1``, ...) and ``addend`` the byte offset in
      it (section symbol value + the instruction's immediate; brief §7).
    - ``call``: a bpf-to-bpf ``call`` (src = 1); ``target`` is the callee's section and
      ``addend`` the callee's byte offset there.
    - ``func``: an ``lddw`` of a function address (a ``bpf_loop`` callback); same as ``call``.
    - ``extern``: a reference to an undefined symbol (``__ksym``/``__kconfig`` externs,
      kfuncs); ``target`` is the symbol name.

    ``symbol`` is the ELF symbol name ('' for a section symbol) and ``rtype`` the ELF relocation
    type (1 = R_BPF_64_64, 10 = R_BPF_64_32).
    """

    offset: int
    kind: str
    target: str
    addend: int
    symbol: str
    rtype: int

    @property
    def insn(self) -> int:
        """Index of the relocated instruction slot (``offset // 8``)."""
        return self.offset // 8


@dataclass(frozen=True)
class BpfProgram:
    """One executable section: its bytecode, functions, relocations and line info.

    ``name`` is the entry function (the function at offset 0, else the section name),
    ``type`` comes from :func:`program_type` and ``attach_to`` is what follows the first '/' of
    the section name ('' if none): ``kprobe/do_sys_open`` attaches to ``do_sys_open``.
    """

    section: str
    name: str
    type: str
    attach_to: str
    insns: bytes
    functions: tuple[BpfFunction, ...] = ()
    relocations: tuple[Relocation, ...] = ()
    lines: tuple[LineInfo, ...] = ()
    func_info: tuple[FuncInfo, ...] = ()

    @property
    def n_insns(self) -> int:
        """Number of 8-byte instruction slots (an ``lddw`` takes two)."""
        return len(self.insns) // 8

    def line_at(self, offset: int) -> LineInfo | None:
        """The line record in force at byte ``offset``: the last one at or before it."""
        best = None
        for rec in self.lines:
            if rec.offset <= offset:
                best = rec
            else:
                break
        return best

    def relocation_at(self, offset: int) -> Relocation | None:
        """The relocation on the instruction slot at byte ``offset``, if any."""
        for r in self.relocations:
            if r.offset == offset:
                return r
        return None


@dataclass(frozen=True)
class BpfMap:
    """A map definition, from BTF ``.maps`` or a legacy ``maps`` record.

    ``type`` is the ``bpf_map_type`` number and ``type_name`` its lower-case name
    (``hash``, ``ringbuf``, ...). ``key_type``/``value_type`` are C-like BTF type spellings when
    the definition used ``__type(key, T)``, else None. ``pinning`` is 0 (none) or 1 (by name).
    ``inner`` is the inner map of a map-in-map (``__array(values, ...)``), if declared.
    """

    name: str
    type: int
    key_size: int
    value_size: int
    max_entries: int
    map_flags: int = 0
    pinning: int = 0
    section: str = ".maps"
    offset: int = 0
    key_type: str | None = None
    value_type: str | None = None
    inner: BpfMap | None = None
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def type_name(self) -> str:
        return MAP_TYPES[self.type] if 0 <= self.type < len(MAP_TYPES) else f"type{self.type}"


@dataclass(frozen=True)
class GlobalVar:
    """A named global variable (``STT_OBJECT``) in a data section."""

    name: str
    section: str
    offset: int
    size: int


@dataclass
class BpfObject:
    """A parsed eBPF object file.

    ``programs`` maps section name -> :class:`BpfProgram` for every executable section,
    including ``.text`` (type ``subprog``) when it holds code; :attr:`entry_programs` leaves the
    subprograms out. ``data`` holds the initial bytes of each global data section (``.bss`` as
    zeros); ``btf`` is None when the object carries no ``.BTF``.
    """

    path: Path
    license: str
    programs: dict[str, BpfProgram]
    maps: dict[str, BpfMap]
    data: dict[str, bytes]
    globals: dict[str, GlobalVar]
    kernel_version: int | None = None
    btf: Btf | None = None
    btf_ext: BtfExt | None = None

    @property
    def entry_programs(self) -> dict[str, BpfProgram]:
        """The programs a loader would attach (everything but ``.text`` subprograms)."""
        return {s: p for s, p in self.programs.items() if p.type != "subprog"}


def _is_data_section(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in (".rodata", ".data", ".bss"))


def _checked_data(sec, name: str, size: int) -> bytes:
    if sec["sh_type"] == "SHT_NOBITS":
        return bytes(sec["sh_size"])
    if sec["sh_offset"] + sec["sh_size"] > size:
        raise LoadError(
            f"section {name!r} ({sec['sh_size']} bytes at {sec['sh_offset']}) runs past the end of "
            f"the file ({size} bytes): the object is truncated"
        )
    return sec.data()


def load(path: str | Path) -> BpfObject:
    """Read the eBPF object at ``path`` into a :class:`BpfObject`.

    Raises
    ------
    LoadError
        Not an ELF file; an ELF for another machine (``e_machine`` != 247, EM_BPF); a section
        cut short; a relocation of an unknown type or against an unknown target; corrupt BTF.

    Examples
    --------
    >>> load("/bin/true")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    datahall.ebpf.loader.LoadError: /bin/true: ELF for machine EM_X86_64 (62), not eBPF (EM_BPF = 247)...
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise LoadError(f"{path}: cannot read: {exc.strerror}") from exc
    if raw[:4] != b"\x7fELF":
        raise LoadError(
            f"{path}: not an ELF file (first bytes {raw[:4]!r}); expected a clang -target bpf object"
        )
    try:
        return _load(path, raw)
    except LoadError:
        raise
    except BtfError as exc:
        raise LoadError(f"{path}: corrupt BTF: {exc}") from exc
    except (ELFError, struct.error, IndexError, KeyError, ValueError, AssertionError) as exc:
        raise LoadError(f"{path}: malformed or truncated ELF: {exc}") from exc


def _load(path: Path, raw: bytes) -> BpfObject:
    elf = ELFFile(io.BytesIO(raw))
    if elf["e_machine"] not in ("EM_BPF", EM_BPF):
        machine = elf["e_machine"]
        number = elf.header["e_machine"] if isinstance(machine, int) else _machine_number(raw, elf)
        raise LoadError(
            f"{path}: ELF for machine {machine} ({number}), not eBPF (EM_BPF = 247); "
            "compile with `clang -target bpf`"
        )
    if elf.elfclass != 64 or not elf.little_endian:
        raise LoadError(f"{path}: only 64-bit little-endian eBPF objects are supported")
    size = len(raw)
    if elf["e_shoff"] + elf["e_shnum"] * elf["e_shentsize"] > size:
        raise LoadError(
            f"{path}: section header table runs past the end of the file ({size} bytes): truncated"
        )

    sections = list(elf.iter_sections())
    symtab = elf.get_section_by_name(".symtab")
    if symtab is None:
        raise LoadError(
            f"{path}: no .symtab section; eBPF objects need their symbol table (do not strip them)"
        )
    _checked_data(symtab, ".symtab", size)
    symbols = list(symtab.iter_symbols())

    def secname(idx) -> str:
        return sections[idx].name if isinstance(idx, int) and 0 < idx < len(sections) else ""

    license_sec = elf.get_section_by_name("license")
    license = ""
    if license_sec is not None:
        license = (
            _checked_data(license_sec, "license", size)
            .split(b"\0", 1)[0]
            .decode("ascii", "replace")
        )
    version_sec = elf.get_section_by_name("version")
    kernel_version = None
    if version_sec is not None and version_sec["sh_size"] >= 4:
        kernel_version = struct.unpack_from("<I", _checked_data(version_sec, "version", size))[0]

    btf = btf_ext = None
    btf_sec = elf.get_section_by_name(".BTF")
    if btf_sec is not None:
        btf = parse_btf(_checked_data(btf_sec, ".BTF", size))
        ext_sec = elf.get_section_by_name(".BTF.ext")
        if ext_sec is not None:
            btf_ext = parse_btf_ext(_checked_data(ext_sec, ".BTF.ext", size), btf)

    data: dict[str, bytes] = {}
    for idx, sec in enumerate(sections):
        if idx and _is_data_section(sec.name) and sec["sh_flags"] & SH_FLAGS.SHF_ALLOC:
            data[sec.name] = _checked_data(sec, sec.name, size)
    globals_ = {
        s.name: GlobalVar(s.name, secname(s["st_shndx"]), s["st_value"], s["st_size"])
        for s in symbols
        if s["st_info"]["type"] == "STT_OBJECT" and secname(s["st_shndx"]) in data and s.name
    }

    maps: dict[str, BpfMap] = {}
    legacy = elf.get_section_by_name("maps")
    if legacy is not None:
        maps.update(_legacy_maps(path, legacy, sections.index(legacy), symbols, size))
    btf_maps_sec = elf.get_section_by_name(".maps")
    if btf_maps_sec is not None:
        if btf is None:
            raise LoadError(
                f"{path}: a .maps section needs .BTF to describe its maps; compile with -g"
            )
        maps.update(_btf_maps(path, btf))
        # clang leaves DATASEC offsets at 0 in objects (libbpf fixes them up): use the symbols.
        maps_idx = sections.index(btf_maps_sec)
        for s in symbols:
            if s["st_shndx"] == maps_idx and s.name in maps and maps[s.name].section == ".maps":
                maps[s.name] = dataclasses.replace(maps[s.name], offset=s["st_value"])

    programs: dict[str, BpfProgram] = {}
    exec_idx = {
        idx
        for idx, sec in enumerate(sections)
        if sec["sh_type"] == "SHT_PROGBITS"
        and sec["sh_flags"] & SH_FLAGS.SHF_EXECINSTR
        and sec["sh_size"] > 0
    }
    relsecs = {
        s["sh_info"]: s
        for s in sections
        if s["sh_type"] in ("SHT_REL", "SHT_RELA") and s["sh_info"] in exec_idx
    }
    for idx in sorted(exec_idx):
        sec = sections[idx]
        insns = _checked_data(sec, sec.name, size)
        if len(insns) % 8:
            raise LoadError(
                f"{path}: section {sec.name!r} is {len(insns)} bytes, not a multiple of 8"
            )
        funcs = tuple(
            sorted(
                (
                    BpfFunction(
                        s.name, s["st_value"], s["st_size"], s["st_info"]["bind"] == "STB_GLOBAL"
                    )
                    for s in symbols
                    if s["st_info"]["type"] == "STT_FUNC" and s["st_shndx"] == idx
                ),
                key=lambda f: f.offset,
            )
        )
        relocs = ()
        if idx in relsecs:
            _checked_data(relsecs[idx], relsecs[idx].name, size)
            relocs = _relocations(
                path, sec.name, insns, relsecs[idx], symbols, sections, exec_idx, maps
            )
        entry = next((f.name for f in funcs if f.offset == 0), sec.name)
        lines = tuple(btf_ext.line_info.get(sec.name, ())) if btf_ext else ()
        finfo = tuple(btf_ext.func_info.get(sec.name, ())) if btf_ext else ()
        ptype = program_type(sec.name)
        attach = sec.name.split("/", 1)[1] if "/" in sec.name and ptype != "unknown" else ""
        programs[sec.name] = BpfProgram(
            sec.name, entry, ptype, attach, insns, funcs, relocs, lines, finfo
        )

    return BpfObject(path, license, programs, maps, data, globals_, kernel_version, btf, btf_ext)


def _machine_number(raw: bytes, elf) -> int:
    return struct.unpack_from("<H" if elf.little_endian else ">H", raw, 18)[0]


def _relocations(
    path, secname, insns, relsec, symbols, sections, exec_idx, maps
) -> tuple[Relocation, ...]:
    out = []
    for rel in relsec.iter_relocations():
        off, rtype, symidx = rel["r_offset"], rel["r_info_type"], rel["r_info_sym"]
        where = f"{path}: relocation in {secname!r} at byte {off}"
        if symidx >= len(symbols):
            raise LoadError(f"{where}: symbol index {symidx} out of range")
        if off % 8 or off + 8 > len(insns):
            raise LoadError(
                f"{where}: not on an instruction inside the section ({len(insns)} bytes)"
            )
        sym = symbols[symidx]
        opcode, regs, imm = insns[off], insns[off + 1], struct.unpack_from("<i", insns, off + 4)[0]
        shndx = sym["st_shndx"]
        target_sec = (
            sections[shndx].name if isinstance(shndx, int) and 0 < shndx < len(sections) else ""
        )
        value = sym["st_value"]
        if rtype == R_BPF_64_64:
            if opcode != 0x18 or off + 16 > len(insns):
                raise LoadError(
                    f"{where}: R_BPF_64_64 on opcode {opcode:#04x}, expected lddw (0x18)"
                )
            if shndx == "SHN_UNDEF" or shndx == 0:
                out.append(Relocation(off, "extern", sym.name, 0, sym.name, rtype))
            elif target_sec in ("maps", ".maps"):
                name = sym.name or _map_at(maps, target_sec, value + imm)
                if name not in maps:
                    raise LoadError(f"{where}: refers to map {name!r}, which has no definition")
                out.append(Relocation(off, "map", name, 0, sym.name, rtype))
            elif _is_data_section(target_sec):
                out.append(Relocation(off, "global", target_sec, value + imm, sym.name, rtype))
            elif shndx in exec_idx:
                out.append(Relocation(off, "func", target_sec, value + imm, sym.name, rtype))
            else:
                raise LoadError(
                    f"{where}: lddw refers to {sym.name or '<section>'!r} in unsupported section {target_sec!r}"
                )
        elif rtype == R_BPF_64_32:
            if opcode != 0x85:
                raise LoadError(
                    f"{where}: R_BPF_64_32 on opcode {opcode:#04x}, expected call (0x85)"
                )
            if shndx == "SHN_UNDEF" or shndx == 0:
                out.append(Relocation(off, "extern", sym.name, 0, sym.name, rtype))
            elif shndx in exec_idx and (regs >> 4) == 1:
                if value % 8:
                    raise LoadError(f"{where}: call target {sym.name!r} is not instruction-aligned")
                # libbpf: callee slot = sym.st_value / 8 + imm + 1 in the target section.
                out.append(
                    Relocation(off, "call", target_sec, value + (imm + 1) * 8, sym.name, rtype)
                )
            else:
                raise LoadError(
                    f"{where}: call relocation against {sym.name or target_sec!r} (src={regs >> 4}) is not a bpf-to-bpf call"
                )
        else:
            raise LoadError(
                f"{where}: unknown relocation type {rtype} (supported: R_BPF_64_64 = 1, R_BPF_64_32 = 10)"
            )
    return tuple(sorted(out, key=lambda r: r.offset))


def _map_at(maps: dict[str, BpfMap], section: str, offset: int) -> str:
    for m in maps.values():
        if m.section == section and m.offset == offset:
            return m.name
    return f"<{section}+{offset}>"


def _legacy_maps(path, sec, idx, symbols, size) -> dict[str, BpfMap]:
    raw = _checked_data(sec, "maps", size)
    syms = sorted(
        (s for s in symbols if s["st_shndx"] == idx and s.name), key=lambda s: s["st_value"]
    )
    if not syms:
        return {}
    rec = len(raw) // len(syms)
    if rec < 20:
        raise LoadError(
            f"{path}: legacy 'maps' section holds {len(syms)} maps in {len(raw)} bytes (< 20 each)"
        )
    out = {}
    for s in syms:
        off = s["st_value"]
        if off + 20 > len(raw):
            raise LoadError(
                f"{path}: legacy map {s.name!r} at byte {off} runs past the 'maps' section"
            )
        mtype, ks, vs, me, flags = struct.unpack_from("<5I", raw, off)
        extra = {"record_size": rec}
        if rec > 20:
            extra["tail"] = raw[off + 20 : off + rec]
        out[s.name] = BpfMap(s.name, mtype, ks, vs, me, flags, 0, "maps", off, extra=extra)
    return out


def _btf_maps(path, btf: Btf) -> dict[str, BpfMap]:
    sec = btf.datasec(".maps")
    if sec is None:
        return {}
    out = {}
    for var_id, offset, _size in sec.members:
        var = btf.types[var_id]
        if var.kind != "VAR":
            raise LoadError(f"{path}: .maps DATASEC entry {var_id} is a {var.kind}, expected VAR")
        out[var.name] = _btf_map_def(path, btf, var.name, var.ref or 0, offset)
    return out


def _uint_member(btf: Btf, name: str, type_id: int) -> int:
    ptr = btf.types[btf.resolve(type_id)]
    arr = btf.types[btf.resolve(ptr.ref or 0)] if ptr.kind == "PTR" else None
    if arr is None or arr.kind != "ARRAY" or arr.array is None:
        raise BtfError(f"map member {name!r} is not __uint(name, val) (a pointer to an array)")
    return arr.array[2]


def _btf_map_def(path, btf: Btf, name: str, type_id: int, offset: int) -> BpfMap:
    st = btf.types[btf.resolve(type_id)]
    if st.kind != "STRUCT":
        raise LoadError(f"{path}: map {name!r} in .maps is a {st.kind}, expected a struct")
    fields: dict[str, int] = {}
    key_type = value_type = None
    inner = None
    extra: dict = {}
    for mname, mtype, _bits, _bitfield in st.members:
        if mname in (
            "type",
            "max_entries",
            "map_flags",
            "key_size",
            "value_size",
            "pinning",
            "numa_node",
            "map_extra",
        ):
            fields[mname] = _uint_member(btf, mname, mtype)
        elif mname in ("key", "value"):
            ptr = btf.types[btf.resolve(mtype)]
            if ptr.kind != "PTR":
                raise LoadError(f"{path}: map {name!r} member {mname!r} is not __type({mname}, T)")
            fields[mname + "_size"] = btf.type_size(ptr.ref or 0)
            if mname == "key":
                key_type = btf.type_name(ptr.ref or 0)
            else:
                value_type = btf.type_name(ptr.ref or 0)
        elif mname == "values":
            # __array(values, struct inner_def): a zero-length array of pointers to the inner def.
            arr = btf.types[btf.resolve(mtype)]
            if arr.kind == "ARRAY" and arr.array is not None:
                ptr = btf.types[btf.resolve(arr.array[0])]
                if ptr.kind == "PTR":
                    inner = _btf_map_def(path, btf, f"{name}.inner", ptr.ref or 0, 0)
            fields.setdefault("value_size", 4)
        else:
            extra[mname] = mtype
    return BpfMap(
        name,
        fields.get("type", 0),
        fields.get("key_size", 0),
        fields.get("value_size", 0),
        fields.get("max_entries", 0),
        fields.get("map_flags", 0),
        fields.get("pinning", 0),
        ".maps",
        offset,
        key_type,
        value_type,
        inner,
        extra,
    )
