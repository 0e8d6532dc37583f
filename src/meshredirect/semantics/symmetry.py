"""Rules alike but for their constants: the mirrors of a ruleset, which a proof explores once.

A node's rules hold hundreds of pieces of one shape: kube-proxy writes, per
service, a rule in ``KUBE-SERVICES`` (the cluster IP and port) that jumps to
the service's chain, which spreads connections over endpoint chains, each
DNAT to one endpoint; per node port, a rule in ``KUBE-NODEPORTS`` that jumps
to the same chain; per health check port, an ACCEPT rule. Two services with
the same number of endpoints and the same port differ only in their
addresses, and a proof would walk the same path for each.

A *mirror* of a ruleset is a permutation of its constants (single addresses,
single ports, user chains' names) that swaps pairs of them and maps the
ruleset and the environment onto themselves: every rule that names a moved
constant becomes another rule of the ruleset (in the renamed chain, at the
same place, or in the same chain, at another place of a dispatch run where
the two swapped rules can be exchanged: no connection passes both, nor any
rule of the run between them), and no test of the environment, of the
proof's checks or of a wider set (a network, a port range) tells a moved
constant from its image. Then what the rules do to a connection is, swapped,
what they do to its image.

:meth:`Mirrors.partners` finds, for a rule that the dispatch of a chain
(see ``interpreter._Dispatch``) finds first, the other rules of the run that
a mirror maps it to: it builds the permutation from the two rules outwards
(each moved constant brings every rule that names it, each moved chain its
rules and the rules that jump to it) and checks the result. The proof then
explores the connections for which the rule is first and leaves out their
images (``explore.Run.restrict_mirrored``), when its region holds them too.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Hashable, Iterable, Sequence
from typing import TYPE_CHECKING, Final, TypeAlias

import attrs

from meshredirect.ir import (
    AddressMatch,
    Chain,
    Direction,
    Dnat,
    Goto,
    Jump,
    PortMatch,
    Redirect,
    Rule,
    Snat,
    Table,
    TProxy,
)
from meshredirect.semantics.model import DEFAULT_SOURCE_PORT, NO_PORT
from meshredirect.values import AddressSet, IPAddress, PortSet

if TYPE_CHECKING:
    from meshredirect.semantics.interpreter import Interpreter

__all__ = ["Candidate", "Mirrors", "Partner"]

#: A constant a mirror may move: ("address", IPAddress), ("port", int) or ("chain", family, table, name).
Key: TypeAlias = tuple[Hashable, ...]
#: A rule of the ruleset: (family's name, table, chain, index) (strings hash faster than enum members).
Site: TypeAlias = tuple[str, str, str, int]

#: A mirror is built from at most this many pairs of rules (a service with its endpoints needs about ten).
MAX_MATCHED: Final = 128
#: Addresses the interpreter uses whatever the rules say, besides those the environment and its fixed tests
#: name (the interpreter's separators): REDIRECT's in OUTPUT.
_HELD_ADDRESSES: Final = (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))
#: Ports the checks use whatever the rules say (besides the proxy's listeners).
_HELD_PORTS: Final = (53, DEFAULT_SOURCE_PORT, NO_PORT)
#: A dispatch run's first field: the kind of its values and the side of the packet.
_FIRST_FIELDS: Final = {
    "src": ("address", Direction.SOURCE),
    "dst": ("address", Direction.DESTINATION),
    "dport": ("port", Direction.DESTINATION),
    "sport": ("port", Direction.SOURCE),
}


@attrs.frozen
class Partner:
    """A rule a mirror maps another onto (see :meth:`Mirrors.partners`)."""

    #: Its index in the chain.
    rule: int
    #: The constants the mirror swaps (other than chains' names): (kind, the other rule's, this one's).
    pairs: tuple[tuple[str, Hashable, Hashable], ...]
    #: Every value the mirror moves.
    moved: frozenset[Hashable] = attrs.field(init=False, eq=False, repr=False)

    @moved.default
    def _moved(self) -> frozenset[Hashable]:
        return frozenset(value for _kind, ours, theirs in self.pairs for value in (ours, theirs))


#: Not found in a cache.
_UNKNOWN: Final = object()


@attrs.frozen
class Candidate:
    """A rule a mirror may map another onto (see :meth:`Mirrors.candidates`)."""

    #: Its index in the chain.
    rule: int
    #: The value of the run's first field the other rule tests and this one's: (kind, the other's, this one's).
    pairs: tuple[tuple[str, Hashable, Hashable], ...]


def _single_address(members: AddressSet) -> IPAddress | None:
    if len(members.networks) == 1 and members.networks[0].num_addresses == 1:
        return members.networks[0].network_address
    return None


def _single_port(ports: PortSet | None) -> int | None:
    if ports is not None and len(ports.intervals) == 1 and ports.intervals[0][0] == ports.intervals[0][1]:
        return ports.intervals[0][0]
    return None


class Mirrors:
    """The mirrors of an interpreter's ruleset in its environment (built on demand, cached)."""

    def __init__(self, interpreter: Interpreter) -> None:
        self.interpreter = interpreter
        self._rules: dict[Site, Rule] = {}
        self._tables: dict[tuple[str, str], Table] = {}
        #: Single constants -> the rules that name them (None: the environment or the checks do).
        self._sites: dict[Key, list[Site | None]] = {}
        self._referrers: dict[Key, list[Site]] = {}
        self._wide_addresses: list[AddressSet | tuple[IPAddress, IPAddress]] = []
        self._wide_ports: list[PortSet] = []
        #: The wider address sets as closed spans of (version, integer) (built when first needed).
        self._address_spans: list[tuple[tuple[tuple[int, int], tuple[int, int]], ...]] | None = None
        self._abstract: dict[Site, tuple[int, tuple[Key, ...]]] = {}
        self._skeletons: dict[Hashable, int] = {}
        self._candidates: dict[Site, tuple[Candidate, ...]] = {}
        self._partners: dict[tuple[str, str, str, int, int], Partner | None] = {}
        #: Per chain, the rules whose mirrors were searched for (see :meth:`_composed`).
        self._hubs: dict[tuple[str, str, str], dict[int, None]] = {}
        self._groups: dict[int, dict[Hashable, list[int]]] = {}
        self._signatures: dict[Key, tuple[int, ...]] = {}
        self._index()

    # ------------------------------------------------------------------ the index

    def _index(self) -> None:
        wide_ports: dict[PortSet, None] = {}
        for table in self.interpreter.ruleset.tables:
            self._tables[(table.family.value, table.name)] = table
            for chain in table.chains:
                for index, rule in enumerate(chain.rules):
                    site = (table.family.value, table.name, chain.name, index)
                    self._rules[site] = rule
                    _skeleton, keys = self.abstract(site)
                    for key in dict.fromkeys(keys):
                        if key[0] == "chain":
                            self._referrers.setdefault(key, []).append(site)
                        else:
                            self._sites.setdefault(key, []).append(site)
                    for match in rule.matches:
                        if isinstance(match, PortMatch) and _single_port(match.ports) is None:
                            wide_ports[match.ports] = None
                    target = rule.target
                    ports = target.ports if isinstance(target, (Dnat, Snat, Redirect)) else None
                    if ports is not None and _single_port(ports) is None:
                        wide_ports[ports] = None
        # The addresses: the interpreter's separators (the rules', the environment's, its fixed tests').
        separators = self.interpreter.separators()
        held: list[Key] = [("address", a) for a in _HELD_ADDRESSES]
        held += [("address", a) for a, origins in separators.singles.items() if None in origins]
        held += [("port", p) for p in (*_HELD_PORTS, *self.interpreter.env.proxy.listener_ports)]
        for key in held:
            self._sites.setdefault(key, []).append(None)
        self._wide_addresses = [members for members, _origins in separators.wide]
        self._wide_ports = list(wide_ports)

    def abstract(self, site: Site) -> tuple[int, tuple[Key, ...]]:
        """A rule with its single constants taken out (its skeleton, as the number of its kind), and those
        constants in order."""
        found = self._abstract.get(site)
        if found is not None:
            return found
        family, table_name, _chain, _index = site
        rule = self._rules[site]
        table = self._tables[(family, table_name)]
        keys: list[Key] = []
        matches: list[Hashable] = []
        for match in rule.matches:
            if isinstance(match, AddressMatch):
                address = _single_address(match.addresses)
                if address is not None:
                    keys.append(("address", address))
                    matches.append(("address", match.direction, match.negate))
                    continue
            elif isinstance(match, PortMatch):
                port = _single_port(match.ports)
                if port is not None:
                    keys.append(("port", port))
                    matches.append(("port", match.protocol, match.direction, match.negate))
                    continue
            matches.append(match)
        target: Hashable = rule.target
        if isinstance(target, (Dnat, Snat, Redirect)):
            rewritten: Dnat | Snat | Redirect = target
            taken: list[str] = []
            if isinstance(rewritten, (Dnat, Snat)) and rewritten.addresses is not None:
                nat = rewritten.addresses
                if nat.first == nat.last:
                    keys.append(("address", nat.first))
                    taken.append("addresses")
                    rewritten = attrs.evolve(rewritten, addresses=None)
            port = _single_port(rewritten.ports)
            if port is not None:
                keys.append(("port", port))
                taken.append("ports")
                rewritten = attrs.evolve(rewritten, ports=None)
            target = (tuple(taken), rewritten)
        elif isinstance(target, TProxy):
            keys.append(("port", target.port))
            if target.address is not None:
                keys.append(("address", target.address))
            target = (type(target), target.address is None, target.mark, target.mask)
        elif isinstance(target, (Jump, Goto)) and table.has_chain(target.chain):
            keys.append(("chain", family, table_name, target.chain))
            target = type(target).__name__
        skeleton = (tuple(matches), target)
        # Skeletons are compared often: each distinct one is a small number.
        found = self._abstract[site] = (self._skeletons.setdefault(skeleton, len(self._skeletons)), tuple(keys))
        return found

    def _signature(self, key: Key) -> tuple[int, ...]:
        """The wider sets (by index) that hold an address or a port."""
        found = self._signatures.get(key)
        if found is None:
            value = key[1]
            if key[0] == "address":
                assert isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address))
                if self._address_spans is None:
                    self._address_spans = [_spans(members) for members in self._wide_addresses]
                point = (value.version, int(value))
                found = tuple(
                    i for i, spans in enumerate(self._address_spans) if any(low <= point <= high for low, high in spans)
                )
            else:
                found = tuple(i for i, ports in enumerate(self._wide_ports) if value in ports)
            self._signatures[key] = found
        return found

    def _profile(self, key: Key) -> Hashable:
        """What a mirror keeps of a constant that is cheap to tell: how many rules name it (and, for a chain,
        how many it holds). Its wider sets are compared when a mirror would move it."""
        if key[0] == "chain":
            chain = self._chain(key)
            return ("chain", len(self._referrers.get(key, ())), len(chain.rules) if chain is not None else -1)
        return (key[0], len(self._sites.get(key, ())))

    def _chain(self, key: Key) -> Chain | None:
        _kind, family, table_name, name = key
        table = self._tables.get((family, table_name))  # type: ignore[arg-type]
        if table is None or not table.has_chain(name):  # type: ignore[arg-type]
            return None
        return table.chain(name)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ partners

    def partners(self, table: Table, chain: Chain, index: int) -> tuple[Partner, ...]:
        """The other rules of the dispatch run of rule ``index`` of ``chain`` that a mirror maps it onto, each
        with the constants that mirror swaps; () when the rule is in no dispatch run or has no partner."""
        found = (self.partner(table, chain, index, c.rule) for c in self.candidates(table, chain, index))
        return tuple(partner for partner in found if partner is not None)

    def candidates(self, table: Table, chain: Chain, index: int) -> tuple[Candidate, ...]:
        """The other rules of the dispatch run of rule ``index`` of ``chain`` of its shape (each constant
        named by as many rules, in the same wider sets), with another value of the run's first field: the
        rules a mirror may map it onto (:meth:`partner` finds whether one does)."""
        site = (table.family.value, table.name, chain.name, index)
        found = self._candidates.get(site)
        if found is not None:
            return found
        runs = self.interpreter.dispatch(chain)
        run = runs[index] if runs is not None else None
        candidates: list[Candidate] = []
        if run is not None:
            groups = self._groups.get(id(run))
            if groups is None:
                groups = self._groups[id(run)] = {}
                for position in range(run.start, run.end):
                    groups.setdefault(self._shape(table, chain, position), []).append(position)
            kind, direction = _FIRST_FIELDS[run.fields[0]]
            ours = list(self._first_values(chain.rules[index], kind, direction))
            for other in groups[self._shape(table, chain, index)]:
                theirs = list(self._first_values(chain.rules[other], kind, direction))
                if other != index and len(ours) == len(theirs) == 1 and ours != theirs:
                    candidates.append(Candidate(rule=other, pairs=((kind, ours[0], theirs[0]),)))
        found = self._candidates[site] = tuple(candidates)
        return found

    def partner(self, table: Table, chain: Chain, index: int, other: int) -> Partner | None:
        """Rule ``other`` of ``chain`` as a partner of rule ``index``, when a mirror maps one onto the other."""
        key = (table.family.value, table.name, chain.name, index, other)
        if key not in self._partners:
            pairs = self._composed(key)
            if pairs is None:
                pairs = self._mirror(key[:4], (*key[:3], other))  # type: ignore[arg-type]
                self._hubs.setdefault(key[:3], {})[index] = None
            self._partners[key] = Partner(rule=other, pairs=pairs) if pairs else None
        return self._partners[key]

    def _composed(self, key: tuple[str, str, str, int, int]) -> tuple[tuple[str, Hashable, Hashable], ...] | None:
        """The pairs of the mirror of rule ``index`` onto rule ``other`` (``key``'s last two) from mirrors
        already found: the other way round, or through a rule both are mirrors of (the mirror of ``index``
        onto it, then of it onto ``other``, then back: mirrors compose). () when those show there is none
        (or cannot tell: then there may be one that the search would not find either); None when nothing
        found so far tells."""
        *prefix, index, other = key
        back = self._partners.get((*prefix, other, index), _UNKNOWN)  # type: ignore[arg-type]
        if back is not _UNKNOWN:
            if back is None:
                return ()
            assert isinstance(back, Partner)
            return tuple((kind, theirs, ours) for kind, ours, theirs in back.pairs)
        for hub in self._hubs.get(tuple(prefix), ()):  # type: ignore[arg-type]
            one = self._partners.get((*prefix, hub, index), _UNKNOWN)  # type: ignore[arg-type]
            two = self._partners.get((*prefix, hub, other), _UNKNOWN)  # type: ignore[arg-type]
            if one is _UNKNOWN or two is _UNKNOWN or (one is None and two is None):
                continue
            if not isinstance(one, Partner) or not isinstance(two, Partner):
                return ()  # (one is a mirror of hub, the other not: they are none of each other)
            onto = {(kind, ours): theirs for kind, ours, theirs in two.pairs}
            if {(kind, ours) for kind, ours, _ in one.pairs} != set(onto):
                return ()
            return tuple((kind, theirs, onto[(kind, ours)]) for kind, ours, theirs in one.pairs)
        return None

    def _shape(self, table: Table, chain: Chain, index: int) -> Hashable:
        skeleton, keys = self.abstract((table.family.value, table.name, chain.name, index))
        return skeleton, tuple(self._profile(key) for key in keys)

    def _mirror(self, seed: Site, other: Site) -> tuple[tuple[str, Hashable, Hashable], ...] | None:
        """The constants a mirror that maps rule ``seed`` onto rule ``other`` swaps; None when there is none
        (or it would be built from more than ``MAX_MATCHED`` pairs of rules)."""
        image: dict[Key, Key] = {}
        matched: dict[Site, Site] = {}
        moved: list[tuple[str, Hashable, Hashable]] = []
        work: list[tuple[Site, Site]] = [(seed, other)]

        def assign(key: Key, to: Key) -> bool:
            if key[0] != to[0]:
                return False
            if key in image or to in image:
                return image.get(key) == to
            image[key] = to
            image[to] = key
            if key == to:
                return True
            if key[0] == "chain":
                one, two = self._chain(key), self._chain(to)
                if one is None or two is None or one.is_base or two.is_base or len(one.rules) != len(two.rules):
                    return False
                prefix_one, prefix_two = key[1:], to[1:]
                work.extend(
                    ((*prefix_one, i), (*prefix_two, i))  # type: ignore[misc]
                    for i in range(len(one.rules))
                )
                return self._pair_sites(self._referrers.get(key, []), self._referrers.get(to, []), key, to, work)
            ones, twos = self._sites.get(key, []), self._sites.get(to, [])
            if None in ones or None in twos or self._signature(key) != self._signature(to):
                return False
            moved.append((str(key[0]), key[1], to[1]))
            return self._pair_sites(ones, twos, key, to, work)  # type: ignore[arg-type]

        while work:
            one, two = work.pop()
            if matched.get(one) == two:
                continue
            if one in matched or two in matched or one == two:
                return None
            skeleton_one, keys_one = self.abstract(one)
            skeleton_two, keys_two = self.abstract(two)
            if skeleton_one != skeleton_two:
                return None
            matched[one] = two
            matched[two] = one
            if len(matched) > 2 * MAX_MATCHED:
                return None
            chain_one, chain_two = ("chain", *one[:3]), ("chain", *two[:3])
            if not assign(chain_one, chain_two) or (chain_one != chain_two and one[3] != two[3]):
                return None
            if not all(assign(k, to) for k, to in zip(keys_one, keys_two, strict=True)):
                return None
        if not self._exchangeable(matched, image):
            return None
        return tuple(moved)

    def _pair_sites(
        self, ones: Sequence[Site], twos: Sequence[Site], key: Key, to: Key, work: list[tuple[Site, Site]]
    ) -> bool:
        """Pair every rule that names ``key`` with the one rule that names ``to`` in the same places and is
        alike (False when some rule has none, or several)."""
        if len(ones) != len(twos) or len(ones) > MAX_MATCHED:
            return False
        # Each rule by its skeleton and the places it names the constant in: those of `ones` and `twos` must match
        # one to one.
        theirs: dict[Hashable, list[Site]] = {}
        for two in twos:
            skeleton, keys = self.abstract(two)
            theirs.setdefault((skeleton, tuple(i for i, k in enumerate(keys) if k == to)), []).append(two)
        for one in ones:
            skeleton, keys = self.abstract(one)
            found = theirs.get((skeleton, tuple(i for i, k in enumerate(keys) if k == key)), ())
            if len(found) != 1:
                return False
            work.append((one, found[0]))
        return True

    def _exchangeable(self, matched: dict[Site, Site], image: dict[Key, Key]) -> bool:
        """Whether the rules a mirror moves within a chain (not renamed) may swap places: all in one dispatch
        run, each with a single moved constant as its test of the run's first field that no other rule of
        the run between the first and the last moved passes."""
        by_chain: dict[tuple[str, str, str], list[int]] = {}
        for one, two in matched.items():
            if one[:3] == two[:3]:
                by_chain.setdefault(one[:3], []).append(one[3])
        for (family, table_name, chain_name), positions in by_chain.items():
            chain = self._tables[(family, table_name)].chain(chain_name)
            runs = self.interpreter.dispatch(chain)
            if runs is None:
                return False
            run = runs[positions[0]]
            if run is None or any(runs[p] is not run for p in positions):
                return False
            field = run.fields[0]
            kind, direction = _FIRST_FIELDS[field]
            low, high = min(positions), max(positions)
            for position in positions:
                values = self._first_values(chain.rules[position], kind, direction)
                moved = [v for v in values if image.get((kind, v), (kind, v)) != (kind, v)]
                if not moved:
                    return False
                for value in moved:
                    if any(low <= r <= high and r != position for r in run.hits(field, value)):
                        return False
        return True

    @staticmethod
    def _first_values(rule: Rule, kind: str, direction: Direction) -> Iterable[Hashable]:
        """The single values a rule tests (not negated) of a field."""
        for match in rule.matches:
            if not isinstance(match, (AddressMatch, PortMatch)) or match.direction is not direction or match.negate:
                continue
            if isinstance(match, AddressMatch):
                value: Hashable | None = _single_address(match.addresses) if kind == "address" else None
            else:
                value = _single_port(match.ports) if kind == "port" else None
            if value is not None:
                yield value


def _spans(members: AddressSet | tuple[IPAddress, IPAddress]) -> tuple[tuple[tuple[int, int], tuple[int, int]], ...]:
    """A wider address set (or range) as closed spans of (version, integer)."""
    if isinstance(members, tuple):
        first, last = members
        return (((first.version, int(first)), (last.version, int(last))),)
    return tuple(((n.version, int(n.network_address)), (n.version, int(n.broadcast_address))) for n in members.networks)
