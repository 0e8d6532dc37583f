"""What rules read from a node say about the pod they run in: its environment, its mesh and its proxy.

Rules read back from a node (:func:`meshredirect.readers.iptables.read_iptables`) carry no policy. To
prove things about them, the semantics engine needs the pod's
:class:`~meshredirect.semantics.model.Environment`: its interfaces (every one the rules name), the
marks its policy routing delivers locally (TPROXY's ``ip rule add fwmark M lookup T``: every mark a
TPROXY target sets), and its proxy. :func:`detect_mesh` finds the proxy in the rules themselves: the
chains that redirect to a local port, the uids and gids the rules exempt from the outbound capture,
the source address they let pass over ``lo``; what it cannot find is left to the caller to state.

Pure functions over IR: no I/O.

>>> from meshredirect.compiler import compile_policy
>>> from meshredirect.policy import Policy
>>> mesh = detect_mesh(compile_policy(Policy(proxy_uids="101", proxy_gids="101", inbound_port=15106)))
>>> mesh.outbound_port, mesh.inbound_port, str(mesh.uids), str(mesh.gids), mesh.prefix
(15001, 15106, '101', '101', 'ISTIO')
"""

from __future__ import annotations

import collections
import ipaddress
from collections.abc import Iterable, Iterator
from typing import Any, Final

import attrs

from meshredirect.ir import (
    AddressMatch,
    Chain,
    ChainType,
    Direction,
    Goto,
    Hook,
    InterfaceMatch,
    Jump,
    OwnerKind,
    OwnerMatch,
    PortMatch,
    Redirect,
    Return,
    Rule,
    Ruleset,
    Table,
    TProxy,
)
from meshredirect.semantics.model import (
    LOOPBACK_INTERFACE,
    PASSTHROUGH_IPV4,
    PASSTHROUGH_IPV6,
    Environment,
    MarkRoute,
    Proxy,
)
from meshredirect.values import IdSet, IPAddress

__all__ = ["Mesh", "Verification", "detect_mesh", "environment_for_rules", "mesh_environment", "verify_rules"]

#: Istio's ports, the fallback when the rules do not say (a mesh that captures only one way).
DEFAULT_OUTBOUND_PORT: Final = 15001
DEFAULT_INBOUND_PORT: Final = 15006
DNS_PORT: Final = 53


def _mark_routes(rulesets: Iterable[Ruleset]) -> tuple[MarkRoute, ...]:
    routes: list[MarkRoute] = []
    for ruleset in rulesets:
        for _table, _chain, rule in ruleset.rules():
            target = rule.target
            if isinstance(target, TProxy) and target.mark is not None:
                route = MarkRoute(value=target.mark & target.mask, mask=target.mask)
                if route not in routes:
                    routes.append(route)
    return tuple(routes)


def environment_for_rules(*rulesets: Ruleset, base: Environment | None = None) -> Environment:
    """The pod environment these rules assume: ``base`` (default: the default environment) with every
    interface they name and, for each mark a TPROXY target sets, policy routing that delivers it locally.

    >>> from meshredirect.compiler import compile_policy
    >>> from meshredirect.policy import Policy
    >>> env = environment_for_rules(compile_policy(Policy(inbound_mode="TPROXY", exclude_interfaces="eth1")))
    >>> env.local_marks, "eth1" in env.interface_names
    ((MarkRoute(value=1337, mask=4294967295),), True)
    """
    env = (base if base is not None else Environment.default()).covering(*rulesets)
    routes = tuple(r for r in _mark_routes(rulesets) if r not in env.local_marks)
    return attrs.evolve(env, local_marks=env.local_marks + routes) if routes else env


@attrs.frozen(kw_only=True)
class Mesh:
    """The redirect a node's rules implement, as far as the rules tell."""

    #: The port outbound connections are redirected to (None: no outbound capture found).
    outbound_port: int | None
    #: The port inbound connections are redirected (or TPROXYed) to (None: none found).
    inbound_port: int | None
    #: The port DNS queries are redirected to (None: no DNS capture found).
    dns_port: int | None = None
    #: Ids whose connections the outbound capture exempts (the proxy's).
    uids: IdSet
    gids: IdSet
    #: The source address the rules let pass over lo (the proxy's inbound passthrough), per family.
    passthrough: tuple[IPAddress, ...]
    #: TPROXY's mark (None: REDIRECT mode).
    tproxy_mark: int | None
    #: Interfaces whose arriving traffic the rules send to the outbound port (treated as outbound: ``-k``).
    rerouted: tuple[str, ...] = ()
    #: The chain-name prefix of the chains doing it (ISTIO, PROXY_INIT...), if they share one.
    prefix: str | None
    #: The user chains on a capture path (reachable from a built-in chain and leading to a redirect).
    chains: tuple[str, ...]

    @property
    def found(self) -> bool:
        return self.outbound_port is not None or self.inbound_port is not None

    def proxy(self, *, uid: int | None = None, gid: int | None = None) -> Proxy:
        """The semantics engine's proxy for this mesh (stated ids win over detected ones)."""
        uids = IdSet.of(uid) if uid is not None else self.uids
        gids = IdSet.of(gid) if gid is not None else self.gids
        v4 = next((a for a in self.passthrough if isinstance(a, ipaddress.IPv4Address)), PASSTHROUGH_IPV4)
        v6 = next((a for a in self.passthrough if isinstance(a, ipaddress.IPv6Address)), PASSTHROUGH_IPV6)
        return Proxy(
            uid=uid if uid is not None else _first(uids, _first(gids, 1337)),
            gid=gid if gid is not None else _first(gids, _first(uids, 1337)),
            uids=uids,
            gids=gids,
            outbound_port=self.outbound_port or DEFAULT_OUTBOUND_PORT,
            inbound_port=self.inbound_port or DEFAULT_INBOUND_PORT,
            tunnel_port=None,
            dns_port=self.dns_port,
            passthrough_ipv4=v4,
            passthrough_ipv6=v6,
            transparent=self.tproxy_mark is not None,
            tproxy_mark=self.tproxy_mark if self.tproxy_mark is not None else 1337,
        )


def _first(ids: IdSet, default: int) -> int:
    for lo, _ in ids.intervals:
        return lo
    return default


def _reachable(table: Table, roots: Iterable[Chain]) -> Iterator[Chain]:
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        chain = todo.pop()
        if chain.name in seen:
            continue
        seen.add(chain.name)
        yield chain
        for rule in chain.rules:
            if isinstance(rule.target, (Jump, Goto)) and table.has_chain(rule.target.chain):
                todo.append(table.chain(rule.target.chain))


def _is_dns(rule: Rule) -> bool:
    return any(
        isinstance(m, PortMatch) and not m.negate and DNS_PORT in m.ports and len(m.ports) == 1 for m in rule.matches
    )


class _Ports:
    """Where a table's chains send connections: the REDIRECT ports reachable from each chain."""

    def __init__(self, table: Table) -> None:
        self.table = table
        self.cache: dict[str, tuple[set[int], set[int]]] = {}

    def reached(self, name: str, seen: frozenset[str] = frozenset()) -> tuple[set[int], set[int]]:
        """(ports, DNS ports) that connections entering chain ``name`` may be redirected to."""
        if name in self.cache:
            return self.cache[name]
        ports: set[int] = set()
        dns: set[int] = set()
        if self.table.has_chain(name) and name not in seen:
            for rule in self.table.chain(name).rules:
                target = rule.target
                if isinstance(target, Redirect) and target.ports is not None:
                    (dns if _is_dns(rule) else ports).add(target.ports.intervals[0][0])
                elif isinstance(target, TProxy):
                    ports.add(target.port)
                elif isinstance(target, (Jump, Goto)):
                    more, more_dns = self.reached(target.chain, seen | {name})
                    ports |= more
                    dns |= more_dns
        self.cache[name] = (ports, dns)
        return ports, dns


def detect_mesh(ruleset: Ruleset) -> Mesh:
    """Find the proxy's ports, ids and passthrough address in rules (see :class:`Mesh`).

    In nat OUTPUT, the ports that connections leaving over ``lo`` are redirected to (the hairpin) are
    inbound ports, the ports of rules matching DNS (port 53) are the DNS agent's, and the other ports are
    outbound; nat PREROUTING's own redirects (or mangle PREROUTING's TPROXY) name the inbound port where
    no hairpin does. The proxy's ids are those nat OUTPUT exempts with an owner RETURN and (where the
    rules have one) sends over the ``lo`` hairpin; the passthrough is the source of a RETURN rule that
    also matches ``-o lo``.
    """
    votes: dict[str, collections.Counter[int]] = {
        "outbound": collections.Counter(),
        "hairpin": collections.Counter(),
        "prerouting": collections.Counter(),
        "dns": collections.Counter(),
    }
    found: dict[str, Any] = {
        "returns": {OwnerKind.UID: [], OwnerKind.GID: []},
        "hairpins": {OwnerKind.UID: [], OwnerKind.GID: []},
        "passthrough": [],
        "arriving": {},
    }
    tproxy_mark: int | None = None
    chains: list[str] = []
    for table in ruleset.tables:
        ports = _Ports(table)
        for hook in (Hook.OUTPUT, Hook.PREROUTING):
            # What a chain means depends on the base chain it is reached from: nat (an iptables nat table,
            # an nftables chain of type nat) decides redirects.
            visited: set[tuple[str, bool]] = set()
            for base in table.base_chains(hook):
                assert base.base is not None
                nat = base.base.type is ChainType.NAT
                for chain in _reachable(table, [base]):
                    if (chain.name, nat) in visited:
                        continue
                    visited.add((chain.name, nat))
                    tproxy_mark = _scan(
                        chain,
                        hook,
                        nat=nat,
                        ports=ports,
                        votes=votes,
                        found=found,
                        chains=chains,
                        tproxy_mark=tproxy_mark,
                    )
    hairpin, outbound, prerouting, dns = votes["hairpin"], votes["outbound"], votes["prerouting"], votes["dns"]
    returns, hairpins, passthrough, arriving = (
        found["returns"],
        found["hairpins"],
        found["passthrough"],
        found["arriving"],
    )
    out_port = _most_common(outbound, exclude=set(hairpin))
    in_port = _most_common(hairpin) or _most_common(prerouting, exclude={out_port} if out_port else set())
    # Owner RETURNs also exempt groups that are not the proxy (excluded owner groups); where the rules
    # hairpin by owner, the proxy's ids are those that also hairpin.
    owned = hairpins if hairpins[OwnerKind.UID] or hairpins[OwnerKind.GID] else returns
    exempt = {kind: IdSet(tuple(returns[kind])) for kind in OwnerKind}
    uids, gids = (IdSet(tuple(i for i in owned[kind] if i[0] in exempt[kind])) for kind in OwnerKind)
    return Mesh(
        outbound_port=out_port,
        inbound_port=in_port,
        dns_port=_most_common(dns),
        uids=uids,
        gids=gids,
        passthrough=tuple(dict.fromkeys(passthrough)),
        tproxy_mark=tproxy_mark,
        rerouted=tuple(name for name, reached in arriving.items() if out_port is not None and out_port in reached),
        prefix=_common_prefix(chains),
        chains=tuple(chains),
    )


def _scan(
    chain: Chain,
    hook: Hook,
    *,
    nat: bool,
    ports: _Ports,
    votes: dict[str, collections.Counter[int]],
    found: dict[str, Any],
    chains: list[str],
    tproxy_mark: int | None,
) -> int | None:
    """Count what one chain says about the mesh (see :func:`detect_mesh`); returns the TPROXY mark seen."""
    outbound, hairpin, prerouting, dns = votes["outbound"], votes["hairpin"], votes["prerouting"], votes["dns"]
    returns, hairpins, passthrough, arriving = (
        found["returns"],
        found["hairpins"],
        found["passthrough"],
        found["arriving"],
    )
    if chain.base is None and any(ports.reached(chain.name)):
        _add(chains, chain.name)  # on a capture path
    for rule in chain.rules:
        target = rule.target
        if isinstance(target, TProxy) and hook is Hook.PREROUTING:
            prerouting[target.port] += 1
            tproxy_mark = target.mark if target.mark is not None else tproxy_mark
            _add(chains, chain.name)
        if not nat:
            continue
        reached: set[int] = set()
        reached_dns: set[int] = set()
        if isinstance(target, Redirect) and target.ports is not None:
            port = target.ports.intervals[0][0]
            (reached_dns if _is_dns(rule) else reached).add(port)
            _add(chains, chain.name)
        elif isinstance(target, (Jump, Goto)):
            reached, reached_dns = ports.reached(target.chain)
        for port in reached_dns:
            dns[port] += 1
        for port in reached:
            if hook is Hook.PREROUTING:
                prerouting[port] += 1
                for match in rule.matches:
                    if isinstance(match, InterfaceMatch) and match.direction is Direction.SOURCE and not match.negate:
                        arriving.setdefault(match.name, set()).add(port)
            elif _leaves_lo(rule.matches):
                hairpin[port] += 1
            else:
                outbound[port] += 1
        if hook is not Hook.OUTPUT:
            continue
        owners = [m for m in rule.matches if isinstance(m, OwnerMatch) and not m.negate]
        if isinstance(target, Return) and owners and len(rule.matches) == 1:
            returns[owners[0].kind].extend(owners[0].ids.intervals)
            _add(chains, chain.name)
        elif isinstance(target, (Jump, Goto)) and owners and _leaves_lo(rule.matches):
            for owner in owners:  # the hairpin: the proxy's own connections over lo
                hairpins[owner.kind].extend(owner.ids.intervals)
        if isinstance(target, Return) and _leaves_lo(rule.matches):
            passthrough.extend(_sources(rule.matches))
    return tproxy_mark


def _most_common(votes: collections.Counter[int], exclude: set[int] | None = None) -> int | None:
    for port, _ in votes.most_common():
        if port not in (exclude or set()):
            return port
    return None


def _add(items: list[str], item: str) -> None:
    if item not in items:
        items.append(item)


def _leaves_lo(matches: Iterable[object]) -> bool:
    return any(
        isinstance(m, InterfaceMatch) and m.direction is Direction.DESTINATION and m.name == LOOPBACK_INTERFACE
        and not m.negate
        for m in matches
    )  # fmt: skip


def _sources(matches: Iterable[object]) -> Iterator[IPAddress]:
    for match in matches:
        if isinstance(match, AddressMatch) and match.direction is Direction.SOURCE and not match.negate:
            for network in match.addresses:
                if network.num_addresses == 1:
                    yield network.network_address


def _common_prefix(chains: list[str]) -> str | None:
    user = [c for c in chains if c not in {h.value for h in Hook}]
    if not user:
        return None
    heads = {name.split("_", 1)[0] for name in user if "_" in name}
    return heads.pop() if len(heads) == 1 else None


@attrs.frozen(kw_only=True)
class Verification:
    """What :func:`verify_rules` found: the mesh, the environment it assumed, and the proof's report."""

    mesh: Mesh
    env: Environment
    #: A :class:`meshredirect.semantics.check.CheckReport`.
    report: Any

    @property
    def ok(self) -> bool:
        return bool(self.report.ok)


def verify_rules(
    ruleset: Ruleset,
    *,
    uids: IdSet | None = None,
    gids: IdSet | None = None,
    outbound_port: int | None = None,
    inbound_port: int | None = None,
    tunnel_port: int | None = None,
    dns_port: int | None = None,
    passthrough: Iterable[IPAddress] = (),
) -> Verification:
    """Prove loop-freedom and the proxy's local facts for rules read from a node.

    The proxy (ports, ids, passthrough address) is what :func:`detect_mesh` finds, overridden by what
    is given; the environment is :func:`environment_for_rules`. The proofs are
    :func:`meshredirect.semantics.check.check` on the ruleset alone (no policy: the properties that
    need one, completeness and exclusions, are not claimed).
    """
    from meshredirect.semantics.check import check

    mesh, env = mesh_environment(
        ruleset,
        uids=uids,
        gids=gids,
        outbound_port=outbound_port,
        inbound_port=inbound_port,
        tunnel_port=tunnel_port,
        dns_port=dns_port,
        passthrough=passthrough,
    )
    return Verification(mesh=mesh, env=env, report=check(ruleset, env))


def mesh_environment(
    ruleset: Ruleset,
    *,
    uids: IdSet | None = None,
    gids: IdSet | None = None,
    outbound_port: int | None = None,
    inbound_port: int | None = None,
    tunnel_port: int | None = None,
    dns_port: int | None = None,
    passthrough: Iterable[IPAddress] = (),
) -> tuple[Mesh, Environment]:
    """The mesh :func:`verify_rules` proves things about (found, then overridden by what is given) and the
    environment it assumes: :func:`environment_for_rules` with that mesh's proxy.

    >>> from meshredirect.compiler import compile_policy
    >>> from meshredirect.policy import Policy
    >>> mesh, env = mesh_environment(compile_policy(Policy()), tunnel_port=15008)
    >>> env.proxy.outbound_port, env.proxy.inbound_port, env.proxy.tunnel_port
    (15001, 15006, 15008)
    """
    mesh = detect_mesh(ruleset)
    given = tuple(passthrough)
    mesh = attrs.evolve(
        mesh,
        uids=uids if uids is not None else mesh.uids,
        gids=gids if gids is not None else mesh.gids,
        outbound_port=outbound_port if outbound_port is not None else mesh.outbound_port,
        inbound_port=inbound_port if inbound_port is not None else mesh.inbound_port,
        dns_port=dns_port if dns_port is not None else mesh.dns_port,
        passthrough=given + tuple(a for a in mesh.passthrough if a.version not in {g.version for g in given}),
    )
    proxy = attrs.evolve(mesh.proxy(), tunnel_port=tunnel_port)
    env = attrs.evolve(environment_for_rules(ruleset), proxy=proxy, rerouted_interfaces=mesh.rerouted)
    return mesh, env
