"""ORCA load reports (brief ai-gateway.md §2.1, invariants §2.6.1, oracle §3)."""

from __future__ import annotations

import base64
import contextlib
import json
import string
import struct

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from datahall.gateway.orca import (
    ENDPOINT_LOAD_METRICS,
    ENDPOINT_LOAD_METRICS_BIN,
    OrcaError,
    OrcaLoadReport,
    decode_report,
    encode_report,
    orca_headers,
    parse_orca,
)

H = ENDPOINT_LOAD_METRICS

# A report with every field set (as in Envoy's parser tests).
FULL = OrcaLoadReport(
    cpu_utilization=0.7,
    mem_utilization=0.9,
    rps=12,
    request_cost={"db_queries": 3.0},
    utilization={"total": 0.5},
    rps_fractional=1000.0,
    eps=2.0,
    named_metrics={"foo": 123.0, "bar": 0.2},
    application_utilization=0.8,
)


def header(value: str) -> dict[str, str]:
    return {H: value}


# --- oracles and known header strings ---------------------------------------------------------


def test_brief_text_vector_parses_to_its_five_values():
    report = parse_orca(
        header(
            "TEXT cpu_utilization=0.3, mem_utilization=0.8, rps_fractional=10.0, eps=1, "
            "named_metrics.custom_metric_util=0.4"
        )
    )
    assert report == OrcaLoadReport(
        cpu_utilization=0.3,
        mem_utilization=0.8,
        rps_fractional=10.0,
        eps=1.0,
        named_metrics={"custom_metric_util": 0.4},
    )


def test_vllm_text_header_parses():
    report = parse_orca(
        header("TEXT named_metrics.kv_cache_usage_perc=0.4, named_metrics.num_requests_waiting=3.0")
    )
    assert report == OrcaLoadReport(
        named_metrics={"kv_cache_usage_perc": 0.4, "num_requests_waiting": 3.0}
    )
    assert report.cpu_utilization == 0.0 and report.rps == 0


def test_vllm_json_header_parses():
    report = parse_orca(
        header('JSON {"named_metrics": {"kv_cache_usage_perc": 0.4, "num_requests_waiting": 3.0}}')
    )
    assert report == OrcaLoadReport(
        named_metrics={"kv_cache_usage_perc": 0.4, "num_requests_waiting": 3.0}
    )


def test_vllm_style_output_round_trips_exactly():
    report = OrcaLoadReport(named_metrics={"kv_cache_usage_perc": 0.4, "num_requests_waiting": 3.0})
    assert orca_headers(report, "TEXT") == {
        H: "TEXT named_metrics.kv_cache_usage_perc=0.4, named_metrics.num_requests_waiting=3.0"
    }
    assert orca_headers(report, "JSON") == {
        H: 'JSON {"named_metrics": {"kv_cache_usage_perc": 0.4, "num_requests_waiting": 3.0}}'
    }


@pytest.mark.parametrize("delimiter", ["=", ":"])
def test_text_with_every_text_field(delimiter):
    pairs = [
        "cpu_utilization{}0.7",
        "application_utilization{}0.8",
        "mem_utilization{}0.9",
        "rps_fractional{}1000",
        "eps{}2",
        "named_metrics.foo{}123",
        "named_metrics.bar{}0.2",
    ]
    report = parse_orca(header("TEXT " + ",".join(p.format(delimiter) for p in pairs)))
    assert report == OrcaLoadReport(
        cpu_utilization=0.7,
        mem_utilization=0.9,
        rps_fractional=1000.0,
        eps=2.0,
        named_metrics={"foo": 123.0, "bar": 0.2},
        application_utilization=0.8,
    )


def test_colon_is_tolerated_and_output_uses_equals():
    report = parse_orca(header("TEXT cpu_utilization:0.5, named_metrics.queue:2"))
    assert report == OrcaLoadReport(cpu_utilization=0.5, named_metrics={"queue": 2.0})
    assert orca_headers(report, "TEXT") == {H: "TEXT cpu_utilization=0.5, named_metrics.queue=2.0"}


def test_metric_name_may_contain_a_colon_when_equals_delimits():
    report = parse_orca(header("TEXT named_metrics.gpu:0=0.25, eps:1"))
    assert report == OrcaLoadReport(eps=1.0, named_metrics={"gpu:0": 0.25})
    assert parse_orca(orca_headers(report, "TEXT")) == report


def test_text_accepts_utilization_map_as_envoy_main_does():
    report = parse_orca(header("TEXT utilization.total=0.5, cpu_utilization=0.1"))
    assert report == OrcaLoadReport(cpu_utilization=0.1, utilization={"total": 0.5})


def test_text_numbers_in_exponent_form():
    report = parse_orca(header("TEXT cpu_utilization=5e-1, eps=1E+2, rps_fractional=.5"))
    assert report == OrcaLoadReport(cpu_utilization=0.5, eps=100.0, rps_fractional=0.5)


def test_grpc_go_unpadded_binary_header():
    # A grpc-go backend's endpoint-load-metrics-bin value, base64 without padding
    # (cpu_utilization 0.5, rps_fractional 100, eps 2, named_metrics rif=4).
    value = "CQAAAAAAAOA/MQAAAAAAAFlAOQAAAAAAAABAQg4KA3JpZhEAAAAAAAAQQA"
    expected = OrcaLoadReport(
        cpu_utilization=0.5, rps_fractional=100.0, eps=2.0, named_metrics={"rif": 4.0}
    )
    assert parse_orca({ENDPOINT_LOAD_METRICS_BIN: value}) == expected
    assert parse_orca({ENDPOINT_LOAD_METRICS_BIN: value + "=="}) == expected
    assert parse_orca(header("BIN " + value)) == expected


def test_full_report_in_bin_is_about_150_base64_characters():
    # Brief §3: "about 150 base64 characters" for a full report.
    value = orca_headers(FULL, "BIN")[H]
    assert value.startswith("BIN ")
    assert 100 <= len(value) - 4 <= 200
    assert parse_orca({H: value}) == FULL


# --- headers: lookup, precedence -------------------------------------------------------------


def test_missing_header_is_none():
    assert parse_orca({}) is None
    assert parse_orca({"content-type": "text/event-stream"}) is None
    assert parse_orca(httpx.Headers({"x-other": "1"})) is None


def test_header_names_are_case_insensitive():
    expected = OrcaLoadReport(cpu_utilization=0.25)
    assert parse_orca({"ENDPOINT-LOAD-METRICS": "TEXT cpu_utilization=0.25"}) == expected
    assert parse_orca(httpx.Headers({"Endpoint-Load-Metrics": "TEXT cpu_utilization=0.25"})) == (
        expected
    )
    bin_value = base64.b64encode(encode_report(expected)).decode()
    assert parse_orca({"Endpoint-Load-Metrics-Bin": bin_value}) == expected


def test_bin_header_wins_over_the_prefixed_header():
    legacy = base64.b64encode(encode_report(OrcaLoadReport(eps=7.0))).decode()
    both = {H: "TEXT eps=1", ENDPOINT_LOAD_METRICS_BIN: legacy}
    assert parse_orca(both) == OrcaLoadReport(eps=7.0)
    # ...even when the other header is malformed, because it is never read,
    assert parse_orca({H: "garbage", ENDPOINT_LOAD_METRICS_BIN: legacy}) == OrcaLoadReport(eps=7.0)
    # ...and a malformed -bin header is an error even next to a good one.
    with pytest.raises(OrcaError, match="endpoint-load-metrics-bin"):
        parse_orca({H: "TEXT eps=1", ENDPOINT_LOAD_METRICS_BIN: "!!"})


def test_same_header_twice_in_different_case_is_an_error():
    with pytest.raises(OrcaError, match="appears 2 times"):
        parse_orca({H: "TEXT eps=1", "Endpoint-Load-Metrics": "TEXT eps=2"})


# --- every rejection case ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("BAD random-value", "unsupported ORCA header format: BAD "),
        ("BADBAD random-value", "unsupported ORCA header format: BADBA "),
        ("", "unsupported ORCA header format:  "),
        ("text cpu_utilization=1", "unsupported ORCA header format: text "),
        ("TEXTcpu_utilization=1", "unsupported ORCA header format: TEXTc "),
        ("PROTO CgA=", "unsupported ORCA header format: PROTO "),
        ("TEXT", "TEXT prefix but no report"),
        ("JSON", "JSON prefix but no report"),
        ("BIN", "BIN prefix but no report"),
    ],
)
def test_unknown_or_empty_format_is_rejected(value, message):
    with pytest.raises(OrcaError) as info:
        parse_orca(header(value))
    assert message in str(info.value) + " "


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("=0.3", "empty key"),
        ("cpu_utilization=0.3, =1", "empty key"),
        ("cpu_utilization=0.3,,eps=1", "empty key"),
        ("cpu_utilization=0.3,", "empty key"),
        ("cpu_utilization=", "empty value"),
        ("cpu_utilization:", "empty value"),
        ("not-a-list-of-key-value-pairs", "empty value"),
        ("cpu_utilization=abc", "non-numeric"),
        ('cpu_utilization="0.7"', "non-numeric"),
        ("cpu_utilization=0x10", "non-numeric"),
        ("cpu_utilization=1_000", "non-numeric"),
        ("cpu_utilization=\u0663", "non-numeric"),  # an Arabic-Indic digit three
        ("cpu_utilization=0.5 0.6", "non-numeric"),
        ("cpu_utilization=nan", "NaN"),
        ("cpu_utilization=NaN", "NaN"),
        ("eps=-nan", "NaN"),
        ("cpu_utilization=inf", "infinite"),
        ("cpu_utilization=-inf", "infinite"),
        ("cpu_utilization=Infinity", "infinite"),
        ("cpu_utilization=1e999", "infinite"),
        ("cpu_utilization=-1", "negative"),
        ("named_metrics.x=-0.5", "negative"),
        ("cpu_utilization=0.7,cpu_utilization=0.8", "twice"),
        ("cpu_utilization=0.7, cpu_utilization:0.8", "twice"),
        ("named_metrics.d=1,named_metrics.d=0.2", "twice"),
        ("unsupported_metric=0.8", "unknown TEXT key"),
        ("rps=3", "unknown TEXT key"),
        ("request_cost.q=3", "unknown TEXT key"),
        ("named_metrics=3", "unknown TEXT key"),
        ("CPU_UTILIZATION=0.3", "unknown TEXT key"),
        ("named_metrics.=123", "empty metric name"),
        ("utilization.=0.9", "empty metric name"),
    ],
)
def test_text_rejections(body, message):
    with pytest.raises(OrcaError, match=message):
        parse_orca(header("TEXT " + body))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("not-a-valid-json-string", "invalid ORCA JSON"),
        ('{"cpu_utilization": 0.7', "invalid ORCA JSON"),
        ('{"cpu_utilization": 0.7, "unknown_field": 2}', "unknown field 'unknown_field'"),
        ('{"CpuUtilization": 0.7}', "unknown field"),
        ('{"cpu_utilization": true}', "must be a number"),
        ('{"cpu_utilization": [0.7]}', "must be a number"),
        ('{"cpu_utilization": "high"}', "not a number"),
        ('{"cpu_utilization": NaN}', "invalid ORCA JSON"),
        ('{"cpu_utilization": Infinity}', "invalid ORCA JSON"),
        ('{"cpu_utilization": "NaN"}', "not finite"),
        ('{"eps": "-Infinity"}', "not finite"),
        ('{"eps": 1e999}', "not finite"),
        ('{"eps": 1, "eps": 2}', "duplicate key"),
        ('{"named_metrics": {"a": 1, "a": 2}}', "duplicate key"),
        ('{"cpu_utilization": 0.1, "cpuUtilization": 0.2}', "twice"),
        ("[0.7]", "must be an object"),
        ('{"named_metrics": [1, 2]}', "must be an object"),
        ('{"named_metrics": {"a": null}}', "must be a number"),
        ('{"named_metrics": {"a": "x"}}', "not a number"),
        ('{"rps": -1}', "rps must be an integer"),
        ('{"rps": 1.5}', "rps must be an integer"),
        ('{"rps": "1e3"}', "rps must be an integer"),
        ('{"rps": 18446744073709551616}', "rps must be an integer"),
        ('{"rps": true}', "rps must be an integer"),
        ('{"rps": "\u0663"}', "rps must be an integer"),
        ('{"eps": "\u0663"}', "not a number"),
    ],
)
def test_json_rejections(body, message):
    with pytest.raises(OrcaError, match=message):
        parse_orca(header("JSON " + body))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("BIN !!!!", "not base64"),
        ("BIN CQAAAAAAAOA/M", "not base64"),  # 4n+1 characters can never be base64
        ("BIN CQAAAA", "truncated"),  # cpu_utilization cut after 4 of 8 bytes
    ],
)
def test_bin_rejections(value, message):
    with pytest.raises(OrcaError, match=message):
        parse_orca(header(value))


def test_empty_legacy_bin_header_is_rejected():
    with pytest.raises(OrcaError, match="empty"):
        parse_orca({ENDPOINT_LOAD_METRICS_BIN: ""})


# --- JSON: proto3 mapping ---------------------------------------------------------------------


def test_json_accepts_lower_camel_names_and_string_numbers():
    body = {
        "cpuUtilization": 0.3,
        "memUtilization": "0.8",
        "rps": "5",
        "requestCost": {"q": 1},
        "utilization": {"u": 0.1},
        "rpsFractional": 10,
        "eps": "1e0",
        "namedMetrics": {"kv_cache_usage_perc": 0.4},
        "applicationUtilization": 0.6,
    }
    assert parse_orca(header("JSON " + json.dumps(body))) == OrcaLoadReport(
        cpu_utilization=0.3,
        mem_utilization=0.8,
        rps=5,
        request_cost={"q": 1.0},
        utilization={"u": 0.1},
        rps_fractional=10.0,
        eps=1.0,
        named_metrics={"kv_cache_usage_perc": 0.4},
        application_utilization=0.6,
    )


def test_json_null_means_default_and_rps_may_be_a_number():
    report = parse_orca(header('JSON {"cpu_utilization": null, "named_metrics": null, "rps": 7}'))
    assert report == OrcaLoadReport(rps=7)


def test_json_output_uses_field_names_and_rps_as_a_string():
    value = orca_headers(FULL, "json")[H]
    data = json.loads(value.removeprefix("JSON "))
    assert list(data) == [
        "cpu_utilization",
        "mem_utilization",
        "rps",
        "request_cost",
        "utilization",
        "rps_fractional",
        "eps",
        "named_metrics",
        "application_utilization",
    ]
    assert data["rps"] == "12"
    assert orca_headers(OrcaLoadReport(), "JSON") == {H: "JSON {}"}


# --- writing: what TEXT cannot carry ----------------------------------------------------------


@pytest.mark.parametrize(
    ("report", "message"),
    [
        (OrcaLoadReport(rps=3), "cannot carry rps"),
        (OrcaLoadReport(request_cost={"q": 1.0}), "cannot carry request_cost"),
        (OrcaLoadReport(utilization={"u": 0.5}), "cannot carry utilization"),
        (OrcaLoadReport(eps=-1.0), "negative"),
        (OrcaLoadReport(named_metrics={"a,b": 1.0}), "metric name"),
        (OrcaLoadReport(named_metrics={"a=b": 1.0}), "metric name"),
        (OrcaLoadReport(named_metrics={" a": 1.0}), "metric name"),
        (OrcaLoadReport(named_metrics={"": 1.0}), "metric name"),
        (OrcaLoadReport(named_metrics={"naïve": 1.0}), "metric name"),
    ],
)
def test_text_output_refuses_what_it_cannot_carry(report, message):
    with pytest.raises(OrcaError, match=message):
        orca_headers(report, "TEXT")
    # JSON and BIN carry all of these.
    for fmt in ("JSON", "BIN"):
        assert parse_orca(orca_headers(report, fmt)) == report


@pytest.mark.parametrize("fmt", ["TEXT", "JSON", "BIN"])
@pytest.mark.parametrize(
    "report",
    [
        OrcaLoadReport(cpu_utilization=float("nan")),
        OrcaLoadReport(eps=float("inf")),
        OrcaLoadReport(named_metrics={"a": float("-inf")}),
    ],
)
def test_non_finite_values_are_never_written(report, fmt):
    with pytest.raises(OrcaError, match="not finite"):
        orca_headers(report, fmt)


def test_unknown_output_format():
    with pytest.raises(OrcaError, match="unknown ORCA format 'XML'"):
        orca_headers(OrcaLoadReport(), "XML")


@pytest.mark.parametrize("fmt", ["TEXT", "JSON", "BIN", "text", "json", "bin"])
def test_empty_report_round_trips_with_a_non_empty_header(fmt):
    value = orca_headers(OrcaLoadReport(), fmt)[H]
    assert value.split(" ", 1)[1]  # Envoy rejects an empty body
    assert parse_orca({H: value}) == OrcaLoadReport()


# --- round trips (invariant §2.6.1) -----------------------------------------------------------

finite = st.floats(allow_nan=False, allow_infinity=False)
non_negative = st.floats(min_value=0.0, allow_nan=False, allow_infinity=False)
metric_maps = st.dictionaries(st.text(max_size=12), finite, max_size=4)
full_reports = st.builds(
    OrcaLoadReport,
    cpu_utilization=finite,
    mem_utilization=finite,
    rps=st.integers(0, 2**64 - 1),
    request_cost=metric_maps,
    utilization=metric_maps,
    rps_fractional=finite,
    eps=finite,
    named_metrics=metric_maps,
    application_utilization=finite,
)
text_names = st.from_regex(
    r"[A-Za-z0-9_.:/-]([A-Za-z0-9_.:/ -]{0,10}[A-Za-z0-9_.:/-])?", fullmatch=True
)
text_reports = st.builds(
    OrcaLoadReport,
    cpu_utilization=non_negative,
    mem_utilization=non_negative,
    rps_fractional=non_negative,
    eps=non_negative,
    named_metrics=st.dictionaries(text_names, non_negative, max_size=4),
    application_utilization=non_negative,
)


def assert_header_safe(headers: dict[str, str]) -> None:
    for value in headers.values():
        assert value.isascii() and value.isprintable() and value == value.strip()


@given(text_reports)
def test_text_round_trip(report):
    headers = orca_headers(report, "TEXT")
    assert_header_safe(headers)
    assert parse_orca(headers) == report


@given(full_reports)
def test_json_round_trip(report):
    headers = orca_headers(report, "JSON")
    assert_header_safe(headers)
    assert parse_orca(headers) == report


@given(full_reports)
def test_bin_round_trip(report):
    headers = orca_headers(report, "BIN")
    assert_header_safe(headers)
    assert parse_orca(headers) == report
    legacy = base64.b64encode(encode_report(report)).decode()
    if legacy:
        assert parse_orca({ENDPOINT_LOAD_METRICS_BIN: legacy}) == report


@given(text_reports)
def test_the_three_formats_agree(report):
    assert (
        parse_orca(orca_headers(report, "TEXT"))
        == parse_orca(orca_headers(report, "JSON"))
        == parse_orca(orca_headers(report, "BIN"))
        == report
    )


# --- protobuf wire format ---------------------------------------------------------------------


def varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def key(number: int, wire: int) -> bytes:
    return varint(number << 3 | wire)


def double(number: int, value: float) -> bytes:
    return key(number, 1) + struct.pack("<d", value)


def entry(number: int, name: bytes, value: float, extra: bytes = b"") -> bytes:
    body = key(1, 2) + varint(len(name)) + name + extra + key(2, 1) + struct.pack("<d", value)
    return key(number, 2) + varint(len(body)) + body


def test_encoding_is_the_documented_wire_format():
    data = encode_report(
        OrcaLoadReport(cpu_utilization=0.5, rps=300, named_metrics={"a": 1.0}, eps=2.0)
    )
    assert data == double(1, 0.5) + key(3, 0) + varint(300) + double(7, 2.0) + entry(8, b"a", 1.0)


def test_decoder_skips_unknown_fields_of_every_wire_type():
    unknown = (
        key(100, 0) + varint(2**63)  # varint
        + key(101, 1) + bytes(8)  # fixed64
        + key(102, 2) + varint(3) + b"xyz"  # length-delimited
        + key(103, 3) + key(1, 0) + varint(5) + key(2, 3) + key(2, 4) + key(103, 4)  # nested group
        + key(104, 5) + bytes(4)  # fixed32
        + key(2**29 - 1, 0) + varint(1)  # the largest field number
    )  # fmt: skip
    data = double(1, 0.25) + unknown + entry(8, b"kv", 0.4, extra=unknown) + double(7, 3.0)
    assert decode_report(data) == OrcaLoadReport(
        cpu_utilization=0.25, eps=3.0, named_metrics={"kv": 0.4}
    )


def test_decoder_skips_known_numbers_with_another_wire_type():
    data = key(1, 0) + varint(7) + key(3, 1) + bytes(8) + key(8, 5) + bytes(4) + double(2, 0.5)
    assert decode_report(data) == OrcaLoadReport(mem_utilization=0.5)


def test_decoder_last_scalar_wins_and_map_entries_merge():
    data = (
        double(1, 0.1)
        + double(1, 0.2)
        + entry(8, b"a", 1.0)
        + entry(8, b"b", 2.0)
        + entry(8, b"a", 3.0)
        + key(3, 0) + varint(2**64 + 5)  # a varint wider than 64 bits is truncated to 64
    )  # fmt: skip
    assert decode_report(data) == OrcaLoadReport(
        cpu_utilization=0.2, rps=5, named_metrics={"a": 3.0, "b": 2.0}
    )


def test_decoder_map_entry_defaults():
    no_value = key(1, 2) + varint(1) + b"k"
    no_key = key(2, 1) + struct.pack("<d", 0.5)
    data = key(5, 2) + varint(len(no_value)) + no_value + key(4, 2) + varint(len(no_key)) + no_key
    assert decode_report(data) == OrcaLoadReport(utilization={"k": 0.0}, request_cost={"": 0.5})
    assert decode_report(b"") == OrcaLoadReport()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (double(1, 0.5)[:5], "truncated"),  # fixed64 cut short
        (key(3, 0) + b"\xff\xff", "truncated"),  # varint without its last byte
        (b"\x80", "truncated"),  # a key cut short
        (entry(8, b"name", 1.0)[:-3], "truncated"),  # map entry longer than what is left
        (key(8, 2) + varint(4) + key(1, 2) + varint(9) + b"ab", "truncated"),  # key past entry
        (key(100, 2) + varint(10) + b"abc", "truncated"),  # unknown bytes field cut short
        (key(100, 5) + b"\x00\x00", "truncated"),  # fixed32 cut short
        (key(100, 3) + key(1, 0) + varint(1), "no end tag"),  # group never closed
        (key(100, 3) + key(101, 4), "closed by end tag 101"),
        (key(100, 4), "end-group tag 100 without a start"),
        (key(100, 6) + b"\x00", "invalid wire type 6"),
        (key(100, 7) + b"\x00", "invalid wire type 7"),
        (key(0, 0) + b"\x00", "field number 0"),
        (b"\xff" * 11, "longer than 10 bytes"),
        (double(1, float("nan")), "not finite"),
        (entry(8, b"x", float("inf")), "not finite"),
        (entry(8, b"\xff\xfe", 1.0), "not UTF-8"),
    ],
)
def test_decoder_rejects_truncated_or_malformed_input(data, message):
    with pytest.raises(OrcaError, match=message):
        decode_report(data)


@given(full_reports, st.data())
def test_every_cut_inside_a_field_is_rejected(report, data):
    encoded = encode_report(report)
    # Field boundaries: the lengths of the encodings of each field's prefix.
    boundaries = {0, len(encoded)}
    partial = OrcaLoadReport()
    for name in (
        "cpu_utilization",
        "mem_utilization",
        "rps",
        "request_cost",
        "utilization",
        "rps_fractional",
        "eps",
        "named_metrics",
        "application_utilization",
    ):
        value = getattr(report, name)
        if isinstance(value, dict):
            target = getattr(partial, name)
            for k, v in value.items():
                target[k] = v
                boundaries.add(len(encode_report(partial)))
        else:
            setattr(partial, name, value)
            boundaries.add(len(encode_report(partial)))
    cut = data.draw(st.integers(0, len(encoded)))
    if cut in boundaries:
        decode_report(encoded[:cut])
    else:
        with pytest.raises(OrcaError):
            decode_report(encoded[:cut])


@given(st.binary(max_size=64))
def test_decoder_raises_only_orca_error_on_arbitrary_bytes(data):
    with contextlib.suppress(OrcaError):
        decode_report(data)


# --- cross-check against the reference protobuf classes (PyPI xds-protos) ---------------------

FIELDS = [
    "cpu_utilization",
    "mem_utilization",
    "rps",
    "request_cost",
    "utilization",
    "rps_fractional",
    "eps",
    "named_metrics",
    "application_utilization",
]


@pytest.fixture(scope="module")
def pb2():
    return pytest.importorskip("xds.data.orca.v3.orca_load_report_pb2")


def to_message(pb2, report: OrcaLoadReport):
    message = pb2.OrcaLoadReport()
    for name in FIELDS:
        value = getattr(report, name)
        if isinstance(value, dict):
            getattr(message, name).update(value)
        else:
            setattr(message, name, value)
    return message


def from_message(message) -> OrcaLoadReport:
    values = {name: getattr(message, name) for name in FIELDS}
    for name in ("request_cost", "utilization", "named_metrics"):
        values[name] = dict(values[name])
    return OrcaLoadReport(**values)


def test_xds_protos_field_numbers_match(pb2):
    descriptor = pb2.OrcaLoadReport.DESCRIPTOR
    assert [(f.number, f.name) for f in descriptor.fields] == list(enumerate(FIELDS, start=1))


def test_same_bytes_as_xds_protos_for_a_full_report(pb2):
    ordered = OrcaLoadReport(
        **{
            name: dict(sorted(value.items())) if isinstance(value, dict) else value
            for name in FIELDS
            for value in [getattr(FULL, name)]
        }
    )
    reference = to_message(pb2, ordered).SerializeToString(deterministic=True)
    assert encode_report(ordered) == reference
    assert len(base64.b64encode(reference)) == len(orca_headers(FULL, "BIN")[H]) - 4


@given(full_reports)
def test_bin_agrees_with_xds_protos(pb2, report):
    message = pb2.OrcaLoadReport()
    message.ParseFromString(encode_report(report))
    assert from_message(message) == report
    assert decode_report(to_message(pb2, report).SerializeToString()) == report


@given(full_reports)
def test_json_agrees_with_xds_protos(pb2, report):
    json_format = pytest.importorskip("google.protobuf.json_format")
    # Our JSON (field names) parses with protobuf's proto3 JSON parser...
    message = json_format.Parse(
        orca_headers(report, "JSON")[H].removeprefix("JSON "), pb2.OrcaLoadReport()
    )
    assert from_message(message) == report
    # ...and protobuf's JSON (lowerCamelCase, rps as a string) parses with ours.
    body = json_format.MessageToJson(to_message(pb2, report), indent=None)
    assert parse_orca({H: "JSON " + body}) == report


def test_text_characters_allowed_in_names():
    # Every printable ASCII character but ',' and '=' survives TEXT inside a metric name.
    name = "".join(c for c in string.printable[:95] if c not in ",=").strip()
    report = OrcaLoadReport(named_metrics={name: 1.0})
    assert parse_orca(orca_headers(report, "TEXT")) == report
