"""``meshredirect istio-iptables [flags]``: a drop-in for Istio's ``istio-iptables``.

Takes every flag of ``istio-iptables`` with its short form and environment
variable (see :mod:`meshredirect.frontends.istio_flags`; ``--help`` lists
them), builds the policy they describe, and programs it. ``--dry-run`` prints
the rules and touches nothing; ``--cleanup-only`` removes ours;
``--run-validation`` checks with real connections that capture works and exits
126 when it does not (Istio's code for it). Rules are applied through
:mod:`meshredirect.apply`; ``--native-nftables`` prints and applies them
through the nftables backend instead (one table of ours, one transaction).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

#: The command reads its own command line: Go-style flags (``-p=15001``, ``--dry-run=false``, ``-nb '*'``).
RAW_ARGUMENTS = True


def configure(parser: argparse.ArgumentParser) -> None:
    """Describe the command for its help page (the command reads its command line itself)."""
    from meshredirect.frontends.istio_flags import format_help

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("flags", nargs="*", metavar="FLAG", help="istio-iptables flags, listed below")
    parser.epilog = format_help().split("\n\n", 2)[2]


#: Istio's exit status when validation finds capture not working (istio-cni's repair looks for it).
VALIDATION_FAILED = 126


def run(args: argparse.Namespace) -> int:
    from meshredirect.frontends.istio_flags import format_help, parse_istio_flags

    flags = parse_istio_flags(args.argv, os.environ)
    if flags.help:
        sys.stdout.write(format_help())
        return 0
    dry_run = flags.flag("dry-run")
    cleanup_only = flags.flag("cleanup-only")
    skip_apply = flags.flag("skip-rule-apply")
    validation = flags.flag("run-validation")
    netns = flags.text("network-namespace") or None
    variant = flags.text("force-iptables-binary") or None
    backend, render_as = "iptables", "iptables-save"
    if flags.flag("native-nftables"):
        backend = render_as = "nftables"

    # Cleanup removes our rules of both families whatever the pod's addresses: no IPv6 detection then.
    policy, warnings = build_policy(flags, detect_ipv6=not cleanup_only)
    if cleanup_only:
        warnings = [w for w in warnings if not w.startswith("IPv6 capture depends")]
    if validation and dry_run:
        warnings.append("--run-validation is skipped with --dry-run (nothing was applied to validate)")
    for warning in warnings:
        print(f"meshredirect istio-iptables: warning: {warning}", file=sys.stderr)

    from meshredirect.api import render
    from meshredirect.commands._apply_seam import apply_policy, cleanup_policy, validate_policy
    from meshredirect.compiler import compile_policy

    ruleset = compile_policy(policy)
    if cleanup_only:
        if skip_apply and not dry_run:
            print("meshredirect istio-iptables: --skip-rule-apply: nothing removed", file=sys.stderr)
            return 0
        sys.stdout.write(cleanup_policy(policy, netns=netns, backend=backend, variant=variant, dry_run=dry_run) + "\n")
        return 0
    if dry_run:
        sys.stdout.write(render(ruleset, render_as).text())
        return 0
    if skip_apply:
        print("meshredirect istio-iptables: --skip-rule-apply: nothing applied", file=sys.stderr)
    else:
        status, report = apply_policy(
            policy,
            ruleset,
            netns=netns,
            backend=backend,
            variant=variant,
            reconcile=flags.flag("reconcile"),
            force=flags.flag("force-apply"),
        )
        print(report, file=sys.stderr if status else sys.stdout)
        if status:
            return status
    if validation:
        ok, report = validate_policy(
            policy,
            netns=netns,
            backend=backend,
            variant=variant,
            timeout=flags.seconds("probe-timeout"),
            probe_port=int(flags.text("iptables-probe-port")),
        )
        print(report, file=sys.stdout if ok else sys.stderr)
        if not ok:
            return VALIDATION_FAILED
    return 0


def build_policy(flags: Any, *, detect_ipv6: bool = True, resolve_groups: bool = True) -> tuple[Any, list[str]]:
    """The policy of a parsed invocation, looking up what istio-iptables looks up on the machine:
    ENVOY_USER's uid, resolv.conf's DNS servers, the pod's address families, group names."""
    from meshredirect.api import resolve_groups as resolve
    from meshredirect.errors import EnvironmentProblem, PolicyError
    from meshredirect.frontends.istio_flags import parse_resolv_conf

    warnings: list[str] = []
    dns_servers: tuple[str, ...] = ()
    if flags.flag("redirect-dns") and not flags.flag("capture-all-dns"):
        path = flags.text("resolv-conf")
        try:
            with open(path) as handle:
                dns_servers = parse_resolv_conf(handle.read())
        except OSError as exc:
            raise EnvironmentProblem(f"cannot read {path}: {exc.strerror}", remedy="pass --resolv-conf FILE") from None
    choice = flags.text("enable-ipv6")
    if choice == "auto":
        if not detect_ipv6:
            warnings.append(
                "IPv6 capture depends on the pod's addresses when istio-iptables runs; "
                "this policy programs IPv4 only (pass --enable-ipv6=true to include IPv6)"
            )
            enable_ipv6 = False
        else:
            enable_ipv6 = _detect_ipv6(flags)
    else:
        enable_ipv6 = choice == "true"
    policy = flags.policy(
        proxy_uid_lookup=_user_id, dns_servers=dns_servers, enable_ipv6=enable_ipv6, warnings=warnings
    )
    if resolve_groups and policy.unresolved_groups():
        try:
            policy = resolve(policy, _group_id)
        except PolicyError as exc:
            raise flags.rename(exc) from None
    return policy, warnings


def _detect_ipv6(flags: Any) -> bool:
    """Whether the target namespace's addresses make istio-iptables program IPv6 (``getLocalIP``).

    Go lists the addresses of every interface by family, IPv4 first (a netlink
    address dump); so without dual stack IPv6 wins only when no IPv4 address counts.
    """
    import json

    from meshredirect.apply.netns import Target
    from meshredirect.errors import EnvironmentProblem
    from meshredirect.frontends.istio_flags import addresses_enable_ipv6

    target = Target.of(flags.text("network-namespace") or None)
    result = target.run(["ip", "-j", "address", "show"])
    if result.returncode != 0:
        raise EnvironmentProblem(f"ip address show failed: {result.stderr.strip()}")
    entries = json.loads(result.stdout or "[]")
    by_family: dict[str, list[str]] = {"inet": [], "inet6": []}
    for entry in entries:
        for info in entry.get("addr_info", []):
            if info.get("family") in by_family and "local" in info:
                by_family[info["family"]].append(info["local"])
    decided = addresses_enable_ipv6(by_family["inet"] + by_family["inet6"], dual_stack=flags.flag("dual-stack"))
    if decided is None:
        raise EnvironmentProblem(
            "the network namespace has no address but loopback and link-local ones, so whether to program IPv6 "
            "cannot be decided (istio-iptables fails here too)",
            remedy="pass --enable-ipv6=true or --enable-ipv6=false",
        )
    return decided


def _user_id(name: str) -> int | None:
    import pwd

    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


def _group_id(name: str) -> int | None:
    import grp

    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None
