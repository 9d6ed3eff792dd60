import os

import pytest

from datahall.ebpf import fixtures

EXPECTED = {
    "firewall",
    "flow_counter",
    "retina_observer",
    "rewriter",
    "l4lb",
    "malicious",
    "interfere_a",
    "interfere_b",
}


def test_fixture_sources_are_package_data():
    assert set(fixtures.FIXTURES) == EXPECTED
    for path in fixtures.FIXTURES.values():
        src = path.read_text()
        assert 'SEC("license")' in src
        assert path.parent == fixtures.PROGRAMS_DIR
    assert (fixtures.PROGRAMS_DIR / "common.h").is_file()


def test_every_fixture_compiles(fixture_objects):
    assert set(fixture_objects) == EXPECTED
    for path in fixture_objects.values():
        assert path.is_file() and path.read_bytes()[:4] == b"\x7fELF"


def test_build_is_cached_by_source_hash(tmp_path, monkeypatch):
    if fixtures.clang_path() is None:
        pytest.skip("clang is not installed")
    monkeypatch.setenv("DATAHALL_CACHE", str(tmp_path))
    first = fixtures.build("rewriter")
    assert first.parent == tmp_path / "ebpf"
    mtime = first.stat().st_mtime_ns
    assert fixtures.build("rewriter") == first
    assert first.stat().st_mtime_ns == mtime
    other = fixtures.build("rewriter", out_dir=tmp_path / "elsewhere")
    assert other.parent == tmp_path / "elsewhere"
    assert other.name == first.name


def test_unknown_fixture_and_missing_clang(monkeypatch, tmp_path):
    with pytest.raises(KeyError, match="unknown eBPF fixture"):
        fixtures.build("nope")
    monkeypatch.setenv("CLANG", "definitely-not-a-clang")
    with pytest.raises(fixtures.BuildError, match="apt-get install clang libbpf-dev"):
        fixtures.build("rewriter", out_dir=tmp_path)


def test_libxdp_objects_listed():
    objs = fixtures.libxdp_objects()
    if not any(d.is_dir() for d in fixtures.LIBXDP_DIRS):
        assert objs == []
    for p in objs:
        assert p.suffix == ".o" and os.path.isfile(p)
