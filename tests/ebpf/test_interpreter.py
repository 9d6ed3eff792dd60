"""The concrete interpreter on bpf_conformance-style cases (our own) and on clang-compiled XDP code."""

from __future__ import annotations

import shutil
import struct
import subprocess

import pytest

from datahall.ebpf.interpreter import (
    AccessError,
    InvalidProgram,
    Memory,
    StepLimitExceeded,
    UnknownHelper,
    run,
    xdp_memory,
)
from datahall.ebpf.isa import decode, encode, insn, lddw

M64 = (1 << 64) - 1
EXIT = insn(0x95)


def mov(dst, imm):  # r_dst = imm (ALU64)
    return insn(0xB7, dst, 0, 0, imm)


def mov32(dst, imm):
    return insn(0xB4, dst, 0, 0, imm)


def alu64(op, dst, src=None, imm=0, off=0):
    return insn(0x07 | op | (0x08 if src is not None else 0), dst, src or 0, off, imm)


def alu32(op, dst, src=None, imm=0, off=0):
    return insn(0x04 | op | (0x08 if src is not None else 0), dst, src or 0, off, imm)


CASES = {
    # ALU edge cases
    "add32 wraps and zero-extends": ([lddw(0, 0xFFFF_FFFF_FFFF_FFFF), alu32(0x00, 0, imm=1), EXIT], 0),
    "add64 with negative imm": ([mov(0, 5), alu64(0x00, 0, imm=-7), EXIT], M64 - 1),
    "mov32 imm zero-extends": ([mov32(0, -1), EXIT], 0xFFFF_FFFF),
    "mov64 imm sign-extends": ([mov(0, -1), EXIT], M64),
    "mul32": ([mov(0, 0x10000), alu32(0x20, 0, imm=0x10001), EXIT], 0x10000),
    "lsh64 by register masks": ([mov(0, 1), mov(1, 65), alu64(0x60, 0, 1), EXIT], 2),
    "rsh32 of a 64-bit value": ([lddw(0, 0x1_8000_0000), alu32(0x70, 0, imm=31), EXIT], 1),
    "arsh64": ([mov(0, -16), alu64(0xC0, 0, imm=2), EXIT], M64 - 3),
    "arsh32": ([mov32(0, -16), alu32(0xC0, 0, imm=2), EXIT], 0xFFFF_FFFC),
    "neg32": ([mov(0, 2), alu32(0x80, 0), EXIT], 0xFFFF_FFFE),
    "neg64": ([mov(0, 2), alu64(0x80, 0), EXIT], M64 - 1),
    "xor/or/and": ([mov(0, 0xF0), alu64(0xA0, 0, imm=0xFF), alu64(0x40, 0, imm=0x100), alu64(0x50, 0, imm=0x10F), EXIT], 0x10F),
    # division semantics of RFC 9669
    "div64 by zero register is 0": ([mov(0, 9), mov(1, 0), alu64(0x30, 0, 1), EXIT], 0),
    "div32 by zero imm is 0": ([mov(0, 9), alu32(0x30, 0, imm=0), EXIT], 0),
    "mod64 by zero keeps dst": ([lddw(0, 0x1_0000_0009), mov(1, 0), alu64(0x90, 0, 1), EXIT], 0x1_0000_0009),
    "mod32 by zero keeps low half": ([lddw(0, 0x1_0000_0009), alu32(0x90, 0, imm=0), EXIT], 9),
    "div64 imm is sign-extended then unsigned": ([mov(0, -1), alu64(0x30, 0, imm=-1), EXIT], 1),
    "udiv64": ([lddw(0, 10**15), alu64(0x30, 0, imm=7), EXIT], 10**15 // 7),
    "sdiv64": ([mov(0, -7), alu64(0x30, 0, imm=2, off=1), EXIT], M64 - 2),
    "smod64": ([mov(0, -7), alu64(0x90, 0, imm=2, off=1), EXIT], M64),
    "sdiv32 INT_MIN / -1": ([mov32(0, -(2**31)), alu32(0x30, 0, imm=-1, off=1), EXIT], 0x8000_0000),
    "smod64 INT_MIN % -1": ([lddw(0, 1 << 63), alu64(0x90, 0, imm=-1, off=1), EXIT], 0),
    "sdiv64 by zero": ([mov(0, -7), alu64(0x30, 0, imm=0, off=1), EXIT], 0),
    # sign extension and byte swaps
    "movsx8": ([mov(1, 0x180), alu64(0xB0, 0, 1, off=8), EXIT], M64 - 127),
    "movsx16 32-bit": ([mov(1, 0x8000), alu32(0xB0, 0, 1, off=16), EXIT], 0xFFFF_8000),
    "movsx32": ([lddw(1, 0x1_8000_0000), alu64(0xB0, 0, 1, off=32), EXIT], M64 - 0x7FFF_FFFF),
    "be16": ([lddw(0, 0x1122_3344_5566_7788), insn(0xDC, 0, 0, 0, 16), EXIT], 0x8877),
    "be32": ([lddw(0, 0x1122_3344_5566_7788), insn(0xDC, 0, 0, 0, 32), EXIT], 0x8877_6655),
    "be64": ([lddw(0, 0x1122_3344_5566_7788), insn(0xDC, 0, 0, 0, 64), EXIT], 0x8877_6655_4433_2211),
    "le16 truncates": ([lddw(0, 0x1122_3344_5566_7788), insn(0xD4, 0, 0, 0, 16), EXIT], 0x7788),
    "bswap32": ([lddw(0, 0x1122_3344_5566_7788), insn(0xD7, 0, 0, 0, 32), EXIT], 0x8877_6655),
    # lddw
    "lddw full 64 bits": ([lddw(0, 0x8000_0000_0000_0001), EXIT], 0x8000_0000_0000_0001),
    "lddw high half only": ([lddw(0, 0xFFFF_FFFF_0000_0000), EXIT], 0xFFFF_FFFF_0000_0000),
    # jumps, incl. jmp32 and signed conditions
    "jsgt signed": ([mov(0, 1), mov(1, -1), insn(0x65, 1, 0, 1, 0), EXIT, mov(0, 2), EXIT], 1),
    "jgt unsigned": ([mov(0, 1), mov(1, -1), insn(0x25, 1, 0, 1, 0), EXIT, mov(0, 2), EXIT], 2),
    "jslt32 low half": ([mov(0, 0), lddw(1, 0x0000_0001_FFFF_FFFF), insn(0xC6, 1, 0, 1, 0), EXIT, mov(0, 1), EXIT], 1),
    "jslt64 same value": ([mov(0, 0), lddw(1, 0x0000_0001_FFFF_FFFF), insn(0xC5, 1, 0, 1, 0), EXIT, mov(0, 1), EXIT], 0),
    "jeq32 ignores high half": ([mov(0, 0), lddw(1, 0x5_0000_0007), insn(0x16, 1, 0, 1, 7), EXIT, mov(0, 1), EXIT], 1),
    "jset": ([mov(0, 0), mov(1, 6), insn(0x45, 1, 0, 1, 1), mov(0, 3), EXIT], 3),
    "jset reg taken": ([mov(0, 0), mov(1, 6), mov(2, 2), insn(0x4D, 1, 2, 1, 0), mov(0, 3), EXIT], 0),
    "jsle/jsge": ([mov(0, 0), mov(1, -5), insn(0xD5, 1, 0, 1, -5), EXIT, insn(0x75, 1, 0, 1, -4), mov(0, 7), EXIT], 7),
    "jlt/jle/jne": ([mov(0, 0), mov(1, 3), insn(0xA5, 1, 0, 1, 3), insn(0xB5, 1, 0, 1, 3), EXIT, insn(0x55, 1, 0, 1, 3), mov(0, 9), EXIT], 9),
    "goto back loop sums 1..10": (
        [mov(0, 0), mov(1, 10), alu64(0x00, 0, 1), alu64(0x10, 1, imm=1), insn(0x55, 1, 0, -3, 0), EXIT],
        55,
    ),
    "gotol": ([mov(0, 1), insn(0x06, 0, 0, 0, 1), EXIT, mov(0, 2), EXIT], 2),
    "ja over lddw": ([mov(0, 1), insn(0x05, 0, 0, 2, 0), lddw(0, 5), EXIT], 1),
    # memory: stack stores, loads, sign-extending loads
    "stack store/load u64": ([mov(1, -2), insn(0x7B, 10, 1, -8, 0), insn(0x79, 0, 10, -8, 0), EXIT], M64 - 1),
    "st imm u16 then ldx u8": ([insn(0x6A, 10, 0, -2, 0x1234), insn(0x71, 0, 10, -1, 0), EXIT], 0x12),
    "st imm u64 sign-extends": ([insn(0x7A, 10, 0, -8, -1), insn(0x79, 0, 10, -8, 0), EXIT], M64),
    "ldsx s16": ([insn(0x6A, 10, 0, -2, 0x8001), insn(0x89, 0, 10, -2, 0), EXIT], M64 - 0x7FFE),
    "ldsx s32": ([insn(0x62, 10, 0, -4, -3), insn(0x81, 0, 10, -4, 0), EXIT], M64 - 2),
    # atomics
    "atomic add64": ([insn(0x7A, 10, 0, -8, 40), mov(1, 2), insn(0xDB, 10, 1, -8, 0x00), insn(0x79, 0, 10, -8, 0), EXIT], 42),
    "atomic fetch_add32": ([insn(0x62, 10, 0, -4, 40), mov(1, 2), insn(0xC3, 10, 1, -4, 0x01), alu64(0x00, 1, imm=0), insn(0x61, 0, 10, -4, 0), alu64(0x20, 0, imm=100), alu64(0x08, 0, 1), EXIT], 4240),
    "atomic fetch_or64": ([insn(0x7A, 10, 0, -8, 1), mov(1, 6), insn(0xDB, 10, 1, -8, 0x41), insn(0x79, 0, 10, -8, 0), alu64(0x60, 0, imm=8), alu64(0x08, 0, 1), EXIT], 0x701),
    "atomic and/xor": ([insn(0x7A, 10, 0, -8, 0xFF), mov(1, 0x0F), insn(0xDB, 10, 1, -8, 0x50), mov(1, 3), insn(0xDB, 10, 1, -8, 0xA0), insn(0x79, 0, 10, -8, 0), EXIT], 0x0C),
    "atomic fetch_xor32 returns old zero-extended": ([insn(0x62, 10, 0, -4, -1), mov(1, -1), insn(0xC3, 10, 1, -4, 0xA1), mov(0, 0), alu64(0x08, 0, 1), EXIT], 0xFFFF_FFFF),
    "xchg64": ([insn(0x7A, 10, 0, -8, 7), mov(1, 9), insn(0xDB, 10, 1, -8, 0xE1), insn(0x79, 0, 10, -8, 0), alu64(0x20, 0, imm=10), alu64(0x08, 0, 1), EXIT], 97),
    "cmpxchg64 success": ([insn(0x7A, 10, 0, -8, 7), mov(0, 7), mov(1, 9), insn(0xDB, 10, 1, -8, 0xF1), insn(0x79, 1, 10, -8, 0), alu64(0x20, 0, imm=10), alu64(0x08, 0, 1), EXIT], 79),
    "cmpxchg32 failure": ([insn(0x62, 10, 0, -4, 7), mov(0, 8), mov(1, 9), insn(0xC3, 10, 1, -4, 0xF1), insn(0x61, 1, 10, -4, 0), alu64(0x20, 0, imm=10), alu64(0x08, 0, 1), EXIT], 77),
    # bpf-to-bpf calls: callee gets a fresh frame, r6-r9 and r10 restored
    "local call": (
        [mov(6, 5), mov(1, 3), insn(0x85, 0, 1, 0, 2), alu64(0x08, 0, 6), EXIT, mov(6, 100), alu64(0xB8, 0, 1), alu64(0x20, 0, imm=10), EXIT],
        35,
    ),
    "nested calls and stacks": (
        [
            insn(0x7A, 10, 0, -8, 1), mov(1, 4), insn(0x85, 0, 1, 0, 3), insn(0x79, 1, 10, -8, 0), alu64(0x08, 0, 1), EXIT,
            insn(0x7A, 10, 0, -8, 10), insn(0x85, 0, 1, 0, 3), insn(0x79, 2, 10, -8, 0), alu64(0x08, 0, 2), EXIT,
            insn(0x79, 0, 10, -8, 0), alu64(0x08, 0, 1), EXIT,
        ],
        15,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_conformance_case(name):
    prog, want = CASES[name]
    prog = decode(encode(prog))  # every case also round-trips through bytes
    assert run(prog).r0 == want


def test_helpers_and_callx():
    seen = []

    def ktime(mem, *args):
        seen.append(args)
        return 1_000

    prog = [
        mov(1, 7),
        insn(0x85, 0, 0, 0, 5),
        mov(3, 5),
        insn(0x8D, 0, 0, 0, 3),
        alu64(0x00, 0, imm=1),
        EXIT,
    ]
    assert run(prog, helpers={5: ktime}).r0 == 1_001
    assert seen[0][0] == 7 and len(seen) == 2 and seen[0] == (7, 0, 0, 0, 0)


def test_errors_are_clear():
    with pytest.raises(UnknownHelper, match=r"pc 0: call of helper 6: no helper"):
        run([insn(0x85, imm=6), EXIT])
    with pytest.raises(UnknownHelper, match="BTF id"):
        run([insn(0x85, 0, 2, 0, 77), EXIT])
    with pytest.raises(StepLimitExceeded, match="pc 0: step limit of 50"):
        run([insn(0x05, off=-1), EXIT], max_steps=50)
    with pytest.raises(
        AccessError, match=r"pc 0: load of 8 bytes at 0x10000200 is outside every region"
    ):
        run([insn(0x79, 0, 10, 0, 0), EXIT])
    with pytest.raises(AccessError, match=r"stack0\+508 leaves 4 bytes"):
        run([insn(0x7A, 10, 0, -4, 0), insn(0x79, 0, 10, -4, 0), EXIT])
    with pytest.raises(InvalidProgram, match="past the end"):
        run([mov(0, 0)])
    with pytest.raises(InvalidProgram, match="middle of an lddw"):
        run([insn(0x05, off=1), lddw(0, 1), EXIT])
    with pytest.raises(InvalidProgram, match="pseudo kind map_fd"):
        run([lddw(1, 3, src=1), EXIT])
    with pytest.raises(InvalidProgram, match="read-only"):
        run([mov(10, 0), EXIT])
    mem, ctx = xdp_memory(b"\x00" * 4)
    with pytest.raises(AccessError, match="read-only region ctx"):
        run([insn(0x62, 1, 0, 0, 0), EXIT], memory=mem, r1=ctx)
    assert (
        run([lddw(1, 3, src=1), alu64(0xB8, 0, 1), EXIT], resolve_pseudo=lambda i: 0xAB).r0 == 0xAB
    )


def test_legacy_packet_loads_and_trace():
    mem = Memory()
    mem.add("packet", bytes([0x08, 0x00, 0x45, 0x11]))
    prog = [insn(0x28, imm=0), mov(1, 2), insn(0x48, 0, 1, 0, 0), EXIT]
    res = run(prog, memory=mem, trace=True)
    assert res.r0 == 0x4511 and res.trace == [0, 1, 2, 3] and res.steps == 4
    assert run([insn(0x30, imm=1), EXIT], memory=mem).r0 == 0x00
    assert run([insn(0x28, imm=2), mov(0, 9), EXIT], memory=mem).r0 == 9
    assert (
        run([insn(0x20, imm=3), mov(0, 9), EXIT], memory=mem).r0 == 0
    )  # out of bounds ends with 0


CLANG = shutil.which("clang-14") or shutil.which("clang")

XDP_SOURCE = r"""
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/in.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

SEC("xdp") int ttl_guard(struct xdp_md *ctx) {
    void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end) return XDP_ABORTED;
    if (eth->h_proto != bpf_htons(ETH_P_IP)) return XDP_PASS;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > end) return XDP_ABORTED;
    if (ip->protocol == IPPROTO_UDP) {
        struct udphdr *udp = (void *)ip + ip->ihl * 4;
        if ((void *)(udp + 1) > end) return XDP_ABORTED;
        if (udp->dest == bpf_htons(53)) return XDP_DROP;
    }
    if (ip->ttl <= 1) { ip->ttl = 64; return XDP_TX; }
    return XDP_PASS;
}
char _license[] SEC("license") = "GPL";
"""


def packet(*, eth_type=0x0800, proto=17, ttl=5, dport=80, truncate=None) -> bytes:
    eth = b"\xaa" * 6 + b"\xbb" * 6 + struct.pack("!H", eth_type)
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 28, 1, 0, ttl, proto, 0, b"\x0a\0\0\1", b"\x0a\0\0\2"
    )
    udp = struct.pack("!HHHH", 1234, dport, 8, 0)
    raw = eth + ip + udp
    return raw[:truncate] if truncate is not None else raw


@pytest.fixture(scope="module")
def xdp_program(tmp_path_factory):
    if not CLANG:
        pytest.skip("clang not installed")
    from elftools.elf.elffile import ELFFile

    d = tmp_path_factory.mktemp("xdp")
    (d / "x.c").write_text(XDP_SOURCE)
    progs = {}
    for cpu in ("v1", "v3"):
        obj = d / f"x_{cpu}.o"
        cmd = [
            CLANG,
            "-O2",
            "-g",
            "-target",
            "bpf",
            f"-mcpu={cpu}",
            "-I/usr/include/x86_64-linux-gnu",
        ]
        subprocess.run(
            [*cmd, "-c", str(d / "x.c"), "-o", str(obj)], check=True, capture_output=True
        )
        with obj.open("rb") as f:
            progs[cpu] = decode(ELFFile(f).get_section_by_name("xdp").data())
    return progs


@pytest.mark.parametrize("cpu", ["v1", "v3"])
@pytest.mark.parametrize(
    ("pkt", "want", "ttl_after"),
    [
        (packet(), 2, 5),  # XDP_PASS
        (packet(dport=53), 1, 5),  # XDP_DROP
        (packet(proto=6, ttl=1), 3, 64),  # XDP_TX, TTL rewritten in the packet
        (packet(ttl=0, dport=99), 3, 64),
        (packet(eth_type=0x86DD), 2, None),
        (packet(truncate=20), 0, None),  # XDP_ABORTED on a short IP header
        (packet(truncate=10), 0, None),
        (packet(truncate=36), 0, None),  # UDP header cut short
    ],
)
def test_compiled_xdp_program(xdp_program, cpu, pkt, want, ttl_after):
    mem, ctx = xdp_memory(pkt)
    res = run(xdp_program[cpu], memory=mem, r1=ctx)
    assert res.r0 == want
    if ttl_after is not None:
        assert mem["packet"].data[14 + 8] == ttl_after
