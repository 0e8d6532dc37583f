"""Istio's capture configuration (the fields of ``istio-iptables``) to a :class:`~meshredirect.policy.Policy`.

Field names are those of Istio's configuration (see
``conformance/istio/README.md``); values are the strings Istio takes, with
its quirks where they matter to users: comma lists may carry empty items,
``*`` means everything, an empty ``proxy_gid`` defaults to the uid, inbound
exclusions apply only with ``*``, and DNS capture with neither servers nor
``capture_all_dns`` is off (Istio warns and disables it).

>>> policy = policy_from_istio_config({"inbound_ports_include": "*", "outbound_ip_ranges_exclude": "10.0.0.0/8,"})
>>> str(policy.outbound_cidrs_exclude), policy.outbound_port
('10.0.0.0/8', 15001)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from meshredirect.errors import PolicyError
from meshredirect.ir import Family
from meshredirect.policy import DnsCapture, Policy

__all__ = ["ISTIO_DEFAULTS", "policy_from_istio_config"]

#: What ``istio-iptables`` uses when a field is not given.
ISTIO_DEFAULTS: Final[dict[str, Any]] = {
    "proxy_port": "15001",
    "inbound_capture_port": "15006",
    "inbound_tunnel_port": "15008",
    "proxy_uid": "1337",
    "proxy_gid": "",
    "inbound_interception_mode": "REDIRECT",
    "inbound_tproxy_mark": "1337",
    "inbound_tproxy_route_table": "133",
    "inbound_ports_include": "",
    "inbound_ports_exclude": "",
    "outbound_ip_ranges_include": "",
    "outbound_ip_ranges_exclude": "",
    "outbound_ports_include": "",
    "outbound_ports_exclude": "",
    "exclude_interfaces": "",
    "reroute_virtual_interfaces": "",
    "redirect_dns": False,
    "capture_all_dns": False,
    "dns_servers_v4": [],
    "dns_servers_v6": [],
    "drop_invalid": False,
    "enable_ipv6": False,
    "owner_groups_include": "*",
    "owner_groups_exclude": "",
    "host_ipv4_loopback_cidr": "127.0.0.1/32",
}


def policy_from_istio_config(config: Mapping[str, Any], **overrides: Any) -> Policy:
    """Build the policy an Istio capture configuration describes (unknown fields are an error)."""
    unknown = sorted(set(config) - set(ISTIO_DEFAULTS))
    if unknown:
        raise PolicyError(
            "istio configuration", expected="fields of " + ", ".join(sorted(ISTIO_DEFAULTS)), got=unknown[0]
        )
    c = {**ISTIO_DEFAULTS, **config}
    families = {Family.IPV4, Family.IPV6} if _flag(c["enable_ipv6"]) else {Family.IPV4}
    servers = list(c["dns_servers_v4"]) + (list(c["dns_servers_v6"]) if Family.IPV6 in families else [])
    capture_all = _flag(c["capture_all_dns"])
    dns_on = _flag(c["redirect_dns"]) and (capture_all or bool(servers))
    include = str(c["inbound_ports_include"]).strip()
    fields: dict[str, Any] = {
        "outbound_port": c["proxy_port"],
        "inbound_port": c["inbound_capture_port"],
        "inbound_tunnel_port": c["inbound_tunnel_port"] or None,
        "proxy_uids": c["proxy_uid"],
        "proxy_gids": c["proxy_gid"] if str(c["proxy_gid"]).strip() else c["proxy_uid"],
        "inbound_mode": c["inbound_interception_mode"],
        "tproxy_mark": c["inbound_tproxy_mark"],
        "tproxy_route_table": c["inbound_tproxy_route_table"],
        "inbound_ports": include,
        "inbound_ports_exclude": c["inbound_ports_exclude"] if include == "*" else "",
        "outbound_cidrs": c["outbound_ip_ranges_include"],
        "outbound_cidrs_exclude": c["outbound_ip_ranges_exclude"],
        "outbound_ports": c["outbound_ports_include"],
        "outbound_ports_exclude": c["outbound_ports_exclude"],
        "exclude_interfaces": c["exclude_interfaces"],
        "reroute_interfaces": c["reroute_virtual_interfaces"],
        "dns": DnsCapture(enabled=dns_on, capture_all=capture_all, servers=servers if dns_on else ()),
        "drop_invalid": _flag(c["drop_invalid"]),
        "families": families,
        "owner_groups_include": c["owner_groups_include"],
        "owner_groups_exclude": c["owner_groups_exclude"],
        "loopback_cidr": c["host_ipv4_loopback_cidr"],
    }
    fields.update(overrides)
    return Policy(**fields)


def _flag(value: object) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("true", "1", "yes")
