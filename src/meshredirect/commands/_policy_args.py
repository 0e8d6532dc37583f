"""Policy flags shared by the commands that take a policy (``compile``, ``check``, ``trace``...).

Short letters follow ``istio-iptables`` where it has one; every field of
:class:`meshredirect.policy.Policy` has a flag. Values are validated by the
policy itself, so errors name the field, what was expected and what was given.
"""

from __future__ import annotations

import argparse
from typing import Any, Final

#: flag -> (policy field, short flag or None, help)
FLAGS: Final[dict[str, tuple[str, str | None, str]]] = {
    "--outbound-port": ("outbound_port", "-p", "port captured outbound connections go to (15001)"),
    "--inbound-port": ("inbound_port", "-z", "port captured inbound connections go to (15006)"),
    "--tunnel-port": ("inbound_tunnel_port", "-e", "the proxy's tunnel port, never captured; 'none' for none (15008)"),
    "--proxy-uid": ("proxy_uids", "-u", "uids of the proxy, comma separated (1337)"),
    "--proxy-gid": ("proxy_gids", "-g", "gids of the proxy, comma separated (1337)"),
    "--inbound-mode": ("inbound_mode", "-m", "REDIRECT or TPROXY"),
    "--tproxy-mark": ("tproxy_mark", "-t", "TPROXY mark (1337)"),
    "--tproxy-route-table": ("tproxy_route_table", "-r", "TPROXY route table (133)"),
    "--inbound-ports": ("inbound_ports", "-b", "inbound ports captured: '*' or a list; '' for none ('*')"),
    "--inbound-ports-exclude": ("inbound_ports_exclude", "-d", "inbound ports left alone with '*' (15090,15021,15020)"),
    "--outbound-cidrs": ("outbound_cidrs", "-i", "outbound CIDRs captured: '*' or a list; '' for none ('*')"),
    "--outbound-cidrs-exclude": ("outbound_cidrs_exclude", "-x", "outbound CIDRs never captured"),
    "--outbound-ports": ("outbound_ports", "-q", "outbound ports captured whatever the address"),
    "--outbound-ports-exclude": ("outbound_ports_exclude", "-o", "outbound ports never captured"),
    "--exclude-interfaces": ("exclude_interfaces", "-c", "interfaces whose traffic is never captured"),
    "--reroute-interfaces": ("reroute_interfaces", "-k", "interfaces whose inbound traffic is treated as outbound"),
    "--owner-groups-include": ("owner_groups_include", None, "only these groups are captured outbound ('*')"),
    "--owner-groups-exclude": ("owner_groups_exclude", None, "these groups are never captured outbound"),
    "--loopback-cidr": ("loopback_cidr", None, "IPv4 destinations that count as localhost (127.0.0.1/32)"),
    "--loopback-capture": ("loopback_capture", None, "local connections over lo captured inbound: proxy or all"),
    "--passthrough-ipv4": ("passthrough_ipv4", None, "the proxy's inbound passthrough source (127.0.0.6)"),
    "--passthrough-ipv6": ("passthrough_ipv6", None, "the same for IPv6 (::6)"),
    "--chain-prefix": ("chain_prefix", None, "prefix of our chain names (ISTIO)"),
    "--family": ("families", None, "families programmed: ipv4, ipv6 or both (ipv4)"),
}
BOOLEAN_FLAGS: Final[dict[str, tuple[str, str]]] = {
    "--drop-invalid": ("drop_invalid", "drop packets conntrack finds INVALID"),
    "--one-rule-per-port": ("one_rule_per_port", "layout: one rule per port instead of multiport"),
}
DNS_FLAGS: Final[dict[str, tuple[str, str]]] = {
    "--redirect-dns": ("enabled", "capture DNS to the agent's resolver"),
    "--capture-all-dns": ("capture_all", "capture every DNS query, not only those to --dns-servers"),
}


def add_policy_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("policy (defaults: Istio's production setting)")
    group.add_argument("--preset", help="start from a preset: istio (default), istio-1.4, linkerd, kuma")
    group.add_argument("--policy", metavar="FILE", help="start from a policy file ('-' for standard input)")
    group.add_argument(
        "--from-pod",
        metavar="FILE",
        help="start from a pod manifest's Istio annotations and container ports (JSON or YAML; '-' for standard input)",
    )
    group.add_argument(
        "--pod-inbound-default",
        choices=("container-ports", "*"),
        default="container-ports",
        help="with --from-pod, the inbound ports without an includeInboundPorts annotation (default: container-ports)",
    )
    for flag, (field, short, text) in FLAGS.items():
        names = [short, flag] if short else [flag]
        group.add_argument(*names, dest=f"policy_{field}", metavar="VALUE", help=text)
    for flag, (field, text) in BOOLEAN_FLAGS.items():
        group.add_argument(flag, dest=f"policy_{field}", action="store_const", const=True, help=text)
    for flag, (field, text) in DNS_FLAGS.items():
        group.add_argument(flag, dest=f"dns_{field}", action="store_const", const=True, help=text)
    group.add_argument("--dns-servers", dest="dns_servers", metavar="ADDRS", help="DNS servers to capture queries to")
    group.add_argument("--dns-port", dest="dns_port", metavar="PORT", help="the agent's DNS port (15053)")


def policy_from_arguments(args: argparse.Namespace, *, base: Any = None, resolve: bool = True) -> Any:
    """Build the policy the flags describe, over ``base`` (default: :func:`base_policy`); group names are
    resolved on this machine unless ``resolve`` is false."""
    import attrs

    from meshredirect.api import resolve_groups
    from meshredirect.policy import DnsCapture

    policy = base_policy(args) if base is None else base
    changes: dict[str, object] = {}
    for key, value in vars(args).items():
        if key.startswith("policy_") and value is not None:
            field = key.removeprefix("policy_")
            if field == "inbound_tunnel_port" and str(value).strip().lower() in ("none", ""):
                value = None
            if field == "families" and str(value).strip().lower() == "both":
                value = "dual"
            changes[field] = value
    dns = {
        key.removeprefix("dns_"): value
        for key, value in vars(args).items()
        if key.startswith("dns_") and value is not None
    }
    if dns:
        changes["dns"] = DnsCapture(**{**attrs.asdict(policy.dns, recurse=False), **dns})
    if changes:
        policy = attrs.evolve(policy, **changes)
    if resolve and policy.unresolved_groups():
        policy = resolve_groups(policy, _system_group)
    return policy


def base_policy(args: argparse.Namespace) -> Any:
    """The policy the flags start from: a policy file, a pod manifest or a preset (one of them)."""
    import sys

    from meshredirect.errors import PolicyError
    from meshredirect.presets import preset

    sources = (("--policy", args.policy), ("--from-pod", args.from_pod), ("--preset", args.preset))
    given = [f"{flag} {value}" for flag, value in sources if value]
    if len(given) > 1:
        raise PolicyError("--policy/--from-pod/--preset", expected="at most one of them", got=", ".join(given))
    if args.policy:
        from meshredirect.frontends.policy_file import parse_policy

        return parse_policy(read_input(args.policy, "--policy"), path=_shown(args.policy))
    if args.from_pod:
        from meshredirect.frontends.pod import read_pod

        policy, warnings = read_pod(
            read_input(args.from_pod, "--from-pod"),
            path=_shown(args.from_pod),
            inbound_default=args.pod_inbound_default,
        )
        for warning in warnings:
            print(f"meshredirect: warning: {warning}", file=sys.stderr)
        return policy
    return preset(args.preset or "istio")


def read_input(path: str, flag: str) -> str:
    """The text of a file named on the command line ('-' for standard input); unreadable is bad input."""
    import sys

    from meshredirect.errors import PolicyError

    if path == "-":
        return sys.stdin.read()
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise PolicyError(flag, expected="a readable UTF-8 file", got=f"{path} ({reason})") from None


def _shown(path: str) -> str:
    return "<stdin>" if path == "-" else path


def _system_group(name: str) -> int | None:
    import grp

    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None
