"""A small parser for BPF Type Format (``.BTF``) and its ``.BTF.ext`` line/function info.

BTF is the type information clang emits next to an eBPF program (``-g``). KrakenGuard's loader
needs three things from it: the map definitions in the ``.maps`` data section (libbpf's
``__uint``/``__type`` encoding), the names and sizes of types, and — from ``.BTF.ext`` — the
source line of each instruction, so a policy violation can name the C line.

Layout (kernel ``include/uapi/linux/btf.h``): a header (magic ``0xeB9F``, version, flags,
hdr_len, type_off/len, str_off/len), a type section of ``struct btf_type`` records (name_off,
info = vlen | kind << 24 | kind_flag << 31, size-or-type) each followed by kind-specific data, and
a string section. Type ids start at 1; id 0 is ``void``.

Examples
--------
>>> raw = encode_minimal_btf()
>>> btf = parse_btf(raw)
>>> btf.types[1].kind, btf.types[1].name, btf.type_size(1)
('INT', 'int', 4)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

__all__ = [
    "BTF_MAGIC",
    "KINDS",
    "Btf",
    "BtfError",
    "BtfExt",
    "BtfType",
    "FuncInfo",
    "LineInfo",
    "encode_minimal_btf",
    "parse_btf",
    "parse_btf_ext",
]

BTF_MAGIC = 0xEB9F

KINDS = {
    0: "UNKN",
    1: "INT",
    2: "PTR",
    3: "ARRAY",
    4: "STRUCT",
    5: "UNION",
    6: "ENUM",
    7: "FWD",
    8: "TYPEDEF",
    9: "VOLATILE",
    10: "CONST",
    11: "RESTRICT",
    12: "FUNC",
    13: "FUNC_PROTO",
    14: "VAR",
    15: "DATASEC",
    16: "FLOAT",
    17: "DECL_TAG",
    18: "TYPE_TAG",
    19: "ENUM64",
}

# Kinds whose third word is a type id (the others carry a size or nothing).
_REF_KINDS = {
    "PTR",
    "TYPEDEF",
    "VOLATILE",
    "CONST",
    "RESTRICT",
    "FUNC",
    "VAR",
    "DECL_TAG",
    "TYPE_TAG",
}
_MODIFIERS = {"TYPEDEF", "VOLATILE", "CONST", "RESTRICT", "TYPE_TAG"}


class BtfError(ValueError):
    """The ``.BTF`` or ``.BTF.ext`` data is malformed."""


@dataclass(frozen=True)
class BtfType:
    """One BTF type record.

    ``ref`` is the referenced type id for PTR/TYPEDEF/modifiers/FUNC/VAR/DECL_TAG, else None;
    ``size`` is the byte size for INT/STRUCT/UNION/ENUM/ENUM64/FLOAT/DATASEC, else None.
    ``members`` holds (name, type id, bit offset, bitfield size or 0) for STRUCT/UNION, (name, value) for ENUM/ENUM64,
    (name, type id) for FUNC_PROTO parameters, and (var type id, offset, size) for DATASEC.
    ``array`` is (element type, index type, nelems) for ARRAY. ``extra`` is the INT encoding word,
    the VAR linkage, the DECL_TAG component index, or the FUNC linkage.
    """

    id: int
    kind: str
    name: str
    ref: int | None = None
    size: int | None = None
    members: tuple = ()
    array: tuple[int, int, int] | None = None
    extra: int = 0
    kind_flag: bool = False


@dataclass
class Btf:
    """Parsed ``.BTF``: ``types[id]`` (index 0 is void) and the raw string section."""

    types: list[BtfType]
    strings: bytes
    version: int = 1
    by_name: dict[str, list[int]] = field(default_factory=dict)

    def string(self, off: int) -> str:
        """The NUL-terminated string at ``off`` in the string section."""
        return _cstr(self.strings, off)

    def resolve(self, type_id: int) -> int:
        """Follow typedefs and qualifiers (const, volatile, restrict, type tags) to the base id."""
        seen = 0
        while type_id and self.types[type_id].kind in _MODIFIERS:
            type_id = self.types[type_id].ref or 0
            seen += 1
            if seen > 64:
                raise BtfError(f"BTF type {type_id}: cycle of typedefs/qualifiers")
        return type_id

    def type_size(self, type_id: int) -> int:
        """Byte size of a type (PTR = 8, ARRAY = nelems * element size)."""
        for _ in range(64):
            t = self.types[type_id]
            if t.kind in _MODIFIERS or t.kind == "VAR":
                type_id = t.ref or 0
                continue
            if t.kind == "PTR":
                return 8
            if t.kind == "ARRAY":
                assert t.array is not None
                return t.array[2] * self.type_size(t.array[0])
            if t.size is not None:
                return t.size
            raise BtfError(f"BTF type {type_id} ({t.kind} {t.name!r}) has no size")
        raise BtfError(f"BTF type {type_id}: reference chain too long")

    def type_name(self, type_id: int) -> str:
        """A C-like spelling of a type: ``__u32``, ``struct flow_key``, ``void *``."""
        if type_id == 0:
            return "void"
        t = self.types[type_id]
        if t.kind == "PTR":
            return self.type_name(t.ref or 0) + " *"
        if t.kind in ("CONST", "VOLATILE", "RESTRICT"):
            return f"{t.kind.lower()} {self.type_name(t.ref or 0)}"
        if t.kind == "TYPE_TAG":
            return self.type_name(t.ref or 0)
        if t.kind == "ARRAY":
            assert t.array is not None
            return f"{self.type_name(t.array[0])}[{t.array[2]}]"
        if t.kind in ("STRUCT", "UNION", "ENUM", "ENUM64"):
            tag = "enum" if t.kind.startswith("ENUM") else t.kind.lower()
            return f"{tag} {t.name}" if t.name else f"{tag} <anon>"
        if t.kind == "FWD":
            return f"{'union' if t.kind_flag else 'struct'} {t.name}"
        return t.name or f"<{t.kind.lower()}>"

    def datasec(self, name: str) -> BtfType | None:
        """The DATASEC type named ``name`` (``.maps``, ``.rodata``, ...), or None."""
        for tid in self.by_name.get(name, ()):
            if self.types[tid].kind == "DATASEC":
                return self.types[tid]
        return None


@dataclass(frozen=True)
class FuncInfo:
    """A function start from ``.BTF.ext``: byte ``offset`` in its section, BTF ``type_id``, ``name``."""

    offset: int
    type_id: int
    name: str


@dataclass(frozen=True)
class LineInfo:
    """Source position of the instruction at byte ``offset`` of its section."""

    offset: int
    file: str
    line: int
    column: int
    text: str


@dataclass
class BtfExt:
    """Parsed ``.BTF.ext``: per program section, function starts and line records."""

    func_info: dict[str, list[FuncInfo]]
    line_info: dict[str, list[LineInfo]]


def _cstr(buf: bytes, off: int) -> str:
    if off < 0 or off > len(buf):
        raise BtfError(f"string offset {off} outside the BTF string section ({len(buf)} bytes)")
    end = buf.find(b"\0", off)
    if end < 0:
        raise BtfError(f"string at offset {off} is not NUL-terminated")
    return buf[off:end].decode("utf-8", "replace")


def _header(data: bytes, what: str) -> tuple[int, int, int]:
    if len(data) < 8:
        raise BtfError(f"{what} is {len(data)} bytes, shorter than its 8-byte header")
    magic, version, flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
    if magic != BTF_MAGIC:
        raise BtfError(f"{what} has magic {magic:#06x}, expected {BTF_MAGIC:#06x} (little-endian)")
    if hdr_len < 8 or hdr_len > len(data):
        raise BtfError(f"{what} header length {hdr_len} is invalid for {len(data)} bytes")
    return version, flags, hdr_len


def parse_btf(data: bytes) -> Btf:
    """Parse a ``.BTF`` section (little-endian) into a :class:`Btf`.

    Raises
    ------
    BtfError
        Bad magic, sections outside the data, an unknown kind, or a record cut short.

    Examples
    --------
    >>> parse_btf(b"not btf at all")
    Traceback (most recent call last):
    ...
    datahall.ebpf.btf.BtfError: .BTF has magic 0x6f6e, expected 0xeb9f (little-endian)
    """
    version, _flags, hdr_len = _header(data, ".BTF")
    if hdr_len < 24:
        raise BtfError(f".BTF header length {hdr_len} < 24")
    type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
    t0, s0 = hdr_len + type_off, hdr_len + str_off
    if t0 + type_len > len(data) or s0 + str_len > len(data):
        raise BtfError(
            f".BTF type section ({t0}+{type_len}) or string section ({s0}+{str_len}) runs past "
            f"the end of the data ({len(data)} bytes): truncated?"
        )
    strings = bytes(data[s0 : s0 + str_len])
    types: list[BtfType] = [BtfType(0, "UNKN", "void")]
    pos, end = t0, t0 + type_len
    while pos < end:
        tid = len(types)
        if pos + 12 > end:
            raise BtfError(f".BTF type {tid} at byte {pos} is cut short")
        name_off, info, size_type = struct.unpack_from("<III", data, pos)
        pos += 12
        kind_no, vlen, kflag = (info >> 24) & 0x1F, info & 0xFFFF, bool(info >> 31)
        kind = KINDS.get(kind_no)
        if kind is None or kind == "UNKN":
            raise BtfError(f".BTF type {tid}: unknown kind {kind_no}")
        name = _cstr(strings, name_off)
        ref = size_type if kind in _REF_KINDS else None
        size = None if kind in _REF_KINDS or kind in ("ARRAY", "FWD", "FUNC_PROTO") else size_type
        members: tuple = ()
        array = None
        extra = vlen if kind == "FUNC" else 0

        def take(n: int, fmt: str, tid=tid, kind=kind) -> tuple:
            nonlocal pos
            need = struct.calcsize(fmt) * n
            if pos + need > end:
                raise BtfError(f".BTF type {tid} ({kind}) is cut short")
            out = tuple(
                struct.unpack_from(fmt, data, pos + i * struct.calcsize(fmt)) for i in range(n)
            )
            pos += need
            return out

        if kind == "INT":
            extra = take(1, "<I")[0][0]
        elif kind == "ARRAY":
            array = take(1, "<III")[0]
        elif kind in ("STRUCT", "UNION"):
            # With kind_flag set the offset word is bitfield_size << 24 | bit_offset.
            members = tuple(
                (_cstr(strings, n), t, o & 0xFFFFFF, o >> 24)
                if kflag
                else (_cstr(strings, n), t, o, 0)
                for n, t, o in take(vlen, "<III")
            )
        elif kind == "ENUM":
            members = tuple((_cstr(strings, n), v) for n, v in take(vlen, "<Ii"))
        elif kind == "ENUM64":
            members = tuple((_cstr(strings, n), lo | hi << 32) for n, lo, hi in take(vlen, "<III"))
        elif kind == "FUNC_PROTO":
            members = tuple((_cstr(strings, n), t) for n, t in take(vlen, "<II"))
            ref = size_type  # return type
        elif kind == "VAR":
            extra = take(1, "<I")[0][0]
        elif kind == "DATASEC":
            members = take(vlen, "<III")
        elif kind == "DECL_TAG":
            extra = take(1, "<i")[0][0]
        types.append(BtfType(tid, kind, name, ref, size, members, array, extra, kflag))
    btf = Btf(types, strings, version)
    for t in types[1:]:
        if t.name:
            btf.by_name.setdefault(t.name, []).append(t.id)
    _check_refs(btf)
    return btf


def _check_refs(btf: Btf) -> None:
    n = len(btf.types)

    def ok(tid: int, t: BtfType) -> None:
        if not 0 <= tid < n:
            raise BtfError(f".BTF type {t.id} ({t.kind} {t.name!r}) refers to missing type {tid}")

    for t in btf.types[1:]:
        if t.ref is not None:
            ok(t.ref, t)
        if t.array:
            ok(t.array[0], t)
            ok(t.array[1], t)
        if t.kind in ("STRUCT", "UNION"):
            for _, mt, _, _ in t.members:
                ok(mt, t)
        elif t.kind == "DATASEC":
            for vt, _, _ in t.members:
                ok(vt, t)


def parse_btf_ext(data: bytes, btf: Btf) -> BtfExt:
    """Parse ``.BTF.ext``: func_info and line_info per section (offsets in bytes, as in ``.o``).

    Section names, file names and source lines are strings of the companion ``.BTF``.
    CO-RE relocation records, if any, are ignored.
    """
    _version, _flags, hdr_len = _header(data, ".BTF.ext")
    if hdr_len < 24:
        raise BtfError(f".BTF.ext header length {hdr_len} < 24")
    fi_off, fi_len, li_off, li_len = struct.unpack_from("<IIII", data, 8)

    def records(off: int, length: int, what: str, min_rec: int) -> dict[str, list[tuple]]:
        out: dict[str, list[tuple]] = {}
        if length == 0:
            return out
        start, stop = hdr_len + off, hdr_len + off + length
        if stop > len(data) or length < 4:
            raise BtfError(f".BTF.ext {what} ({start}+{length}) runs past {len(data)} bytes")
        (rec_size,) = struct.unpack_from("<I", data, start)
        if rec_size < min_rec:
            raise BtfError(f".BTF.ext {what} record size {rec_size} < {min_rec}")
        pos = start + 4
        while pos < stop:
            if pos + 8 > stop:
                raise BtfError(f".BTF.ext {what} section header at {pos} is cut short")
            sec_off, num = struct.unpack_from("<II", data, pos)
            pos += 8
            if pos + num * rec_size > stop:
                raise BtfError(f".BTF.ext {what}: {num} records overrun the subsection")
            sec = btf.string(sec_off)
            out[sec] = [
                struct.unpack_from("<" + "I" * (min_rec // 4), data, pos + i * rec_size)
                for i in range(num)
            ]
            pos += num * rec_size
        return out

    func_info = {
        sec: [
            FuncInfo(off, tid, btf.types[tid].name if 0 < tid < len(btf.types) else "")
            for off, tid in recs
        ]
        for sec, recs in records(fi_off, fi_len, "func_info", 8).items()
    }
    line_info = {
        sec: [
            LineInfo(off, btf.string(file_off), lc >> 10, lc & 0x3FF, btf.string(line_off))
            for off, file_off, line_off, lc in recs
        ]
        for sec, recs in records(li_off, li_len, "line_info", 16).items()
    }
    return BtfExt(func_info, line_info)


def encode_minimal_btf() -> bytes:
    """A tiny valid ``.BTF`` blob with one type, ``int`` (4 bytes, signed): for examples and tests."""
    strings = b"\0int\0"
    types = struct.pack("<IIII", 1, 1 << 24, 4, (1 << 24) | 32)  # INT, encoding SIGNED, 32 bits
    header = struct.pack("<HBBIIIII", BTF_MAGIC, 1, 0, 24, 0, len(types), len(types), len(strings))
    return header + types + strings
