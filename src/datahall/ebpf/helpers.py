"""The eBPF helper functions by id, generated from the kernel's UAPI header ``linux/bpf.h``.

A ``call`` instruction names its helper by the position of the helper in the header's
``__BPF_FUNC_MAPPER`` list (``BPF_FUNC_map_lookup_elem`` is 1). The table ships as
``data/helpers.json``, generated from Debian's ``linux-libc-dev`` header (Linux 6.1: 210 ids, 0 to
209) by ``python -m datahall.ebpf.helpers /usr/include/linux/bpf.h``; the header's documentation
comment also gives each helper's C prototype, kept beside its name.

>>> HELPERS[1].name, HELPERS[36].name, by_name("ringbuf_output").id
('map_lookup_elem', 'probe_write_user', 130)
>>> HELPERS[1].prototype
'void *bpf_map_lookup_elem(struct bpf_map *map, const void *key)'
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

__all__ = ["Helper", "HELPERS", "by_name", "parse_uapi"]

DATA = Path(__file__).with_name("data") / "helpers.json"

_MAPPER = re.compile(r"#define __BPF_FUNC_MAPPER\(FN\)(.*?)/\* \*/", re.S)
_FN = re.compile(r"FN\((\w+)")
_PROTO = re.compile(r"^ \* ((?:\w[\w\s]*?[\s*]+)bpf_(\w+)\(.*\))\s*$", re.M)


@dataclass(frozen=True)
class Helper:
    """One helper: its id in ``call imm``, its name without ``bpf_``, its C prototype."""

    id: int
    name: str
    prototype: str = ""


def parse_uapi(text: str) -> list[Helper]:
    """The helpers of a ``linux/bpf.h`` text, in id order.

    >>> hs = parse_uapi('''
    ...  * long bpf_map_delete_elem(struct bpf_map *map, const void *key)
    ... #define __BPF_FUNC_MAPPER(FN) FN(unspec), FN(map_lookup_elem), FN(map_delete_elem), /* */''')
    >>> [(h.id, h.name) for h in hs], hs[2].prototype.split("(")[0]
    ([(0, 'unspec'), (1, 'map_lookup_elem'), (2, 'map_delete_elem')], 'long bpf_map_delete_elem')
    """
    m = _MAPPER.search(text)
    if not m:
        raise ValueError("no __BPF_FUNC_MAPPER list in this header; pass linux/bpf.h")
    protos = {name: " ".join(proto.split()) for proto, name in _PROTO.findall(text)}
    return [Helper(i, n, protos.get(n, "")) for i, n in enumerate(_FN.findall(m.group(1)))]


@cache
def _table() -> tuple[Helper, ...]:
    return tuple(Helper(**h) for h in json.loads(DATA.read_text()))


class _Helpers:
    """``HELPERS[id]`` → :class:`Helper`; ``len(HELPERS)``; iteration in id order."""

    def __getitem__(self, helper_id: int) -> Helper:
        table = _table()
        if not 0 <= helper_id < len(table):
            raise KeyError(f"unknown helper id {helper_id} (this table knows 0..{len(table) - 1})")
        return table[helper_id]

    def __len__(self) -> int:
        return len(_table())

    def __iter__(self):
        return iter(_table())


HELPERS = _Helpers()


def by_name(name: str) -> Helper:
    """The helper called `name` (with or without the ``bpf_`` prefix)."""
    name = name.removeprefix("bpf_")
    for h in _table():
        if h.name == name:
            return h
    raise KeyError(f"unknown helper {name!r}")


def main(argv: list[str]) -> int:
    """Regenerate ``data/helpers.json`` from a ``linux/bpf.h``."""
    header = Path(argv[0] if argv else "/usr/include/linux/bpf.h")
    helpers = parse_uapi(header.read_text())
    DATA.parent.mkdir(exist_ok=True)
    DATA.write_text(json.dumps([asdict(h) for h in helpers], indent=1) + "\n")
    print(f"{DATA}: {len(helpers)} helpers from {header}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
