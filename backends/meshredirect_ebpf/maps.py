"""Every map of the program as data: its definition, its entries as the kernel stores them, and the JSON document.

Keys and values are the bytes ``bpftool map update ... key hex .. value hex ..``
takes, in the layout of the C structs (little-endian integers as the machine
stores them, addresses and LPM prefixes in network order as the kernel wants).

>>> from meshredirect_ebpf.environment import Environment
>>> from meshredirect_ebpf.plan import Program
>>> maps = map_definitions(Program(decisions=(), sets=(), environment=Environment.pod("10.0.0.5")))
>>> [m.name for m in maps]  # doctest: +NORMALIZE_WHITESPACE
['mr_local4', 'mr_local6', 'mr_route4', 'mr_route6', 'mr_mark_routes', 'mr_orig_cookie', 'mr_orig_tuple',
 'mr_sets4', 'mr_sets6', 'mr_ports', 'mr_ids']
>>> [(e.label, e.key.hex(" "), e.value.hex(" ")) for e in maps[0].entries][1]
('10.0.0.5/32 -> lo, source 10.0.0.5', '20 00 00 00 0a 00 00 05', '01 00 00 00 0a 00 00 05')
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Final

import attrs

from meshredirect.errors import PolicyError
from meshredirect.values import IPAddress, IPNetwork
from meshredirect_ebpf.environment import Environment, Route
from meshredirect_ebpf.limits import (
    CONNECTION_STATE_ENTRIES,
    LOCAL_ROUTE_ENTRIES,
    MAIN_ROUTE_ENTRIES,
    MAP_ENTRIES_MAX,
    MAPS_PER_PROGRAM_MAX,
    MARK_ROUTE_ENTRIES,
)
from meshredirect_ebpf.plan import PROGRAMS, ConnectionState, IntegerSet, PrefixSet, Program

__all__ = ["FORMAT", "MapDefinition", "MapEntry", "map_definitions", "maps_document", "read_entries", "set_key"]

#: Identifies the JSON document's layout.
FORMAT: Final = "meshredirect-ebpf-maps/1"
#: BPF_F_NO_PREALLOC: LPM tries require it.
NO_PREALLOC: Final = 1
#: The value every set member maps to.
PRESENT: Final = b"\x01"
#: Bits of the set number in front of an LPM key's prefix.
SET_BITS: Final = 32
#: sizeof(struct mr_original) and sizeof(struct mr_tuple) in the generated C.
ORIGINAL_SIZE: Final = 40
TUPLE_SIZE: Final = 40


@attrs.frozen(kw_only=True)
class MapEntry:
    label: str
    key: bytes
    value: bytes


@attrs.frozen(kw_only=True)
class MapDefinition:
    """One map: what the C declares and what is loaded into it."""

    name: str
    #: ``lpm_trie``, ``hash`` or ``lru_hash`` (bpftool's names).
    map_type: str
    key_type: str
    value_type: str
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    #: ``policy`` (from the IR), ``environment`` (the node's routes) or ``program`` (filled as connections come).
    filled_by: str
    purpose: str
    entries: tuple[MapEntry, ...] = ()

    def __attrs_post_init__(self) -> None:
        assert 1 <= self.max_entries <= MAP_ENTRIES_MAX, self
        assert len(self.entries) <= self.max_entries, self.name


def _u32(value: int) -> bytes:
    return value.to_bytes(4, "little")


def lpm_key(network: IPNetwork) -> bytes:
    """``struct mr_lpm{4,6}_key``: the prefix length (host order), then the address (network order)."""
    return _u32(network.prefixlen) + network.network_address.packed


def _address(address: IPAddress | None, version: int) -> bytes:
    if address is None:
        return bytes(4 if version == 4 else 16)
    return address.packed


def route_value(route: Route, environment: Environment) -> bytes:
    """``struct mr_route{4,6}``: the interface number, then the preferred source (zero: none)."""
    version = route.network.version
    return _u32(environment.interface_id(route.interface)) + _address(route.source, version)


def _route_label(route: Route) -> str:
    source = f", source {route.source}" if route.source is not None else ""
    return f"{route.network} -> {route.interface}{source}"


def set_key(item: PrefixSet | IntegerSet, member: IPNetwork | int) -> bytes:
    """The key of one member of a set in its shared map.

    Prefix sets (``struct mr_set{4,6}_key``): the prefix length counts the 32 bits of the set
    number, which comes first in network order so that LPM matching sees it before the address.
    Ports (``struct mr_port_key``) and ids (``struct mr_id_key``): the set number, then the value,
    as the machine stores them.
    """
    if isinstance(item, PrefixSet):
        assert not isinstance(member, int)
        return _u32(SET_BITS + member.prefixlen) + item.index.to_bytes(4, "big") + member.network_address.packed
    assert isinstance(member, int)
    width = item.bits // 8
    return item.index.to_bytes(width, "little") + member.to_bytes(width, "little")


def _sets_definitions(program: Program) -> list[MapDefinition]:
    prefix = {v: [s for s in program.sets if isinstance(s, PrefixSet) and s.version == v] for v in (4, 6)}
    integer = {b: [s for s in program.sets if isinstance(s, IntegerSet) and s.bits == b] for b in (16, 32)}
    maps = []
    for version in (4, 6):
        entries = tuple(
            MapEntry(label=f"{item.name}: {network}", key=set_key(item, network), value=PRESENT)
            for item in prefix[version]
            for network in item.networks
        )
        size = 4 + 4 + (4 if version == 4 else 16)
        maps.append(
            MapDefinition(
                name=f"mr_sets{version}",
                map_type="lpm_trie",
                key_type=f"struct mr_set{version}_key",
                value_type="__u8",
                key_size=size,
                value_size=1,
                max_entries=max(1, len(entries)),
                flags=NO_PREALLOC,
                filled_by="policy",
                purpose=f"every IPv{version} address set of the rules (key: set number, prefix)",
                entries=entries,
            )
        )
    for bits, name, what in ((16, "mr_ports", "port"), (32, "mr_ids", "uid and gid")):
        entries = tuple(
            MapEntry(label=f"{item.name}: {value}", key=set_key(item, value), value=PRESENT)
            for item in integer[bits]
            for lo, hi in item.intervals
            for value in range(lo, hi + 1)
        )
        maps.append(
            MapDefinition(
                name=name,
                map_type="hash",
                key_type="struct mr_port_key" if bits == 16 else "struct mr_id_key",
                value_type="__u8",
                key_size=2 * bits // 8,
                value_size=1,
                max_entries=max(1, len(entries)),
                flags=0,
                filled_by="policy",
                purpose=f"every {what} set of the rules (key: set number, value)",
                entries=entries,
            )
        )
    return maps


def _route_definition(
    name: str, version: int, routes: tuple[Route, ...], env: Environment, local: bool
) -> MapDefinition:
    capacity = LOCAL_ROUTE_ENTRIES if local else MAIN_ROUTE_ENTRIES
    mine = [r for r in routes if r.network.version == version]
    if len(mine) > capacity:
        raise PolicyError(
            "environment.local" if local else "environment.routes",
            expected=f"at most {capacity} IPv{version} routes (the map's capacity)",
            got=len(mine),
        )
    return MapDefinition(
        name=name,
        map_type="lpm_trie",
        key_type=f"struct mr_lpm{version}_key",
        value_type=f"struct mr_route{version}",
        key_size=4 + (4 if version == 4 else 16),
        value_size=4 + (4 if version == 4 else 16),
        max_entries=capacity,
        flags=NO_PREALLOC,
        filled_by="environment",
        purpose=(
            f"the local routing table, IPv{version}: addresses of this node (the connection leaves on lo)"
            if local
            else f"the main routing table, IPv{version}: the interface and preferred source of each destination"
        ),
        entries=tuple(MapEntry(label=_route_label(r), key=lpm_key(r.network), value=route_value(r, env)) for r in mine),
    )


def _mark_routes_definition(env: Environment) -> MapDefinition:
    if len(env.mark_routes) > MARK_ROUTE_ENTRIES:
        raise PolicyError(
            "environment.mark_routes",
            expected=f"at most {MARK_ROUTE_ENTRIES} marks routed locally (the map's slots)",
            got=len(env.mark_routes),
        )
    return MapDefinition(
        name="mr_mark_routes",
        map_type="array",
        key_type="__u32",
        value_type="struct mr_mark_route",
        key_size=4,
        value_size=12,
        max_entries=MARK_ROUTE_ENTRIES,
        flags=0,
        filled_by="environment",
        purpose="packet marks policy routing sends to lo (value, mask, used), e.g. TPROXY's fwmark rule",
        entries=tuple(
            MapEntry(
                label=f"mark & {route.mask:#x} == {route.value:#x} -> lo",
                key=_u32(slot),
                value=_u32(route.value) + _u32(route.mask) + _u32(1),
            )
            for slot, route in enumerate(env.mark_routes)
        ),
    )


def map_definitions(program: Program) -> tuple[MapDefinition, ...]:
    """Every map the C source declares, in declaration order: routing tables, connection state, then the
    policy's sets (one map per kind)."""
    env = program.environment
    maps = [
        _route_definition("mr_local4", 4, env.local, env, local=True),
        _route_definition("mr_local6", 6, env.local, env, local=True),
        _route_definition("mr_route4", 4, env.routes, env, local=False),
        _route_definition("mr_route6", 6, env.routes, env, local=False),
        _mark_routes_definition(env),
        MapDefinition(
            name=ConnectionState.BY_COOKIE.value,
            map_type="lru_hash",
            key_type="__u64",
            value_type="struct mr_original",
            key_size=8,
            value_size=ORIGINAL_SIZE,
            max_entries=CONNECTION_STATE_ENTRIES,
            flags=0,
            filled_by="program",
            purpose="socket cookie of a redirected connection -> its original destination (connect, getpeername)",
        ),
        MapDefinition(
            name=ConnectionState.BY_TUPLE.value,
            map_type="lru_hash",
            key_type="struct mr_tuple",
            value_type="struct mr_original",
            key_size=TUPLE_SIZE,
            value_size=ORIGINAL_SIZE,
            max_entries=CONNECTION_STATE_ENTRIES,
            flags=0,
            filled_by="program",
            purpose="addresses and ports of a redirected connection -> its original destination (SO_ORIGINAL_DST)",
        ),
    ]
    maps += _sets_definitions(program)
    assert len(maps) <= MAPS_PER_PROGRAM_MAX
    return tuple(maps)


def maps_document(program: Program, definitions: Sequence[MapDefinition] | None = None) -> str:
    """The JSON document of the programs (name, section, attach type) and of every map: definitions, and the
    entries to load as bpftool takes them (``definitions``: the program's, when already made).

    Laid out for people and diffs: one line per program, set, map header and map entry.
    """
    env = program.environment
    interfaces = {"0": "(no route)", **{str(env.interface_id(name)): name for name in env.interfaces}}
    programs = [{"name": name, "section": section, "attach": attach} for section, name, attach in PROGRAMS]
    sets = [
        {"name": item.name, "map": _map_of(item), "number": item.index, "purpose": item.purpose}
        for item in program.sets
    ]
    maps = []
    for m in definitions if definitions is not None else map_definitions(program):
        header = {
            "name": m.name,
            "type": m.map_type,
            "key_size": m.key_size,
            "value_size": m.value_size,
            "max_entries": m.max_entries,
            "flags": m.flags,
            "filled_by": m.filled_by,
            "purpose": m.purpose,
        }
        entries = [json.dumps({"member": e.label, "key": e.key.hex(" "), "value": e.value.hex(" ")}) for e in m.entries]
        listed = "[]" if not entries else "[\n    " + ",\n    ".join(entries) + "\n   ]"
        maps.append(json.dumps(header)[:-1] + f', "entries": {listed}}}')
    lines = [
        "{",
        f' "format": {json.dumps(FORMAT)},',
        ' "programs": [\n  ' + ",\n  ".join(json.dumps(p) for p in programs) + "\n ],",
        f' "interfaces": {json.dumps(interfaces)},',
        ' "sets": [' + ("\n  " + ",\n  ".join(json.dumps(s) for s in sets) + "\n ]" if sets else "]") + ",",
        ' "maps": [\n  ' + ",\n  ".join(maps) + "\n ]",
        "}",
    ]
    return "\n".join(lines) + "\n"


def _map_of(item: PrefixSet | IntegerSet) -> str:
    if isinstance(item, PrefixSet):
        return f"mr_sets{item.version}"
    return "mr_ports" if item.bits == 16 else "mr_ids"


def read_entries(document: str) -> dict[str, tuple[MapEntry, ...]]:
    """The entries of every map of a maps document (what a loader puts into the kernel)."""
    data = json.loads(document)
    return {
        m["name"]: tuple(
            MapEntry(label=e["member"], key=bytes.fromhex(e["key"]), value=bytes.fromhex(e["value"]))
            for e in m["entries"]
        )
        for m in data["maps"]
    }
