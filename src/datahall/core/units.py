"""Bytes, bandwidth and time: parsing and formatting.

datahall keeps one internal unit per quantity: bytes, bytes per second, seconds. Parsers take
the strings engineers write ("25GB/s", "200Gb/s", "1.5ms", "8GiB") and return exact
`Fraction`s, so that capacities enter exact algorithms (ForestColl's cut ratios) without float
rounding.

>>> parse_bandwidth("200Gb/s") == parse_bandwidth("25GB/s")
True
>>> format_bandwidth(parse_bandwidth("25GB/s"))
'25 GB/s'
>>> format_time(parse_time("1.5ms"))
'1.5 ms'
>>> format_bytes(parse_bytes("8GiB"))
'8 GiB'
"""

from __future__ import annotations

import re
from fractions import Fraction

__all__ = [
    "UnitError",
    "exact",
    "parse_bytes",
    "parse_bandwidth",
    "parse_time",
    "parse_budget",
    "format_bytes",
    "format_bandwidth",
    "format_time",
    "GB",
]

GB = 10**9

_DECIMAL = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "p": 10**15}
_BINARY = {"ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40, "pi": 2**50}
_TIME = {
    "ns": Fraction(1, 10**9),
    "us": Fraction(1, 10**6),
    "µs": Fraction(1, 10**6),
    "ms": Fraction(1, 10**3),
    "s": Fraction(1),
    "min": Fraction(60),
    "h": Fraction(3600),
}
_NUMBER = r"(?P<num>[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*"


class UnitError(ValueError):
    """A quantity string that could not be parsed; the message says what is accepted."""


def exact(value: float | int | str | Fraction) -> Fraction:
    """Return `value` as an exact Fraction, reading floats by their shortest decimal form.

    ``Fraction(0.1)`` is 3602879701896397/36028797018963968; ``exact(0.1)`` is 1/10, the number
    a user meant when they wrote 0.1 in a topology file.

    >>> exact(0.1), exact("2.5"), exact(3)
    (Fraction(1, 10), Fraction(5, 2), Fraction(3, 1))
    """
    if isinstance(value, Fraction):
        return value
    if isinstance(value, float):
        return Fraction(repr(value))
    return Fraction(value)


def _split(text: str, what: str, example: str) -> tuple[Fraction, str]:
    m = re.fullmatch(_NUMBER + r"(?P<unit>.*)", text.strip())
    if not m:
        raise UnitError(f"cannot read {what} {text!r}: write a number and a unit, e.g. {example!r}")
    return Fraction(m["num"]), m["unit"].strip()


def _prefix(unit: str) -> tuple[int, str]:
    """Split a unit into its SI or IEC prefix multiplier and the rest ("GiB" -> 2**30, "B")."""
    for p, scale in (*_BINARY.items(), *_DECIMAL.items()):
        if p and len(unit) > len(p) and unit[: len(p)].lower() == p:
            return scale, unit[len(p) :]
    return 1, unit


def parse_bytes(text: str | int | float) -> Fraction:
    """Parse a size such as ``"1KiB"``, ``"1.5 GB"``, ``"4096"`` (bytes) into bytes.

    >>> parse_bytes("1KiB"), parse_bytes("2kB"), parse_bytes(64)
    (Fraction(1024, 1), Fraction(2000, 1), Fraction(64, 1))
    """
    if not isinstance(text, str):
        return exact(text)
    num, unit = _split(text, "size", "8GiB")
    scale, rest = _prefix(unit)
    if rest not in ("B", "b", ""):
        raise UnitError(f"cannot read size {text!r}: use B, KB, KiB, MB, MiB, GB, GiB, TB, TiB")
    return num * scale / (8 if rest == "b" else 1)


def parse_bandwidth(text: str | int | float) -> Fraction:
    """Parse a bandwidth into bytes per second: ``"25GB/s"``, ``"200Gb/s"``, ``"400 Gbps"``.

    A lower-case ``b`` means bits, an upper-case ``B`` bytes, as in datasheets.

    >>> parse_bandwidth("200Gbps") / GB, parse_bandwidth("300 GB/s") / GB
    (Fraction(25, 1), Fraction(300, 1))
    """
    if not isinstance(text, str):
        return exact(text)
    num, unit = _split(text, "bandwidth", "25GB/s")
    unit = unit.replace("ps", "/s")
    if not unit.endswith("/s"):
        raise UnitError(
            f"cannot read bandwidth {text!r}: end with /s or ps, e.g. '25GB/s', '200Gbps'"
        )
    scale, rest = _prefix(unit[:-2])
    if rest not in ("B", "b"):
        raise UnitError(f"cannot read bandwidth {text!r}: say B (bytes) or b (bits), e.g. '25GB/s'")
    return num * scale / (8 if rest == "b" else 1)


def parse_time(text: str | int | float) -> Fraction:
    """Parse a duration into seconds: ``"1.5ms"``, ``"2us"``, ``"30s"``.

    >>> parse_time("1.5ms"), parse_time("250ns")
    (Fraction(3, 2000), Fraction(1, 4000000))
    """
    if not isinstance(text, str):
        return exact(text)
    num, unit = _split(text, "time", "1.5ms")
    if unit not in _TIME:
        raise UnitError(f"cannot read time {text!r}: use one of {', '.join(_TIME)}")
    return num * _TIME[unit]


def parse_budget(text: str, option: str = "--budget") -> float:
    """A positive wall-clock budget in seconds from ``"60s"``, ``"2min"`` or bare seconds.

    >>> parse_budget("2min"), parse_budget("7.5")
    (120.0, 7.5)
    """
    bare = text.replace(".", "", 1).isdigit()
    try:
        seconds = float(parse_time(f"{text}s" if bare else text))
    except UnitError:
        raise UnitError(
            f"bad {option} {text!r}: write seconds with a unit, e.g. 60s or 2min"
        ) from None
    if seconds <= 0:
        raise UnitError(f"{option} must be positive, not {text!r}")
    return seconds


def _fmt(value: float, units: list[tuple[float, str]], digits: int) -> str:
    mag = abs(value)
    for scale, name in units:
        if mag >= scale:
            return f"{value / scale:.{digits}g} {name}"
    scale, name = units[-1]
    return f"{value / scale:.{digits}g} {name}"


def format_bytes(n: float | Fraction, digits: int = 4) -> str:
    """Format a byte count with binary prefixes: ``format_bytes(1536) == '1.5 KiB'``."""
    return _fmt(
        float(n),
        [(2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB"), (1, "B")],
        digits,
    )


def format_bandwidth(bps: float | Fraction, digits: int = 4) -> str:
    """Format bytes per second with decimal prefixes: ``format_bandwidth(25e9) == '25 GB/s'``."""
    return _fmt(
        float(bps),
        [(1e12, "TB/s"), (1e9, "GB/s"), (1e6, "MB/s"), (1e3, "kB/s"), (1, "B/s")],
        digits,
    )


def format_time(seconds: float | Fraction, digits: int = 4) -> str:
    """Format seconds: ``format_time(0.0015) == '1.5 ms'``."""
    return _fmt(
        float(seconds),
        [(1, "s"), (1e-3, "ms"), (1e-6, "us"), (1e-9, "ns")],
        digits,
    )
