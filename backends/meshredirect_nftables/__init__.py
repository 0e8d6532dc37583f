"""nftables backends for meshredirect: libnftables JSON (``nftables-json``) and ``nft -f`` text (``nftables``).

Both share one lowering (:mod:`meshredirect_nftables.lowering`), which puts
our rules in one table of our own per address family; they are registered in
the ``meshredirect.backends`` entry-point group. Reading the kernel's rules
back is the core's job (:mod:`meshredirect.readers.nftables`).
"""

from __future__ import annotations

from meshredirect_nftables.backend import NftablesJsonBackend, NftablesTextBackend, json_document
from meshredirect_nftables.lowering import DEFAULT_TABLE, PRIORITY_OFFSET, TPROXY_DROP_COMMENT, NftLowering

__all__ = [
    "DEFAULT_TABLE",
    "PRIORITY_OFFSET",
    "TPROXY_DROP_COMMENT",
    "NftLowering",
    "NftablesJsonBackend",
    "NftablesTextBackend",
    "json_document",
]
