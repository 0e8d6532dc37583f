"""Socket facts a transparent proxy needs: the original destination of a redirected connection, and
sockets opened with another owner.

>>> parse_sockaddr(bytes.fromhex("0200005004030201") + bytes(8))
(IPv4Address('4.3.2.1'), 80)
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

__all__ = [
    "IPV6_TRANSPARENT",
    "IP_TRANSPARENT",
    "SO_ORIGINAL_DST",
    "acting_as",
    "original_destination",
    "parse_sockaddr",
]

#: getsockopt(SOL_IP, SO_ORIGINAL_DST): the destination a NATed connection had before REDIRECT/DNAT
#: (linux/netfilter_ipv4.h); IPv6 uses the same number on SOL_IPV6 (IP6T_SO_ORIGINAL_DST).
SO_ORIGINAL_DST: Final = 80
#: setsockopt(SOL_IP, IP_TRANSPARENT): a socket may accept TPROXY-diverted connections (linux/in.h).
IP_TRANSPARENT: Final = 19
#: setsockopt(SOL_IPV6, IPV6_TRANSPARENT) (linux/in6.h).
IPV6_TRANSPARENT: Final = 75
_SOCKADDR_IN6: Final = 28

Address = tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]


def parse_sockaddr(raw: bytes) -> Address:
    """A ``struct sockaddr_in`` or ``sockaddr_in6`` as the kernel returns it: (address, port)."""
    family = struct.unpack_from("=H", raw)[0]
    port = struct.unpack_from("!H", raw, 2)[0]
    if family == socket.AF_INET6:
        return ipaddress.IPv6Address(raw[8:24]), port
    return ipaddress.IPv4Address(raw[4:8]), port


def original_destination(conn: socket.socket) -> tuple[Address, str]:
    """Where an accepted connection was going, and how that is known.

    A REDIRECTed connection: conntrack's original destination (``SO_ORIGINAL_DST``).
    A TPROXY-diverted one is not NATed: its local address is the original destination.
    """
    if conn.family == socket.AF_INET6:
        level, size = socket.IPPROTO_IPV6, _SOCKADDR_IN6
    else:
        level, size = socket.SOL_IP, 16
    local = conn.getsockname()
    here: Address = (ipaddress.ip_address(local[0]), local[1])
    try:
        found = parse_sockaddr(conn.getsockopt(level, SO_ORIGINAL_DST, size))
    except OSError:
        return here, "local address (not NATed)"
    if found == here:
        return here, "local address (not NATed)"
    return found, "SO_ORIGINAL_DST"


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


@contextmanager
def acting_as(uid: int | None, gid: int | None) -> Iterator[None]:
    """Within the block, files (and so sockets) the calling thread opens belong to ``uid``/``gid``.

    It changes the thread's filesystem ids (setfsuid/setfsgid act on the calling thread only),
    which is what ``-m owner`` and ``meta skuid`` read from a socket. Needs root.
    """
    libc = _libc()
    old_gid = libc.setfsgid(gid) if gid is not None else None
    old_uid = libc.setfsuid(uid) if uid is not None else None
    try:
        yield
    finally:
        if old_uid is not None:
            libc.setfsuid(old_uid)
        if old_gid is not None:
            libc.setfsgid(old_gid)
