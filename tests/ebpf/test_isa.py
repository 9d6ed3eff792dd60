"""Decoder, encoder and disassembler of datahall.ebpf.isa, checked against llvm-objdump and capstone."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from datahall.ebpf import isa
from datahall.ebpf.fixtures import llvm_objdump, normalise, objdump_path
from datahall.ebpf.isa import DecodeError, Instruction, decode, disassemble, encode, insn, lddw

CLANG = shutil.which("clang-14") or shutil.which("clang")
OBJDUMP = objdump_path()
needs_llvm = pytest.mark.skipif(
    not (CLANG and OBJDUMP), reason="clang / llvm-objdump not installed"
)
SYSTEM_OBJECTS = sorted(Path("/usr/lib/x86_64-linux-gnu/bpf").glob("*.o"))
INCLUDE = ["-I/usr/include/x86_64-linux-gnu"]

# Small C programs of our own that make clang emit most of the ISA it knows.
C_SOURCES = {
    "arith": r"""
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
struct { __uint(type, BPF_MAP_TYPE_ARRAY); __uint(max_entries, 4);
         __type(key, __u32); __type(value, __u64); } counters SEC(".maps");
static __attribute__((noinline)) __u64 mix(__u64 a, __u32 b, __s64 c) {
    __u64 x = a * 2654435761u + (b >> 3) - (c >> 5);
    x ^= x << 13; x |= b & 0xf0; x = x / (b | 1) + x % 7 + (__u32)a / (b | 1);
    if ((__s64)x < c) x = -x;
    return x + ((__s32)b >> 2) + (__u32)(b << 4);
}
SEC("xdp") int arith(struct xdp_md *ctx) {
    void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
    __u8 *p = data;
    if (p + 16 > (__u8 *)end) return XDP_PASS;
    __u16 proto = bpf_ntohs(*(__u16 *)(p + 12));
    __u32 w = bpf_ntohl(*(__u32 *)(p + 4));
    __u64 big = __builtin_bswap64(*(__u64 *)(p + 8));
    __u32 k = proto & 3;
    __u64 *v = bpf_map_lookup_elem(&counters, &k);
    if (v) {
        __sync_fetch_and_add(v, 1);
        __u64 old = __sync_fetch_and_or(v, 2);
        __sync_fetch_and_and(v, ~4ull); __sync_fetch_and_xor(v, 8);
        __sync_val_compare_and_swap(v, old, 5);
        __sync_lock_test_and_set(v, big);
    }
    if ((__s32)w < -5 || (__s16)proto > 100) return XDP_DROP;
    return mix(big, w, (__s64)proto - 9) & 3;
}
char _license[] SEC("license") = "GPL";
""",
    "loops": r"""
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
SEC("socket") int loops(struct __sk_buff *skb) {
    __u32 acc = skb->len, i;
    __s32 s = (__s32)skb->mark;
    for (i = 0; i < 20; i++) {
        acc = acc * 31 + i;
        if (acc & 0x100) acc >>= 1;
        if (s > (__s32)i) s -= 3; else s += 7;
    }
    __u64 t = bpf_ktime_get_ns();
    if (t > 1000000 && s >= -100 && s <= 100) return acc;
    return (__u32)(acc ^ (t >> 32));
}
char _license[] SEC("license") = "GPL";
""",
}


def _compile(src: str, out: Path, mcpu: str) -> Path:
    c = out.with_suffix(".c")
    c.write_text(src)
    cmd = [
        CLANG,
        "-O2",
        "-g",
        "-target",
        "bpf",
        f"-mcpu={mcpu}",
        *INCLUDE,
        "-c",
        str(c),
        "-o",
        str(out),
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    return out


def exec_sections(path: Path) -> dict[str, bytes]:
    """Bytes of every executable (SHF_EXECINSTR) section of a BPF ELF object."""
    from elftools.elf.elffile import ELFFile

    with path.open("rb") as f:
        elf = ELFFile(f)
        return {
            s.name: s.data()
            for s in elf.iter_sections()
            if s["sh_flags"] & 0x4 and s["sh_type"] == "SHT_PROGBITS" and s.data_size
        }


def llvm14_prints(ins: Instruction) -> bool:
    """Whether llvm-objdump 14 prints this instruction faithfully (it predates ISA v4)."""
    op, cls = ins.op, ins.cls
    if cls in (isa.ALU, isa.ALU64):
        if op == isa.MOD or (op == isa.DIV and ins.off) or (op == isa.MOV and ins.off):
            return False
        if op == isa.END and cls == isa.ALU64:
            return False
    if cls in (isa.JMP, isa.JMP32) and op == isa.JSET or ins.opcode == isa.JMP32 | isa.JA:
        return False
    if cls == isa.JMP32 and op == isa.CALL:
        return False
    if cls == isa.ST or (cls == isa.LDX and ins.mode == isa.MEMSX):
        return False
    return not (cls == isa.STX and ins.mode == isa.ATOMIC and ins.width == 4 and ins.imm != isa.ADD)


def compare_with_objdump(path: Path, *, only_known: bool = False) -> int:
    """Decode each executable section, round-trip it, and compare every line with llvm-objdump."""
    dumped = llvm_objdump(path)
    matched = 0
    for name, data in exec_sections(path).items():
        insns = decode(data)
        assert encode(insns) == data, f"{path.name}:{name} does not round-trip"
        ref = dumped[name]
        for pc, ins in zip(isa.program_counters(insns), insns, strict=True):
            if only_known and not llvm14_prints(ins):
                assert ref[pc] == "<unknown>" or ins.cls in (isa.ALU, isa.ALU64, isa.STX), ref[pc]
                continue
            assert normalise(disassemble(ins)) == ref[pc], f"{path.name}:{name} slot {pc}: {ins}"
            matched += 1
    return matched


@pytest.fixture(scope="session")
def compiled(tmp_path_factory) -> list[Path]:
    if not (CLANG and OBJDUMP):
        pytest.skip("clang / llvm-objdump not installed")
    d = tmp_path_factory.mktemp("bpfobj")
    return [
        _compile(src, d / f"{name}_{cpu}.o", cpu)
        for name, src in C_SOURCES.items()
        for cpu in ("v1", "v2", "v3")
    ]


@needs_llvm
def test_compiled_programs_match_llvm_objdump(compiled):
    total = sum(compare_with_objdump(p) for p in compiled)
    assert total > 300


@needs_llvm
@pytest.mark.skipif(not SYSTEM_OBJECTS, reason="Debian libxdp1 BPF objects not installed")
def test_libxdp_objects_match_llvm_objdump():
    total = sum(compare_with_objdump(p) for p in SYSTEM_OBJECTS)
    assert total > 1000


def every_encoding() -> list[Instruction]:
    """One instance of every opcode (and every atomic op, byte-swap width, lddw pseudo kind)."""
    out = []
    for code in sorted(isa.VALID_OPCODES):
        cls, op = code & 7, code & 0xF0
        if code == isa.LDDW:
            out += [lddw(1, v, src=s) for s in isa.PSEUDO for v in (0x912345678, -1, 5)]
        elif code & 0xE7 == isa.STX | isa.ATOMIC:
            out += [insn(code, 1, 2, -8, a) for a in isa.ATOMIC_OPS]
        elif cls in (isa.ALU, isa.ALU64) and op == isa.END:
            out += [insn(code, 3, 0, 0, w) for w in (16, 32, 64)]
        elif cls in (isa.ALU, isa.ALU64) and op in (isa.DIV, isa.MOD):
            out += [insn(code, 1, 2, o, -3) for o in (0, 1)]
        elif cls in (isa.ALU, isa.ALU64) and op == isa.MOV and code & isa.X:
            out += [insn(code, 1, 2, o, 0) for o in (0, 8, 16, 32)]
        elif code == isa.JMP | isa.CALL | isa.X:
            out.append(insn(code, 0, 0, 0, 7))
        elif code == isa.JMP | isa.EXIT:
            out.append(insn(code))
        elif code == isa.JMP | isa.CALL:
            out += [insn(code, 0, s, 0, 5) for s in (0, 1, 2)]
        else:
            out += [
                insn(code, 1, 2, off, imm) for off, imm in ((5, 7), (-32768, -1), (0, 2**31 - 1))
            ]
    return out


@needs_llvm
def test_every_opcode_against_llvm_objdump(tmp_path):
    """Assemble every encoding as raw bytes; llvm 14 must agree wherever it knows the op."""
    insns = every_encoding()
    data = encode(insns)
    asm = tmp_path / "all.s"
    lines = ['\t.section xdp,"ax",@progbits']
    lines += [
        f"\t.byte {','.join(str(b) for b in data[i : i + 8])}" for i in range(0, len(data), 8)
    ]
    asm.write_text("\n".join(lines) + "\n")
    obj = tmp_path / "all.o"
    subprocess.run([CLANG, "-target", "bpf", "-c", str(asm), "-o", str(obj)], check=True)
    assert decode(data) == insns
    assert compare_with_objdump(obj, only_known=True) > 250


# The ISA v4 text that llvm 14 cannot print, in the syntax of newer llvm-objdump.
V4_TEXT = [
    (insn(0x3F, 1, 2, 1), "r1 s/= r2"),
    (insn(0x9C, 1, 2, 1), "w1 s%= w2"),
    (insn(0x97, 1, 0, 0, 10), "r1 %= 10"),
    (insn(0xBF, 1, 2, 8), "r1 = (s8)r2"),
    (insn(0xBC, 1, 2, 16), "w1 = (s16)w2"),
    (insn(0xBF, 1, 2, 32), "r1 = (s32)r2"),
    (insn(0x91, 1, 2, -8), "r1 = *(s8 *)(r2 - 8)"),
    (insn(0x81, 1, 2, 4), "r1 = *(s32 *)(r2 + 4)"),
    (insn(0xD7, 0, 0, 0, 16), "r0 = bswap16 r0"),
    (insn(0xD7, 0, 0, 0, 64), "r0 = bswap64 r0"),
    (insn(0x06, 0, 0, 0, 70000), "gotol +70000"),
    (insn(0x45, 1, 0, 2, 8), "if r1 & 8 goto +2"),
    (insn(0x62, 10, 0, -4, 7), "*(u32 *)(r10 - 4) = 7"),
    (insn(0xC3, 1, 2, -8, 0x41), "w2 = atomic_fetch_or((u32 *)(r1 - 8), w2)"),
    (insn(0xC3, 1, 2, -8, 0xE1), "w2 = xchg32_32(r1 - 8, w2)"),
    (insn(0xC3, 1, 2, -8, 0xF1), "w0 = cmpxchg32_32(r1 - 8, w0, w2)"),
    (insn(0xDB, 1, 2, 0, 0x50), "lock *(u64 *)(r1 + 0) &= r2"),
    (insn(0x8D, 0, 0, 0, 3), "callx r3"),
    (insn(0x85, 0, 1, 0, 4), "call 4"),
    (insn(0x20, 0, 0, 0, 12), "r0 = *(u32 *)skb[12]"),
    (insn(0x48, 0, 3, 0, 0), "r0 = *(u16 *)skb[r3]"),
    (lddw(1, 0, src=1), "ld_pseudo r1, 1, 0"),
]


@pytest.mark.parametrize(("ins", "text"), V4_TEXT, ids=[t for _, t in V4_TEXT])
def test_text_of_ops_llvm14_cannot_print(ins, text):
    assert disassemble(ins) == text
    assert decode(encode([ins])) == [ins]


def test_jump_target_with_pc():
    assert disassemble(insn(0x05, off=-3), pc=10) == "goto -3 <8>"
    assert disassemble(insn(0x06, imm=5), pc=0) == "gotol +5 <6>"


def capstone_name(ins: Instruction) -> str | None:
    """The capstone 5 mnemonic for instructions capstone decodes the same way, else None."""
    cls, op = ins.cls, ins.op
    size = {1: "b", 2: "h", 4: "w", 8: "dw"}
    if cls in (isa.ALU, isa.ALU64):
        if ins.off:
            return None
        if op == isa.END:
            return None if cls == isa.ALU64 else f"{'be' if ins.source else 'le'}{ins.imm}"
        return isa.ALU_OPS[op] + ("64" if cls == isa.ALU64 else "")
    if cls == isa.JMP:
        if ins.opcode == 0x8D:
            return "callx"
        return "jmp" if op == isa.JA else isa.JMP_OPS[op]
    if cls == isa.JMP32:
        return None
    if ins.opcode == isa.LDDW:
        return "lddw"
    if cls == isa.LD:
        return "ld" + size[ins.width]
    if cls == isa.LDX:
        return "ldx" + size[ins.width] if ins.mode == isa.MEM else None
    if cls == isa.ST:
        return "st" + size[ins.width]
    if ins.mode == isa.ATOMIC:
        return "xadd" + size[ins.width]
    return "stx" + size[ins.width]


def test_mnemonics_agree_with_capstone():
    capstone = pytest.importorskip("capstone")
    if not hasattr(capstone, "CS_ARCH_BPF"):
        pytest.skip("capstone has no BPF support (need capstone >= 5)")
    md = capstone.Cs(capstone.CS_ARCH_BPF, capstone.CS_MODE_BPF_EXTENDED)
    checked = 0
    for ins in every_encoding():
        want = capstone_name(ins)
        got = list(md.disasm(encode([ins]), 0))
        if want is None or not got:
            continue
        assert got[0].mnemonic == want, (ins, got[0].mnemonic, got[0].op_str)
        assert got[0].size == 8 * ins.size
        checked += 1
    assert checked > 150


def test_decode_errors_name_slot_and_byte():
    ok = encode([insn(0xB7, 0, 0, 0, 1)])
    with pytest.raises(DecodeError, match=r"slot 1: unknown opcode 0xe7"):
        decode(ok + bytes([0xE7]) + bytes(7))
    with pytest.raises(DecodeError, match=r"truncated.*slot 1 has only 3 bytes"):
        decode(ok + b"\x95\x00\x00")
    with pytest.raises(DecodeError, match=r"slot 1: lddw .* missing its second slot"):
        decode(ok + encode([lddw(1, 5)])[:8])
    with pytest.raises(DecodeError, match=r"slot 2: second half of lddw at slot 1"):
        decode(ok + encode([lddw(1, 5)])[:8] + encode([insn(0x95)]))
    with pytest.raises(
        DecodeError, match=r"slot 0: atomic opcode 0xdb has unknown operation imm=0x2"
    ):
        decode(encode([insn(0xDB, 1, 2, 0, 2)]))
    with pytest.raises(DecodeError, match=r"pseudo kind src=9"):
        decode(encode([lddw(1, 0, src=9)]))
    with pytest.raises(DecodeError, match=r"register r11"):
        decode(struct.pack("<BBhi", 0xBF, 0x0B, 0, 0))


@given(st.lists(st.sampled_from(every_encoding()), max_size=30))
def test_round_trip_random_programs(insns):
    data = encode(insns)
    assert decode(data) == insns
    assert encode(decode(data)) == data
    assert len(data) == 8 * sum(i.size for i in insns)


@given(st.integers(-(2**63), 2**64 - 1))
def test_lddw_value_round_trip(value):
    ins = decode(encode([lddw(0, value)]))[0]
    assert ins.imm64 == value & isa.MASK64
    assert ins.size == 2
