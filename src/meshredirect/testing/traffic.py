"""Real TCP connections for real-kernel tests: listeners that say who accepted, clients of any uid.

Run inside a network namespace (``ip netns exec NS python -m meshredirect.testing.traffic ...``):

- ``listen NAME PORT...``: listen on every port, IPv4 and IPv6, with
  ``IP_TRANSPARENT`` (so TPROXY can hand connections over); print ``ready``;
  to each connection accepted, send one JSON line: the listener's NAME and
  port, the accepted socket's local address, its original destination
  (``SO_ORIGINAL_DST``, what NAT rewrote) and the peer; then close it.
- ``connect``: read a JSON list of connections from stdin (``dst``,
  ``dport``, optional ``src``, ``uid``, ``gid``, ``mark``, ``transparent``,
  ``timeout``), open them all at once, each from a child process that takes
  the uid and gid first (only the filesystem ids when the socket needs a mark
  or a transparent source: those need the capability a uid change drops), and
  print a JSON list of what each got back (or the error).

>>> describe({"where": "pod", "port": 15001, "local": ["127.0.0.1", 15001], "orig": ["1.2.3.4", 80]})
'pod:15001 (local 127.0.0.1:15001, original destination 1.2.3.4:80)'
"""

from __future__ import annotations

import ctypes
import json
import os
import selectors
import signal
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any, Final

from meshredirect.apply.sockets import IP_TRANSPARENT, IPV6_TRANSPARENT, original_destination

__all__ = ["connect_all", "describe", "listen"]

SO_MARK: Final = 36
PR_SET_PDEATHSIG: Final = 1
BACKLOG: Final = 128
DEFAULT_TIMEOUT: Final = 1.5


def describe(reply: dict[str, Any]) -> str:
    """A listener's reply in words."""
    local, orig = reply["local"], reply["orig"]
    return f"{reply['where']}:{reply['port']} (local {local[0]}:{local[1]}, original destination {orig[0]}:{orig[1]})"


def listen(name: str, ports: Sequence[int]) -> None:
    """Serve until killed (see the module docstring)."""
    selector = selectors.DefaultSelector()
    for port in sorted(set(ports)):
        for family, address, level, option in (
            (socket.AF_INET, "0.0.0.0", socket.SOL_IP, IP_TRANSPARENT),
            (socket.AF_INET6, "::", socket.IPPROTO_IPV6, IPV6_TRANSPARENT),
        ):
            server = socket.socket(family, socket.SOCK_STREAM)
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            server.setsockopt(level, option, 1)
            if family == socket.AF_INET6:
                server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            server.bind((address, port))
            server.listen(BACKLOG)
            server.setblocking(False)
            selector.register(server, selectors.EVENT_READ, port)
    print("ready", flush=True)
    while True:
        for key, _events in selector.select():
            ready = key.fileobj
            assert isinstance(ready, socket.socket)
            try:
                conn, peer = ready.accept()
            except BlockingIOError:
                continue
            try:
                local = conn.getsockname()
                (dst, dport), _how = original_destination(conn)
                orig = (str(dst), dport)
                reply = {
                    "where": name,
                    "port": key.data,
                    "local": list(local[:2]),
                    "orig": list(orig),
                    "peer": list(peer[:2]),
                }
                conn.setblocking(True)
                conn.settimeout(1)
                conn.sendall((json.dumps(reply) + "\n").encode())
            except OSError:
                pass
            finally:
                conn.close()


def _child(spec: dict[str, Any], write: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    result: dict[str, Any]
    try:
        family = socket.AF_INET6 if ":" in spec["dst"] else socket.AF_INET
        sock = None
        privileged = bool(spec.get("mark") or spec.get("transparent"))
        if spec.get("uid") is not None:
            gid = spec.get("gid", spec["uid"])
            os.setgroups([])
            if privileged:
                # A mark or a transparent source needs CAP_NET_ADMIN, which a real uid change drops:
                # change only the filesystem ids, which own the socket (what -m owner and skuid read).
                libc.setfsgid(gid)
                libc.setfsuid(spec["uid"])
            else:
                os.setresgid(gid, gid, gid)
                os.setresuid(spec["uid"], spec["uid"], spec["uid"])
                # Dropping privileges clears the parent-death signal: arm it again.
                libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        sock = socket.socket(family, socket.SOCK_STREAM)
        if spec.get("mark"):
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, spec["mark"])
        if spec.get("transparent"):
            level, option = (
                (socket.SOL_IP, IP_TRANSPARENT) if family == socket.AF_INET else (socket.IPPROTO_IPV6, IPV6_TRANSPARENT)
            )
            sock.setsockopt(level, option, 1)
        if spec.get("src"):
            sock.bind((spec["src"], 0))
        sock.settimeout(spec.get("timeout", DEFAULT_TIMEOUT))
        sock.connect((spec["dst"], spec["dport"]))
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        result = {"reply": json.loads(data) if data.strip() else None, "error": None if data.strip() else "closed"}
    except OSError as exc:
        result = {"reply": None, "error": type(exc).__name__ + ": " + str(exc)}
    os.write(write, (json.dumps(result) + "\n").encode())
    os._exit(0)


def connect_all(specs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Open every connection at once, one child process each; their results in order."""
    children: list[tuple[int, int]] = []
    for spec in specs:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            os.close(read)
            _child(spec, write)
        os.close(write)
        children.append((pid, read))
    results: list[dict[str, Any]] = []
    deadline = time.monotonic() + max((s.get("timeout", DEFAULT_TIMEOUT) for s in specs), default=0) + 5
    for pid, read in children:
        chunks = []
        with os.fdopen(read, "rb") as pipe:
            chunks.append(pipe.read())
        remaining = max(deadline - time.monotonic(), 0.1)
        _wait(pid, remaining)
        text = b"".join(chunks).decode().strip()
        results.append(json.loads(text) if text else {"reply": None, "error": "the client process died"})
    return results


def _wait(pid: int, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        done, _status = os.waitpid(pid, os.WNOHANG)
        if done:
            return
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def main(argv: Sequence[str]) -> int:
    if argv[:1] == ["listen"] and len(argv) >= 3:
        listen(argv[1], [int(p) for p in argv[2:]])
        return 0
    if argv[:1] == ["connect"]:
        specs = json.loads(sys.stdin.read())
        sys.stdout.write(json.dumps(connect_all(specs)) + "\n")
        return 0
    sys.stderr.write("usage: python -m meshredirect.testing.traffic listen NAME PORT... | connect < specs.json\n")
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
