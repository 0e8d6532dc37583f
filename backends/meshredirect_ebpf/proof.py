"""Proof that the program decides as the IR does, for every class of local connections.

The semantics engine (``meshredirect.semantics``) splits every dimension of
a connection at the constants of the ruleset and of the environment into
classes, and explores them path by path: every test on a dimension goes
through the explorer, which then also runs the other outcomes. Here the
program under the explorer is: the IR interpreter's verdict for the
connection (nat OUTPUT chains only: what the program implements) next to the
reference model's decision for the same ``connect()``, both reading the
connection through the explorer. Together the paths cover every class
combination, so no difference found is a proof for the ruleset in that
environment.

What the comparison leaves out, each for a reason:

- socketless packets: ``connect()`` always has a socket;
- an unspecified source (0.0.0.0, ::): no connection leaves with one; the
  unbound socket, whose source the route chooses, is compared on its own for
  every class where the source is the route's preferred one;
- destinations ``connect()`` cannot open a TCP connection to: 0.0.0.0/8 and
  ``::`` (the kernel connects to loopback instead), broadcast and multicast.

The environment the program needs (local addresses and routes) is derived
from the semantics engine's ``Environment`` (``meshredirect.semantics.model``)
by :func:`environment_of`, so both sides route alike.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Hashable, Mapping
from typing import TYPE_CHECKING, Any, Final

import attrs

from meshredirect.errors import PolicyError
from meshredirect.ir import ChainType, Direction, Family, Hook, Protocol, Ruleset
from meshredirect.values import IPAddress, IPNetwork
from meshredirect_ebpf.environment import LOOPBACK_INTERFACE, Environment, MarkRoute, Route
from meshredirect_ebpf.model import Port, route_key
from meshredirect_ebpf.model import run as run_decision
from meshredirect_ebpf.plan import Program

if TYPE_CHECKING:
    from meshredirect.semantics.explore import Run
    from meshredirect.semantics.interpreter import Evaluation

__all__ = ["Difference", "Proof", "environment_of", "lowered_part", "prove"]

LOOPBACK: Final = {4: ipaddress.ip_address("127.0.0.1"), 6: ipaddress.ip_address("::1")}
_UNCONNECTABLE: Final = (
    ipaddress.ip_network("0.0.0.0/8"),
    ipaddress.ip_network("255.255.255.255/32"),
    ipaddress.ip_network("224.0.0.0/4"),
    ipaddress.ip_network("::/128"),
    ipaddress.ip_network("ff00::/8"),
)


@attrs.frozen(kw_only=True)
class Difference:
    """A class of local connections where the program and the IR disagree, with an example."""

    example: Any
    ir: str
    program: str
    description: str

    def __str__(self) -> str:
        return f"{self.example}\n  IR:      {self.ir}\n  program: {self.program}\n  class:   {self.description}"


@attrs.frozen(kw_only=True)
class Proof:
    """The outcome of :func:`prove`: the differences (none: proven) and how much was covered."""

    differences: tuple[Difference, ...]
    #: Class combinations of local connections covered.
    classes: int
    #: Paths explored (each covers a region of classes).
    paths: int
    environment: Environment
    left_out: tuple[str, ...] = ()

    @property
    def holds(self) -> bool:
        return not self.differences

    def text(self) -> str:
        """The proof for people: what was proven, over how many classes, or each difference."""
        env = self.environment
        lines = [
            f"{'equivalent' if self.holds else 'NOT equivalent'}: the eBPF program and the IR's nat OUTPUT chains, "
            f"for every local connection ({self.classes} classes, {self.paths} paths)",
            "environment: local " + ", ".join(str(r.network) for r in env.local),
            "             routes " + ", ".join(f"{r.network} via {r.interface}" for r in env.routes),
        ]
        if self.left_out:
            lines.append("not implemented by the program (left out): " + "; ".join(self.left_out))
        for difference in self.differences:
            lines.append(str(difference))
        return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the environment


def environment_of(env: Any) -> Environment:
    """The program's routing tables for a semantics engine environment: the same routes.

    Local: lo's networks (source: lo's first address for loopback ones, else the address itself)
    and every other interface's own addresses. Main: each other interface's subnets (first
    address of the family as source), and the default routes via the default interface (the
    pod's address as source).
    """
    local: list[Route] = []
    routes: list[Route] = []
    seen: set[IPNetwork] = set()
    lo = env.interface(LOOPBACK_INTERFACE)
    for version in (4, 6):
        family = Family.IPV4 if version == 4 else Family.IPV6
        for interface in env.interfaces:
            for address in interface.addresses:
                if address.version != version:
                    continue
                if interface.name == LOOPBACK_INTERFACE:
                    network = address.network
                    if env.is_loopback(address.ip):
                        source = lo.first_address(family) if lo is not None else address.ip
                    elif network.num_addresses == 1:
                        source = address.ip
                    else:
                        raise PolicyError(
                            "environment",
                            expected="lo's addresses inside the loopback range or single addresses",
                            got=str(address),
                        )
                else:
                    network, source = ipaddress.ip_network(address.ip), address.ip
                if network not in seen:
                    seen.add(network)
                    local.append(Route(network=network, interface=LOOPBACK_INTERFACE, source=source, local=True))
        subnets: list[Route] = []
        for interface in env.interfaces:
            if interface.name in (LOOPBACK_INTERFACE, env.default_interface):
                continue
            own = interface.first_address(family)
            for address in interface.addresses:
                if address.version != version:
                    continue
                for other in subnets:
                    if other.network.overlaps(address.network):  # type: ignore[arg-type]
                        raise PolicyError(
                            "environment", expected="interfaces with disjoint subnets", got=str(address.network)
                        )
                subnets.append(Route(network=address.network, interface=interface.name, source=own))
        routes += subnets
        default = env.interface(env.default_interface)
        pod = default.first_address(family) if default is not None else None
        everything = ipaddress.ip_network("0.0.0.0/0" if version == 4 else "::/0")
        routes.append(Route(network=everything, interface=env.default_interface, source=pod))
    marks = tuple(MarkRoute(value=m.value, mask=m.mask) for m in env.local_marks)
    return Environment(local=tuple(local), routes=tuple(routes), mark_routes=marks)


def lowered_part(ruleset: Ruleset) -> Ruleset:
    """The ruleset without the base chains the program does not implement (every nat OUTPUT chain stays)."""
    tables = tuple(
        attrs.evolve(
            table,
            chains=tuple(
                c
                for c in table.chains
                if c.base is None or (c.base.hook is Hook.OUTPUT and c.base.type is ChainType.NAT)
            ),
        )
        for table in ruleset.tables
    )
    return attrs.evolve(ruleset, tables=tables)


# ----------------------------------------------------------------------------- the proof


def _is_unspecified(address: IPAddress) -> bool:
    return address.is_unspecified


def _connectable(address: IPAddress) -> bool:
    return not any(address.version == n.version and address in n for n in _UNCONNECTABLE)


@attrs.frozen
class _Traced:
    """The model's probe during exploration: tests go to the explorer's run."""

    run: Run
    symbols: Mapping[str, str]
    unbound: bool = False
    #: Outcomes of tests already made in this run (the same test has the same outcome within a run).
    seen: dict[tuple[str, int], Any] = attrs.field(factory=dict)

    def test(self, field: str, key: Callable[[Any], Hashable]) -> Any:
        if field == "src" and self.unbound:
            return key(ipaddress.ip_address(0 if self.family_version == 4 else "::"))
        memo = (field, id(key))
        if memo not in self.seen:
            self.seen[memo] = self.run.decide(self.symbols[field], key)
        return self.seen[memo]

    def value(self, field: str) -> Any:
        return self.run.value(self.symbols[field])

    @property
    def family_version(self) -> int:
        return int(self.run.value(self.symbols["dst"]).version)


def _describe(decision: Port | str, version: int) -> str:
    if isinstance(decision, Port):
        kept = " (the destination port)" if decision.kept else ""
        return f"connect() rewritten to {LOOPBACK[version]} port {decision.number}{kept}"
    return {"accept": "connect() unchanged", "deny": "connect() refused"}[decision]


def _agrees(evaluation: Evaluation, decision: Port | str, version: int, run: Run) -> bool:
    from meshredirect.semantics.explore import Eq
    from meshredirect.semantics.interpreter import Dropped, Passed, Redirected

    verdict = evaluation.verdict
    if decision == "accept":
        return bool(isinstance(verdict, Passed))
    if decision == "deny":
        return bool(isinstance(verdict, Dropped))
    assert isinstance(decision, Port)
    # A redirect to where the connection already goes changes nothing: the interpreter calls it passed.
    if not isinstance(verdict, (Redirected, Passed)):
        return False
    address_symbol = evaluation.symbols.get("verdict.address")
    if address_symbol is not None:
        if not run.decide(address_symbol, Eq(LOOPBACK[version])):  # type: ignore[arg-type]
            return False
    elif verdict.address != LOOPBACK[version]:
        return False
    port_symbol = evaluation.symbols.get("verdict.port")
    if decision.kept and port_symbol == "dport":
        return True
    if decision.kept:
        return bool(run.decide("dport", Eq(verdict.port)))
    if port_symbol is not None:
        return bool(run.decide(port_symbol, Eq(decision.number)))  # type: ignore[arg-type]
    return bool(verdict.port == decision.number)


def prove(program: Program, ruleset: Ruleset, env: Any) -> Proof:
    """Compare the program (its reference model) with the IR interpreter on every class of local connections.

    ``program`` must have been planned in ``environment_of(env)``.
    """
    from meshredirect.semantics.classes import ClassSpace, Constants
    from meshredirect.semantics.explore import Eq
    from meshredirect.semantics.interpreter import Interpreter
    from meshredirect.semantics.model import Origin

    derived = environment_of(env)
    if program.environment != derived:
        raise PolicyError(
            "environment",
            expected="the program planned in the semantics engine's environment (environment_of(env))",
            got="another environment",
        )
    part = lowered_part(ruleset)
    environment = env.covering(part)
    # Every test the comparison makes besides the rules' and the environment's must split classes too,
    # or a class would be judged by its representative alone.
    extra = Constants()
    extra.add_networks(Direction.SOURCE, (ipaddress.ip_network("0.0.0.0/32"), ipaddress.ip_network("::/128")))
    extra.add_networks(Direction.DESTINATION, _UNCONNECTABLE)
    for route in (*derived.local, *derived.routes):
        extra.add_networks(Direction.DESTINATION, (route.network,))
        if route.source is not None:
            extra.add_networks(Direction.SOURCE, (route.source,))
    space = ClassSpace([part], environment, constants=extra)
    interpreter = Interpreter(part, environment)
    route_of = route_key(program.environment)  # the model's own test object (same identity)
    differences: list[Difference] = []
    classes = paths = 0
    for root in space.roots:
        if root.origin is not Origin.LOCAL:
            continue
        values = root.values()
        region = {"socket": [i for i, v in enumerate(values["socket"]) if v is True]}
        classes += len(region["socket"]) * root.count() // len(values["socket"])
        symbols = space.symbols(root)
        family, protocol = root.family, root.protocol

        def check(
            run: Run, root: Any = root, symbols: Mapping[str, str] = symbols, family: Family = family,
            protocol: Protocol = protocol,
        ) -> tuple[Any, str, str] | None:  # fmt: skip
            if run.decide("src", _is_unspecified) or not run.decide("dst", _connectable):
                return None
            connection = space.connection(root, {d: run.value(d) for d in root.dims})
            evaluation = interpreter.evaluate(connection, trace=False, symbols=symbols, tracer=run)
            bound = run_model(run, symbols, family, protocol, unbound=False)
            if not _agrees(evaluation, bound, family.version, run):
                return connection, str(evaluation.verdict), _describe(bound, family.version)
            # The unbound socket: where the connection's source is the one its route prefers.
            source = run.decide("dst", route_of)[2]
            if source is not None and run.decide("src", Eq(source)):
                unbound = run_model(run, symbols, family, protocol, unbound=True)
                if not _agrees(evaluation, unbound, family.version, run):
                    return connection, str(evaluation.verdict), _describe(unbound, family.version) + " (unbound)"
            return None

        def run_model(
            run: Run, symbols: Mapping[str, str], family: Family, protocol: Protocol, *, unbound: bool
        ) -> Port | str:
            return run_decision(program, family, protocol, _Traced(run=run, symbols=symbols, unbound=unbound))

        explorer = root.explorer()
        for leaf in explorer.explore(check, region):
            if leaf.result is None:
                continue
            example, ir, mine = leaf.result
            differences.append(
                Difference(example=example, ir=ir, program=mine, description=space.describe(root, leaf.region))
            )
        paths += explorer.runs
    return Proof(
        differences=tuple(differences),
        classes=classes,
        paths=paths,
        environment=program.environment,
        left_out=program.left_out,
    )
