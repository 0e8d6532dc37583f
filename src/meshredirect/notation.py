"""The one notation in which meshredirect prints rules: traces, check reports, diagrams, the docs.

It belongs to no backend, because the IR does not: a ruleset may come from
the compiler, from ``iptables-save`` text or from ``nft -j list ruleset``,
and the same rule means the same thing whichever it came from. A rule is its
matches joined by commas, an arrow, and its target::

    dst != 127.0.0.1/32, oif lo, tcp dport != 15008, uid 1337 -> jump ISTIO_IN_REDIRECT

``!=`` negates a match; ``{a, b}`` is a set (large sets show their first
members and how many more there are); ``src`` / ``dst`` are addresses,
``sport`` / ``dport`` ports, ``iif`` / ``oif`` interfaces, ``uid`` / ``gid``
the socket's owner; targets keep netfilter's upper-case names (``RETURN``,
``REDIRECT :15001``) and chains are entered by ``jump X`` or ``goto X``. An
owner match whose answer for a packet without a socket is not the obvious
one says so (``(no socket: match)``): that is where iptables and nftables
differ. The text is ASCII, for any terminal, and for display only: it is
never parsed.

>>> from meshredirect.compiler import compile_policy
>>> from meshredirect.ir import Family
>>> from meshredirect.policy import Policy
>>> nat = compile_policy(Policy()).table(Family.IPV4, "nat")
>>> for rule in nat.chain("ISTIO_OUTPUT").rules[:4]:
...     print(describe_rule(rule))
src 127.0.0.6/32, oif lo -> RETURN
dst != 127.0.0.1/32, oif lo, tcp dport != 15008, uid 1337 -> jump ISTIO_IN_REDIRECT
dst != 127.0.0.1/32, oif lo, tcp dport != 15008, gid 1337 -> jump ISTIO_IN_REDIRECT
uid 1337 -> RETURN
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final, assert_never

from meshredirect.ir import (
    FULL_MASK,
    Accept,
    AddressMatch,
    AddressRange,
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
from meshredirect.values import AddressSet, IntervalSet, PortSet

__all__ = ["ARROW", "MAX_SET_MEMBERS", "describe_match", "describe_rule", "describe_target"]

#: Members of an address, port or id set shown in a rule before the rest is summed up as "N more".
MAX_SET_MEMBERS: Final = 4
#: Between a rule's matches and its target.
ARROW: Final = "->"


def _members(values: Iterable[str], count: int) -> str:
    shown = []
    for index, value in enumerate(values):
        if index == MAX_SET_MEMBERS:
            shown.append(f"... {count - MAX_SET_MEMBERS} more")
            break
        shown.append(value)
    return shown[0] if count == 1 else "{" + ", ".join(shown) + "}"


def _addresses(addresses: AddressSet) -> str:
    return _members((str(network) for network in addresses), len(addresses.networks))


def _intervals(values: IntervalSet) -> str:
    texts = (str(low) if low == high else f"{low}-{high}" for low, high in values.intervals)
    return _members(texts, len(values.intervals))


def _op(negate: bool) -> str:
    return " != " if negate else " "


def _side(direction: Direction) -> str:
    return "src" if direction is Direction.SOURCE else "dst"


def _masked(name: str, value: int, mask: int, negate: bool) -> str:
    if mask == FULL_MASK:
        return f"{name}{_op(negate)}{value:#x}"
    return f"{name} & {mask:#x}{' != ' if negate else ' == '}{value:#x}"


def describe_match(match: Match) -> str:
    """A match in the rule notation.

    >>> from meshredirect.ir import Protocol
    >>> from meshredirect.values import PortSet
    >>> describe_match(PortMatch(protocol=Protocol.TCP, ports=PortSet.of(15008), negate=True))
    'tcp dport != 15008'
    >>> describe_match(AddressMatch(direction=Direction.DESTINATION, addresses=AddressSet.of(*[f"10.0.{i}.0/24" for i in range(0, 20, 2)])))
    'dst {10.0.0.0/24, 10.0.2.0/24, 10.0.4.0/24, 10.0.6.0/24, ... 6 more}'
    """
    match match:
        case ProtocolMatch(protocol=protocol, negate=negate):
            return f"proto{_op(negate)}{protocol.value}"
        case FamilyMatch(family=family):
            return f"family {family.value}"
        case AddressMatch(direction=direction, addresses=addresses, negate=negate):
            return f"{_side(direction)}{_op(negate)}{_addresses(addresses)}"
        case PortMatch(protocol=protocol, ports=ports, direction=direction, negate=negate):
            return f"{protocol.value} {_side(direction)[0]}port{_op(negate)}{_intervals(ports)}"
        case InterfaceMatch(direction=direction, name=name, negate=negate):
            return f"{'iif' if direction is Direction.SOURCE else 'oif'}{_op(negate)}{name}"
        case OwnerMatch(kind=kind, ids=ids, negate=negate, socketless=socketless):
            text = f"{kind.value}{_op(negate)}{_intervals(ids)}"
            if socketless != negate:
                text += f" (no socket: {'match' if socketless else 'no match'})"
            return text
        case MarkMatch(value=value, mask=mask, negate=negate):
            return _masked("mark", value, mask, negate)
        case ConnmarkMatch(value=value, mask=mask, negate=negate):
            return _masked("ctmark", value, mask, negate)
        case CtStateMatch(states=states, negate=negate):
            names = ",".join(state.value for state in CtState if state in states)
            return f"ctstate{_op(negate)}{names}"
        case AddrTypeMatch(direction=direction, types=types, negate=negate, limit_interface=limit):
            names = ",".join(sorted(t.value for t in types))
            return f"{_side(direction)} type{_op(negate)}{names}" + (" (this interface)" if limit else "")
        case IpSetMatch(name=name, flags=flags, negate=negate):
            return f"{','.join(_side(flag) for flag in flags)}{' not' if negate else ''} in ipset {name}"
        case StatisticMatch(probability=probability, every=every, packet=packet, negate=negate):
            text = f"random {probability}" if probability is not None else f"every {every} from {packet}"
            return ("not " if negate else "") + text
        case UnknownMatch(dialect=dialect, tokens=tokens):
            return f"unknown {dialect} match: {' '.join(tokens)}"
        case _:
            assert_never(match)


def _nat_to(addresses: AddressRange | None, ports: PortSet | None) -> str:
    text = ""
    if addresses is not None:
        first, last = addresses.first, addresses.last
        text = f" to {first}" if first == last else f" to {first}-{last}"
    if ports is not None:
        text += f" :{_intervals(ports)}"
    return text


def _nat_flags(flags: frozenset[NatFlag]) -> str:
    return "".join(f" {flag.value}" for flag in NatFlag if flag in flags)


def describe_target(target: Target) -> str:
    """A target in the rule notation.

    >>> describe_target(Redirect(ports=PortSet.of(15001)))
    'REDIRECT :15001'
    >>> describe_target(Masquerade(flags=frozenset({NatFlag.RANDOM_FULLY})))
    'MASQUERADE random-fully'
    >>> describe_target(SetMark(value=0x4000, mask=0x4000))
    'MARK set 0x4000/0x4000'
    """
    match target:
        case Accept():
            return "ACCEPT"
        case Drop():
            return "DROP"
        case Return():
            return "RETURN"
        case Continue():
            return "continue"
        case Jump(chain=chain):
            return f"jump {chain}"
        case Goto(chain=chain):
            return f"goto {chain}"
        case Redirect(ports=ports, flags=flags):
            return "REDIRECT" + (f" :{_intervals(ports)}" if ports is not None else "") + _nat_flags(flags)
        case TProxy(port=port, address=address, mark=mark, mask=mask):
            text = f"TPROXY {address if address is not None else ''}:{port}"
            if mark is not None:
                text += f" mark {mark:#x}" if mask == FULL_MASK else f" mark {mark:#x}/{mask:#x}"
            return text
        case SetMark(value=value, mask=mask):
            return f"MARK set {value:#x}" if mask == FULL_MASK else f"MARK set {value:#x}/{mask:#x}"
        case ConnmarkSave(nfmask=nfmask, ctmask=ctmask):
            masks = "" if nfmask == ctmask == FULL_MASK else f" nfmask {nfmask:#x} ctmask {ctmask:#x}"
            return "CONNMARK save" + masks
        case ConnmarkRestore(nfmask=nfmask, ctmask=ctmask):
            masks = "" if nfmask == ctmask == FULL_MASK else f" nfmask {nfmask:#x} ctmask {ctmask:#x}"
            return "CONNMARK restore" + masks
        case ConnmarkSet(value=value, mask=mask):
            return f"CONNMARK set {value:#x}" if mask == FULL_MASK else f"CONNMARK set {value:#x}/{mask:#x}"
        case CtZone(zone=zone):
            return f"CT zone {zone}"
        case Masquerade(ports=ports, flags=flags):
            return "MASQUERADE" + _nat_to(None, ports) + _nat_flags(flags)
        case Snat(addresses=addresses, ports=ports, flags=flags):
            return "SNAT" + _nat_to(addresses, ports) + _nat_flags(flags)
        case Dnat(addresses=addresses, ports=ports, flags=flags):
            return "DNAT" + _nat_to(addresses, ports) + _nat_flags(flags)
        case Reject(with_=with_):
            return "REJECT" + (f" with {with_}" if with_ else "")
        case Log(prefix=prefix, level=level):
            return "LOG" + (f" {prefix!r}" if prefix else "") + (f" level {level}" if level != Log().level else "")
        case UnknownTarget(dialect=dialect, name=name, tokens=tokens):
            return f"unknown {dialect} target: {' '.join((name, *tokens))}"
        case _:
            assert_never(target)


def describe_rule(rule: Rule) -> str:
    """A rule in one line: its matches joined by commas (``any`` when it has none), an arrow, its target.

    >>> from meshredirect.ir import InterfaceMatch, OwnerKind, OwnerMatch
    >>> from meshredirect.values import IdSet
    >>> describe_rule(Rule(matches=(InterfaceMatch(direction=Direction.DESTINATION, name="lo"),
    ...                             OwnerMatch(kind=OwnerKind.UID, ids=IdSet.of(1337))), target=Return()))
    'oif lo, uid 1337 -> RETURN'
    >>> describe_rule(Rule(target=Jump(chain="ISTIO_REDIRECT")))
    'any -> jump ISTIO_REDIRECT'
    """
    matches = ", ".join(describe_match(match) for match in rule.matches) or "any"
    return f"{matches} {ARROW} {describe_target(rule.target)}"
