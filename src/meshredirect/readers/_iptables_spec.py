"""One iptables rule specification (the options after ``-A CHAIN``) to IR matches and a target.

iptables parses a rule with ``getopt_long`` over an option table that grows as
modules load: the basic options (``-p``, ``-s``, ``-m``, ``-j``...) come first,
then the options of the most recently loaded module, then older ones; a long
option may be abbreviated to any unambiguous prefix; an option no loaded
module knows makes iptables load the match of the rule's protocol (``-p tcp
--dport 80``) and try again. This module follows the same rules, so what it
accepts means what iptables would make of it.

Normal form (what ``iptables-save`` prints, and what the iptables backends emit):
basic matches in the order ``-s -d -i -o -p -f``, then one or more matches per
module in load order, options of a module in the order its ``save`` function
prints them; a :class:`~meshredirect.ir.ProtocolMatch` is left out where a
:class:`~meshredirect.ir.PortMatch` of the same protocol implies it; adjacent
negated owner matches of one kind merge. What the IR cannot model becomes an
:class:`~meshredirect.ir.UnknownMatch` or :class:`~meshredirect.ir.UnknownTarget`
(dialect ``iptables``) holding the tokens, never a guess.
"""

from __future__ import annotations

import functools
import ipaddress
import itertools
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar, Final, NamedTuple, NoReturn, ParamSpec, TypeVar, final

import attrs

from meshredirect.errors import SourceError, SourcePosition
from meshredirect.ir import (
    FULL_MASK,
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
    Protocol,
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
from meshredirect.values import MAX_ID, MAX_MARK, MAX_PORT, AddressSet, IdSet, IPNetwork, PortSet

__all__ = ["DIALECT", "Arg", "SpecContext", "parse_rule"]

#: The ``dialect`` of unknown nodes this reader makes.
DIALECT: Final = "iptables"
#: xt_LOG's default syslog level (warning); iptables-save leaves it out.
DEFAULT_LOG_LEVEL: Final = 4
#: xt_statistic keeps a random probability as a 31-bit fraction.
STATISTIC_SCALE: Final = 0x80000000
#: Every uid or gid: a positive owner match over all of them means "the packet has a socket".
ALL_IDS: Final = IdSet.of((0, MAX_ID))
#: A port match over every port (0:65535) is no match at all.
ALL_PORTS: Final = PortSet.of((1, MAX_PORT))

_ALL_ADDRESSES: Final = {4: ipaddress.ip_network("0.0.0.0/0"), 6: ipaddress.ip_network("::/0")}
_P = ParamSpec("_P")
_T = TypeVar("_T")
#: How many parsed values each cache keeps (real dumps repeat many: options, networks, ports, marks).
_CACHED: Final = 4096


class _Invalid(Exception):
    """What is wrong with a value (the caller says where it is)."""


class Arg(NamedTuple):
    """One argument of a rule: its value (quotes removed), how it was written, and where."""

    value: str
    raw: str
    line: int
    column: int


@final
class _Hole:
    """A kind of value that rules of one shape differ in (see :func:`parse_rule`). Compared and hashed by
    identity (an enum's hash is Python code, and a shape is hashed once a rule)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<hole {self.name}>"

    ADDRESS: ClassVar[_Hole]
    COMMENT: ClassVar[_Hole]
    PORT: ClassVar[_Hole]
    CHAIN: ClassVar[_Hole]
    NAT: ClassVar[_Hole]


_Hole.ADDRESS = _Hole("-s/-d")
_Hole.COMMENT = _Hole("--comment")
_Hole.PORT = _Hole("--sport/--dport")
_Hole.CHAIN = _Hole("-j/-g")
_Hole.NAT = _Hole("--to-destination/--to-source")


#: A rule's arguments with the values that rules differ in replaced by their kinds.
_Shape = tuple["str | _Hole", ...]


@attrs.frozen(kw_only=True)
class SpecContext:
    """What a rule's meaning depends on besides its own text."""

    family: Family
    table: str
    #: Whether a name is a user chain of the table (at the time the rule is added).
    is_chain: Callable[[str], bool]
    #: Whether a name is a built-in chain of the table.
    is_builtin: Callable[[str], bool]
    users: Mapping[str, int]
    groups: Mapping[str, int]
    #: Builds the error for a problem at an argument.
    error: Callable[[int, int, str], SourceError]
    #: How to read a rule of each shape seen so far (None: by parsing it); filled by :func:`parse_rule`. A context
    #: serves the rules of one table in one read, so this lives as long as that read and holds one entry a shape.
    plans: dict[_Shape, _Plan | None] = attrs.field(factory=dict, eq=False, repr=False)


# ----------------------------------------------------------------------------- option tables


@attrs.frozen
class _Option:
    names: tuple[str, ...]
    arity: int = 1
    negatable: bool = True
    supported: bool = True
    #: The first of ``names`` (the one iptables-save prints).
    name: str = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "name", self.names[0])


def _opt(*names: str, arity: int = 1, negatable: bool = True, supported: bool = True) -> _Option:
    return _Option(names=names, arity=arity, negatable=negatable, supported=supported)


@attrs.frozen
class _Module:
    """A match or target extension: its options in the order its ``save`` prints them."""

    name: str
    options: tuple[_Option, ...]
    #: Matches that need a protocol (``-p tcp`` for ``-m tcp``); empty when any protocol will do.
    protocols: tuple[Protocol, ...] = ()
    #: Targets that iptables allows in one table only.
    table: str | None = None

    spelled: dict[str, _Option] = attrs.field(init=False, eq=False, repr=False)
    #: Each option's place in ``options`` (given options are read in that order), by its name.
    order: dict[str, int] = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "spelled", {name: option for option in self.options for name in option.names})
        object.__setattr__(self, "order", {option.name: index for index, option in enumerate(self.options)})

    def in_order(self, given: list[_Given]) -> list[_Given]:
        """The options given to this module in the order its ``save`` prints them."""
        if len(given) < 2:
            return given
        return sorted(given, key=lambda g: self.order[g.option.name])


_PORTS_TCP = (_opt("sport", "source-port"), _opt("dport", "destination-port"))

MATCH_MODULES: Final[dict[str, _Module]] = {
    m.name: m
    for m in (
        _Module(
            "tcp",
            (
                *_PORTS_TCP,
                _opt("tcp-option", supported=False),
                _opt("tcp-flags", arity=2, supported=False),
                _opt("syn", arity=0, supported=False),
            ),
            (Protocol.TCP,),
        ),
        _Module("udp", _PORTS_TCP, (Protocol.UDP,)),
        _Module("sctp", (*_PORTS_TCP, _opt("chunk-types", arity=2, supported=False)), (Protocol.SCTP,)),
        _Module("icmp", (_opt("icmp-type", supported=False),), (Protocol.ICMP,)),
        _Module("icmp6", (_opt("icmpv6-type", supported=False),), (Protocol.ICMPV6,)),
        _Module(
            "multiport",
            (
                _opt("ports", supported=False),
                _opt("sports", "source-ports"),
                _opt("dports", "destination-ports"),
            ),
            (Protocol.TCP, Protocol.UDP, Protocol.SCTP),
        ),
        _Module(
            "owner",
            (
                _opt("socket-exists", arity=0),
                _opt("uid-owner"),
                _opt("gid-owner"),
                _opt("suppl-groups", arity=0, negatable=False, supported=False),
            ),
        ),
        _Module("mark", (_opt("mark"),)),
        _Module("connmark", (_opt("mark"),)),
        _Module(
            "conntrack",
            (
                _opt("ctstate"),
                *(
                    _opt(name, supported=False)
                    for name in (
                        "ctproto",
                        "ctorigsrc",
                        "ctorigdst",
                        "ctreplsrc",
                        "ctrepldst",
                        "ctorigsrcport",
                        "ctorigdstport",
                        "ctreplsrcport",
                        "ctrepldstport",
                        "ctstatus",
                        "ctexpire",
                    )
                ),
                _opt("ctdir", negatable=False, supported=False),
            ),
        ),
        _Module("state", (_opt("state"),)),
        _Module("comment", (_opt("comment", negatable=False),)),
        _Module(
            "addrtype",
            (
                _opt("src-type"),
                _opt("dst-type"),
                _opt("limit-iface-in", arity=0, negatable=False),
                _opt("limit-iface-out", arity=0, negatable=False),
            ),
        ),
        _Module(
            "set",
            (
                _opt("match-set", "set", arity=2),
                _opt("return-nomatch", arity=0, negatable=False, supported=False),
                _opt("update-counters", arity=0, supported=False),
                _opt("update-subcounters", arity=0, supported=False),
                *(
                    _opt(f"{what}-{cmp}", supported=False)
                    for what in ("packets", "bytes")
                    for cmp in ("eq", "lt", "gt")
                ),
            ),
        ),
        _Module(
            "statistic",
            (
                _opt("mode", negatable=False),
                _opt("probability"),
                _opt("every"),
                _opt("packet", negatable=False),
            ),
        ),
    )
}


def _targ(*names: str, arity: int = 1, supported: bool = True) -> _Option:
    return _Option(names=names, arity=arity, negatable=False, supported=supported)


_MARK_OPS = tuple(_targ(op) for op in ("set-xmark", "set-mark", "and-mark", "or-mark", "xor-mark"))

TARGET_MODULES: Final[dict[str, _Module]] = {
    m.name: m
    for m in (
        _Module("REDIRECT", (_targ("to-ports"), _targ("random", arity=0)), table="nat"),
        _Module(
            "MASQUERADE",
            (
                _targ("to-ports"),
                _targ("random", arity=0),
                _targ("random-fully", arity=0),
            ),
            table="nat",
        ),
        _Module(
            "SNAT",
            (
                _targ("to-source"),
                _targ("random", arity=0),
                _targ("random-fully", arity=0),
                _targ("persistent", arity=0),
            ),
            table="nat",
        ),
        _Module(
            "DNAT",
            (
                _targ("to-destination"),
                _targ("random", arity=0),
                _targ("persistent", arity=0),
            ),
            table="nat",
        ),
        _Module("TPROXY", (_targ("on-port"), _targ("on-ip"), _targ("tproxy-mark")), table="mangle"),
        _Module("MARK", _MARK_OPS),
        _Module(
            "CONNMARK",
            (
                *_MARK_OPS,
                _targ("save-mark", arity=0),
                _targ("restore-mark", arity=0),
                _targ("mask"),
                _targ("nfmask"),
                _targ("ctmask"),
                _targ("left-shift-mark", supported=False),
                _targ("right-shift-mark", supported=False),
            ),
        ),
        _Module(
            "CT",
            (
                _targ("zone"),
                _targ("notrack", arity=0, supported=False),
                *(
                    _targ(name, supported=False)
                    for name in ("helper", "ctevents", "expevents", "zone-orig", "zone-reply", "timeout")
                ),
            ),
            table="raw",
        ),
        _Module("REJECT", (_targ("reject-with"),)),
        _Module(
            "LOG",
            (
                _targ("log-level"),
                _targ("log-prefix"),
                *(
                    _targ(name, arity=0, supported=False)
                    for name in ("log-tcp-sequence", "log-tcp-options", "log-ip-options", "log-uid", "log-macdecode")
                ),
            ),
        ),
    )
}

_VERDICTS: Final[dict[str, Target]] = {"ACCEPT": Accept(), "DROP": Drop(), "RETURN": Return()}

# The basic options: (canonical, short letter, long names, arity, negatable).
_BASIC: Final = (
    ("protocol", "p", ("protocol",), 1, True),
    ("source", "s", ("source", "src"), 1, True),
    ("destination", "d", ("destination", "dst"), 1, True),
    ("in-interface", "i", ("in-interface",), 1, True),
    ("out-interface", "o", ("out-interface",), 1, True),
    ("jump", "j", ("jump",), 1, False),
    ("goto", "g", ("goto",), 1, False),
    ("match", "m", ("match",), 1, False),
    ("fragment", "f", ("fragment",), 0, True),
    ("set-counters", "c", ("set-counters",), 2, False),
    ("ipv4", "4", ("ipv4",), 0, False),
    ("ipv6", "6", ("ipv6",), 0, False),
)
_BASIC_OPTIONS: Final = {
    canonical: _Option(names=(canonical, *longs), arity=arity, negatable=negatable)
    for canonical, _, longs, arity, negatable in _BASIC
}
_BASIC_SHORT: Final = {short: _BASIC_OPTIONS[canonical] for canonical, short, *_ in _BASIC}
_BASIC_LONG: Final = {name: option for option in _BASIC_OPTIONS.values() for name in option.names}
#: The order in which iptables-save prints the basic matches.
_BASIC_ORDER: Final = ("source", "destination", "in-interface", "out-interface", "protocol", "fragment")

_PROTOCOLS: Final[dict[str, Protocol | None]] = {
    "tcp": Protocol.TCP,
    "6": Protocol.TCP,
    "udp": Protocol.UDP,
    "17": Protocol.UDP,
    "icmp": Protocol.ICMP,
    "1": Protocol.ICMP,
    "ipv6-icmp": Protocol.ICMPV6,
    "icmpv6": Protocol.ICMPV6,
    "58": Protocol.ICMPV6,
    "sctp": Protocol.SCTP,
    "132": Protocol.SCTP,
    "all": None,
    "0": None,
}
#: The match iptables loads for an option no loaded module knows, by protocol.
_IMPLICIT: Final = {
    Protocol.TCP: "tcp",
    Protocol.UDP: "udp",
    Protocol.SCTP: "sctp",
    Protocol.ICMP: "icmp",
    Protocol.ICMPV6: "icmp6",
}

#: libxt_REJECT's tables: (name, alias); an argument may abbreviate either (first hit wins).
_REJECT_WITH: Final = {
    Family.IPV4: (
        ("icmp-net-unreachable", "net-unreach"),
        ("icmp-host-unreachable", "host-unreach"),
        ("icmp-proto-unreachable", "proto-unreach"),
        ("icmp-port-unreachable", "port-unreach"),
        ("icmp-net-prohibited", "net-prohib"),
        ("icmp-host-prohibited", "host-prohib"),
        ("tcp-reset", "tcp-rst"),
        ("icmp-admin-prohibited", "admin-prohib"),
    ),
    Family.IPV6: (
        ("icmp6-no-route", "no-route"),
        ("icmp6-adm-prohibited", "adm-prohibited"),
        ("icmp6-addr-unreachable", "addr-unreach"),
        ("icmp6-port-unreachable", "port-unreach"),
        ("tcp-reset", "tcp-reset"),
        ("icmp6-policy-fail", "policy-fail"),
        ("icmp6-reject-route", "reject-route"),
    ),
}
_DEFAULT_REJECT: Final = {Family.IPV4: "icmp-port-unreachable", Family.IPV6: "icmp6-port-unreachable"}
_LOG_LEVELS: Final = {
    "emerg": 0,
    "panic": 0,
    "alert": 1,
    "crit": 2,
    "err": 3,
    "error": 3,
    "warning": 4,
    "warn": 4,
    "notice": 5,
    "info": 6,
    "debug": 7,
}
_NAT_FLAGS: Final = tuple((flag.value, flag) for flag in NatFlag)
_STATES: Final = {state.value: state for state in CtState}
_PLAIN_STATES: Final = frozenset(
    {CtState.INVALID, CtState.NEW, CtState.RELATED, CtState.ESTABLISHED, CtState.UNTRACKED}
)
_ADDRTYPES: Final = {kind.value: kind for kind in AddrType}
#: Longest chain and comment/prefix texts the kernel takes.
MAX_COMMENT: Final = 255
MAX_LOG_PREFIX: Final = 29


def quote(text: str) -> str:
    """An argument written so that iptables-restore reads it back as ``text``: bare when it can be,
    else in double quotes with ``\\`` and ``"`` escaped.

    >>> quote("unicast"), quote("default/web cluster IP"), quote('a"b')
    ('unicast', '"default/web cluster IP"', '"a\\\\"b"')
    """
    if text and not any(ch.isspace() or ch in "\"\\'#" for ch in text) and text != "!":
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# ----------------------------------------------------------------------------- parsing state


@attrs.define
class _Given:
    """One option as given: the option, whether negated, its values, and the arguments it came from."""

    option: _Option
    negate: bool
    values: list[Arg]
    at: Arg


@attrs.define
class _Loaded:
    """A loaded extension (match or target) and the options given to it."""

    module: _Module | None  # None: an extension the IR does not model; its tokens are kept
    name: str
    at: Arg
    implicit: bool = False
    given: list[_Given] = attrs.Factory(list)
    raw: list[str] = attrs.Factory(list)  # for unmodelled extensions: every token as written
    seen: set[str] = attrs.Factory(set)


class _Rule:
    """Parsing state of one rule specification."""

    def __init__(self, args: Sequence[Arg], ctx: SpecContext) -> None:
        self.args = args
        self.ctx = ctx
        self.basic: dict[str, tuple[bool, Arg, Arg]] = {}  # canonical -> (negated, value, option arg)
        self.loaded: list[_Loaded] = []  # matches and the target, in load order
        self.target: _Loaded | None = None
        self.chain_target: tuple[str, Arg, bool] | None = None  # -j CHAIN / -g CHAIN / verdicts
        self.implicit_done = False
        self.family_only: Family | None = None
        #: The newest loaded extension we do not model (it takes the options nothing else knows).
        self.absorbing: _Loaded | None = None

    def fail(self, arg: Arg, message: str) -> NoReturn:
        raise self.ctx.error(arg.line, arg.column, message)

    # -- the option loop ------------------------------------------------------

    def parse(self) -> None:
        args = self.args
        count = len(args)
        i = 0
        negation: Arg | None = None
        while i < count:
            arg = args[i]
            if arg.value == "!":
                if negation is not None:
                    self.fail(arg, "expected an option after '!', got another '!'")
                negation = arg
                i += 1
                continue
            unknown = self.absorbing
            word = _option_word(arg.value)
            if word is None:
                if unknown is not None:
                    unknown.raw.append(quote(arg.value))
                    i += 1
                    continue
                self.fail(arg, f"expected an option (such as -p, -m, -j), got {arg.value!r}")
            name, attached, long = word
            owner, option = self._resolve(arg, name, long)
            if option is None and unknown is not None and long:
                # An option no known extension has belongs to the newest extension we do not model.
                unknown.raw += (["!"] if negation else []) + [quote(arg.value)]
                negation = None
                i += 1
                continue
            if option is None:
                self.fail(arg, _unknown_option_message(arg.value, self.loaded))
            i += 1
            values: list[Arg] = [] if attached is None else [Arg(attached, attached, arg.line, arg.column)]
            while len(values) < option.arity:
                if i >= count:
                    self.fail(arg, f"{arg.value}: expected {_values(option.arity)}, got the end of the rule")
                if args[i].value == "!":
                    self.fail(args[i], f"{arg.value}: expected a value, got '!' (a negation goes before the option)")
                values.append(args[i])
                i += 1
            if negation is not None and not option.negatable:
                self.fail(negation, f"{arg.value} cannot be negated ('!')")
            self._apply(owner, option, negation is not None, values, arg)
            negation = None
        if negation is not None:
            self.fail(negation, "expected an option after '!', got the end of the rule")

    def _resolve(self, arg: Arg, name: str, long: bool) -> tuple[_Loaded | None, _Option | None]:
        """Find an option as getopt_long would: exact names first (basic options, then newest module first),
        then an unambiguous prefix; an unknown option loads the protocol's match once and tries again."""
        if not long:
            option = _BASIC_SHORT.get(name)
            if option is None:
                self.fail(arg, f"unknown option {arg.value!r}")
            return None, option
        while True:
            if name in _BASIC_LONG:
                return None, _BASIC_LONG[name]
            for loaded in reversed(self.loaded):
                if loaded.module is not None and name in loaded.module.spelled:
                    return loaded, loaded.module.spelled[name]
            if self.absorbing is not None:
                # An extension we do not model may have this exact option: no abbreviations, no implicit
                # protocol match; the caller hands the option to that extension.
                return None, None
            hits: dict[tuple[int, str], tuple[_Loaded | None, _Option]] = {}
            for option in _BASIC_OPTIONS.values():
                if any(n.startswith(name) for n in option.names):
                    hits[(-1, option.name)] = (None, option)
            for index, loaded in enumerate(self.loaded):
                if loaded.module is None:
                    continue
                for option in loaded.module.options:
                    if any(n.startswith(name) for n in option.names):
                        hits[(index, option.name)] = (loaded, option)
            if len(hits) == 1:
                return next(iter(hits.values()))
            if len(hits) > 1:
                choices = ", ".join(sorted({"--" + option.name for _, option in hits.values()}))
                self.fail(arg, f"ambiguous option {arg.value!r}: expected one of {choices}")
            if not self._load_implicit(arg):
                return None, None

    def _load_implicit(self, arg: Arg) -> bool:
        if self.implicit_done or "protocol" not in self.basic:
            return False
        negated, value, _ = self.basic["protocol"]
        protocol = _PROTOCOLS.get(value.value.lower())
        if negated or protocol is None:
            return False
        self.implicit_done = True
        module = MATCH_MODULES[_IMPLICIT[protocol]]
        self.loaded.append(_Loaded(module=module, name=module.name, at=arg, implicit=True))
        return True

    def _apply(self, owner: _Loaded | None, option: _Option, negate: bool, values: list[Arg], at: Arg) -> None:
        if owner is not None:
            if option.name in owner.seen:
                self.fail(at, f"{owner.name}: --{option.name} given twice; expected it at most once")
            owner.seen.add(option.name)
            owner.given.append(_Given(option=option, negate=negate, values=values, at=at))
            return
        name = option.name
        if name in ("protocol", "source", "destination", "in-interface", "out-interface", "fragment"):
            if name in self.basic:
                self.fail(at, f"-{_short(name)} given twice; expected it at most once")
            self.basic[name] = (negate, values[0] if values else at, at)
        elif name == "match":
            self._load_match(values[0])
        elif name in ("jump", "goto"):
            if self.target is not None or self.chain_target is not None:
                self.fail(at, "a rule takes one -j or -g; expected no second target")
            self._load_target(values[0], goto=name == "goto")
        elif name == "set-counters":
            for value in values:
                if not value.value.isdigit():
                    self.fail(value, f"-c: expected a packet or byte count, got {value.value!r}")
        elif name in ("ipv4", "ipv6"):
            self.family_only = Family.IPV4 if name == "ipv4" else Family.IPV6

    def _load_match(self, value: Arg) -> None:
        name = value.value
        module = MATCH_MODULES.get(name)
        if module is None and name.lower() in MATCH_MODULES:
            module = MATCH_MODULES[name.lower()]
        if module is None:
            if not name or not all(ch.isalnum() or ch in "_-" for ch in name):
                self.fail(value, f"-m: expected the name of a match extension, got {name!r}")
            self.absorbing = _Loaded(module=None, name=name, at=value, raw=["-m", quote(name)])
            self.loaded.append(self.absorbing)
            return
        self.loaded.append(_Loaded(module=module, name=module.name, at=value))

    def _load_target(self, value: Arg, *, goto: bool) -> None:
        name = value.value
        ctx = self.ctx
        if ctx.is_builtin(name):
            self.fail(value, f"expected a user chain or a target, got the built-in chain {name}")
        if goto:
            if not ctx.is_chain(name):
                self.fail(value, f"-g: expected a user chain of table {ctx.table}, got {name!r}")
            self.chain_target = (name, value, True)
            return
        if ctx.is_chain(name) or name in _VERDICTS:
            self.chain_target = (name, value, False)
            return
        if not name or name.startswith("-"):
            self.fail(value, f"-j: expected a chain or a target, got {name!r}")
        module = TARGET_MODULES.get(name)
        if module is not None and module.table is not None and module.table != ctx.table:
            self.fail(value, f"{name} is only valid in the {module.table} table; this rule is in table {ctx.table}")
        loaded = _Loaded(module=module, name=name, at=value)
        self.target = loaded
        self.loaded.append(loaded)
        if module is None:
            self.absorbing = loaded

    # -- building IR ----------------------------------------------------------

    def parts(self) -> _Parts | None:
        """What the rule specification makes (None where ``-4``/``-6`` excludes the table's family: the tool
        skips the rule)."""
        self.parse()
        if self.family_only is not None and self.family_only is not self.ctx.family:
            return None
        comment: list[str] = []
        protocol = self._protocol()
        modules: list[Match] = []
        for loaded in self.loaded:
            if loaded is self.target:
                continue
            modules += self._module_matches(loaded, protocol, comment)
        target = self._target()
        sources = self._addresses("source")
        destinations = self._addresses("destination")
        fixed: list[Match] = []
        for name in ("in-interface", "out-interface"):
            if name in self.basic:
                fixed.append(self._interface(name))
        if "protocol" in self.basic:
            fixed += self._protocol_match(protocol, modules)
        if "fragment" in self.basic:
            fixed.append(UnknownMatch(dialect=DIALECT, tokens=("!", "-f") if self.basic["fragment"][0] else ("-f",)))
        return _Parts(sources, destinations, (*fixed, *_merge_owners(modules)), target, " ".join(comment) or None)

    def plan(self, shape: _Shape, parts: _Parts) -> _Plan | None:
        """How to read the other rules of this rule's ``shape`` (see :func:`parse_rule`): these ``parts``, with
        the places that take the value of each hole. None where a hole was not the value of the option it follows
        (it was parsed as something else, so its value may change what the rule means), and where the target is
        a name whose meaning changes as chains come and go but is no hole."""
        holes = {index: kind for index, kind in enumerate(shape) if isinstance(kind, _Hole)}
        places = {id(arg): index for index, arg in enumerate(self.args)}

        def take(at: Arg, kind: _Hole) -> int | None:
            """The place of the hole ``at`` is (of that kind), taken; None where it is no such hole."""
            index = places.get(id(at))  # (an attached value, --dport=80, is a new Arg: no hole)
            if index is None or holes.get(index) is not kind:
                return None
            del holes[index]
            return index

        def addresses(name: str) -> _AddressSlot | None:
            if name not in self.basic:
                return None
            negated, value, _ = self.basic[name]
            at = take(value, _Hole.ADDRESS)
            return None if at is None else _AddressSlot(at, negated)

        sources, destinations = addresses("source"), addresses("destination")
        comments: list[str | int] = []
        ports: list[_PortSlot] = []
        for loaded in self.loaded:
            if loaded.module is None or loaded is self.target:
                continue
            if loaded.module.name == "comment":
                value = loaded.given[0].values[0]
                at = take(value, _Hole.COMMENT)
                comments.append(value.value if at is None else at)
            for given in loaded.given:
                at = take(given.values[0], _Hole.PORT) if given.option in _PORTS_TCP else None
                if at is None:
                    continue
                protocol = self._protocol()
                assert protocol is not None  # (the port's module needs one)
                made = self._port_option(loaded, given, protocol)
                # The match it made: the only one equal to it (a hole's digits always make one such match).
                found = [index for index, match in enumerate(parts.others) if match == made]
                if not isinstance(made, PortMatch) or len(found) != 1:
                    return None
                ports.append(_PortSlot(found[0], at, f"--{given.option.name}", made))
        target: _ChainSlot | _NatSlot | None = None
        if self.chain_target is not None:
            name, value, _ = self.chain_target
            at = take(value, _Hole.CHAIN)
            if at is None and name not in _VERDICTS:
                return None  # a name that is no hole: whether it is a chain changes as chains come and go
            if at is not None:
                if not isinstance(parts.target, (Jump, Goto)):
                    return None
                target = _ChainSlot(at, type(parts.target))
        elif self.target is not None:
            if self.target.module is None:
                return None  # an unknown target's name: a chain made later may take it
            for given in self.target.given:
                at = take(given.values[0], _Hole.NAT) if given.option.name in ("to-destination", "to-source") else None
                if at is not None:
                    if not isinstance(parts.target, (Dnat, Snat)):
                        return None
                    target = _NatSlot(at, f"--{given.option.name}", parts.target)
        if holes:
            return None
        has_comment = any(isinstance(part, int) for part in comments)
        return _Plan(parts, sources, destinations, tuple(comments) if has_comment else None, tuple(ports), target)

    def _protocol(self) -> Protocol | None:
        """The rule's (positive) protocol, if it is one the IR knows."""
        if "protocol" not in self.basic:
            return None
        negated, value, _ = self.basic["protocol"]
        protocol = _PROTOCOLS.get(value.value.lower(), "unknown")
        if protocol == "unknown":
            if not value.value or not all(ch.isalnum() or ch in "-_" for ch in value.value):
                self.fail(value, f"-p: expected a protocol name or number, got {value.value!r}")
            return None
        return None if negated else protocol  # type: ignore[return-value]

    def _protocol_match(self, protocol: Protocol | None, modules: list[Match]) -> list[Match]:
        negated, value, _ = self.basic["protocol"]
        known = _PROTOCOLS.get(value.value.lower(), "unknown")
        if known == "unknown":
            return [UnknownMatch(dialect=DIALECT, tokens=(*(("!",) if negated else ()), "-p", quote(value.value)))]
        if known is None:
            if negated:  # "! -p all" never matches
                return [UnknownMatch(dialect=DIALECT, tokens=("!", "-p", "all"))]
            return []
        assert isinstance(known, Protocol)
        if not negated and any(isinstance(m, PortMatch) and m.protocol is known for m in modules):
            return []  # implied by the port match
        return [ProtocolMatch(protocol=known, negate=negated)]

    def _addresses(self, name: str) -> Sequence[Match | None]:
        if name not in self.basic:
            return (None,)
        negated, value, _ = self.basic[name]
        return _checked(self.ctx, value, _address_matches, value.value, name, negated, self.ctx.family.version)

    def _interface(self, name: str) -> InterfaceMatch:
        negated, value, _ = self.basic[name]
        if not value.value or len(value.value) > 15 or any(ch.isspace() or ch in "/" for ch in value.value):
            self.fail(
                value, f"-{_short(name)}: expected an interface name (at most 15 characters), got {value.value!r}"
            )
        direction = Direction.SOURCE if name == "in-interface" else Direction.DESTINATION
        return InterfaceMatch(direction=direction, name=value.value, negate=negated)

    # -- match modules ----------------------------------------------------------

    def _module_matches(self, loaded: _Loaded, protocol: Protocol | None, comment: list[str]) -> list[Match]:
        if loaded.module is None:
            return [UnknownMatch(dialect=DIALECT, tokens=tuple(loaded.raw))]
        module = loaded.module
        if module.protocols and protocol not in module.protocols:
            wanted = " or ".join(f"-p {p.value}" for p in module.protocols)
            self.fail(loaded.at, f"the {module.name} match needs {wanted} (not negated) in the rule")
        given = module.in_order(loaded.given)
        name = module.name
        if name in ("tcp", "udp", "sctp", "icmp", "icmp6"):
            assert protocol is not None
            return [m for m in (self._port_option(loaded, g, protocol) for g in given) if m is not None]
        if name == "multiport":
            assert protocol is not None
            if len(given) != 1:
                self.fail(loaded.at, "multiport: expected exactly one of --sports, --dports, --ports")
            return [self._multiport(loaded, given[0], protocol)]
        if name == "owner":
            return self._owner(loaded, given)
        if name in ("mark", "connmark"):
            if not given:
                self.fail(loaded.at, f"{name}: expected --mark VALUE[/MASK]")
            value, mask = self._mark(given[0].values[0], "--mark")
            node = MarkMatch if name == "mark" else ConnmarkMatch
            return [node(value=value, mask=mask, negate=given[0].negate)]
        if name in ("conntrack", "state"):
            return [self._conntrack(loaded, g) for g in given] if given else self._missing(loaded, "--ctstate")
        if name == "comment":
            if not given:
                self.fail(loaded.at, "comment: expected --comment TEXT")
            comment.append(_checked(self.ctx, given[0].values[0], _comment, given[0].values[0].value))
            return []
        if name == "addrtype":
            return self._addrtype(loaded, given)
        if name == "set":
            return self._ipset(loaded, given)
        if name == "statistic":
            return self._statistic(loaded, given)
        raise AssertionError(f"no reader for match module {name}")  # pragma: no cover

    def _missing(self, loaded: _Loaded, option: str) -> NoReturn:
        self.fail(loaded.at, f"{loaded.name}: expected {option}")

    def _unknown(self, loaded: _Loaded, given: Sequence[_Given]) -> UnknownMatch:
        tokens = ["-m", loaded.name]
        for g in given:
            tokens += _given_tokens(g)
        return UnknownMatch(dialect=DIALECT, tokens=tuple(tokens))

    def _port_option(self, loaded: _Loaded, given: _Given, protocol: Protocol) -> Match | None:
        if given.option.name == "syn":
            # iptables-save prints --syn as the flags it stands for.
            flags = _Given(
                option=_opt("tcp-flags", arity=2),
                negate=given.negate,
                values=[Arg(v, v, given.at.line, given.at.column) for v in ("FIN,SYN,RST,ACK", "SYN")],
                at=given.at,
            )
            return self._unknown(loaded, [flags])
        if not given.option.supported:
            return self._unknown(loaded, [given])
        value = given.values[0]
        ports = self._port_range(value, f"--{given.option.name}")
        if ports is None:
            return self._unknown(loaded, [given])
        if ports is ALL_PORTS and not given.negate:
            return None
        direction = Direction.SOURCE if given.option.name == "sport" else Direction.DESTINATION
        return PortMatch(protocol=protocol, ports=ports, direction=direction, negate=given.negate)

    def _port_range(self, at: Arg, option: str, *, separator: str = ":") -> PortSet | None:
        return _checked(self.ctx, at, _ports, at.value, option, separator)

    def _port_number(self, at: Arg, text: str, option: str) -> int:
        return _checked(self.ctx, at, _port, text, option)

    def _multiport(self, loaded: _Loaded, given: _Given, protocol: Protocol) -> Match:
        if not given.option.supported:
            return self._unknown(loaded, [given])
        members: list[tuple[int, int]] = []
        at = given.values[0]
        for item in at.value.split(","):
            ports = self._port_range(Arg(item, item, at.line, at.column), f"--{given.option.name}")
            if ports is None:
                return self._unknown(loaded, [given])
            members += ports.intervals
        direction = Direction.SOURCE if given.option.name == "sports" else Direction.DESTINATION
        return PortMatch(protocol=protocol, ports=PortSet(tuple(members)), direction=direction, negate=given.negate)

    def _owner(self, loaded: _Loaded, given: list[_Given]) -> list[Match]:
        if not given:
            self.fail(loaded.at, "owner: expected --uid-owner, --gid-owner or --socket-exists")
        if any(not g.option.supported for g in given):
            return [self._unknown(loaded, given)]
        socket = next((g for g in given if g.option.name == "socket-exists"), None)
        ids = [g for g in given if g.option.name != "socket-exists"]
        matches: list[Match] = []
        if socket is not None and socket.negate:
            # "! --socket-exists": only packets without a socket (and then every other option must be negated).
            matches.append(OwnerMatch(kind=OwnerKind.UID, ids=ALL_IDS, negate=True))
        elif socket is not None and not any(not g.negate for g in ids) and not ids:
            matches.append(OwnerMatch(kind=OwnerKind.UID, ids=ALL_IDS))
        needs_socket = socket is not None and not socket.negate
        for g in ids:
            kind = OwnerKind.UID if g.option.name == "uid-owner" else OwnerKind.GID
            id_set = self._ids(g.values[0], kind)
            if id_set is None:
                return [self._unknown(loaded, given)]
            if g.negate:
                matches.append(OwnerMatch(kind=kind, ids=id_set, negate=True, socketless=not needs_socket))
            else:
                matches.append(OwnerMatch(kind=kind, ids=id_set))
        return matches

    def _ids(self, at: Arg, kind: OwnerKind) -> IdSet | None:
        """``ID``, ``LOW-HIGH`` or a name (looked up in the given table; None when it is not there)."""
        text = at.value
        names = self.ctx.users if kind is OwnerKind.UID else self.ctx.groups
        option = f"--{kind.value}-owner"
        if text in names:
            return IdSet.of(names[text])
        low_text, sep, high_text = text.partition("-")
        if low_text.isdigit() and (not sep or high_text.isdigit()):
            low = int(low_text)
            high = int(high_text) if sep else low
            if high > MAX_ID or low > high:
                self.fail(at, f"{option}: expected an id or a range LOW-HIGH within 0-{MAX_ID}, got {text!r}")
            return IdSet.of((low, high))
        if text and not text[0].isdigit() and all(ch.isalnum() or ch in "-_.$" for ch in text):
            return None  # a user or group name nobody told us the number of
        self.fail(at, f"{option}: expected an id, a range LOW-HIGH or a name, got {text!r}")

    def _mark(self, at: Arg, option: str) -> tuple[int, int]:
        return _checked(self.ctx, at, _mark, at.value, option)

    def _conntrack(self, loaded: _Loaded, given: _Given) -> Match:
        if not given.option.supported:
            return self._unknown(loaded, [given])
        at = given.values[0]
        states: set[CtState] = set()
        allowed = _PLAIN_STATES if given.option.name == "state" else frozenset(CtState)
        for item in at.value.split(","):
            state = _STATES.get(item.upper())
            if state is None or state not in allowed:
                names = ", ".join(s.value for s in CtState if s in allowed)
                self.fail(at, f"--{given.option.name}: expected states from {names}, got {item!r}")
            states.add(state)
        return CtStateMatch(states=states, negate=given.negate)

    def _addrtype(self, loaded: _Loaded, given: list[_Given]) -> list[Match]:
        sides = [g for g in given if g.option.name in ("src-type", "dst-type")]
        limits = {g.option.name for g in given} - {"src-type", "dst-type"}
        if not sides:
            self.fail(loaded.at, "addrtype: expected --src-type or --dst-type")
        if len(limits) > 1:
            self.fail(loaded.at, "addrtype: expected at most one of --limit-iface-in and --limit-iface-out")
        matches: list[Match] = []
        for g in sides:
            direction = Direction.SOURCE if g.option.name == "src-type" else Direction.DESTINATION
            types = set()
            for item in g.values[0].value.split(","):
                kind = _ADDRTYPES.get(item.upper())
                if kind is None:
                    self.fail(g.values[0], f"--{g.option.name}: expected address types such as LOCAL, got {item!r}")
                types.add(kind)
            limit = bool(limits)
            # The IR ties the interface limit to the side it is printed with (in: source, out: destination).
            fitting = "limit-iface-in" if direction is Direction.SOURCE else "limit-iface-out"
            if limit and (limits != {fitting} or len(sides) > 1):
                return [self._unknown(loaded, given)]
            matches.append(AddrTypeMatch(direction=direction, types=types, negate=g.negate, limit_interface=limit))
        return matches

    def _ipset(self, loaded: _Loaded, given: list[_Given]) -> list[Match]:
        sets = [g for g in given if g.option.name == "match-set"]
        if not sets:
            self.fail(loaded.at, "set: expected --match-set NAME FLAGS")
        if any(not g.option.supported for g in given):
            return [self._unknown(loaded, given)]
        g = sets[0]
        name, flags_arg = g.values
        flags = []
        for item in flags_arg.value.split(","):
            if item not in ("src", "dst"):
                self.fail(flags_arg, f"--match-set: expected flags such as src or src,dst, got {flags_arg.value!r}")
            flags.append(Direction.SOURCE if item == "src" else Direction.DESTINATION)
        return [IpSetMatch(name=name.value, flags=tuple(flags), negate=g.negate)]

    def _statistic(self, loaded: _Loaded, given: list[_Given]) -> list[Match]:
        options = {g.option.name: g for g in given}
        mode = options.get("mode")
        if mode is None:
            self.fail(loaded.at, "statistic: expected --mode random or --mode nth")
        if mode.values[0].value == "random":
            probability = options.get("probability")
            if probability is None or "every" in options or "packet" in options:
                self.fail(loaded.at, "statistic --mode random: expected --probability P and no --every/--packet")
            try:
                p = float(probability.values[0].value)
            except ValueError:
                p = -1.0
            if not 0.0 <= p <= 1.0:
                self.fail(
                    probability.values[0], f"--probability: expected a number 0-1, got {probability.values[0].value!r}"
                )
            # The kernel keeps round(p * 2^31); iptables-save prints that back with 11 decimals.
            stored = round(p * STATISTIC_SCALE) / STATISTIC_SCALE
            return [StatisticMatch(probability=float(f"{stored:.11f}"), negate=probability.negate)]
        if mode.values[0].value == "nth":
            every = options.get("every")
            if every is None or "probability" in options:
                self.fail(loaded.at, "statistic --mode nth: expected --every N and no --probability")
            n = _c_number(every.values[0].value)
            packet = options.get("packet")
            if packet is None:
                self.fail(every.at, "statistic --mode nth: --every also needs --packet P")
            k = _c_number(packet.values[0].value)
            if n is None or not 1 <= n <= MAX_MARK:
                self.fail(every.values[0], f"--every: expected a number 1-{MAX_MARK}, got {every.values[0].value!r}")
            if k is None or k >= n:
                assert packet is not None
                self.fail(packet.values[0], f"--packet: expected a number 0-{n - 1}, got {packet.values[0].value!r}")
            return [StatisticMatch(every=n, packet=k, negate=every.negate)]
        self.fail(mode.values[0], f"--mode: expected random or nth, got {mode.values[0].value!r}")

    # -- targets ------------------------------------------------------------------

    def _target(self) -> Target:
        if self.chain_target is not None:
            name, _, goto = self.chain_target
            if name in _VERDICTS:
                return _VERDICTS[name]
            return Goto(chain=name) if goto else Jump(chain=name)
        loaded = self.target
        if loaded is None:
            return Continue()
        if loaded.module is None:
            return UnknownTarget(dialect=DIALECT, name=loaded.name, tokens=tuple(loaded.raw))
        given = loaded.module.in_order(loaded.given)
        if any(not g.option.supported for g in given):
            return self._unknown_target(loaded, given)
        options = {g.option.name: g for g in given}
        handler: Callable[[_Loaded, dict[str, _Given]], Target] = getattr(self, "_target_" + loaded.name.lower())
        return handler(loaded, options)

    def _unknown_target(self, loaded: _Loaded, given: Sequence[_Given]) -> UnknownTarget:
        tokens: list[str] = []
        for g in given:
            tokens += _given_tokens(g)
        return UnknownTarget(dialect=DIALECT, name=loaded.name, tokens=tuple(tokens))

    def _require(self, loaded: _Loaded, options: dict[str, _Given], name: str) -> _Given:
        if name not in options:
            self.fail(loaded.at, f"{loaded.name}: expected --{name}")
        return options[name]

    def _nat_ports(self, given: _Given | None) -> PortSet | None:
        if given is None:
            return None
        at = given.values[0]
        ports = self._port_range(at, "--" + given.option.name, separator="-")
        if ports is None:
            self.fail(at, f"--{given.option.name}: expected a port or a range LOW-HIGH, got {at.value!r}")
        return ports

    def _target_redirect(self, loaded: _Loaded, options: dict[str, _Given]) -> Target:
        return Redirect(ports=self._nat_ports(options.get("to-ports")), flags=_nat_flags(options))

    def _target_masquerade(self, loaded: _Loaded, options: dict[str, _Given]) -> Target:
        return Masquerade(ports=self._nat_ports(options.get("to-ports")), flags=_nat_flags(options))

    def _target_snat(self, loaded: _Loaded, options: dict[str, _Given]) -> Target:
        addresses, ports = self._nat_to(self._require(loaded, options, "to-source"))
        return Snat(addresses=addresses, ports=ports, flags=_nat_flags(options))

    def _target_dnat(self, loaded: _Loaded, options: dict[str, _Given]) -> Target:
        addresses, ports = self._nat_to(self._require(loaded, options, "to-destination"))
        return Dnat(addresses=addresses, ports=ports, flags=_nat_flags(options))

    def _nat_to(self, given: _Given) -> tuple[AddressRange | None, PortSet | None]:
        at = given.values[0]
        return _checked(self.ctx, at, _nat_to, at.value, f"--{given.option.name}", self.ctx.family.version)

    def _target_tproxy(self, loaded: _Loaded, options: dict[str, _Given]) -> Target:
        port_arg = self._require(loaded, options, "on-port").values[0]
        port = self._port_number(port_arg, port_arg.value, "--on-port")
        address = None
        if "on-ip" in options:
            at = options["on-ip"].values[0]
            parsed = _address(at.value)
            if parsed is None or parsed.version != self.ctx.family.version:
                self.fail(at, f"--on-ip: expected an IPv{self.ctx.family.version} address, got {at.value!r}")
            address = None if parsed.is_unspecified else parsed  # 0.0.0.0 / :: mean "the address it came to"
        mark, mask = None, FULL_MASK
        if "tproxy-mark" in options:
            value, mask_value = self._mark(options["tproxy-mark"].values[0], "--tproxy-mark")
            if value or mask_value:
                mark, mask = value, mask_value
        return TProxy(port=port, address=address, mark=mark, mask=mask)

    def _mark_op(self, loaded: _Loaded, options: dict[str, _Given]) -> tuple[int, int] | None:
        """The xmark form (value, mask) of MARK/CONNMARK's --set-xmark, --set-mark, --and/or/xor-mark."""
        ops = [name for name in ("set-xmark", "set-mark", "and-mark", "or-mark", "xor-mark") if name in options]
        if len(ops) > 1:
            self.fail(options[ops[1]].at, f"{loaded.name}: expected one mark operation, got --{ops[0]} and --{ops[1]}")
        if not ops:
            return None
        op = ops[0]
        value, mask = self._mark(options[op].values[0], f"--{op}")
        if op in ("and-mark", "or-mark", "xor-mark") and "/" in options[op].values[0].value:
            self.fail(
                options[op].values[0], f"--{op}: expected a value without a mask, got {options[op].values[0].value!r}"
            )
        if op == "set-mark":
            return value, (mask | value) & MAX_MARK
        if op == "and-mark":
            return 0, ~value & MAX_MARK
        if op == "or-mark":
            return value, value
        if op == "xor-mark":
            return value, 0
        return value, mask

    def _target_mark(self, loaded: _Loaded, options: dict[str, _Given]) -> Target:
        op = self._mark_op(loaded, options)
        if op is None:
            self.fail(loaded.at, "MARK: expected --set-xmark, --set-mark, --and-mark, --or-mark or --xor-mark")
        return SetMark(value=op[0], mask=op[1])

    def _target_connmark(self, loaded: _Loaded, options: dict[str, _Given]) -> Target:
        op = self._mark_op(loaded, options)
        modes = [name for name in ("save-mark", "restore-mark") if name in options]
        if (op is not None) + len(modes) != 1:
            self.fail(loaded.at, "CONNMARK: expected exactly one of --set-xmark (and the other mark operations), "
                      "--save-mark, --restore-mark")  # fmt: skip
        if op is not None:
            if {"mask", "nfmask", "ctmask"} & options.keys():
                self.fail(loaded.at, "CONNMARK: --mask, --nfmask and --ctmask go with --save-mark or --restore-mark")
            return ConnmarkSet(value=op[0], mask=op[1])
        masks = {}
        for name in ("mask", "nfmask", "ctmask"):
            if name in options:
                masks[name] = self._mark(options[name].values[0], f"--{name}")[0]
        nfmask = masks.get("nfmask", masks.get("mask", FULL_MASK))
        ctmask = masks.get("ctmask", masks.get("mask", FULL_MASK))
        if modes[0] == "save-mark":
            return ConnmarkSave(nfmask=nfmask, ctmask=ctmask)
        return ConnmarkRestore(nfmask=nfmask, ctmask=ctmask)

    def _target_ct(self, loaded: _Loaded, options: dict[str, _Given]) -> Target:
        if not options:
            return CtZone(zone=0)  # a template with nothing set: zone 0 (iptables-save prints --zone 0 so)
        if "zone" not in options:
            return self._unknown_target(loaded, list(options.values()))
        at = options["zone"].values[0]
        if not at.value.isdigit() or int(at.value) > 0xFFFF:
            return self._unknown_target(loaded, list(options.values()))  # "mark" or a direction-specific zone
        return CtZone(zone=int(at.value))

    def _target_reject(self, loaded: _Loaded, options: dict[str, _Given]) -> Target:
        if "reject-with" not in options:
            return Reject()
        at = options["reject-with"].values[0]
        wanted = at.value.lower()
        for name, alias in _REJECT_WITH[self.ctx.family]:
            if wanted and (name.startswith(wanted) or alias.startswith(wanted)):
                return Reject(with_=None if name == _DEFAULT_REJECT[self.ctx.family] else name)
        names = ", ".join(name for name, _ in _REJECT_WITH[self.ctx.family])
        self.fail(at, f"--reject-with: expected one of {names}, got {at.value!r}")

    def _target_log(self, loaded: _Loaded, options: dict[str, _Given]) -> Target:
        level = DEFAULT_LOG_LEVEL
        if "log-level" in options:
            at = options["log-level"].values[0]
            text = at.value.lower()
            if text.isdigit() and int(text) <= 7:
                level = int(text)
            elif text in _LOG_LEVELS:
                level = _LOG_LEVELS[text]
            else:
                self.fail(at, f"--log-level: expected a level 0-7 or a name such as info, got {at.value!r}")
        prefix = None
        if "log-prefix" in options:
            prefix = options["log-prefix"].values[0].value
            if len(prefix) > MAX_LOG_PREFIX:
                self.fail(
                    options["log-prefix"].values[0],
                    f"--log-prefix: expected at most {MAX_LOG_PREFIX} characters, got {len(prefix)}",
                )
        return Log(prefix=prefix, level=level)


# ----------------------------------------------------------------------------- helpers


def _checked(ctx: SpecContext, at: Arg, parse: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
    """``parse(*args, **kwargs)`` (a value parser, cached), failing at ``at`` where the value is invalid."""
    try:
        return parse(*args, **kwargs)
    except _Invalid as invalid:
        raise ctx.error(at.line, at.column, str(invalid)) from None


@functools.lru_cache(maxsize=_CACHED)
def _option_word(value: str) -> tuple[str, str | None, bool] | None:
    """(name, attached value, is long) of ``--name``, ``--name=value`` or ``-x`` (iptables takes no ``-xVALUE``);
    None for a word that is no option."""
    if not (
        len(value) >= 2
        and value[0] == "-"
        and (value[1].isalpha() or value[1] in "46" or (value[1] == "-" and len(value) > 2))
    ):
        return None
    if value.startswith("--"):
        name, eq, attached = value[2:].partition("=")
        return name, attached if eq else None, True
    return value[1:], None, False


def _short(canonical: str) -> str:
    return next(short for name, short, *_ in _BASIC if name == canonical)


def _values(arity: int) -> str:
    return "a value" if arity == 1 else f"{arity} values"


def _unknown_option_message(text: str, loaded: list[_Loaded]) -> str:
    modules = [item.name for item in loaded if item.module is not None]
    context = f" (loaded: {', '.join(modules)})" if modules else ""
    return f"unknown option {text!r}{context}; expected a basic option or one of a loaded -m match or -j target"


def _given_tokens(given: _Given) -> list[str]:
    return [*(["!"] if given.negate else []), f"--{given.option.name}", *(quote(v.value) for v in given.values)]


def _nat_flags(options: dict[str, _Given]) -> frozenset[NatFlag]:
    """The port-selection flags given to a NAT target (each target's module lists those it takes)."""
    return frozenset(flag for name, flag in _NAT_FLAGS if name in options)


def _comment(text: str) -> str:
    if len(text) > MAX_COMMENT:
        raise _Invalid(f"--comment: expected at most {MAX_COMMENT} characters, got {len(text)}")
    return text


@functools.lru_cache(maxsize=_CACHED)
def _address_matches(text: str, name: str, negated: bool, version: int) -> tuple[Match | None, ...]:
    """The matches of ``-s``/``-d`` (``name`` source or destination) ``text``: one per address listed (None
    for every address)."""
    items = text.split(",")
    if negated and len(items) > 1:
        raise _Invalid(f"-{_short(name)}: expected one address after '!', got a list of {len(items)}")
    return tuple(_address_match(item, name, negated, version) for item in items)


@functools.lru_cache(maxsize=_CACHED)
def _address_match(item: str, name: str, negated: bool, version: int) -> Match | None:
    """One address of ``-s``/``-d`` (``name`` source or destination) as a match; None for every address."""
    option = f"-{_short(name)}"
    network = _network(item, version, option)
    if network is None:
        return UnknownMatch(dialect=DIALECT, tokens=(*(("!",) if negated else ()), option, quote(item)))
    if network == _ALL_ADDRESSES[network.version] and not negated:
        return None  # 0.0.0.0/0 matches every packet; iptables-save prints nothing
    direction = Direction.SOURCE if name == "source" else Direction.DESTINATION
    return AddressMatch(direction=direction, addresses=AddressSet((network,)), negate=negated)


def _network(text: str, version: int, option: str) -> IPNetwork | None:
    """``ADDRESS[/PREFIX|/MASK]`` of one IP version; None for a mask that is not a prefix."""
    what = "an IPv4" if version == 4 else "an IPv6"
    address_text, slash, mask_text = text.partition("/")
    address = _address(address_text)
    if address is None or address.version != version:
        names = " (host names are not resolved)" if address is None else ""
        raise _Invalid(f"{option}: expected {what} address or network{names}, got {text!r}")
    bits = 32 if version == 4 else 128
    if not slash:
        prefix = bits
    elif mask_text.isdigit():
        prefix = int(mask_text)
        if prefix > bits:
            raise _Invalid(f"{option}: expected a prefix length 0-{bits}, got {mask_text!r}")
    else:
        mask = _address(mask_text)
        if mask is None or mask.version != version:
            raise _Invalid(f"{option}: expected a prefix length or {what} netmask, got {mask_text!r}")
        value = int(mask)
        inverse = (1 << bits) - 1 - value
        if inverse & (inverse + 1):
            return None  # a netmask with holes: iptables takes it, the IR does not model it
        prefix = bits - inverse.bit_length()
    if isinstance(address, ipaddress.IPv4Address):  # from the number: the same network, without parsing again
        return ipaddress.IPv4Network((int(address), prefix), strict=False)
    return ipaddress.ip_network(f"{address}/{prefix}", strict=False)


@functools.lru_cache(maxsize=_CACHED)
def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


@functools.lru_cache(maxsize=_CACHED)
def _ports(text: str, option: str, separator: str) -> PortSet | None:
    """``PORT`` or ``LOW:HIGH`` (either side may be left out); None where the IR has no form
    (port 0 alone, or a service name, which iptables would look up)."""
    low_text, sep, high_text = text.partition(separator)
    if not sep:
        if text.isdigit():
            port = _port(text, option)
            return None if port == 0 else PortSet.of(port)
        if text and all(ch.isalnum() or ch in "-_" for ch in text) and not text[0].isdigit():
            return None  # a service name from /etc/services: not resolved here
        raise _Invalid(f"{option}: expected a port or a range LOW{separator}HIGH, got {text!r}")
    low = _port(low_text, option) if low_text else 0
    high = _port(high_text, option) if high_text else MAX_PORT
    if low > high:
        raise _Invalid(f"{option}: expected a range with LOW <= HIGH, got {text!r}")
    if high == 0:
        return None
    if low == 0 and high == MAX_PORT and separator == ":":
        return ALL_PORTS  # the kernel stores 0:65535 as "any port" (and iptables-save prints nothing)
    # Port 0 is never a connection's port: a range from 0 means the same from 1.
    return PortSet.of((max(low, 1), high))


@functools.lru_cache(maxsize=_CACHED)
def _port_match(protocol: Protocol, port: str, option: str, direction: Direction, negate: bool) -> PortMatch:
    """The match of ``option`` (``--dport``...) with one port 1-65535 in digits, the only ports a plan puts in
    (so no error, and one match a port: rules share it, as they share any IR node)."""
    ports = _ports(port, option, ":")
    assert ports is not None
    return PortMatch(protocol=protocol, ports=ports, direction=direction, negate=negate)


def _port(text: str, option: str) -> int:
    if not text.isdigit() or int(text) > MAX_PORT:
        raise _Invalid(f"{option}: expected a port number 0-{MAX_PORT}, got {text!r}")
    return int(text)


@functools.lru_cache(maxsize=_CACHED)
def _nat_to(text: str, option: str, version: int) -> tuple[AddressRange | None, PortSet | None]:
    """``[ADDR[-ADDR]][:PORT[-PORT]]``; IPv6 writes the addresses in brackets when ports follow."""
    if version == 6:
        if text.startswith("["):
            addresses_text, bracket, rest = text[1:].partition("]")
            if not bracket or (rest and not rest.startswith(":")):
                raise _Invalid(f"{option}: expected [ADDRESS]:PORT, got {text!r}")
            ports_text = rest[1:] if rest else None
        elif text.startswith(":") and text.count(":") == 1:
            addresses_text, ports_text = "", text[1:]  # ports only: ip6tables prints no brackets then
        else:
            addresses_text, ports_text = text, None
    else:
        addresses_text, colon, rest = text.partition(":")
        ports_text = rest if colon else None
    addresses = None
    if addresses_text:
        first_text, dash, last_text = addresses_text.partition("-")
        first = _address(first_text)
        last = _address(last_text) if dash else first
        if (
            first is None
            or last is None
            or first.version != version
            or last.version != version
            or int(last) < int(first)
        ):
            what = "IPv4" if version == 4 else "IPv6"
            raise _Invalid(f"{option}: expected an {what} address or range FIRST-LAST, got {addresses_text!r}")
        addresses = AddressRange(first=first, last=last)
    ports = None
    if ports_text is not None:
        ports = _ports(ports_text, option, "-")
        if ports is None:
            raise _Invalid(f"{option}: expected a port or a range LOW-HIGH after ':', got {ports_text!r}")
    if addresses is None and ports is None:
        raise _Invalid(f"{option}: expected an address, a port or both, got {text!r}")
    return addresses, ports


@functools.lru_cache(maxsize=_CACHED)
def _mark(text: str, option: str) -> tuple[int, int]:
    """``VALUE[/MASK]`` as the C library reads numbers (0x hex, leading 0 octal); mask defaults to all ones."""
    value_text, slash, mask_text = text.partition("/")
    value = _c_number(value_text)
    mask = _c_number(mask_text) if slash else MAX_MARK
    if value is None or mask is None or value > MAX_MARK or mask > MAX_MARK:
        raise _Invalid(f"{option}: expected VALUE[/MASK] with 32-bit numbers, got {text!r}")
    return value, mask


def _c_number(text: str) -> int | None:
    """A non-negative number as ``strtoul(text, NULL, 0)`` reads it (whole text only)."""
    try:
        if text[:2].lower() == "0x" and len(text) > 2:
            return int(text[2:], 16)
        if text.startswith("0") and len(text) > 1:
            return int(text[1:], 8)
        if text.isdigit():
            return int(text)
    except ValueError:
        return None
    return None


def _merge_owners(matches: list[Match]) -> list[Match]:
    """Adjacent negated owner matches of one kind mean "in none of these ids": one match over their union."""
    out: list[Match] = []
    for match in matches:
        last = out[-1] if out else None
        if (
            isinstance(match, OwnerMatch)
            and isinstance(last, OwnerMatch)
            and match.negate
            and last.negate
            and match.kind is last.kind
            and match.socketless == last.socketless
            and ALL_IDS not in (match.ids, last.ids)
        ):
            out[-1] = attrs.evolve(last, ids=last.ids.union(match.ids))
        else:
            out.append(match)
    return out


# ----------------------------------------------------------------------------- rules of one shape
#
# A node's rules come in few shapes: kube-proxy writes thousands of rules that differ only in addresses, ports,
# comments and chain names. Parsing the options of each costs more than the rest of reading it, so the first rule
# of each shape is parsed, and the others are read from its plan: its parts, with their own values put in.


class _Parts(NamedTuple):
    """What one rule specification makes, before it becomes rules."""

    sources: Sequence[Match | None]  # one per address of -s (None: any)
    destinations: Sequence[Match | None]
    others: tuple[Match, ...]  # the matches after the addresses
    target: Target
    comment: str | None

    def rules(self, position: SourcePosition | None) -> list[Rule]:
        return _rules(
            self.sources, self.destinations, self.others, target=self.target, comment=self.comment, position=position
        )


def _rules(
    sources: Sequence[Match | None],
    destinations: Sequence[Match | None],
    others: tuple[Match, ...],
    *,
    target: Target,
    comment: str | None,
    position: SourcePosition | None,
) -> list[Rule]:
    """One rule per source and destination address (as iptables adds a list of addresses)."""
    rules = []
    for source, destination in itertools.product(sources, destinations):
        if source is None:
            matches = others if destination is None else (destination, *others)
        else:
            matches = (source, *others) if destination is None else (source, destination, *others)
        rules.append(Rule(matches=matches, target=target, comment=comment, position=position))
    return rules


class _AddressSlot(NamedTuple):
    at: int  # the argument holding the addresses
    negated: bool


class _PortSlot(NamedTuple):
    place: int  # the match's place in the parts' other matches
    at: int  # the argument holding the port
    option: str
    made: PortMatch  # the match the first rule of the shape had there


class _ChainSlot(NamedTuple):
    at: int  # the argument naming the chain
    kind: type[Jump] | type[Goto]


class _NatSlot(NamedTuple):
    at: int  # the argument of --to-destination or --to-source
    option: str
    made: Dnat | Snat


@attrs.frozen
class _Plan:
    """How to read a rule of one shape: the parts of the first one read, where its values come from the rule's
    own arguments. Errors come in the order the full parse makes them: comments, the target, then addresses."""

    parts: _Parts
    sources: _AddressSlot | None
    destinations: _AddressSlot | None
    #: The comment texts in order, a number for an argument holding one; None: the parts' comment.
    comments: tuple[str | int, ...] | None
    ports: tuple[_PortSlot, ...]
    target: _ChainSlot | _NatSlot | None

    def rules(self, args: Sequence[Arg], ctx: SpecContext, position: SourcePosition | None) -> list[Rule]:
        """The rules of a rule specification of this shape, from its ``args`` (as :meth:`_Parts.rules`)."""
        parts = self.parts
        comment = parts.comment
        if self.comments is not None:
            texts = []
            for part in self.comments:
                if isinstance(part, int):
                    part = _checked(ctx, args[part], _comment, args[part].value)
                texts.append(part)
            comment = " ".join(texts) or None
        others = parts.others
        if self.ports:
            changed = list(others)
            for slot in self.ports:
                made = slot.made
                changed[slot.place] = _port_match(
                    made.protocol, args[slot.at].value, slot.option, made.direction, made.negate
                )
            others = tuple(changed)
        target = parts.target
        if isinstance(self.target, _ChainSlot):
            target = self.target.kind(chain=args[self.target.at].value)
        elif self.target is not None:
            at, nat = args[self.target.at], self.target.made
            addresses, nat_ports = _checked(ctx, at, _nat_to, at.value, self.target.option, ctx.family.version)
            target = type(nat)(addresses=addresses, ports=nat_ports, flags=nat.flags)
        sources, destinations = parts.sources, parts.destinations
        version = ctx.family.version
        if self.sources is not None:
            at = args[self.sources.at]
            sources = _checked(ctx, at, _address_matches, at.value, "source", self.sources.negated, version)
        if self.destinations is not None:
            at = args[self.destinations.at]
            destinations = _checked(
                ctx, at, _address_matches, at.value, "destination", self.destinations.negated, version
            )
        return _rules(sources, destinations, others, target=target, comment=comment, position=position)


#: The options whose values rules of one shape differ in (exactly as iptables-save prints them).
_OPENERS: Final = {
    **dict.fromkeys(("-s", "--source", "--src", "-d", "--destination", "--dst"), _Hole.ADDRESS),
    "--comment": _Hole.COMMENT,
    **dict.fromkeys(("--sport", "--source-port", "--dport", "--destination-port"), _Hole.PORT),
    **dict.fromkeys(("-j", "--jump", "-g", "--goto"), _Hole.CHAIN),
    **dict.fromkeys(("--to-destination", "--to-source"), _Hole.NAT),
}

_VALUE: Final = operator.itemgetter(0)  # an Arg's value (a named tuple's field, at C speed)

#: Whether parse_rule reads rules of a shape seen before from its plan (tests turn it off to compare).
_shape_plans = True


def _shape(args: Sequence[Arg], is_chain: Callable[[str], bool]) -> _Shape:
    """The arguments' values, each value after an option of :data:`_OPENERS` replaced by its kind (a hole) where
    the plan makes of every such value what the full parse makes of it: any address, comment or NAT destination,
    a port 1-65535 in digits, the name of a user chain at the time (never a built-in chain's name, a verdict or
    a target; chains come and go); never ``!``, and no value after a hole. Which holes are really those options'
    values (not, say, values of other options) only the parse knows: :meth:`_Rule.plan` checks. (This runs for
    every rule: the loop goes over the places after openers only, and the checks are written out.)"""
    values: list[str] = list(map(_VALUE, args))
    shape: list[str | _Hole] = list(values)
    hole = -1  # the last hole's place
    for index in itertools.compress(range(1, len(values)), map(_OPENERS.get, values)):
        value = values[index]
        if hole == index - 1 or value == "!":
            continue
        kind = _OPENERS[values[index - 1]]
        if kind is _Hole.PORT:
            if not (value.isascii() and value.isdigit() and len(value) <= 5 and 0 < int(value) <= MAX_PORT):
                continue
        elif kind is _Hole.CHAIN and not is_chain(value):
            continue
        shape[index] = kind
        hole = index
    return tuple(shape)


def parse_rule(args: Sequence[Arg], ctx: SpecContext, position: SourcePosition | None = None) -> list[Rule]:
    """The IR rules one rule specification stands for: usually one; one per address where ``-s``/``-d``
    list several (as iptables adds them); none where ``-4``/``-6`` excludes the table's family. Each rule
    has the ``position`` given.

    A rule whose shape (:func:`_shape`) was seen before in ``ctx`` is read from that shape's plan, when the
    first rule of the shape left one (see :meth:`_Rule.plan`)."""
    shape = _shape(args, ctx.is_chain) if _shape_plans else None
    plan = ctx.plans.get(shape) if shape is not None else None
    if plan is not None:
        return plan.rules(args, ctx, position)
    rule = _Rule(args, ctx)
    parts = rule.parts()
    if shape is not None and shape not in ctx.plans:
        ctx.plans[shape] = None if parts is None else rule.plan(shape, parts)
    return [] if parts is None else parts.rules(position)
