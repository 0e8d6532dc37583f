"""One or more example instances of every IR node, for support-matrix tests of every backend.

:func:`coverage_gaps` names node classes of the IR unions that have no
sample, so a new node without samples fails the matrix test at once.

>>> coverage_gaps()
[]
"""

from __future__ import annotations

import ipaddress
import typing
from typing import Final

from meshredirect.ir import (
    Accept,
    AddressMatch,
    AddressRange,
    AddrType,
    AddrTypeMatch,
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
    FamilyMatch,
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
    SetMark,
    Snat,
    StatisticMatch,
    Target,
    TProxy,
    UnknownMatch,
    UnknownTarget,
)
from meshredirect.values import AddressSet, IdSet, PortSet

__all__ = ["SAMPLE_MATCHES", "SAMPLE_TARGETS", "TARGET_PLACES", "coverage_gaps"]

SAMPLE_MATCHES: Final[dict[type, tuple[Match, ...]]] = {
    ProtocolMatch: (ProtocolMatch(protocol=Protocol.TCP), ProtocolMatch(protocol=Protocol.UDP, negate=True)),
    FamilyMatch: (FamilyMatch(family=Family.IPV4),),
    AddressMatch: (
        AddressMatch(direction=Direction.SOURCE, addresses=AddressSet.of("127.0.0.6")),
        AddressMatch(direction=Direction.DESTINATION, addresses=AddressSet.of("127.0.0.1/8"), negate=True),
        AddressMatch(direction=Direction.DESTINATION, addresses=AddressSet.of("10.0.0.0/8", "192.168.1.0/24")),
    ),
    PortMatch: (
        PortMatch(protocol=Protocol.TCP, ports=PortSet.of(15008), negate=True),
        PortMatch(protocol=Protocol.UDP, ports=PortSet.of(15053), direction=Direction.SOURCE),
        PortMatch(protocol=Protocol.TCP, ports=PortSet.of(22, (15020, 15021), 15090)),
        PortMatch(protocol=Protocol.TCP, ports=PortSet.of((8000, 9000))),
    ),
    InterfaceMatch: (
        InterfaceMatch(direction=Direction.DESTINATION, name="lo"),
        InterfaceMatch(direction=Direction.SOURCE, name="eth+", negate=True),
    ),
    OwnerMatch: (
        OwnerMatch(kind=OwnerKind.UID, ids=IdSet.of(1337)),
        OwnerMatch(kind=OwnerKind.GID, ids=IdSet.of(101, 202), negate=True),
        OwnerMatch(kind=OwnerKind.UID, ids=IdSet.of((3, 4))),
    ),
    MarkMatch: (MarkMatch(value=1337), MarkMatch(value=0x53A, mask=0xFF, negate=True)),
    ConnmarkMatch: (ConnmarkMatch(value=1337),),
    CtStateMatch: (
        CtStateMatch(states={CtState.RELATED, CtState.ESTABLISHED}),
        CtStateMatch(states={CtState.INVALID}, negate=True),
    ),
    AddrTypeMatch: (AddrTypeMatch(direction=Direction.DESTINATION, types={AddrType.LOCAL}),),
    IpSetMatch: (IpSetMatch(name="mesh-excluded", flags=(Direction.DESTINATION,)),),
    StatisticMatch: (StatisticMatch(probability=0.5), StatisticMatch(every=3, packet=1)),
    UnknownMatch: (UnknownMatch(dialect="iptables", tokens=("-m", "pkttype", "--pkt-type", "unicast")),),
}

SAMPLE_TARGETS: Final[dict[type, tuple[Target, ...]]] = {
    Accept: (Accept(),),
    Drop: (Drop(),),
    Return: (Return(),),
    Continue: (Continue(),),
    Jump: (Jump(chain="MESH_NEXT"),),
    Goto: (Goto(chain="MESH_NEXT"),),
    Redirect: (
        Redirect(ports=PortSet.of(15001)),
        Redirect(),
        Redirect(ports=PortSet.of(15001), flags={NatFlag.RANDOM}),
    ),
    TProxy: (
        TProxy(port=15006, mark=1337),
        TProxy(port=15006, address=ipaddress.ip_address("127.0.0.1"), mark=1, mask=1),
    ),
    SetMark: (SetMark(value=1338), SetMark(value=0x4000, mask=0x4000)),
    ConnmarkSave: (ConnmarkSave(),),
    ConnmarkRestore: (ConnmarkRestore(),),
    ConnmarkSet: (ConnmarkSet(value=7),),
    CtZone: (CtZone(zone=2),),
    Masquerade: (
        Masquerade(),
        Masquerade(ports=PortSet.of((1024, 2048))),
        Masquerade(flags={NatFlag.RANDOM_FULLY}),  # kube-proxy's
    ),
    Snat: (
        Snat(addresses=AddressRange(first=ipaddress.ip_address("10.0.0.1"), last=ipaddress.ip_address("10.0.0.1"))),
        Snat(
            addresses=AddressRange(first=ipaddress.ip_address("10.0.0.1"), last=ipaddress.ip_address("10.0.0.4")),
            flags={NatFlag.RANDOM, NatFlag.RANDOM_FULLY, NatFlag.PERSISTENT},
        ),
    ),
    Dnat: (
        Dnat(
            addresses=AddressRange(first=ipaddress.ip_address("10.244.1.5"), last=ipaddress.ip_address("10.244.1.5")),
            ports=PortSet.of(8080),
        ),
        Dnat(
            addresses=AddressRange(first=ipaddress.ip_address("10.244.1.5"), last=ipaddress.ip_address("10.244.1.5")),
            ports=PortSet.of(8080),
            flags={NatFlag.RANDOM, NatFlag.PERSISTENT},
        ),
    ),
    Reject: (Reject(), Reject(with_="tcp-reset")),
    Log: (Log(prefix="mesh: "), Log(level=6)),
    UnknownTarget: (UnknownTarget(dialect="iptables", name="NOTRACK"),),
}

#: Where each target may stand in iptables terms: (table, hook). Targets absent here go anywhere.
TARGET_PLACES: Final[dict[type, tuple[str, Hook]]] = {
    Redirect: ("nat", Hook.OUTPUT),
    TProxy: ("mangle", Hook.PREROUTING),
    CtZone: ("raw", Hook.OUTPUT),
    UnknownTarget: ("raw", Hook.OUTPUT),
    Masquerade: ("nat", Hook.POSTROUTING),
    Snat: ("nat", Hook.POSTROUTING),
    Dnat: ("nat", Hook.OUTPUT),
    Reject: ("filter", Hook.OUTPUT),
}


def coverage_gaps() -> list[str]:
    """IR node classes without samples."""
    gaps = [c.__name__ for c in typing.get_args(Match) if c not in SAMPLE_MATCHES]
    gaps += [c.__name__ for c in typing.get_args(Target) if c not in SAMPLE_TARGETS]
    return gaps
