"""``meshredirect trace``: one connection through a policy's rules, rule by rule, and on through the proxy.

Prints every rule the connection meets (matched or not) and the verdict,
then each follow-up connection the proxy opens for it, to the end of the
chain. A local connection is the default; ``--in-if`` (or ``--origin
remote``) makes it arrive from a peer. The connection's family is that of
``--dst`` (``--family`` is the policy's flag: the families it programs).
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from typing import Any, Final

from meshredirect.commands._policy_args import add_policy_arguments, policy_from_arguments

#: A peer's address when --src is not given for a remote connection (a documentation address).
DEFAULT_REMOTE_SOURCE: Final = {4: "203.0.113.10", 6: "2001:db8:ffff::10"}


def configure(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("the connection")
    group.add_argument("--dst", required=True, metavar="ADDR", help="destination address (required)")
    group.add_argument("--dport", default="80", metavar="PORT", help="destination port (80)")
    group.add_argument("--src", metavar="ADDR", help="source address (local: what the kernel picks; remote: a peer)")
    group.add_argument("--sport", default="43210", metavar="PORT", help="source port (43210)")
    group.add_argument(
        "--origin", choices=("local", "remote"), help="local socket or remote peer (local, or remote with --in-if)"
    )
    group.add_argument("--in-if", dest="in_if", metavar="IFACE", help="remote: the interface it arrives on (eth0)")
    group.add_argument("--out-if", dest="out_if", metavar="IFACE", help="local: the outgoing interface (the route's)")
    group.add_argument(
        "--uid", default="1000", metavar="UID", help="local: the socket's uid, or 'none' for no socket (1000)"
    )
    group.add_argument("--gid", metavar="GID", help="local: the socket's gid (the uid's value)")
    group.add_argument("--mark", default="0", metavar="MARK", help="local: the socket's mark (0)")
    group.add_argument("--protocol", default="tcp", choices=("tcp", "udp", "sctp", "icmp", "ipv6-icmp"), help="tcp")
    group.add_argument(
        "--no-follow", action="store_true", help="only the connection itself, not the proxy's follow-ups"
    )
    add_policy_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from meshredirect.compiler import compile_policy
    from meshredirect.semantics.interpreter import Interpreter
    from meshredirect.semantics.model import Environment
    from meshredirect.semantics.proxy import follow

    policy = policy_from_arguments(args)
    connection = connection_from_arguments(args, Environment.for_policy(policy))
    ruleset = compile_policy(policy)
    env = Environment.for_policy(policy, ruleset)
    interpreter = Interpreter(ruleset, env)
    if args.no_follow:
        sys.stdout.write(f"connection: {connection}\n{interpreter.evaluate(connection).explain()}\n")
        return 0
    chain = follow(interpreter, connection)
    sys.stdout.write(render_chain(chain))
    return 0


def render_chain(chain: Any) -> str:
    """Each step's trace, then what happens next."""
    from meshredirect.semantics.proxy import Arrival

    out: list[str] = []
    for index, step in enumerate(chain.steps, 1):
        out.append(f"connection {index}: {step.connection}")
        out.append(step.evaluation.explain())
        following = index < len(chain.steps)
        if step.captured and step.arrival.proxy:
            what = f"=> captured to the proxy's {step.arrival.value}"
        elif step.arrival is Arrival.LOCAL:
            what = "=> delivered to a local listener"
        else:
            what = f"=> {step.arrival.value}"
        if step.note:
            what += f" ({step.note})"
        if following:
            what += f"; the proxy opens connection {index + 1}"
        out.append(what)
        out.append("")
    if chain.looped:
        cycle = chain.cycle()
        where = f": connection {cycle[1]} is connection {cycle[0]} again" if cycle else ""
        out.append(f"LOOP: the chain does not end{where}")
    return "\n".join(out).rstrip("\n") + "\n"


def connection_from_arguments(args: argparse.Namespace, env: Any) -> Any:
    """The connection the flags describe; bad values raise errors that name the flag."""
    from meshredirect.errors import PolicyError
    from meshredirect.ir import Protocol
    from meshredirect.semantics.model import Connection, Origin, family_of

    dst = _address("--dst", args.dst)
    family = family_of(dst)  # (--family is the policy's: the families it programs)
    protocol = Protocol(args.protocol)
    ported = protocol in (Protocol.TCP, Protocol.UDP, Protocol.SCTP)
    dport = _number("--dport", args.dport, 1, 65535) if ported else 0
    sport = _number("--sport", args.sport, 1, 65535) if ported else 0
    origin = Origin(args.origin) if args.origin else (Origin.REMOTE if args.in_if else Origin.LOCAL)
    if origin is Origin.REMOTE:
        for flag, value in (("--out-if", args.out_if),):
            if value is not None:
                raise PolicyError(flag, expected="no value for a remote connection (use --in-if)", got=value)
        src = _address("--src", args.src or DEFAULT_REMOTE_SOURCE[dst.version])
        _same_family("--src", src, dst)
        iif = args.in_if or env.default_interface
        return Connection(
            family=family, protocol=protocol, src=src, sport=sport, dst=dst, dport=dport, origin=origin, iif=iif
        )
    if args.in_if is not None:
        raise PolicyError("--in-if", expected="no value for a local connection (use --out-if)", got=args.in_if)
    mark = _number("--mark", args.mark, 0, 2**32 - 1)
    uid: int | None = None
    gid: int | None = None
    if str(args.uid).strip().lower() != "none":
        uid = _number("--uid", args.uid, 0, 2**32 - 2)
        gid = _number("--gid", args.gid, 0, 2**32 - 2) if args.gid is not None else uid
    elif args.gid is not None:
        raise PolicyError("--gid", expected="no value with --uid none (a packet without a socket)", got=args.gid)
    src = _address("--src", args.src) if args.src else None
    if src is not None:
        _same_family("--src", src, dst)
    return Connection.local(
        env, dst=dst, dport=dport, src=src, sport=sport, uid=uid, gid=gid, protocol=protocol, mark=mark, oif=args.out_if
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
