"""Hypothesis strategies for iptables-shaped IR: every match and target node, in tables where the kernel
takes it, so the reader is tested on far more than what the compiler emits."""

from __future__ import annotations

import functools
import ipaddress

from hypothesis import strategies as st

from meshredirect.ir import (
    IPTABLES_BUILTIN_HOOKS,
    Accept,
    AddressMatch,
    AddrType,
    AddrTypeMatch,
    Chain,
    ChainPolicy,
    ConnmarkMatch,
    ConnmarkRestore,
    ConnmarkSave,
    ConnmarkSet,
    Continue,
    CtState,
    CtStateMatch,
    CtZone,
    Direction,
    Dnat,
    Drop,
    Family,
    Goto,
    Hook,
    InterfaceMatch,
    IpSetMatch,
    Jump,
    Log,
    MarkMatch,
    Masquerade,
    Match,
    NatFlag,
    OwnerKind,
    OwnerMatch,
    PortMatch,
    Protocol,
    ProtocolMatch,
    Redirect,
    Reject,
    Return,
    Rule,
    Ruleset,
    SetMark,
    Snat,
    StatisticMatch,
    Table,
    Target,
    TProxy,
    UnknownMatch,
    UnknownTarget,
    iptables_base_chain,
)
from meshredirect.testing.strategies import address_sets, id_sets, interface_names, port_sets
from meshredirect.values import MAX_MARK, PortSet
from meshredirect_iptables.lowering import NAT_TARGET_FLAGS

#: The address types ip6tables' addrtype match takes.
IPV6_ADDRTYPES = (
    AddrType.UNSPEC, AddrType.UNICAST, AddrType.LOCAL, AddrType.ANYCAST, AddrType.MULTICAST,
    AddrType.BLACKHOLE, AddrType.UNREACHABLE, AddrType.PROHIBIT,
)  # fmt: skip
USER_CHAINS = ("MESH_A", "MESH_B", "KUBE-SVC-ABC")
marks = st.one_of(st.sampled_from([0, 1, 1337, 0x4000, 0xFF, MAX_MARK]), st.integers(0, MAX_MARK))
protocols = st.sampled_from([Protocol.TCP, Protocol.UDP, Protocol.SCTP])
comments = st.one_of(st.none(), st.sampled_from(["default/web cluster IP", 'quote " and \\ back', "it's", "plain"]))


@functools.cache
def matches(family: Family) -> st.SearchStrategy[Match]:
    families = frozenset({family})
    return st.one_of(
        st.builds(ProtocolMatch, protocol=st.sampled_from(Protocol), negate=st.booleans()),
        st.builds(
            AddressMatch,
            direction=st.sampled_from(Direction),
            addresses=address_sets(families=families, max_size=2).filter(bool),
            negate=st.just(False),
        ),
        st.builds(
            AddressMatch,
            direction=st.sampled_from(Direction),
            addresses=address_sets(families=families, max_size=1).filter(bool),
            negate=st.just(True),
        ),
        st.builds(
            PortMatch,
            protocol=protocols,
            ports=port_sets(min_size=1, max_size=20),
            direction=st.sampled_from(Direction),
            negate=st.just(False),
        ),
        st.builds(
            PortMatch,
            protocol=protocols,
            ports=port_sets(min_size=1, max_size=6),
            direction=st.sampled_from(Direction),
            negate=st.just(True),
        ),
        st.builds(InterfaceMatch, direction=st.sampled_from(Direction), name=interface_names(), negate=st.booleans()),
        st.builds(OwnerMatch, kind=st.sampled_from(OwnerKind), ids=id_sets(min_size=1), negate=st.just(False)),
        st.builds(
            OwnerMatch,
            kind=st.sampled_from(OwnerKind),
            ids=id_sets(min_size=1),
            negate=st.just(True),
            socketless=st.booleans(),
        ),
        st.builds(MarkMatch, value=marks, mask=marks, negate=st.booleans()),
        st.builds(ConnmarkMatch, value=marks, mask=marks, negate=st.booleans()),
        st.builds(CtStateMatch, states=st.sets(st.sampled_from(CtState), min_size=1), negate=st.booleans()),
        st.builds(
            AddrTypeMatch,
            direction=st.sampled_from(Direction),
            types=st.sets(st.sampled_from(AddrType if family is Family.IPV4 else IPV6_ADDRTYPES), min_size=1),
            negate=st.booleans(),
            limit_interface=st.booleans(),
        ),
        st.builds(
            IpSetMatch,
            name=st.sampled_from(["mesh-excluded", "KUBE-LB"]),
            flags=st.lists(st.sampled_from(Direction), min_size=1, max_size=3).map(tuple),
            negate=st.booleans(),
        ),
        # Probabilities the kernel can hold (it keeps round(p * 2^31) and prints that with 11 decimals).
        st.builds(
            StatisticMatch,
            probability=st.integers(0, 2**31).map(lambda k: float(f"{k / 2**31:.11f}")),
            negate=st.booleans(),
        ),
        st.integers(1, 20).flatmap(
            lambda n: st.builds(StatisticMatch, every=st.just(n), packet=st.integers(0, n - 1), negate=st.booleans())
        ),
        st.sampled_from(
            [
                UnknownMatch(dialect="iptables", tokens=("-m", "pkttype", "--pkt-type", "unicast")),
                UnknownMatch(dialect="iptables", tokens=("-m", "limit", "--limit", "5/sec")),
                UnknownMatch(dialect="iptables", tokens=("-m", "physdev", "!", "--physdev-is-in")),
            ]
        ),
    )


@functools.cache
def _addresses(family: Family) -> st.SearchStrategy[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    if family is Family.IPV4:
        return st.ip_addresses(v=4).filter(lambda a: not a.is_unspecified)
    return st.ip_addresses(v=6).filter(lambda a: not a.is_unspecified)


@functools.cache
def _nat_addresses(family: Family) -> st.SearchStrategy[object]:
    from meshredirect.ir import AddressRange

    return st.one_of(
        st.none(),
        _addresses(family).map(lambda a: AddressRange(first=a, last=a)),
        st.tuples(_addresses(family), _addresses(family)).map(
            lambda p: AddressRange(first=min(p[0], p[1]), last=max(p[0], p[1]))  # type: ignore[type-var]
        ),
    )


single_ports = st.one_of(
    st.integers(1, 65535).map(PortSet.of),
    st.tuples(st.integers(1, 65000), st.integers(0, 500)).map(lambda t: PortSet.of((t[0], t[0] + t[1]))),
)


def _rewrites(target: Snat | Dnat) -> bool:
    """Whether a NAT target names something to rewrite to (iptables needs an address or a port)."""
    return target.addresses is not None or target.ports is not None


@functools.cache
def targets(family: Family, table: str, chains: tuple[str, ...]) -> st.SearchStrategy[Target]:
    """Targets the kernel takes in ``table`` (what else is refused there is up to the chain's hook)."""
    anywhere: list[st.SearchStrategy[Target]] = [
        st.sampled_from([Accept(), Drop(), Return(), Continue()]),
        st.builds(SetMark, value=marks, mask=marks),
        st.builds(ConnmarkSet, value=marks, mask=marks),
        st.builds(ConnmarkSave, nfmask=marks, ctmask=marks),
        st.builds(ConnmarkRestore, nfmask=marks, ctmask=marks),
        st.builds(
            Log,
            prefix=st.one_of(st.none(), st.sampled_from(["mesh: ", "drop", 'a "b"'])),
            level=st.integers(0, 7),
        ),
        st.just(UnknownTarget(dialect="iptables", name="NFLOG", tokens=("--nflog-group", "5"))),
    ]
    if chains:
        anywhere.append(st.builds(Jump, chain=st.sampled_from(chains)))
        anywhere.append(st.builds(Goto, chain=st.sampled_from(chains)))
    if table in ("filter", "mangle", "raw"):
        anywhere.append(st.sampled_from([Reject(), Reject(with_="tcp-reset")]))
    if table == "nat":
        anywhere.append(st.builds(Redirect, ports=st.one_of(st.none(), single_ports), flags=_flags("REDIRECT")))
        anywhere.append(st.builds(Masquerade, ports=st.one_of(st.none(), single_ports), flags=_flags("MASQUERADE")))
        for node in (Snat, Dnat):
            nat: st.SearchStrategy[Snat | Dnat] = st.builds(
                node,
                addresses=_nat_addresses(family),
                ports=st.one_of(st.none(), single_ports),
                flags=_flags(node.__name__.upper()),
            )
            anywhere.append(nat.filter(_rewrites))
    if table == "mangle":
        anywhere.append(
            st.builds(
                TProxy,
                port=st.integers(0, 65535),
                address=st.one_of(st.none(), _addresses(family)),
                mark=st.one_of(st.none(), marks),
                mask=marks,
            )
        )
    if table == "raw":
        anywhere.append(st.builds(CtZone, zone=st.integers(0, 65535)))
    return st.one_of(*anywhere)


def _flags(target: str) -> st.SearchStrategy[frozenset[NatFlag]]:
    """Port-selection flags the iptables extension of ``target`` takes."""
    return st.frozensets(st.sampled_from(sorted(NAT_TARGET_FLAGS[target], key=lambda f: f.value)))


@st.composite
def iptables_rulesets(draw: st.DrawFn, /, family: Family | None = None) -> Ruleset:
    """One family's tables with built-in and user chains full of every kind of node."""
    family = family or draw(st.sampled_from([Family.IPV4, Family.IPV6]))
    tables = []
    for name in draw(
        st.lists(st.sampled_from(["raw", "mangle", "nat", "filter"]), min_size=1, max_size=3, unique=True)
    ):
        users = tuple(draw(st.lists(st.sampled_from(USER_CHAINS), max_size=2, unique=True)))
        chains = []
        for hook in IPTABLES_BUILTIN_HOOKS[name]:
            if not draw(st.booleans()):
                continue
            policy = ChainPolicy.ACCEPT if name == "nat" else draw(st.sampled_from(ChainPolicy))
            chains.append(
                Chain(
                    name=hook.value,
                    rules=draw(_rules(family, name, users, hook)),
                    base=iptables_base_chain(name, hook, policy),
                )
            )
        for user in users:
            chains.append(Chain(name=user, rules=draw(_rules(family, name, users, None))))
        tables.append(Table(family=family, name=name, chains=tuple(chains)))
    return Ruleset(tables=tuple(tables))


@functools.cache
def _rules(
    family: Family, table: str, users: tuple[str, ...], hook: Hook | None
) -> st.SearchStrategy[tuple[Rule, ...]]:
    def fits(match: Match) -> bool:
        if isinstance(match, InterfaceMatch) and hook is not None:
            if match.direction is Direction.SOURCE:
                return hook not in (Hook.OUTPUT, Hook.POSTROUTING)
            return hook not in (Hook.PREROUTING, Hook.INPUT)
        return True

    def consistent(items: list[Match]) -> bool:
        # "! -p tcp" AND "-p tcp" (a rule that never matches) has no iptables form: the backend refuses it.
        protocols = {(m.protocol, m.negate) for m in items if isinstance(m, ProtocolMatch)}
        if any((p, not n) in protocols for p, n in protocols):
            return False
        # iptables-nft-save prints two tcp/udp/sctp port tests on one field as one, the last: loaded
        # "-m tcp --sport 1 -m tcp --sport 2" is listed as "-m tcp --sport 2" (nft lists both). The text
        # no longer says what the kernel holds, so no reader can round-trip it (docs/reading-rules.md).
        fields = [(m.protocol, m.direction) for m in items if isinstance(m, PortMatch)]
        return len(fields) == len(set(fields))

    rule = st.builds(
        Rule,
        matches=st.lists(matches(family).filter(fits), max_size=4).filter(consistent).map(tuple),
        target=targets(family, table, users),
        comment=comments,
    )
    return st.lists(rule, max_size=4).map(tuple)
