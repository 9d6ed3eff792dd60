"""The admission broker: a trusted process that checks eBPF objects before they reach the kernel.

KrakenGuard (NSDI '26; brief §2.1 item 8, §2.3, §2.4 item 7) puts a user-space broker between
untrusted tenants and ``bpf()``. Only the broker holds ``CAP_BPF``. Tenants send it objects over a
Unix socket, and it checks them against the operator's policy (not one the tenant chooses). It
loads an object only when every path complies, and it keeps an audit log of every request.

The protocol is one JSON object per line each way:

- ``{"op": "health"}``
- ``{"op": "verify", "object": PATH}``, or ``"object_b64"`` with the object's bytes, and an
  optional ``"section"``
- ``{"op": "load", ..., "pin": NAME}``: verify, then load, only if COMPLIANT, loads are allowed and
  the process may call ``bpf()``; pinned under the broker's pin folder when one is given
- ``{"op": "interfere", "first": PATH, "second": PATH}``

Every answer has ``"ok"``; an error is ``{"ok": false, "error": "<one line>"}`` and the
connection stays open. An object's bytes are read once into a private work folder, and what is
checked is what is loaded: no file can be swapped in between. Requests are served one at a time,
since z3 is not thread-safe and each check is bounded by the time budget.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import importlib.metadata
import json
import os
import shutil
import socket
import stat
import struct
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from datahall.ebpf import kernel
from datahall.ebpf.checker import CheckError, check, interfere
from datahall.ebpf.loader import LoadError, load
from datahall.ebpf.policy import Policy, PolicyError, load_policy

__all__ = ["Broker", "request", "MAX_REQUEST"]

MAX_REQUEST = 16 * 1024 * 1024
"""Largest request line accepted (bytes); an object travels base64-encoded inside it."""


class BrokerError(ValueError):
    """A request that cannot be served; its message is the one-line error sent back."""


class Broker:
    """Serve admission requests on the Unix socket `socket_path` under `policy`.

    Parameters
    ----------
    socket_path : path
        Where to listen. A stale socket there is replaced; any other file is an error.
    policy : Policy
        The operator's policy, applied to every object.
    audit_log : path
        JSON Lines file; one line per request is appended and flushed.
    allow_load : bool
        Load COMPLIANT objects when asked (``op: load``) and the process may call ``bpf()``.
    pin_dir : path, optional
        Pin loaded programs under this bpffs folder; otherwise the broker keeps their fds open.
    time_budget_s : float
        The checking budget per program; running out is UNKNOWN, which never loads.
    client_policies : bool
        Let clients send their own policy (``"policy"``); off by default, since tenants must
        not choose what they are held to.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        policy: Policy,
        audit_log: str | os.PathLike[str],
        *,
        allow_load: bool = False,
        pin_dir: str | os.PathLike[str] | None = None,
        time_budget_s: float = 60.0,
        client_policies: bool = False,
    ) -> None:
        self.socket_path = Path(socket_path)
        self.policy = policy
        self.audit_log = Path(audit_log)
        self.allow_load = allow_load
        self.pin_dir = Path(pin_dir) if pin_dir else None
        self.time_budget_s = time_budget_s
        self.client_policies = client_policies
        self.loaded: list[kernel.LoadedProgram] = []  # kept open when not pinned
        self._lock = threading.Lock()  # one check at a time: z3 is not thread-safe
        self._stop = threading.Event()
        self._sock: socket.socket | None = None

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Bind the socket (mode 0660) and open the audit log; returns once listening."""
        path = self.socket_path
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise BrokerError(
                    f"{path} exists and is not a socket; remove it or pick another path"
                )
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(path))
                raise BrokerError(f"another broker is listening on {path}")
            except (ConnectionRefusedError, FileNotFoundError):
                path.unlink()  # stale: nobody listens
            finally:
                probe.close()
        self.audit_log.parent.mkdir(parents=True, exist_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        os.chmod(path, 0o660)
        sock.listen(16)
        sock.settimeout(0.2)  # so serve_forever notices stop()
        self._sock = sock

    def serve_forever(self) -> None:
        """Accept connections until :meth:`stop`; each connection gets a thread."""
        if self._sock is None:
            self.start()
        threads: list[threading.Thread] = []
        try:
            while not self._stop.is_set():
                try:
                    conn, _ = self._sock.accept()
                except TimeoutError:
                    continue
                t = threading.Thread(target=self._serve_connection, args=(conn,), daemon=True)
                t.start()
                threads = [x for x in threads if x.is_alive()] + [t]
        finally:
            self._sock.close()
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
            for t in threads:
                t.join(timeout=self.time_budget_s + 5)
            for prog in self.loaded:
                prog.close()

    def stop(self) -> None:
        self._stop.set()

    # -- requests -----------------------------------------------------------------------------

    def _serve_connection(self, conn: socket.socket) -> None:
        peer = _peer(conn)
        with conn, conn.makefile("rb") as rfile, conn.makefile("wb") as wfile:
            conn.settimeout(None)
            while not self._stop.is_set():
                line = rfile.readline(MAX_REQUEST + 1)
                if not line:
                    return
                if len(line) > MAX_REQUEST:
                    answer = {"ok": False, "error": f"request over {MAX_REQUEST} bytes"}
                    wfile.write(json.dumps(answer).encode() + b"\n")
                    wfile.flush()
                    return  # the rest of the line cannot be skipped safely
                answer = self.handle(line, peer)
                wfile.write(json.dumps(answer).encode() + b"\n")
                wfile.flush()

    def handle(self, line: bytes, peer: dict[str, int] | None = None) -> dict[str, Any]:
        """Answer one request line (and audit it); never raises."""
        start = time.monotonic()
        audit: dict[str, Any] = {"peer": peer or {}}
        try:
            try:
                req = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise BrokerError(f"not JSON: {e}") from None
            if not isinstance(req, dict):
                raise BrokerError('a request is a JSON object like {"op": "health"}')
            op = req.get("op")
            audit["op"] = op
            if op == "health":
                answer = {"ok": True, "version": _version(), "load": self._can_load() is None}
            elif op in ("verify", "load"):
                with self._lock:
                    answer = self._verify(req, audit, load_it=op == "load")
            elif op == "interfere":
                with self._lock:
                    answer = self._interfere(req, audit)
            else:
                raise BrokerError(f"unknown op {op!r}; use health, verify, load or interfere")
        except (BrokerError, LoadError, PolicyError, CheckError) as e:
            answer = {"ok": False, "error": str(e).splitlines()[0] if str(e) else type(e).__name__}
        except Exception as e:  # noqa: BLE001 - the broker stays up; the audit keeps the cause
            answer = {"ok": False, "error": f"internal error: {type(e).__name__}: {e}"}
        audit.update(
            error=answer.get("error"),
            verdict=answer.get("verdict"),
            loaded=answer.get("loaded", False),
            pinned=answer.get("pinned"),
            seconds=round(time.monotonic() - start, 3),
        )
        self._audit(audit)
        return answer

    def _can_load(self) -> str | None:
        """None when a COMPLIANT object would be loaded, else why not."""
        if not self.allow_load:
            return "the broker runs without --allow-load (verification only)"
        return kernel.available()

    def _object(self, req: dict[str, Any], key: str, workdir: Path) -> tuple[Path, str]:
        """Copy the request's object into `workdir` (read once); return its copy and sha256."""
        if f"{key}_b64" in req:
            try:
                data = base64.b64decode(req[f"{key}_b64"], validate=True)
            except (ValueError, TypeError):
                raise BrokerError(f"{key}_b64 is not base64") from None
            name = "object.o"
        elif key in req:
            src = Path(str(req[key]))
            try:
                data = src.read_bytes()
            except OSError as e:
                raise BrokerError(f"cannot read {src}: {e.strerror or e}") from None
            name = src.name
        else:
            raise BrokerError(f'give "{key}" (a path) or "{key}_b64" (the bytes)')
        if len(data) > MAX_REQUEST:
            raise BrokerError(f"object over {MAX_REQUEST} bytes")
        copy = workdir / f"{len(list(workdir.iterdir()))}-{name}"
        copy.write_bytes(data)
        copy.chmod(0o400)
        return copy, hashlib.sha256(data).hexdigest()

    def _policy(self, req: dict[str, Any]) -> Policy:
        if "policy" not in req:
            return self.policy
        if not self.client_policies:
            raise BrokerError("this broker applies the operator's policy; clients may not send one")
        given = req["policy"]
        text = given if isinstance(given, str) else json.dumps(given)
        return load_policy(text, source="request policy")

    def _verify(self, req: dict[str, Any], audit: dict[str, Any], *, load_it: bool) -> dict:
        workdir = Path(tempfile.mkdtemp(prefix="kguard-"))
        try:
            path, digest = self._object(req, "object", workdir)
            audit.update(object=str(req.get("object", "<bytes>")), sha256=digest)
            policy = self._policy(req)
            obj = load(path)
            report = check(
                obj, policy, section=req.get("section"), time_budget_s=self.time_budget_s
            )
            answer: dict[str, Any] = {
                "ok": True,
                "verdict": report.verdict,
                "exit_code": report.exit_code,
                "sha256": digest,
                "report": report.to_json(),
            }
            if load_it:
                answer.update(self._load(obj, report, req.get("pin")))
            return answer
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def _load(self, obj, report, pin: Any) -> dict[str, Any]:
        why = self._can_load()
        if report.verdict != "COMPLIANT":
            why = f"verdict {report.verdict}: only COMPLIANT objects are loaded"
        if why is not None:
            return {"loaded": False, "why_not": why, "pinned": None}
        if pin is not None and (
            not isinstance(pin, str) or not pin or "/" in pin or pin in (".", "..")
        ):
            raise BrokerError("pin must be a plain name (no '/')")
        loaded, pinned = [], None
        try:
            for prog in report.programs:
                loaded.append(kernel.load(obj, prog.section))
            if pin is not None and self.pin_dir is not None:
                pinned = []
                for prog, lp in zip(report.programs, loaded, strict=True):
                    target = self.pin_dir / (pin if len(loaded) == 1 else f"{pin}_{prog.name}")
                    lp.pin(target)
                    pinned.append(str(target))
        except kernel.KernelError as e:
            for lp in loaded:
                lp.close()
            return {"loaded": False, "why_not": f"the kernel refused: {e}", "pinned": None}
        if pinned is not None:
            for lp in loaded:
                lp.close()  # the pin keeps the program
        else:
            self.loaded += loaded
        return {
            "loaded": True,
            "pinned": pinned,
            "programs": [
                {"section": p.section, "fd": lp.fd}
                for p, lp in zip(report.programs, loaded, strict=True)
            ],
        }

    def _interfere(self, req: dict[str, Any], audit: dict[str, Any]) -> dict[str, Any]:
        workdir = Path(tempfile.mkdtemp(prefix="kguard-"))
        try:
            first, h1 = self._object(req, "first", workdir)
            second, h2 = self._object(req, "second", workdir)
            audit.update(object=[str(req.get("first", "<bytes>")), str(req.get("second", "<bytes>"))],
                         sha256=[h1, h2])  # fmt: skip
            result = interfere(load(first), load(second), time_budget_s=self.time_budget_s)
            return {"ok": True, "verdict": result.verdict, "exit_code": result.exit_code,
                    "result": result.to_json()}  # fmt: skip
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def _audit(self, entry: dict[str, Any]) -> None:
        entry = {
            "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
            **entry,
        }
        with open(self.audit_log, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()


def _version() -> str:
    try:
        return importlib.metadata.version("datahall")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _peer(conn: socket.socket) -> dict[str, int] | None:
    """The connecting process's pid, uid and gid (``SO_PEERCRED``), None where unsupported."""
    try:
        raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError):
        return None
    pid, uid, gid = struct.unpack("3i", raw)
    return {"pid": pid, "uid": uid, "gid": gid}


def request(
    socket_path: str | os.PathLike[str], message: dict[str, Any], *, timeout: float = 120.0
) -> dict[str, Any]:
    """Send one request to a broker and return its answer (a client for scripts and tests)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(socket_path))
        s.sendall(json.dumps(message).encode() + b"\n")
        with s.makefile("rb") as f:
            line = f.readline()
    if not line:
        raise ConnectionError("the broker closed the connection without answering")
    return json.loads(line)
