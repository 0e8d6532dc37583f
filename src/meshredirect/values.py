"""Value types shared by the policy and the IR: port, id and address sets.

Sets are normalised on construction (sorted, overlapping and adjacent members
merged), so two sets are equal exactly when they contain the same values, and
the members of a set never overlap: a packet matches at most one member.

>>> PortSet.of(80, 443, (8000, 8080), 8081)
PortSet('80,443,8000-8081')
>>> 8050 in PortSet.of((8000, 8080))
True
>>> AddressSet.of("10.0.0.0/8", "10.1.0.0/16", "192.168.0.1")
AddressSet('10.0.0.0/8,192.168.0.1/32')
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator
from typing import ClassVar, Final, Self, TypeAlias

import attrs

from meshredirect.errors import PolicyError

__all__ = [
    "ALL",
    "MAX_ID",
    "MAX_MARK",
    "MAX_PORT",
    "AddressSet",
    "All",
    "IPAddress",
    "IPNetwork",
    "IdSet",
    "IntervalSet",
    "PortSet",
    "network_of",
]

IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_PORT: Final = 65535
#: uid_t/gid_t are 32 bits; (uid_t)-1 means "no change" to the kernel and is never a real id.
MAX_ID: Final = 2**32 - 2
MAX_MARK: Final = 2**32 - 1


@attrs.frozen(repr=False)
class All:
    """The wildcard ``*``: every port or every address."""

    def __repr__(self) -> str:
        return "ALL"

    def __str__(self) -> str:
        return "*"


#: The wildcard value of include fields.
ALL: Final = All()

Interval: TypeAlias = tuple[int, int]


def _normalise(intervals: Iterable[Interval]) -> tuple[Interval, ...]:
    merged: list[list[int]] = []
    for lo, hi in sorted(intervals):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return tuple((lo, hi) for lo, hi in merged)


@attrs.frozen(repr=False)
class IntervalSet:
    """A set of integers kept as sorted, disjoint, non-adjacent closed intervals."""

    LOW: ClassVar[int] = 0
    HIGH: ClassVar[int] = MAX_ID
    WHAT: ClassVar[str] = "an integer"

    intervals: tuple[Interval, ...] = attrs.field(converter=_normalise)

    @intervals.validator
    def _check(self, _attribute: object, value: tuple[Interval, ...]) -> None:
        for lo, hi in value:
            if not (self.LOW <= lo <= hi <= self.HIGH):
                raise ValueError(f"interval {lo}-{hi} outside {self.LOW}-{self.HIGH}")

    @classmethod
    def of(cls, *members: int | Interval) -> Self:
        """Build a set from single values and ``(low, high)`` pairs (inclusive)."""
        intervals: list[Interval] = []
        for member in members:
            if isinstance(member, tuple):
                intervals.append((int(member[0]), int(member[1])))
            else:
                intervals.append((int(member), int(member)))
        return cls(tuple(intervals))

    @classmethod
    def parse(cls, text: str, *, field: str) -> Self:
        """Parse ``"80,443,8000-8080"`` (``:`` also accepted for ranges; empty items ignored).

        Errors name the field, what was expected and what was given.
        """
        intervals: list[Interval] = []
        for raw in text.split(","):
            item = raw.strip()
            if not item:
                continue
            sep = "-" if "-" in item else (":" if ":" in item else None)
            if sep is None:
                value = cls._parse_one(item, field=field, whole=text)
                intervals.append((value, value))
                continue
            lo_text, _, hi_text = (part.strip() for part in item.partition(sep))
            if not lo_text or not hi_text:
                raise PolicyError(field, expected=f"{cls.WHAT} {cls.LOW}-{cls.HIGH} or a range low-high", got=item)
            lo = cls._parse_one(lo_text, field=field, whole=text)
            hi = cls._parse_one(hi_text, field=field, whole=text)
            if lo > hi:
                raise PolicyError(field, expected="a range low-high with low <= high", got=item)
            intervals.append((lo, hi))
        return cls(tuple(intervals))

    @classmethod
    def _parse_one(cls, item: str, *, field: str, whole: str) -> int:
        if not item.isdigit():
            raise PolicyError(field, expected=f"{cls.WHAT} {cls.LOW}-{cls.HIGH}", got=item)
        value = int(item)
        if not cls.LOW <= value <= cls.HIGH:
            raise PolicyError(field, expected=f"{cls.WHAT} {cls.LOW}-{cls.HIGH}", got=item)
        return value

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, int):
            return False
        return any(lo <= value <= hi for lo, hi in self.intervals)

    def __iter__(self) -> Iterator[int]:
        for lo, hi in self.intervals:
            yield from range(lo, hi + 1)

    def __bool__(self) -> bool:
        return bool(self.intervals)

    def __len__(self) -> int:
        return sum(hi - lo + 1 for lo, hi in self.intervals)

    def union(self, other: IntervalSet) -> Self:
        return type(self)(self.intervals + other.intervals)

    def intersects(self, other: IntervalSet) -> bool:
        return any(lo <= ohi and olo <= hi for lo, hi in self.intervals for olo, ohi in other.intervals)

    def difference(self, other: IntervalSet) -> Self:
        result: list[Interval] = []
        for lo, hi in self.intervals:
            pieces = [(lo, hi)]
            for olo, ohi in other.intervals:
                nxt: list[Interval] = []
                for plo, phi in pieces:
                    if ohi < plo or olo > phi:
                        nxt.append((plo, phi))
                        continue
                    if plo < olo:
                        nxt.append((plo, olo - 1))
                    if ohi < phi:
                        nxt.append((ohi + 1, phi))
                pieces = nxt
            result.extend(pieces)
        return type(self)(tuple(result))

    def is_single(self) -> bool:
        """True when the set is one value or one contiguous range."""
        return len(self.intervals) == 1

    def __str__(self) -> str:
        return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in self.intervals)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})"


@attrs.frozen(repr=False)
class PortSet(IntervalSet):
    """TCP/UDP ports 1-65535."""

    LOW: ClassVar[int] = 1
    HIGH: ClassVar[int] = MAX_PORT
    WHAT: ClassVar[str] = "a port number"


@attrs.frozen(repr=False)
class IdSet(IntervalSet):
    """User or group ids."""

    LOW: ClassVar[int] = 0
    HIGH: ClassVar[int] = MAX_ID
    WHAT: ClassVar[str] = "a numeric id"


def network_of(value: str | IPNetwork | IPAddress, *, field: str = "address") -> IPNetwork:
    """Parse an address or CIDR; host bits are cleared as the kernel does.

    >>> network_of("10.1.2.3/8")
    IPv4Network('10.0.0.0/8')
    >>> network_of("nonsense", field="outbound_cidrs_exclude")
    Traceback (most recent call last):
    ...
    meshredirect.errors.PolicyError: outbound_cidrs_exclude: expected an IPv4 or IPv6 address or CIDR, got 'nonsense'
    """
    if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return value
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return ipaddress.ip_network(value)
    text = str(value).strip()
    try:
        # Direct construction is several times faster than ip_network()'s try-v4-then-v6.
        if ":" in text:
            return ipaddress.IPv6Network(text, strict=False)
        return ipaddress.IPv4Network(text, strict=False)
    except ValueError:
        raise PolicyError(field, expected="an IPv4 or IPv6 address or CIDR", got=value) from None


def _collapse(networks: Iterable[IPNetwork]) -> tuple[IPNetwork, ...]:
    """The minimal CIDR cover of the union, sorted (as ipaddress.collapse_addresses, but linear after sorting:
    networks that touch no other are kept as they are; only merged runs are re-summarised)."""
    out: list[IPNetwork] = []
    for version, bits in ((4, 32), (6, 128)):
        spans = sorted(
            (int(n.network_address), int(n.network_address) + (1 << (bits - n.prefixlen)) - 1, n)
            for n in networks
            if n.version == version
        )
        run: list[tuple[int, int, IPNetwork]] = []
        run_end = -2
        for span in spans:
            if run and span[0] <= run_end + 1:
                run.append(span)
                run_end = max(run_end, span[1])
                continue
            out.extend(_summarise(run, run_end))
            run, run_end = [span], span[1]
        out.extend(_summarise(run, run_end))
    return tuple(out)


def _summarise(run: list[tuple[int, int, IPNetwork]], last: int) -> list[IPNetwork]:
    if not run:
        return []
    if len(run) == 1:
        return [run[0][2]]
    first = run[0][2].network_address
    return list(ipaddress.summarize_address_range(first, type(first)(last)))  # type: ignore[arg-type]


@attrs.frozen(repr=False)
class AddressSet:
    """IPv4 and IPv6 networks, collapsed: no member overlaps another."""

    networks: tuple[IPNetwork, ...] = attrs.field(converter=_collapse)

    @classmethod
    def of(cls, *members: str | IPNetwork | IPAddress) -> AddressSet:
        return cls(tuple(network_of(m) for m in members))

    @classmethod
    def parse(cls, text: str, *, field: str) -> AddressSet:
        """Parse a comma separated list of addresses and CIDRs (empty items ignored)."""
        return cls(tuple(network_of(item, field=field) for item in text.split(",") if item.strip()))

    @classmethod
    def _collapsed(cls, networks: tuple[IPNetwork, ...]) -> AddressSet:
        """A set from members known to be collapsed already (a subset of another set's members)."""
        instance = object.__new__(cls)
        object.__setattr__(instance, "networks", networks)
        return instance

    def for_version(self, version: int) -> AddressSet:
        """The members of one IP version (4 or 6)."""
        return AddressSet._collapsed(tuple(n for n in self.networks if n.version == version))

    def __contains__(self, value: object) -> bool:
        if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
            return any(value.version == n.version and value in n for n in self.networks)
        if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
            return any(value.version == n.version and value.subnet_of(n) for n in self.networks)  # type: ignore[arg-type]
        return False

    def overlaps(self, network: IPNetwork) -> bool:
        return any(network.version == n.version and network.overlaps(n) for n in self.networks)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[IPNetwork]:
        return iter(self.networks)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __len__(self) -> int:
        return len(self.networks)

    def __str__(self) -> str:
        return ",".join(str(n) for n in self.networks)

    def __repr__(self) -> str:
        return f"AddressSet({str(self)!r})"
