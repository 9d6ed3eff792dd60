import pytest

from datahall.cli import main


@pytest.fixture
def cli(capsys):
    """Run `datahall ARGS...` in-process; return (exit code, stdout, stderr)."""

    def run(*args):
        with pytest.raises(SystemExit) as exc:
            main([*args])
            raise SystemExit(0)
        out, err = capsys.readouterr()
        return exc.value.code or 0, out, err

    return run
