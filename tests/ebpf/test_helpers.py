"""The helper table against the brief's UAPI oracle (Linux 6.1 header) and the header itself."""

from pathlib import Path

import pytest

from datahall.ebpf.helpers import HELPERS, by_name, parse_uapi

# brief §3, derived from the linux-libc-dev 6.1 header
ORACLE = {
    "map_lookup_elem": 1, "map_update_elem": 2, "map_delete_elem": 3, "probe_read": 4,
    "ktime_get_ns": 5, "trace_printk": 6, "get_prandom_u32": 7, "skb_store_bytes": 9,
    "tail_call": 12, "get_current_pid_tgid": 14, "redirect": 23, "perf_event_output": 25,
    "csum_diff": 28, "probe_write_user": 36, "xdp_adjust_head": 44, "redirect_map": 51,
    "override_return": 58, "xdp_adjust_tail": 65, "probe_read_user": 112,
    "probe_read_kernel": 113, "ringbuf_output": 130, "ringbuf_reserve": 131,
    "ringbuf_submit": 132, "loop": 181,
}  # fmt: skip


@pytest.mark.parametrize(("name", "helper_id"), sorted(ORACLE.items()))
def test_ids_match_the_uapi_oracle(name, helper_id):
    assert by_name(name).id == helper_id == by_name(f"bpf_{name}").id
    assert HELPERS[helper_id].name == name


def test_the_table_spans_the_6_1_header():
    assert len(HELPERS) == 210 and HELPERS[0].name == "unspec"
    assert HELPERS[209].name == "user_ringbuf_drain"
    assert all(h.prototype.startswith(("long", "u64", "void", "int", "s64", "u32", "struct", "s32"))
               for h in HELPERS if h.id)  # fmt: skip
    with pytest.raises(KeyError, match="unknown helper id 210"):
        HELPERS[210]
    with pytest.raises(KeyError, match="unknown helper 'nosuch'"):
        by_name("nosuch")


HEADER = Path("/usr/include/linux/bpf.h")


@pytest.mark.skipif(not HEADER.exists(), reason="no linux/bpf.h (apt-get install linux-libc-dev)")
def test_the_shipped_table_is_the_installed_header():
    parsed = parse_uapi(HEADER.read_text())
    assert [(h.id, h.name) for h in parsed][: len(HELPERS)] == [(h.id, h.name) for h in HELPERS]


def test_a_file_that_is_not_the_header():
    with pytest.raises(ValueError, match="no __BPF_FUNC_MAPPER"):
        parse_uapi("int main(void) { return 0; }")
