"""HTTP plumbing the servers of datahall share: run an ASGI app on loopback in a thread (for
demos, tests and benchmarks, which drive it from the same process); stop work for a client that
went away; and the latency buckets of vLLM's ``/metrics``, which the vLLM-compatible servers
(kvshare's, the gateway's simulated backends) export."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, TypeVar

__all__ = [
    "E2E_BUCKETS",
    "ITL_BUCKETS",
    "TTFT_BUCKETS",
    "ClientDisconnected",
    "listen",
    "serve_in_thread",
    "unless_disconnected",
]

T = TypeVar("T")

# vLLM's histogram buckets (seconds), so that its dashboards' quantiles mean the same here
# fmt: off
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
# fmt: on


class ClientDisconnected(Exception):
    """The HTTP client went away before the answer was ready."""


async def unless_disconnected(
    work: Coroutine[Any, Any, T], receive: Callable[[], Awaitable[Any]]
) -> T:
    """The result of `work`, unless the client disconnects first: then `work` is cancelled
    and :class:`ClientDisconnected` raised, so that an abandoned request frees what it holds,
    as vLLM aborts it. `receive` is the ASGI receive channel of a request whose body was
    read already, so that only a disconnect can come from it."""

    async def disconnect() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(disconnect())
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, gone):
            if not t.done():
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t
    if task.cancelled():
        raise ClientDisconnected("the client disconnected before the answer was ready")
    return task.result()


def listen(host: str, port: int, option: str = "--port", backlog: int = 1024) -> socket.socket:
    """A listening TCP socket on host:port (0 picks a free port); ValueError or OSError saying
    which command-line `option` to change when the port is out of range or taken."""
    if not 0 <= port <= 65535:
        raise ValueError(
            f"{option} must be a port number in 0..65535 (0 picks a free one), got {port}"
        )
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as e:
        raise OSError(f"cannot resolve host {host!r}: {e.strerror}") from None
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that name it, and without
    # it every response whose headers and body go out in two writes waits ~40 ms (Nagle's
    # algorithm against the client's delayed ACK)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        raise OSError(
            f"cannot listen on {host}:{port}: {e.strerror or e}; pick another {option} "
            "(0 picks a free one)"
        ) from None
    return sock


@contextlib.contextmanager
def serve_in_thread(app, *, host: str = "127.0.0.1", timeout: float = 10.0) -> Iterator[str]:
    """Serve the ASGI `app` with uvicorn on a free port of `host` in a daemon thread; yields
    its base URL (``http://127.0.0.1:PORT``) once it accepts connections, and shuts it down
    (lifespan included) on exit. Raises RuntimeError if it does not start within `timeout`."""
    import uvicorn

    sock = listen(host, 0)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    # the socket is bound before the thread starts, so no other process can take the port
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not server.started:
            raise RuntimeError(f"uvicorn did not start on {host} within {timeout} s")
        yield f"http://{f'[{host}]' if ':' in host else host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
