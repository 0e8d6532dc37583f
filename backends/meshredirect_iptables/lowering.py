"""IR to iptables rule syntax, in the canonical form ``iptables-save`` prints.

The kernel tools print a rule as: ``-s``, ``-d``, ``-i``, ``-o``, ``-p``, then
each match module in rule order (``-p tcp --dport`` becomes ``-p tcp -m tcp
--dport``), then ``-j``/``-g``; marks in hex, ``MARK --set-mark`` as
``--set-xmark v/mask``, CONNMARK with explicit masks, TPROXY with
``--on-ip``. Emitting exactly that form makes a load-then-save round trip
identical line for line.

Where iptables needs several rules for one IR rule, the lowering splits it,
and only where that is exact: sets in the IR are disjoint, so a packet
matches at most one member, and one rule per member of a positive set means
the same as the set (multiport takes up to 15 ports, an address set one CIDR
per rule). A negated set iptables cannot hold in one rule is refused.
"""

from __future__ import annotations

import ipaddress
import itertools
from typing import ClassVar, Final, assert_never

from meshredirect.errors import UnsupportedError
from meshredirect.ir import (
    FULL_MASK,
    Accept,
    AddressMatch,
    AddrType,
    AddrTypeMatch,
    Chain,
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
    Rule,
    SetMark,
    Snat,
    StatisticMatch,
    Table,
    Target,
    TProxy,
    UnknownMatch,
    UnknownTarget,
)
from meshredirect.values import PortSet

__all__ = ["MULTIPORT_LIMIT", "IptablesLowering"]

#: xt_multiport holds at most 15 ports; a range takes two of them.
MULTIPORT_LIMIT: Final = 15
#: Order of the fixed options iptables-save prints before any ``-m`` module.
_BASIC_ORDER: Final = ("-s", "-d", "-i", "-o", "-p")
_CTSTATE_ORDER: Final = tuple(CtState)
#: xt_LOG's default syslog level (warning).
DEFAULT_LOG_LEVEL: Final = 4
#: The ``dialect`` readers give nodes they keep as iptables tokens.
DIALECT: Final = "iptables"
#: The port-selection flags each NAT target extension takes.
NAT_TARGET_FLAGS: Final[dict[str, frozenset[NatFlag]]] = {
    "REDIRECT": frozenset({NatFlag.RANDOM}),
    "MASQUERADE": frozenset({NatFlag.RANDOM, NatFlag.RANDOM_FULLY}),
    "SNAT": frozenset({NatFlag.RANDOM, NatFlag.RANDOM_FULLY, NatFlag.PERSISTENT}),
    "DNAT": frozenset({NatFlag.RANDOM, NatFlag.PERSISTENT}),
}

Tokens = list[str]


def _hex(value: int) -> str:
    return hex(value)


def _mark(value: int, mask: int) -> str:
    return _hex(value) if mask == FULL_MASK else f"{_hex(value)}/{_hex(mask)}"


def _port_ranges(ports: PortSet, sep: str) -> list[str]:
    return [str(lo) if lo == hi else f"{lo}{sep}{hi}" for lo, hi in ports.intervals]


def ntop(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """An address as the C library's ``inet_ntop`` writes it (iptables prints addresses with it).

    It differs from Python for IPv6 addresses whose first 96 bits are zero or
    that map an IPv4 address: the last 32 bits are written dotted.

    >>> ntop(ipaddress.ip_address("::7f00:35")), ntop(ipaddress.ip_address("::ffff:a00:1")), ntop(ipaddress.ip_address("::6"))
    ('::127.0.0.53', '::ffff:10.0.0.1', '::6')
    """
    if isinstance(address, ipaddress.IPv4Address):
        return str(address)
    words = [int.from_bytes(address.packed[i : i + 2], "big") for i in range(0, 16, 2)]
    best_base, best_len, base, length = -1, 0, -1, 0
    for index, word in enumerate(words):
        if word == 0:
            if base < 0:
                base, length = index, 0
            length += 1
            if length > best_len:
                best_base, best_len = base, length
        else:
            base = -1
    if best_base == 0 and (best_len == 6 or (best_len == 5 and words[5] == 0xFFFF)):
        tail = ipaddress.IPv4Address(address.packed[12:])
        return ("::ffff:" if best_len == 5 else "::") + str(tail)
    return str(address)


def _network(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> str:
    return f"{ntop(network.network_address)}/{network.prefixlen}"


def _quote(text: str) -> str:
    """Quote a string argument the way iptables-save does."""
    if text and all(ch.isalnum() or ch in "-_./:@" for ch in text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class _RuleParts:
    """Collects one concrete iptables rule: basic options in fixed order, then modules in order."""

    def __init__(self) -> None:
        self.basic: dict[str, Tokens] = {}
        self.modules: list[Tokens] = []
        self.protocol: Protocol | None = None
        self.protocol_negated = False

    def set_basic(self, option: str, tokens: Tokens, node: object, backend: str) -> None:
        if option in self.basic:
            raise UnsupportedError(backend, node, f"iptables takes one {option} option per rule")
        self.basic[option] = tokens

    def need_protocol(self, protocol: Protocol, node: object, backend: str) -> None:
        if self.protocol is None:
            self.protocol = protocol
            self.basic["-p"] = ["-p", protocol.value]
        elif self.protocol is not protocol or self.protocol_negated:
            raise UnsupportedError(backend, node, "conflicting protocols in one rule")

    def tokens(self) -> Tokens:
        out: Tokens = []
        for option in _BASIC_ORDER:
            out += self.basic.get(option, [])
        for module in self.modules:
            out += module
        return out


class IptablesLowering:
    """Shared lowering of the iptables family of backends (save and restore build on it)."""

    name: ClassVar[str] = "iptables"

    # -- rules ----------------------------------------------------------------

    def rule_lines(self, table: Table, chain: Chain, rule: Rule, *, command: str = "-A") -> list[str]:
        """The lines (``-A CHAIN ...``) for one IR rule: usually one, several where the rule is split."""
        if chain.base is not None:
            self.check_interfaces(chain.base.hook, rule)
        return [" ".join([command, chain.name, *tokens]) for tokens in self.rule_tokens(table.family, rule)]

    def check_interfaces(self, hook: Hook, rule: Rule) -> None:
        """iptables refuses ``-i`` where packets have no input interface yet, and ``-o`` before routing."""
        for match in rule.matches:
            if isinstance(match, InterfaceMatch):
                if match.direction is Direction.SOURCE and hook in (Hook.OUTPUT, Hook.POSTROUTING):
                    raise UnsupportedError(
                        self.name, match, f"iptables cannot match the input interface in {hook.value}"
                    )
                if match.direction is Direction.DESTINATION and hook in (Hook.PREROUTING, Hook.INPUT):
                    raise UnsupportedError(
                        self.name, match, f"iptables cannot match the output interface in {hook.value}"
                    )

    def rule_tokens(self, family: Family, rule: Rule) -> list[Tokens]:
        variants = [self._match_variants(family, match) for match in rule.matches]
        if any(not v for v in variants):
            return []  # a match that can never hold in this table: the rule never matches
        target = self.target_tokens(family, rule.target)
        if isinstance(rule.target, Reject) and rule.target.with_ == "tcp-reset":
            # A port match implies its protocol, negated or not (the negation is of the port only).
            tcp = any(
                (isinstance(m, PortMatch) or (isinstance(m, ProtocolMatch) and not m.negate))
                and m.protocol is Protocol.TCP
                for m in rule.matches
            )
            if not tcp:
                raise UnsupportedError(self.name, rule.target, "REJECT --reject-with tcp-reset needs a TCP match")
        results: list[Tokens] = []
        for combination in itertools.product(*variants):
            parts = _RuleParts()
            # Protocol matches go first so that port matches can check against them.
            ordered = sorted(combination, key=lambda item: 0 if isinstance(item[0], ProtocolMatch) else 1)
            for node, payload in ordered:
                self._apply(parts, node, payload)
            if rule.comment is not None:
                parts.modules.insert(0, ["-m", "comment", "--comment", _quote(rule.comment)])
            self._merge_port_modules(parts)
            results.append(parts.tokens() + target)
        return results

    def _match_variants(self, family: Family, match: Match) -> list[tuple[Match, object]]:
        """Each match becomes one or more alternatives (one per rule it is split into)."""
        if isinstance(match, AddressMatch):
            networks = [n for n in match.addresses if family is Family.INET or n.version == family.version]
            if not networks:
                # No member of this family: the match never holds, negated or not (the IR's meaning).
                return []
            if match.negate and len(networks) > 1:
                raise UnsupportedError(
                    self.name, match, "iptables cannot negate a set of several addresses in one rule"
                )
            return [(match, network) for network in networks]
        if isinstance(match, PortMatch):
            chunks = self._port_chunks(match)
            return [(match, chunk) for chunk in chunks]
        if isinstance(match, OwnerMatch):
            if match.negate:
                return [(match, None)]
            if match.socketless:
                raise UnsupportedError(self.name, match, "xt_owner cannot match socketless packets positively")
            return [(match, interval) for interval in match.ids.intervals]
        if isinstance(match, FamilyMatch):
            if match.family is family or family is Family.INET:
                return [(match, "skip")]
            return []
        return [(match, None)]

    def _port_chunks(self, match: PortMatch) -> list[PortSet]:
        if not match.ports:
            raise UnsupportedError(self.name, match, "an empty port set")
        chunks: list[PortSet] = []
        current: list[tuple[int, int]] = []
        used = 0
        for lo, hi in match.ports.intervals:
            cost = 1 if lo == hi else 2
            if used + cost > MULTIPORT_LIMIT:
                chunks.append(PortSet(tuple(current)))
                current, used = [], 0
            current.append((lo, hi))
            used += cost
        chunks.append(PortSet(tuple(current)))
        if match.negate and len(chunks) > 1:
            raise UnsupportedError(
                self.name, match, f"a negated port set of more than {MULTIPORT_LIMIT} multiport slots"
            )
        return chunks

    def _apply(self, parts: _RuleParts, node: Match, payload: object) -> None:
        neg = ["!"] if getattr(node, "negate", False) else []
        match node:
            case ProtocolMatch():
                if parts.protocol is not None:
                    if parts.protocol is node.protocol and parts.protocol_negated == node.negate:
                        return  # the same test twice
                    raise UnsupportedError(self.name, node, "conflicting protocols in one rule")
                parts.protocol = node.protocol
                parts.protocol_negated = node.negate
                parts.basic["-p"] = [*neg, "-p", node.protocol.value]
            case FamilyMatch():
                return
            case AddressMatch():
                option = "-s" if node.direction is Direction.SOURCE else "-d"
                assert isinstance(payload, (ipaddress.IPv4Network, ipaddress.IPv6Network))
                parts.set_basic(option, [*neg, option, _network(payload)], node, self.name)
            case InterfaceMatch():
                option = "-i" if node.direction is Direction.SOURCE else "-o"
                parts.set_basic(option, [*neg, option, node.name], node, self.name)
            case PortMatch():
                assert isinstance(payload, PortSet)
                parts.need_protocol(node.protocol, node, self.name)
                side = "s" if node.direction is Direction.SOURCE else "d"
                if payload.is_single():
                    lo, hi = payload.intervals[0]
                    value = str(lo) if lo == hi else f"{lo}:{hi}"
                    parts.modules.append(["-m", node.protocol.value, *neg, f"--{side}port", value])
                else:
                    parts.modules.append(
                        ["-m", "multiport", *neg, f"--{side}ports", ",".join(_port_ranges(payload, ":"))]
                    )
            case OwnerMatch():
                option = "--uid-owner" if node.kind is OwnerKind.UID else "--gid-owner"
                if node.negate:
                    exists = [] if node.socketless else ["--socket-exists"]
                    for lo, hi in node.ids.intervals:
                        value = str(lo) if lo == hi else f"{lo}-{hi}"
                        parts.modules.append(["-m", "owner", *exists, "!", option, value])
                else:
                    assert isinstance(payload, tuple)
                    lo, hi = payload
                    value = str(lo) if lo == hi else f"{lo}-{hi}"
                    parts.modules.append(["-m", "owner", option, value])
            case MarkMatch():
                parts.modules.append(["-m", "mark", *neg, "--mark", _mark(node.value, node.mask)])
            case ConnmarkMatch():
                parts.modules.append(["-m", "connmark", *neg, "--mark", _mark(node.value, node.mask)])
            case CtStateMatch():
                if not node.states:
                    raise UnsupportedError(self.name, node, "an empty conntrack state set")
                states = ",".join(s.value for s in _CTSTATE_ORDER if s in node.states)
                parts.modules.append(["-m", "conntrack", *neg, "--ctstate", states])
            case AddrTypeMatch():
                side = "--src-type" if node.direction is Direction.SOURCE else "--dst-type"
                types = ",".join(t.value for t in sorted(node.types, key=list(AddrType).index))
                module = ["-m", "addrtype", *neg, side, types]
                if node.limit_interface:
                    module.append("--limit-iface-in" if node.direction is Direction.SOURCE else "--limit-iface-out")
                parts.modules.append(module)
            case IpSetMatch():
                flags = ",".join("src" if f is Direction.SOURCE else "dst" for f in node.flags)
                parts.modules.append(["-m", "set", *neg, "--match-set", node.name, flags])
            case StatisticMatch():
                if node.probability is not None:
                    parts.modules.append(
                        ["-m", "statistic", "--mode", "random", *neg, "--probability", f"{node.probability:.11f}"]
                    )
                elif node.every is not None:
                    parts.modules.append(
                        [
                            "-m",
                            "statistic",
                            "--mode",
                            "nth",
                            *neg,
                            "--every",
                            str(node.every),
                            "--packet",
                            str(node.packet),
                        ]
                    )
                else:
                    raise UnsupportedError(self.name, node, "a statistic match needs a probability or an 'every'")
            case UnknownMatch():
                if node.dialect != DIALECT:
                    raise UnsupportedError(self.name, node, f"an unknown {node.dialect} match has no iptables form")
                parts.modules.append(list(node.tokens))
            case _:
                assert_never(node)

    @staticmethod
    def _merge_port_modules(parts: _RuleParts) -> None:
        """``-m tcp --sport A -m tcp --dport B`` is printed by iptables-save as one ``-m tcp`` module."""
        merged: list[Tokens] = []
        for module in parts.modules:
            if (
                merged
                and module[:2] == merged[-1][:2]
                and module[1] in ("tcp", "udp")
                and ("--sport" in merged[-1] and "--dport" in module)
            ):
                merged[-1] = merged[-1] + module[2:]
            else:
                merged.append(module)
        parts.modules = merged

    # -- targets --------------------------------------------------------------

    def target_tokens(self, family: Family, target: Target) -> Tokens:
        match target:
            case Accept():
                return ["-j", "ACCEPT"]
            case Drop():
                return ["-j", "DROP"]
            case Return():
                return ["-j", "RETURN"]
            case Continue():
                return []
            case Jump():
                return ["-j", target.chain]
            case Goto():
                return ["-g", target.chain]
            case Redirect():
                tokens = ["-j", "REDIRECT"]
                if target.ports is not None:
                    tokens += ["--to-ports", self._single_range(target, target.ports, "-")]
                return tokens + self._nat_flags(target, "REDIRECT")
            case TProxy():
                if family is Family.INET:
                    raise UnsupportedError(self.name, target, "TPROXY needs an IPv4 or IPv6 table")
                address = target.address or ipaddress.ip_address("0.0.0.0" if family is Family.IPV4 else "::")
                address_text = ntop(address)
                mark, mask = (target.mark, target.mask) if target.mark is not None else (0, 0)
                return [
                    "-j", "TPROXY", "--on-port", str(target.port), "--on-ip", address_text,
                    "--tproxy-mark", f"{_hex(mark)}/{_hex(mask)}",
                ]  # fmt: skip
            case SetMark():
                return ["-j", "MARK", "--set-xmark", f"{_hex(target.value)}/{_hex(target.mask)}"]
            case ConnmarkSave():
                return [
                    "-j",
                    "CONNMARK",
                    "--save-mark",
                    "--nfmask",
                    _hex(target.nfmask),
                    "--ctmask",
                    _hex(target.ctmask),
                ]
            case ConnmarkRestore():
                return [
                    "-j", "CONNMARK", "--restore-mark", "--nfmask", _hex(target.nfmask), "--ctmask", _hex(target.ctmask),
                ]  # fmt: skip
            case ConnmarkSet():
                return ["-j", "CONNMARK", "--set-xmark", f"{_hex(target.value)}/{_hex(target.mask)}"]
            case CtZone():
                return ["-j", "CT", "--zone", str(target.zone)]
            case Masquerade():
                tokens = ["-j", "MASQUERADE"]
                if target.ports is not None:
                    tokens += ["--to-ports", self._single_range(target, target.ports, "-")]
                return tokens + self._nat_flags(target, "MASQUERADE")
            case Snat() | Dnat():
                option = "--to-source" if isinstance(target, Snat) else "--to-destination"
                name = "SNAT" if isinstance(target, Snat) else "DNAT"
                return ["-j", name, option, self._nat_to(family, target), *self._nat_flags(target, name)]
            case Reject():
                return ["-j", "REJECT", "--reject-with", target.with_ or self._default_reject(family)]
            case Log():
                tokens = ["-j", "LOG"]
                if target.prefix is not None:
                    tokens += ["--log-prefix", _quote(target.prefix)]
                if target.level != DEFAULT_LOG_LEVEL:  # iptables-save leaves the default out
                    tokens += ["--log-level", str(target.level)]
                return tokens
            case UnknownTarget():
                if target.dialect != DIALECT:
                    raise UnsupportedError(
                        self.name, target, f"an unknown {target.dialect} target has no iptables form"
                    )
                return ["-j", target.name, *target.tokens]
            case _:
                assert_never(target)

    def _nat_flags(self, target: Redirect | Masquerade | Snat | Dnat, name: str) -> list[str]:
        """The target's port-selection flags, in the order iptables-save prints them."""
        takes = NAT_TARGET_FLAGS[name]
        tokens = []
        for flag in NatFlag:  # (the enum's order is iptables-save's)
            if flag not in target.flags:
                continue
            if flag not in takes:
                raise UnsupportedError(self.name, target, f"{name} takes no --{flag.value}")
            tokens.append("--" + flag.value)
        return tokens

    def _single_range(self, node: object, ports: PortSet, sep: str) -> str:
        if not ports.is_single():
            raise UnsupportedError(self.name, node, "iptables NAT targets take one port or one range")
        return _port_ranges(ports, sep)[0]

    def _nat_to(self, family: Family, target: Snat | Dnat) -> str:
        text = ""
        if target.addresses is not None:
            first, last = target.addresses.first, target.addresses.last
            text = ntop(first) if first == last else f"{ntop(first)}-{ntop(last)}"
            if family is Family.IPV6 and target.ports is not None:
                text = f"[{text}]"
        if target.ports is not None:
            text += ":" + self._single_range(target, target.ports, "-")
        if not text:
            raise UnsupportedError(self.name, target, "a NAT target needs an address or a port")
        return text

    @staticmethod
    def _default_reject(family: Family) -> str:
        return "icmp6-port-unreachable" if family is Family.IPV6 else "icmp-port-unreachable"
