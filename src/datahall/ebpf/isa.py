"""The BPF instruction set of RFC 9669: opcodes, decoding, encoding and llvm-objdump text.

A BPF program is a sequence of 8-byte little-endian *slots*. Each slot holds an opcode byte, a
byte with the destination register (low nibble) and source register (high nibble), a signed
16-bit offset and a signed 32-bit immediate. The wide load ``lddw`` (opcode ``0x18``) takes two
slots: the second slot's immediate is the high half of a 64-bit constant, and its ``src`` names a
*pseudo* kind (0 plain constant, 1 map by fd, 2 map value, 3..6 others, see :data:`PSEUDO`).

:func:`decode` turns bytes into :class:`Instruction` records, :func:`encode` turns them back into
the very same bytes, and :func:`disassemble` prints one instruction in the syntax of
``llvm-objdump -d``. The decoder covers ISA versions v1 to v4 (clang's ``-mcpu``), including the
v4 additions that older tools do not decode: signed division and modulo (``off = 1``), ``movsx``,
sign-extending loads (``ldsx``), the unconditional ``bswap``, and ``gotol`` (``JA`` in the JMP32
class with a 32-bit offset in ``imm``).

>>> prog = decode(bytes.fromhex("b701000002000000" "bf10000000000000" "9500000000000000"))
>>> [disassemble(i) for i in prog]
['r1 = 2', 'r0 = r1', 'exit']
>>> encode(prog) == bytes.fromhex("b701000002000000bf100000000000009500000000000000")
True
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = [
    "Instruction",
    "DecodeError",
    "decode",
    "encode",
    "disassemble",
    "lddw",
    "insn",
    "PSEUDO",
    "ALU_OPS",
    "JMP_OPS",
    "ATOMIC_OPS",
    "SIZE_BYTES",
]

# Instruction classes (low 3 bits of the opcode).
LD, LDX, ST, STX, ALU, JMP, JMP32, ALU64 = range(8)
CLASS_NAMES = ("LD", "LDX", "ST", "STX", "ALU", "JMP", "JMP32", "ALU64")

# Source bit of arithmetic and jump opcodes.
K, X = 0x00, 0x08

# ALU operations (high 4 bits of the opcode).
ADD, SUB, MUL, DIV, OR, AND, LSH, RSH = 0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70
NEG, MOD, XOR, MOV, ARSH, END = 0x80, 0x90, 0xA0, 0xB0, 0xC0, 0xD0
ALU_OPS = {
    ADD: "add", SUB: "sub", MUL: "mul", DIV: "div", OR: "or", AND: "and", LSH: "lsh",
    RSH: "rsh", NEG: "neg", MOD: "mod", XOR: "xor", MOV: "mov", ARSH: "arsh", END: "end",
}  # fmt: skip

# Jump operations (high 4 bits of the opcode).
JA, JEQ, JGT, JGE, JSET, JNE, JSGT, JSGE = 0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70
CALL, EXIT, JLT, JLE, JSLT, JSLE = 0x80, 0x90, 0xA0, 0xB0, 0xC0, 0xD0
JMP_OPS = {
    JA: "ja", JEQ: "jeq", JGT: "jgt", JGE: "jge", JSET: "jset", JNE: "jne", JSGT: "jsgt",
    JSGE: "jsge", CALL: "call", EXIT: "exit", JLT: "jlt", JLE: "jle", JSLT: "jslt", JSLE: "jsle",
}  # fmt: skip
CONDITIONS = (JEQ, JGT, JGE, JSET, JNE, JSGT, JSGE, JLT, JLE, JSLT, JSLE)

# Memory access sizes (bits 3-4) and modes (bits 5-7) of load and store opcodes.
W, H, B, DW = 0x00, 0x08, 0x10, 0x18
SIZE_BYTES = {W: 4, H: 2, B: 1, DW: 8}
IMM, ABS, IND, MEM, MEMSX, ATOMIC = 0x00, 0x20, 0x40, 0x60, 0x80, 0xC0

# Atomic operations (the ``imm`` of an ATOMIC store); FETCH returns the old value in ``src``.
FETCH = 0x01
XCHG = 0xE0 | FETCH
CMPXCHG = 0xF0 | FETCH
ATOMIC_OPS = {
    ADD: "add", ADD | FETCH: "fetch_add", OR: "or", OR | FETCH: "fetch_or", AND: "and",
    AND | FETCH: "fetch_and", XOR: "xor", XOR | FETCH: "fetch_xor", XCHG: "xchg",
    CMPXCHG: "cmpxchg",
}  # fmt: skip

# Pseudo kinds of ``lddw`` (its ``src`` field), as in linux/bpf.h.
PSEUDO = {
    0: "imm64",
    1: "map_fd",  # BPF_PSEUDO_MAP_FD: imm is a map fd (or, in an object file, a relocated map)
    2: "map_value",  # BPF_PSEUDO_MAP_VALUE: map fd plus an offset into its value (next_imm)
    3: "btf_id",  # BPF_PSEUDO_BTF_ID: a kernel variable by BTF id
    4: "func",  # BPF_PSEUDO_FUNC: address of a program-local function, pc-relative imm
    5: "map_idx",  # BPF_PSEUDO_MAP_IDX: map by index into fd_array
    6: "map_idx_value",  # BPF_PSEUDO_MAP_IDX_VALUE
}

LDDW = LD | IMM | DW  # 0x18
MASK64 = (1 << 64) - 1
_SLOT = struct.Struct("<BBhi")


class DecodeError(ValueError):
    """Bytes that are not a valid BPF program; the message names the slot and the byte."""


def _valid_opcodes() -> frozenset[int]:
    ok: set[int] = set()
    for cls in (ALU, ALU64):
        for op in ALU_OPS:
            for src in (K, X):
                if op == NEG and src == X:
                    continue
                if op == END and cls == ALU64 and src == X:
                    continue
                ok.add(cls | op | src)
    for cls in (JMP, JMP32):
        for op in CONDITIONS:
            ok |= {cls | op | K, cls | op | X}
    ok |= {JMP | JA, JMP | CALL, JMP | CALL | X, JMP | EXIT, JMP32 | JA}
    for size in (W, H, B, DW):
        ok |= {LDX | MEM | size, ST | MEM | size, STX | MEM | size}
    for size in (W, H, B):
        ok |= {LDX | MEMSX | size, LD | ABS | size, LD | IND | size}
    ok |= {STX | ATOMIC | W, STX | ATOMIC | DW, LDDW}
    return frozenset(ok)


VALID_OPCODES = _valid_opcodes()


@dataclass(frozen=True)
class Instruction:
    """One decoded instruction: the fields of its slot, and for ``lddw`` the second slot's half.

    ``imm`` and ``off`` are signed, as stored. For ``lddw`` (``size == 2``), ``next_imm`` is the
    second slot's immediate and :attr:`imm64` the full 64-bit constant (unsigned).

    >>> i = Instruction(0x61, dst=1, src=1, off=4)
    >>> i.cls, i.mode, i.width, disassemble(i)
    (1, 96, 4, 'r1 = *(u32 *)(r1 + 4)')
    """

    opcode: int
    dst: int = 0
    src: int = 0
    off: int = 0
    imm: int = 0
    next_imm: int = 0

    @property
    def size(self) -> int:
        """Number of 8-byte slots: 2 for ``lddw``, else 1."""
        return 2 if self.opcode == LDDW else 1

    @property
    def imm64(self) -> int:
        """The 64-bit constant of ``lddw`` (unsigned); for other opcodes ``imm`` sign-extended."""
        if self.opcode == LDDW:
            return (self.imm & 0xFFFFFFFF) | ((self.next_imm & 0xFFFFFFFF) << 32)
        return self.imm & MASK64

    @property
    def cls(self) -> int:
        """Instruction class, one of LD, LDX, ST, STX, ALU, JMP, JMP32, ALU64 (0..7)."""
        return self.opcode & 0x07

    @property
    def op(self) -> int:
        """Operation (high 4 bits) of an ALU or jump opcode."""
        return self.opcode & 0xF0

    @property
    def source(self) -> int:
        """``K`` (0, use ``imm``) or ``X`` (8, use register ``src``)."""
        return self.opcode & 0x08

    @property
    def mode(self) -> int:
        """Mode (bits 5-7) of a load/store opcode."""
        return self.opcode & 0xE0

    @property
    def width(self) -> int:
        """Access width in bytes of a load/store opcode."""
        return SIZE_BYTES[self.opcode & 0x18]

    @property
    def is_alu(self) -> bool:
        return self.cls in (ALU, ALU64)

    @property
    def is_jump(self) -> bool:
        """Conditional or unconditional jump (not call/exit)."""
        return self.cls in (JMP, JMP32) and self.op not in (CALL, EXIT)

    @property
    def jump_offset(self) -> int:
        """Slots to skip when the jump is taken (``imm`` for ``gotol``, else ``off``)."""
        return self.imm if self.opcode == JMP32 | JA else self.off

    def slots(self) -> list[tuple[int, int, int, int, int]]:
        """The raw (opcode, dst, src, off, imm) of each slot."""
        first = (self.opcode, self.dst, self.src, self.off, self.imm)
        return [first, (0, 0, 0, 0, self.next_imm)] if self.size == 2 else [first]


def insn(opcode: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> Instruction:
    """One single-slot instruction, ``imm`` given signed or as an unsigned 32-bit value.

    >>> disassemble(insn(0xB4, dst=0, imm=0xFFFFFFFF))
    'w0 = -1'
    """
    imm &= 0xFFFFFFFF
    return Instruction(opcode, dst, src, off, imm - (1 << 32) if imm >> 31 else imm)


def lddw(dst: int, value: int, src: int = 0) -> Instruction:
    """The two-slot ``lddw dst, value`` (``src`` is the pseudo kind, 0 for a constant).

    >>> disassemble(lddw(1, -1)), lddw(2, 1 << 32).imm64
    ('r1 = -1 ll', 4294967296)
    """
    value &= MASK64
    lo, hi = value & 0xFFFFFFFF, value >> 32
    return Instruction(
        LDDW, dst, src, 0, lo - (1 << 32) if lo >> 31 else lo, hi - (1 << 32) if hi >> 31 else hi
    )


def _check(pc: int, code: int, dst: int, src: int, off: int, imm: int) -> None:
    if code not in VALID_OPCODES:
        raise DecodeError(f"slot {pc}: unknown opcode 0x{code:02x} (not in RFC 9669)")
    if dst > 10 or src > 10:
        raise DecodeError(f"slot {pc}: opcode 0x{code:02x} names register r{max(dst, src)} > r10")
    cls, op = code & 7, code & 0xF0
    if code & 0xE7 == STX | ATOMIC and imm not in ATOMIC_OPS:
        raise DecodeError(
            f"slot {pc}: atomic opcode 0x{code:02x} has unknown operation imm=0x{imm & 0xFFFFFFFF:x}"
        )
    if code == LDDW and src not in PSEUDO:
        raise DecodeError(f"slot {pc}: lddw has unknown pseudo kind src={src} (known 0..6)")
    if cls in (ALU, ALU64) and op == END and imm not in (16, 32, 64):
        raise DecodeError(
            f"slot {pc}: byte swap opcode 0x{code:02x} has width imm={imm} (16, 32 or 64)"
        )


def decode(data: bytes) -> list[Instruction]:
    """Decode a BPF program (little-endian slots) into instructions, ``lddw`` as one record.

    Raises :class:`DecodeError`, naming the slot and the byte, for a length that is not a
    multiple of 8, an opcode RFC 9669 does not define, or a ``lddw`` without its second half.

    >>> [i.opcode for i in decode(bytes.fromhex("1801000001000000" "0000000002000000"))]
    [24]
    >>> decode(bytes.fromhex("ff00000000000000"))
    Traceback (most recent call last):
    ...
    datahall.ebpf.isa.DecodeError: slot 0: unknown opcode 0xff (not in RFC 9669)
    """
    data = bytes(data)
    if len(data) % 8:
        raise DecodeError(
            f"truncated program: {len(data)} bytes is not a whole number of 8-byte slots "
            f"(slot {len(data) // 8} has only {len(data) % 8} bytes)"
        )
    n = len(data) // 8
    out: list[Instruction] = []
    pc = 0
    while pc < n:
        code, regs, off, imm = _SLOT.unpack_from(data, pc * 8)
        dst, src = regs & 0x0F, regs >> 4
        _check(pc, code, dst, src, off, imm)
        if code == LDDW:
            if pc + 1 >= n:
                raise DecodeError(
                    f"slot {pc}: lddw (0x18) is missing its second slot at end of program"
                )
            code2, regs2, off2, imm2 = _SLOT.unpack_from(data, (pc + 1) * 8)
            if code2 or regs2 or off2:
                raise DecodeError(
                    f"slot {pc + 1}: second half of lddw at slot {pc} must have opcode, registers "
                    f"and offset 0, found opcode 0x{code2:02x} regs 0x{regs2:02x} off {off2}"
                )
            out.append(Instruction(code, dst, src, off, imm, imm2))
            pc += 2
        else:
            out.append(Instruction(code, dst, src, off, imm))
            pc += 1
    return out


def encode(insns: list[Instruction]) -> bytes:
    """The bytes of a list of instructions; ``encode(decode(b)) == b`` for every valid ``b``.

    >>> encode([lddw(0, 5), insn(0x95)]).hex()
    '180000000500000000000000000000009500000000000000'
    """
    parts = []
    for ins in insns:
        for code, dst, src, off, imm in ins.slots():
            parts.append(_SLOT.pack(code, (src << 4) | dst, off, imm))
    return b"".join(parts)


def program_counters(insns: list[Instruction]) -> list[int]:
    """The slot index of each instruction (``lddw`` takes two slots).

    >>> program_counters([lddw(0, 1), insn(0x95)])
    [0, 2]
    """
    pcs, pc = [], 0
    for ins in insns:
        pcs.append(pc)
        pc += ins.size
    return pcs


_ALU_SYM = {
    ADD: "+=", SUB: "-=", MUL: "*=", DIV: "/=", OR: "|=", AND: "&=", LSH: "<<=", RSH: ">>=",
    MOD: "%=", XOR: "^=", ARSH: "s>>=",
}  # fmt: skip
_JMP_SYM = {
    JEQ: "==", JGT: ">", JGE: ">=", JSET: "&", JNE: "!=", JSGT: "s>", JSGE: "s>=", JLT: "<",
    JLE: "<=", JSLT: "s<", JSLE: "s<=",
}  # fmt: skip
_ATOMIC_SYM = {ADD: "+=", OR: "|=", AND: "&=", XOR: "^="}
_UTYPE = {1: "u8", 2: "u16", 4: "u32", 8: "u64"}


def _addr(base: int, off: int) -> str:
    return f"r{base} + {off}" if off >= 0 else f"r{base} - {-off}"


def _signed(v: int, bits: int = 64) -> int:
    v &= (1 << bits) - 1
    return v - (1 << bits) if v >> (bits - 1) else v


def disassemble(ins: Instruction, pc: int | None = None) -> str:
    """One instruction in llvm-objdump's BPF syntax, without the jump label.

    With ``pc`` (the instruction's slot index), jumps end with the target slot, ``<pc+1+off>``.

    >>> disassemble(insn(0x2D, dst=2, src=3, off=5)), disassemble(insn(0x2D, 2, 3, 5), pc=10)
    ('if r2 > r3 goto +5', 'if r2 > r3 goto +5 <16>')
    >>> disassemble(insn(0xDC, dst=0, imm=16)), disassemble(insn(0xDB, 1, 2, imm=0))
    ('r0 = be16 r0', 'lock *(u64 *)(r1 + 0) += r2')
    """
    code, cls, op = ins.opcode, ins.cls, ins.op
    if cls in (ALU, ALU64):
        r = "r" if cls == ALU64 else "w"
        d = f"{r}{ins.dst}"
        s = f"{r}{ins.src}" if ins.source == X else str(ins.imm)
        if op == NEG:
            return f"{d} = -{d}"
        if op == END:
            kind = "bswap" if cls == ALU64 else ("be" if ins.source == X else "le")
            return f"r{ins.dst} = {kind}{ins.imm} r{ins.dst}"
        if op == MOV:
            if ins.source == X and ins.off in (8, 16, 32):
                return f"{d} = (s{ins.off}){s}"
            return f"{d} = {s}"
        sym = _ALU_SYM[op]
        if op in (DIV, MOD) and ins.off == 1:
            sym = "s" + sym
        return f"{d} {sym} {s}"
    if cls in (JMP, JMP32):
        if op == CALL:
            return f"callx r{ins.imm}" if ins.source == X else f"call {ins.imm}"
        if op == EXIT:
            return "exit"
        target = "" if pc is None else f" <{pc + 1 + ins.jump_offset}>"
        if op == JA:
            if cls == JMP32:
                return f"gotol {ins.imm:+d}{target}"
            return f"goto {ins.off:+d}{target}"
        r = "r" if cls == JMP else "w"
        s = f"{r}{ins.src}" if ins.source == X else str(ins.imm)
        return f"if {r}{ins.dst} {_JMP_SYM[op]} {s} goto {ins.off:+d}{target}"
    if code == LDDW:
        if ins.src:
            return f"ld_pseudo r{ins.dst}, {ins.src}, {ins.imm & 0xFFFFFFFF}"
        return f"r{ins.dst} = {_signed(ins.imm64)} ll"
    mode, width = ins.mode, ins.width
    if cls == LD:  # legacy packet access, result always in r0
        where = str(ins.imm) if mode == ABS else f"r{ins.src}"
        return f"r0 = *({_UTYPE[width]} *)skb[{where}]"
    if cls == LDX:
        t = _UTYPE[width] if mode == MEM else "s" + _UTYPE[width][1:]
        return f"r{ins.dst} = *({t} *)({_addr(ins.src, ins.off)})"
    if cls == ST:
        return f"*({_UTYPE[width]} *)({_addr(ins.dst, ins.off)}) = {ins.imm}"
    if mode == MEM:
        return f"*({_UTYPE[width]} *)({_addr(ins.dst, ins.off)}) = r{ins.src}"
    # STX | ATOMIC
    a = _addr(ins.dst, ins.off)
    imm = ins.imm
    if width == 8:
        r, t, n = "r", "u64", "64"
    else:
        r, t, n = "w", "u32", "32"
    if imm == ADD:  # llvm prints the 32-bit lock add with an r register (XADDW)
        return f"lock *({t} *)({a}) += r{ins.src}"
    if imm in _ATOMIC_SYM:
        return f"lock *({t} *)({a}) {_ATOMIC_SYM[imm]} {r}{ins.src}"
    if imm == XCHG:
        return f"{r}{ins.src} = xchg{'32' if width == 4 else ''}_{n}({a}, {r}{ins.src})"
    if imm == CMPXCHG:
        return f"{r}0 = cmpxchg{'32' if width == 4 else ''}_{n}({a}, {r}0, {r}{ins.src})"
    name = ATOMIC_OPS[imm]
    return f"{r}{ins.src} = atomic_{name}(({t} *)({a}), {r}{ins.src})"
