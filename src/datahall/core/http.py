"""HTTP plumbing the servers of datahall share: run an ASGI app on loopback in a thread (for
demos, tests and benchmarks, which drive it from the same process)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

__all__ = ["serve_in_thread"]


@contextlib.contextmanager
def serve_in_thread(app, *, host: str = "127.0.0.1", timeout: float = 10.0) -> Iterator[str]:
    """Serve the ASGI `app` with uvicorn on a free port of `host` in a daemon thread; yields
    its base URL (``http://127.0.0.1:PORT``) once it accepts connections, and shuts it down
    (lifespan included) on exit. Raises RuntimeError if it does not start within `timeout`."""
    import uvicorn

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that name it, and without
    # it every response whose headers and body go out in two writes waits ~40 ms (Nagle's
    # algorithm against the client's delayed ACK)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
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
