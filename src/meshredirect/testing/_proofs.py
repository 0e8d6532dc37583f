"""The proofs behind :mod:`meshredirect.testing.assertions`, until the engine's ``check()`` is available.

TEMPORARY: the semantics engine's :func:`meshredirect.semantics.check.check`
(loop-freedom, bypass, the proxy model) is being written on another branch.
Until it lands, the assertions use this small version built on the engine's
public parts: every class representative of
:func:`~meshredirect.semantics.classes.connection_classes` (the full product,
which is a proof: every connection behaves like its class's representative),
evaluated with :func:`~meshredirect.semantics.interpreter.evaluate` and
followed through a minimal proxy model. When ``check()`` lands, this module
goes and the assertions call it instead (one implementation of the proofs:
the engine's).

The proxy model: a connection the rules send to the outbound listener makes
the proxy connect, as itself, to the original destination; one sent to the
inbound listener makes it connect to the app from the passthrough address
(127.0.0.6 / ::6) in REDIRECT mode, or from the original source with the
TPROXY mark in TPROXY mode; one sent to the DNS listener is forwarded as the
proxy to the original destination; the tunnel listener ends the chain; a
connection whose original destination is the proxy's own outbound or inbound
listener is refused.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterator
from typing import Any, Final

import attrs

from meshredirect.ir import Direction, Family, OwnerKind, Protocol, Ruleset
from meshredirect.semantics.classes import ClassSpace, Constants, connection_classes
from meshredirect.semantics.interpreter import (
    Dropped,
    Evaluation,
    Interpreter,
    Passed,
    Redirected,
    TProxied,
    Unknown,
)
from meshredirect.semantics.model import DEFAULT_SOURCE_PORT, Connection, Environment, Origin

#: More steps than this and a chain is a loop (a sound chain has at most three).
MAX_STEPS: Final = 6
DNS_PORT: Final = 53
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

    @property
    def captures(self) -> tuple[Where, ...]:
        return tuple(s.where for s in self.steps if s.captured)

    def describe(self) -> str:
        lines = [f"{i}. {step}" for i, step in enumerate(self.steps, 1)]
        if self.looped:
            lines.append(f"... and so on: the chain does not end within {MAX_STEPS} steps")
        return "\n".join(lines)


@attrs.frozen(kw_only=True)
class Finding:
    """A property that does not hold, on a concrete connection, with its chain and traces."""

    kind: str
    message: str
    connection: Connection
    chain: Chain

    def explain(self) -> str:
        lines = ["chain:"]
        lines += [f"  {line}" for line in self.chain.describe().splitlines()]
        for index, step in enumerate(self.chain.steps[:TRACED_STEPS], 1):
            lines.append(f"trace of step {index}: {step.connection}")
            lines += [f"  {line}" for line in step.evaluation.explain().splitlines()]
        if len(self.chain.steps) > TRACED_STEPS:
            lines.append(f"(the traces of steps {TRACED_STEPS + 1} to {len(self.chain.steps)} are left out)")
        return "\n".join(lines)


def _where(ev: Evaluation, env: Environment) -> tuple[Where, bool, str | None]:
    proxy = env.proxy
    listeners = {proxy.outbound_port: Where.OUTBOUND, proxy.inbound_port: Where.INBOUND}
    if proxy.tunnel_port is not None:
        listeners[proxy.tunnel_port] = Where.TUNNEL
    if proxy.dns_port is not None:
        listeners[proxy.dns_port] = Where.DNS
    verdict = ev.verdict
    if isinstance(verdict, Passed):
        return (Where.LOCAL if verdict.local else Where.AWAY), False, None
    if isinstance(verdict, Redirected):
        if not env.is_local(verdict.address):
            return Where.AWAY, False, "its destination was rewritten to another host"
        where = listeners.get(verdict.port)
        return (where, True, None) if where is not None else (Where.LOCAL, False, None)
    if isinstance(verdict, TProxied):
        where = listeners.get(verdict.port)
        if where is None or not proxy.transparent:
            return Where.DROPPED, True, f"no transparent listener on port {verdict.port}"
        return where, True, None
    if isinstance(verdict, Dropped):
        return Where.DROPPED, False, str(verdict)
    assert isinstance(verdict, Unknown)
    return Where.UNKNOWN, False, verdict.reason


def follow(interpreter: Interpreter, connection: Connection) -> Chain:
    """The connection, what the rules do to it, and the proxy's follow-up connections, to the end."""
    env = interpreter.env
    proxy = env.proxy
    steps: list[Step] = []
    current: Connection | None = connection
    while current is not None:
        if len(steps) >= MAX_STEPS:
            return Chain(steps=tuple(steps), looped=True)
        ev = interpreter.evaluate(current)
        where, captured, note = _where(ev, env)
        current_step = current
        current = None
        if captured and where in (Where.OUTBOUND, Where.INBOUND, Where.DNS):
            original = current_step
            if (
                where is not Where.DNS
                and env.is_local(original.dst)
                and original.dport in (proxy.outbound_port, proxy.inbound_port)
            ):
                note = "the proxy refuses it: its original destination is the proxy's own listener"
            else:
                if where is Where.INBOUND and proxy.transparent:
                    src, mark = original.src, proxy.tproxy_mark
                elif where is Where.INBOUND:
                    src, mark = proxy.passthrough_for(original.family), 0
                else:
                    src, mark = env.source_for(original.dst), 0
                current = Connection(
                    family=original.family,
                    protocol=original.protocol,
                    src=src,
                    sport=DEFAULT_SOURCE_PORT,
                    dst=original.dst,
                    dport=original.dport,
                    origin=Origin.LOCAL,
                    oif=env.route(original.dst, mark),
                    socket=proxy.socket,
                    mark=mark,
                )
        steps.append(Step(connection=current_step, evaluation=ev, where=where, captured=captured, note=note))
    return Chain(steps=tuple(steps))


def _families(ruleset: Ruleset) -> tuple[Family, ...]:
    present = set(ruleset.families)
    if Family.INET in present:
        present |= {Family.IPV4, Family.IPV6}
    return tuple(f for f in (Family.IPV4, Family.IPV6) if f in present) or (Family.IPV4,)


def loop_findings(ruleset: Ruleset, env: Environment) -> Iterator[Finding]:
    """Connections whose chain loops, captures more than a sound chain does, or cannot be decided."""
    interpreter = Interpreter(ruleset, env)
    for connection in connection_classes([ruleset], env, families=_families(ruleset)):
        chain = follow(interpreter, connection)
        undecided = next((s for s in chain.steps if s.where is Where.UNKNOWN), None)
        if undecided is not None:
            yield Finding(
                kind="undecided",
                message=f"the rules' effect on {undecided.connection} cannot be decided: {undecided.note}",
                connection=connection,
                chain=chain,
            )
        elif chain.looped:
            yield Finding(
                kind="loop",
                message=f"traffic loop: {connection} is intercepted again and again ({len(chain.steps)} steps and on)",
                connection=connection,
                chain=chain,
            )
        elif chain.captures not in ALLOWED_CAPTURES:
            names = ", then ".join(w.value for w in chain.captures)
            yield Finding(
                kind="captures",
                message=f"{connection} is captured {len(chain.captures)} times: {names}",
                connection=connection,
                chain=chain,
            )


def bypass_findings(ruleset: Ruleset, policy: object, env: Environment) -> Iterator[Finding]:
    """App TCP connections the policy captures that do not reach the proxy (outbound, and inbound to the pod)."""
    from meshredirect.policy import Policy
    from meshredirect.values import AddressSet, All

    assert isinstance(policy, Policy)
    p = policy
    proxy = env.proxy
    interpreter = Interpreter(ruleset, env)
    loopback = AddressSet.of(p.loopback_cidr, "::1/128")
    groups_include = None if isinstance(p.owner_groups_include, All) else _gids(p.owner_groups_include)
    groups_exclude = _gids(p.owner_groups_exclude)
    families = tuple(f for f in (Family.IPV4, Family.IPV6) if f in p.families)
    constants = _policy_constants(p)
    space = ClassSpace([ruleset], env, families=families, protocols=(Protocol.TCP,), constants=constants)
    for c in space.connections():
        if c.origin is Origin.LOCAL:
            socket = c.socket
            if socket is None or proxy.owns(socket) or c.mark or c.oif is None or c.oif == "lo":
                continue
            if p.dns.active_for(c.family) and c.dport == DNS_PORT:
                continue
            if any(_interface_in(c.oif, name) for name in p.exclude_interfaces):
                continue
            if c.dport in p.outbound_ports_exclude or c.dst in loopback or c.dst in p.outbound_cidrs_exclude:
                continue
            if groups_include is not None and socket.gid not in groups_include:
                continue
            if socket.gid in groups_exclude:
                continue
            if not (c.dport in p.outbound_ports or isinstance(p.outbound_cidrs, All) or c.dst in p.outbound_cidrs):
                continue
            expected, reason = Where.OUTBOUND, "the policy captures it outbound"
        else:
            if c.iif is None or not env.is_local(c.dst) or env.is_loopback(c.dst):
                continue
            if any(_interface_in(c.iif, name) for name in (*p.exclude_interfaces, *p.reroute_interfaces)):
                continue
            if p.inbound_tunnel_port is not None and c.dport == p.inbound_tunnel_port:
                continue
            if isinstance(p.inbound_ports, All):
                if c.dport in p.inbound_ports_exclude:
                    continue
            elif c.dport not in p.inbound_ports:
                continue
            expected, reason = Where.INBOUND, "the policy captures it inbound"
        chain = follow(interpreter, c)
        first = chain.steps[0]
        if first.where is expected and first.captured:
            continue
        verdict = first.evaluation.verdict
        listener = proxy.outbound_port if expected is Where.OUTBOUND else proxy.inbound_port
        if first.where is Where.LOCAL and isinstance(verdict, (Passed, Redirected)) and verdict.port == listener:
            continue  # it went to the listener's port by itself (a NAT that changed nothing)
        direction = "outbound" if expected is Where.OUTBOUND else "inbound"
        yield Finding(
            kind=direction,
            message=f"mesh bypass: {c} should reach the proxy's {expected.value} ({reason}), but: {verdict}",
            connection=c,
            chain=chain,
        )


def _policy_constants(p: Any) -> Constants:
    """Every value the policy's side of the bypass check compares a connection with (they must split the classes)."""
    from meshredirect.values import All

    constants = Constants()
    constants.add_networks(None, (p.loopback_cidr, ipaddress.ip_network("::1/128")))
    constants.add_networks(None, tuple(p.outbound_cidrs_exclude))
    if not isinstance(p.outbound_cidrs, All):
        constants.add_networks(None, tuple(p.outbound_cidrs))
    constants.add_networks(None, p.dns.servers)
    for ports in (p.outbound_ports_exclude, p.outbound_ports, p.inbound_ports_exclude):
        constants.add_ports(None, Direction.DESTINATION, ports)
    if not isinstance(p.inbound_ports, All):
        constants.add_ports(None, Direction.DESTINATION, p.inbound_ports)
    if p.inbound_tunnel_port is not None:
        constants.add_ports(None, Direction.DESTINATION, (p.inbound_tunnel_port,))
    constants.add_ports(None, Direction.DESTINATION, (DNS_PORT,))
    if not isinstance(p.owner_groups_include, All):
        constants.add_ids(OwnerKind.GID, _gids(p.owner_groups_include))
    constants.add_ids(OwnerKind.GID, _gids(p.owner_groups_exclude))
    return constants


def _gids(groups: tuple[int | str, ...]) -> Any:
    from meshredirect.values import IdSet

    return IdSet.of(*(g for g in groups if isinstance(g, int)))


def _interface_in(interface: str, name: str) -> bool:
    return interface.startswith(name[:-1]) if name.endswith("+") else interface == name
