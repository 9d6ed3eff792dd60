from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from datahall.core.units import (
    GB,
    UnitError,
    exact,
    format_bandwidth,
    format_bytes,
    format_time,
    parse_bandwidth,
    parse_bytes,
    parse_time,
)


@pytest.mark.parametrize(
    ("text", "bytes_per_s"),
    [
        ("25GB/s", 25 * GB),
        ("200Gb/s", 25 * GB),
        ("400 Gbps", 50 * GB),
        ("1.6Tb/s", 200 * GB),
        ("300 GB/s", 300 * GB),
        ("100MB/s", 10**8),
        ("8b/s", 1),
    ],
)
def test_parse_bandwidth(text, bytes_per_s):
    assert parse_bandwidth(text) == bytes_per_s


@pytest.mark.parametrize(
    ("text", "n"),
    [
        ("1KiB", 1024),
        ("2kB", 2000),
        ("8GiB", 8 * 2**30),
        ("1.5 GB", 1_500_000_000),
        ("4096", 4096),
        ("8Gb", 10**9),
    ],
)
def test_parse_bytes(text, n):
    assert parse_bytes(text) == n


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1.5ms", Fraction(3, 2000)),
        ("250ns", Fraction(1, 4_000_000)),
        ("2us", Fraction(1, 500_000)),
        ("30s", 30),
        ("2min", 120),
    ],
)
def test_parse_time(text, seconds):
    assert parse_time(text) == seconds


@pytest.mark.parametrize(
    ("parser", "text", "hint"),
    [
        (parse_bandwidth, "fast", "number and a unit"),
        (parse_bandwidth, "25GB", "/s"),
        (parse_bandwidth, "25XB/s", "bytes"),
        (parse_bytes, "3 apples", "KiB"),
        (parse_time, "3 fortnights", "ms"),
    ],
)
def test_bad_units_say_what_is_accepted(parser, text, hint):
    with pytest.raises(UnitError, match=hint):
        parser(text)


def test_formatting():
    assert format_bandwidth(25 * GB) == "25 GB/s"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_time(0.0015) == "1.5 ms"
    assert format_time(2e-6) == "2 us"


def test_exact_reads_floats_as_written():
    assert exact(0.1) == Fraction(1, 10)
    assert exact(1 / 3) == Fraction("0.3333333333333333")


@given(st.integers(min_value=0, max_value=10**15))
def test_bandwidth_bits_are_an_eighth_of_bytes(n):
    assert parse_bandwidth(f"{n}Gb/s") * 8 == parse_bandwidth(f"{n}GB/s")
