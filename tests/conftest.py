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


class RedisServer:
    """A throw-away redis-server on 127.0.0.1 (no persistence), which a test may stop and
    start again on the same port to play an outage; the shared tiers of kvshare's prefix
    cache and the gateway's response cache are tested against it."""

    def __init__(self, binary, port, workdir):
        self.binary, self.port, self.workdir = binary, port, workdir
        self.url = f"redis://127.0.0.1:{port}/0"
        self.proc = None

    def start(self):
        import socket
        import subprocess
        import time

        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "no", "--dir", str(self.workdir), "--daemonize", "no"]
        log = open(self.workdir / "redis.log", "ab")  # noqa: SIM115 -- owned by the process
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.skip(
                    f"redis-server exited at start: {(self.workdir / 'redis.log').read_text()}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        self.stop()
        pytest.skip("redis-server did not answer PING within 10 s")

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except Exception:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


@pytest.fixture
def redis_server(tmp_path):
    """A fresh redis-server for one test (`make test` installs the Debian package)."""
    import shutil
    import socket

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed; run: sudo apt-get install redis-server")
    pytest.importorskip("redis")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = RedisServer(binary, port, tmp_path)
    server.start()
    yield server
    server.stop()
