"""A concrete BPF interpreter over byte-addressed memory regions, for RFC 9669 programs.

:func:`run` executes decoded instructions with the :class:`~datahall.ebpf.semantics.Concrete`
domain, so it shares every arithmetic rule with the symbolic engine. Memory is a set of named
:class:`Region` s at fixed, far-apart base addresses: a 512-byte stack per call frame (``r10``
points to its end), and whatever the caller adds with :meth:`Memory.add` (a context buffer, a
packet, map values). An access that does not lie inside one region raises :class:`AccessError`.

bpf-to-bpf calls (``call`` with ``src = 1``) get their own stack frame; ``r6``-``r9`` are restored
on return. Helpers are Python callables by id. Tail calls are not modelled.

>>> from datahall.ebpf.isa import insn
>>> prog = [insn(0xB7, dst=0, imm=40), insn(0x07, dst=0, imm=2), insn(0x95)]
>>> run(prog).r0
42
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from datahall.ebpf import isa
from datahall.ebpf.isa import Instruction
from datahall.ebpf.semantics import CONCRETE as C
from datahall.ebpf.semantics import MASK64, alu, atomic, compose, condition, end, end_swaps, split

__all__ = [
    "run",
    "Result",
    "Memory",
    "Region",
    "InterpreterError",
    "AccessError",
    "UnknownHelper",
    "StepLimitExceeded",
    "InvalidProgram",
    "xdp_memory",
    "STACK_SIZE",
]

STACK_SIZE = 512
MAX_CALL_DEPTH = 8
STACK_BASE = 0x1000_0000
REGION_BASE = 0x2000_0000
REGION_STRIDE = 0x0100_0000

Helper = Callable[..., int]


class InterpreterError(Exception):
    """A run that cannot go on; ``pc`` is the slot of the failing instruction."""

    def __init__(self, message: str, pc: int | None = None):
        self.pc = pc
        super().__init__(message if pc is None else f"pc {pc}: {message}")


class AccessError(InterpreterError):
    """A load or store outside every memory region (or a store to a read-only one)."""


class UnknownHelper(InterpreterError):
    """A ``call`` to a helper id, BTF id or ``callx`` target with no Python implementation."""


class StepLimitExceeded(InterpreterError):
    """More instructions executed than ``max_steps`` (a loop that does not end, perhaps)."""


class InvalidProgram(InterpreterError):
    """A jump outside the program or into an ``lddw``, an unresolved pseudo ``lddw``, and so on."""


@dataclass
class Region:
    """``len(data)`` bytes named ``name`` at addresses ``[base, base + len(data))``."""

    name: str
    base: int
    data: bytearray
    writable: bool = True

    @property
    def end(self) -> int:
        return self.base + len(self.data)


class Memory:
    """Named regions at fixed base addresses; little-endian loads and stores of 1 to 8 bytes.

    >>> m = Memory()
    >>> pkt = m.add("packet", b"\\x01\\x02\\x03\\x04")
    >>> hex(pkt.base), m.load(pkt.base + 1, 2)
    ('0x20000000', b'\\x02\\x03')
    >>> m.load(pkt.base + 3, 2)
    Traceback (most recent call last):
    ...
    datahall.ebpf.interpreter.AccessError: load of 2 bytes at 0x20000003 is outside every region (packet+3 leaves 1 byte)
    """

    def __init__(self) -> None:
        self.regions: dict[str, Region] = {}
        self._next = REGION_BASE

    def add(
        self,
        name: str,
        data: bytes | bytearray | int,
        *,
        writable: bool = True,
        base: int | None = None,
    ) -> Region:
        """Add a region holding ``data`` (or that many zero bytes); returns it with its ``base``."""
        if name in self.regions:
            raise ValueError(f"memory region {name!r} exists already")
        buf = bytearray(data) if not isinstance(data, int) else bytearray(data)
        if base is None:
            base, self._next = self._next, self._next + max(REGION_STRIDE, len(buf) + 0x1000)
        region = Region(name, base, buf, writable)
        self.regions[name] = region
        return region

    def __getitem__(self, name: str) -> Region:
        return self.regions[name]

    def find(self, addr: int, n: int, what: str = "access") -> tuple[Region, int]:
        """The region holding ``[addr, addr + n)`` and the offset of ``addr`` in it."""
        for r in self.regions.values():
            if r.base <= addr < r.end:
                if addr + n <= r.end:
                    return r, addr - r.base
                left = r.end - addr
                raise AccessError(
                    f"{what} of {n} bytes at {addr:#x} is outside every region "
                    f"({r.name}+{addr - r.base} leaves {left} byte{'s' if left != 1 else ''})"
                )
        raise AccessError(f"{what} of {n} bytes at {addr:#x} is outside every region")

    def load(self, addr: int, n: int) -> bytes:
        r, o = self.find(addr, n, "load")
        return bytes(r.data[o : o + n])

    def store(self, addr: int, data: bytes) -> None:
        r, o = self.find(addr, len(data), "store")
        if not r.writable:
            raise AccessError(
                f"store of {len(data)} bytes at {addr:#x} into read-only region {r.name}"
            )
        r.data[o : o + len(data)] = data


def xdp_memory(
    packet: bytes, *, ingress_ifindex: int = 1, rx_queue_index: int = 0
) -> tuple[Memory, int]:
    """A memory with a ``packet`` region and an ``xdp_md`` context pointing into it; returns ``(mem, ctx)``.

    ``struct xdp_md`` is six ``u32`` fields: data, data_end, data_meta, ingress_ifindex,
    rx_queue_index, egress_ifindex. The 32-bit ``data`` fields hold the packet's addresses, as the
    kernel rewrites those loads to full pointers; keep bases below 2**32 (they are).

    >>> mem, ctx = xdp_memory(b"\\x00" * 14)
    >>> struct.unpack("<2I", mem.load(ctx, 8)) == (mem["packet"].base, mem["packet"].end)
    True
    """
    mem = Memory()
    pkt = mem.add("packet", packet)
    fields = struct.pack("<6I", pkt.base, pkt.end, pkt.base, ingress_ifindex, rx_queue_index, 0)
    ctx = mem.add("ctx", fields, writable=False)
    return mem, ctx.base


@dataclass
class Result:
    """The outcome of :func:`run`: ``r0`` at the final ``exit``, steps taken, and the trace of pcs."""

    r0: int
    steps: int
    trace: list[int] | None = None
    registers: list[int] = field(default_factory=list)
    memory: Memory | None = None


def _frame(mem: Memory, depth: int) -> Region:
    name = f"stack{depth}"
    if name in mem.regions:
        region = mem.regions[name]
        region.data[:] = bytes(STACK_SIZE)
        return region
    return mem.add(name, STACK_SIZE, base=STACK_BASE + depth * 0x10000)


def run(
    insns: Sequence[Instruction],
    *,
    memory: Memory | None = None,
    r1: int = 0,
    args: Sequence[int] = (),
    helpers: dict[int, Helper] | None = None,
    resolve_pseudo: Callable[[Instruction], int] | None = None,
    max_steps: int = 1_000_000,
    trace: bool = False,
    entry: int = 0,
) -> Result:
    """Run a program from slot ``entry`` until its outermost ``exit``; returns :class:`Result`.

    ``r1`` (and ``args`` for ``r2``...``r5``) are the arguments, e.g. the context address from
    :func:`xdp_memory`. ``helpers[id](memory, r1, r2, r3, r4, r5)`` implements ``call id`` and
    returns the new ``r0``; ``callx rN`` calls the helper whose id is in ``rN``. A ``lddw`` with a
    pseudo kind other than 0 (map references) asks ``resolve_pseudo(insn)`` for its value.

    Division follows RFC 9669 (by zero: 0, modulo by zero: unchanged), so it never raises. Errors
    raise :class:`AccessError`, :class:`UnknownHelper`, :class:`StepLimitExceeded` or
    :class:`InvalidProgram`, each naming the pc. Legacy ``ABS``/``IND`` packet loads read the
    ``packet`` region big-endian into ``r0`` and, like the kernel, end the program with ``r0 = 0``
    when out of bounds.

    >>> from datahall.ebpf.isa import insn, lddw
    >>> run([lddw(0, 1 << 40), insn(0x77, dst=0, imm=38), insn(0x95)]).r0
    4
    >>> run([insn(0x85, imm=5), insn(0x95)], helpers={5: lambda mem, *a: 1234}).r0
    1234
    """
    mem = memory if memory is not None else Memory()
    helpers = helpers or {}
    index: dict[int, int] = {}
    pc = 0
    for i, ins in enumerate(insns):
        index[pc] = i
        pc += ins.size
    n_slots = pc
    regs = [0] * 11
    regs[1] = r1 & MASK64
    for k, a in enumerate(args[:4]):
        regs[2 + k] = a & MASK64
    depth = 0
    stack = _frame(mem, depth)
    regs[10] = stack.end
    frames: list[tuple[int, list[int]]] = []
    pcs: list[int] | None = [] if trace else None
    steps = 0
    pc = entry

    def fetch(target: int, at: int) -> Instruction:
        if target not in index:
            where = (
                "past the end" if target >= n_slots or target < 0 else "into the middle of an lddw"
            )
            raise InvalidProgram(
                f"jump to slot {target} lands {where} (program has {n_slots} slots)", at
            )
        return insns[index[target]]

    def call_helper(hid: int, at: int, how: str) -> None:
        fn = helpers.get(hid)
        if fn is None:
            raise UnknownHelper(
                f"{how} {hid}: no helper with this id was given to run(helpers=...)", at
            )
        regs[0] = fn(mem, *regs[1:6]) & MASK64

    while True:
        ins = fetch(pc, pc)
        steps += 1
        if steps > max_steps:
            raise StepLimitExceeded(f"step limit of {max_steps} instructions reached", pc)
        if pcs is not None:
            pcs.append(pc)
        cls, op, nxt = ins.cls, ins.op, pc + ins.size
        if cls in (isa.ALU, isa.ALU64):
            if ins.dst == 10:
                raise InvalidProgram("r10 (frame pointer) is read-only", pc)
            if op == isa.END:
                regs[ins.dst] = end(C, regs[ins.dst], ins.imm, swap=end_swaps(ins))
            else:
                src = regs[ins.src] if ins.source == isa.X else ins.imm & MASK64
                regs[ins.dst] = alu(C, op, cls == isa.ALU64, regs[ins.dst], src, ins.off)
        elif cls in (isa.JMP, isa.JMP32):
            if op == isa.EXIT:
                if not frames:
                    return Result(regs[0], steps, pcs, regs, mem)
                nxt, saved = frames.pop()
                regs[6:10] = saved[:4]
                regs[10] = saved[4]
                depth -= 1
            elif op == isa.CALL:
                if ins.source == isa.X:
                    call_helper(regs[ins.imm], pc, "callx")
                elif ins.src == 1:
                    if depth + 1 >= MAX_CALL_DEPTH:
                        raise InvalidProgram(f"bpf-to-bpf call depth exceeds {MAX_CALL_DEPTH}", pc)
                    target = nxt + ins.imm
                    fetch(target, pc)
                    frames.append((nxt, [*regs[6:10], regs[10]]))
                    depth += 1
                    regs[10] = _frame(mem, depth).end
                    nxt = target
                elif ins.src == 2:
                    raise UnknownHelper(
                        f"call of kernel function by BTF id {ins.imm} is not supported", pc
                    )
                else:
                    call_helper(ins.imm, pc, "call of helper")
            elif op == isa.JA:
                nxt += ins.jump_offset
            else:
                b = regs[ins.src] if ins.source == isa.X else ins.imm & MASK64
                if condition(C, op, cls == isa.JMP, regs[ins.dst], b):
                    nxt += ins.off
        elif ins.opcode == isa.LDDW:
            if ins.src == 0:
                regs[ins.dst] = ins.imm64
            elif resolve_pseudo is None:
                kind = isa.PSEUDO[ins.src]
                raise InvalidProgram(
                    f"lddw of pseudo kind {kind} needs run(resolve_pseudo=...)", pc
                )
            else:
                regs[ins.dst] = resolve_pseudo(ins) & MASK64
        elif cls == isa.LD:  # legacy ABS / IND packet loads
            if "packet" not in mem.regions:
                raise InvalidProgram("legacy packet load without a 'packet' region", pc)
            pkt = mem["packet"]
            off = ins.imm + (regs[ins.src] if ins.mode == isa.IND else 0)
            if off < 0 or off + ins.width > len(pkt.data):
                return Result(0, steps, pcs, regs, mem)
            regs[0] = int.from_bytes(pkt.data[off : off + ins.width], "big")
        elif cls == isa.LDX:
            addr = (regs[ins.src] + ins.off) & MASK64
            data = _load(mem, addr, ins.width, pc)
            regs[ins.dst] = compose(C, list(data), signed=ins.mode == isa.MEMSX)
        elif cls in (isa.ST, isa.STX):
            addr = (regs[ins.dst] + ins.off) & MASK64
            if ins.mode == isa.ATOMIC:
                old = compose(C, list(_load(mem, addr, ins.width, pc)))
                new, ret = atomic(C, ins.imm, ins.width, old, regs[ins.src], regs[0])
                _store(mem, addr, bytes(split(C, new, ins.width)), pc)
                if ins.imm == isa.CMPXCHG:
                    regs[0] = ret
                elif ret is not None:
                    regs[ins.src] = ret
            else:
                value = regs[ins.src] if cls == isa.STX else ins.imm & MASK64
                _store(mem, addr, bytes(split(C, value, ins.width)), pc)
        else:  # pragma: no cover - decode() admits no other opcode
            raise InvalidProgram(f"opcode 0x{ins.opcode:02x} cannot be executed", pc)
        pc = nxt


def _load(mem: Memory, addr: int, n: int, pc: int) -> bytes:
    try:
        return mem.load(addr, n)
    except AccessError as e:
        raise AccessError(str(e), pc) from None


def _store(mem: Memory, addr: int, data: bytes, pc: int) -> None:
    try:
        mem.store(addr, data)
    except AccessError as e:
        raise AccessError(str(e), pc) from None
