"""The proofs behind :mod:`meshredirect.testing.assertions`, until the engine's ``check()`` is available.

TEMPORARY: the semantics engine's ``meshredirect.semantics.check.check``
(loop-freedom, bypass, the proxy model) is being written on another branch.
Until it lands, the assertions use this small version built on the engine's
public parts: the classes of connections
(:class:`~meshredirect.semantics.classes.ClassSpace`) explored path by path
(:class:`~meshredirect.semantics.explore.Explorer`) through the interpreter,
and each chain of interceptions followed through a minimal proxy model whose
every test on a connection's field also goes through the explorer. The
regions of the leaves partition every class combination, so no finding is a
proof. When ``check()`` lands, this module goes and the assertions call it
instead (one implementation of the proofs: the engine's).

The proxy model: a connection the rules send to the outbound listener makes
the proxy connect, as itself, to the original destination, from the source
address the kernel picks; one sent to the inbound listener makes it connect
to the original destination from the passthrough address (127.0.0.6 / ::6)
in REDIRECT mode, or from the original source with the TPROXY mark in TPROXY
mode; one sent to the DNS listener is forwarded, as the proxy, to the original
destination; the tunnel listener ends the chain; a connection whose original
destination is the proxy's own outbound or inbound listener is refused.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
from collections.abc import Callable, Hashable, Iterator, Mapping
from typing import Any, Final

import attrs

from meshredirect.ir import Direction, Family, InterfaceMatch, OwnerKind, Protocol, Ruleset
from meshredirect.semantics.classes import ClassSpace, Constants
from meshredirect.semantics.explore import Eq, In, Run, Sym, Tracer
from meshredirect.semantics.interpreter import (
    ROUTED,
    Dropped,
    Evaluation,
    Interpreter,
    Passed,
    Redirected,
    TProxied,
    Unknown,
)
from meshredirect.semantics.model import (
    DEFAULT_SOURCE_PORT,
    LOOPBACK_INTERFACE,
    Connection,
    Environment,
    Origin,
)

#: More steps than this and a chain is a loop (a sound chain has at most three).
MAX_STEPS: Final = 6
DNS_PORT: Final = 53
#: The protocols the proofs cover: a connection of another protocol never reaches a listener.
PROOF_PROTOCOLS: Final = (Protocol.TCP, Protocol.UDP)
#: How many steps of a chain a failure shows the trace of.
TRACED_STEPS: Final = 3


class Where(enum.Enum):
    OUTBOUND = "outbound listener"
    INBOUND = "inbound listener"
    TUNNEL = "tunnel listener"
    DNS = "DNS listener"
    LOCAL = "local port"
    AWAY = "leaves the pod"
    DROPPED = "dropped"
    UNKNOWN = "unknown"


#: Capture sequences a sound chain may show.
ALLOWED_CAPTURES: Final = frozenset(
    {(), (Where.OUTBOUND,), (Where.INBOUND,), (Where.OUTBOUND, Where.INBOUND), (Where.DNS,), (Where.TUNNEL,)}
)


@attrs.frozen(kw_only=True)
class Step:
    connection: Connection
    evaluation: Evaluation
    where: Where
    captured: bool
    note: str | None = None

    def __str__(self) -> str:
        how = "captured to the" if self.captured else "->"
        return f"{self.connection}  {how} {self.where.value}" + (f" ({self.note})" if self.note else "")


@attrs.frozen(kw_only=True)
class Chain:
    steps: tuple[Step, ...]
    looped: bool = False

    def describe(self) -> str:
        lines = [f"{i}. {step}" for i, step in enumerate(self.steps, 1)]
        if self.looped:
            lines.append(f"... and so on: the chain does not end within {MAX_STEPS} steps")
        return "\n".join(lines)


@attrs.frozen(kw_only=True)
class Finding:
    """A property that does not hold, on a concrete connection, with the class it stands for."""

    kind: str
    message: str
    connection: Connection
    description: str
    follow: Callable[[Connection], Chain] = attrs.field(eq=False, repr=False)

    def explain(self) -> str:
        chain = self.follow(self.connection)
        lines = [f"class: {self.description}", "chain:"]
        lines += [f"  {line}" for line in chain.describe().splitlines()]
        for index, step in enumerate(chain.steps[:TRACED_STEPS], 1):
            lines.append(f"trace of step {index}: {step.connection}")
            lines += [f"  {line}" for line in step.evaluation.explain().splitlines()]
        if len(chain.steps) > TRACED_STEPS:
            lines.append(f"(the traces of steps {TRACED_STEPS + 1} to {len(chain.steps)} are left out)")
        return "\n".join(lines)


def _probe(tracer: Tracer | None, value: Any, sym: Sym | None, key: Callable[[Any], Hashable]) -> Any:
    """``key(value)``, through the tracer when the value stands for a dimension."""
    if tracer is None or sym is None:
        return key(value)
    return tracer.decide(sym, key)


class Prover:
    """Chains of interceptions in one environment, concretely or along the explorer's paths."""

    def __init__(self, ruleset: Ruleset, env: Environment) -> None:
        self.interpreter = Interpreter(ruleset, env)
        self.env = env
        proxy = env.proxy
        listeners = {proxy.outbound_port: Where.OUTBOUND, proxy.inbound_port: Where.INBOUND}
        if proxy.tunnel_port is not None:
            listeners[proxy.tunnel_port] = Where.TUNNEL
        if proxy.dns_port is not None:
            listeners[proxy.dns_port] = Where.DNS
        self.listeners = listeners
        # Tests of stable identity: the explorer caches the partitions they make.
        self.listener: Callable[[Any], Hashable] = lambda port: listeners.get(port, Where.LOCAL)
        self.is_local: Callable[[Any], Hashable] = env.is_local
        self.is_loopback: Callable[[Any], Hashable] = env.is_loopback
        self.routes_locally: Callable[[Any], Hashable] = env.routes_locally
        self.subnet_route: Callable[[Any], Hashable] = env.subnet_route
        self.source_for: Callable[[Any], Hashable] = functools.partial(_source_for, env)
        self.own_listener_port = In(frozenset({proxy.outbound_port, proxy.inbound_port}))

    # ------------------------------------------------------------------ one step

    def arrival(self, ev: Evaluation, tracer: Tracer | None) -> tuple[Where, bool, str | None]:
        """Where an evaluated connection arrives, whether the rules captured it, and a note."""
        verdict = ev.verdict
        if isinstance(verdict, Passed):
            return (Where.LOCAL if verdict.local else Where.AWAY), False, None
        if isinstance(verdict, Redirected):
            if not _probe(tracer, verdict.address, ev.symbols.get("verdict.address"), self.is_local):
                return Where.AWAY, False, "its destination was rewritten to another host"
            where = _probe(tracer, verdict.port, ev.symbols.get("verdict.port"), self.listener)
            return where, where is not Where.LOCAL, None
        if isinstance(verdict, TProxied):
            found = self.listeners.get(verdict.port)
            if found is None or not self.env.proxy.transparent:
                return Where.DROPPED, True, f"no transparent listener on port {verdict.port}"
            return found, True, None
        if isinstance(verdict, Dropped):
            return Where.DROPPED, False, str(verdict)
        assert isinstance(verdict, Unknown)
        return Where.UNKNOWN, False, verdict.reason

    def next_connection(
        self, c: Connection, where: Where, captured: bool, symbols: Mapping[str, Sym], tracer: Tracer | None
    ) -> tuple[Connection, dict[str, Sym]] | str | None:
        """The proxy's follow-up connection (and which fields stand for dimensions), why none, or None."""
        if not captured or where not in (Where.OUTBOUND, Where.INBOUND, Where.DNS):
            return None
        env, proxy = self.env, self.env.proxy
        dst_sym, dport_sym = symbols.get("dst"), symbols.get("dport")
        if (
            where is not Where.DNS
            and _probe(tracer, c.dst, dst_sym, self.is_local)
            and _probe(tracer, c.dport, dport_sym, self.own_listener_port)
        ):
            return "the proxy refuses it: its original destination is the proxy's own listener"
        src_sym: Sym | None = None
        if where is Where.INBOUND and proxy.transparent:
            src, src_sym, mark = c.src, symbols.get("src"), proxy.tproxy_mark
        elif where is Where.INBOUND:
            src, mark = proxy.passthrough_for(c.family), 0
        else:
            src, mark = _probe(tracer, c.dst, dst_sym, self.source_for), 0
        follow_up = Connection(
            family=c.family,
            protocol=c.protocol,
            src=src,
            sport=DEFAULT_SOURCE_PORT,
            dst=c.dst,
            dport=c.dport,
            origin=Origin.LOCAL,
            oif=env.route(c.dst, mark),
            socket=proxy.socket,
            mark=mark,
        )
        follow_symbols: dict[str, Sym] = {"oif": ROUTED}
        for field, sym in (("src", src_sym), ("dst", dst_sym), ("dport", dport_sym)):
            if sym is not None:
                follow_symbols[field] = sym
        return follow_up, follow_symbols

    # ------------------------------------------------------------------ chains

    def outline(
        self, c: Connection, symbols: Mapping[str, Sym], tracer: Tracer
    ) -> tuple[tuple[tuple[Where, bool, str | None], ...], bool]:
        """The arrivals of ``c``'s chain along the tracer's path, and whether it loops."""
        steps: list[tuple[Where, bool, str | None]] = []
        current: tuple[Connection, Mapping[str, Sym]] | None = (c, symbols)
        while current is not None:
            if len(steps) >= MAX_STEPS:
                return tuple(steps), True
            connection, syms = current
            ev = self.interpreter.evaluate(connection, trace=False, symbols=syms, tracer=tracer)
            where, captured, note = self.arrival(ev, tracer)
            nxt = self.next_connection(connection, where, captured, syms, tracer)
            steps.append((where, captured, note or (nxt if isinstance(nxt, str) else None)))
            current = nxt if isinstance(nxt, tuple) else None
        return tuple(steps), False

    def follow(self, c: Connection) -> Chain:
        """``c``'s chain, concretely, with every step's trace."""
        steps: list[Step] = []
        current: Connection | None = c
        while current is not None:
            if len(steps) >= MAX_STEPS:
                return Chain(steps=tuple(steps), looped=True)
            ev = self.interpreter.evaluate(current)
            where, captured, note = self.arrival(ev, None)
            nxt = self.next_connection(current, where, captured, {}, None)
            steps.append(
                Step(
                    connection=current,
                    evaluation=ev,
                    where=where,
                    captured=captured,
                    note=note or (nxt if isinstance(nxt, str) else None),
                )
            )
            current = nxt[0] if isinstance(nxt, tuple) else None
        return Chain(steps=tuple(steps))

    def route(self, c: Connection, tracer: Tracer, symbols: Mapping[str, Sym]) -> str:
        """The outgoing interface the route function gives a local connection (before any NAT)."""
        mark_sym = symbols.get("mark")
        if _probe(tracer, c.mark, mark_sym, self.routes_locally) or _probe(
            tracer, c.dst, symbols.get("dst"), self.is_local
        ):
            return LOOPBACK_INTERFACE
        return str(_probe(tracer, c.dst, symbols.get("dst"), self.subnet_route))


def _source_for(env: Environment, dst: Any) -> Any:
    return env.source_for(dst)


def _families(ruleset: Ruleset) -> tuple[Family, ...]:
    present = set(ruleset.families)
    if Family.INET in present:
        present |= {Family.IPV4, Family.IPV6}
    return tuple(f for f in (Family.IPV4, Family.IPV6) if f in present) or (Family.IPV4,)


def _explore(
    space: ClassSpace, program: Callable[[Connection, Mapping[str, Sym], Run], Any]
) -> Iterator[tuple[Any, Connection, str]]:
    """Every path's non-None result, with its example connection and the class it stands for."""
    for root in space.roots:
        explorer = root.explorer()
        symbols = space.symbols(root)

        def run_program(run: Run, root: Any = root, symbols: Mapping[str, Sym] = symbols) -> Any:
            c = space.connection(root, {d: run.value(d) for d in root.dims})
            return program(c, symbols, run)

        for leaf in explorer.explore(run_program):
            if leaf.result is not None:
                yield leaf.result, space.connection(root, leaf.example), space.describe(root, leaf.region)


# ----------------------------------------------------------------------------- loop-freedom


def loop_findings(ruleset: Ruleset, env: Environment) -> Iterator[Finding]:
    """Classes of connections whose chain loops, captures more than a sound chain does, or cannot be decided."""
    prover = Prover(ruleset, env)
    space = ClassSpace([ruleset], env, families=_families(ruleset), protocols=PROOF_PROTOCOLS)

    def program(c: Connection, symbols: Mapping[str, Sym], run: Run) -> tuple[str, int, str] | None:
        steps, looped = prover.outline(c, symbols, run)
        for index, (where, _captured, note) in enumerate(steps):
            if where is Where.UNKNOWN:
                return "undecided", index, note or ""
        if looped:
            return "loop", len(steps), ""
        captures = tuple(where for where, captured, _note in steps if captured)
        if captures not in ALLOWED_CAPTURES:
            return "captures", len(steps), ", then ".join(w.value for w in captures)
        return None

    for (kind, number, text), connection, description in _explore(space, program):
        if kind == "undecided":
            chain = prover.follow(connection)
            message = f"the rules' effect on {chain.steps[number].connection} cannot be decided: {text}"
        elif kind == "loop":
            message = f"traffic loop: {connection} is intercepted again and again ({number} steps and on)"
        else:
            message = f"{connection} is captured {text.count(', then ') + 1} times: {text}"
        yield Finding(kind=kind, message=message, connection=connection, description=description, follow=prover.follow)


# ----------------------------------------------------------------------------- bypass


def bypass_findings(ruleset: Ruleset, policy: Any, env: Environment) -> Iterator[Finding]:
    """Classes of app TCP connections the policy captures that do not reach the proxy (outbound over a
    non-loopback interface; inbound to the pod's own address)."""
    spec = _Spec(policy, env)
    prover = Prover(ruleset, env)
    families = tuple(f for f in (Family.IPV4, Family.IPV6) if f in policy.families)
    space = ClassSpace([ruleset], env, families=families, protocols=(Protocol.TCP,), constants=spec.constants)
    proxy = env.proxy

    def program(c: Connection, symbols: Mapping[str, Sym], run: Run) -> tuple[str, str] | None:
        expected = spec.expected(c, symbols, run, prover)
        if expected is None:
            return None
        ev = prover.interpreter.evaluate(c, trace=False, symbols=symbols, tracer=run)
        where, captured, _note = prover.arrival(ev, run)
        if where is expected and captured:
            return None
        verdict = ev.verdict
        listener = proxy.outbound_port if expected is Where.OUTBOUND else proxy.inbound_port
        if where is Where.LOCAL and isinstance(verdict, Passed):
            port = _probe(run, verdict.port, ev.symbols.get("verdict.port"), prover.listener)
            if port is expected:
                return None  # it reached the listener's port by itself
        direction = "outbound" if expected is Where.OUTBOUND else "inbound"
        return direction, f"{expected.value} (the policy captures it {direction}; port {listener})"

    for (kind, wanted), connection, description in _explore(space, program):
        verdict = prover.interpreter.evaluate(connection, trace=False).verdict
        message = f"mesh bypass: {connection} should reach the proxy's {wanted}, but: {verdict}"
        yield Finding(kind=kind, message=message, connection=connection, description=description, follow=prover.follow)


class _Spec:
    """Which connections a policy captures, in the policy's own terms (only what bypass needs)."""

    def __init__(self, p: Any, env: Environment) -> None:
        from meshredirect.values import AddressSet, All, IdSet

        self.p = p
        self.env = env
        self.loopback = In(AddressSet.of(p.loopback_cidr, "::1/128"))
        self.out_excluded_ports = In(p.outbound_ports_exclude)
        self.out_ports = In(p.outbound_ports)
        self.out_cidrs_excluded = In(p.outbound_cidrs_exclude)
        self.out_cidrs = None if isinstance(p.outbound_cidrs, All) else In(p.outbound_cidrs)
        self.in_ports = None if isinstance(p.inbound_ports, All) else In(p.inbound_ports)
        self.in_excluded = In(p.inbound_ports_exclude)
        self.tunnel = Eq(p.inbound_tunnel_port)
        self.dns_port = Eq(DNS_PORT)
        include = None if isinstance(p.owner_groups_include, All) else IdSet.of(*_gids(p.owner_groups_include))
        self.groups_include = None if include is None else In(include)
        self.groups_exclude = In(IdSet.of(*_gids(p.owner_groups_exclude)))
        self.proxy_uid = In(env.proxy.uids)
        self.proxy_gid = In(env.proxy.gids)
        self.unmarked = Eq(0)
        self.present: Callable[[Any], Hashable] = bool
        excluded, skipped = tuple(p.exclude_interfaces), (*p.exclude_interfaces, *p.reroute_interfaces)
        self.oif_excluded: Callable[[Any], Hashable] = lambda name: _interface_in(str(name), excluded)
        self.iif_skipped: Callable[[Any], Hashable] = lambda name: _interface_in(str(name), skipped)
        # Every value tested here must split the classes (else the proof would not be exact).
        k = Constants()
        k.add_networks(None, (p.loopback_cidr, ipaddress.ip_network("::1/128")))
        k.add_networks(None, tuple(p.outbound_cidrs_exclude))
        if not isinstance(p.outbound_cidrs, All):
            k.add_networks(None, tuple(p.outbound_cidrs))
        for ports in (p.outbound_ports_exclude, p.outbound_ports, p.inbound_ports_exclude):
            k.add_ports(None, Direction.DESTINATION, ports)
        if not isinstance(p.inbound_ports, All):
            k.add_ports(None, Direction.DESTINATION, p.inbound_ports)
        if p.inbound_tunnel_port is not None:
            k.add_ports(None, Direction.DESTINATION, (p.inbound_tunnel_port,))
        k.add_ports(None, Direction.DESTINATION, (DNS_PORT,))
        if include is not None:
            k.add_ids(OwnerKind.GID, include)
        k.add_ids(OwnerKind.GID, IdSet.of(*_gids(p.owner_groups_exclude)))
        self.constants = k

    def expected(self, c: Connection, symbols: Mapping[str, Sym], t: Run, prover: Prover) -> Where | None:
        p = self.p
        s = symbols.get
        if c.origin is Origin.LOCAL:
            if not _probe(t, c.socket is not None, s("socket"), self.present):
                return None
            assert c.socket is not None
            if _probe(t, c.socket.uid, s("uid"), self.proxy_uid) or _probe(t, c.socket.gid, s("gid"), self.proxy_gid):
                return None
            if not _probe(t, c.mark, s("mark"), self.unmarked):
                return None  # apps do not mark their packets
            oif = prover.route(c, t, symbols)
            if oif == LOOPBACK_INTERFACE or self.oif_excluded(oif):
                return None
            if p.dns.active_for(c.family) and _probe(t, c.dport, s("dport"), self.dns_port):
                return None
            if _probe(t, c.dport, s("dport"), self.out_excluded_ports):
                return None
            if _probe(t, c.dst, s("dst"), self.loopback) or _probe(t, c.dst, s("dst"), self.out_cidrs_excluded):
                return None
            if self.groups_include is not None and not _probe(t, c.socket.gid, s("gid"), self.groups_include):
                return None
            if _probe(t, c.socket.gid, s("gid"), self.groups_exclude):
                return None
            if (
                self.out_cidrs is None
                or _probe(t, c.dport, s("dport"), self.out_ports)
                or _probe(t, c.dst, s("dst"), self.out_cidrs)
            ):
                return Where.OUTBOUND
            return None
        if _probe(t, c.iif, s("iif"), self.iif_skipped):
            return None
        if not _probe(t, c.dst, s("dst"), prover.is_local) or _probe(t, c.dst, s("dst"), prover.is_loopback):
            return None
        if p.inbound_tunnel_port is not None and _probe(t, c.dport, s("dport"), self.tunnel):
            return None
        if self.in_ports is None:
            return None if _probe(t, c.dport, s("dport"), self.in_excluded) else Where.INBOUND
        return Where.INBOUND if _probe(t, c.dport, s("dport"), self.in_ports) else None


def _gids(groups: tuple[int | str, ...]) -> list[int]:
    return [g for g in groups if isinstance(g, int)]


def _interface_in(interface: str, names: tuple[str, ...]) -> bool:
    return any(InterfaceMatch(direction=Direction.SOURCE, name=n).matches(interface) for n in names)
