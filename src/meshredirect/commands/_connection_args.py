"""The flags that describe one connection, shared by the commands that take one (``trace``, ``graph --trace``).

A local connection is the default; ``--in-if`` (or ``--origin remote``) makes
it arrive from a peer. Its family is that of ``--dst``. Flags left out take
the defaults their help names, applied by :func:`connection_from_arguments`
(the parser keeps None, so a command can tell whether a flag was given).
Bad values raise errors that name the flag, what was expected and what was
given.
"""

from __future__ import annotations

import argparse
import ipaddress
from typing import Any, Final

__all__ = ["CONNECTION_FLAGS", "add_connection_arguments", "connection_from_arguments", "given_connection_flags"]

#: A peer's address when --src is not given for a remote connection (a documentation address).
DEFAULT_REMOTE_SOURCE: Final = {4: "203.0.113.10", 6: "2001:db8:ffff::10"}
#: Flag -> (attribute, default applied when it is not given).
CONNECTION_FLAGS: Final[dict[str, tuple[str, str | None]]] = {
    "--dst": ("dst", None),
    "--dport": ("dport", "80"),
    "--src": ("src", None),
    "--sport": ("sport", "43210"),
    "--origin": ("origin", None),
    "--in-if": ("in_if", None),
    "--out-if": ("out_if", None),
    "--uid": ("uid", "1000"),
    "--gid": ("gid", None),
    "--mark": ("mark", "0"),
    "--protocol": ("protocol", "tcp"),
}
PROTOCOLS: Final = ("tcp", "udp", "sctp", "icmp", "ipv6-icmp")


def add_connection_arguments(parser: argparse.ArgumentParser, *, required: bool) -> argparse._ArgumentGroup:
    """The connection's flags, in a group of their own (returned, so a command can add to it)."""
    group = parser.add_argument_group("the connection")
    group.add_argument(
        "--dst", required=required, metavar="ADDR", help="destination address" + (" (required)" if required else "")
    )
    group.add_argument("--dport", metavar="PORT", help="destination port (80)")
    group.add_argument("--src", metavar="ADDR", help="source address (local: what the kernel picks; remote: a peer)")
    group.add_argument("--sport", metavar="PORT", help="source port (43210)")
    group.add_argument(
        "--origin", choices=("local", "remote"), help="local socket or remote peer (local, or remote with --in-if)"
    )
    group.add_argument("--in-if", dest="in_if", metavar="IFACE", help="remote: the interface it arrives on (eth0)")
    group.add_argument("--out-if", dest="out_if", metavar="IFACE", help="local: the outgoing interface (the route's)")
    group.add_argument("--uid", metavar="UID", help="local: the socket's uid, or 'none' for no socket (1000)")
    group.add_argument("--gid", metavar="GID", help="local: the socket's gid (the uid's value)")
    group.add_argument("--mark", metavar="MARK", help="local: the socket's mark (0)")
    group.add_argument("--protocol", choices=PROTOCOLS, help="tcp")
    return group


def given_connection_flags(args: argparse.Namespace) -> list[str]:
    """The connection flags given on the command line, in the order of their definitions."""
    return [flag for flag, (name, _) in CONNECTION_FLAGS.items() if getattr(args, name, None) is not None]


def _value(args: argparse.Namespace, flag: str) -> Any:
    name, default = CONNECTION_FLAGS[flag]
    value = getattr(args, name, None)
    return default if value is None else value


def connection_from_arguments(args: argparse.Namespace, env: Any) -> Any:
    """The connection the flags describe, in the pod ``env``; bad values raise errors that name the flag.

    >>> from meshredirect.semantics.model import Environment
    >>> args = argparse.Namespace(dst="93.184.216.34", dport="443")
    >>> str(connection_from_arguments(args, Environment.default()))
    'tcp 10.0.0.5:43210 -> 93.184.216.34:443 local uid=1000 gid=1000 out eth0'
    """
    from meshredirect.errors import PolicyError
    from meshredirect.ir import Protocol
    from meshredirect.semantics.model import Connection, Origin, family_of

    if _value(args, "--dst") is None:
        raise PolicyError("--dst", expected="the connection's destination address", got=None)
    dst = _address("--dst", _value(args, "--dst"))
    family = family_of(dst)  # (--family is the policy's: the families it programs)
    protocol = Protocol(_value(args, "--protocol"))
    ported = protocol in (Protocol.TCP, Protocol.UDP, Protocol.SCTP)
    dport = _number("--dport", _value(args, "--dport"), 1, 65535) if ported else 0
    sport = _number("--sport", _value(args, "--sport"), 1, 65535) if ported else 0
    in_if, out_if, src_text = _value(args, "--in-if"), _value(args, "--out-if"), _value(args, "--src")
    origin_text = _value(args, "--origin")
    origin = Origin(origin_text) if origin_text else (Origin.REMOTE if in_if else Origin.LOCAL)
    if origin is Origin.REMOTE:
        if out_if is not None:
            raise PolicyError("--out-if", expected="no value for a remote connection (use --in-if)", got=out_if)
        src = _address("--src", src_text or DEFAULT_REMOTE_SOURCE[dst.version])
        _same_family("--src", src, dst)
        iif = in_if or env.default_interface
        return Connection(
            family=family, protocol=protocol, src=src, sport=sport, dst=dst, dport=dport, origin=origin, iif=iif
        )
    if in_if is not None:
        raise PolicyError("--in-if", expected="no value for a local connection (use --out-if)", got=in_if)
    mark = _number("--mark", _value(args, "--mark"), 0, 2**32 - 1)
    uid: int | None = None
    gid: int | None = None
    uid_text, gid_text = _value(args, "--uid"), _value(args, "--gid")
    if str(uid_text).strip().lower() != "none":
        uid = _number("--uid", uid_text, 0, 2**32 - 2)
        gid = _number("--gid", gid_text, 0, 2**32 - 2) if gid_text is not None else uid
    elif gid_text is not None:
        raise PolicyError("--gid", expected="no value with --uid none (a packet without a socket)", got=gid_text)
    src = _address("--src", src_text) if src_text else None
    if src is not None:
        _same_family("--src", src, dst)
    return Connection.local(
        env, dst=dst, dport=dport, src=src, sport=sport, uid=uid, gid=gid, protocol=protocol, mark=mark, oif=out_if
    )


def _address(flag: str, text: str) -> Any:
    from meshredirect.errors import PolicyError

    try:
        return ipaddress.ip_address(str(text).strip())
    except ValueError:
        raise PolicyError(flag, expected="an IPv4 or IPv6 address", got=text) from None


def _same_family(flag: str, address: Any, dst: Any) -> None:
    from meshredirect.errors import PolicyError

    if address.version != dst.version:
        raise PolicyError(flag, expected=f"an IPv{dst.version} address, like --dst", got=str(address))


def _number(flag: str, text: str, low: int, high: int) -> int:
    from meshredirect.errors import PolicyError

    value = str(text).strip()
    try:
        number = int(value, 0)
    except ValueError:
        raise PolicyError(flag, expected=f"a number {low}-{high}", got=text) from None
    if not low <= number <= high:
        raise PolicyError(flag, expected=f"a number {low}-{high}", got=text)
    return number
