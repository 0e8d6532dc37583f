"""``meshredirect validate``: check with real connections that capture works in a network namespace.

Exit status 0 when every check passes, 1 when one fails (the message names
the likely cause), 3 when the check cannot run.
"""

from __future__ import annotations

import argparse

from meshredirect.commands._apply_args import add_target_arguments, variant_of
from meshredirect.commands._policy_args import add_policy_arguments, policy_from_arguments


def configure(parser: argparse.ArgumentParser) -> None:
    from meshredirect.apply.validation import DEFAULT_PROBE_PORT, DEFAULT_TIMEOUT

    add_target_arguments(parser, dry_run=False)
    group = parser.add_argument_group("probe")
    group.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT, help=f"seconds per check (default {DEFAULT_TIMEOUT:g})"
    )
    group.add_argument(
        "--probe-address",
        action="append",
        default=[],
        metavar="ADDR",
        help="destination of the outbound probe, one per family (default 192.0.2.1 and 2001:db8::1)",
    )
    group.add_argument(
        "--probe-port", type=int, default=DEFAULT_PROBE_PORT, help=f"probe port (default {DEFAULT_PROBE_PORT})"
    )
    add_policy_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import ipaddress

    from meshredirect.apply.validation import validate
    from meshredirect.errors import PolicyError
    from meshredirect.ir import Family

    if args.backend not in ("iptables", "nftables"):
        raise PolicyError("--backend", expected="iptables or nftables", got=args.backend)
    if not args.timeout > 0:
        raise PolicyError("--timeout", expected="a positive number of seconds", got=args.timeout)
    probes = {}
    for text in args.probe_address:
        try:
            address = ipaddress.ip_address(text.strip())
        except ValueError:
            raise PolicyError("--probe-address", expected="an IPv4 or IPv6 address", got=text) from None
        probes[Family.IPV4 if address.version == 4 else Family.IPV6] = address
    policy = policy_from_arguments(args)
    result = validate(
        policy,
        netns=args.netns,
        timeout=args.timeout,
        probe=probes,
        probe_port=args.probe_port,
        variant=variant_of(args),
        backend=args.backend,
    )
    print(result.report())
    return 0 if result.ok else 1
