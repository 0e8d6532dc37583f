"""Readers: real-world rules (iptables text, nft JSON) turned back into IR, so they can be traced and proven."""
