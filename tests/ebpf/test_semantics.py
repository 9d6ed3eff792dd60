"""One semantics, two domains: the Concrete and Symbolic domains must agree on every operation."""

from __future__ import annotations

import pytest
import z3
from hypothesis import given, settings
from hypothesis import strategies as st

from datahall.ebpf import isa
from datahall.ebpf.semantics import (
    CONCRETE,
    MASK64,
    SYMBOLIC,
    alu,
    atomic,
    compose,
    condition,
    end,
    sign_extend,
    split,
)

C, S = CONCRETE, SYMBOLIC
ALU_CASES = [(op, 0) for op in isa.ALU_OPS if op != isa.END]
ALU_CASES += [(isa.DIV, 1), (isa.MOD, 1), (isa.MOV, 8), (isa.MOV, 16), (isa.MOV, 32)]
EDGE = [0, 1, 2, 31, 32, 63, 64, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF, 1 << 32, 1 << 63, MASK64]
u64 = st.one_of(st.sampled_from(EDGE), st.integers(0, MASK64))


def sym(v: int) -> z3.BitVecRef:
    return z3.BitVecVal(v, 64)


def value(t) -> int:
    return z3.simplify(t).as_long()


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(ALU_CASES), st.booleans(), u64, u64)
def test_alu_symbolic_equals_concrete(case, is64, a, b):
    op, off = case
    if op == isa.MOV and off == 32 and not is64:
        off = 16
    want = alu(C, op, is64, a, b, off)
    assert 0 <= want <= MASK64
    assert value(alu(S, op, is64, sym(a), sym(b), off)) == want
    if not is64:
        assert want >> 32 == 0


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(isa.CONDITIONS), st.booleans(), u64, u64)
def test_condition_symbolic_equals_concrete(op, is64, a, b):
    want = condition(C, op, is64, a, b)
    assert isinstance(want, bool)
    assert z3.is_true(z3.simplify(condition(S, op, is64, sym(a), sym(b)))) == want


@settings(max_examples=100, deadline=None)
@given(
    u64, st.sampled_from([16, 32, 64]), st.booleans(), st.sampled_from([1, 2, 4, 8]), st.booleans()
)
def test_bytes_and_swaps_symbolic_equals_concrete(v, width, swap, n, signed):
    assert value(end(S, sym(v), width, swap=swap)) == end(C, v, width, swap=swap)
    bs = split(C, v, n)
    assert [value(b) for b in split(S, sym(v), n)] == bs
    assert value(compose(S, bs, signed)) == compose(C, bs, signed)
    assert compose(C, bs) == v & ((1 << (8 * n)) - 1)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(list(isa.ATOMIC_OPS)), st.sampled_from([4, 8]), u64, u64, u64)
def test_atomic_symbolic_equals_concrete(op, width, old, src, r0):
    new, ret = atomic(C, op, width, old, src, r0)
    snew, sret = atomic(S, op, width, sym(old), sym(src), sym(r0))
    assert value(snew) == new
    assert (sret is None) == (ret is None)
    if ret is not None:
        assert value(sret) == ret


def s64(v: int) -> int:
    return v & MASK64


@pytest.mark.parametrize(
    ("op", "is64", "a", "b", "off", "want"),
    [
        (isa.DIV, True, 7, 0, 0, 0),  # division by zero gives 0
        (isa.DIV, False, 0xFFFF_FFFF_0000_0007, 0, 0, 0),
        (
            isa.MOD,
            True,
            0xFFFF_FFFF_0000_0007,
            0,
            0,
            0xFFFF_FFFF_0000_0007,
        ),  # modulo by 0: unchanged
        (isa.MOD, False, 0xFFFF_FFFF_0000_0007, 0, 0, 7),  # ... but ALU zeroes the upper half
        (isa.MOD, True, 5, 0, 1, 5),
        (isa.DIV, True, s64(-7), 2, 1, s64(-3)),  # truncates toward zero
        (isa.MOD, True, s64(-7), 2, 1, s64(-1)),  # sign of the dividend
        (isa.MOD, True, 7, s64(-2), 1, 1),
        (isa.DIV, True, 1 << 63, MASK64, 1, 1 << 63),  # INT64_MIN / -1 wraps
        (isa.MOD, True, 1 << 63, MASK64, 1, 0),
        (isa.DIV, False, 0x8000_0000, 0xFFFF_FFFF, 1, 0x8000_0000),  # INT32_MIN / -1 wraps
        (isa.DIV, False, s64(-7), 2, 1, 0xFFFF_FFFD),
        (isa.DIV, True, s64(-6), 2, 0, (s64(-6)) // 2),  # unsigned
        (isa.LSH, True, 1, 65, 0, 2),  # shift count masked to 63
        (isa.LSH, False, 1, 33, 0, 2),  # ... and to 31 for ALU
        (isa.RSH, False, 0xFFFF_FFFF_8000_0000, 31, 0, 1),
        (isa.ARSH, True, 1 << 63, 63, 0, MASK64),
        (isa.ARSH, False, 0x8000_0000, 31, 0, 0xFFFF_FFFF),
        (isa.NEG, False, 1, 0, 0, 0xFFFF_FFFF),
        (isa.NEG, True, 1, 0, 0, MASK64),
        (isa.MOV, False, 0, MASK64, 0, 0xFFFF_FFFF),
        (isa.MOV, True, 0, 0x80, 8, s64(-128)),  # movsx
        (isa.MOV, False, 0, 0x8000, 16, 0xFFFF_8000),
        (isa.MOV, True, 0, 0x8000_0000, 32, s64(-(2**31))),
        (isa.ADD, False, 0xFFFF_FFFF, 1, 0, 0),
        (isa.MUL, True, 1 << 32, 1 << 32, 0, 0),
        (isa.SUB, True, 0, 1, 0, MASK64),
    ],
)
def test_alu_corner_cases(op, is64, a, b, off, want):
    assert alu(C, op, is64, a, b, off) == want
    assert value(alu(S, op, is64, sym(a), sym(b), off)) == want


def test_jmp32_looks_at_low_half_only():
    a = 0xFFFF_FFFF_0000_0001
    assert condition(C, isa.JEQ, False, a, 1) and not condition(C, isa.JEQ, True, a, 1)
    assert condition(C, isa.JSGT, True, 1, a) and not condition(C, isa.JSGT, False, 1, a)
    assert condition(C, isa.JSET, False, 0x1_0000_0000, 0x1_0000_0000) is False


def test_sign_extend_and_symbolic_terms_stay_symbolic():
    x = z3.BitVec("x", 64)
    t = alu(S, isa.DIV, True, x, sym(0))
    assert value(t) == 0  # divide by constant zero simplifies to zero
    solver = z3.Solver()
    solver.add(condition(S, isa.JSLT, False, x, sym(0)), z3.Extract(63, 32, x) == 0)
    assert solver.check() == z3.sat
    assert solver.model()[x].as_long() >> 31 == 1
    assert sign_extend(C, 0xFF, 8) == MASK64


def test_unknown_operations_raise():
    with pytest.raises(ValueError, match="not an ALU operation"):
        alu(C, isa.END, True, 0, 0)
    with pytest.raises(ValueError, match="not a conditional jump"):
        condition(C, isa.CALL, True, 0, 0)
    with pytest.raises(ValueError, match="width 8"):
        end(C, 0, 8, swap=True)
