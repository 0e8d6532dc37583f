"""The apply layer: the only part of meshredirect with side effects.

It runs the kernel tools (``iptables-restore``, ``nft``...) inside a target
network namespace, reading the current state first so that each change is
one atomic transaction per table and family that replaces exactly our rules.
"""
