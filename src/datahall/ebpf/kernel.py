"""The kernel oracle: load a checked eBPF program with the raw ``bpf()`` syscall and replay packets.

KrakenGuard (NSDI '26) checks a program before it reaches the kernel; its broker then loads the
program it has verified, and a counterexample found by the symbolic engine can be replayed in the
real kernel with ``BPF_PROG_TEST_RUN`` (brief §2.4 item 7, §3 "Kernel oracle"). This module is that
thin layer: ctypes over ``syscall(__NR_bpf, cmd, &attr, size)`` with the ``union bpf_attr``
layouts of the UAPI header ``linux/bpf.h``; neither libbpf nor bpftool is used.

:func:`load` creates the maps a program refers to (``BPF_MAP_CREATE``), one single-entry ARRAY
map per global data section (``.rodata`` maps are read-only to the program and frozen, as libbpf
does, so the verifier sees their constants), patches the ``lddw`` and ``call`` slots of the
program linked by :func:`datahall.ebpf.engine.link`, and calls ``BPF_PROG_LOAD``. No BTF is
passed: bpf-to-bpf calls load without it (global functions are then verified like static ones);
``bpf_loop`` callbacks, kfuncs, ``__ksym`` externs and BTF-typed attach points (fentry, lsm,
struct_ops) do not, and raise :class:`KernelError`. Maps pinned by name are created afresh, not
shared.

Loading needs ``CAP_BPF`` (root); :func:`available` says whether this process may call
``bpf()`` (brief §5: gate every kernel test on that probe).

Examples
--------
>>> from datahall.ebpf import isa
>>> from datahall.ebpf.engine import program_object
>>> if available() is not None:
...     import pytest; pytest.skip(available())
>>> obj = program_object([isa.insn(0xB7, dst=0, imm=2), isa.insn(0x95)])  # r0 = XDP_PASS
>>> with load(obj, "xdp") as prog:
...     test_run(prog, bytes(64)).retval
2
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import os
import platform
from dataclasses import dataclass, field

from datahall.ebpf import isa
from datahall.ebpf.engine import link
from datahall.ebpf.loader import MAP_TYPES, BpfMap, BpfObject

__all__ = [
    "PROG_TYPES",
    "KernelError",
    "LoadedProgram",
    "RunResult",
    "available",
    "load",
    "test_run",
]

# enum bpf_cmd
BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_GET_NEXT_KEY = 4
BPF_PROG_LOAD = 5
BPF_OBJ_PIN = 6
BPF_PROG_TEST_RUN = 10
BPF_MAP_FREEZE = 22

# insn src_reg pseudo kinds
BPF_PSEUDO_MAP_FD = 1
BPF_PSEUDO_MAP_VALUE = 2
BPF_PSEUDO_FUNC = 4

# map_flags / prog_flags
BPF_F_RDONLY_PROG = 1 << 7
BPF_F_XDP_HAS_FRAGS = 1 << 5

ENOTSUPP = 524  # kernel-internal errno that leaks to user space (no name in errno)

_PROG_TYPE_NAMES = (
    "unspec socket_filter kprobe sched_cls sched_act tracepoint xdp perf_event cgroup_skb "
    "cgroup_sock lwt_in lwt_out lwt_xmit sock_ops sk_skb cgroup_device sk_msg raw_tracepoint "
    "cgroup_sock_addr lwt_seg6local lirc_mode2 sk_reuseport flow_dissector cgroup_sysctl "
    "raw_tracepoint_writable cgroup_sockopt tracing struct_ops ext lsm sk_lookup syscall"
)
PROG_TYPES = tuple(_PROG_TYPE_NAMES.split())
"""``enum bpf_prog_type`` names in value order, spelled as :func:`loader.program_type` does."""

# Program types whose load needs an in-kernel BTF id (attach_btf_id), which this layer does not
# resolve.
_NEEDS_ATTACH_BTF = {"tracing", "ext", "lsm", "struct_ops"}

# enum bpf_attach_type values for the section names that need an expected attach type at load
# (libbpf's section_defs); the first matching prefix wins.
_ATTACH_TYPES = (
    ("xdp/devmap", 33),  # BPF_XDP_DEVMAP
    ("xdp.frags/devmap", 33),
    ("xdp/cpumap", 35),  # BPF_XDP_CPUMAP
    ("xdp.frags/cpumap", 35),
    ("xdp.frags", 37),
    ("xdp", 37),  # BPF_XDP
    ("sk_reuseport/migrate", 40),  # BPF_SK_REUSEPORT_SELECT_OR_MIGRATE
    ("sk_reuseport", 39),  # BPF_SK_REUSEPORT_SELECT
    ("sk_lookup", 36),  # BPF_SK_LOOKUP
    ("cgroup_skb/ingress", 0),  # BPF_CGROUP_INET_INGRESS
    ("cgroup_skb/egress", 1),
    ("cgroup/skb", 0),
    ("cgroup/sock_create", 2),  # BPF_CGROUP_INET_SOCK_CREATE
    ("cgroup/sock_release", 34),
    ("cgroup/sock", 2),
    ("cgroup/post_bind4", 12),
    ("cgroup/post_bind6", 13),
    ("cgroup/bind4", 8),
    ("cgroup/bind6", 9),
    ("cgroup/connect4", 10),
    ("cgroup/connect6", 11),
    ("cgroup/sendmsg4", 14),
    ("cgroup/sendmsg6", 15),
    ("cgroup/recvmsg4", 19),
    ("cgroup/recvmsg6", 20),
    ("cgroup/getpeername4", 29),
    ("cgroup/getpeername6", 30),
    ("cgroup/getsockname4", 31),
    ("cgroup/getsockname6", 32),
    ("cgroup/sysctl", 18),
    ("cgroup/getsockopt", 21),
    ("cgroup/setsockopt", 22),
    ("cgroup/dev", 6),
    ("sk_skb/stream_parser", 4),
    ("sk_skb/stream_verdict", 5),
    ("sk_skb", 38),  # BPF_SK_SKB_VERDICT
    ("sk_msg", 7),
    ("sockops", 3),
    ("flow_dissector", 17),
    ("lirc_mode2", 16),
)

_LOG_START = 1 << 18  # first verifier log buffer, in bytes; quadrupled while it is too small

_SYSCALL_NR = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "ppc64le": 361, "s390x": 351}


class KernelError(RuntimeError):
    """The kernel refused a ``bpf()`` command; ``log`` holds the verifier log ('' if none).

    ``errno`` is the error number the syscall returned (0 when the refusal came from this module,
    before any syscall).
    """

    def __init__(self, message: str, log: str = "", errno: int = 0) -> None:
        super().__init__(message)
        self.log = log
        self.errno = errno


# ---------------------------------------------------------------------------------------------
# union bpf_attr, one ctypes Structure per command group (field order and widths as in the UAPI
# header; __aligned_u64 is c_uint64, which ctypes aligns to 8 bytes like the kernel).


class _MapCreateAttr(ctypes.Structure):
    _fields_ = [
        ("map_type", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("inner_map_fd", ctypes.c_uint32),
        ("numa_node", ctypes.c_uint32),
        ("map_name", ctypes.c_char * 16),
        ("map_ifindex", ctypes.c_uint32),
        ("btf_fd", ctypes.c_uint32),
        ("btf_key_type_id", ctypes.c_uint32),
        ("btf_value_type_id", ctypes.c_uint32),
        ("btf_vmlinux_value_type_id", ctypes.c_uint32),
        ("map_extra", ctypes.c_uint64),
    ]


class _MapElemAttr(ctypes.Structure):
    _fields_ = [
        ("map_fd", ctypes.c_uint32),
        ("key", ctypes.c_uint64),
        ("value", ctypes.c_uint64),  # also next_key
        ("flags", ctypes.c_uint64),
    ]


class _ProgLoadAttr(ctypes.Structure):
    _fields_ = [
        ("prog_type", ctypes.c_uint32),
        ("insn_cnt", ctypes.c_uint32),
        ("insns", ctypes.c_uint64),
        ("license", ctypes.c_uint64),
        ("log_level", ctypes.c_uint32),
        ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_uint64),
        ("kern_version", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32),
        ("prog_name", ctypes.c_char * 16),
        ("prog_ifindex", ctypes.c_uint32),
        ("expected_attach_type", ctypes.c_uint32),
        ("prog_btf_fd", ctypes.c_uint32),
        ("func_info_rec_size", ctypes.c_uint32),
        ("func_info", ctypes.c_uint64),
        ("func_info_cnt", ctypes.c_uint32),
        ("line_info_rec_size", ctypes.c_uint32),
        ("line_info", ctypes.c_uint64),
        ("line_info_cnt", ctypes.c_uint32),
        ("attach_btf_id", ctypes.c_uint32),
        ("attach_prog_fd", ctypes.c_uint32),
        ("core_relo_cnt", ctypes.c_uint32),
        ("fd_array", ctypes.c_uint64),
        ("core_relos", ctypes.c_uint64),
        ("core_relo_rec_size", ctypes.c_uint32),
    ]


class _ObjAttr(ctypes.Structure):
    _fields_ = [
        ("pathname", ctypes.c_uint64),
        ("bpf_fd", ctypes.c_uint32),
        ("file_flags", ctypes.c_uint32),
    ]


class _TestRunAttr(ctypes.Structure):
    _fields_ = [
        ("prog_fd", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("data_in", ctypes.c_uint64),
        ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32),
        ("duration", ctypes.c_uint32),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_uint64),
        ("ctx_out", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


_libc: ctypes.CDLL | None = None


def _sys_bpf(cmd: int, attr: ctypes.Structure) -> tuple[int, int]:
    """``syscall(__NR_bpf, cmd, &attr, sizeof attr)`` -> (result, errno); result -1 on error."""
    global _libc
    nr = _SYSCALL_NR.get(platform.machine())
    if nr is None or not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return -1, errno.ENOSYS
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
    ret = _libc.syscall(
        ctypes.c_long(nr),
        ctypes.c_long(cmd),
        ctypes.c_void_p(ctypes.addressof(attr)),
        ctypes.c_uint(ctypes.sizeof(attr)),
    )
    return int(ret), ctypes.get_errno() if ret < 0 else 0


def _errname(err: int) -> str:
    if err == ENOTSUPP:
        return "ENOTSUPP"
    return errno.errorcode.get(err, f"errno {err}")


def _fail(what: str, err: int, log: str = "", hint: str = "") -> KernelError:
    msg = f"{what}: {_errname(err)} ({os.strerror(err) if err != ENOTSUPP else 'not supported'})"
    if hint:
        msg += f"; {hint}"
    return KernelError(msg, log, err)


def _ptr(buf) -> int:
    return ctypes.addressof(buf) if buf is not None else 0


# ---------------------------------------------------------------------------------------------
# Probe

_AVAILABLE: list[str | None] = []


def available() -> str | None:
    """None when this process may load eBPF programs, else a one-line reason why not.

    The probe loads the two-instruction socket filter ``r0 = 0; exit`` (brief §3 "Kernel oracle")
    and closes it. The answer is cached for the life of the process.

    >>> reason = available()
    >>> reason is None or reason.startswith("bpf() ")
    True
    """
    if _AVAILABLE:
        return _AVAILABLE[0]
    code = isa.encode([isa.insn(0xB7, dst=0, imm=0), isa.insn(0x95)])
    insns = ctypes.create_string_buffer(code, len(code))
    lic = ctypes.create_string_buffer(b"GPL")
    attr = _ProgLoadAttr(prog_type=1, insn_cnt=2, insns=_ptr(insns), license=_ptr(lic))
    fd, err = _sys_bpf(BPF_PROG_LOAD, attr)
    if fd >= 0:
        os.close(fd)
        reason = None
    elif err == errno.EPERM:
        reason = "bpf() not permitted: EPERM (run as root with CAP_BPF)"
    elif err == errno.ENOSYS:
        reason = (
            f"bpf() not available: ENOSYS (needs Linux on one of {', '.join(_SYSCALL_NR)}; "
            f"this is {platform.system()} {platform.machine()}, or a kernel built without BPF)"
        )
    else:
        reason = f"bpf() probe failed: {_errname(err)} ({os.strerror(err)})"
    _AVAILABLE.append(reason)
    return reason


# ---------------------------------------------------------------------------------------------
# Maps


def _possible_cpus() -> int:
    """Number of possible CPUs (the stride count of per-CPU map values)."""
    try:
        with open("/sys/devices/system/cpu/possible") as f:
            text = f.read().strip()
    except OSError:
        return os.cpu_count() or 1
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


_PERCPU = {"percpu_hash", "percpu_array", "lru_percpu_hash", "percpu_cgroup_storage"}


def _is_percpu(map_type: int) -> bool:
    return 0 <= map_type < len(MAP_TYPES) and MAP_TYPES[map_type] in _PERCPU


def _obj_name(name: str) -> bytes:
    """A kernel object name: alphanumerics, '_' and '.', at most 15 bytes."""
    clean = "".join(c if c.isascii() and (c.isalnum() or c in "_.") else "_" for c in name)
    return clean[:15].encode()


def _map_create(m: BpfMap, name: str, inner_fd: int = 0, flags: int | None = None) -> int:
    mtype = MAP_TYPES[m.type] if 0 <= m.type < len(MAP_TYPES) else f"type {m.type}"
    key_size, value_size, max_entries = m.key_size, m.value_size, m.max_entries
    flags = m.map_flags if flags is None else flags
    if mtype == "perf_event_array":  # libbpf's defaults: int -> fd, one slot per CPU
        key_size, value_size = key_size or 4, value_size or 4
        max_entries = max_entries or _possible_cpus()
    attr = _MapCreateAttr(
        map_type=m.type,
        key_size=key_size,
        value_size=value_size,
        max_entries=max_entries,
        map_flags=flags,
        inner_map_fd=inner_fd,
        map_name=_obj_name(name),
    )
    fd, err = _sys_bpf(BPF_MAP_CREATE, attr)
    if fd < 0:
        hint = ""
        if mtype == "ringbuf":
            hint = "a ringbuf needs max_entries a power-of-2 multiple of the page size"
        elif mtype in ("sk_storage", "inode_storage", "task_storage", "cgrp_storage"):
            hint = f"{mtype} maps need BTF for their value type, which this loader does not pass"
        elif err == errno.EINVAL:
            hint = "the kernel rejected the map's type, sizes or flags"
        raise _fail(
            f"creating map {name!r} ({mtype}, key {key_size} B, value {value_size} B, "
            f"{max_entries} entries, flags {flags:#x})",
            err,
            hint=hint,
        )
    return fd


def _create_map(m: BpfMap) -> int:
    """BPF_MAP_CREATE for an object map; a map-in-map first gets a template inner map."""
    mtype = m.type_name
    if mtype in ("array_of_maps", "hash_of_maps"):
        if m.inner is None:
            raise KernelError(
                f"map {m.name!r} is a {mtype} without an inner map definition "
                "(declare it with __array(values, struct {...})); cannot create it"
            )
        inner_fd = _map_create(m.inner, m.inner.name)
        try:
            return _map_create(m, m.name, inner_fd=inner_fd)
        finally:
            os.close(inner_fd)
    if mtype == "struct_ops":
        raise KernelError(
            f"map {m.name!r} is a struct_ops map, which needs kernel BTF; unsupported"
        )
    return _map_create(m, m.name)


def _elem(fd: int, cmd: int, key: bytes | None, value_buf, flags: int = 0) -> int:
    kbuf = ctypes.create_string_buffer(key, len(key)) if key else None
    attr = _MapElemAttr(map_fd=fd, key=_ptr(kbuf), value=_ptr(value_buf), flags=flags)
    ret, err = _sys_bpf(cmd, attr)
    return 0 if ret >= 0 else err


# ---------------------------------------------------------------------------------------------
# Programs


@dataclass
class LoadedProgram:
    """A program loaded into the kernel, with the maps it uses; close it (or use ``with``).

    ``maps`` maps each map name to its fd, including one ARRAY map per global data section,
    named after the section (``.rodata``, ``.bss``, ...); ``log`` is the verifier log of the load
    (empty when loaded with ``log_level=0``). ``map_specs`` keeps each map's definition, for
    sizing lookups.
    """

    fd: int
    section: str
    type: str
    maps: dict[str, int]
    log: str
    map_specs: dict[str, BpfMap] = field(default_factory=dict, repr=False)

    def close(self) -> None:
        """Close the program fd and every map fd (safe to call twice)."""
        fds = [self.fd, *self.maps.values()]
        self.fd, self.maps = -1, {}
        for fd in fds:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def __enter__(self) -> LoadedProgram:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _spec(self, name: str) -> tuple[int, BpfMap]:
        if name not in self.maps:
            raise KeyError(f"no map {name!r} in this program; it has {sorted(self.maps)}")
        return self.maps[name], self.map_specs[name]

    def map_update(self, name: str, key: bytes, value: bytes) -> None:
        """Set ``key`` to ``value`` in map ``name`` (``BPF_MAP_UPDATE_ELEM``, flag ``BPF_ANY``).

        For a per-CPU map, ``value`` is either one value (written to every CPU) or the
        concatenation of one value per possible CPU. A key or value of the wrong size raises
        :class:`KernelError` before any syscall (the kernel would read past the buffer).
        """
        fd, spec = self._spec(name)
        if len(key) != spec.key_size or (
            not _is_percpu(spec.type) and len(value) != spec.value_size
        ):
            raise KernelError(
                f"map {name!r} has {spec.key_size}-byte keys and {spec.value_size}-byte values; "
                f"got a {len(key)}-byte key and a {len(value)}-byte value"
            )
        if _is_percpu(spec.type):
            raw = _percpu_value(spec, value)
            vbuf = ctypes.create_string_buffer(raw, len(raw))
        else:
            vbuf = ctypes.create_string_buffer(value, max(len(value), 1))
        err = _elem(fd, BPF_MAP_UPDATE_ELEM, key, vbuf)
        if err:
            raise _fail(
                f"updating map {name!r} (key {key.hex()}, {len(value)}-byte value)",
                err,
                hint=f"the map has {spec.key_size}-byte keys and {spec.value_size}-byte values",
            )

    def map_items(self, name: str) -> dict[bytes, bytes]:
        """Every (key, value) of map ``name``, by ``BPF_MAP_GET_NEXT_KEY`` and lookups.

        For a per-CPU map the value is the concatenation of the value on each possible CPU, in
        CPU order (``value_size`` bytes each, the kernel's 8-byte padding removed).
        """
        fd, spec = self._spec(name)
        percpu = _is_percpu(spec.type)
        stride = (spec.value_size + 7) // 8 * 8
        ncpu = _possible_cpus() if percpu else 1
        vbuf = ctypes.create_string_buffer(max(stride * ncpu if percpu else spec.value_size, 1))
        nbuf = ctypes.create_string_buffer(max(spec.key_size, 1))
        out: dict[bytes, bytes] = {}
        key: bytes | None = None
        while True:
            err = _elem(fd, BPF_MAP_GET_NEXT_KEY, key, nbuf)
            if err == errno.ENOENT:
                return out
            if err:
                raise _fail(f"iterating map {name!r}", err)
            key = nbuf.raw[: spec.key_size]
            err = _elem(fd, BPF_MAP_LOOKUP_ELEM, key, vbuf)
            if err == errno.ENOENT:  # deleted meanwhile
                continue
            if err:
                raise _fail(f"looking up key {key.hex()} in map {name!r}", err)
            raw = vbuf.raw
            if percpu:
                out[key] = b"".join(
                    raw[i * stride : i * stride + spec.value_size] for i in range(ncpu)
                )
            else:
                out[key] = raw[: spec.value_size]

    def pin(self, path: str | os.PathLike) -> None:
        """Pin the program at ``path`` on a bpffs mount (``BPF_OBJ_PIN``), so it outlives us."""
        raw = os.fsencode(path)
        pbuf = ctypes.create_string_buffer(raw)
        attr = _ObjAttr(pathname=_ptr(pbuf), bpf_fd=self.fd)
        ret, err = _sys_bpf(BPF_OBJ_PIN, attr)
        if ret < 0:
            hint = "the path must be new and on a bpffs mount (mount -t bpf bpf /sys/fs/bpf)"
            raise _fail(f"pinning program {self.section!r} at {os.fsdecode(raw)}", err, hint=hint)


def _percpu_value(spec: BpfMap, value: bytes) -> bytes:
    if not _is_percpu(spec.type):
        return value
    ncpu, stride = _possible_cpus(), (spec.value_size + 7) // 8 * 8
    if len(value) == spec.value_size:
        parts = [value] * ncpu
    elif len(value) == spec.value_size * ncpu:
        parts = [value[i * spec.value_size : (i + 1) * spec.value_size] for i in range(ncpu)]
    else:
        raise KernelError(
            f"map {spec.name!r} is per-CPU: give one {spec.value_size}-byte value or "
            f"{ncpu} of them concatenated ({spec.value_size * ncpu} bytes), not {len(value)}"
        )
    return b"".join(p.ljust(stride, b"\0") for p in parts)


def _attach_type(section: str) -> int | None:
    for prefix, value in _ATTACH_TYPES:
        if section == prefix or section.startswith(prefix + "/"):
            return value
    return None


def _kernel_version() -> int:
    """LINUX_VERSION_CODE of the running kernel (only pre-5.0 kernels check it for kprobes)."""
    nums = []
    for part in os.uname().release.split("-")[0].split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        nums.append(int(digits or 0))
    a, b, c = (nums + [0, 0, 0])[:3]
    return (a << 16) | (b << 8) | min(c, 255)


def load(
    obj: BpfObject,
    section: str,
    *,
    maps: dict[str, dict[bytes, bytes]] | None = None,
    data: dict[str, bytes] | None = None,
    log_level: int = 1,
) -> LoadedProgram:
    """Load program ``section`` of ``obj`` into the kernel with ``BPF_PROG_LOAD``.

    The broker's load step of KrakenGuard (brief §2.4 item 7): the program is linked with its
    bpf-to-bpf callees (:func:`datahall.ebpf.engine.link`); each map it refers to is created
    (pinning is ignored: the maps are always fresh) and filled from ``maps``; each global data
    section it refers to becomes a one-entry ARRAY map holding ``data[section]`` if given, else
    the object's initial bytes (``.rodata*`` maps are read-only to the program and frozen after
    filling, so the verifier knows their constants); then the ``lddw`` slots are patched to
    ``BPF_PSEUDO_MAP_FD`` / ``BPF_PSEUDO_MAP_VALUE`` and the program is loaded with its type,
    expected attach type, license and kernel version.

    Parameters
    ----------
    obj : BpfObject
        A parsed object (:func:`datahall.ebpf.loader.load`).
    section : str
        The program section, e.g. ``"xdp"``.
    maps : dict, optional
        ``{map name: {key bytes: value bytes}}`` entries written before the load. A map named
        here is created even when the program does not refer to it.
    data : dict, optional
        ``{data section: bytes}`` replacing a section's initial bytes (same length), e.g. to
        set a ``const volatile`` knob in ``.rodata``. A section named here gets its map even
        when the program does not refer to it.
    log_level : int
        Verifier log level (0 none, 1 basic, 2 every instruction); the log grows until it fits.
        With 0, a rejected load is retried at level 1 to get the verifier's reason.

    Returns
    -------
    LoadedProgram
        Owns the program and map fds; close it when done.

    Raises
    ------
    KernelError
        The verifier rejected the program (``.log`` says why), a map could not be created or
        filled, or the program needs something this layer does not provide (BTF, kfuncs,
        externs, an attach BTF id). Every fd opened so far is closed first.
    KeyError
        ``section`` is not a program of ``obj``, or ``maps``/``data`` names something unknown.
    ValueError
        ``data[section]`` is not as long as the section.
    """
    if section not in obj.programs:
        raise KeyError(f"no program section {section!r}; this object has {sorted(obj.programs)}")
    prog = obj.programs[section]
    if prog.type not in PROG_TYPES or prog.type == "unspec":
        raise KernelError(
            f"section {section!r} has program type {prog.type!r}, which cannot be loaded on its "
            f"own (known types: {', '.join(PROG_TYPES[1:])})"
        )
    if prog.type in _NEEDS_ATTACH_BTF:
        raise KernelError(
            f"section {section!r} is a {prog.type} program, which needs the BTF id of its attach "
            f"target ({prog.attach_to or '?'}) in the kernel's BTF; this loader does not resolve it"
        )
    maps = maps or {}
    data = data or {}
    for name in maps:
        if name not in obj.maps:
            known = sorted(obj.maps)
            raise KeyError(f"maps= names {name!r}, which is not a map of this object: {known}")
    for sec, raw in data.items():
        if sec not in obj.data:
            known = sorted(obj.data)
            raise KeyError(f"data= names {sec!r}, not a data section of this object: {known}")
        if len(raw) != len(obj.data[sec]):
            raise ValueError(
                f"data[{sec!r}] is {len(raw)} bytes; the section is {len(obj.data[sec])} bytes"
            )

    insns, info = link(obj, section)
    for rel in info.values():
        if rel[0] == "extern":
            raise KernelError(
                f"section {section!r} refers to the extern symbol {rel[1]!r} (a kfunc, __ksym or "
                "__kconfig), which needs BTF resolution; this loader does not support externs"
            )

    fds: dict[str, int] = {}
    specs: dict[str, BpfMap] = {}
    try:
        wanted_maps = [n for n in obj.maps if n in maps or ("map", n) in info.values()]
        for name in wanted_maps:
            fds[name] = _create_map(obj.maps[name])
            specs[name] = obj.maps[name]
        wanted_data = sorted({r[1] for r in info.values() if r[0] == "global"} | set(data))
        for sec in wanted_data:
            raw = data.get(sec, obj.data[sec])
            rdonly = sec == ".rodata" or sec.startswith(".rodata.")
            spec = BpfMap(sec, MAP_TYPES.index("array"), 4, max(len(raw), 1), 1)
            fds[sec] = _map_create(spec, sec, flags=BPF_F_RDONLY_PROG if rdonly else 0)
            specs[sec] = spec
            vbuf = ctypes.create_string_buffer(raw, max(len(raw), 1))
            err = _elem(fds[sec], BPF_MAP_UPDATE_ELEM, bytes(4), vbuf)
            if err:
                raise _fail(f"initialising global data map {sec!r}", err)
            if rdonly:
                ret, err = _sys_bpf(BPF_MAP_FREEZE, _MapElemAttr(map_fd=fds[sec]))
                if ret < 0:
                    raise _fail(f"freezing read-only data map {sec!r}", err)
        for name, entries in maps.items():
            tmp = LoadedProgram(-1, section, prog.type, fds, "", specs)
            for key, value in entries.items():
                tmp.map_update(name, key, value)

        code = isa.encode(_relocate(insns, info, fds))
        prog_fd, log = _prog_load(obj, prog, code, log_level)
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    return LoadedProgram(prog_fd, section, prog.type, fds, log, specs)


def _relocate(
    insns: list[isa.Instruction], info: dict[int, tuple], fds: dict[str, int]
) -> list[isa.Instruction]:
    out = []
    slot = 0
    for ins in insns:
        rel = info.get(slot)
        if rel is not None and ins.opcode == isa.LDDW:
            if rel[0] == "map":
                ins = dataclasses.replace(ins, src=BPF_PSEUDO_MAP_FD, imm=fds[rel[1]], next_imm=0)
            elif rel[0] == "global":
                ins = dataclasses.replace(
                    ins, src=BPF_PSEUDO_MAP_VALUE, imm=fds[rel[1]], next_imm=rel[2]
                )
            elif rel[0] == "call":  # address of a callback (bpf_loop): pc-relative like a call
                rel_imm = rel[1] - slot - 1
                ins = dataclasses.replace(ins, src=BPF_PSEUDO_FUNC, imm=rel_imm, next_imm=0)
        out.append(ins)
        slot += ins.size
    return out


def _prog_load(obj: BpfObject, prog, code: bytes, log_level: int) -> tuple[int, str]:
    insns = ctypes.create_string_buffer(code, len(code))
    lic = ctypes.create_string_buffer((obj.license or "").encode())
    attach = _attach_type(prog.section)
    prog_flags = BPF_F_XDP_HAS_FRAGS if prog.section.startswith("xdp.frags") else 0
    level, size = log_level, _LOG_START
    while True:
        log = ctypes.create_string_buffer(size) if level else None
        attr = _ProgLoadAttr(
            prog_type=PROG_TYPES.index(prog.type),
            insn_cnt=len(code) // 8,
            insns=_ptr(insns),
            license=_ptr(lic),
            log_level=level,
            log_size=size if level else 0,
            log_buf=_ptr(log),
            kern_version=obj.kernel_version or _kernel_version(),
            prog_flags=prog_flags,
            prog_name=_obj_name(prog.name),
            expected_attach_type=attach or 0,
        )
        fd, err = _sys_bpf(BPF_PROG_LOAD, attr)
        text = log.value.decode("utf-8", "replace") if log is not None else ""
        if fd >= 0:
            return fd, text
        if err == errno.ENOSPC and level and size < 1 << 28:
            size <<= 2  # the log did not fit: retry with a bigger buffer
            continue
        if level == 0 and err in (errno.EACCES, errno.EINVAL):
            level = 1  # rejected: load again with a log to learn why
            continue
        what = f"loading {prog.type} program {prog.name!r} (section {prog.section!r})"
        reason = _complaint(text)
        if reason and "btf" in reason.lower():
            hint = (
                f"the verifier rejected it: {reason} (this loader passes no BTF; bpf_loop and "
                "timer callbacks, kfuncs and BTF-typed arguments need it)"
            )
        elif reason:
            hint = f"the verifier rejected it: {reason}"
        elif err == errno.EPERM:
            hint = "not permitted (needs CAP_BPF, and CAP_PERFMON/CAP_SYS_ADMIN for tracing)"
        elif err == errno.EINVAL:
            hint = "the kernel found the program or its load attributes invalid"
        else:
            hint = "the verifier rejected it" if err == errno.EACCES else ""
        raise _fail(what, err, text, hint)


def _complaint(log: str) -> str:
    """The verifier's reason for a rejection: the last log line that is not a statistic."""
    for line in reversed(log.splitlines()):
        line = line.strip()
        if line and not line.startswith(("processed ", "verification time", "stack depth")):
            return line
    return ""


# ---------------------------------------------------------------------------------------------
# Test runs


@dataclass
class RunResult:
    """The outcome of ``BPF_PROG_TEST_RUN``: return value (signed 32-bit, so ``TC_ACT_UNSPEC``
    reads -1), the packet as the program left it, and the kernel's mean run time in ns."""

    retval: int
    data_out: bytes
    duration_ns: int


def test_run(
    prog: LoadedProgram, packet: bytes, *, ctx: bytes | None = None, repeat: int = 1
) -> RunResult:
    """Run ``prog`` once (or ``repeat`` times) on ``packet`` in the kernel (``BPF_PROG_TEST_RUN``).

    The concrete oracle for counterexample replay (brief §3 "Kernel oracle"): a packet the
    symbolic engine produced is fed to the real program and its verdict and output compared.
    Program types with test runs include xdp, sched_cls/sched_act, socket_filter, cgroup_skb,
    lwt_*, flow_dissector, sk_lookup, raw_tracepoint and syscall (the latter two on ``ctx``
    only). Map side effects stay in the program's maps.

    Parameters
    ----------
    prog : LoadedProgram
    packet : bytes
        The packet, from its Ethernet header (XDP and TC need at least 14 bytes).
    ctx : bytes, optional
        The context struct (``struct xdp_md``, ``struct __sk_buff``) to run with.
    repeat : int
        Runs to average ``duration_ns`` over.

    Raises
    ------
    KernelError
        The program type has no test runs (kprobe, tracepoint: ``ENOTSUPP``), or the kernel
        refused the input (packet too short or too long for the type, bad ``ctx``).

    Examples
    --------
    >>> from datahall.ebpf import isa
    >>> from datahall.ebpf.engine import program_object
    >>> if available() is not None:
    ...     import pytest; pytest.skip(available())
    >>> obj = program_object([isa.insn(0xB7, dst=0, imm=1), isa.insn(0x95)])  # XDP_DROP
    >>> with load(obj, "xdp") as p:
    ...     r = test_run(p, bytes(range(60)))
    >>> r.retval, r.data_out == bytes(range(60))
    (1, True)
    """
    if prog.fd < 0:
        raise KernelError(f"program {prog.section!r} is closed")
    data_in = ctypes.create_string_buffer(packet, len(packet)) if packet else None
    ctx_in = ctypes.create_string_buffer(ctx, len(ctx)) if ctx else None
    ctx_out = ctypes.create_string_buffer(len(ctx)) if ctx else None
    size = len(packet) + 4096  # XDP may grow the packet (bpf_xdp_adjust_head/tail)
    while True:
        data_out = ctypes.create_string_buffer(size) if packet else None
        attr = _TestRunAttr(
            prog_fd=prog.fd,
            data_size_in=len(packet),
            data_size_out=size if packet else 0,
            data_in=_ptr(data_in),
            data_out=_ptr(data_out),
            repeat=repeat,
            ctx_size_in=len(ctx) if ctx else 0,
            ctx_size_out=len(ctx) if ctx else 0,
            ctx_in=_ptr(ctx_in),
            ctx_out=_ptr(ctx_out),
        )
        ret, err = _sys_bpf(BPF_PROG_TEST_RUN, attr)
        if ret >= 0:
            break
        if err == errno.ENOSPC and attr.data_size_out > size:
            size = attr.data_size_out  # the kernel says how much it needed
            continue
        hint = ""
        if err in (ENOTSUPP, errno.EOPNOTSUPP):
            hint = f"{prog.type} programs have no BPF_PROG_TEST_RUN; replay needs a live attach"
        elif err == errno.EINVAL:
            hint = (
                f"the kernel refused the {len(packet)}-byte input for a {prog.type} program "
                "(too short or too long, or a ctx it does not accept)"
            )
        raise _fail(f"test run of {prog.type} program {prog.section!r}", err, hint=hint)
    retval = attr.retval - (1 << 32) if attr.retval >> 31 else attr.retval
    out = data_out.raw[: attr.data_size_out] if data_out is not None else b""
    return RunResult(retval, out, attr.duration)


test_run.__test__ = False  # not a pytest test, though its name starts with "test"
