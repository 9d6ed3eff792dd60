import pytest

from datahall.ebpf import fixtures


@pytest.fixture(scope="session")
def fixture_objects():
    """Every eBPF fixture compiled once per session (reusing the cache): {name: Path}."""
    if fixtures.clang_path() is None:
        pytest.skip("clang is not installed (apt-get install clang libbpf-dev)")
    try:
        return fixtures.build()
    except fixtures.BuildError as exc:
        pytest.skip(f"eBPF fixtures do not compile here: {exc}")


@pytest.fixture(scope="session")
def loaded(fixture_objects):
    """Every fixture loaded with datahall.ebpf.loader: {name: BpfObject}."""
    from datahall.ebpf.loader import load

    return {name: load(path) for name, path in fixture_objects.items()}
