"""``validate``: prove with real connections that capture works in a namespace (Istio's ``istio-validation``).

Inside the namespace, for each family, validate listens on the policy's
capture ports and then:

- **outbound**: as an app (a uid and gid the policy captures), connects to a
  probe address (a documentation address, so nothing real answers) and checks
  that the connection arrives at the outbound port with that address and port
  as its original destination (``SO_ORIGINAL_DST``);
- **inbound** (when the policy captures inbound and the namespace has an
  address of its own): as the proxy, connects to that address, the hairpin
  the rules send to the inbound port, and checks it arrives there with the
  original destination (the only inbound capture a connection from inside
  the namespace can reach; connections from outside take PREROUTING, which
  the end-to-end tests cover).

When a check fails it names what happened (timeout, refused, the wrong port,
another destination) and the likely cause, read from the rules in the
namespace: our rules absent, redirecting to another port than the policy's,
or another tool's rule earlier in the chain.

Run as root it can act in any namespace and probe as any uid. Run unprivileged
(an init container with no capabilities, as CNI deployments do) it checks the
current namespace with its own uid (which must be one the policy captures),
skips the inbound probe (it needs the proxy's uid), and cannot read the rules
to name a cause.

>>> check = Check(family=Family.IPV4, direction="outbound", ok=False,
...               observed="no connection arrived within 1 s", cause="rules absent: the nat table holds no ISTIO_ chains")
>>> print(check.line())
ipv4 outbound: FAILED: no connection arrived within 1 s
    likely cause: rules absent: the nat table holds no ISTIO_ chains
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import re
import select
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Final

import attrs

from meshredirect.apply.netns import Target, require_root
from meshredirect.apply.sockets import IP_TRANSPARENT, IPV6_TRANSPARENT, acting_as, original_destination
from meshredirect.errors import EnvironmentProblem, PolicyError
from meshredirect.ir import Family
from meshredirect.policy import InterceptionMode, Policy
from meshredirect.values import ALL, AddressSet, IPAddress, PortSet

__all__ = ["DEFAULT_PROBE", "DEFAULT_PROBE_PORT", "DEFAULT_TIMEOUT", "Check", "Validation", "validate"]

#: Probe destinations: documentation addresses (RFC 5737, RFC 3849) that no real server holds.
DEFAULT_PROBE: Final[dict[Family, IPAddress]] = {
    Family.IPV4: ipaddress.IPv4Address("192.0.2.1"),
    Family.IPV6: ipaddress.IPv6Address("2001:db8::1"),
}
#: Port of the probe connections (outbound, and inbound when the policy captures it).
DEFAULT_PROBE_PORT: Final = 15002
#: Where to look for an inbound probe port when the preferred one is not captured.
FALLBACK_PORTS: Final = 20000
#: Seconds each check waits for its connection.
DEFAULT_TIMEOUT: Final = 5.0
#: A uid and gid the policy never exempts (it refuses 0 as a proxy id): the outbound probe's owner.
ROOT_ID: Final = 0
#: Fallback probe gid when the policy excludes group 0 from capture.
NOBODY_ID: Final = 65534
_FAMILY: Final = {Family.IPV4: socket.AF_INET, Family.IPV6: socket.AF_INET6}
_WILDCARD: Final = {Family.IPV4: "0.0.0.0", Family.IPV6: "::"}


@attrs.frozen(kw_only=True)
class Check:
    """One probe: which family and direction, whether it worked, what happened, the likely cause."""

    family: Family
    direction: str
    ok: bool
    observed: str
    cause: str | None = None
    #: The check could not run here (it counts as passed; ``observed`` says why).
    skipped: bool = False

    def line(self) -> str:
        state = "skipped" if self.skipped else ("ok" if self.ok else "FAILED")
        text = f"{self.family.value} {self.direction}: {state}: {self.observed}"
        if self.cause:
            text += f"\n    likely cause: {self.cause}"
        return text


@attrs.frozen(kw_only=True)
class Validation:
    """Every check validate ran in one namespace."""

    namespace: str
    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    def report(self) -> str:
        lines = [f"validate: {self.namespace}"]
        lines += [check.line() for check in self.checks]
        lines.append("capture works" if self.ok else "capture does NOT work as the policy says")
        return "\n".join(lines)


def validate(
    policy: Policy | None = None,
    *,
    netns: str | Target | None = None,
    families: Iterable[Family | str] | Family | str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    probe: Mapping[Family, IPAddress | str] | None = None,
    probe_port: int = DEFAULT_PROBE_PORT,
    variant: str | None = None,
    backend: str = "iptables",
) -> Validation:
    """Check with real connections inside the namespace that the policy's capture works.

    ``families`` defaults to the policy's. Raises EnvironmentProblem when the
    check cannot run (not root, no namespace, a capture port already in use,
    no route to the probe address).
    """
    from meshredirect.apply.actions import families_of

    policy = policy or Policy()
    chosen = [f for f in families_of(families if families is not None else policy.families)]
    if not 1 <= probe_port <= 65535:
        raise PolicyError("probe port", expected="a port number 1-65535", got=probe_port)
    probes = _probes(probe)
    if backend not in ("iptables", "nftables"):
        raise PolicyError("backend", expected="iptables or nftables", got=backend)
    where = Target.of(netns)
    if where.path is not None:
        require_root("validate in another network namespace")
    _refuse_exempt_identity(policy)
    where.check()
    checks: list[Check] = []
    for family in chosen:
        destination = (probes[family], probe_port)
        _refuse_uncaptured_probe(policy, family, destination)
        checks += _validate_family(
            where,
            policy=policy,
            family=family,
            destination=destination,
            timeout=timeout,
            variant=variant,
            backend=backend,
        )
    return Validation(namespace=where.describe(), checks=tuple(checks))


def _probes(probe: Mapping[Family, IPAddress | str] | None) -> dict[Family, IPAddress]:
    out = dict(DEFAULT_PROBE)
    for family, value in (probe or {}).items():
        try:
            address = ipaddress.ip_address(str(value).strip())
        except ValueError:
            raise PolicyError("probe address", expected=f"an {family.value} address", got=value) from None
        if address.version != family.version:
            raise PolicyError("probe address", expected=f"an {family.value} address", got=value)
        out[family] = address
    return out


def _refuse_uncaptured_probe(policy: Policy, family: Family, destination: tuple[IPAddress, int]) -> None:
    address, port = destination
    reason = None
    if address in policy.outbound_cidrs_exclude:
        reason = "it is inside outbound_cidrs_exclude"
    elif port in policy.outbound_ports_exclude:
        reason = "its port is in outbound_ports_exclude"
    elif (
        isinstance(policy.outbound_cidrs, AddressSet)
        and address not in policy.outbound_cidrs
        and port not in policy.outbound_ports
    ):
        reason = "it is outside outbound_cidrs"
    elif address.is_loopback:
        reason = "loopback destinations are never captured"
    if reason:
        raise PolicyError(
            "probe address",
            expected=f"an {family.value} destination the policy captures outbound ({reason})",
            got=f"{_show(destination)}",
        )


def _privileged() -> bool:
    return os.geteuid() == 0


def _refuse_exempt_identity(policy: Policy) -> None:
    """Unprivileged, the probe runs as this process: it must be an app the policy captures."""
    if _privileged():
        return
    uid, gid = os.geteuid(), os.getegid()
    include = policy.owner_groups_include
    reason = None
    if uid in policy.proxy_uids:
        reason = f"uid {uid} is the proxy's"
    elif gid in policy.proxy_gids:
        reason = f"gid {gid} is the proxy's"
    elif include is not ALL and gid not in include:  # type: ignore[operator]
        reason = f"gid {gid} is not in owner_groups_include"
    elif gid in policy.owner_groups_exclude:
        reason = f"gid {gid} is in owner_groups_exclude"
    if reason:
        raise EnvironmentProblem(
            f"validate probes as its own user, whose connections the policy does not capture ({reason})",
            remedy="run it as another user, or as root",
        )


def _probe_gid(policy: Policy) -> int:
    include = policy.owner_groups_include
    if include is not ALL:
        for group in include:  # type: ignore[union-attr]
            if isinstance(group, int) and group not in policy.proxy_gids:
                return group
    if ROOT_ID in [g for g in policy.owner_groups_exclude if isinstance(g, int)]:
        return NOBODY_ID
    return ROOT_ID


def _inbound_port(policy: Policy, preferred: int) -> int | None:
    """A port the policy captures inbound (the preferred one when it is), or None."""
    if policy.inbound_ports is ALL:
        skip = policy.inbound_ports_exclude
        if policy.inbound_tunnel_port is not None:
            skip = skip.union(PortSet.of(policy.inbound_tunnel_port))
        listeners = {policy.outbound_port, policy.inbound_port}
        candidates: list[int] = [preferred, *range(FALLBACK_PORTS, FALLBACK_PORTS + 100)]
        for port in candidates:
            if port not in skip and port not in listeners:
                return port
        return None
    ports = policy.inbound_ports
    assert isinstance(ports, PortSet)
    if preferred in ports:
        return preferred
    return int(ports.intervals[0][0]) if ports.intervals else None


def _own_address(where: Target, family: Family) -> IPAddress | None:
    flag = "-4" if family is Family.IPV4 else "-6"
    result = where.run(["ip", "-j", flag, "addr", "show", "scope", "global"])
    if result.returncode != 0:
        return None
    for link in json.loads(result.stdout or "[]"):
        if "LOOPBACK" in link.get("flags", []):
            continue  # addresses on lo (such as ::6, the passthrough source) are not the pod's own
        for info in link.get("addr_info", []):
            if "local" in info and not info.get("tentative") and not info.get("dadfailed"):
                return ipaddress.ip_address(info["local"])
    return None


def _listen(family: Family, port: int, *, transparent: bool, where: Target) -> socket.socket:
    sock = socket.socket(_FAMILY[family], socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family is Family.IPV6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if transparent:
            if family is Family.IPV6:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
            else:
                sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        sock.bind((_WILDCARD[family], port))
        sock.listen(16)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise EnvironmentProblem(
                f"{family.value} port {port} is already in use in {where.describe()}",
                remedy="validate listens on the capture ports itself: run it before the proxy starts",
            ) from None
        raise EnvironmentProblem(f"cannot listen on {family.value} port {port}: {exc.strerror}") from None
    return sock


def _validate_family(
    where: Target,
    *,
    policy: Policy,
    family: Family,
    destination: tuple[IPAddress, int],
    timeout: float,
    variant: str | None,
    backend: str,
) -> list[Check]:
    privileged = _privileged()
    transparent = policy.inbound_mode is InterceptionMode.TPROXY and privileged
    inbound_port = _inbound_port(policy, destination[1]) if policy.captures_inbound else None
    own = _own_address(where, family) if inbound_port is not None and privileged else None
    proxy_uid = next(iter(policy.proxy_uids), None)
    proxy_gid = next(iter(policy.proxy_gids), None)
    sockets: list[socket.socket] = []
    try:
        with where.entered():
            outbound = _listen(family, policy.outbound_port, transparent=False, where=where)
            sockets.append(outbound)
            inbound = _listen(family, policy.inbound_port, transparent=transparent, where=where)
            sockets.append(inbound)
            with acting_as(*((ROOT_ID, _probe_gid(policy)) if privileged else (None, None))):
                app = socket.socket(_FAMILY[family], socket.SOCK_STREAM)
                sockets.append(app)
            proxy = None
            if own is not None:
                with acting_as(proxy_uid, proxy_gid):
                    proxy = socket.socket(_FAMILY[family], socket.SOCK_STREAM)
                    sockets.append(proxy)
        listeners = {policy.outbound_port: outbound, policy.inbound_port: inbound}
        checks = [
            _check(
                family=family,
                direction="outbound",
                client=app,
                destination=destination,
                listeners=listeners,
                expected_port=policy.outbound_port,
                timeout=timeout,
                diagnose=lambda: _diagnose(where, policy, family, variant, backend),
            )
        ]
        if inbound_port is not None and (not privileged or own is None):
            why = (
                "probing as the proxy's uid needs root" if not privileged else "the namespace has no address of its own"
            )
            checks.append(Check(family=family, direction="inbound", ok=True, skipped=True, observed=why))
        if proxy is not None and own is not None and inbound_port is not None:
            checks.append(
                _check(
                    family=family,
                    direction="inbound",
                    client=proxy,
                    destination=(own, inbound_port),
                    listeners=listeners,
                    expected_port=policy.inbound_port,
                    timeout=timeout,
                    diagnose=lambda: _diagnose(where, policy, family, variant, backend),
                )
            )
        return checks
    finally:
        for sock in sockets:
            sock.close()


def _show(destination: tuple[IPAddress, int]) -> str:
    address, port = destination
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


def _check(
    *,
    family: Family,
    direction: str,
    client: socket.socket,
    destination: tuple[IPAddress, int],
    listeners: dict[int, socket.socket],
    expected_port: int,
    timeout: float,
    diagnose: Callable[[], str],
) -> Check:
    def failed(observed: str, cause: str | None = None) -> Check:
        found = cause or diagnose()
        return Check(family=family, direction=direction, ok=False, observed=observed, cause=found)

    shown = _show(destination)
    client.setblocking(False)
    code = client.connect_ex((str(destination[0]), destination[1]))
    if code == errno.ENETUNREACH:
        raise EnvironmentProblem(
            f"no {family.value} route to the probe address {destination[0]} in the namespace",
            remedy="validation needs a route to it (a default route); give another probe address",
        )
    if code not in (0, errno.EINPROGRESS):
        return failed(f"connecting to {shown} failed at once: {errno.errorcode.get(code, code)}")
    deadline = time.monotonic() + timeout
    connected_at: float | None = None
    while True:
        left = deadline - time.monotonic()
        if connected_at is not None:
            left = min(left, connected_at + 0.5 - time.monotonic())
        if left <= 0:
            break
        readable, writable, _ = select.select(
            list(listeners.values()), [client] if connected_at is None else [], [], left
        )
        for port, listener in listeners.items():
            if listener not in readable:
                continue
            try:
                conn, peer = listener.accept()
            except BlockingIOError:
                continue
            with conn:
                if peer[:2] != client.getsockname()[:2]:
                    continue  # someone else's connection
                (address, original_port), how = original_destination(conn)
                got = _show((address, original_port))
                if port != expected_port:
                    return failed(
                        f"the connection to {shown} arrived at port {port} instead of {expected_port}",
                        "wrong port: the rules send this connection to the other capture port",
                    )
                if (address, original_port) != destination:
                    return failed(
                        f"the connection arrived at port {port} with original destination {got} ({how}), not {shown}",
                        "another tool rewrote the destination before our rules (a DNAT or REDIRECT earlier)",
                    )
                return Check(
                    family=family,
                    direction=direction,
                    ok=True,
                    observed=f"the connection to {shown} arrived at port {port} with original destination {got} ({how})",
                )
        if client in writable:
            error = client.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error == errno.ECONNREFUSED:
                return failed(f"the connection to {shown} was refused (it reached a port where nothing listens)")
            if error:
                return failed(f"the connection to {shown} failed: {errno.errorcode.get(error, error)}")
            connected_at = time.monotonic()
    if connected_at is not None:
        return failed(f"the connection to {shown} was answered by something other than the capture ports")
    return failed(f"no connection arrived at the capture ports within {timeout:g} s")


_REDIRECT_PORT = re.compile(r"-j REDIRECT --to-ports (\d+)")


def _diagnose(where: Target, policy: Policy, family: Family, variant: str | None, backend: str) -> str:
    """The likely cause of a failed check, read from the rules in the namespace."""
    if not _privileged():
        return (
            f"unknown: reading the rules needs CAP_NET_ADMIN (validate runs as uid {os.geteuid()}); "
            "most often our rules are absent"
        )
    if backend == "nftables":
        return _diagnose_nftables(where, policy, family)
    from meshredirect.api import render
    from meshredirect.apply.iptables import _restore_backend, _tool, detect_variant
    from meshredirect.compiler import compile_policy

    prefix = policy.chain_prefix
    chosen = variant or detect_variant(where.run, [family]).variant
    other = "legacy" if chosen == "nft" else "nft"
    documents = _restore_backend()

    def nat(variant_name: str) -> str:
        result = where.run([_tool(family, variant_name, "save"), "-t", "nat"])
        return result.stdout if result.returncode == 0 else ""

    current = nat(chosen)
    ours = documents.owned(current, prefix)
    if not ours:
        if documents.owned(nat(other), prefix):
            return (
                f"rules absent from the {chosen} tables, which the namespace uses; "
                f"our {prefix}_ chains are loaded with iptables-{other}"
            )
        return f"rules absent: the {family.value} nat table holds no {prefix}_ chains (run meshredirect apply)"
    wanted_ruleset = compile_policy(policy).for_family(family)
    wanted = render(wanted_ruleset, "iptables-save").text() if wanted_ruleset.tables else ""
    expected = documents.owned(_nat_only(wanted), prefix)
    if ours != expected:
        have = sorted(set(_REDIRECT_PORT.findall(ours)))
        want = sorted(set(_REDIRECT_PORT.findall(expected)))
        if have != want:
            return (
                f"wrong port: our rules redirect to port(s) {','.join(have) or 'none'}, "
                f"the policy's are {','.join(want)}"
            )
        return f"our {prefix}_ rules differ from the policy's (applied with other options?): re-apply"
    hook = "OUTPUT"
    earlier = []
    for line in current.splitlines():
        if not line.startswith(f"-A {hook} "):
            continue
        target = line.split(" -j ")[-1].split(" ")[0] if " -j " in line else ""
        if target.startswith(prefix + "_"):
            break
        earlier.append(line)
    if earlier:
        return f"another tool's rule comes before ours in nat {hook}: {earlier[0]}"
    return "our rules are in place as the policy says; something outside the nat table stopped the connection"


def _nat_only(save_text: str) -> str:
    out: list[str] = []
    keep = False
    for line in save_text.splitlines():
        if line.startswith("*"):
            keep = line == "*nat"
        if keep:
            out.append(line)
    return "".join(line + "\n" for line in out)


def _diagnose_nftables(where: Target, policy: Policy, family: Family) -> str:
    """The likely cause of a failed check, from our nftables table of the family."""
    from meshredirect.apply.nftables import NftablesApplier
    from meshredirect.compiler import compile_policy

    applier = NftablesApplier(where)
    ruleset = compile_policy(policy).for_family(family)
    name = applier.table_name(ruleset)
    nft_family = "ip6" if family is Family.IPV6 else "ip"
    ours = applier.ours(name, [family])
    if not ours.tables:
        return f"rules absent: no nftables table {nft_family} {name} (run meshredirect apply --backend nftables)"
    if ours != applier.laid_out(ruleset):
        return (
            f"our nftables table {nft_family} {name} differs from the policy's (applied with other options?): re-apply"
        )
    return (
        "our rules are in place as the policy says; another table's chain on the same hook "
        "(at an earlier priority, or one that drops) may take the connection first"
    )
