"""Policy to IR. Every decision about what to capture is made here, and only here.

The output is the set of rules meshredirect owns: user chains named with the
policy's chain prefix, and, in built-in chains, only jump rules into them (so
that applying and removing our rules never needs to touch anyone else's).

>>> from meshredirect.policy import Policy
>>> ruleset = compile_policy(Policy())
>>> [(t.family.value, t.name) for t in ruleset.tables]
[('ipv4', 'nat')]
>>> [c.name for c in ruleset.tables[0].chains]
['PREROUTING', 'OUTPUT', 'ISTIO_OUTPUT', 'ISTIO_REDIRECT', 'ISTIO_IN_REDIRECT', 'ISTIO_INBOUND']
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final, assert_never

from meshredirect.errors import PolicyError
from meshredirect.ir import (
    IPTABLES_BUILTIN_HOOKS,
    Accept,
    AddressMatch,
    Chain,
    ConnmarkMatch,
    ConnmarkRestore,
    ConnmarkSave,
    CtState,
    CtStateMatch,
    CtZone,
    Direction,
    Drop,
    Family,
    Goto,
    Hook,
    InterfaceMatch,
    Jump,
    MarkMatch,
    Match,
    OwnerKind,
    OwnerMatch,
    PortMatch,
    Protocol,
    ProtocolMatch,
    Redirect,
    Return,
    Rule,
    Ruleset,
    SetMark,
    Table,
    Target,
    TProxy,
    iptables_base_chain,
)
from meshredirect.policy import InterceptionMode, LoopbackCapture, Policy
from meshredirect.values import AddressSet, All, IdSet, IPAddress, IPNetwork, PortSet

__all__ = ["ChainNames", "compile_policy"]

#: The port DNS servers listen on.
DNS_PORT: Final = 53
#: Conntrack zone of the proxy's own queries to upstream resolvers (and their answers).
DNS_UPSTREAM_ZONE: Final = 1
#: Conntrack zone of the app's queries to the proxy's resolver (and its answers); keeps the two
#: UDP flows, which share addresses and ports once redirected, from colliding in conntrack.
DNS_CLIENT_ZONE: Final = 2
LOOPBACK_INTERFACE: Final = "lo"
#: Mark the proxy's hairpin packets carry in TPROXY mode: the inbound mark plus one.
HAIRPIN_MARK_OFFSET: Final = 1

TCP: Final = ProtocolMatch(protocol=Protocol.TCP)
UDP: Final = ProtocolMatch(protocol=Protocol.UDP)


class ChainNames:
    """The chain names derived from a policy's prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.inbound = f"{prefix}_INBOUND"
        self.in_redirect = f"{prefix}_IN_REDIRECT"
        self.output = f"{prefix}_OUTPUT"
        self.redirect = f"{prefix}_REDIRECT"
        self.outbound = f"{prefix}_OUTBOUND"
        self.capture = f"{prefix}_CAPTURE"
        self.output_dns = f"{prefix}_OUTPUT_DNS"
        self.divert = f"{prefix}_DIVERT"
        self.tproxy = f"{prefix}_TPROXY"
        self.drop = f"{prefix}_DROP"

    def owns(self, chain: str) -> bool:
        """Whether a chain name is one of ours (the prefix is the ownership boundary)."""
        return chain.startswith(self.prefix + "_")


def compile_policy(policy: Policy) -> Ruleset:
    """Compile a policy into the IR of every family it programs (IPv4 first)."""
    unresolved = policy.unresolved_groups()
    if unresolved:
        raise PolicyError(
            "owner_groups_include" if unresolved[0] not in policy.owner_groups_exclude else "owner_groups_exclude",
            expected="numeric gids (group names must be resolved first: meshredirect.resolve_groups, "
            "or the CLI, which uses this machine's group database)",
            got=",".join(unresolved),
        )
    tables: list[Table] = []
    for family in (Family.IPV4, Family.IPV6):
        if family in policy.families:
            tables.extend(_FamilyCompiler(policy, family).compile())
    return Ruleset(tables=tuple(tables), owner_prefix=policy.chain_prefix)


# ----------------------------------------------------------------------------- match helpers


def _dst(addresses: Iterable[IPNetwork | IPAddress] | AddressSet, *, negate: bool = False) -> AddressMatch:
    members = addresses if isinstance(addresses, AddressSet) else AddressSet.of(*addresses)
    return AddressMatch(direction=Direction.DESTINATION, addresses=members, negate=negate)


def _src(addresses: Iterable[IPNetwork | IPAddress] | AddressSet) -> AddressMatch:
    members = addresses if isinstance(addresses, AddressSet) else AddressSet.of(*addresses)
    return AddressMatch(direction=Direction.SOURCE, addresses=members)


def _oif(name: str) -> InterfaceMatch:
    return InterfaceMatch(direction=Direction.DESTINATION, name=name)


def _iif(name: str) -> InterfaceMatch:
    return InterfaceMatch(direction=Direction.SOURCE, name=name)


def _uid(ids: IdSet) -> OwnerMatch:
    return OwnerMatch(kind=OwnerKind.UID, ids=ids)


def _gid(ids: IdSet) -> OwnerMatch:
    return OwnerMatch(kind=OwnerKind.GID, ids=ids)


def _ports(protocol: Protocol, ports: PortSet, *, negate: bool = False, source: bool = False) -> PortMatch:
    direction = Direction.SOURCE if source else Direction.DESTINATION
    return PortMatch(protocol=protocol, ports=ports, direction=direction, negate=negate)


def _rule(target: Target, *matches: Match) -> Rule:
    return Rule(matches=tuple(matches), target=target)


# ----------------------------------------------------------------------------- the compiler


class _TableBuilder:
    def __init__(self, family: Family, name: str) -> None:
        self.family = family
        self.name = name
        self.hooks: dict[Hook, list[Rule]] = {}
        self.chains: dict[str, list[Rule]] = {}

    def hook(self, hook: Hook) -> list[Rule]:
        return self.hooks.setdefault(hook, [])

    def chain(self, name: str) -> list[Rule]:
        return self.chains.setdefault(name, [])

    def build(self) -> Table | None:
        self._drop_jumps_to_empty_chains()
        referenced = _reachable(self.hooks, self.chains)
        chains: list[Chain] = []
        for hook in IPTABLES_BUILTIN_HOOKS[self.name]:
            if self.hooks.get(hook):
                chains.append(
                    Chain(name=hook.value, rules=tuple(self.hooks[hook]), base=iptables_base_chain(self.name, hook))
                )
        for name, rules in self.chains.items():
            if name in referenced:
                chains.append(Chain(name=name, rules=tuple(rules)))
        if not chains:
            return None
        return Table(family=self.family, name=self.name, chains=tuple(chains))

    def _drop_jumps_to_empty_chains(self) -> None:
        """A jump to a chain without rules does nothing; leave both out."""
        while True:
            empty = {name for name, rules in self.chains.items() if not rules}
            changed = False
            for rules in (*self.hooks.values(), *self.chains.values()):
                kept = [r for r in rules if not (isinstance(r.target, (Jump, Goto)) and r.target.chain in empty)]
                if len(kept) != len(rules):
                    rules[:] = kept
                    changed = True
            if not changed:
                return


def _targets(rules: Iterable[Rule]) -> Iterable[str]:
    for rule in rules:
        if isinstance(rule.target, (Jump, Goto)):
            yield rule.target.chain


def _reachable(hooks: dict[Hook, list[Rule]], chains: dict[str, list[Rule]]) -> set[str]:
    seen: set[str] = set()
    todo = [name for rules in hooks.values() for name in _targets(rules)]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(_targets(chains.get(name, ())))
    return seen


class _FamilyCompiler:
    def __init__(self, policy: Policy, family: Family) -> None:
        self.p = policy
        self.family = family
        self.names = ChainNames(policy.chain_prefix)
        self.loopback = policy.loopback_for(family)
        self.passthrough = policy.passthrough_for(family)
        self.dns = policy.dns.active_for(family)
        self.raw = _TableBuilder(family, "raw")
        self.mangle = _TableBuilder(family, "mangle")
        self.nat = _TableBuilder(family, "nat")

    # -- layout ------------------------------------------------------------

    def port_rules(
        self, target: Target, before: Sequence[Match], match: PortMatch, after: Sequence[Match] = ()
    ) -> list[Rule]:
        """One rule with a port set, or (Istio 1.4's layout) one rule per port or range."""
        if not self.p.one_rule_per_port or match.negate or match.ports.is_single():
            return [Rule(matches=(*before, match, *after), target=target)]
        rules = []
        for lo, hi in match.ports.intervals:
            single = PortMatch(protocol=match.protocol, ports=PortSet(((lo, hi),)), direction=match.direction)
            rules.append(Rule(matches=(*before, single, *after), target=target))
        return rules

    # -- entry -------------------------------------------------------------

    def compile(self) -> list[Table]:
        if self.p.drop_invalid:
            self.drop_invalid()
        self.nat_output()
        self.nat_prerouting()
        if self.p.inbound_mode is InterceptionMode.TPROXY and self.p.captures_inbound:
            self.tproxy()
        if self.dns:
            self.dns_zones()
        tables = [self.raw.build(), self.mangle.build(), self.nat.build()]
        return [t for t in tables if t is not None]

    # -- nat OUTPUT: local connections ---------------------------------------

    def nat_output(self) -> None:
        p, n = self.p, self.names
        self.nat.hook(Hook.OUTPUT).append(_rule(Jump(chain=n.output)) if self.dns else _rule(Jump(chain=n.output), TCP))
        out = self.nat.chain(n.output)
        for iface in p.exclude_interfaces:
            out.append(_rule(Return(), _oif(iface)))
        if p.outbound_ports_exclude:
            out += self.port_rules(Return(), (), _ports(Protocol.TCP, p.outbound_ports_exclude))
            if self.dns:
                out += self.port_rules(Return(), (), _ports(Protocol.UDP, p.outbound_ports_exclude))
        # The proxy's inbound passthrough connects to the app from this address over lo: never capture it.
        out.append(_rule(Return(), _src([self.passthrough]), _oif(LOOPBACK_INTERFACE)))
        if p.inbound_mode is InterceptionMode.TPROXY:
            # In TPROXY mode the proxy connects to the app from the original source, with the TPROXY
            # mark on its socket: that is its passthrough, never to be captured (the hairpin below
            # would send it back to the inbound port, a loop).
            out.append(_rule(Return(), _oif(LOOPBACK_INTERFACE), MarkMatch(value=p.tproxy_mark)))
        self.hairpin(out)
        for owner in self.proxy_owners():
            out.append(_rule(Return(), owner))
        if p.loopback_capture is not LoopbackCapture.ALL:
            # The app talking to itself over lo stays direct (with DNS capture, TCP to port 53 goes on).
            if self.dns:
                out.append(
                    _rule(Return(), _oif(LOOPBACK_INTERFACE), _ports(Protocol.TCP, PortSet.of(DNS_PORT), negate=True))
                )
            else:
                out.append(_rule(Return(), _oif(LOOPBACK_INTERFACE)))
        if not isinstance(p.owner_groups_include, All):
            # Only sockets of these groups go on to capture; everything else (a packet without a
            # socket too) returns. A positive owner match means the same in every backend, where
            # "not in these groups" would not (xt_owner matches socketless packets, nft does not).
            # (Falling off the end of the chain returns.)
            out.append(_rule(Goto(chain=n.capture), _gid(IdSet.of(*p.owner_groups_include))))  # type: ignore[arg-type]
            out = self.nat.chain(n.capture)
        if p.owner_groups_exclude:
            out.append(_rule(Return(), _gid(IdSet.of(*p.owner_groups_exclude))))  # type: ignore[arg-type]
        if self.dns:
            out.append(_rule(Jump(chain=n.output_dns)))
            self.nat_dns()
        out.append(_rule(Return(), _dst([self.loopback])))
        if p.reroute_interfaces:
            out.append(_rule(Jump(chain=n.outbound)))
            self.outbound_selection(self.nat.chain(n.outbound))
        else:
            self.outbound_selection(out)
        self.nat.chain(n.redirect).append(_rule(Redirect(ports=PortSet.of(p.outbound_port)), TCP))
        self.nat.chain(n.in_redirect).append(_rule(Redirect(ports=PortSet.of(p.inbound_port)), TCP))

    def proxy_owners(self) -> list[OwnerMatch]:
        owners = []
        if self.p.proxy_uids:
            owners.append(_uid(self.p.proxy_uids))
        if self.p.proxy_gids:
            owners.append(_gid(self.p.proxy_gids))
        return owners

    def hairpin_skip(self) -> list[int]:
        """Ports of the proxy's own connections over lo that the hairpin leaves alone."""
        skip: list[int] = [self.p.inbound_tunnel_port] if self.p.inbound_tunnel_port is not None else []
        if self.dns:
            skip.append(DNS_PORT)
        return skip

    def hairpin(self, out: list[Rule]) -> None:
        """Local connections over lo to the pod's own address go to the inbound port."""
        p, n = self.p, self.names
        skip = self.hairpin_skip()
        ports: Match = _ports(Protocol.TCP, PortSet.of(*skip), negate=True) if skip else TCP
        base: tuple[Match, ...] = (_dst([self.loopback], negate=True), _oif(LOOPBACK_INTERFACE))
        match p.loopback_capture:
            case LoopbackCapture.NONE:
                pass
            case LoopbackCapture.ALL:
                out.append(Rule(matches=base + ((ports,) if skip else ()), target=Jump(chain=n.in_redirect)))
                if p.inbound_tunnel_port is not None:
                    # The tunnel port is the proxy's own listener: connections to it over lo stay direct
                    # (else an app's would fall through to the outbound capture).
                    tunnel = _ports(Protocol.TCP, PortSet.of(p.inbound_tunnel_port))
                    out.append(Rule(matches=(*base, tunnel), target=Return()))
            case LoopbackCapture.PROXY:
                for owner in self.proxy_owners():
                    out.append(Rule(matches=(*base, ports, owner), target=Jump(chain=n.in_redirect)))
            case _:
                assert_never(p.loopback_capture)

    def outbound_selection(self, chain: list[Rule]) -> None:
        """Which destinations of an app's connection go to the outbound port."""
        p, n = self.p, self.names
        excluded = p.outbound_cidrs_exclude.for_version(self.family.version)
        if excluded:
            chain.append(_rule(Return(), _dst(excluded)))
        if p.outbound_ports:
            chain += self.port_rules(Jump(chain=n.redirect), (), _ports(Protocol.TCP, p.outbound_ports))
        if isinstance(p.outbound_cidrs, All):
            chain.append(_rule(Jump(chain=n.redirect)))
        else:
            included = p.outbound_cidrs.for_version(self.family.version)
            if included:
                chain.append(_rule(Jump(chain=n.redirect), _dst(included)))

    def nat_dns(self) -> None:
        p, n = self.p, self.names
        dns_chain = self.nat.chain(n.output_dns)
        to_agent = Redirect(ports=PortSet.of(p.dns.port))
        servers: tuple[Match, ...] = () if p.dns.capture_all else (_dst(p.dns.servers_for(self.family)),)
        for protocol in (Protocol.TCP, Protocol.UDP):
            dns_chain.append(Rule(matches=(*servers, _ports(protocol, PortSet.of(DNS_PORT))), target=to_agent))

    # -- nat PREROUTING: connections from outside ------------------------------

    def nat_prerouting(self) -> None:
        p, n = self.p, self.names
        redirect_inbound = p.inbound_mode is InterceptionMode.REDIRECT and p.captures_inbound
        if not redirect_inbound and not p.reroute_interfaces:
            return
        self.nat.hook(Hook.PREROUTING).append(_rule(Jump(chain=n.inbound), TCP))
        inbound = self.nat.chain(n.inbound)
        for iface in p.exclude_interfaces:
            inbound.append(_rule(Return(), _iif(iface)))
        for iface in p.reroute_interfaces:
            # Traffic arriving on a rerouted interface (a VM bridged into the pod) is treated as outbound,
            # outbound port exclusions included.
            if p.outbound_ports_exclude:
                inbound += self.port_rules(Return(), (_iif(iface),), _ports(Protocol.TCP, p.outbound_ports_exclude))
            inbound.append(_rule(Jump(chain=n.outbound), _iif(iface)))
            inbound.append(_rule(Return(), _iif(iface)))
        if redirect_inbound:
            inbound += self.inbound_capture(Jump(chain=n.in_redirect))

    def inbound_capture(self, capture: Target, *, established: Target | None = None) -> list[Rule]:
        """Rules that send captured inbound ports to ``capture`` (and, for TPROXY, established ones to ``established``)."""
        p = self.p
        rules: list[Rule] = []
        if isinstance(p.inbound_ports, All):
            skip = p.inbound_ports_exclude
            if p.inbound_tunnel_port is not None:
                skip = skip.union(PortSet.of(p.inbound_tunnel_port))  # type: ignore[assignment]
            if skip:
                rules += self.port_rules(Return(), (), _ports(Protocol.TCP, skip))
            if established is not None:
                rules.append(_rule(established, TCP, _established()))
            rules.append(_rule(capture, TCP))
        else:
            ports = _ports(Protocol.TCP, p.inbound_ports)
            if established is not None:
                rules += self.port_rules(established, (), ports, (_established(),))
            rules += self.port_rules(capture, (), ports)
        return rules

    # -- mangle: TPROXY ---------------------------------------------------------

    def tproxy(self) -> None:
        p, n = self.p, self.names
        mark = p.tproxy_mark
        hairpin_mark = mark + HAIRPIN_MARK_OFFSET
        self.mangle.hook(Hook.PREROUTING).append(_rule(Jump(chain=n.inbound), TCP))
        inbound = self.mangle.chain(n.inbound)
        # Rerouted interfaces carry outbound traffic (nat PREROUTING sends it to the outbound port):
        # never TPROXY it to the inbound port.
        for iface in (*p.exclude_interfaces, *p.reroute_interfaces):
            inbound.append(_rule(Return(), _iif(iface)))
        # Packets the proxy marked (its transparent connections to the app) keep the mark on the
        # connection, so the app's replies can be routed back to the proxy; they are never captured.
        inbound.append(_rule(ConnmarkSave(), MarkMatch(value=mark)))
        inbound.append(_rule(Return(), MarkMatch(value=mark)))
        inbound.append(_rule(Return(), _src([self.passthrough]), _iif(LOOPBACK_INTERFACE)))
        # Over lo only the proxy's hairpin (marked in mangle OUTPUT) is captured.
        inbound.append(_rule(Return(), _iif(LOOPBACK_INTERFACE), MarkMatch(value=hairpin_mark, negate=True)))
        inbound += self.inbound_capture(Jump(chain=n.tproxy), established=Jump(chain=n.divert))
        divert = self.mangle.chain(n.divert)
        divert.append(_rule(SetMark(value=mark)))
        divert.append(_rule(Accept()))
        self.mangle.chain(n.tproxy).append(
            _rule(TProxy(port=p.inbound_port, mark=mark), _dst([self.loopback], negate=True), TCP)
        )
        self.mangle.hook(Hook.OUTPUT).append(_rule(Jump(chain=n.output), TCP))
        out = self.mangle.chain(n.output)
        for iface in p.exclude_interfaces:
            out.append(_rule(Return(), _oif(iface)))
        out.append(_rule(Return(), _oif(LOOPBACK_INTERFACE), MarkMatch(value=mark)))
        # The same connections as the nat hairpin: the tunnel port and (with DNS capture) the proxy's
        # own DNS queries to a resolver on the pod are not marked, so not captured inbound. Without a
        # hairpin no local connection is marked for capture over lo.
        skip = self.hairpin_skip()
        ports: Match = _ports(Protocol.TCP, PortSet.of(*skip), negate=True) if skip else TCP
        hairpin_owners = [] if p.loopback_capture is LoopbackCapture.NONE else self.proxy_owners()
        for owner in hairpin_owners:
            out.append(
                _rule(
                    SetMark(value=hairpin_mark),
                    _dst([self.loopback], negate=True),
                    _oif(LOOPBACK_INTERFACE),
                    ports,
                    owner,
                )
            )
        out.append(_rule(ConnmarkRestore(), ConnmarkMatch(value=mark)))

    # -- mangle: drop invalid --------------------------------------------------

    def drop_invalid(self) -> None:
        n = self.names
        self.mangle.hook(Hook.PREROUTING).append(_rule(Jump(chain=n.drop), CtStateMatch(states={CtState.INVALID})))
        self.mangle.chain(n.drop).append(_rule(Drop()))

    # -- raw: DNS conntrack zones ------------------------------------------------

    def dns_zones(self) -> None:
        p, n = self.p, self.names
        self.raw.hook(Hook.OUTPUT).append(_rule(Jump(chain=n.output_dns), UDP))
        out = self.raw.chain(n.output_dns)
        query = _ports(Protocol.UDP, PortSet.of(DNS_PORT))
        answer = _ports(Protocol.UDP, PortSet.of(p.dns.port), source=True)
        for owner in self.proxy_owners():
            out.append(_rule(CtZone(zone=DNS_UPSTREAM_ZONE), query, owner))
            out.append(_rule(CtZone(zone=DNS_CLIENT_ZONE), answer, owner))
        servers = () if p.dns.capture_all else p.dns.servers_for(self.family)
        if servers:
            out.append(_rule(CtZone(zone=DNS_CLIENT_ZONE), _dst(servers), query))
        else:
            out.append(_rule(CtZone(zone=DNS_CLIENT_ZONE), query))
        self.raw.hook(Hook.PREROUTING).append(_rule(Jump(chain=n.inbound), UDP))
        inbound = self.raw.chain(n.inbound)
        reply = _ports(Protocol.UDP, PortSet.of(DNS_PORT), source=True)
        if servers:
            inbound.append(_rule(CtZone(zone=DNS_UPSTREAM_ZONE), _src(servers), reply))
        else:
            inbound.append(_rule(CtZone(zone=DNS_UPSTREAM_ZONE), reply))


def _established() -> CtStateMatch:
    return CtStateMatch(states={CtState.RELATED, CtState.ESTABLISHED})
