"""The kernel's limits on eBPF programs and maps that a policy can run into, checked when rendering.

Each constant names the kernel code that enforces it. A policy that exceeds
one is refused with an :class:`~meshredirect.errors.UnsupportedError` naming
the IR node that needed the map, before any C is written.

>>> HASH_ENTRIES_MAX
134217728
>>> OBJECT_NAME_MAX
15
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "CONNECTION_STATE_ENTRIES",
    "HASH_ENTRIES_MAX",
    "LOCAL_ROUTE_ENTRIES",
    "LPM_DATA_BYTES_MAX",
    "MAIN_ROUTE_ENTRIES",
    "MAPS_PER_PROGRAM_MAX",
    "MAP_ENTRIES_MAX",
    "MARK_ROUTE_ENTRIES",
    "OBJECT_NAME_MAX",
    "PORT_SETS_MAX",
]

#: ``MAX_USED_MAPS`` (kernel/bpf/verifier.c): the verifier refuses a program that references more maps.
#: The program has a fixed set of ten (every set of a kind shares one map), so a policy cannot reach it.
MAPS_PER_PROGRAM_MAX: Final = 64
#: ``BPF_OBJ_NAME_LEN`` is 16 with the terminating NUL: longer map and program names are cut.
OBJECT_NAME_MAX: Final = 15
#: kernel/bpf/hashtab.c: ``n_buckets = roundup_pow_of_two(max_entries)`` must not exceed
#: ``U32_MAX / sizeof(struct bucket)`` (16 bytes on 64-bit machines), so at most 2**27 entries.
HASH_ENTRIES_MAX: Final = 2**27
#: ``max_entries`` is a u32 and must not be 0 (every map type).
MAP_ENTRIES_MAX: Final = 2**32 - 1
#: kernel/bpf/lpm_trie.c ``LPM_DATA_SIZE_MAX``: the prefix data of an LPM trie key (we use 4 or 16 bytes).
LPM_DATA_BYTES_MAX: Final = 256

# Capacities we choose for maps filled after loading (they bound, not allocate: LPM tries and
# hash maps without preallocation use memory per entry present).

#: The set number in a port key is 16 bits wide (the key is 4 bytes: set, port).
PORT_SETS_MAX: Final = 2**16

#: Local addresses of the node (its local routing table).
LOCAL_ROUTE_ENTRIES: Final = 256
#: Marks routed locally by policy routing (slots of an array map the program scans).
MARK_ROUTE_ENTRIES: Final = 8
#: Routes of the main table.
MAIN_ROUTE_ENTRIES: Final = 4096
#: Redirected connections remembered at once (LRU maps are preallocated: ~2 MB each at this size; an
#: entry is needed from connect() until the proxy reads SO_ORIGINAL_DST, and for getpeername()).
CONNECTION_STATE_ENTRIES: Final = 16384
