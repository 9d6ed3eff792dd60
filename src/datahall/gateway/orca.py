"""ORCA load reports: the `OrcaLoadReport` message and its HTTP carriage.

A model server that speaks ORCA (Open Request Cost Aggregation) attaches its load to each
response; the gateway reads it and weighs the endpoint (`datahall.gateway.wrr`). The message is
``xds.data.orca.v3.OrcaLoadReport`` of cncf/xds (``xds/data/orca/v3/orca_load_report.proto``),
and the HTTP carriage follows Envoy's canonical parser (``source/common/orca/orca_parser.cc``);
brief ``ai-gateway.md`` §2.1:

- ``endpoint-load-metrics-bin: <base64 of the serialized proto>`` (the legacy gRPC trailer; it
  wins when both headers are present);
- ``endpoint-load-metrics: TEXT k=v, k=v`` with keys ``cpu_utilization``, ``mem_utilization``,
  ``application_utilization``, ``rps_fractional``, ``eps`` and ``named_metrics.<name>``;
- ``endpoint-load-metrics: JSON {...}`` (proto3 JSON mapping);
- ``endpoint-load-metrics: BIN <base64>``.

vLLM (PR #24905) sends its KV-cache usage and queue length as named metrics:

>>> report = parse_orca({"endpoint-load-metrics": "TEXT named_metrics.kv_cache_usage_perc=0.4, "
...                      "named_metrics.num_requests_waiting=3.0"})
>>> report
OrcaLoadReport(named_metrics={'kv_cache_usage_perc': 0.4, 'num_requests_waiting': 3.0})
>>> orca_headers(report, "JSON")
{'endpoint-load-metrics': 'JSON {"named_metrics": {"kv_cache_usage_perc": 0.4, "num_requests_waiting": 3.0}}'}

Be lenient on input and strict on output (brief §7.5): ``:`` is accepted as the TEXT delimiter
(Envoy's first parser used it) but ``=`` is always emitted; JSON accepts both the proto field names
and their lowerCamelCase JSON names but emits the field names, as vLLM does.

The protobuf wire format of this one message is encoded and decoded here (`encode_report`,
`decode_report`), so the gateway needs no protobuf runtime.

One rule is datahall's own: every report that `parse_orca` returns holds finite numbers, in all
three formats. A NaN or infinite load cannot weigh an endpoint, so the whole report is rejected
rather than half-applied (Envoy rejects them in TEXT only).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = [
    "ENDPOINT_LOAD_METRICS",
    "ENDPOINT_LOAD_METRICS_BIN",
    "ENDPOINT_LOAD_METRICS_FORMAT",
    "OrcaError",
    "OrcaLoadReport",
    "decode_report",
    "encode_report",
    "orca_headers",
    "parse_orca",
]

ENDPOINT_LOAD_METRICS = "endpoint-load-metrics"
"""Response header carrying a report behind a ``TEXT ``, ``JSON `` or ``BIN `` prefix."""
ENDPOINT_LOAD_METRICS_BIN = "endpoint-load-metrics-bin"
"""Legacy response header (gRPC's per-call trailer): base64 of the serialized proto, no prefix."""
ENDPOINT_LOAD_METRICS_FORMAT = "endpoint-load-metrics-format"
"""Request header (a model-server convention, not Envoy's) asking for a report: ``text|json``."""

_UINT64_MAX = 2**64 - 1


class OrcaError(ValueError):
    """An ORCA load report that cannot be read or written; the message says which part and why.

    The gateway treats it as "no report from this response": a bad header never breaks routing.
    """


@dataclass(slots=True, repr=False)
class OrcaLoadReport:
    """``xds.data.orca.v3.OrcaLoadReport``, field for field (numbers 1..9 of the cncf/xds proto).

    proto3 has no field presence, so 0 means "not reported"; maps are plain dicts. The repr shows
    only the fields that are set:

    >>> OrcaLoadReport(cpu_utilization=0.3, rps_fractional=10.0)
    OrcaLoadReport(cpu_utilization=0.3, rps_fractional=10.0)
    """

    cpu_utilization: float = 0.0
    """1: CPU utilization, >= 0, may exceed 1.0 (e.g. a container over its request)."""
    mem_utilization: float = 0.0
    """2: memory utilization in [0, 1]."""
    rps: int = 0
    """3: requests per second as uint64; deprecated in favour of `rps_fractional`."""
    request_cost: dict[str, float] = field(default_factory=dict)
    """4: absolute cost of this one request by name (per-call reports only)."""
    utilization: dict[str, float] = field(default_factory=dict)
    """5: named utilizations, each in [0, 1]."""
    rps_fractional: float = 0.0
    """6: requests per second, >= 0 (the qps of gRFC A58)."""
    eps: float = 0.0
    """7: errors per second, >= 0."""
    named_metrics: dict[str, float] = field(default_factory=dict)
    """8: opaque application metrics (vLLM: ``kv_cache_usage_perc``, ``num_requests_waiting``)."""
    application_utilization: float = 0.0
    """9: application-defined utilization, >= 0, may exceed 1.0; preferred by A58/Envoy WRR."""

    def __repr__(self) -> str:
        set_fields = [
            f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if getattr(self, f.name)
        ]
        return f"OrcaLoadReport({', '.join(set_fields)})"


# Field numbers and kinds, in proto order. The kinds decide the wire type: doubles are fixed64
# (wire type 1), rps is a varint (0), maps are repeated length-delimited entries (2).
_DOUBLES = {
    1: "cpu_utilization",
    2: "mem_utilization",
    6: "rps_fractional",
    7: "eps",
    9: "application_utilization",
}
_MAPS = {4: "request_cost", 5: "utilization", 8: "named_metrics"}
_RPS = 3
_FIELD_ORDER = [(n, _DOUBLES.get(n) or _MAPS.get(n) or "rps") for n in range(1, 10)]

# TEXT carries the scalar doubles and named metrics only (brief §2.1). Envoy's main branch also
# reads ``utilization.<name>``, so we accept it on input; we never emit it, because parsers that
# follow the design doc reject it as an unknown key.
_TEXT_SCALARS = {
    "cpu_utilization",
    "mem_utilization",
    "application_utilization",
    "rps_fractional",
    "eps",
}
_TEXT_MAP_PREFIXES = {"named_metrics.": "named_metrics", "utilization.": "utilization"}

# ASCII digits only: float() would also read "٣" or "1_000", which no ORCA producer writes.
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_NON_FINITE = re.compile(r"[+-]?(?:nan|inf|infinity)", re.IGNORECASE)
# A metric name TEXT can carry: printable ASCII without the pair and list delimiters, and no
# whitespace at either end (HTTP trims it, so it would not survive the trip).
_TEXT_NAME = re.compile(r"[!-~](?:[ -~]*[!-~])?")


# --- reading headers ----------------------------------------------------------------------


def parse_orca(headers: Mapping[str, str]) -> OrcaLoadReport | None:
    """Read the ORCA load report of one HTTP response, or None when it carries none.

    `headers` is any mapping of header names to values (``httpx.Headers``, Starlette's
    ``Headers``, a dict); names match case-insensitively. ``endpoint-load-metrics-bin`` wins over
    ``endpoint-load-metrics`` when both are present, as in Envoy. Raises `OrcaError` on anything
    brief §2.1 rejects: an unknown prefix (``unsupported ORCA header format: <prefix>``), a TEXT
    pair with an empty key or value, a non-numeric, NaN, infinite or negative value, a duplicate
    or unknown key, an empty metric name; JSON that is not valid proto3 JSON for the message
    (unknown fields included); BIN that is not base64 of a well-formed message.

    >>> parse_orca({"Endpoint-Load-Metrics": "TEXT cpu_utilization:0.3, eps=1"})
    OrcaLoadReport(cpu_utilization=0.3, eps=1.0)
    >>> parse_orca({"content-type": "application/json"}) is None
    True
    >>> parse_orca({"endpoint-load-metrics": "XML <load/>"})
    Traceback (most recent call last):
    ...
    datahall.gateway.orca.OrcaError: unsupported ORCA header format: XML (expected a TEXT, JSON or BIN prefix)
    """
    legacy = _header(headers, ENDPOINT_LOAD_METRICS_BIN)
    if legacy is not None:
        return _parse_bin(legacy.strip(), ENDPOINT_LOAD_METRICS_BIN)
    value = _header(headers, ENDPOINT_LOAD_METRICS)
    if value is None:
        return None
    value = value.strip()
    for prefix, parse in (("TEXT", _parse_text), ("JSON", _parse_json), ("BIN", _parse_bin)):
        if value == prefix:
            raise OrcaError(f"{ENDPOINT_LOAD_METRICS} has the {prefix} prefix but no report")
        if value.startswith(prefix + " "):
            return parse(value[len(prefix) + 1 :].strip(), ENDPOINT_LOAD_METRICS)
    # Envoy names at most the first five characters, up to the first space.
    shown = value[:5].split(" ", 1)[0]
    raise OrcaError(
        f"unsupported ORCA header format: {shown} (expected a TEXT, JSON or BIN prefix)"
    )


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """The one value of header `name` in any mapping, matching names case-insensitively."""
    values = [value for key, value in headers.items() if key.lower() == name]
    if len(values) > 1:
        raise OrcaError(f"{name} appears {len(values)} times; a response carries one report")
    return values[0] if values else None


def _parse_text(body: str, header: str) -> OrcaLoadReport:
    report = OrcaLoadReport()
    seen: set[str] = set()
    for pair in body.split(","):
        # `=` is the delimiter of the design doc, vLLM and Triton (envoy#37724); Envoy's first
        # parser used `:`, so a pair without `=` is split at its first `:`.
        delimiter = "=" if "=" in pair else ":"
        key, _, raw = pair.partition(delimiter)
        key, raw = key.strip(), raw.strip()
        if not key:
            raise OrcaError(f"{header}: TEXT pair {pair.strip()!r} has an empty key")
        if not raw:
            raise OrcaError(
                f"{header}: TEXT metric {key!r} has an empty value; write {key}=<number>"
            )
        if key in seen:
            raise OrcaError(f"{header}: TEXT report names {key!r} twice")
        seen.add(key)
        value = _text_number(key, raw, header)
        if key in _TEXT_SCALARS:
            setattr(report, key, value)
            continue
        for prefix, map_name in _TEXT_MAP_PREFIXES.items():
            if key.startswith(prefix):
                name = key[len(prefix) :]
                if not name:
                    raise OrcaError(f"{header}: TEXT key {key!r} has an empty metric name")
                getattr(report, map_name)[name] = value
                break
        else:
            raise OrcaError(
                f"{header}: unknown TEXT key {key!r}; TEXT carries "
                f"{', '.join(sorted(_TEXT_SCALARS))}, named_metrics.<name> and "
                "utilization.<name> (other fields need the JSON or BIN format)"
            )
    return report


def _text_number(key: str, raw: str, header: str) -> float:
    if _NON_FINITE.fullmatch(raw):
        what = "NaN" if "nan" in raw.lower() else "infinite"
        raise OrcaError(f"{header}: TEXT metric {key!r} is {what} ({raw})")
    if not _NUMBER.fullmatch(raw):
        raise OrcaError(f"{header}: TEXT metric {key!r} has a non-numeric value {raw!r}")
    value = float(raw)
    if math.isinf(value):
        raise OrcaError(f"{header}: TEXT metric {key!r} is infinite ({raw} overflows a double)")
    # Envoy's parser rejects negative TEXT values: loads and utilizations are >= 0.
    if value < 0:
        raise OrcaError(f"{header}: TEXT metric {key!r} is negative ({raw})")
    return value


def _parse_json(body: str, header: str) -> OrcaLoadReport:
    try:
        data = json.loads(body, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise OrcaError(f"{header}: invalid ORCA JSON: {exc}") from None
    if not isinstance(data, dict):
        raise OrcaError(f"{header}: ORCA JSON must be an object, got {type(data).__name__}")
    report = OrcaLoadReport()
    seen: dict[str, str] = {}
    for key, value in data.items():
        name = _JSON_NAMES.get(key)
        if name is None:
            raise OrcaError(f"{header}: unknown field {key!r} in ORCA JSON")
        if name in seen:
            raise OrcaError(f"{header}: ORCA JSON sets {name} twice ({seen[name]!r}, {key!r})")
        seen[name] = key
        if value is None:  # proto3 JSON: null means the default value
            continue
        if name == "rps":
            report.rps = _json_uint64(value, header)
        elif name in _MAPS.values():
            if not isinstance(value, dict):
                raise OrcaError(f"{header}: ORCA JSON field {key!r} must be an object")
            target = getattr(report, name)
            for metric, number in value.items():
                target[metric] = _json_double(number, f"{key}.{metric}", header)
        else:
            setattr(report, name, _json_double(value, key, header))
    return report


def _lower_camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


# proto3 JSON parsers accept both the field name and its lowerCamelCase json_name.
_JSON_NAMES = {
    spelling: name for _, name in _FIELD_ORDER for spelling in (name, _lower_camel(name))
}


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _json_double(value: Any, where: str, header: str) -> float:
    # proto3 JSON takes a number or a string holding one ("NaN"/"Infinity" included).
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise OrcaError(f"{header}: ORCA JSON {where} must be a number, got {value!r}")
    if isinstance(value, str):
        if _NON_FINITE.fullmatch(value):  # "NaN", "Infinity", "-Infinity"
            raise OrcaError(f"{header}: ORCA JSON {where} is not finite ({value})")
        if not _NUMBER.fullmatch(value):
            raise OrcaError(f"{header}: ORCA JSON {where} is not a number: {value!r}")
    try:
        number = float(value)
    except OverflowError:
        raise OrcaError(f"{header}: ORCA JSON {where} does not fit a double") from None
    if not math.isfinite(number):
        raise OrcaError(f"{header}: ORCA JSON {where} is not finite ({value})")
    return number


def _json_uint64(value: Any, header: str) -> int:
    # proto3 JSON writes 64-bit integers as decimal strings and accepts numbers too.
    integral = (
        (isinstance(value, int) and not isinstance(value, bool))
        or (isinstance(value, float) and value.is_integer())
        or (isinstance(value, str) and re.fullmatch(r"[0-9]+", value) is not None)
    )
    number = int(value) if integral else None
    if number is None or not 0 <= number <= _UINT64_MAX:
        raise OrcaError(f"{header}: ORCA JSON rps must be an integer in [0, 2^64), got {value!r}")
    return number


def _parse_bin(body: str, header: str) -> OrcaLoadReport:
    if not body:
        raise OrcaError(f"{header}: the binary ORCA report is empty")
    # grpc-go sends unpadded base64; restore the padding before decoding.
    padded = body + "=" * (-len(body) % 4)
    try:
        data = base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        raise OrcaError(f"{header}: the binary ORCA report is not base64: {body[:40]!r}") from None
    try:
        return decode_report(data)
    except OrcaError as exc:
        raise OrcaError(f"{header}: {exc}") from None


# --- writing headers ----------------------------------------------------------------------


def orca_headers(report: OrcaLoadReport, fmt: str) -> dict[str, str]:
    """The response header that carries `report` in format `fmt` (``TEXT``, ``JSON`` or ``BIN``).

    `fmt` is case-insensitive, so a server can pass the client's ``endpoint-load-metrics-format``
    request header straight through. TEXT always uses ``=`` and lists only set fields; it cannot
    carry ``rps``, ``request_cost`` or ``utilization`` (brief §2.1), nor negative values or metric
    names with ``,`` or ``=``, and raises `OrcaError` for them: send JSON or BIN instead. JSON uses
    the proto field names, as vLLM does (proto3 JSON allows them in place of lowerCamelCase).

    >>> report = OrcaLoadReport(cpu_utilization=0.3, eps=1.0, named_metrics={"queue": 2.0})
    >>> orca_headers(report, "text")
    {'endpoint-load-metrics': 'TEXT cpu_utilization=0.3, eps=1.0, named_metrics.queue=2.0'}
    >>> orca_headers(report, "BIN")
    {'endpoint-load-metrics': 'BIN CTMzMzMzM9M/OQAAAAAAAPA/QhAKBXF1ZXVlEQAAAAAAAABA'}
    >>> parse_orca(orca_headers(report, "json")) == report
    True
    """
    kind = fmt.strip().upper()
    _check_finite(report)
    if kind == "TEXT":
        return {ENDPOINT_LOAD_METRICS: "TEXT " + _format_text(report)}
    if kind == "JSON":
        return {ENDPOINT_LOAD_METRICS: "JSON " + _format_json(report)}
    if kind == "BIN":
        data = encode_report(report)
        if not data:
            # An empty body is rejected by Envoy; an explicit cpu_utilization of 0.0 decodes to
            # the same empty report in every parser.
            data = b"\x09" + bytes(8)
        return {ENDPOINT_LOAD_METRICS: "BIN " + base64.b64encode(data).decode("ascii")}
    raise OrcaError(f"unknown ORCA format {fmt!r}; use TEXT, JSON or BIN")


def _check_finite(report: OrcaLoadReport) -> None:
    for name in _DOUBLES.values():
        if not math.isfinite(getattr(report, name)):
            raise OrcaError(f"ORCA report field {name} is not finite: {getattr(report, name)}")
    for name in _MAPS.values():
        for key, value in getattr(report, name).items():
            if not math.isfinite(value):
                raise OrcaError(f"ORCA report metric {name}[{key!r}] is not finite: {value}")


def _format_text(report: OrcaLoadReport) -> str:
    for name in ("rps", "request_cost", "utilization"):
        if getattr(report, name):
            raise OrcaError(f"the TEXT format cannot carry {name}; send the report as JSON or BIN")
    pairs: list[tuple[str, float]] = []
    for _, name in _FIELD_ORDER:
        if name in _TEXT_SCALARS and getattr(report, name):
            pairs.append((name, getattr(report, name)))
        elif name == "named_metrics":
            for metric, value in report.named_metrics.items():
                if not _TEXT_NAME.fullmatch(metric) or "," in metric or "=" in metric:
                    raise OrcaError(
                        f"the TEXT format cannot carry the metric name {metric!r} (it needs "
                        "printable ASCII without ',' or '=' and no edge spaces); use JSON or BIN"
                    )
                pairs.append((f"named_metrics.{metric}", value))
    if not pairs:
        # An empty TEXT body is rejected as an empty key; state one zero instead.
        pairs.append(("cpu_utilization", 0.0))
    for key, value in pairs:
        if value < 0:
            raise OrcaError(f"the TEXT format cannot carry the negative {key}={value}; use JSON")
    # repr() is the shortest decimal string that reads back as the same double.
    return ", ".join(f"{key}={float(value)!r}" for key, value in pairs)


def _format_json(report: OrcaLoadReport) -> str:
    data: dict[str, Any] = {}
    for _, name in _FIELD_ORDER:
        value = getattr(report, name)
        if not value:
            continue  # proto3 JSON omits default values
        if name == "rps":
            data[name] = str(_uint64(value))
        elif name in _MAPS.values():
            data[name] = {str(k): float(v) for k, v in value.items()}
        else:
            data[name] = float(value)
    return json.dumps(data)


# --- protobuf wire format -----------------------------------------------------------------


def encode_report(report: OrcaLoadReport) -> bytes:
    """Serialize `report` in the protobuf wire format of ``xds.data.orca.v3.OrcaLoadReport``.

    Fields go out in number order; doubles as fixed64 (wire type 1), rps as a varint, each map
    entry as an embedded message {1: key string, 2: value double}. Zero scalars are omitted, as
    proto3 does.

    >>> encode_report(OrcaLoadReport(cpu_utilization=0.5, rps=3)).hex()
    '09000000000000e03f1803'
    >>> decode_report(encode_report(OrcaLoadReport(named_metrics={"a": 1.0})))
    OrcaLoadReport(named_metrics={'a': 1.0})
    """
    _check_finite(report)
    out = bytearray()
    for number, name in _FIELD_ORDER:
        value = getattr(report, name)
        if number in _DOUBLES:
            packed = struct.pack("<d", value)
            if packed != bytes(8):  # proto3 skips zero (but keeps -0.0, whose bits are not 0)
                out += _varint(number << 3 | 1) + packed
        elif number == _RPS:
            if value:
                out += _varint(number << 3 | 0) + _varint(_uint64(value))
        else:
            for key, metric in value.items():
                try:
                    key_bytes = key.encode("utf-8")
                except (AttributeError, UnicodeEncodeError):
                    raise OrcaError(f"{name} key {key!r} is not a UTF-8 string") from None
                entry = b"\x0a" + _varint(len(key_bytes)) + key_bytes
                entry += b"\x11" + struct.pack("<d", metric)
                out += _varint(number << 3 | 2) + _varint(len(entry)) + entry
    return bytes(out)


def _uint64(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _UINT64_MAX:
        raise OrcaError(f"ORCA report field rps must be an integer in [0, 2^64), got {value!r}")
    return value


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def decode_report(data: bytes) -> OrcaLoadReport:
    """Parse the protobuf wire format of ``xds.data.orca.v3.OrcaLoadReport``.

    Unknown fields of every wire type (varint, fixed64, length-delimited, groups, fixed32) are
    skipped, and so are known field numbers that arrive with another wire type, as protobuf
    parsers do; the last value of a repeated scalar wins; a later map entry replaces an earlier
    one with the same key. Truncated or malformed input raises `OrcaError`.

    >>> decode_report(bytes.fromhex("09000000000000e03f" "a00601"))  # field 100 is unknown
    OrcaLoadReport(cpu_utilization=0.5)
    >>> decode_report(bytes.fromhex("09000000"))
    Traceback (most recent call last):
    ...
    datahall.gateway.orca.OrcaError: truncated ORCA report: a fixed64 field needs 8 bytes at offset 1, 3 left
    """
    report = OrcaLoadReport()
    pos, end = 0, len(data)
    while pos < end:
        number, wire, pos = _read_key(data, pos)
        if number in _DOUBLES and wire == 1:
            value, pos = _read_double(data, pos)
            setattr(report, _DOUBLES[number], _finite(value, _DOUBLES[number]))
        elif number == _RPS and wire == 0:
            value_int, pos = _read_varint(data, pos)
            report.rps = value_int & _UINT64_MAX  # protobuf truncates wider varints to 64 bits
        elif number in _MAPS and wire == 2:
            length, pos = _read_varint(data, pos)
            _need(data, pos, length, "a map entry")
            key, value = _decode_entry(data[pos : pos + length], _MAPS[number])
            getattr(report, _MAPS[number])[key] = value
            pos += length
        else:
            pos = _skip(data, pos, number, wire, depth=0)
    return report


def _decode_entry(data: bytes, map_name: str) -> tuple[str, float]:
    key, value = "", 0.0  # missing key or value means the default, as in any map entry
    pos = 0
    while pos < len(data):
        number, wire, pos = _read_key(data, pos)
        if number == 1 and wire == 2:
            length, pos = _read_varint(data, pos)
            _need(data, pos, length, "a map key")
            try:
                key = data[pos : pos + length].decode("utf-8")
            except UnicodeDecodeError:
                raise OrcaError(f"ORCA report {map_name} has a key that is not UTF-8") from None
            pos += length
        elif number == 2 and wire == 1:
            value, pos = _read_double(data, pos)
        else:
            pos = _skip(data, pos, number, wire, depth=0)
    return key, _finite(value, f"{map_name}[{key!r}]")


def _finite(value: float, where: str) -> float:
    if not math.isfinite(value):
        raise OrcaError(f"ORCA report {where} is not finite ({value})")
    return value


def _need(data: bytes, pos: int, count: int, what: str) -> None:
    if pos + count > len(data):
        raise OrcaError(
            f"truncated ORCA report: {what} needs {count} bytes at offset {pos}, "
            f"{len(data) - pos} left"
        )


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    for i in range(10):  # a varint has at most 10 bytes (64 bits, 7 per byte)
        if pos + i >= len(data):
            raise OrcaError(f"truncated ORCA report: a varint at offset {pos} has no last byte")
        byte = data[pos + i]
        result |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return result, pos + i + 1
    raise OrcaError(f"malformed ORCA report: the varint at offset {pos} is longer than 10 bytes")


def _read_key(data: bytes, pos: int) -> tuple[int, int, int]:
    start = pos
    key, pos = _read_varint(data, pos)
    number, wire = key >> 3, key & 7
    if not 1 <= number <= 2**29 - 1:
        raise OrcaError(f"malformed ORCA report: field number {number} at offset {start}")
    return number, wire, pos


def _read_double(data: bytes, pos: int) -> tuple[float, int]:
    _need(data, pos, 8, "a fixed64 field")
    return struct.unpack_from("<d", data, pos)[0], pos + 8


def _skip(data: bytes, pos: int, number: int, wire: int, depth: int) -> int:
    """Skip the value of unknown field `number` (wire type `wire`) starting at `pos`."""
    if wire == 0:
        return _read_varint(data, pos)[1]
    if wire == 1:
        _need(data, pos, 8, "a fixed64 field")
        return pos + 8
    if wire == 2:
        length, pos = _read_varint(data, pos)
        _need(data, pos, length, "a length-delimited field")
        return pos + length
    if wire == 5:
        _need(data, pos, 4, "a fixed32 field")
        return pos + 4
    if wire == 3:  # a (deprecated) group runs to the end-group tag with the same number
        if depth >= 64:
            raise OrcaError("malformed ORCA report: groups nested more than 64 deep")
        while True:
            if pos >= len(data):
                raise OrcaError(f"truncated ORCA report: group {number} has no end tag")
            inner, inner_wire, pos = _read_key(data, pos)
            if inner_wire == 4:
                if inner != number:
                    raise OrcaError(
                        f"malformed ORCA report: group {number} closed by end tag {inner}"
                    )
                return pos
            pos = _skip(data, pos, inner, inner_wire, depth + 1)
    if wire == 4:
        raise OrcaError(f"malformed ORCA report: end-group tag {number} without a start")
    raise OrcaError(f"malformed ORCA report: field {number} has invalid wire type {wire}")
