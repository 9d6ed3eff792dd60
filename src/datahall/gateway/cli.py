"""``datahall gateway``: serve the AI gateway, check its config, run simulated backends.

- ``serve --config gateway.yaml [--host H --port P]``: the gateway (:mod:`.server`) with
  uvicorn until Ctrl-C; one JSON line per request on stdout (``--no-access-log`` to silence).
- ``check --config gateway.yaml [--json]``: validate the file and print what it sets up.
- ``sim [--count 4 --speeds 1,1,0.5,0.25 --port-base 8001 --response-tokens 12]``: simulated
  OpenAI-compatible backends (:mod:`.simulate`) to put behind it.

Bad input (a config error, a port in use) is one line naming the file and line, and exit 2,
through ``datahall``'s entry point.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from ..core.cli import emit_json
from ..core.http import listen
from ..core.report import console, print_table

app = typer.Typer(
    help="AI gateway: OpenAI-compatible, AI-aware load balancer with ORCA, prefix-aware "
    "routing, a semantic cache and prompt transforms.",
    no_args_is_help=True,
)

ConfigOpt = Annotated[
    Path, typer.Option("--config", "-c", help="the gateway.yaml to use", show_default=False)
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print the result as JSON")]


def _url(sock: socket.socket) -> str:
    address, port = sock.getsockname()[:2]
    return f"http://{f'[{address}]' if ':' in address else address}:{port}"


def _load(path: Path) -> Any:
    from .config import load_config

    return load_config(path)


def summary(config: Any, source: str = "gateway.yaml") -> dict[str, Any]:
    """What a config sets up, for ``check`` (plain data, JSON-ready); ``warnings`` lists what
    ``serve`` would refuse, such as a key variable that is not set in this environment."""
    warnings = []
    for i, k in enumerate(config.api_keys):
        if k.key_env is not None and k.key_env not in os.environ:
            warnings.append(f"{source}: api_keys[{i}].key_env: ${k.key_env} is not set")
    for b in config.backends:
        if b.api_key_env is not None and b.api_key_env not in os.environ:
            warnings.append(f"{source}: backends.{b.name}.api_key_env: ${b.api_key_env} is not set")
    cache = config.semantic_cache
    return {
        "listeners": [f"{lst.host}:{lst.port}" for lst in config.listeners],
        "pools": {
            pool: [
                {
                    "name": b.name,
                    "url": b.url,
                    "api": b.api,
                    "priority": b.priority,
                    "weight": b.weight,
                }
                for b in backends
            ]
            for pool, backends in config.pools().items()
        },
        "aliases": {
            name: f"{t.pool}/{t.model or name}" for name, t in config.alias_targets().items()
        },
        "routing": config.routing.policy,
        "cache": (
            None
            if not cache.enabled
            else {
                "semantic": cache.semantic,
                "min_cosine_similarity": cache.min_cosine_similarity,
                "redis": config.cache_redis_url(),
            }
        ),
        "api_keys": len(config.api_keys),
        "tenants": sorted({k.tenant for k in config.api_keys} | set(config.tenants)),
        "rate_limited_keys": sum(1 for k in config.api_keys if config.rate_limits(k)),
        "default_rate_limit": bool(config.default_rate_limit),
        "timeouts": config.timeouts.model_dump(),
        "redis": config.redis_url,
        "warnings": warnings,
    }


@app.command("check")
def check_cmd(config: ConfigOpt, as_json: JsonOpt = False) -> None:
    """Validate a gateway.yaml and print what it sets up (errors name the line)."""
    cfg = _load(config)
    info = summary(cfg, str(config))
    if as_json:
        emit_json({"config": str(config), "valid": True, **info})
        return
    rows = [
        [pool, b["name"], b["url"], b["api"], b["priority"], b["weight"]]
        for pool, members in info["pools"].items()
        for b in members
    ]
    print_table(f"{config}: valid", ["pool", "backend", "url", "api", "priority", "weight"], rows)
    aliases = ", ".join(f"{k} -> {v}" for k, v in info["aliases"].items()) or "none"
    cache = info["cache"]
    cache_text = (
        "off"
        if cache is None
        else ("semantic" if cache["semantic"] else "exact")
        + f" (min cosine {cache['min_cosine_similarity']}, "
        + (f"shared via {cache['redis']})" if cache["redis"] else "in process)")
    )
    console.print(f"listeners: {', '.join(info['listeners'])}", highlight=False)
    console.print(f"aliases: {aliases}", highlight=False, soft_wrap=True)
    console.print(
        f"routing: {info['routing']}; cache: {cache_text}", highlight=False, soft_wrap=True
    )
    console.print(
        f"api keys: {info['api_keys']} (tenants: {', '.join(info['tenants']) or 'default'})",
        highlight=False,
    )
    for w in info["warnings"]:
        console.print(f"[yellow]warning:[/] {w}", highlight=False, soft_wrap=True)


def _logging(access_log: bool) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("datahall.gateway").setLevel(logging.INFO)
    access = logging.getLogger("datahall.gateway.access")
    access.propagate = False
    access.handlers.clear()
    if access_log:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))  # JSON lines, nothing around
        access.addHandler(handler)
        access.setLevel(logging.INFO)
    else:
        access.setLevel(logging.WARNING)


@app.command("serve")
def serve_cmd(
    config: ConfigOpt,
    host: Annotated[
        str | None, typer.Option(help="address to serve on (default: the config's listeners)")
    ] = None,
    port: Annotated[int | None, typer.Option(help="port (0 picks a free one)")] = None,
    access_log: Annotated[
        bool, typer.Option("--access-log/--no-access-log", help="one JSON line per request")
    ] = True,
) -> None:
    """Serve the gateway until Ctrl-C."""
    from .config import ConfigError

    cfg = _load(config)
    if host is not None or port is not None:
        pairs = [(host or cfg.listeners[0].host, cfg.listeners[0].port if port is None else port)]
    else:
        pairs = [(lst.host, lst.port) for lst in cfg.listeners]
    try:
        from .server import create_app

        gateway_app = create_app(cfg)
    except ConfigError as e:  # a key variable that is not set: name the real file
        raise ConfigError(e.issues, str(config)) from None
    sockets = []
    try:
        for h, p in pairs:
            sockets.append(listen(h, p))
        import uvicorn

        _logging(access_log)
        pools = cfg.pools()
        urls = ", ".join(_url(s) for s in sockets)
        console.print(
            f"gateway on {urls} ({len(cfg.backends)} backends in {len(pools)} pools, "
            f"routing {cfg.routing.policy}; Ctrl-C stops)",
            highlight=False,
            soft_wrap=True,
        )
        sys.stdout.flush()
        server = uvicorn.Server(
            uvicorn.Config(gateway_app, log_level="warning", access_log=False, lifespan="on")
        )
        # uvicorn stops gracefully on Ctrl-C, then raises it again: a normal stop here
        with contextlib.suppress(KeyboardInterrupt):
            server.run(sockets=sockets)
    finally:
        for s in sockets:
            s.close()


def parse_speeds(text: str, count: int) -> list[float]:
    """``--speeds`` as floats: one value for all, or exactly `count` values.

    >>> parse_speeds("1,0.5", 2), parse_speeds("2", 3)
    ([1.0, 0.5], [2.0, 2.0, 2.0])
    """
    try:
        speeds = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(
            f"--speeds must be numbers separated by commas, like 1,1,0.5 (got {text!r})"
        ) from None
    if len(speeds) == 1:
        speeds *= count
    if len(speeds) != count or any(not s > 0 for s in speeds):
        raise ValueError(
            f"--speeds needs one positive number, or {count} of them (one per backend); got {text!r}"
        )
    return speeds


@app.command("sim")
def sim_cmd(
    count: Annotated[int, typer.Option("--count", "-n", help="simulated backends to run")] = 4,
    speeds: Annotated[
        str | None,
        typer.Option(
            help="relative speed of each, or one for all (2 is twice as fast); by default "
            "1,1,0.5,0.25 for 4 backends, else 1",
            show_default=False,
        ),
    ] = None,
    port_base: Annotated[
        int, typer.Option(help="first port (then +1, +2, ...); 0 picks free ports")
    ] = 0,
    host: Annotated[str, typer.Option(help="address to serve on")] = "127.0.0.1",
    model: Annotated[
        list[str] | None, typer.Option("--model", "-m", help="model name served (repeatable)")
    ] = None,
    response_tokens: Annotated[
        int,
        typer.Option(
            help="natural answer length: a request allowing more tokens (16 when it sets no "
            "max_tokens) ends after this many with finish_reason stop, so the gateway may "
            "cache it; 0 writes until max_tokens (finish_reason length)",
        ),
    ] = 12,
    duration: Annotated[
        float | None, typer.Option(help="stop after this many seconds (default: Ctrl-C)")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Run simulated OpenAI-compatible backends (queue, prefix cache, ORCA, vLLM metrics)."""
    if count < 1:
        raise ValueError(f"--count must be at least 1, got {count}")
    if response_tokens < 0:
        raise ValueError(
            f"--response-tokens must be 0 (answer until max_tokens) or more, got {response_tokens}"
        )
    if speeds is None:  # unequal backends by default, as the routing benchmark uses them
        speeds = "1,1,0.5,0.25" if count == 4 else "1"
    values = parse_speeds(speeds, count)
    if port_base and not 1 <= port_base <= 65535 - count + 1:
        raise ValueError(
            f"--port-base must leave room for {count} ports below 65536, got {port_base}"
        )
    import uvicorn

    from .simulate import SimConfig, create_app

    sockets = []
    try:
        for i in range(count):
            sockets.append(listen(host, port_base + i if port_base else 0, "--port-base"))
        configs = [
            SimConfig(
                name=f"sim-{i}",
                speed=values[i],
                models=model or ["sim-llm"],
                response_tokens=response_tokens or None,
            )
            for i in range(count)
        ]
        servers, threads = [], []
        for cfg, sock in zip(configs, sockets, strict=True):
            server = uvicorn.Server(
                uvicorn.Config(create_app(cfg), log_level="warning", access_log=False)
            )
            # off the main thread uvicorn installs no signal handlers: Ctrl-C reaches us
            thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
            thread.start()
            servers.append(server)
            threads.append(thread)
        deadline = time.monotonic() + 10
        while not all(s.started for s in servers) and time.monotonic() < deadline:
            if not all(t.is_alive() for t in threads):
                raise OSError("a simulated backend failed to start; see the log above")
            time.sleep(0.01)
        rows = [
            {
                "name": c.name,
                "url": _url(s),
                "speed": c.speed,
                "models": c.models,
                "response_tokens": c.response_tokens,
            }
            for c, s in zip(configs, sockets, strict=True)
        ]
        if as_json:
            emit_json(rows)
        else:
            for r in rows:
                console.print(f"{r['name']} {r['url']} speed {r['speed']:g}", highlight=False)
            ends = (
                f"answers end after {response_tokens} tokens (finish_reason stop) when "
                "max_tokens allows more"
                if response_tokens
                else "answers run to max_tokens (finish_reason length)"
            )
            console.print(ends, highlight=False)
            console.print("Ctrl-C stops" if duration is None else f"stopping in {duration:g} s")
        sys.stdout.flush()
        end = None if duration is None else time.monotonic() + duration
        with contextlib.suppress(KeyboardInterrupt):
            while end is None or time.monotonic() < end:
                time.sleep(0.2 if end is None else max(0.0, min(0.2, end - time.monotonic())))
        for s in servers:
            s.should_exit = True
        for t in threads:
            t.join(5)
    finally:
        for s in sockets:
            s.close()
