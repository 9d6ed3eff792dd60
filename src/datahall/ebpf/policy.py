"""KrakenGuard policies: what an eBPF program may do, checked at load time (brief §2.2, §2.4 item 5).

A policy is a YAML or JSON file. It is a superset of the vocabulary of the KrakenGuard artifact
(NSDI '26) and imports both of the artifact's JSON formats (:func:`from_krakenguard`). Our form:

.. code-block:: yaml

   program_types: [xdp]
   helpers: {allow: [map_lookup_elem, map_update_elem, ktime_get_ns], deny: [probe_write_user]}
   maps: {counters: {read: true, write: true, delete: false}, "*": {read: true}}
   packet: {read: [[0, 53]], write: [[22, 22]], when: {eth_type: 0x0800, ip_proto: tcp}}
   ctx: {read: [data, data_end, ingress_ifindex], write: []}
   returns: [XDP_PASS, XDP_DROP]
   rules: [{if: {helper_called: map_update_elem}, then: {returns: [XDP_PASS]}}]
   flow: {deny: [[packet, "map:*"], [kernel, perf_output]]}   # our extension: taint labels
   budget: {max_paths: 10000, max_insns_per_path: 100000, time_s: 30}

A section left out constrains nothing; a section given constrains what it names (``helpers.allow``
denies every helper it does not list, ``deny`` always wins; ``maps`` denies maps it does not
name unless a ``"*"`` entry gives a default; ``packet`` windows are inclusive byte ranges and
``when`` makes them conditional on header fields). ``flow`` is our extension: KrakenGuard has no
taint tracking (brief §2.2, "not expressible").

:func:`load_policy` reads either form and reports each problem at its line, e.g.
``policy.yaml:3: helpers.deny[0]: unknown helper 'probe_writ_user' (did you mean
'probe_write_user'?)``. The decision methods of :class:`Policy` (:meth:`~Policy.helper_allowed`,
:meth:`~Policy.map_allowed`, :meth:`~Policy.packet_window`, :meth:`~Policy.return_allowed`,
:meth:`~Policy.ctx_allowed`, :meth:`~Policy.flow_denied`) are pure: the checker asks them.

>>> policy = load_policy('''
... program_types: [xdp]
... helpers: {allow: [bpf_map_lookup_elem], deny: [probe_write_user]}
... returns: [XDP_PASS, XDP_DROP]
... ''')
>>> policy.helper_allowed("map_lookup_elem"), policy.helper_allowed("trace_printk")
(True, False)
>>> policy.return_allowed(2, "xdp"), policy.return_allowed(3, "xdp")
(True, False)
>>> load_policy("helpers: {deny: [probe_writ_user]}")
Traceback (most recent call last):
...
datahall.ebpf.policy.PolicyError: policy.yaml:1: helpers.deny[0]: unknown helper 'probe_writ_user' (did you mean 'probe_write_user'?)
"""

import ipaddress
import json
import os
import re
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    model_validator,
)

from datahall.core.config import (
    DEFER_CROSS_CHECKS,
    ConfigError,
    ConfigIssue,
    compose_yaml,
    did_you_mean,
    locate,
    names_a_file,
    read_text,
    validate_at_lines,
    yaml_path,
)
from datahall.ebpf.helpers import HELPERS

__all__ = [
    "CTX_FIELDS",
    "PROGRAM_TYPES",
    "RETURN_CODES",
    "SHIPPED",
    "shipped_policies",
    "resolve_policy",
    "Budget",
    "CtxPolicy",
    "FlowPolicy",
    "HelperPolicy",
    "MapAccess",
    "PacketPolicy",
    "PacketWhen",
    "Policy",
    "PolicyError",
    "Rule",
    "from_krakenguard",
    "is_krakenguard",
    "load_policy",
]


class PolicyError(ConfigError):
    """A policy that cannot be used; one line per problem: ``policy.yaml:LINE: path: message``."""

    default_source = "policy.yaml"


# --- vocabularies --------------------------------------------------------------------------------

PROGRAM_TYPES: dict[str, str] = {
    t: t
    for t in [
        "socket_filter",
        "kprobe",
        "sched_cls",
        "sched_act",
        "tracepoint",
        "xdp",
        "perf_event",
        "cgroup_skb",
        "cgroup_sock",
        "lwt_in",
        "lwt_out",
        "lwt_xmit",
        "sock_ops",
        "sk_skb",
        "cgroup_device",
        "sk_msg",
        "raw_tracepoint",
        "cgroup_sock_addr",
        "lwt_seg6local",
        "lirc_mode2",
        "sk_reuseport",
        "flow_dissector",
        "cgroup_sysctl",
        "raw_tracepoint_writable",
        "cgroup_sockopt",
        "tracing",
        "struct_ops",
        "ext",
        "lsm",
        "sk_lookup",
        "syscall",
    ]
} | {"tc": "sched_cls", "classifier": "sched_cls", "action": "sched_act", "socket": "socket_filter"}
"""Program type names a policy accepts (the kernel's ``bpf_prog_type`` in lower case, as
:func:`datahall.ebpf.loader.program_type` gives them) → canonical name; ``tc`` means ``sched_cls``."""

_XDP_RETURNS = {"XDP_ABORTED": 0, "XDP_DROP": 1, "XDP_PASS": 2, "XDP_TX": 3, "XDP_REDIRECT": 4}
_TC_RETURNS = {
    "TC_ACT_UNSPEC": -1,
    "TC_ACT_OK": 0,
    "TC_ACT_RECLASSIFY": 1,
    "TC_ACT_SHOT": 2,
    "TC_ACT_PIPE": 3,
    "TC_ACT_STOLEN": 4,
    "TC_ACT_QUEUED": 5,
    "TC_ACT_REPEAT": 6,
    "TC_ACT_REDIRECT": 7,
}
RETURN_CODES: dict[str, int] = _XDP_RETURNS | _TC_RETURNS
"""Verdict names → values (UAPI ``linux/bpf.h``, ``linux/pkt_cls.h``). ``XDP_*`` names apply to
``xdp`` programs, ``TC_ACT_*`` names to ``sched_cls`` / ``sched_act``; integers to any type."""

_RETURN_FAMILY = {"xdp": "XDP_", "sched_cls": "TC_ACT_", "sched_act": "TC_ACT_"}

_XDP_MD = ("data", "data_end", "data_meta", "ingress_ifindex", "rx_queue_index", "egress_ifindex")
_SK_BUFF = tuple(
    [
        "len",
        "pkt_type",
        "mark",
        "queue_mapping",
        "protocol",
        "vlan_present",
        "vlan_tci",
        "vlan_proto",
        "priority",
        "ingress_ifindex",
        "ifindex",
        "tc_index",
        "cb",
        "hash",
        "tc_classid",
        "data",
        "data_end",
        "napi_id",
        "family",
        "remote_ip4",
        "local_ip4",
        "remote_ip6",
        "local_ip6",
        "remote_port",
        "local_port",
        "data_meta",
        "flow_keys",
        "tstamp",
        "wire_len",
        "gso_segs",
        "sk",
        "gso_size",
        "tstamp_type",
        "hwtstamp",
    ]
)
CTX_FIELDS: dict[str, tuple[str, ...]] = {"xdp": _XDP_MD} | {
    t: _SK_BUFF
    for t in ("socket_filter", "sched_cls", "sched_act", "cgroup_skb", "sk_skb", "lwt_in")
    + ("lwt_out", "lwt_xmit", "lwt_seg6local")
}
"""Context fields by program type: ``struct xdp_md`` for XDP, ``struct __sk_buff`` for the
socket-buffer types. ``ctx`` entries of a policy are checked against every listed type that has a
table here."""

_IP_PROTOS = {"icmp": 1, "tcp": 6, "udp": 17, "icmpv6": 58, "sctp": 132}
_FLOW_SOURCES = ("packet", "kernel", "user", "ctx", "map:*")
_FLOW_SINKS = ("map:*", "ringbuf", "perf_output", "packet", "return", "user")


@cache
def _helper_names() -> tuple[str, ...]:
    return tuple(h.name for h in HELPERS)


def _helper_name(name: str) -> str:
    bare = name.removeprefix("bpf_")
    if bare not in _helper_names():
        raise ValueError(f"unknown helper {name!r}{did_you_mean(bare, _helper_names())}")
    return bare


def _return_code(value: int | str) -> int | str:
    if isinstance(value, str):
        if re.fullmatch(r"-?\d+", value.strip()):
            return int(value)
        if value not in RETURN_CODES:
            raise ValueError(
                f"unknown return code {value!r}{did_you_mean(value, RETURN_CODES)}; "
                "use an XDP_* or TC_ACT_* name or an integer"
            )
    return value


def _window(w: tuple[int, int]) -> tuple[int, int]:
    lo, hi = w
    if lo < 0:
        raise ValueError(f"window [{lo}, {hi}] starts before byte 0")
    if lo > hi:
        raise ValueError(
            f"window [{lo}, {hi}] has lo > hi; write [lo, hi] with lo <= hi (inclusive)"
        )
    return w


def _flow_end(kind: str, value: str, choices: Sequence[str]) -> str:
    if value in choices or (value.startswith("map:") and len(value) > 4 and "map:*" in choices):
        return value
    shown = [c for c in choices if c != "map:*"] + ["map:NAME", "map:*"]
    raise ValueError(
        f"unknown flow {kind} {value!r}{did_you_mean(value, choices)}; {kind}s: {', '.join(shown)}"
    )


def _ip_proto(value: int | str) -> int:
    if isinstance(value, str):
        if value.lower() not in _IP_PROTOS:
            raise ValueError(f"unknown ip_proto {value!r}{did_you_mean(value.lower(), _IP_PROTOS)}")
        return _IP_PROTOS[value.lower()]
    if not 0 <= value <= 255:
        raise ValueError(f"ip_proto must be in 0..255 (got {value})")
    return value


def _address(value: str) -> str:
    try:
        return str(ipaddress.ip_network(str(value), strict=False))
    except ValueError:
        raise ValueError(f"not an IP address or prefix: {value!r}") from None


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, dict) else value


HelperName = Annotated[str, AfterValidator(_helper_name)]
ReturnCode = Annotated[int | str, AfterValidator(_return_code)]
Window = Annotated[tuple[int, int], AfterValidator(_window)]
Port = Annotated[int, Field(ge=0, le=65535)]
Source = Annotated[str, AfterValidator(lambda v: _flow_end("source", v, _FLOW_SOURCES))]
Sink = Annotated[str, AfterValidator(lambda v: _flow_end("sink", v, _FLOW_SINKS))]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class HelperPolicy(_Section):
    """``helpers``: `allow` (when given, every other helper is denied) and `deny` (always wins).
    Names may carry the ``bpf_`` prefix; they are stored without it."""

    allow: list[HelperName] | None = None
    deny: list[HelperName] = []


class MapAccess(_Section):
    """What a program may do to one map (``maps.NAME``); what is not granted is denied."""

    read: bool = False
    write: bool = False
    delete: bool = False


class PacketWhen(_Section):
    """``packet.when``: header fields that must provably hold for the windows to apply."""

    eth_type: Annotated[int, Field(ge=0, le=0xFFFF)] | None = None
    ip_proto: Annotated[int | str, AfterValidator(_ip_proto)] | None = None
    sport: Port | None = None
    dport: Port | None = None
    saddr: Annotated[str, AfterValidator(_address)] | None = None
    daddr: Annotated[str, AfterValidator(_address)] | None = None

    def matches(self, headers: dict[str, Any]) -> bool:
        """Whether concrete `headers` satisfy every condition (a condition on a header not
        given does not hold).

        >>> PacketWhen(ip_proto="tcp", daddr="10.0.0.0/8").matches({"ip_proto": 6, "daddr": "10.1.2.3"})
        True
        """
        for name, want in self.model_dump(exclude_none=True).items():
            got = headers.get(name)
            if got is None:
                return False
            if name in ("saddr", "daddr"):
                if ipaddress.ip_address(str(got)) not in ipaddress.ip_network(want):
                    return False
            elif name == "ip_proto":
                if _ip_proto(got) != want:
                    return False
            elif got != want:
                return False
        return True


class PacketPolicy(_Section):
    """One ``packet`` entry: inclusive byte windows for `read` and `write`, applying when `when`
    holds (``None``: always). An entry that leaves out `read` (or `write`) grants none of it;
    only when no entry mentions `read` (or `write`) are such accesses unconstrained."""

    read: list[Window] | None = None
    write: list[Window] | None = None
    when: PacketWhen | None = None


class CtxPolicy(_Section):
    """``ctx``: the context fields a program may read and write (checked per program type)."""

    read: list[str] = []
    write: list[str] = []


class RuleHelpers(_Section):
    deny: list[HelperName]


class RuleIf(_Section):
    """A rule's condition; exactly one of its fields."""

    helper_called: HelperName | None = None
    returns: list[ReturnCode] | None = None
    map_written: str | None = None

    @model_validator(mode="after")
    def _one(self) -> "RuleIf":
        given = [k for k, v in self if v is not None]
        if len(given) != 1:
            raise ValueError(
                "a rule's `if` takes exactly one of helper_called, returns, map_written"
                f" (got {', '.join(given) or 'none'})"
            )
        return self


class RuleThen(_Section):
    """A rule's consequence: verdicts allowed from then on, and/or helpers denied."""

    returns: list[ReturnCode] | None = None
    helpers: RuleHelpers | None = None

    @model_validator(mode="after")
    def _some(self) -> "RuleThen":
        if self.returns is None and self.helpers is None:
            raise ValueError("a rule's `then` needs returns or helpers")
        return self


class Rule(_Section):
    """``{if: {...}, then: {...}}``: a conditional rule (the artifact's ``dependencies``)."""

    if_: RuleIf = Field(alias="if")
    then: RuleThen


class FlowPolicy(_Section):
    """``flow.deny``: ``[SOURCE, SINK]`` pairs no data may flow along (our taint extension).
    Sources: packet, kernel, user, ctx, map:NAME, map:*; sinks: map:NAME, map:*, ringbuf,
    perf_output, packet, return, user."""

    deny: list[tuple[Source, Sink]] = []


class Budget(_Section):
    """Limits of the symbolic search; running out gives UNKNOWN, which is fail-closed."""

    max_paths: Annotated[int, Field(gt=0)] | None = None
    max_insns_per_path: Annotated[int, Field(gt=0)] | None = None
    time_s: Annotated[float, Field(gt=0)] | None = None


def _program_type(name: str) -> str:
    if name not in PROGRAM_TYPES:
        raise ValueError(f"unknown program type {name!r}{did_you_mean(name, PROGRAM_TYPES)}")
    return PROGRAM_TYPES[name]


class Policy(_Section):
    """A KrakenGuard policy. Every section is optional; a missing one constrains nothing."""

    program_types: list[Annotated[str, AfterValidator(_program_type)]] | None = None
    entry_function: str | None = None
    helpers: HelperPolicy | None = None
    maps: dict[str, MapAccess] | None = None
    packet: Annotated[list[PacketPolicy], BeforeValidator(_as_list)] | None = None
    ctx: CtxPolicy | None = None
    returns: list[ReturnCode] | None = None
    rules: list[Rule] = []
    flow: FlowPolicy | None = None
    budget: Budget = Budget()

    @model_validator(mode="after")
    def _cross_checks(self, info: ValidationInfo) -> "Policy":
        if not (info.context or {}).get(DEFER_CROSS_CHECKS):
            problems = self.problems()
            if problems:
                raise ValueError("; ".join(f"{yaml_path(loc)}: {msg}" for loc, msg in problems))
        return self

    def problems(self) -> list[tuple[tuple[str | int, ...], str]]:
        """Checks across sections, as ``(location, message)``: ctx fields against the program
        types, verdict names against the program types."""
        out: list[tuple[tuple[str | int, ...], str]] = []
        types = [t for t in self.program_types or CTX_FIELDS if t in CTX_FIELDS]
        if self.ctx is not None and types:
            for kind in ("read", "write"):
                for i, name in enumerate(getattr(self.ctx, kind)):
                    bad = [t for t in types if name not in CTX_FIELDS[t]]
                    if len(bad) == len(types) or (self.program_types and bad):
                        fields = CTX_FIELDS[bad[0]]
                        out.append(
                            (
                                ("ctx", kind, i),
                                f"unknown ctx field {name!r} for {bad[0]}"
                                f"{did_you_mean(name, fields)}; fields: {', '.join(fields)}",
                            )
                        )
        if self.program_types:
            prefixes = {_RETURN_FAMILY.get(t) for t in self.program_types}
            if None not in prefixes:
                for loc, codes in self._return_lists():
                    for i, code in enumerate(codes):
                        if isinstance(code, str) and not any(code.startswith(p) for p in prefixes):
                            out.append(
                                (
                                    (*loc, i),
                                    f"return code {code!r} does not apply to "
                                    f"{', '.join(self.program_types)} programs",
                                )
                            )
        return out

    def _return_lists(self) -> Iterable[tuple[tuple[str | int, ...], list[int | str]]]:
        if self.returns is not None:
            yield ("returns",), self.returns
        for i, rule in enumerate(self.rules):
            if rule.if_.returns is not None:
                yield ("rules", i, "if", "returns"), rule.if_.returns
            if rule.then.returns is not None:
                yield ("rules", i, "then", "returns"), rule.then.returns

    def to_yaml(self) -> str:
        """This policy in our YAML form (sections left out stay out); :func:`load_policy` reads
        it back to an equal policy, e.g. to export an imported artifact policy.

        >>> print(Policy.model_validate({"helpers": {"deny": ["bpf_trace_printk"]}}).to_yaml(), end="")
        helpers:
          deny:
          - trace_printk
        """
        data = self.model_dump(mode="json", by_alias=True, exclude_defaults=True)
        return yaml.safe_dump(data, sort_keys=False)

    # --- decisions -------------------------------------------------------------------------------

    def _fired(
        self, called: Iterable[str], maps_written: Iterable[str], returned: int | None, ptype: str
    ) -> list[Rule]:
        called = {c.removeprefix("bpf_") for c in called}
        written = set(maps_written)
        out = []
        for rule in self.rules:
            c = rule.if_
            if (
                (c.helper_called is not None and c.helper_called in called)
                or (c.map_written is not None and c.map_written in written)
                or (
                    c.returns is not None
                    and returned is not None
                    and _codes_allow(c.returns, returned, ptype)
                )
            ):
                out.append(rule)
        return out

    def helper_allowed(
        self,
        name: str,
        *,
        called: Iterable[str] = (),
        maps_written: Iterable[str] = (),
        returned: int | None = None,
        program_type: str = "",
    ) -> bool:
        """Whether the program may call helper `name` (with or without ``bpf_``), given the
        helpers already `called` and maps already written on this path (for ``rules``).

        >>> p = Policy.model_validate({"helpers": {"allow": ["map_lookup_elem", "ktime_get_ns"],
        ...     "deny": ["ktime_get_ns"]}, "rules": [{"if": {"helper_called": "map_lookup_elem"},
        ...     "then": {"helpers": {"deny": ["map_lookup_elem"]}}}]})
        >>> p.helper_allowed("bpf_map_lookup_elem"), p.helper_allowed("ktime_get_ns")
        (True, False)
        >>> p.helper_allowed("map_lookup_elem", called=["map_lookup_elem"])
        False
        >>> Policy().helper_allowed("trace_printk")
        True
        """
        name = name.removeprefix("bpf_")
        if self.helpers is not None:
            if name in self.helpers.deny:
                return False
            if self.helpers.allow is not None and name not in self.helpers.allow:
                return False
        for rule in self._fired(called, maps_written, returned, program_type):
            if rule.then.helpers is not None and name in rule.then.helpers.deny:
                return False
        return True

    def map_allowed(self, name: str, kind: Literal["read", "write", "delete"]) -> bool:
        """Whether the program may `kind` (read, write or delete) map `name`; maps not named
        take the ``"*"`` entry, or are denied when there is none.

        >>> p = Policy.model_validate({"maps": {"counters": {"read": True, "write": True},
        ...                                     "*": {"read": True}}})
        >>> p.map_allowed("counters", "write"), p.map_allowed("other", "read"), p.map_allowed("other", "write")
        (True, True, False)
        >>> Policy().map_allowed("anything", "delete")
        True
        """
        if kind not in ("read", "write", "delete"):
            raise ValueError(f"map access kind must be read, write or delete (got {kind!r})")
        if self.maps is None:
            return True
        access = self.maps.get(name, self.maps.get("*"))
        return access is not None and getattr(access, kind)

    def packet_window(
        self, kind: Literal["read", "write"], **headers: Any
    ) -> list[tuple[int, int]] | None:
        """The inclusive byte windows the program may `kind` (read or write), merged over the
        ``packet`` entries that apply: those without ``when``, and those whose ``when`` the
        given concrete `headers` satisfy. ``None`` means any byte. For a symbolic check, iterate
        :attr:`packet` and prove each entry's ``when`` from the path condition instead.

        >>> p = Policy.model_validate({"packet": [{"read": [[0, 13], [12, 33]], "write": [[22, 22]]},
        ...     {"read": [[34, 53]], "when": {"ip_proto": "tcp"}}]})
        >>> p.packet_window("read"), p.packet_window("read", ip_proto=6), p.packet_window("write")
        ([(0, 33)], [(0, 53)], [(22, 22)])
        >>> Policy().packet_window("write") is None
        True
        """
        entries = self.packet_entries(kind)
        if entries is None:
            return None
        spans: list[tuple[int, int]] = []
        for when, windows in entries:
            if when is None or when.matches(headers):
                spans += windows
        merged: list[tuple[int, int]] = []
        for lo, hi in sorted(spans):
            if merged and lo <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
            else:
                merged.append((lo, hi))
        return merged

    def packet_entries(
        self, kind: Literal["read", "write"]
    ) -> list[tuple[PacketWhen | None, list[tuple[int, int]]]] | None:
        """The ``(when, windows)`` of the ``packet`` entries that grant `kind` accesses, or
        ``None`` when no entry mentions `kind` (any byte may then be accessed that way).

        >>> p = Policy.model_validate({"packet": [{"read": [[0, 13]]},
        ...     {"read": [[14, 33]], "write": [[22, 22]], "when": {"ip_proto": "udp"}}]})
        >>> [(w is not None, ws) for w, ws in p.packet_entries("write")]
        [(True, [(22, 22)])]
        >>> Policy.model_validate({"packet": {"read": [[0, 13]]}}).packet_entries("write") is None
        True
        """
        if kind not in ("read", "write"):
            raise ValueError(f"packet access kind must be read or write (got {kind!r})")
        if self.packet is None or all(getattr(e, kind) is None for e in self.packet):
            return None
        return [(e.when, getattr(e, kind)) for e in self.packet if getattr(e, kind) is not None]

    def packet_allowed(
        self, kind: Literal["read", "write"], lo: int, hi: int, **headers: Any
    ) -> bool:
        """Whether bytes `lo`..`hi` (inclusive) lie inside one window of :meth:`packet_window`.

        >>> Policy.model_validate({"packet": {"write": [[22, 23]]}}).packet_allowed("write", 22, 24)
        False
        """
        windows = self.packet_window(kind, **headers)
        return windows is None or any(a <= lo and hi <= b for a, b in windows)

    def return_allowed(
        self,
        value: int,
        program_type: str,
        *,
        called: Iterable[str] = (),
        maps_written: Iterable[str] = (),
    ) -> bool:
        """Whether a `program_type` program may return `value`; ``XDP_*`` names count for XDP,
        ``TC_ACT_*`` names for tc, integers for every type; a fired rule's ``then.returns``
        narrows the set further.

        >>> p = Policy.model_validate({"returns": ["XDP_PASS", "XDP_DROP", "TC_ACT_OK"],
        ...     "rules": [{"if": {"map_written": "log"}, "then": {"returns": ["XDP_PASS"]}}]})
        >>> p.return_allowed(1, "xdp"), p.return_allowed(3, "xdp"), p.return_allowed(0, "tc")
        (True, False, True)
        >>> p.return_allowed(1, "xdp", maps_written=["log"])
        False
        """
        ptype = PROGRAM_TYPES.get(program_type, program_type)
        if self.returns is not None and not _codes_allow(self.returns, value, ptype):
            return False
        for rule in self._fired(called, maps_written, value, ptype):
            if rule.then.returns is not None and not _codes_allow(rule.then.returns, value, ptype):
                return False
        return True

    def ctx_allowed(self, field: str, kind: Literal["read", "write"]) -> bool:
        """Whether the program may `kind` context field `field`.

        >>> p = Policy.model_validate({"ctx": {"read": ["data", "data_end"]}})
        >>> p.ctx_allowed("data", "read"), p.ctx_allowed("data", "write"), Policy().ctx_allowed("mark", "write")
        (True, False, True)
        """
        if self.ctx is None:
            return True
        return field in getattr(self.ctx, kind)

    def flow_denied(self, source: str, sink: str) -> bool:
        """Whether data labelled `source` must not reach `sink` (``map:*`` matches every map).

        >>> p = Policy.model_validate({"flow": {"deny": [["packet", "map:*"], ["map:keys", "ringbuf"]]}})
        >>> p.flow_denied("packet", "map:counters"), p.flow_denied("map:keys", "ringbuf"), p.flow_denied("ctx", "ringbuf")
        (True, True, False)
        """
        if self.flow is None:
            return False
        for src, dst in self.flow.deny:
            if _flow_match(src, source) and _flow_match(dst, sink):
                return True
        return False


def _flow_match(pattern: str, label: str) -> bool:
    return pattern == label or (pattern == "map:*" and label.startswith("map:"))


def _codes_allow(codes: Iterable[int | str], value: int, ptype: str) -> bool:
    prefix = _RETURN_FAMILY.get(ptype)
    for code in codes:
        if isinstance(code, int):
            if code == value:
                return True
        elif (prefix is None or code.startswith(prefix)) and RETURN_CODES[code] == value:
            return True
    return False


# --- the artifact's formats ----------------------------------------------------------------------

_ARTIFACT_KEYS = {"packet_constraints", "restricted_helpers", "helper_func", "map_access"}
_ACTION_KEYS = {"actions", "dependencies", "policies"}
_CONSTRAINT_KEYS = ("sPort", "dPort", "sIP", "dIP", "read-access", "write-access", "protocol")


def is_krakenguard(data: Any) -> bool:
    """Whether parsed `data` is in one of the KrakenGuard artifact's formats (not ours).

    >>> is_krakenguard({"restricted_helpers": ["bpf_trace_printk"]}), is_krakenguard({"helpers": {}})
    (True, False)
    """
    if isinstance(data, list):
        return all(isinstance(d, dict) for d in data) and bool(data)
    if not isinstance(data, dict):
        return False
    return bool(
        _ARTIFACT_KEYS & set(data) or _ACTION_KEYS & set(data) or data.get("type") == "ACTION"
    )


class _Import:
    """Translates an artifact policy into our form, collecting ``(loc, message)`` problems."""

    def __init__(self) -> None:
        self.problems: list[tuple[tuple[str | int, ...], str]] = []
        self.out: dict[str, Any] = {}

    def fail(self, loc: tuple[str | int, ...], message: str) -> None:
        self.problems.append((loc, message))

    def helpers(self, value: Any, loc: tuple[str | int, ...]) -> list[str]:
        names = [n.strip() for n in value.split(",")] if isinstance(value, str) else value
        if not isinstance(names, list):
            self.fail(loc, f"expected a list of helper names (got {value!r})")
            return []
        out = []
        for i, n in enumerate(names):
            try:
                out.append(_helper_name(str(n)))
            except ValueError as e:
                self.fail((*loc, i) if not isinstance(value, str) else loc, str(e))
        return out

    def windows(self, value: Any, loc: tuple[str | int, ...]) -> list[list[int]] | None:
        if value is None or str(value).strip() == "*":
            return None
        parts = value if isinstance(value, list) else str(value).split(",")
        out = []
        for part in (str(p).strip() for p in parts):
            if not part:
                continue
            m = re.fullmatch(r"(\d+)\s*(?:-\s*(\d+))?", part)
            if not m:
                self.fail(loc, f'bad byte range {part!r}; write ranges like "0-15,18-1500" or "*"')
                continue
            lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
            if lo > hi:
                self.fail(loc, f"byte range {part!r} has lo > hi")
                continue
            out.append([lo, hi])
        return out

    def map_access(self, value: Any, loc: tuple[str | int, ...]) -> None:
        if not isinstance(value, list):
            self.fail(loc, "map_access must be a list of {name, access}")
            return
        maps = self.out.setdefault("maps", {})
        if not value:
            maps.setdefault("*", {"read": False, "write": False, "delete": False})
        for i, entry in enumerate(value):
            if not isinstance(entry, dict) or "name" not in entry:
                self.fail((*loc, i), "each map_access entry needs a name and an access")
                continue
            access = entry.get("access")
            if access not in ("Read", "Write", "ReadWrite"):
                self.fail(
                    (*loc, i, "access"),
                    f"access must be Read, Write or ReadWrite (got {access!r})"
                    + did_you_mean(str(access), ["Read", "Write", "ReadWrite"]),
                )
                continue
            write = access != "Read"  # update and delete are writes (brief §2.4 item 4)
            maps[str(entry["name"])] = {"read": access != "Write", "write": write, "delete": write}

    def constraint(self, entry: Any, loc: tuple[str | int, ...]) -> None:
        if not isinstance(entry, dict):
            self.fail(loc, "a packet constraint must be a mapping")
            return
        for key in entry:
            if key not in _CONSTRAINT_KEYS:
                self.fail(
                    (*loc, key),
                    f"unknown field {key!r}{did_you_mean(key, _CONSTRAINT_KEYS)}; "
                    f"allowed: {', '.join(_CONSTRAINT_KEYS)}",
                )
        rule: dict[str, Any] = {}
        for key, ours in (("read-access", "read"), ("write-access", "write")):
            windows = self.windows(entry.get(key), (*loc, key))
            if windows is not None:
                rule[ours] = windows
        when: dict[str, Any] = {}
        for key, ours in (
            ("sPort", "sport"),
            ("dPort", "dport"),
            ("sIP", "saddr"),
            ("dIP", "daddr"),
        ):
            value = entry.get(key, "*")
            if value is None or str(value).strip() == "*":
                continue
            if ours.endswith("port"):
                if not re.fullmatch(r"\d+", str(value).strip()) or int(value) > 65535:
                    self.fail((*loc, key), f'port must be 0..65535 or "*" (got {value!r})')
                    continue
                when[ours] = int(value)
            else:
                try:
                    when[ours] = _address(str(value).strip())
                except ValueError as e:
                    self.fail((*loc, key), str(e))
        if entry.get("protocol", "*") not in ("*", None):
            try:
                when["ip_proto"] = _ip_proto(entry["protocol"])
            except ValueError as e:
                self.fail((*loc, "protocol"), str(e))
        if when:
            rule["when"] = when
        self.out.setdefault("packet", []).append(rule)

    def flat(self, data: dict[str, Any], loc: tuple[str | int, ...] = ()) -> None:
        for key, value in data.items():
            here = (*loc, key)
            if key == "packet_constraints":
                if not isinstance(value, list):
                    self.fail(here, "packet_constraints must be a list")
                    continue
                for i, entry in enumerate(value):
                    self.constraint(entry, (*here, i))
            elif key in ("restricted_helpers", "helper_func"):
                helpers = self.out.setdefault("helpers", {})
                helpers.setdefault("deny", []).extend(self.helpers(value, here))
            elif key == "map_access":
                self.map_access(value, here)
            elif key == "entry_function":
                self.out["entry_function"] = value
            elif key in ("type", "actions", "dependencies", "name", "description", "id"):
                pass  # handled by action()
            elif key in Policy.model_fields:
                self.fail(
                    here,
                    f"{key!r} is a section of our policy form, not of the KrakenGuard artifact's: "
                    "write the policy in one form (convert with from_krakenguard(...).to_yaml())",
                )
            else:
                known = [*_ARTIFACT_KEYS, "entry_function", "type", "actions", "dependencies"]
                self.fail(here, f"unknown field {key!r}{did_you_mean(key, known)}")

    def action(self, obj: dict[str, Any], loc: tuple[str | int, ...]) -> None:
        if obj.get("type", "ACTION") != "ACTION":
            self.fail(
                (*loc, "type"), f"only ACTION policy objects can be imported (got {obj['type']!r})"
            )
            return
        actions = obj.get("actions") or {}
        deps = obj.get("dependencies") or {}
        if not isinstance(actions, dict) or not isinstance(deps, dict):
            self.fail(loc, "actions and dependencies must be mappings")
            return
        for key in actions:
            if key not in ("helper_access", "memory_access", "return_value"):
                self.fail(
                    (*loc, "actions", key),
                    f"unknown action {key!r}"
                    + did_you_mean(key, ["helper_access", "memory_access", "return_value"]),
                )
        returns = actions.get("return_value")
        if returns is not None:
            returns = returns if isinstance(returns, list) else [returns]
            for i, r in enumerate(returns):
                try:
                    _return_code(r)
                except ValueError as e:
                    self.fail((*loc, "actions", "return_value", i), str(e))
        if not deps:
            if "helper_access" in actions:
                allow = self.out.setdefault("helpers", {}).setdefault("allow", [])
                allow.extend(
                    self.helpers(actions["helper_access"], (*loc, "actions", "helper_access"))
                )
            if returns is not None:
                self.out.setdefault("returns", []).extend(returns)
            if "memory_access" in actions:
                self.memory(actions["memory_access"], (*loc, "actions", "memory_access"))
            return
        # a conditional object becomes one of our rules: one condition, verdicts as consequence
        conditions: list[dict[str, Any]] = []
        for i, prev in enumerate(deps.get("previous_actions") or []):
            name = prev.get("helper") if isinstance(prev, dict) else prev
            try:
                conditions.append({"helper_called": _helper_name(str(name))})
            except ValueError as e:
                self.fail((*loc, "dependencies", "previous_actions", i), str(e))
        memory = deps.get("memory")
        if memory is not None:
            name = (
                memory.get("map_written", memory.get("map")) if isinstance(memory, dict) else None
            )
            if (
                isinstance(memory, dict)
                and name
                and memory.get("access", "Write") in ("Write", "ReadWrite")
            ):
                conditions.append({"map_written": str(name)})
            else:
                self.fail(
                    (*loc, "dependencies", "memory"),
                    "only a 'map written' memory dependency ({map: NAME, access: Write}) maps to "
                    f"our rules; this one cannot be imported: {json.dumps(memory)}",
                )
        for key in deps:
            if key not in ("memory", "previous_actions"):
                self.fail((*loc, "dependencies", key), f"unknown dependency {key!r}")
        if len(conditions) > 1:
            self.fail(
                (*loc, "dependencies"),
                f"{len(conditions)} conditions in one policy object: our rules take one condition "
                "each, so a conjunction cannot be imported",
            )
            return
        for key in ("helper_access", "memory_access"):
            if key in actions:
                self.fail(
                    (*loc, "actions", key),
                    f"a conditional {key} cannot be imported: our rules can only restrict "
                    "verdicts and deny helpers once their condition holds",
                )
        if conditions and returns is not None:
            self.out.setdefault("rules", []).append(
                {"if": conditions[0], "then": {"returns": returns}}
            )

    def memory(self, value: Any, loc: tuple[str | int, ...]) -> None:
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            here = (*loc, i) if isinstance(value, list) else loc
            if isinstance(item, dict) and set(item) <= set(_CONSTRAINT_KEYS) and item:
                self.constraint(item, here)
            elif isinstance(item, dict) and set(item) == {"map_access"}:
                self.map_access(item["map_access"], (*here, "map_access"))
            else:
                self.fail(
                    here,
                    "only packet windows (read-access / write-access) and map_access lists map to "
                    f"our policy; this memory_access cannot be imported: {json.dumps(item)}",
                )


def _import(data: Any) -> tuple[dict[str, Any], list[tuple[tuple[str | int, ...], str]]]:
    imp = _Import()
    if isinstance(data, dict) and isinstance(data.get("policies"), list):
        objects = [(("policies", i), o) for i, o in enumerate(data["policies"])]
        rest = {k: v for k, v in data.items() if k != "policies"}
        imp.flat(rest)
    elif isinstance(data, list):
        objects = [((i,), o) for i, o in enumerate(data)]
    else:
        objects = [((), data)] if data.get("type") == "ACTION" or _ACTION_KEYS & set(data) else []
        imp.flat(data)
    for loc, obj in objects:
        if not isinstance(obj, dict):
            imp.fail(loc, "a policy object must be a mapping")
        else:
            if loc:
                imp.flat(
                    {k: v for k, v in obj.items() if k in _ARTIFACT_KEYS | {"entry_function"}}, loc
                )
            imp.action(obj, loc)
    return imp.out, imp.problems


def from_krakenguard(data: Any, *, source: str = "policy.json") -> Policy:
    """Our :class:`Policy` for a policy in one of the KrakenGuard artifact's JSON formats:

    (a) ``packet_constraints[]`` (``sPort``, ``dPort``, ``sIP``, ``dIP``, ``read-access``,
    ``write-access``; windows like ``"0-15,18-1500"``, ``"*"`` a wildcard, concrete 5-tuple
    values become ``when`` conditions), ``restricted_helpers`` / ``helper_func`` (deny list),
    ``map_access[]`` (``Read``, ``Write``, ``ReadWrite``; an empty list denies every map),
    ``entry_function``;

    (b) ``type: ACTION`` objects (one, a list, or under ``policies``): ``actions.helper_access``
    (allow list), ``actions.memory_access`` (packet windows, map_access), ``actions.return_value``;
    an object with ``dependencies.previous_actions`` (a helper) or ``dependencies.memory``
    (a map written) becomes a rule restricting verdicts. What has no equivalent here is refused
    with :class:`PolicyError` naming it.

    >>> p = from_krakenguard({"entry_function": "xdp_prog", "restricted_helpers": ["bpf_trace_printk"],
    ...     "map_access": [{"name": "counters", "access": "ReadWrite"}],
    ...     "packet_constraints": [{"sPort": "*", "dPort": "80", "sIP": "*", "dIP": "*",
    ...                             "read-access": "0-15,18-1500", "write-access": "*"}]})
    >>> p.helpers.deny, p.packet[0].read, p.packet[0].when.dport, p.map_allowed("other", "read")
    (['trace_printk'], [(0, 15), (18, 1500)], 80, False)
    >>> from_krakenguard({"type": "ACTION", "actions": {"return_value": ["XDP_DROP", "XDP_PASS"],
    ...     "helper_access": ["bpf_map_lookup_elem"]}}).returns
    ['XDP_DROP', 'XDP_PASS']
    """
    out, problems = _import(data)
    if problems:
        raise PolicyError([ConfigIssue(0, yaml_path(loc), msg) for loc, msg in problems], source)
    try:
        return Policy.model_validate(out)
    except ValueError as e:
        raise PolicyError(
            [ConfigIssue(0, "", f"imported policy is not valid: {e}")], source
        ) from None


SHIPPED = Path(__file__).parent / "policies"
"""Policies that ship with datahall (``tenant-xdp``, ``ttl-rewriter``, ``no-kernel-writes``)."""


def shipped_policies() -> dict[str, Path]:
    """The shipped policies by name.

    >>> sorted(shipped_policies())
    ['no-kernel-writes', 'tenant-xdp', 'ttl-rewriter']
    """
    return {p.stem: p for p in sorted(SHIPPED.glob("*.yaml"))}


def resolve_policy(spec: str) -> Policy:
    """A policy from a file path or the name of a shipped policy; a clear error otherwise."""
    if not Path(spec).exists():
        shipped = shipped_policies()
        if spec in shipped:
            return load_policy(shipped[spec])
        raise PolicyError(
            [
                ConfigIssue(
                    0, "", f"no policy file {spec!r}; shipped policies: {', '.join(shipped)}"
                )
            ],
            "--policy",
        )
    if Path(spec).is_dir():
        raise PolicyError(
            [ConfigIssue(0, "", f"{spec} is a folder; give a policy file")], "--policy"
        )
    return load_policy(spec)


def load_policy(path_or_text: str | os.PathLike[str], *, source: str | None = None) -> Policy:
    """Read a policy (a path, or YAML/JSON text) in our form or an artifact form (detected by
    :func:`is_krakenguard`); every problem is reported at its line: ``policy.yaml:LINE: path:
    message (did you mean ...?)``.

    >>> load_policy('{"maps": {"counters": {"read": true, "wirte": true}}}', source="p.json")
    Traceback (most recent call last):
    ...
    datahall.ebpf.policy.PolicyError: p.json:1: maps.counters.wirte: unknown field 'wirte' (did you mean 'write'?); allowed: read, write, delete
    """
    if names_a_file(path_or_text):
        text = read_text(path_or_text, PolicyError)
        source = source or str(path_or_text)
    else:
        text = str(path_or_text)
    root, data = compose_yaml(text, source, PolicyError)
    if is_krakenguard(data):
        out, problems = _import(data)
        if problems:
            issues = []
            for loc, msg in problems:
                line, shown = locate(root, loc)
                issues.append(ConfigIssue(line, yaml_path(shown) or yaml_path(loc), msg))
            raise PolicyError(issues, source)
        return validate_at_lines(
            out, None, Policy, source=source, error=PolicyError, problems=Policy.problems
        )
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PolicyError([ConfigIssue(1, "", "a policy must be a mapping of sections")], source)
    return validate_at_lines(
        data, root, Policy, source=source, error=PolicyError, problems=Policy.problems
    )
