"""Fixture eBPF programs: our own C sources, compiled with clang into a cache.

The sources live in ``datahall/ebpf/programs/`` (package data). Each is a small, realistic
program of the kind KrakenGuard (NSDI '26) checks at load time: an XDP firewall, a per-flow
counter, a Retina-like ring-buffer observer, a TTL rewriter, an L4 load balancer, a malicious
kprobe, and two XDP tenants that interfere with each other.

``build`` compiles with ``clang -O2 -g -target bpf -c`` against libbpf's headers into a folder
keyed by a hash of the sources, the clang version and the flags, so each fixture is compiled once
per machine (under ``$DATAHALL_CACHE`` if set, else ``~/.cache/datahall/ebpf``).

Examples
--------
>>> sorted(FIXTURES)[:3]
['firewall', 'flow_counter', 'interfere_a']
>>> "SEC(\\"xdp\\")" in FIXTURES["firewall"].read_text()
True
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = [
    "FIXTURES",
    "PROGRAMS_DIR",
    "BuildError",
    "build",
    "clang_path",
    "libxdp_objects",
    "llvm_objdump",
    "objdump_path",
]

PROGRAMS_DIR = Path(__file__).with_name("programs")

FIXTURES: dict[str, Path] = {p.stem: p for p in sorted(PROGRAMS_DIR.glob("*.c"))}
"""Fixture name -> path of its C source (``firewall`` -> ``programs/firewall.c``)."""

CFLAGS = ("-O2", "-g", "-target", "bpf", "-Wall", "-Wno-unused-function")

LIBXDP_DIRS = (Path("/usr/lib/x86_64-linux-gnu/bpf"), Path("/usr/lib/aarch64-linux-gnu/bpf"))


class BuildError(RuntimeError):
    """A fixture could not be compiled (clang missing, or a compile error)."""


def clang_path() -> str | None:
    """The clang to use: ``$CLANG`` if set, else ``clang``, else ``clang-14``; None if absent.

    >>> clang_path() is None or Path(clang_path()).name.startswith("clang")
    True
    """
    env = os.environ.get("CLANG")
    if env:
        return shutil.which(env)
    for name in ("clang", "clang-14", "clang-16", "clang-19"):
        found = shutil.which(name)
        if found:
            return found
    return None


def cache_dir() -> Path:
    """The folder compiled fixtures go to: ``$DATAHALL_CACHE/ebpf`` or ``~/.cache/datahall/ebpf``."""
    root = os.environ.get("DATAHALL_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "datahall"
    return base / "ebpf"


def _include_flags() -> list[str]:
    flags = ["-I", str(PROGRAMS_DIR)]
    # -target bpf does not search the multiarch folder that holds <asm/types.h>.
    multiarch = Path("/usr/include") / f"{platform.machine()}-linux-gnu"
    if multiarch.is_dir():
        flags += ["-I", str(multiarch)]
    return flags


def _clang_version(clang: str) -> str:
    out = subprocess.run([clang, "--version"], capture_output=True, text=True, check=False)
    return out.stdout.splitlines()[0] if out.stdout else clang


def _key(name: str, clang: str) -> str:
    digest = hashlib.sha256()
    for src in [FIXTURES[name], *sorted(PROGRAMS_DIR.glob("*.h"))]:
        digest.update(src.name.encode() + b"\0" + src.read_bytes() + b"\0")
    digest.update(_clang_version(clang).encode())
    digest.update(" ".join(CFLAGS).encode())
    return digest.hexdigest()[:16]


def build(name: str | None = None, out_dir: str | Path | None = None) -> Path | dict[str, Path]:
    """Compile fixture ``name`` (or every fixture when None) and return the object path(s).

    Parameters
    ----------
    name : str or None
        A key of ``FIXTURES``; None builds all and returns ``{name: path}``.
    out_dir : path or None
        Where the ``.o`` files go; default ``cache_dir()``. An object already there for the same
        sources, clang and flags is reused.

    Raises
    ------
    BuildError
        clang is not installed, or the source does not compile (clang's message is included).

    Examples
    --------
    >>> if clang_path() is None:
    ...     import pytest; pytest.skip("clang is not installed")
    >>> build("rewriter").suffix
    '.o'
    """
    if name is None:
        return {n: build(n, out_dir) for n in FIXTURES}
    if name not in FIXTURES:
        raise KeyError(f"unknown eBPF fixture {name!r}; known: {', '.join(FIXTURES)}")
    clang = clang_path()
    if clang is None:
        raise BuildError(
            "clang is needed to compile the eBPF fixtures but was not found; "
            "install it with `apt-get install clang libbpf-dev` (or set $CLANG)"
        )
    out = Path(out_dir) if out_dir is not None else cache_dir()
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{name}-{_key(name, clang)}.o"
    if target.exists():
        return target
    with tempfile.NamedTemporaryFile(dir=out, suffix=".o.tmp", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    cmd = [clang, *CFLAGS, *_include_flags(), "-c", str(FIXTURES[name]), "-o", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tmp_path.unlink(missing_ok=True)
        hint = ""
        if "bpf/bpf_helpers.h" in proc.stderr:
            hint = " (libbpf headers missing: `apt-get install libbpf-dev`)"
        raise BuildError(f"clang failed on {FIXTURES[name].name}{hint}:\n{proc.stderr.strip()}")
    tmp_path.replace(target)
    return target


def libxdp_objects() -> list[Path]:
    """The precompiled XDP objects shipped by Debian's ``libxdp1`` (empty if not installed).

    >>> all(p.suffix == ".o" for p in libxdp_objects())
    True
    """
    found: list[Path] = []
    for folder in LIBXDP_DIRS:
        if folder.is_dir():
            found += sorted(folder.glob("*.o"))
    return found


def objdump_path() -> str | None:
    """``llvm-objdump`` (preferring version 14, which the tests pin), or None if absent."""
    return shutil.which("llvm-objdump-14") or shutil.which("llvm-objdump")


_LINE = re.compile(r"^\s*(\d+):\s+(.*?)\s*$")
_SECTION = re.compile(r"^Disassembly of section (.*):$")


def normalise(text: str) -> str:
    """An instruction's text with spacing normalised, as :func:`llvm_objdump` gives it."""
    return " ".join(text.replace(",", ", ").split()).replace(" ,", ",")


def llvm_objdump(path: Path) -> dict[str, dict[int, str]]:
    """llvm-objdump's text of `path` per section and slot, jump labels stripped and spacing
    normalised: the reference our disassembler is checked against."""
    tool = objdump_path()
    if tool is None:
        raise BuildError("llvm-objdump is not installed (apt-get install llvm)")
    out = subprocess.run(
        [tool, "-d", "--no-show-raw-insn", str(path)], check=True, capture_output=True, text=True
    ).stdout
    sections: dict[str, dict[int, str]] = {}
    cur: dict[int, str] | None = None
    for line in out.splitlines():
        if m := _SECTION.match(line):
            cur = sections.setdefault(m.group(1), {})
        elif cur is not None and (m := _LINE.match(line)):
            cur[int(m.group(1))] = normalise(re.sub(r"\s+<[^<>]*>$", "", m.group(2)))
    return sections
