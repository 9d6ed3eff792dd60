"""Servers of the gateway benchmarks, each in a process of its own.

A benchmark measures the gateway, not the machine's one interpreter lock: simulated backends
(:mod:`datahall.gateway.simulate`) run in one child process, the gateway (:func:`create_app`
under uvicorn) in another, and the load generator (:mod:`.loadgen`) in the benchmark's own
process. The children are started with multiprocessing's ``spawn`` (a fresh interpreter, no
inherited event loop or threads), serve on free ports of 127.0.0.1 and say their URLs over a
pipe. Over the same pipe the parent asks for a child's CPU time (``process_time``), which is
how the overhead benchmark reports the gateway's CPU per request, and tells it to stop.

``GATEWAY_BENCH_PROFILE=DIR`` makes each gateway child run under cProfile and write
``DIR/gateway-<pid>.prof`` (``python -m pstats`` reads it); the uvicorn server then runs in the
child's main thread, where the profiler sees it.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from multiprocessing.connection import Connection
from typing import Any

START_TIMEOUT_S = 60.0


def _serve_commands(
    conn: Connection, stop: threading.Event, stats: Callable[[], Any] = lambda: None
) -> None:
    """Answer the parent's messages until it says stop (or goes away)."""
    try:
        while True:
            message = conn.recv()
            if message == "cpu":
                conn.send(time.process_time())
            elif message == "stats":
                conn.send(stats())
            else:
                break
    except (EOFError, OSError):
        pass
    stop.set()


def _backends_main(conn: Connection, configs: list[dict[str, Any]]) -> None:
    """Child process: serve one simulator per config (uvicorn threads of this process)."""
    from dataclasses import asdict

    from datahall.gateway.simulate import serve_backends

    with serve_backends(configs) as backends:
        conn.send([b.url for b in backends])
        _serve_commands(conn, threading.Event(), lambda: [asdict(b.sim.stats()) for b in backends])


def _gateway_main(conn: Connection, config_yaml: str, profile_dir: str | None) -> None:
    """Child process: the gateway app under uvicorn on a free loopback port."""
    import socket

    import uvicorn

    from datahall.gateway.config import parse_config
    from datahall.gateway.server import create_app

    app = create_app(parse_config(config_yaml, source="benchmark config"))
    # IPPROTO_TCP, so that asyncio sets TCP_NODELAY (as datahall.core.http does)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", access_log=False, backlog=2048)
    )
    stop = threading.Event()

    def watch() -> None:
        _serve_commands(conn, stop)
        server.should_exit = True

    def announce() -> None:
        while not server.started and not stop.is_set():
            time.sleep(0.01)
        if server.started:
            conn.send(f"http://127.0.0.1:{sock.getsockname()[1]}")

    threading.Thread(target=announce, daemon=True).start()
    threading.Thread(target=watch, daemon=True).start()
    if profile_dir:
        import cProfile

        profiler = cProfile.Profile()
        profiler.runcall(server.run, sockets=[sock])
        os.makedirs(profile_dir, exist_ok=True)
        profiler.dump_stats(os.path.join(profile_dir, f"gateway-{os.getpid()}.prof"))
    else:
        server.run(sockets=[sock])


class Child:
    """A server process and its pipe: :attr:`urls`, :meth:`cpu_s`, :meth:`stats`."""

    def __init__(self, process: multiprocessing.process.BaseProcess, conn: Connection) -> None:
        self.process, self.conn = process, conn
        self.urls: list[str] = []

    def cpu_s(self) -> float:
        """CPU seconds the child has used so far (user + system, all its threads)."""
        self.conn.send("cpu")
        return float(self.conn.recv())

    def stats(self) -> Any:
        """The simulators' :class:`~datahall.gateway.simulate.SimStats`, as dicts."""
        self.conn.send("stats")
        return self.conn.recv()

    def stop(self) -> None:
        with contextlib.suppress(OSError, BrokenPipeError):
            self.conn.send("stop")
        self.process.join(15)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)


@contextlib.contextmanager
def _child(target: Any, args: tuple[Any, ...], what: str) -> Iterator[Child]:
    ctx = multiprocessing.get_context("spawn")
    parent, child_end = ctx.Pipe()
    process = ctx.Process(target=target, args=(child_end, *args), daemon=True)
    process.start()
    child = Child(process, parent)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not parent.poll(0.1):
            if not process.is_alive():
                raise RuntimeError(
                    f"the {what} process exited with code {process.exitcode} before serving "
                    "(its traceback is above)"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"the {what} process did not start within {START_TIMEOUT_S:g} s")
        answer = parent.recv()
        child.urls = answer if isinstance(answer, list) else [answer]
        yield child
    finally:
        child.stop()


@contextlib.contextmanager
def backends_process(configs: Sequence[Mapping[str, Any]]) -> Iterator[Child]:
    """Simulated backends (:class:`~datahall.gateway.simulate.SimConfig` fields per config)
    in one child process; ``child.urls`` are theirs, in order."""
    with _child(_backends_main, ([dict(c) for c in configs],), "backends") as child:
        yield child


@contextlib.contextmanager
def gateway_process(config_yaml: str) -> Iterator[Child]:
    """The gateway configured by `config_yaml` in a child process; ``child.urls[0]`` is its
    URL. Honours ``GATEWAY_BENCH_PROFILE`` (see the module docstring)."""
    profile_dir = os.environ.get("GATEWAY_BENCH_PROFILE") or None
    with _child(_gateway_main, (config_yaml, profile_dir), "gateway") as child:
        yield child


def gateway_yaml(
    backend_urls: Sequence[str],
    *,
    policy: str = "round-robin",
    models: Sequence[str] = ("sim-llm",),
    extra: Mapping[str, Any] | None = None,
) -> str:
    """A gateway.yaml with one pool of `backend_urls`, the routing `policy`, and `extra`
    top-level sections (merged over the defaults; the cache and transforms stay off unless
    `extra` turns them on)."""
    import yaml

    config: dict[str, Any] = {
        "backends": [
            {"name": f"sim-{i}", "url": url, "models": list(models)}
            for i, url in enumerate(backend_urls)
        ],
        "routing": {"policy": policy},
    }
    for key, value in (extra or {}).items():
        if isinstance(value, Mapping) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return yaml.safe_dump(config, sort_keys=False)
