"""Readers: real rules (as the kernel's tools print them) back into IR, so they can be traced, verified and diffed.

- :func:`meshredirect.readers.iptables.read_iptables`: ``iptables-save`` output,
  ``iptables -S`` output and ``iptables-restore`` input.
- :func:`meshredirect.readers.nftables.read_nft_json`: ``nft -j list ruleset`` output and ``nft -j -f`` input.

Readers are pure (text in, :class:`~meshredirect.ir.Ruleset` out). What they
cannot model becomes an explicit unknown node, never a guess; text the kernel's
tools would refuse raises :class:`~meshredirect.errors.SourceError` with
``file:line:col``, the line and a caret.
"""
