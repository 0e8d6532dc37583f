"""The policy: what a user means, in mesh terms.

A :class:`Policy` is frozen and validated on construction: every field is
checked against its domain, and combinations known to loop or to contradict
themselves are refused with the reason. The defaults are Istio's production
setting (``-p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x '' -b '*'
-d 15090,15021,15020``, tunnel port 15008, gid 1337).

>>> policy = Policy()
>>> policy.outbound_port, policy.inbound_port, str(policy.inbound_ports_exclude)
(15001, 15006, '15020-15021,15090')
>>> Policy(inbound_ports="80,443", outbound_cidrs_exclude=["10.96.0.0/12"]).inbound_ports
PortSet('80,443')
>>> Policy(proxy_uids=[0])
Traceback (most recent call last):
...
meshredirect.errors.UnsafePolicyError: proxy_uids: refused: uid 0 (root) would exempt every root process from capture, a mesh bypass (given: 0)

Fields can be changed with :func:`attrs.evolve`, which validates again.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Iterable
from typing import Final, TypeAlias

import attrs

from meshredirect.errors import PolicyError, UnsafePolicyError
from meshredirect.ir import Family
from meshredirect.values import (
    ALL,
    MAX_ID,
    MAX_MARK,
    MAX_PORT,
    AddressSet,
    All,
    IdSet,
    IPAddress,
    PortSet,
    network_of,
)

__all__ = [
    "DEFAULT_POLICY",
    "DnsCapture",
    "Group",
    "InterceptionMode",
    "LoopbackCapture",
    "Policy",
]

#: iptables chain names hold at most 28 characters (XT_EXTENSION_MAXNAMELEN - 1).
MAX_CHAIN_NAME: Final = 28
#: The longest suffix the compiler appends to the chain prefix.
LONGEST_CHAIN_SUFFIX: Final = len("_IN_REDIRECT")
#: Linux interface names hold at most 15 characters (IFNAMSIZ - 1).
MAX_INTERFACE_NAME: Final = 15
#: ip rule tables 253 (default), 254 (main), 255 (local) belong to the kernel.
RESERVED_ROUTE_TABLES: Final = frozenset({0, 253, 254, 255})
#: Istio's agent answers DNS on this port.
DEFAULT_DNS_PORT: Final = 15053
#: The port DNS queries go to (what DNS capture redirects).
DNS_QUERY_PORT: Final = 53
LOOPBACK_V4: Final = ipaddress.IPv4Network("127.0.0.0/8")
LOOPBACK_V6: Final = ipaddress.IPv6Network("::1/128")

_INTERFACE = re.compile(r"^[A-Za-z0-9_.@:-]{1,15}\+?$")
_PREFIX = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_GROUP_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*\$?$")

Group: TypeAlias = int | str


class InterceptionMode(enum.Enum):
    """How inbound connections reach the proxy."""

    REDIRECT = "REDIRECT"
    TPROXY = "TPROXY"


class LoopbackCapture(enum.Enum):
    """Which local connections over ``lo`` to a non-loopback address (the pod's own IP) go to the inbound port.

    ``PROXY``: only the proxy's own (Istio 1.5 and later: the app calling its own
    pod IP stays direct). ``ALL``: every such connection (Istio 1.4). ``NONE``: no
    such connection, the proxy's included (Linkerd's proxy-init returns everything
    leaving over ``lo``; its proxy handles calls to its own pod without a hairpin).
    """

    PROXY = "proxy"
    ALL = "all"
    NONE = "none"


# ----------------------------------------------------------------------------- converters


def _port(field: str, *, optional: bool = False):  # type: ignore[no-untyped-def]
    def convert(value: object) -> int | None:
        if value is None and optional:
            return None
        if isinstance(value, bool):
            raise PolicyError(field, expected=f"a port number 1-{MAX_PORT}", got=value)
        number = int(value.strip()) if isinstance(value, str) and value.strip().isdigit() else value
        if not isinstance(number, int) or not 1 <= number <= MAX_PORT:
            raise PolicyError(field, expected=f"a port number 1-{MAX_PORT}", got=value)
        return number

    return convert


def _int_in(field: str, low: int, high: int, what: str):  # type: ignore[no-untyped-def]
    def convert(value: object) -> int:
        if isinstance(value, str):
            text = value.strip()
            try:
                value = int(text, 0)
            except ValueError:
                raise PolicyError(field, expected=f"{what} {low}-{high}", got=text) from None
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise PolicyError(field, expected=f"{what} {low}-{high}", got=value)
        return value

    return convert


def _members(value: object) -> list[object]:
    """Members of a list-like field value: a comma separated string, an iterable, or one value.

    Inside an iterable a ``(low, high)`` pair is a range; ``range(a, b)`` is the range a..b-1.
    """
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    if isinstance(value, range):
        return [(value.start, value.stop - 1)] if value.step == 1 and len(value) else list(value)
    if isinstance(value, Iterable):
        return list(value)
    return [value]


def _port_set(field: str, *, wildcard: bool):  # type: ignore[no-untyped-def]
    def convert(value: object) -> PortSet | All:
        if isinstance(value, All) or (isinstance(value, str) and value.strip() == "*"):
            if wildcard:
                return ALL
            raise UnsafePolicyError(field, reason="'*' in an exclude list would exclude everything", got="*")
        if isinstance(value, PortSet):
            return value
        intervals: list[tuple[int, int]] = []
        for member in _members(value):
            if member == "*":
                raise UnsafePolicyError(field, reason="'*' must stand alone, not inside a list", got=value)
            if isinstance(member, tuple) and len(member) == 2:
                lo, hi = (_port(field)(m) for m in member)
                assert lo is not None and hi is not None
                if lo > hi:
                    raise PolicyError(field, expected="a range low-high with low <= high", got=f"{lo}-{hi}")
                intervals.append((lo, hi))
            elif isinstance(member, str) and not member.isdigit():
                intervals.extend(PortSet.parse(member, field=field).intervals)
            else:
                port = _port(field)(member)
                assert port is not None
                intervals.append((port, port))
        return PortSet(tuple(intervals))

    return convert


def _id_set(field: str):  # type: ignore[no-untyped-def]
    def convert(value: object) -> IdSet:
        if isinstance(value, IdSet):
            return value
        intervals: list[tuple[int, int]] = []
        for member in _members(value):
            if isinstance(member, str):
                intervals.extend(IdSet.parse(member, field=field).intervals)
                continue
            number = _int_in(field, 0, MAX_ID, "a numeric id")(member)
            intervals.append((number, number))
        return IdSet(tuple(intervals))

    return convert


def _address_set(field: str, *, wildcard: bool):  # type: ignore[no-untyped-def]
    def convert(value: object) -> AddressSet | All:
        if isinstance(value, All) or (isinstance(value, str) and value.strip() == "*"):
            if wildcard:
                return ALL
            raise UnsafePolicyError(field, reason="'*' in an exclude list would exclude everything", got="*")
        if isinstance(value, AddressSet):
            return value
        members = _members(value)
        if "*" in members:
            raise UnsafePolicyError(field, reason="'*' must stand alone, not inside a list", got=value)
        return AddressSet(tuple(network_of(m, field=field) for m in members))  # type: ignore[arg-type]

    return convert


def _interfaces(field: str):  # type: ignore[no-untyped-def]
    def convert(value: object) -> tuple[str, ...]:
        names: list[str] = []
        for member in _members(value):
            if not isinstance(member, str) or not _INTERFACE.match(member) or member in (".", ".."):
                raise PolicyError(
                    field,
                    expected=f"an interface name of 1-{MAX_INTERFACE_NAME} characters "
                    "(letters, digits, '_.@:-', optional trailing '+')",
                    got=member,
                )
            if member not in names:
                names.append(member)
        return tuple(names)

    return convert


def _groups(field: str, *, wildcard: bool):  # type: ignore[no-untyped-def]
    def convert(value: object) -> tuple[Group, ...] | All:
        if isinstance(value, All) or (isinstance(value, str) and value.strip() == "*"):
            if wildcard:
                return ALL
            raise UnsafePolicyError(field, reason="'*' in an exclude list would exclude everything", got="*")
        groups: list[Group] = []
        for member in _members(value):
            if isinstance(member, str) and member.isdigit():
                member = int(member)
            if isinstance(member, int) and not isinstance(member, bool):
                if not 0 <= member <= MAX_ID:
                    raise PolicyError(field, expected=f"a group name or a numeric gid 0-{MAX_ID}", got=member)
            elif not isinstance(member, str) or not _GROUP_NAME.match(member):
                raise PolicyError(field, expected="a group name or a numeric gid", got=member)
            if member == "*":
                raise UnsafePolicyError(field, reason="'*' must stand alone, not inside a list", got=value)
            if member not in groups:
                groups.append(member)
        return tuple(groups)

    return convert


def _families(value: object) -> frozenset[Family]:
    result: set[Family] = set()
    for member in _members(value):
        if isinstance(member, Family) and member is not Family.INET:
            result.add(member)
            continue
        text = str(member).strip().lower()
        aliases = {
            "ipv4": Family.IPV4,
            "4": Family.IPV4,
            "v4": Family.IPV4,
            "ipv6": Family.IPV6,
            "6": Family.IPV6,
            "v6": Family.IPV6,
        }
        if text in ("dual", "both", "dual-stack"):
            result.update((Family.IPV4, Family.IPV6))
        elif text in aliases:
            result.add(aliases[text])
        else:
            raise PolicyError("families", expected="ipv4, ipv6 or both", got=member)
    if not result:
        raise PolicyError("families", expected="at least one of ipv4, ipv6", got="none")
    return frozenset(result)


def _enum(field: str, kind: type[enum.Enum]):  # type: ignore[no-untyped-def]
    def convert(value: object) -> enum.Enum:
        if isinstance(value, kind):
            return value
        text = str(value).strip()
        for member in kind:
            if text.upper() == str(member.value).upper() or text.upper() == member.name:
                return member
        expected = " or ".join(str(m.value) for m in kind)
        raise PolicyError(field, expected=expected, got=value)

    return convert


def _address(field: str, version: int):  # type: ignore[no-untyped-def]
    def convert(value: object) -> IPAddress:
        try:
            address = ipaddress.ip_address(value if not isinstance(value, str) else value.strip())  # type: ignore[arg-type]
        except ValueError:
            address = None
        if address is None or address.version != version:
            raise PolicyError(field, expected=f"an IPv{version} address", got=value)
        return address

    return convert


def _addresses(field: str):  # type: ignore[no-untyped-def]
    def convert(value: object) -> tuple[IPAddress, ...]:
        out: list[IPAddress] = []
        for member in _members(value):
            try:
                address = ipaddress.ip_address(member.strip() if isinstance(member, str) else member)  # type: ignore[arg-type]
            except ValueError:
                raise PolicyError(field, expected="an IPv4 or IPv6 address", got=member) from None
            if address not in out:
                out.append(address)
        return tuple(out)

    return convert


def _loopback_cidr(value: object) -> ipaddress.IPv4Network:
    network = network_of(value, field="loopback_cidr")  # type: ignore[arg-type]
    if (
        not isinstance(network, ipaddress.IPv4Network)
        or not network.subnet_of(LOOPBACK_V4)
        or ipaddress.IPv4Address("127.0.0.1") not in network
    ):
        raise PolicyError("loopback_cidr", expected="an IPv4 CIDR inside 127.0.0.0/8 that holds 127.0.0.1", got=value)
    return network


def _prefix(value: object) -> str:
    max_len = MAX_CHAIN_NAME - LONGEST_CHAIN_SUFFIX
    if not isinstance(value, str) or not _PREFIX.match(value) or len(value) > max_len:
        raise PolicyError(
            "chain_prefix",
            expected=f"a name of 1-{max_len} characters: a letter, then letters, digits, '_' or '-'",
            got=value,
        )
    return value


def _bool(field: str):  # type: ignore[no-untyped-def]
    def convert(value: object) -> bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off", ""):
            return False
        raise PolicyError(field, expected="true or false", got=value)

    return convert


def _to_dns_enabled(value: object) -> bool:
    return _bool("dns.enabled")(value)  # type: ignore[no-any-return]


def _to_dns_capture_all(value: object) -> bool:
    return _bool("dns.capture_all")(value)  # type: ignore[no-any-return]


def _to_dns_servers(value: object) -> tuple[IPAddress, ...]:
    return _addresses("dns.servers")(value)  # type: ignore[no-any-return]


def _to_dns_port(value: object) -> int:
    return _port("dns.port")(value)  # type: ignore[no-any-return]


# ----------------------------------------------------------------------------- DNS


@attrs.frozen(kw_only=True)
class DnsCapture:
    """DNS capture to the agent's resolver (Istio's ``ISTIO_META_DNS_CAPTURE``).

    With ``capture_all`` every query on port 53 is captured; otherwise only
    queries to ``servers`` (what resolv.conf names), so a local resolver that
    forwards upstream is not captured again.

    >>> DnsCapture(enabled=True, servers=["10.96.0.10"]).servers
    (IPv4Address('10.96.0.10'),)
    """

    enabled: bool = attrs.field(default=False, converter=_to_dns_enabled)
    capture_all: bool = attrs.field(default=False, converter=_to_dns_capture_all)
    servers: tuple[IPAddress, ...] = attrs.field(default=(), converter=_to_dns_servers)
    port: int = attrs.field(default=DEFAULT_DNS_PORT, converter=_to_dns_port)

    def __attrs_post_init__(self) -> None:
        if self.enabled and not self.capture_all and not self.servers:
            raise UnsafePolicyError(
                "dns.servers",
                reason="DNS capture is enabled but names no server and capture_all is off, so it would capture nothing",
                got="no servers",
            )

    def servers_for(self, family: Family) -> tuple[IPAddress, ...]:
        return tuple(s for s in self.servers if s.version == family.version)

    def active_for(self, family: Family) -> bool:
        """Whether any DNS rule exists for this family."""
        return self.enabled and (self.capture_all or bool(self.servers_for(family)))


def _dns(value: object) -> DnsCapture:
    if isinstance(value, DnsCapture):
        return value
    if isinstance(value, bool):
        raise PolicyError("dns", expected="a DnsCapture (or a mapping of its fields)", got=value)
    if isinstance(value, dict):
        return DnsCapture(**value)
    raise PolicyError("dns", expected="a DnsCapture (or a mapping of its fields)", got=value)


def _to_outbound_port(value: object) -> int:
    return _port("outbound_port")(value)  # type: ignore[no-any-return]


def _to_inbound_port(value: object) -> int:
    return _port("inbound_port")(value)  # type: ignore[no-any-return]


def _to_inbound_tunnel_port(value: object) -> int | None:
    return _port("inbound_tunnel_port", optional=True)(value)  # type: ignore[no-any-return]


def _to_proxy_uids(value: object) -> IdSet:
    return _id_set("proxy_uids")(value)  # type: ignore[no-any-return]


def _to_proxy_gids(value: object) -> IdSet:
    return _id_set("proxy_gids")(value)  # type: ignore[no-any-return]


def _to_inbound_mode(value: object) -> InterceptionMode:
    return _enum("inbound_mode", InterceptionMode)(value)  # type: ignore[no-any-return]


def _to_tproxy_mark(value: object) -> int:
    return _int_in("tproxy_mark", 1, MAX_MARK - 1, "a mark")(value)  # type: ignore[no-any-return]


def _to_tproxy_route_table(value: object) -> int:
    return _int_in("tproxy_route_table", 1, 2**32 - 1, "a route table number")(value)  # type: ignore[no-any-return]


def _to_inbound_ports(value: object) -> PortSet | All:
    return _port_set("inbound_ports", wildcard=True)(value)  # type: ignore[no-any-return]


def _to_inbound_ports_exclude(value: object) -> PortSet:
    return _port_set("inbound_ports_exclude", wildcard=False)(value)  # type: ignore[no-any-return]


def _to_outbound_cidrs(value: object) -> AddressSet | All:
    return _address_set("outbound_cidrs", wildcard=True)(value)  # type: ignore[no-any-return]


def _to_outbound_cidrs_exclude(value: object) -> AddressSet:
    return _address_set("outbound_cidrs_exclude", wildcard=False)(value)  # type: ignore[no-any-return]


def _to_outbound_ports(value: object) -> PortSet:
    return _port_set("outbound_ports", wildcard=False)(value)  # type: ignore[no-any-return]


def _to_outbound_ports_exclude(value: object) -> PortSet:
    return _port_set("outbound_ports_exclude", wildcard=False)(value)  # type: ignore[no-any-return]


def _to_exclude_interfaces(value: object) -> tuple[str, ...]:
    return _interfaces("exclude_interfaces")(value)  # type: ignore[no-any-return]


def _to_reroute_interfaces(value: object) -> tuple[str, ...]:
    return _interfaces("reroute_interfaces")(value)  # type: ignore[no-any-return]


def _to_drop_invalid(value: object) -> bool:
    return _bool("drop_invalid")(value)  # type: ignore[no-any-return]


def _to_owner_groups_include(value: object) -> tuple[Group, ...] | All:
    return _groups("owner_groups_include", wildcard=True)(value)  # type: ignore[no-any-return]


def _to_owner_groups_exclude(value: object) -> tuple[Group, ...]:
    return _groups("owner_groups_exclude", wildcard=False)(value)  # type: ignore[no-any-return]


def _to_loopback_capture(value: object) -> LoopbackCapture:
    return _enum("loopback_capture", LoopbackCapture)(value)  # type: ignore[no-any-return]


def _to_passthrough_ipv4(value: object) -> ipaddress.IPv4Address:
    return _address("passthrough_ipv4", 4)(value)  # type: ignore[no-any-return]


def _to_passthrough_ipv6(value: object) -> ipaddress.IPv6Address:
    return _address("passthrough_ipv6", 6)(value)  # type: ignore[no-any-return]


def _to_one_rule_per_port(value: object) -> bool:
    return _bool("one_rule_per_port")(value)  # type: ignore[no-any-return]


# ----------------------------------------------------------------------------- the policy


@attrs.frozen(kw_only=True)
class Policy:
    """A transparent-redirect policy for one pod. See the module docstring."""

    #: Where captured outbound connections go (Istio ``-p``).
    outbound_port: int = attrs.field(default=15001, converter=_to_outbound_port)
    #: Where captured inbound connections go (``-z``).
    inbound_port: int = attrs.field(default=15006, converter=_to_inbound_port)
    #: The proxy's tunnel (HBONE) port, never captured inbound (``-e``); None for none.
    inbound_tunnel_port: int | None = attrs.field(default=15008, converter=_to_inbound_tunnel_port)
    #: Sockets of these uids are the proxy: never captured outbound (``-u``).
    proxy_uids: IdSet = attrs.field(default=IdSet.of(1337), converter=_to_proxy_uids)
    #: Sockets of these gids are the proxy too (``-g``).
    proxy_gids: IdSet = attrs.field(default=IdSet.of(1337), converter=_to_proxy_gids)
    #: REDIRECT (nat) or TPROXY (mangle, keeps the source address) for inbound (``-m``).
    inbound_mode: InterceptionMode = attrs.field(default=InterceptionMode.REDIRECT, converter=_to_inbound_mode)
    #: TPROXY: packet mark of intercepted connections (``-t``); mark+1 tags the proxy's hairpin.
    tproxy_mark: int = attrs.field(default=1337, converter=_to_tproxy_mark)
    #: TPROXY: the policy-routing table that delivers marked packets locally (``-r``).
    tproxy_route_table: int = attrs.field(default=133, converter=_to_tproxy_route_table)
    #: Inbound destination ports captured: ``*`` or a list; empty captures none (``-b``).
    inbound_ports: PortSet | All = attrs.field(default=ALL, converter=_to_inbound_ports)
    #: With ``*``: inbound ports left alone (``-d``).
    inbound_ports_exclude: PortSet = attrs.field(
        default=PortSet.of(15090, 15021, 15020), converter=_to_inbound_ports_exclude
    )
    #: Outbound destinations captured: ``*`` or CIDRs; empty captures none (``-i``).
    outbound_cidrs: AddressSet | All = attrs.field(default=ALL, converter=_to_outbound_cidrs)
    #: Outbound destinations never captured (``-x``); exclusions win over inclusions.
    outbound_cidrs_exclude: AddressSet = attrs.field(default=AddressSet(()), converter=_to_outbound_cidrs_exclude)
    #: Outbound destination ports captured whatever the address (``-q``).
    outbound_ports: PortSet = attrs.field(default=PortSet(()), converter=_to_outbound_ports)
    #: Outbound destination ports never captured (``-o``).
    outbound_ports_exclude: PortSet = attrs.field(default=PortSet(()), converter=_to_outbound_ports_exclude)
    #: Traffic in or out of these interfaces is never captured (``-c``).
    exclude_interfaces: tuple[str, ...] = attrs.field(default=(), converter=_to_exclude_interfaces)
    #: Traffic arriving on these interfaces is treated as outbound (``-k``, e.g. KubeVirt).
    reroute_interfaces: tuple[str, ...] = attrs.field(default=(), converter=_to_reroute_interfaces)
    #: DNS capture to the agent's resolver.
    dns: DnsCapture = attrs.field(default=DnsCapture(), converter=_dns)
    #: Drop packets conntrack marks INVALID instead of letting them reset connections.
    drop_invalid: bool = attrs.field(default=False, converter=_to_drop_invalid)
    #: Address families programmed; a family left out is not captured at all.
    families: frozenset[Family] = attrs.field(default=frozenset({Family.IPV4}), converter=_families)
    #: Only sockets of these groups are captured outbound (``ISTIO_OUTBOUND_OWNER_GROUPS``).
    owner_groups_include: tuple[Group, ...] | All = attrs.field(default=ALL, converter=_to_owner_groups_include)
    #: Sockets of these groups are never captured outbound (``ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE``).
    owner_groups_exclude: tuple[Group, ...] = attrs.field(default=(), converter=_to_owner_groups_exclude)
    #: IPv4 destinations that count as localhost (``ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR``); IPv6 uses ::1.
    loopback_cidr: ipaddress.IPv4Network = attrs.field(
        default=ipaddress.IPv4Network("127.0.0.1/32"), converter=_loopback_cidr
    )
    #: Which connections over lo to the pod's own address go to the inbound port.
    loopback_capture: LoopbackCapture = attrs.field(default=LoopbackCapture.PROXY, converter=_to_loopback_capture)
    #: The proxy's inbound passthrough source (it connects to the app from here over lo).
    passthrough_ipv4: ipaddress.IPv4Address = attrs.field(
        default=ipaddress.IPv4Address("127.0.0.6"), converter=_to_passthrough_ipv4
    )
    passthrough_ipv6: ipaddress.IPv6Address = attrs.field(
        default=ipaddress.IPv6Address("::6"), converter=_to_passthrough_ipv6
    )
    #: Prefix of every chain the compiler creates; it also marks which chains are ours.
    chain_prefix: str = attrs.field(default="ISTIO", converter=_prefix)
    #: Layout only: one rule per port instead of one multiport rule (Istio 1.4's shape).
    one_rule_per_port: bool = attrs.field(default=False, converter=_to_one_rule_per_port)

    def __attrs_post_init__(self) -> None:
        self._refuse_dangerous()

    # ------------------------------------------------------------------ checks

    def _refuse_dangerous(self) -> None:
        if 0 in self.proxy_uids:
            raise UnsafePolicyError(
                "proxy_uids",
                reason="uid 0 (root) would exempt every root process from capture, a mesh bypass",
                got=0,
            )
        if 0 in self.proxy_gids:
            raise UnsafePolicyError(
                "proxy_gids",
                reason="gid 0 (root) would exempt every root-group process from capture, a mesh bypass",
                got=0,
            )
        if not self.proxy_uids and not self.proxy_gids:
            raise UnsafePolicyError(
                "proxy_uids",
                reason="with no proxy uid and no proxy gid the proxy's own connections are captured again: a loop",
                got="none",
            )
        listeners = {
            "outbound_port": self.outbound_port,
            "inbound_port": self.inbound_port,
            "inbound_tunnel_port": self.inbound_tunnel_port,
        }
        if self.dns.enabled:
            listeners["dns.port"] = self.dns.port
        seen: dict[int, str] = {}
        for name, port in listeners.items():
            if port is None:
                continue
            if port in seen:
                raise UnsafePolicyError(
                    name, reason=f"the proxy's listeners need distinct ports; {seen[port]} is {port} too", got=port
                )
            seen[port] = name
        if self.dns.enabled and DNS_QUERY_PORT in seen and seen[DNS_QUERY_PORT] != "dns.port":
            raise UnsafePolicyError(
                seen[DNS_QUERY_PORT],
                reason=f"DNS capture redirects connections to port {DNS_QUERY_PORT}, so no proxy listener can use it",
                got=DNS_QUERY_PORT,
            )
        if isinstance(self.inbound_ports, PortSet):
            overlap = _intersection(self.inbound_ports, self.inbound_ports_exclude)
            if overlap:
                raise UnsafePolicyError(
                    "inbound_ports",
                    reason=f"captured ports inside the excluded ports {self.inbound_ports_exclude} "
                    "(the exclusion would win and nothing would be captured for them)",
                    got=str(overlap),
                )
            if self.inbound_tunnel_port is not None and self.inbound_tunnel_port in self.inbound_ports:
                raise UnsafePolicyError(
                    "inbound_ports",
                    reason="the tunnel port is never captured inbound, it cannot be listed for capture",
                    got=self.inbound_tunnel_port,
                )
        overlap = _intersection(self.outbound_ports, self.outbound_ports_exclude)
        if overlap:
            raise UnsafePolicyError(
                "outbound_ports",
                reason=f"captured ports inside the excluded ports {self.outbound_ports_exclude}",
                got=str(overlap),
            )
        if isinstance(self.outbound_cidrs, AddressSet):
            for network in self.outbound_cidrs:
                if network.overlaps(LOOPBACK_V4 if network.version == 4 else LOOPBACK_V6):  # type: ignore[arg-type]
                    raise UnsafePolicyError(
                        "outbound_cidrs",
                        reason="a loopback range included for outbound capture sends the proxy's "
                        "local connections back to itself: a known loop",
                        got=str(network),
                    )
        if not isinstance(self.owner_groups_include, All):
            if not self.owner_groups_include:
                raise PolicyError("owner_groups_include", expected="'*' or at least one group", got="an empty list")
            if self.owner_groups_exclude:
                raise UnsafePolicyError(
                    "owner_groups_exclude",
                    reason="owner groups can be included or excluded, not both",
                    got=",".join(map(str, self.owner_groups_exclude)),
                )
        both = set(self.exclude_interfaces) & set(self.reroute_interfaces)
        if both:
            raise UnsafePolicyError(
                "reroute_interfaces",
                reason="an interface cannot be both excluded and rerouted",
                got=",".join(sorted(both)),
            )
        if self.tproxy_route_table in RESERVED_ROUTE_TABLES:
            raise PolicyError(
                "tproxy_route_table",
                expected="a route table number other than 0, 253 (default), 254 (main), 255 (local)",
                got=self.tproxy_route_table,
            )

    # ------------------------------------------------------------------ derived

    @property
    def captures_inbound(self) -> bool:
        return isinstance(self.inbound_ports, All) or bool(self.inbound_ports)

    def unresolved_groups(self) -> tuple[str, ...]:
        """Group names (not numbers) the policy holds; they must be resolved before compiling."""
        groups = () if isinstance(self.owner_groups_include, All) else self.owner_groups_include
        return tuple(g for g in (*groups, *self.owner_groups_exclude) if isinstance(g, str))

    def passthrough_for(self, family: Family) -> IPAddress:
        return self.passthrough_ipv4 if family is Family.IPV4 else self.passthrough_ipv6

    def loopback_for(self, family: Family) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        return self.loopback_cidr if family is Family.IPV4 else LOOPBACK_V6


def _intersection(a: PortSet, b: PortSet) -> PortSet:
    return a.difference(a.difference(b))  # type: ignore[return-value]


#: Istio's production default.
DEFAULT_POLICY: Final = Policy()
