"""Options shared by the commands that act on a kernel (``apply``, ``cleanup``, ``validate``)."""

from __future__ import annotations

import argparse


def add_target_arguments(parser: argparse.ArgumentParser, *, dry_run: bool = True) -> None:
    group = parser.add_argument_group("where and how")
    group.add_argument(
        "--netns",
        metavar="PATH",
        help="network namespace to act in: /var/run/netns/NAME, /proc/PID/ns/net or a name (default: the current one)",
    )
    group.add_argument(
        "--backend",
        default="iptables",
        metavar="NAME",
        help="kernel interface: iptables (default) or nftables",
    )
    group.add_argument(
        "--iptables-variant",
        default="auto",
        metavar="VARIANT",
        help="nft, legacy or auto (default: legacy when the legacy tables already hold rules, else nft)",
    )
    if dry_run:
        group.add_argument("--dry-run", action="store_true", help="print what would be loaded and run; change nothing")


def variant_of(args: argparse.Namespace) -> str | None:
    from meshredirect.errors import PolicyError

    value = str(args.iptables_variant).strip().lower()
    if value == "auto":
        return None
    if value not in ("nft", "legacy"):
        raise PolicyError("--iptables-variant", expected="nft, legacy or auto", got=args.iptables_variant)
    return value
