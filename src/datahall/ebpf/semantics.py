"""The meaning of BPF arithmetic, jumps, byte swaps and memory bytes, written once per RFC 9669.

Every function here takes a *value domain* first: :class:`Concrete` computes on Python ints masked
to 64 bits (the interpreter), :class:`Symbolic` builds z3 ``BitVec(64)`` terms (the symbolic
engine), and the same code defines both, so the two cannot drift apart. A register value is always
64 bits wide; the 32-bit (``ALU``/``JMP32``) forms look at the low half and zero the high half of
their result, as RFC 9669 §4.1 requires.

The RFC's corner cases are kept: division by zero gives 0, modulo by zero leaves the dividend (its
low 32 bits for ``ALU``); signed division truncates toward zero and ``INT_MIN / -1`` wraps to
``INT_MIN`` (modulo gives 0); shift counts are masked to 63 (31 for ``ALU``).

>>> from datahall.ebpf import isa
>>> alu(CONCRETE, isa.DIV, True, 7, 0), alu(CONCRETE, isa.MOD, False, 0x1_0000_0007, 0)
(0, 7)
>>> hex(alu(CONCRETE, isa.DIV, True, -7 & MASK64, 2, off=1))
'0xfffffffffffffffd'
>>> import z3
>>> x = z3.BitVec("x", 64)
>>> z3.simplify(alu(SYMBOLIC, isa.ADD, False, x, SYMBOLIC.const(1)))
Concat(0, 1 + Extract(31, 0, x))
"""

from __future__ import annotations

from typing import Any, Protocol

import z3

from datahall.ebpf import isa

__all__ = [
    "Domain",
    "Concrete",
    "Symbolic",
    "CONCRETE",
    "SYMBOLIC",
    "MASK64",
    "alu",
    "condition",
    "end",
    "sign_extend",
    "zero_extend",
    "compose",
    "split",
    "atomic",
    "to_signed",
]

MASK64 = (1 << 64) - 1


def to_signed(v: int, bits: int = 64) -> int:
    """The signed reading of the low ``bits`` of ``v``.

    >>> to_signed(0xFFFF_FFFF, 32), to_signed(5)
    (-1, 5)
    """
    v &= (1 << bits) - 1
    return v - (1 << bits) if v >> (bits - 1) else v


class Domain(Protocol):
    """The operations a value domain gives; values are 64 bits wide, bytes are 8 bits wide."""

    def const(self, v: int) -> Any: ...
    def add(self, a: Any, b: Any) -> Any: ...
    def sub(self, a: Any, b: Any) -> Any: ...
    def mul(self, a: Any, b: Any) -> Any: ...
    def udiv(self, a: Any, b: Any) -> Any: ...
    def urem(self, a: Any, b: Any) -> Any: ...
    def sdiv(self, a: Any, b: Any) -> Any: ...
    def srem(self, a: Any, b: Any) -> Any: ...
    def and_(self, a: Any, b: Any) -> Any: ...
    def or_(self, a: Any, b: Any) -> Any: ...
    def xor(self, a: Any, b: Any) -> Any: ...
    def shl(self, a: Any, b: Any) -> Any: ...
    def lshr(self, a: Any, b: Any) -> Any: ...
    def ashr(self, a: Any, b: Any) -> Any: ...
    def neg(self, a: Any) -> Any: ...
    def zext(self, a: Any, bits: int) -> Any: ...
    def sext(self, a: Any, bits: int) -> Any: ...
    def byte(self, a: Any, i: int) -> Any: ...
    def from_bytes(self, bs: list[Any]) -> Any: ...
    def eq(self, a: Any, b: Any) -> Any: ...
    def ult(self, a: Any, b: Any) -> Any: ...
    def ule(self, a: Any, b: Any) -> Any: ...
    def slt(self, a: Any, b: Any) -> Any: ...
    def sle(self, a: Any, b: Any) -> Any: ...
    def not_(self, c: Any) -> Any: ...
    def ite(self, c: Any, a: Any, b: Any) -> Any: ...


class Concrete:
    """Python ints in ``[0, 2**64)``; conditions are ``bool``.

    Division by zero returns 0 here; :func:`alu` applies the RFC's rule on top.
    """

    def const(self, v: int) -> int:
        return v & MASK64

    def add(self, a: int, b: int) -> int:
        return (a + b) & MASK64

    def sub(self, a: int, b: int) -> int:
        return (a - b) & MASK64

    def mul(self, a: int, b: int) -> int:
        return (a * b) & MASK64

    def udiv(self, a: int, b: int) -> int:
        return a // b if b else 0

    def urem(self, a: int, b: int) -> int:
        return a % b if b else a

    def sdiv(self, a: int, b: int) -> int:
        x, y = to_signed(a), to_signed(b)
        if not y:
            return 0
        q = abs(x) // abs(y)
        return (-q if (x < 0) != (y < 0) else q) & MASK64

    def srem(self, a: int, b: int) -> int:
        x, y = to_signed(a), to_signed(b)
        if not y:
            return a
        r = abs(x) % abs(y)
        return (-r if x < 0 else r) & MASK64

    def and_(self, a: int, b: int) -> int:
        return a & b

    def or_(self, a: int, b: int) -> int:
        return a | b

    def xor(self, a: int, b: int) -> int:
        return a ^ b

    def shl(self, a: int, b: int) -> int:
        return (a << b) & MASK64 if b < 64 else 0

    def lshr(self, a: int, b: int) -> int:
        return a >> b if b < 64 else 0

    def ashr(self, a: int, b: int) -> int:
        return (to_signed(a) >> min(b, 63)) & MASK64

    def neg(self, a: int) -> int:
        return -a & MASK64

    def zext(self, a: int, bits: int) -> int:
        return a & ((1 << bits) - 1)

    def sext(self, a: int, bits: int) -> int:
        return to_signed(a, bits) & MASK64

    def byte(self, a: int, i: int) -> int:
        return (a >> (8 * i)) & 0xFF

    def from_bytes(self, bs: list[int]) -> int:
        return int.from_bytes(bytes(bs), "little")

    def eq(self, a: int, b: int) -> bool:
        return a == b

    def ult(self, a: int, b: int) -> bool:
        return a < b

    def ule(self, a: int, b: int) -> bool:
        return a <= b

    def slt(self, a: int, b: int) -> bool:
        return to_signed(a) < to_signed(b)

    def sle(self, a: int, b: int) -> bool:
        return to_signed(a) <= to_signed(b)

    def not_(self, c: bool) -> bool:
        return not c

    def ite(self, c: bool, a: int, b: int) -> int:
        return a if c else b


class Symbolic:
    """z3 ``BitVec(64)`` terms (bytes are ``BitVec(8)``); conditions are z3 ``Bool`` terms.

    >>> s = Symbolic()
    >>> z3.simplify(condition(s, isa.JSGT, True, s.const(-1), s.const(0)))
    False
    """

    def const(self, v: int) -> z3.BitVecRef:
        return z3.BitVecVal(v & MASK64, 64)

    def add(self, a, b):
        return a + b

    def sub(self, a, b):
        return a - b

    def mul(self, a, b):
        return a * b

    def udiv(self, a, b):
        return z3.UDiv(a, b)

    def urem(self, a, b):
        return z3.URem(a, b)

    def sdiv(self, a, b):
        return a / b  # z3's bvsdiv truncates toward zero

    def srem(self, a, b):
        return z3.SRem(a, b)  # sign of the dividend, like C

    def and_(self, a, b):
        return a & b

    def or_(self, a, b):
        return a | b

    def xor(self, a, b):
        return a ^ b

    def shl(self, a, b):
        return a << b

    def lshr(self, a, b):
        return z3.LShR(a, b)

    def ashr(self, a, b):
        return a >> b

    def neg(self, a):
        return -a

    def zext(self, a, bits: int):
        return a if bits == 64 else z3.ZeroExt(64 - bits, z3.Extract(bits - 1, 0, a))

    def sext(self, a, bits: int):
        return a if bits == 64 else z3.SignExt(64 - bits, z3.Extract(bits - 1, 0, a))

    def byte(self, a, i: int):
        return z3.Extract(8 * i + 7, 8 * i, a)

    def from_bytes(self, bs: list):
        bs = [b if z3.is_bv(b) else z3.BitVecVal(b, 8) for b in bs]
        v = bs[0] if len(bs) == 1 else z3.Concat(*reversed(bs))
        return z3.ZeroExt(64 - 8 * len(bs), v) if len(bs) < 8 else v

    def eq(self, a, b):
        return a == b

    def ult(self, a, b):
        return z3.ULT(a, b)

    def ule(self, a, b):
        return z3.ULE(a, b)

    def slt(self, a, b):
        return a < b

    def sle(self, a, b):
        return a <= b

    def not_(self, c):
        return z3.Not(c)

    def ite(self, c, a, b):
        return z3.If(c, a, b)


CONCRETE = Concrete()
SYMBOLIC = Symbolic()


def zero_extend(d: Domain, v: Any, bits: int) -> Any:
    """The low ``bits`` of ``v``, upper bits zero.

    >>> hex(zero_extend(CONCRETE, 0x1234_5678_9ABC, 16))
    '0x9abc'
    """
    return d.zext(v, bits)


def sign_extend(d: Domain, v: Any, bits: int) -> Any:
    """The low ``bits`` of ``v`` sign-extended to 64 bits (``movsx``, ``ldsx``).

    >>> hex(sign_extend(CONCRETE, 0x80, 8)), sign_extend(CONCRETE, 0x7F, 8)
    ('0xffffffffffffff80', 127)
    """
    return d.sext(v, bits)


def alu(d: Domain, op: int, is64: bool, dst: Any, src: Any, off: int = 0) -> Any:
    """The new ``dst`` of an ALU (``is64=False``) or ALU64 operation ``op`` (an ``isa`` constant).

    ``src`` is the second operand as a 64-bit value: the source register, or the immediate
    sign-extended to 64 bits. ``off`` selects signed division/modulo (1) or ``movsx`` (8/16/32).
    ``END`` is not handled here (see :func:`end`).

    >>> alu(CONCRETE, isa.SUB, False, 0, 1), hex(alu(CONCRETE, isa.ARSH, False, 0x8000_0000, 4))
    (4294967295, '0xf8000000')
    >>> alu(CONCRETE, isa.MOD, True, 10, 0), alu(CONCRETE, isa.MOD, True, -7 & MASK64, 3, off=1) - MASK64
    (10, 0)
    """
    bits = 64 if is64 else 32

    def u(v: Any) -> Any:
        return d.zext(v, bits)

    def s(v: Any) -> Any:
        return d.sext(v, bits)

    a, b = u(dst), u(src)
    zero = d.const(0)
    if op == isa.ADD:
        r = d.add(a, b)
    elif op == isa.SUB:
        r = d.sub(a, b)
    elif op == isa.MUL:
        r = d.mul(a, b)
    elif op == isa.DIV:
        if off == 1:
            r = d.ite(d.eq(b, zero), zero, d.sdiv(s(dst), s(src)))
        else:
            r = d.ite(d.eq(b, zero), zero, d.udiv(a, b))
    elif op == isa.MOD:
        if off == 1:
            r = d.ite(d.eq(b, zero), a, d.srem(s(dst), s(src)))
        else:
            r = d.ite(d.eq(b, zero), a, d.urem(a, b))
    elif op == isa.OR:
        r = d.or_(a, b)
    elif op == isa.AND:
        r = d.and_(a, b)
    elif op == isa.XOR:
        r = d.xor(a, b)
    elif op == isa.LSH:
        r = d.shl(a, d.and_(b, d.const(bits - 1)))
    elif op == isa.RSH:
        r = d.lshr(a, d.and_(b, d.const(bits - 1)))
    elif op == isa.ARSH:
        r = d.ashr(s(dst), d.and_(b, d.const(bits - 1)))
    elif op == isa.NEG:
        r = d.neg(a)
    elif op == isa.MOV:
        if off in (8, 16, 32):
            r = d.sext(src, off)
        elif off:
            raise ValueError(f"mov with offset {off}: movsx takes 8, 16 or 32")
        else:
            r = src
    else:
        raise ValueError(f"not an ALU operation: 0x{op:02x}")
    return u(r)


def condition(d: Domain, op: int, is64: bool, a: Any, b: Any) -> Any:
    """Whether a JMP (``is64=True``) or JMP32 conditional jump ``op`` is taken for ``a op b``.

    >>> condition(CONCRETE, isa.JSLT, False, 0xFFFF_FFFF, 0), condition(CONCRETE, isa.JSLT, True, 0xFFFF_FFFF, 0)
    (True, False)
    >>> condition(CONCRETE, isa.JSET, True, 6, 1)
    False
    """
    bits = 64 if is64 else 32
    if op in (isa.JSGT, isa.JSGE, isa.JSLT, isa.JSLE):
        a, b = d.sext(a, bits), d.sext(b, bits)
    else:
        a, b = d.zext(a, bits), d.zext(b, bits)
    if op == isa.JEQ:
        return d.eq(a, b)
    if op == isa.JNE:
        return d.not_(d.eq(a, b))
    if op == isa.JSET:
        return d.not_(d.eq(d.and_(a, b), d.const(0)))
    if op == isa.JGT:
        return d.ult(b, a)
    if op == isa.JGE:
        return d.ule(b, a)
    if op == isa.JLT:
        return d.ult(a, b)
    if op == isa.JLE:
        return d.ule(a, b)
    if op == isa.JSGT:
        return d.slt(b, a)
    if op == isa.JSGE:
        return d.sle(b, a)
    if op == isa.JSLT:
        return d.slt(a, b)
    if op == isa.JSLE:
        return d.sle(a, b)
    raise ValueError(f"not a conditional jump: 0x{op:02x}")


def split(d: Domain, v: Any, n: int) -> list[Any]:
    """The ``n`` low bytes of ``v``, least significant first (a little-endian store).

    >>> split(CONCRETE, 0x0102_0304, 4)
    [4, 3, 2, 1]
    """
    return [d.byte(v, i) for i in range(n)]


def compose(d: Domain, bs: list[Any], signed: bool = False) -> Any:
    """The 64-bit value of little-endian bytes ``bs`` (a load), sign-extended if ``signed``.

    >>> hex(compose(CONCRETE, [4, 3, 2, 1])), hex(compose(CONCRETE, [0xFE, 0xFF], signed=True))
    ('0x1020304', '0xfffffffffffffffe')
    """
    v = d.from_bytes(list(bs))
    return d.sext(v, 8 * len(bs)) if signed else v


def bswap(d: Domain, v: Any, width: int) -> Any:
    """The low ``width`` bits of ``v`` with their bytes reversed, upper bits zero.

    >>> hex(bswap(CONCRETE, 0x1122_3344, 16))
    '0x4433'
    """
    n = width // 8
    return d.from_bytes([d.byte(v, n - 1 - i) for i in range(n)])


def end(d: Domain, v: Any, width: int, *, swap: bool) -> Any:
    """A byte-order conversion (``END``) of ``width`` bits on a little-endian machine.

    ``le16/32/64`` (ALU, source K) only truncates; ``be16/32/64`` (ALU, source X) and the ISA v4
    ``bswap16/32/64`` (ALU64) reverse the bytes. Pass ``swap`` accordingly (see :func:`end_swaps`).

    >>> hex(end(CONCRETE, 0x1122_3344_5566_7788, 32, swap=False)), hex(end(CONCRETE, 0x1122, 16, swap=True))
    ('0x55667788', '0x2211')
    """
    if width not in (16, 32, 64):
        raise ValueError(f"byte swap width {width}: must be 16, 32 or 64")
    return bswap(d, v, width) if swap else d.zext(v, width)


def end_swaps(ins: isa.Instruction) -> bool:
    """Whether an ``END`` instruction reverses bytes (to big-endian, or ALU64 ``bswap``).

    >>> end_swaps(isa.insn(0xDC, imm=16)), end_swaps(isa.insn(0xD4, imm=16)), end_swaps(isa.insn(0xD7, imm=16))
    (True, False, True)
    """
    return ins.cls == isa.ALU64 or ins.source == isa.X


def atomic(d: Domain, op: int, width: int, old: Any, src: Any, r0: Any = None) -> tuple[Any, Any]:
    """``(new memory value, value returned)`` of an atomic operation ``op`` (an ``isa`` ATOMIC imm).

    For the FETCH forms and XCHG the returned value goes to ``src``; for CMPXCHG it goes to ``r0``,
    and memory changes only when it equals ``r0``. The returned value is zero-extended from
    ``width`` bytes; non-fetch forms return ``None``.

    >>> atomic(CONCRETE, isa.ADD | isa.FETCH, 8, 5, 2), atomic(CONCRETE, isa.CMPXCHG, 4, 5, 9, r0=4)
    ((7, 5), (5, 5))
    """
    bits = 8 * width
    old = d.zext(old, bits)
    base = op & ~isa.FETCH
    if op == isa.XCHG:
        new = src
    elif op == isa.CMPXCHG:
        new = d.ite(d.eq(old, d.zext(r0, bits)), src, old)
    elif base == isa.ADD:
        new = d.add(old, src)
    elif base == isa.OR:
        new = d.or_(old, src)
    elif base == isa.AND:
        new = d.and_(old, src)
    elif base == isa.XOR:
        new = d.xor(old, src)
    else:
        raise ValueError(f"unknown atomic operation imm=0x{op:x}")
    new = d.zext(new, bits)
    return new, (old if op & isa.FETCH else None)
