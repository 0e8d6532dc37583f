"""A small transparent proxy, servers and a client, to send real traffic through redirect rules.

The proxy is what a sidecar does, minus everything but the addressing:

- it runs as its own process under the proxy's uid and gid (1337), started as
  root so it can open its listeners (TPROXY: with ``IP_TRANSPARENT``), then
  dropping to that uid (keeping only CAP_NET_ADMIN and CAP_NET_RAW in TPROXY
  mode, as a TPROXY sidecar must, to bind foreign addresses and set marks);
- a connection accepted on the outbound port is forwarded to its original
  destination (``SO_ORIGINAL_DST``), from the proxy's own socket;
- one accepted on the inbound port is forwarded to the app: from the
  passthrough address (127.0.0.6 / ::6) over lo (REDIRECT), or from the
  original source with the TPROXY mark (TPROXY), to the original destination
  (the accepted socket's local address);
- every connection starts with a header line that counts the proxy hops it
  took; past ``max_hops`` the proxy stops forwarding and answers ``loop``. A
  redirect loop therefore ends by itself and is observed.

It writes one JSON event per line (``ready``, ``accept``, ``upstream``,
``loop``, ``error``) to its standard output.

:class:`Server` answers each connection with one JSON line saying what it
saw (its name, the hops, the peer and local addresses), from threads of the
calling process, in any namespace. :func:`probe` is the client: it connects
from a namespace, as a chosen uid/gid, and returns the :class:`Reply`.

>>> hello("c1", 0)
b'{"id": "c1", "hops": 0}\\n'
>>> Reply.parse(b'{"server": "app", "id": "c1", "hops": 1, "peer": ["127.0.0.6", 4242], "local": ["10.0.0.1", 8080]}')
Reply(server='app', id='c1', hops=1, peer=('127.0.0.6', 4242), local=('10.0.0.1', 8080), loop=False, error=None)
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import itertools
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any, Final

import attrs

from meshredirect.apply.netns import Target
from meshredirect.apply.sockets import IP_TRANSPARENT, IPV6_TRANSPARENT, acting_as, original_destination

__all__ = ["DEFAULT_MAX_HOPS", "ProxyProcess", "Reply", "Server", "hello", "main", "probe"]

DEFAULT_MAX_HOPS: Final = 4
#: Seconds a proxy or server waits for a header line, and a client for its answer.
IO_TIMEOUT: Final = 5.0
#: Seconds the parent waits for the proxy to listen.
START_TIMEOUT: Final = 10.0
PR_SET_PDEATHSIG: Final = 1
PR_SET_KEEPCAPS: Final = 8
CAP_NET_ADMIN: Final = 12
CAP_NET_RAW: Final = 13
_LINUX_CAPABILITY_VERSION_3: Final = 0x20080522
_WILDCARD: Final[dict[int, str]] = {socket.AF_INET: "0.0.0.0", socket.AF_INET6: "::"}
_ids = itertools.count(1)


def hello(ident: str, hops: int) -> bytes:
    """The header line every connection starts with."""
    return (json.dumps({"id": ident, "hops": hops}) + "\n").encode()


@attrs.frozen(kw_only=True)
class Reply:
    """What a client got back: a server's account of the connection, a loop notice or an error."""

    server: str | None = None
    id: str | None = None
    hops: int = 0
    peer: tuple[str, int] | None = None
    local: tuple[str, int] | None = None
    loop: bool = False
    error: str | None = None

    @classmethod
    def parse(cls, line: bytes) -> Reply:
        try:
            data = json.loads(line.decode() or "{}")
        except ValueError:
            return cls(error=f"unreadable answer {line[:80]!r}")
        return cls(
            server=data.get("server"),
            id=data.get("id"),
            hops=int(data.get("hops", 0)),
            peer=tuple(data["peer"]) if "peer" in data else None,  # type: ignore[arg-type]
            local=tuple(data["local"]) if "local" in data else None,  # type: ignore[arg-type]
            loop=bool(data.get("loop", False)),
            error=data.get("error"),
        )


def _read_line(conn: socket.socket, timeout: float = IO_TIMEOUT) -> bytes:
    conn.settimeout(timeout)
    data = b""
    while not data.endswith(b"\n"):
        try:
            chunk = conn.recv(4096)
        except (TimeoutError, OSError):
            break
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0]


def _header(line: bytes) -> tuple[str, int]:
    try:
        data = json.loads(line.decode())
        return str(data["id"]), int(data["hops"])
    except (ValueError, KeyError, TypeError):
        return "?", 0


def _address(sockname: Sequence[Any]) -> list[Any]:
    return [sockname[0], sockname[1]]


# ----------------------------------------------------------------------------- servers and the client


class Server:
    """Answers every connection on its sockets with one JSON line, from threads of this process.

    Sockets are opened inside ``target`` (the namespace), on every family and port given.
    """

    def __init__(self, target: Target, name: str, ports: Sequence[int], families: Sequence[int]) -> None:
        self.name = name
        self.sockets: list[socket.socket] = []
        self._stop = threading.Event()
        with target.entered():
            for family in families:
                for port in ports:
                    sock = socket.socket(family, socket.SOCK_STREAM)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    if family == socket.AF_INET6:
                        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    sock.bind((_WILDCARD[family], port))
                    sock.listen(64)
                    self.sockets.append(sock)
        self.thread = threading.Thread(target=self._serve, name=f"server-{name}", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                readable, _, _ = select.select(self.sockets, [], [], 0.2)
            except (OSError, ValueError):
                return
            for sock in readable:
                try:
                    conn, peer = sock.accept()
                except OSError:
                    continue
                threading.Thread(target=self._answer, args=(conn, peer), daemon=True).start()

    def _answer(self, conn: socket.socket, peer: Sequence[Any]) -> None:
        with conn:
            ident, hops = _header(_read_line(conn))
            answer = {"server": self.name, "id": ident, "hops": hops}
            answer |= {"peer": _address(peer), "local": _address(conn.getsockname())}
            with contextlib.suppress(OSError):
                conn.sendall((json.dumps(answer) + "\n").encode())

    def close(self) -> None:
        self._stop.set()
        self.thread.join(timeout=2)
        for sock in self.sockets:
            sock.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def probe(
    target: Target,
    address: str,
    port: int,
    *,
    uid: int | None = None,
    gid: int | None = None,
    timeout: float = IO_TIMEOUT,
    ident: str | None = None,
) -> Reply:
    """Connect from ``target`` (as ``uid``/``gid`` when given) to ``address:port`` and return the answer."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with target.entered(), acting_as(uid, gid):
        sock = socket.socket(family, socket.SOCK_STREAM)
    ident = ident or f"c{os.getpid()}-{next(_ids)}"
    with sock:
        sock.settimeout(timeout)
        try:
            sock.connect((address, port))
            sock.sendall(hello(ident, 0))
        except OSError as exc:
            return Reply(id=ident, error=errno.errorcode.get(exc.errno or 0, str(exc)))
        line = _read_line(sock, timeout)
    if not line:
        return Reply(id=ident, error="closed without an answer")
    return Reply.parse(line)


# ----------------------------------------------------------------------------- the proxy process


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _drop_privileges(uid: int, gid: int, *, keep_net_admin: bool) -> None:
    libc = _libc()
    if keep_net_admin:
        libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0)
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if keep_net_admin:
        header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
        data = (_CapData * 2)()
        caps = (1 << CAP_NET_ADMIN) | (1 << CAP_NET_RAW)
        data[0].effective = data[0].permitted = caps
        if libc.capset(ctypes.byref(header), data) != 0:
            raise OSError(ctypes.get_errno(), "capset failed")
    # A child that changes its uid loses its parent-death signal: arm it again.
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:
        os._exit(1)


class _Proxy:
    def __init__(self, args: argparse.Namespace, out: IO[str]) -> None:
        self.args = args
        self.out = out
        self.lock = threading.Lock()
        self.passthrough: dict[int, str] = {
            socket.AF_INET: args.passthrough_ipv4,
            socket.AF_INET6: args.passthrough_ipv6,
        }

    def event(self, name: str, /, **fields: object) -> None:
        with self.lock:
            self.out.write(json.dumps({"event": name, **fields}) + "\n")
            self.out.flush()

    def listen(self) -> list[tuple[socket.socket, str]]:
        listeners = []
        tproxy = self.args.mode == "TPROXY"
        for family in (socket.AF_INET, socket.AF_INET6):
            for port, kind in ((self.args.outbound_port, "outbound"), (self.args.inbound_port, "inbound")):
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                if tproxy and kind == "inbound":
                    _transparent(sock)
                sock.bind((_WILDCARD[family], port))
                sock.listen(128)
                listeners.append((sock, kind))
        return listeners

    def serve(self, listeners: list[tuple[socket.socket, str]]) -> None:
        kinds = {sock: kind for sock, kind in listeners}
        while True:
            readable, _, _ = select.select(list(kinds), [], [])
            for sock in readable:
                try:
                    conn, peer = sock.accept()
                except OSError:
                    continue
                threading.Thread(target=self.handle, args=(conn, peer, kinds[sock]), daemon=True).start()

    def handle(self, conn: socket.socket, peer: Sequence[Any], kind: str) -> None:
        try:
            self._handle(conn, peer, kind)
        except Exception as exc:  # a test tool: report every failure as an event, never die silently
            self.event("error", kind=kind, error=f"{type(exc).__name__}: {exc}")

    def _handle(self, conn: socket.socket, peer: Sequence[Any], kind: str) -> None:
        with conn:
            (address, port), how = original_destination(conn)
            original = [str(address), port]
            ident, hops = _header(_read_line(conn))
            hop = hops + 1
            self.event(
                "accept", kind=kind, id=ident, hop=hop, peer=_address(peer), local=_address(conn.getsockname()),
                original=original, how=how,
            )  # fmt: skip
            if hop > self.args.max_hops:
                self.event("loop", kind=kind, id=ident, hop=hop)
                _send(conn, {"loop": True, "id": ident, "hops": hop})
                return
            try:
                upstream = self.connect(conn.family, kind, peer, (str(address), port))
            except OSError as exc:
                self.event("error", kind=kind, id=ident, hop=hop, error=str(exc))
                _send(conn, {"error": f"upstream: {exc}", "id": ident, "hops": hop})
                return
            with upstream:
                self.event(
                    "upstream", kind=kind, id=ident, hop=hop, source=_address(upstream.getsockname()),
                    destination=original,
                )  # fmt: skip
                upstream.sendall(hello(ident, hop))
                _relay(conn, upstream)

    def connect(self, family: int, kind: str, peer: Sequence[Any], destination: tuple[str, int]) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.args.connect_timeout)
            if kind == "inbound" and self.args.mode == "TPROXY":
                # The app sees the original client: bind its address (foreign to this host) with the mark
                # that routes the app's replies back here.
                _transparent(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.args.mark)
                sock.bind((peer[0], 0))
            elif kind == "inbound":
                sock.bind((self.passthrough[family], 0))
            sock.connect(destination)
        except OSError:
            sock.close()
            raise
        return sock


def _transparent(sock: socket.socket) -> None:
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
    else:
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)


def _send(conn: socket.socket, data: dict[str, object]) -> None:
    with contextlib.suppress(OSError):
        conn.sendall((json.dumps(data) + "\n").encode())


def _relay(a: socket.socket, b: socket.socket) -> None:
    """Copy both ways until both sides are done (or one fails)."""
    a.setblocking(True)
    b.setblocking(True)
    a.settimeout(IO_TIMEOUT)
    b.settimeout(IO_TIMEOUT)
    open_ = {a: b, b: a}
    while open_:
        try:
            readable, _, _ = select.select(list(open_), [], [], IO_TIMEOUT)
        except (OSError, ValueError):
            return
        if not readable:
            return
        for sock in readable:
            try:
                data = sock.recv(65536)
            except OSError:
                return
            other = open_[sock]
            if not data:
                del open_[sock]
                with contextlib.suppress(OSError):
                    other.shutdown(socket.SHUT_WR)
                continue
            try:
                other.sendall(data)
            except OSError:
                return


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m meshredirect.testing.proxy``: run the proxy in the current namespace (as root; it drops)."""
    parser = argparse.ArgumentParser(prog="python -m meshredirect.testing.proxy", description=__doc__)
    parser.add_argument("--outbound-port", type=int, default=15001)
    parser.add_argument("--inbound-port", type=int, default=15006)
    parser.add_argument("--mode", choices=("REDIRECT", "TPROXY"), default="REDIRECT")
    parser.add_argument("--mark", type=lambda text: int(text, 0), default=1337)
    parser.add_argument("--uid", type=int, default=1337)
    parser.add_argument("--gid", type=int, default=1337)
    parser.add_argument("--max-hops", type=int, default=DEFAULT_MAX_HOPS)
    parser.add_argument("--connect-timeout", type=float, default=IO_TIMEOUT, help="seconds per upstream connect")
    parser.add_argument("--passthrough-ipv4", default="127.0.0.6")
    parser.add_argument("--passthrough-ipv6", default="::6")
    args = parser.parse_args(argv)
    proxy = _Proxy(args, sys.stdout)
    listeners = proxy.listen()
    _drop_privileges(args.uid, args.gid, keep_net_admin=args.mode == "TPROXY")
    proxy.event("ready", uid=os.getuid(), gid=os.getgid(), pid=os.getpid())
    proxy.serve(listeners)
    return 0


# ----------------------------------------------------------------------------- the parent's handle


class ProxyProcess:
    """The proxy started in a namespace; its events are read from a file it writes."""

    def __init__(self, target: Target, events: Path, *, mode: str = "REDIRECT", **options: object) -> None:
        self.events_path = events
        argv = [sys.executable, "-m", "meshredirect.testing.proxy", "--mode", mode]
        for name, value in options.items():
            argv += [f"--{name.replace('_', '-')}", str(value)]
        self._out = events.open("w")
        #: What the proxy wrote to its standard error (a file: a pipe nobody reads could fill and block it).
        self.stderr_path = events.with_name(events.name + ".stderr")
        self._err = self.stderr_path.open("w")
        with target.entered():
            self.process = subprocess.Popen(argv, stdout=self._out, stderr=self._err, text=True)
        try:
            self.ready = self.wait_for("ready")
        except BaseException:
            self.stop()
            raise

    def events(self) -> list[dict[str, Any]]:
        lines = self.events_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def events_of(self, ident: str) -> list[dict[str, Any]]:
        return [event for event in self.events() if event.get("id") == ident]

    def wait_for(self, kind: str, timeout: float = START_TIMEOUT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events():
                if event["event"] == kind:
                    return event
            if self.process.poll() is not None:
                raise RuntimeError(f"the proxy exited with {self.process.returncode}: {self._stderr()}")
            time.sleep(0.01)
        raise TimeoutError(f"no {kind!r} event from the proxy within {timeout:g} s")

    def _stderr(self) -> str:
        self._err.flush()
        return self.stderr_path.read_text().strip()

    def stop(self) -> None:
        """End the proxy (by its pid: it is our child) and wait for it."""
        if self.process.poll() is None:
            self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        self._out.close()
        self._err.close()

    def __enter__(self) -> ProxyProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def hops_of(events: Iterator[dict[str, Any]] | list[dict[str, Any]]) -> list[int]:
    """The hop numbers of the accept events given."""
    return [int(event["hop"]) for event in events if event["event"] == "accept"]


if __name__ == "__main__":
    sys.exit(main())
