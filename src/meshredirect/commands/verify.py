"""``meshredirect verify FILE|-``: prove that rules read from a node neither loop nor let the proxy's traffic
be captured again.

The rules are a node's (or a pod's) ``iptables-save`` output, ``iptables -S`` output or restore input. The
mesh is found in them: the ports connections are redirected to, the uids and gids the outbound capture
exempts, the source address let through over ``lo``; flags state what the rules do not say or say
differently. Every class of connections is then followed through the rules and the proxy (the semantics
engine's ``check``): loop-freedom, at most one outbound and one inbound capture per connection, the
proxy's own traffic never sent to the outbound port, the inbound passthrough always passing, no other
re-capture of the proxy's traffic, the proxy's ports and DNS never captured. Each violation is printed
with a concrete connection, its chain of interceptions and the trace of every step.

Exit status: 0 every property holds, 1 a violation (or a verdict that cannot be decided), 2 bad input
(including rules in which no mesh is found and none is stated).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from meshredirect.commands._rules_args import STDIN, add_rules_arguments, read_rules
from meshredirect.commands.trace import elision

#: Violations shown per property (the rest are counted).
DEFAULT_EXAMPLES = 3


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Prove that a node's rules neither loop nor capture the proxy's own traffic again: find the mesh in "
        "them, follow every class of connections through the rules and the proxy, and print each violation "
        "with a concrete connection and its trace. Exit status: 0 verified, 1 a violation, 2 bad input."
    )
    parser.add_argument(
        "file",
        metavar="FILE",
        help="the rules (iptables-save, iptables -S or restore input, nft -j output; '-': stdin)",
    )
    group = parser.add_argument_group("the proxy (default: what the rules say)")
    group.add_argument("-u", "--proxy-uid", metavar="IDS", help="uids of the proxy, comma separated")
    group.add_argument("-g", "--proxy-gid", metavar="IDS", help="gids of the proxy, comma separated")
    group.add_argument("-p", "--outbound-port", metavar="PORT", help="the port outbound connections are captured to")
    group.add_argument("-z", "--inbound-port", metavar="PORT", help="the port inbound connections are captured to")
    group.add_argument("-e", "--tunnel-port", metavar="PORT", help="the proxy's tunnel port, never to be captured")
    group.add_argument("--dns-port", metavar="PORT", help="the port DNS queries are captured to")
    group.add_argument(
        "--passthrough", metavar="ADDR", action="append", default=[],
        help="the source of the proxy's inbound passthrough over lo (127.0.0.6, ::6); repeat for both families",
    )  # fmt: skip
    parser.add_argument(
        "--examples",
        type=int,
        default=DEFAULT_EXAMPLES,
        metavar="N",
        help=f"violations shown per property ({DEFAULT_EXAMPLES})",
    )
    from meshredirect.commands.trace import add_all_rules_argument

    add_all_rules_argument(parser)
    add_rules_arguments(parser)


def _port(value: str | None, flag: str) -> int | None:
    from meshredirect.errors import PolicyError
    from meshredirect.values import MAX_PORT

    if value is None:
        return None
    if not value.isdigit() or not 1 <= int(value) <= MAX_PORT:
        raise PolicyError(flag, expected=f"a port number 1-{MAX_PORT}", got=value)
    return int(value)


def _ids(value: str | None, flag: str) -> Any:
    from meshredirect.values import IdSet

    return None if value is None else IdSet.parse(value, field=flag)


def _addresses(values: list[str]) -> list[Any]:
    import ipaddress

    from meshredirect.errors import PolicyError

    out = []
    for value in values:
        try:
            out.append(ipaddress.ip_address(value))
        except ValueError:
            raise PolicyError("--passthrough", expected="an IPv4 or IPv6 address", got=value) from None
    return out


def run(args: argparse.Namespace) -> int:
    from meshredirect.errors import PolicyError
    from meshredirect.node import verify_rules

    stated = {
        "uids": _ids(args.proxy_uid, "--proxy-uid"),
        "gids": _ids(args.proxy_gid, "--proxy-gid"),
        "outbound_port": _port(args.outbound_port, "--outbound-port"),
        "inbound_port": _port(args.inbound_port, "--inbound-port"),
        "tunnel_port": _port(args.tunnel_port, "--tunnel-port"),
        "dns_port": _port(args.dns_port, "--dns-port"),
    }
    passthrough = _addresses(args.passthrough)
    if args.examples < 0:
        raise PolicyError("--examples", expected="a number 0 or more", got=args.examples)
    ruleset = read_rules(args.file, args)
    label = "stdin" if args.file == STDIN else args.file
    from meshredirect.node import detect_mesh

    found = detect_mesh(ruleset)
    if not found.found and stated["outbound_port"] is None and stated["inbound_port"] is None:
        raise PolicyError(
            label,
            expected="rules that redirect connections to a proxy (REDIRECT or TPROXY to a local port), "
            "or the proxy's ports (--outbound-port, --inbound-port)",
            got=f"{sum(1 for _ in ruleset.rules())} rules without one",
        )
    verification = verify_rules(ruleset, passthrough=passthrough, **stated)
    out = sys.stdout
    for line in _describe(
        label, ruleset, found=found, verification=verification, stated=stated, passthrough=passthrough
    ):
        print(line, file=out)
    print(file=out)
    print(verification.report.summary(examples=args.examples, **elision(args)), file=out)
    print(file=out)
    count = len(verification.report.violations)
    if verification.ok:
        print(f"verified: {label} holds every property", file=out)
        return 0
    print(f"NOT verified: {count} class{'es' if count != 1 else ''} of connections violate a property", file=out)
    return 1


def _describe(
    label: str, ruleset: Any, *, found: Any, verification: Any, stated: dict[str, Any], passthrough: list[Any]
) -> list[str]:
    """What was read and what the proof assumes, each value marked as found in the rules or stated."""
    mesh, proxy = verification.mesh, verification.env.proxy
    rules = sum(1 for _ in ruleset.rules())
    tables = ", ".join(f"{t.family.value} {t.name}" for t in ruleset.tables)
    lines = [f"read {label}: {rules} rules ({tables})"]

    def origin(key: str, detected: object) -> str:
        if stated.get(key) is not None:
            return "stated"
        return "found in the rules" if detected not in (None, "") else "assumed: not found in the rules"

    chains = ", ".join(mesh.chains) if mesh.chains else "none"
    lines.append(f"mesh chains: {chains}")
    lines.append(f"  outbound port {proxy.outbound_port} ({origin('outbound_port', found.outbound_port)})")
    mode = "TPROXY" if proxy.transparent else "REDIRECT"
    lines.append(f"  inbound port {proxy.inbound_port}, {mode} ({origin('inbound_port', found.inbound_port)})")
    uids = str(proxy.uids) or f"{proxy.uid}"
    gids = str(proxy.gids) or f"{proxy.gid}"
    lines.append(
        f"  proxy uid {uids} ({origin('uids', str(found.uids))}), gid {gids} ({origin('gids', str(found.gids))})"
    )
    shown = ", ".join(str(a) for a in (proxy.passthrough_ipv4, proxy.passthrough_ipv6))
    lines.append(
        f"  inbound passthrough from {shown} over lo ({'stated' if passthrough else origin('', found.passthrough or None)})"
    )
    if proxy.dns_port is not None:
        lines.append(f"  DNS port {proxy.dns_port} ({origin('dns_port', found.dns_port)})")
    if verification.env.rerouted_interfaces:
        names = ", ".join(verification.env.rerouted_interfaces)
        lines.append(f"  traffic arriving on {names} treated as outbound (found in the rules)")
    if proxy.tunnel_port is not None:
        lines.append(f"  tunnel port {proxy.tunnel_port} (stated)")
    return lines
