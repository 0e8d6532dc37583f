"""Small actors for real-traffic tests: a server, a sidecar-like proxy and a client. Run as a script.

``server``: answers each connection with one JSON line naming itself and the peer it saw.
``proxy``: listens on the outbound and inbound ports (IPv4 and IPv6 loopback), drops to the
proxy's uid/gid, reads ``SO_ORIGINAL_DST`` of each accepted connection and forwards to it (the
inbound side from the passthrough address 127.0.0.6 / ::6), answering with what it did and what
upstream answered. It counts the connections it accepted and stops forwarding after
``--max-hops``, so a loop ends by itself. Every accept is logged as a JSON line on stdout.
``client``: connects to each target as the given uid/gid (with ``"mark"``: from a socket with that
SO_MARK) and prints one JSON list of results; a
target with ``"udp": true`` sends one datagram (``"connected"``: through connect()) and records
the answer and the address it came from.
Servers (``--udp``) and the proxy (``--dns PORT``, UDP and TCP) answer datagrams too.

Importing this module does nothing (pytest imports it to look for doctests).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import socket
import struct
import sys
import threading
from typing import Any, Final

SO_ORIGINAL_DST: Final = 80
SOL_IPV6: Final = 41
PASSTHROUGH: Final = {4: "127.0.0.6", 6: "::6"}
LOOPBACK: Final = {4: "127.0.0.1", 6: "::1"}
TIMEOUT: Final = 5.0


def _family(address: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET


def _drop_to(uid: int, gid: int) -> None:
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def _exchange(sock: socket.socket, request: dict[str, Any]) -> dict[str, Any]:
    sock.sendall(json.dumps(request).encode() + b"\n")
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return json.loads(data) if data.strip() else {"error": "empty answer"}


def _read_line(conn: socket.socket) -> dict[str, Any]:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return json.loads(data) if data.strip() else {}


def _original_destination(conn: socket.socket, version: int) -> tuple[str, int] | str:
    try:
        if version == 4:
            raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            port, address = struct.unpack("!2xH4s8x", raw)
            return socket.inet_ntop(socket.AF_INET, address), port
        raw = conn.getsockopt(SOL_IPV6, SO_ORIGINAL_DST, 28)
        port, _flow, address = struct.unpack("!2xHI16s4x", raw)
        return socket.inet_ntop(socket.AF_INET6, address), port
    except OSError as exc:
        return f"SO_ORIGINAL_DST failed: {exc.strerror}"


def _answer_datagrams(sock: socket.socket, name: str) -> None:
    while True:
        _data, peer = sock.recvfrom(65536)
        sock.sendto(json.dumps({"who": name, "peer": list(peer[:2])}).encode() + b"\n", peer)


def _udp_sockets(addresses: list[str], port: int) -> list[socket.socket]:
    sockets = []
    for address in addresses:
        sock = socket.socket(_family(address), socket.SOCK_DGRAM)
        if _family(address) == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address, port))
        sockets.append(sock)
    return sockets


def serve(args: argparse.Namespace) -> None:
    for sock in _udp_sockets(args.listen, args.port) if args.udp else []:
        threading.Thread(target=_answer_datagrams, args=(sock, args.name), daemon=True).start()
    listeners = []
    for address in args.listen:
        sock = socket.socket(_family(address), socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if _family(address) == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address, args.port))
        sock.listen(128)
        listeners.append(sock)
    print(json.dumps({"ready": args.name}), flush=True)

    def loop(sock: socket.socket) -> None:
        while True:
            conn, peer = sock.accept()
            with conn:
                _read_line(conn)
                conn.sendall(json.dumps({"who": args.name, "peer": list(peer[:2])}).encode() + b"\n")

    threads = [threading.Thread(target=loop, args=(s,), daemon=True) for s in listeners]
    for thread in threads:
        thread.start()
    threads[0].join()


def proxy(args: argparse.Namespace) -> None:
    accepted = 0
    lock = threading.Lock()
    listeners = []
    for role, port in (("outbound", args.outbound), ("inbound", args.inbound)):
        for version in (4, 6):
            sock = socket.socket(socket.AF_INET if version == 4 else socket.AF_INET6, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((LOOPBACK[version], port))
            sock.listen(128)
            listeners.append((role, version, sock))
    dns_tcp = []
    if args.dns:
        for sock in _udp_sockets(list(LOOPBACK.values()), args.dns):
            threading.Thread(target=_answer_datagrams, args=(sock, "proxy-dns"), daemon=True).start()
        for address in LOOPBACK.values():
            sock = socket.socket(_family(address), socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((address, args.dns))
            sock.listen(128)
            dns_tcp.append(sock)
    _drop_to(args.uid, args.gid)
    print(json.dumps({"ready": "proxy", "uid": os.getuid(), "gid": os.getgid()}), flush=True)

    def handle(role: str, version: int, conn: socket.socket, peer: Any) -> None:
        nonlocal accepted
        with conn:
            conn.settimeout(TIMEOUT)
            with lock:
                accepted += 1
                hop = accepted
            original = _original_destination(conn, version)
            print(json.dumps({"accept": role, "hop": hop, "original": original, "peer": list(peer[:2])}), flush=True)
            request = _read_line(conn)
            answer: dict[str, Any] = {"who": f"proxy-{role}", "hop": hop, "original": original, "peer": list(peer[:2])}
            if isinstance(original, str):
                answer["error"] = original
            elif hop > args.max_hops:
                answer["error"] = "hop limit"
            else:
                try:
                    upstream = socket.socket(_family(original[0]), socket.SOCK_STREAM)
                    upstream.settimeout(TIMEOUT)
                    if role == "inbound":
                        upstream.bind((PASSTHROUGH[6 if ":" in original[0] else 4], 0))
                    with upstream:
                        upstream.connect(original)
                        answer["upstream"] = _exchange(upstream, request)
                except OSError as exc:
                    answer["error"] = f"upstream: {exc}"
            conn.sendall(json.dumps(answer).encode() + b"\n")

    def loop(role: str, version: int, sock: socket.socket) -> None:
        while True:
            conn, peer = sock.accept()
            threading.Thread(target=handle, args=(role, version, conn, peer), daemon=True).start()

    def dns_loop(sock: socket.socket) -> None:
        while True:
            conn, peer = sock.accept()
            with conn:
                _read_line(conn)
                conn.sendall(json.dumps({"who": "proxy-dns", "peer": list(peer[:2])}).encode() + b"\n")

    for sock in dns_tcp:
        threading.Thread(target=dns_loop, args=(sock,), daemon=True).start()

    threads = [threading.Thread(target=loop, args=item, daemon=True) for item in listeners]
    for thread in threads:
        thread.start()
    threads[0].join()


def client(args: argparse.Namespace) -> None:
    targets = json.loads(args.targets)
    # SO_MARK needs CAP_NET_ADMIN: marked sockets are made before the drop to the client's ids
    # (what counts at connect() is the task's ids then).
    premade: dict[int, socket.socket] = {}
    for index, target in enumerate(targets):
        if target.get("mark"):
            sock = socket.socket(_socket_family(target), socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, target["mark"])
            premade[index] = sock
    if args.uid is not None:
        _drop_to(args.uid, args.gid)
    results = []
    for index, target in enumerate(targets):
        family = _socket_family(target)
        result: dict[str, Any] = {"target": target}
        if target.get("udp"):
            results.append(_datagram(family, target, result))
            continue
        try:
            with premade.get(index) or socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.settimeout(TIMEOUT)
                if target.get("bind"):
                    sock.bind((target["bind"], 0))
                sock.connect((target["address"], target["port"]))
                result["peer"] = list(sock.getpeername()[:2])
                result["reply"] = _exchange(sock, {"hello": target["address"]})
        except OSError as exc:
            result["error"] = str(exc)
        results.append(result)
    print(json.dumps(results), flush=True)


def _socket_family(target: dict[str, Any]) -> int:
    return socket.AF_INET6 if target.get("socket") == 6 or ":" in target["address"] else socket.AF_INET


def _datagram(family: int, target: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.settimeout(TIMEOUT)
            address = (target["address"], target["port"])
            if target.get("connected"):
                sock.connect(address)
                result["peer"] = list(sock.getpeername()[:2])
                sock.send(b"query")
            else:
                sock.sendto(b"query", address)
            data, source = sock.recvfrom(65536)
            result["from"] = list(source[:2])
            result["reply"] = json.loads(data)
    except OSError as exc:
        result["error"] = str(exc)
    return result


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="role", required=True)
    s = sub.add_parser("server")
    s.add_argument("--name", required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--listen", action="append", required=True)
    s.add_argument("--udp", action="store_true")
    p = sub.add_parser("proxy")
    p.add_argument("--outbound", type=int, default=15001)
    p.add_argument("--inbound", type=int, default=15006)
    p.add_argument("--uid", type=int, default=1337)
    p.add_argument("--gid", type=int, default=1337)
    p.add_argument("--max-hops", type=int, default=5)
    p.add_argument("--dns", type=int)
    c = sub.add_parser("client")
    c.add_argument("--targets", required=True)
    c.add_argument("--uid", type=int)
    c.add_argument("--gid", type=int)
    args = parser.parse_args(argv)
    {"server": serve, "proxy": proxy, "client": client}[args.role](args)


if __name__ == "__main__":
    main(sys.argv[1:])
