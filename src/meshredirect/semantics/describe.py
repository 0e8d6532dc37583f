"""Short, iptables-like text of IR nodes, for traces and reports (display only, never parsed).

>>> from meshredirect.ir import PortMatch, Protocol, Return, Rule
>>> from meshredirect.values import PortSet
>>> describe_rule(Rule(matches=(PortMatch(protocol=Protocol.TCP, ports=PortSet.of(15008), negate=True),), target=Return()))
'-p tcp ! --dport 15008 -j RETURN'
"""

from __future__ import annotations

from typing import assert_never

from meshredirect.ir import (
    Accept,
    AddressMatch,
    AddressRange,
    AddrTypeMatch,
    ConnmarkMatch,
    ConnmarkRestore,
    ConnmarkSave,
    ConnmarkSet,
    Continue,
    CtStateMatch,
    CtZone,
    Direction,
    Dnat,
    Drop,
    FamilyMatch,
    Goto,
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
    ProtocolMatch,
    Redirect,
    Reject,
    Return,
    Rule,
    SetMark,
    Snat,
    StatisticMatch,
    Target,
    TProxy,
    UnknownMatch,
    UnknownTarget,
)
from meshredirect.values import MAX_MARK, PortSet

__all__ = ["describe_match", "describe_rule", "describe_target"]


def _not(negate: bool) -> str:
    return "! " if negate else ""


def _mark(value: int, mask: int) -> str:
    return f"{value:#x}" if mask == MAX_MARK else f"{value:#x}/{mask:#x}"


def describe_match(match: Match) -> str:
    """One match in iptables-like words."""
    match match:
        case ProtocolMatch():
            return f"{_not(match.negate)}-p {match.protocol.value}"
        case FamilyMatch():
            return f"meta nfproto {match.family.value}"
        case AddressMatch():
            flag = "-s" if match.direction is Direction.SOURCE else "-d"
            return f"{_not(match.negate)}{flag} {match.addresses}"
        case PortMatch():
            flag = "--sport" if match.direction is Direction.SOURCE else "--dport"
            return f"-p {match.protocol.value} {_not(match.negate)}{flag} {match.ports}"
        case InterfaceMatch():
            flag = "-i" if match.direction is Direction.SOURCE else "-o"
            return f"{_not(match.negate)}{flag} {match.name}"
        case OwnerMatch():
            flag = "--uid-owner" if match.kind is OwnerKind.UID else "--gid-owner"
            extra = (
                ""
                if match.socketless == match.negate
                else f" (socketless: {'match' if match.socketless else 'no match'})"
            )
            return f"-m owner {_not(match.negate)}{flag} {match.ids}{extra}"
        case MarkMatch():
            return f"-m mark {_not(match.negate)}--mark {_mark(match.value, match.mask)}"
        case ConnmarkMatch():
            return f"-m connmark {_not(match.negate)}--mark {_mark(match.value, match.mask)}"
        case CtStateMatch():
            states = ",".join(sorted(s.value for s in match.states))
            return f"-m conntrack {_not(match.negate)}--ctstate {states}"
        case AddrTypeMatch():
            flag = "--src-type" if match.direction is Direction.SOURCE else "--dst-type"
            types = ",".join(sorted(t.value for t in match.types))
            return f"-m addrtype {_not(match.negate)}{flag} {types}"
        case IpSetMatch():
            flags = ",".join("src" if d is Direction.SOURCE else "dst" for d in match.flags)
            return f"-m set {_not(match.negate)}--match-set {match.name} {flags}"
        case StatisticMatch():
            if match.probability is not None:
                return f"-m statistic {_not(match.negate)}--probability {match.probability}"
            return f"-m statistic {_not(match.negate)}--every {match.every} --packet {match.packet}"
        case UnknownMatch():
            return f"[{match.dialect}: {' '.join(match.tokens)}]"
        case _:
            assert_never(match)


def _ports(ports: PortSet | None) -> str:
    return "" if ports is None else f" --to-ports {ports}"


def _flags(flags: frozenset[NatFlag]) -> str:
    return "".join(f" --{flag.value}" for flag in NatFlag if flag in flags)


def _range(addresses: AddressRange | None) -> str:
    if addresses is None:
        return ""
    return str(addresses.first) if addresses.first == addresses.last else f"{addresses.first}-{addresses.last}"


def describe_target(target: Target) -> str:
    """One target in iptables-like words."""
    match target:
        case Accept():
            return "-j ACCEPT"
        case Drop():
            return "-j DROP"
        case Return():
            return "-j RETURN"
        case Continue():
            return "(no target)"
        case Jump():
            return f"-j {target.chain}"
        case Goto():
            return f"-g {target.chain}"
        case Redirect():
            return "-j REDIRECT" + _ports(target.ports) + _flags(target.flags)
        case TProxy():
            on = f" --on-ip {target.address}" if target.address is not None else ""
            mark = f" --tproxy-mark {_mark(target.mark, target.mask)}" if target.mark is not None else ""
            return f"-j TPROXY --on-port {target.port}{on}{mark}"
        case SetMark():
            return f"-j MARK --set-xmark {_mark(target.value, target.mask)}"
        case ConnmarkSave():
            return "-j CONNMARK --save-mark"
        case ConnmarkRestore():
            return "-j CONNMARK --restore-mark"
        case ConnmarkSet():
            return f"-j CONNMARK --set-xmark {_mark(target.value, target.mask)}"
        case CtZone():
            return f"-j CT --zone {target.zone}"
        case Masquerade():
            return "-j MASQUERADE" + _ports(target.ports) + _flags(target.flags)
        case Snat():
            return f"-j SNAT --to-source {_range(target.addresses)}" + _ports(target.ports) + _flags(target.flags)
        case Dnat():
            return f"-j DNAT --to-destination {_range(target.addresses)}" + _ports(target.ports) + _flags(target.flags)
        case Reject():
            return "-j REJECT" + (f" --reject-with {target.with_}" if target.with_ else "")
        case Log():
            return "-j LOG" + (f" --log-prefix {target.prefix!r}" if target.prefix else "")
        case UnknownTarget():
            return f"-j {target.name} [{target.dialect}: {' '.join(target.tokens)}]"
        case _:
            assert_never(target)


def describe_rule(rule: Rule) -> str:
    """A rule as one line: its matches, then its target."""
    parts = [describe_match(m) for m in rule.matches]
    parts.append(describe_target(rule.target))
    return " ".join(parts)
