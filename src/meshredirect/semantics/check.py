"""Proofs about a policy's rules (or any ruleset): no loops, no bypass, every exclusion honoured.

:func:`check` explores every class of connections (see
:mod:`meshredirect.semantics.classes` and :mod:`meshredirect.semantics.explore`)
and, for each, follows the interception chain (:mod:`meshredirect.semantics.proxy`)
and checks the :class:`Property` list:

- **loop-freedom**: every chain ends; stronger, its captures are at most one
  outbound capture followed by at most one inbound capture (or one DNS capture);
- the local facts behind it: the proxy's own traffic never reaches the
  outbound port; the inbound passthrough (127.0.0.6 / ::6 over ``lo``)
  always passes; the only re-capture of the proxy's traffic is the ``lo``
  hairpin to the inbound port; the proxy's own ports and its DNS queries are
  never captured (the tunnel port, the listeners at 127.0.0.1 / ::1, the
  proxy's queries to port 53 when DNS capture is on);
- with a :class:`~meshredirect.policy.Policy` as the subject, completeness:
  every app TCP connection no exclusion covers reaches the outbound port
  (DNS queries the policy captures reach the DNS port; over ``lo`` with
  loopback capture "all", the inbound port); every inbound TCP connection to
  a captured port reaches the inbound port; every exclusion is honoured (the
  connection passes untouched). What the policy means is written here a
  second time, in its own terms, independently of the compiler.

A verdict the interpreter cannot decide is a violation too: a proof with a
hole in it is not claimed. Every :class:`Violation` carries a concrete
connection, its interception chain with the full trace of every step, and
the class of connections it stands for, worded for a mesh operator.

>>> from meshredirect.policy import Policy
>>> report = check(Policy())
>>> report.ok, report.classes > 1000, report.paths < report.classes
(True, True, True)
"""

from __future__ import annotations

import enum
import functools
import ipaddress
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from typing import Any, Final

import attrs

from meshredirect.ir import (
    ConnmarkMatch,
    Direction,
    Family,
    InterfaceMatch,
    MarkMatch,
    OwnerKind,
    Protocol,
    Ruleset,
)
from meshredirect.semantics.classes import ClassSpace, Constants, Root
from meshredirect.semantics.explore import Eq, In, Run, Tracer, probe
from meshredirect.semantics.interpreter import ELIDE_AFTER, Interpreter, Passed, Redirected, TProxied
from meshredirect.semantics.model import LOOPBACK_INTERFACE, Connection, Environment, Origin
from meshredirect.semantics.proxy import Arrival, InterceptionChain, ProxyModel, Step, arrives_at, follow
from meshredirect.values import MAX_MARK, AddressSet, All, IdSet

__all__ = ["CheckReport", "Checker", "Property", "Violation", "check", "checker"]

DNS_PORT: Final = 53
#: How many examples of each violated property :meth:`CheckReport.summary` shows.
SUMMARY_EXAMPLES: Final = 3


class Property(enum.Enum):
    """What :func:`check` proves, in words."""

    LOOP = "no loop: every chain of interceptions ends"
    CAPTURE_BOUND = "at most one outbound capture followed by at most one inbound capture"
    PROXY_TO_OUTBOUND = "the proxy's own traffic never reaches the outbound port"
    PASSTHROUGH = "the inbound passthrough (127.0.0.6 / ::6 over lo) always passes"
    PROXY_RECAPTURE = "the only re-capture of the proxy's traffic is the lo hairpin to the inbound port"
    PROXY_PORTS = "the proxy's own ports and its DNS queries are never captured"
    OUTBOUND_COMPLETE = "every app connection no exclusion covers reaches the proxy"
    INBOUND_COMPLETE = "every inbound TCP connection to a captured port reaches the inbound port"
    EXCLUSIONS = "every exclusion is honoured"
    DECIDED = "every verdict can be decided"


#: The properties that need a policy (what the rules should do).
POLICY_PROPERTIES: Final = frozenset({Property.OUTBOUND_COMPLETE, Property.INBOUND_COMPLETE, Property.EXCLUSIONS})


@attrs.frozen(kw_only=True)
class Violation:
    """A property that does not hold, shown on a concrete connection.

    Its :attr:`chain` (the full traces) is worked out when first asked for: a node's rules may show
    hundreds of violations, of which a report prints a few.
    """

    property: Property
    #: What goes wrong, for a mesh operator.
    message: str
    connection: Connection
    #: The class of connections this one stands for (they all fail the same way).
    description: str
    #: How many more classes like :attr:`description`, alike but for their addresses and ports (the
    #: services, node ports... that mirror the rules this one meets: ``semantics.symmetry``), fail the
    #: same way (the proof explored them once).
    mirrored: int = 0
    #: Works out :attr:`chain` (the evaluation with its traces, the proxy's follow-ups).
    replay: Callable[[], InterceptionChain] = attrs.field(eq=False, repr=False)

    @functools.cached_property
    def chain(self) -> InterceptionChain:
        """The connection, what the rules do to it, and what the proxy does next, with full traces."""
        return self.replay()

    def explain(self, *, elide: int | None = ELIDE_AFTER) -> str:
        """The violation with its chain and every step's trace (``elide``: see
        :meth:`~meshredirect.semantics.interpreter.Evaluation.explain`)."""
        lines = [f"VIOLATED: {self.property.value}", f"  {self.message}", f"  class: {self.description}"]
        if self.mirrored:
            lines.append(f"  and so do {self.mirrored} more classes like it, alike but for their addresses and ports")
        lines.append("  chain:")
        lines += [f"    {line}" for line in self.chain.describe().splitlines()]
        for index, step in enumerate(self.chain.steps, 1):
            lines.append(f"  trace of step {index}: {step.connection}")
            lines += [f"    {line}" for line in step.evaluation.explain(elide=elide).splitlines()]
        return "\n".join(lines)


@attrs.frozen(kw_only=True)
class CheckReport:
    """What :func:`check` found: violations (none: every property holds), and the proof's size."""

    violations: tuple[Violation, ...]
    properties: tuple[Property, ...]
    #: Class combinations covered (every connection belongs to one).
    classes: int
    #: Paths explored: each covers a region of class combinations that behave alike.
    paths: int

    @property
    def ok(self) -> bool:
        return not self.violations

    def of(self, prop: Property) -> tuple[Violation, ...]:
        return tuple(v for v in self.violations if v.property is prop)

    def summary(self, *, examples: int = SUMMARY_EXAMPLES, elide: int | None = ELIDE_AFTER) -> str:
        """A line per property, and the first few violations of each that fails."""
        lines = [f"checked {self.classes} classes of connections along {self.paths} paths"]
        for prop in self.properties:
            found = self.of(prop)
            lines.append(f"{'FAIL' if found else 'ok  '} {prop.value}" + (f" ({len(found)} classes)" if found else ""))
        for prop in self.properties:
            for violation in self.of(prop)[:examples]:
                lines.append("")
                lines.append(violation.explain(elide=elide))
        return "\n".join(lines)


def check(
    subject: Any,
    env: Environment | None = None,
    *,
    ruleset: Ruleset | None = None,
    model: ProxyModel | None = None,
    families: Sequence[Family] | None = None,
) -> CheckReport:
    """Prove the properties for every connection; ``subject`` is a Policy or a Ruleset.

    A policy is compiled (or, with ``ruleset``, that ruleset stands for it:
    rules read from a node, another backend's output read back), and its own
    environment (:meth:`~meshredirect.semantics.model.Environment.for_policy`) is used unless ``env`` is
    given; completeness is checked against the policy. A ruleset alone is
    checked in ``env`` (default: the default environment, with the
    interfaces the ruleset names) for the properties that need no policy.
    ``model`` changes how the proxy behaves (see :class:`~meshredirect.semantics.proxy.ProxyModel`).
    """
    return checker(subject, env, ruleset=ruleset, model=model, families=families).run()


def checker(
    subject: Any,
    env: Environment | None = None,
    *,
    ruleset: Ruleset | None = None,
    model: ProxyModel | None = None,
    families: Sequence[Family] | None = None,
) -> Checker:
    """The :class:`Checker` :func:`check` runs (see there for the arguments)."""
    from meshredirect.policy import Policy

    policy: Policy | None
    if isinstance(subject, Policy):
        from meshredirect.compiler import compile_policy

        policy = subject
        ruleset = ruleset if ruleset is not None else compile_policy(policy)
        environment = env if env is not None else Environment.for_policy(policy, ruleset)
        families = tuple(families) if families is not None else (Family.IPV4, Family.IPV6)
    elif isinstance(subject, Ruleset):
        if ruleset is not None:
            raise TypeError("check(ruleset, ruleset=...): give the policy as the subject to check a ruleset against it")
        policy = None
        ruleset = subject
        environment = (env if env is not None else Environment.default()).covering(ruleset)
    else:
        raise TypeError(f"check() takes a Policy or a Ruleset, not {type(subject).__name__}")
    return Checker(ruleset, environment, policy, model or ProxyModel(), families)


class Checker:
    """A ruleset, its environment and (optionally) its policy, ready to check connections."""

    def __init__(
        self,
        ruleset: Ruleset,
        env: Environment,
        policy: Any,
        model: ProxyModel,
        families: Sequence[Family] | None,
    ) -> None:
        self.ruleset = ruleset
        self.env = env
        self.policy = policy
        self.model = model
        self.interpreter = Interpreter(ruleset, env)
        constants = Constants()
        proxy = env.proxy
        self.is_proxy_uid = In(proxy.uids)
        self.is_proxy_gid = In(proxy.gids)
        self.present: Callable[[Any], Hashable] = bool
        self.is_local: Callable[[Any], Hashable] = env.is_local
        self.is_loopback: Callable[[Any], Hashable] = env.is_loopback
        self.passthrough = {f: Eq(proxy.passthrough_for(f)) for f in (Family.IPV4, Family.IPV6)}
        rerouted = env.rerouted_interfaces
        self.rerouted: Callable[[Any], Hashable] = lambda name: _interface_in(name, rerouted)
        # Marks matter when the rules or the routes test them; then the spec leaves marked app
        # connections out (apps do not mark their packets; marks are the proxy's business).
        marks_matter = (
            bool(env.local_marks)
            or proxy.transparent
            or any(isinstance(m, (MarkMatch, ConnmarkMatch)) for _t, _c, rule in ruleset.rules() for m in rule.matches)
        )
        self.marks_matter = marks_matter
        self.proxy_marks = In(frozenset(proxy.marks))
        if marks_matter:
            for mark in proxy.marks:
                constants.add_mark(MAX_MARK, mark)
        if policy is not None:
            self.spec = _Spec(policy, env, constants, marks_matter=marks_matter)
        self.space = ClassSpace([ruleset], env, families=families, constants=constants)
        # Without a policy, every test of an address the proof makes is one of the rules or the environment.
        self.interpreter.use_mirrors = policy is None
        self.properties = tuple(p for p in Property if policy is not None or p not in POLICY_PROPERTIES)
        #: No property reads a connection's source after NAT, so the proof leaves out source NAT that
        #: cannot change anything else (fewer paths on nodes with masquerading rules); True evaluates it.
        self.source_nat = False

    def run(self) -> CheckReport:
        violations: list[Violation] = []
        paths = 0
        for root in self.space.roots:
            explorer = root.explorer()
            symbols = self.space.symbols(root)

            def program(run: Run, root: Root = root, symbols: Mapping[str, str] = symbols) -> tuple[Any, ...]:
                connection = self.space.connection(root, {d: run.value(d) for d in root.dims})
                return self.violations_of(connection, symbols=symbols, tracer=run)

            for leaf in explorer.explore(program):
                if not leaf.result:
                    continue
                connection = self.space.connection(root, leaf.example)
                replay = functools.cache(
                    functools.partial(follow, self.interpreter, connection, model=self.model, choices=leaf.choices)
                )
                description = self.space.describe(root, leaf.region)
                mirrored = leaf.covered // leaf.size - 1 if leaf.size else 0
                for prop, message in leaf.result:
                    violations.append(
                        Violation(
                            property=prop,
                            message=message,
                            connection=connection,
                            description=description,
                            mirrored=mirrored,
                            replay=replay,
                        )
                    )
            paths += explorer.runs
        order = {p: i for i, p in enumerate(Property)}
        violations.sort(key=lambda v: order[v.property])
        return CheckReport(
            violations=tuple(violations), properties=self.properties, classes=self.space.count(), paths=paths
        )

    def violations_of(
        self,
        connection: Connection,
        *,
        symbols: Mapping[str, str] | None = None,
        tracer: Tracer | None = None,
        choices: Sequence[bool] | None = None,
    ) -> tuple[tuple[Property, str], ...]:
        """The properties ``connection`` violates, with messages (through ``tracer`` during the proof);
        ``choices``: the outcomes of the choice points along its chain (default: the tracer's, else each
        point's default)."""
        chain = self.chain_of(connection, symbols=symbols, tracer=tracer, choices=choices)
        return tuple(self._violations(connection, chain, tracer))

    def chain_of(
        self,
        connection: Connection,
        *,
        symbols: Mapping[str, str] | None = None,
        tracer: Tracer | None = None,
        choices: Sequence[bool] | None = None,
    ) -> InterceptionChain:
        """The chain of interceptions the proof follows for ``connection`` (without traces; see
        :meth:`violations_of` for the arguments)."""
        return follow(
            self.interpreter,
            connection,
            model=self.model,
            symbols=symbols,
            tracer=tracer,
            trace=False,
            choices=choices,
            source_nat=self.source_nat,
        )

    # ------------------------------------------------------------------ properties

    def _is_proxy(self, c: Connection, t: Tracer | None) -> bool:
        if c.origin is not Origin.LOCAL:
            return False
        if t is None:
            if c.socket is None or not (self.is_proxy_uid(c.socket.uid) or self.is_proxy_gid(c.socket.gid)):
                return False
        elif not self._proxy_socket(t):
            return False
        # The proxy marks its sockets with nothing, or (TPROXY) with the TPROXY mark only.
        return not self.marks_matter or bool(probe(t, c.mark, "mark", self.proxy_marks))

    def _proxy_socket(self, t: Tracer) -> bool:
        """Whether the connection has a socket of the proxy's uid or gid, decided as one region each way
        (a socketless connection and a socket of another uid and gid are alike here: not the proxy)."""
        socket, has_socket, socket_outcomes = t.resolve("socket", self.present)
        uid, proxy_uid, uid_outcomes = t.resolve("uid", self.is_proxy_uid)
        gid, proxy_gid, gid_outcomes = t.resolve("gid", self.is_proxy_gid)
        with_socket, uids, gids = (outcomes.get(True, 0) for outcomes in (socket_outcomes, uid_outcomes, gid_outcomes))
        proxy = [{socket: with_socket, uid: uids}, {socket: with_socket, uid: ~uids, gid: gids}]
        other = [{socket: with_socket, uid: ~uids, gid: ~gids}, {socket: ~with_socket}]
        found = bool(has_socket and (proxy_uid or proxy_gid))
        t.restrict(proxy if found else other, other if found else proxy)
        return found

    def _violations(self, c: Connection, chain: InterceptionChain, t: Tracer | None) -> Iterator[tuple[Property, str]]:
        first = chain.steps[0]
        verdict = first.evaluation.verdict
        for step in chain.steps:
            if step.arrival is Arrival.UNKNOWN:
                yield Property.DECIDED, f"the rules' effect on {step.connection} cannot be decided: {step.note}"
                return
        if chain.looped:
            yield Property.LOOP, f"traffic loop: {c} is intercepted again and again ({len(chain.steps)} steps and on)"
        captures = chain.captures
        if captures not in _ALLOWED_CAPTURES and not chain.looped:
            names = ", then ".join(a.value for a in captures)
            yield Property.CAPTURE_BOUND, f"{c} is captured {len(captures)} times: {names}"
        proxy = self.env.proxy
        memo: list[bool] = []

        def is_proxy() -> bool:
            if not memo:
                memo.append(self._is_proxy(c, t))
            return memo[0]

        first_oif = first.evaluation.first_oif
        if first.captured and is_proxy():
            if first.arrival is Arrival.OUTBOUND:
                yield (
                    Property.PROXY_TO_OUTBOUND,
                    f"the proxy's own connection {c} is sent back to its outbound port {proxy.outbound_port} ({verdict})",
                )
            elif not (first_oif == LOOPBACK_INTERFACE and first.arrival is Arrival.INBOUND):
                yield (
                    Property.PROXY_RECAPTURE,
                    f"the proxy's own connection {c} is captured again ({verdict}), "
                    "and it is not the lo hairpin to the inbound port",
                )
        if (
            c.origin is Origin.LOCAL
            and first_oif == LOOPBACK_INTERFACE
            and not (isinstance(verdict, Passed) and verdict.local)
            and probe(t, c.src, "src", self.passthrough[c.family])
        ):
            yield (
                Property.PASSTHROUGH,
                f"the inbound passthrough connection {c} from {proxy.passthrough_for(c.family)} over lo does not pass "
                f"({verdict}): inbound traffic cannot reach the app",
            )
        yield from self._proxy_ports(c, first, is_proxy, t)
        if self.policy is not None and not (c.origin is Origin.LOCAL and is_proxy()):
            yield from self._completeness(c, first, t)

    def _proxy_ports(
        self, c: Connection, first: Step, is_proxy: Callable[[], bool], t: Tracer | None
    ) -> Iterator[tuple[Property, str]]:
        proxy = self.env.proxy
        verdict = first.evaluation.verdict
        if not isinstance(verdict, (Redirected, TProxied)):
            return
        if (
            proxy.dns_port is not None
            and c.family in proxy.dns_families
            and c.protocol in (Protocol.TCP, Protocol.UDP)
            and probe(t, c.dport, "dport", Eq(DNS_PORT))
            and is_proxy()
        ):
            yield Property.PROXY_PORTS, f"the proxy's own DNS query {c} is captured ({verdict})"
            return
        if c.protocol is not Protocol.TCP:
            return
        tunnel = proxy.tunnel_port
        if tunnel is not None and probe(t, c.dport, "dport", Eq(tunnel)):
            remote = (
                c.origin is Origin.REMOTE
                and probe(t, c.dst, "dst", self.is_local)
                and not probe(t, c.dst, "dst", self.is_loopback)
                and not probe(t, c.iif, "iif", self.rerouted)
            )
            hairpin = (
                c.origin is Origin.LOCAL
                and first.evaluation.first_oif == LOOPBACK_INTERFACE
                and not probe(t, c.dst, "dst", self.is_loopback)
            )
            if remote or hairpin:
                yield Property.PROXY_PORTS, f"{c} to the proxy's tunnel port {tunnel} is captured ({verdict})"
                return
        if (
            c.origin is Origin.LOCAL
            and probe(t, c.dst, "dst", _IS_LOOPBACK_HOST)
            and probe(t, c.dport, "dport", In(frozenset(proxy.listener_ports)))
        ):
            yield Property.PROXY_PORTS, f"{c} to the proxy's own listener is captured ({verdict})"

    def _completeness(self, c: Connection, first: Step, t: Tracer | None) -> Iterator[tuple[Property, str]]:
        expected, reason = self.spec.expected(c, first, t)
        if expected is None:
            return
        verdict = first.evaluation.verdict
        if expected is _PASS:
            if not isinstance(verdict, Passed):
                yield (
                    Property.EXCLUSIONS,
                    f"{c} should be left alone ({reason}), but the rules intercept it: {verdict}",
                )
            return
        if first.arrival is expected:
            return
        # Delivered untouched to a local port (a NAT that changed nothing, or no NAT): fine when
        # that port is the expected listener.
        if (
            first.arrival is Arrival.LOCAL
            and isinstance(expected, Arrival)
            and expected.proxy
            and arrives_at(first, expected, self.env, t)
        ):
            return
        if c.origin is Origin.REMOTE and expected is Arrival.INBOUND:
            yield (
                Property.INBOUND_COMPLETE,
                f"inbound connection {c} should reach the inbound listener ({reason}), but: {verdict}",
            )
            return
        assert isinstance(expected, Arrival)
        yield (
            Property.OUTBOUND_COMPLETE,
            f"mesh bypass: {c} should reach the proxy's {expected.value} ({reason}), but: {verdict}",
        )


#: Capture sequences a sound chain may show.
_ALLOWED_CAPTURES: Final = frozenset(
    {
        (),
        (Arrival.OUTBOUND,),
        (Arrival.INBOUND,),
        (Arrival.OUTBOUND, Arrival.INBOUND),
        (Arrival.DNS,),
        (Arrival.TUNNEL,),
    }
)
_LOOPBACK_HOSTS: Final = frozenset({ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")})
_IS_LOOPBACK_HOST: Final = In(_LOOPBACK_HOSTS)
#: The spec's "leave it alone".
_PASS: Final = "pass"


class _Spec:
    """What a policy says should happen to a connection, in the policy's own terms."""

    def __init__(self, policy: Any, env: Environment, constants: Constants, *, marks_matter: bool) -> None:
        from meshredirect.policy import InterceptionMode, LoopbackCapture

        p = policy
        self.p = p
        self.env = env
        self.loopback_all = p.loopback_capture is LoopbackCapture.ALL
        self.tproxy = p.inbound_mode is InterceptionMode.TPROXY
        self.out_excluded_ports = In(p.outbound_ports_exclude)
        self.out_ports = In(p.outbound_ports)
        self.out_cidrs_excluded = In(p.outbound_cidrs_exclude)
        self.out_cidrs = None if isinstance(p.outbound_cidrs, All) else In(p.outbound_cidrs)
        self.loopback_range = In(AddressSet.of(p.loopback_cidr, "::1/128"))
        self.dns_servers = In(AddressSet.of(*p.dns.servers))
        self.is_dns_port = Eq(DNS_PORT)
        self.tunnel = Eq(p.inbound_tunnel_port)
        self.in_ports = None if isinstance(p.inbound_ports, All) else In(p.inbound_ports)
        self.in_excluded = In(p.inbound_ports_exclude)
        self.groups_include = None if isinstance(p.owner_groups_include, All) else In(IdSet.of(*p.owner_groups_include))
        self.groups_exclude = In(IdSet.of(*p.owner_groups_exclude))
        self.passthrough = {f: Eq(p.passthrough_for(f)) for f in (Family.IPV4, Family.IPV6)}
        self.is_local: Callable[[Any], Hashable] = env.is_local
        self.is_loopback: Callable[[Any], Hashable] = env.is_loopback
        self.present: Callable[[Any], Hashable] = bool
        excluded, rerouted = tuple(p.exclude_interfaces), tuple(p.reroute_interfaces)
        self.iif_excluded: Callable[[Any], Hashable] = lambda name: _interface_in(name, excluded)
        self.iif_rerouted: Callable[[Any], Hashable] = lambda name: _interface_in(name, rerouted)
        self.unmarked = Eq(0)
        self.marks_matter = marks_matter
        # Every value the spec tests must split the classes (else the proof would not be exact).
        constants.add_networks(None, (p.loopback_cidr, ipaddress.ip_network("::1/128")))
        constants.add_networks(None, tuple(p.outbound_cidrs_exclude))
        if not isinstance(p.outbound_cidrs, All):
            constants.add_networks(None, tuple(p.outbound_cidrs))
        constants.add_networks(None, p.dns.servers)
        constants.add_networks(None, (p.passthrough_ipv4, p.passthrough_ipv6))
        for ports in (p.outbound_ports_exclude, p.outbound_ports, p.inbound_ports_exclude):
            constants.add_ports(None, Direction.DESTINATION, ports)
        if not isinstance(p.inbound_ports, All):
            constants.add_ports(None, Direction.DESTINATION, p.inbound_ports)
        if p.inbound_tunnel_port is not None:
            constants.add_ports(None, Direction.DESTINATION, (p.inbound_tunnel_port,))
        constants.add_ports(None, Direction.DESTINATION, (DNS_PORT,))
        if not isinstance(p.owner_groups_include, All):
            constants.add_ids(OwnerKind.GID, IdSet.of(*p.owner_groups_include))
        constants.add_ids(OwnerKind.GID, IdSet.of(*p.owner_groups_exclude))

    def expected(self, c: Connection, first: Step, t: Tracer | None) -> tuple[Arrival | str | None, str]:
        """The listener the policy sends ``c`` to, :data:`_PASS`, or None (the policy says nothing)."""
        if c.origin is Origin.LOCAL:
            return self._outbound(c, first, t)
        return self._inbound(c, t)

    def _outbound(self, c: Connection, first: Step, t: Tracer | None) -> tuple[Arrival | str | None, str]:
        p = self.p
        if c.protocol not in (Protocol.TCP, Protocol.UDP):
            return None, ""
        if not probe(t, c.socket is not None, "socket", self.present):
            return None, ""
        if self.marks_matter and not probe(t, c.mark, "mark", self.unmarked):
            return None, ""  # apps do not mark their packets; the proxy's marks are its own business
        if c.family not in p.families:
            return _PASS, f"the policy does not program {c.family.value}"
        oif = first.evaluation.first_oif or ""
        if _interface_in(oif, p.exclude_interfaces):
            return _PASS, f"interface {oif} is excluded"
        if probe(t, c.dport, "dport", self.out_excluded_ports):
            return _PASS, f"port {c.dport} is in outbound_ports_exclude"
        if oif == LOOPBACK_INTERFACE and probe(t, c.src, "src", self.passthrough[c.family]):
            return _PASS, "the inbound passthrough source over lo"
        dns = p.dns.active_for(c.family)
        tcp = c.protocol is Protocol.TCP
        to_53 = probe(t, c.dport, "dport", self.is_dns_port)
        over_lo_to_self = oif == LOOPBACK_INTERFACE and not probe(t, c.dst, "dst", self.loopback_range)
        if over_lo_to_self and tcp and not (dns and to_53):
            if not self.loopback_all:
                return _PASS, "the app talking to its own pod over lo stays direct"
            if p.inbound_tunnel_port is not None and probe(t, c.dport, "dport", self.tunnel):
                return _PASS, f"port {c.dport} is the proxy's tunnel port"
            return Arrival.INBOUND, "loopback capture 'all': the app's connections over lo go to the inbound port"
        assert c.socket is not None
        if self.groups_include is not None and not probe(t, c.socket.gid, "gid", self.groups_include):
            return _PASS, f"gid {c.socket.gid} is not in owner_groups_include"
        if probe(t, c.socket.gid, "gid", self.groups_exclude):
            return _PASS, f"gid {c.socket.gid} is in owner_groups_exclude"
        if dns and to_53 and (p.dns.capture_all or probe(t, c.dst, "dst", self.dns_servers)):
            return Arrival.DNS, "a DNS query the policy captures"
        if not tcp:
            return _PASS, "only TCP is captured outbound"
        if probe(t, c.dst, "dst", self.loopback_range):
            return _PASS, f"{c.dst} counts as localhost"
        if probe(t, c.dst, "dst", self.out_cidrs_excluded):
            return _PASS, f"{c.dst} is in outbound_cidrs_exclude"
        if probe(t, c.dport, "dport", self.out_ports):
            return Arrival.OUTBOUND, f"port {c.dport} is in outbound_ports"
        if self.out_cidrs is None:
            return Arrival.OUTBOUND, "outbound_cidrs is '*'"
        if probe(t, c.dst, "dst", self.out_cidrs):
            return Arrival.OUTBOUND, f"{c.dst} is in outbound_cidrs"
        return _PASS, f"{c.dst} is not in outbound_cidrs"

    def _inbound(self, c: Connection, t: Tracer | None) -> tuple[Arrival | str | None, str]:
        p = self.p
        if probe(t, c.dst, "dst", self.is_loopback):
            return None, ""  # a martian: dropped whatever the rules say
        rerouted = probe(t, c.iif, "iif", self.iif_rerouted)
        if not rerouted and not probe(t, c.dst, "dst", self.is_local):
            return None, ""  # not for this pod
        if c.family not in p.families:
            return _PASS, f"the policy does not program {c.family.value}"
        if probe(t, c.iif, "iif", self.iif_excluded):
            return _PASS, f"interface {c.iif} is excluded"
        if rerouted:
            if c.protocol is not Protocol.TCP:
                return _PASS, "only TCP is captured"
            if probe(t, c.dport, "dport", self.out_excluded_ports):
                return _PASS, f"port {c.dport} is in outbound_ports_exclude"
            if probe(t, c.dst, "dst", self.out_cidrs_excluded):
                return _PASS, f"{c.dst} is in outbound_cidrs_exclude"
            if probe(t, c.dport, "dport", self.out_ports):
                return Arrival.OUTBOUND, f"traffic from rerouted interface {c.iif} to port {c.dport} (outbound_ports)"
            if self.out_cidrs is None or probe(t, c.dst, "dst", self.out_cidrs):
                return Arrival.OUTBOUND, f"traffic from rerouted interface {c.iif} is outbound traffic"
            return _PASS, f"{c.dst} is not in outbound_cidrs"
        if c.protocol is not Protocol.TCP:
            return _PASS, "only TCP is captured inbound"
        if p.inbound_tunnel_port is not None and probe(t, c.dport, "dport", self.tunnel):
            return _PASS, f"port {c.dport} is the proxy's tunnel port"
        if self.in_ports is None:
            if probe(t, c.dport, "dport", self.in_excluded):
                return _PASS, f"port {c.dport} is in inbound_ports_exclude"
            return Arrival.INBOUND, "inbound_ports is '*'"
        if probe(t, c.dport, "dport", self.in_ports):
            return Arrival.INBOUND, f"port {c.dport} is in inbound_ports"
        return _PASS, f"port {c.dport} is not in inbound_ports"


def _interface_in(name: object, names: Sequence[str]) -> bool:
    return any(InterfaceMatch(direction=Direction.SOURCE, name=n).matches(str(name)) for n in names)
