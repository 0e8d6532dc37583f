"""The ``istio-iptables`` command line: its flags, short forms, environment variables and defaults.

:func:`parse_istio_flags` reads a command line the way ``istio-iptables``
(Go, cobra/pflag) does: ``--name=value`` and ``--name value``, ``-p 15001``,
``-p15001`` and ``-p=15001``, boolean flags alone or as ``--flag=false``,
shorthand clusters such as ``-nb '*'``, ``--`` ending the flags. Every flag may
also come from its environment variable (``--envoy-port`` from ``ENVOY_PORT``,
``-b`` from ``ISTIO_INBOUND_PORTS``...); the command line wins, and where Istio
binds a second variable (``ISTIO_META_DNS_CAPTURE`` for ``--redirect-dns``) that
one wins over the first, as in Istio. Unlike ``istio-iptables``, which ignores a
malformed environment value and stray arguments, both are errors here.

The result, :class:`IstioFlags`, turns into the configuration fields of
:func:`meshredirect.frontends.istio.policy_from_istio_config` and so into a
:class:`~meshredirect.policy.Policy`; errors then name the flag (or variable)
that gave the value:

>>> flags = parse_istio_flags(["-p", "15001", "-b", "*", "-d", "15090,15021,15020", "-i", "*"], environ={})
>>> policy = flags.policy(proxy_uid_lookup=lambda name: None, dns_servers=(), enable_ipv6=False)
>>> policy.outbound_port, str(policy.inbound_ports), str(policy.inbound_ports_exclude)
(15001, '*', '15020-15021,15090')
>>> parse_istio_flags(["-z", "http"], environ={}).policy(proxy_uid_lookup=lambda n: None, dns_servers=(), enable_ipv6=False)
Traceback (most recent call last):
...
meshredirect.errors.PolicyError: -z/--inbound-capture-port: expected a port number 1-65535, got 'http'
>>> parse_istio_flags(["--envoy-prot", "15001"], environ={})
Traceback (most recent call last):
...
meshredirect.errors.PolicyError: istio-iptables: expected a known flag (did you mean '--envoy-port'?), got '--envoy-prot'

Sources: Istio's ``tools/istio-iptables/pkg/cmd/root.go`` (flag names, short
forms, the variables each flag binds), ``pkg/constants`` (the names and the
environment-only variables) and ``tools/common/config`` (defaults, the
``ENVOY_USER`` lookup, reading ``/etc/resolv.conf``).
"""

from __future__ import annotations

import difflib
import enum
import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

import attrs

from meshredirect.errors import PolicyError, UnsafePolicyError

__all__ = [
    "ENV_ONLY",
    "FLAGS",
    "RETIRED",
    "IstioFlag",
    "IstioFlags",
    "Kind",
    "addresses_enable_ipv6",
    "format_help",
    "parse_istio_flags",
    "parse_resolv_conf",
]

#: What ``istio-iptables`` falls back to when ``-u`` is empty and ``ENVOY_USER`` does not resolve.
DEFAULT_PROXY_UID: Final = "1337"
#: The user name ``ENVOY_USER`` defaults to.
DEFAULT_ENVOY_USER: Final = "istio-proxy"
#: Where ``istio-iptables`` reads the DNS servers from.
RESOLV_CONF: Final = "/etc/resolv.conf"
#: Go's ``strconv.ParseBool``.
_TRUE: Final = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE: Final = frozenset({"0", "f", "F", "FALSE", "false", "False"})
_BOOL_EXPECTED: Final = "true or false (1, t, T, TRUE, true, True, 0, f, F, FALSE, false, False)"
_DURATION = re.compile(r"^[-+]?(?:(?:\d+\.?\d*|\.\d+)(?:ns|us|µs|μs|ms|s|m|h))+$")
_DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_DURATION_UNITS: Final = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


class Kind(enum.Enum):
    """How a flag's value is read."""

    STRING = "string"
    BOOL = "bool"
    #: Go ``time.Duration`` text: ``5s``, ``1m30s``, ``500ms``.
    DURATION = "duration"
    #: Go ``uint16``.
    UINT16 = "uint16"
    #: One of ``choices``.
    CHOICE = "choice"


@attrs.frozen(kw_only=True)
class IstioFlag:
    """One flag of ``istio-iptables`` (or a meshredirect extension of it)."""

    #: Long name without the dashes.
    name: str
    short: str | None = None
    #: Environment variables, in the order Istio applies them (a later one wins).
    env: tuple[str, ...] = ()
    kind: Kind = Kind.STRING
    default: str = ""
    #: The :data:`~meshredirect.frontends.istio.ISTIO_DEFAULTS` field it feeds, or None for how to run.
    field: str | None = None
    help: str = ""
    choices: tuple[str, ...] = ()
    #: Not an ``istio-iptables`` flag: added by meshredirect (named in the help).
    extension: bool = False

    @property
    def label(self) -> str:
        """How errors name the flag: ``-p/--envoy-port``."""
        return f"-{self.short}/--{self.name}" if self.short else f"--{self.name}"


def _env(name: str) -> str:
    return name.upper().replace("-", "_")


def _flag(name: str, short: str | None = None, *, extra_env: tuple[str, ...] = (), **kw: Any) -> IstioFlag:
    return IstioFlag(name=name, short=short, env=(_env(name), *extra_env), **kw)


#: Every flag, in ``istio-iptables --help`` order. Defaults are Istio's.
FLAGS: Final[tuple[IstioFlag, ...]] = (
    _flag("envoy-port", "p", default="15001", field="proxy_port", help="the port all captured outbound TCP goes to"),
    _flag(
        "inbound-capture-port",
        "z",
        default="15006",
        field="inbound_capture_port",
        help="the port all captured inbound TCP goes to",
    ),
    _flag(
        "inbound-tunnel-port",
        "e",
        default="15008",
        field="inbound_tunnel_port",
        help="the proxy's tunnel port, never captured inbound",
    ),
    _flag(
        "proxy-uid",
        "u",
        field="proxy_uid",
        help="uid(s) of the proxy, never captured (default: the uid of $ENVOY_USER, else 1337)",
    ),
    _flag("proxy-gid", "g", field="proxy_gid", help="gid(s) of the proxy, never captured (default: the uid)"),
    _flag(
        "istio-inbound-interception-mode",
        "m",
        field="inbound_interception_mode",
        help='how inbound connections reach the proxy: "REDIRECT" (default) or "TPROXY"',
    ),
    _flag(
        "istio-inbound-ports",
        "b",
        field="inbound_ports_include",
        help='inbound ports captured, comma separated; "*" for all; empty for none',
    ),
    _flag(
        "istio-local-exclude-ports",
        "d",
        field="inbound_ports_exclude",
        help='inbound ports left alone; only with -b "*"',
    ),
    _flag(
        "istio-exclude-interfaces",
        "c",
        field="exclude_interfaces",
        help="interfaces whose traffic is never captured, comma separated",
    ),
    _flag(
        "istio-service-cidr",
        "i",
        field="outbound_ip_ranges_include",
        help='outbound CIDRs captured, comma separated; "*" for all; empty for none',
    ),
    _flag(
        "istio-service-exclude-cidr",
        "x",
        field="outbound_ip_ranges_exclude",
        help="outbound CIDRs never captured, comma separated",
    ),
    _flag(
        "istio-outbound-ports",
        "q",
        field="outbound_ports_include",
        help="outbound ports captured whatever the address, comma separated",
    ),
    _flag(
        "istio-local-outbound-ports-exclude",
        "o",
        field="outbound_ports_exclude",
        help="outbound ports never captured, comma separated",
    ),
    _flag(
        "kube-virt-interfaces",
        "k",
        field="reroute_virtual_interfaces",
        help="interfaces whose inbound traffic (from a VM) is treated as outbound",
    ),
    _flag("istio-inbound-tproxy-mark", "t", default="1337", field="inbound_tproxy_mark", help="TPROXY packet mark"),
    _flag(
        "istio-inbound-tproxy-route-table",
        "r",
        default="133",
        field="inbound_tproxy_route_table",
        help="TPROXY route table",
    ),
    _flag("dry-run", "n", kind=Kind.BOOL, default="false", help="print the rules; change nothing"),
    _flag(
        "iptables-probe-port",
        kind=Kind.UINT16,
        default="15002",
        help="port the validation listens on (with --run-validation)",
    ),
    _flag("probe-timeout", kind=Kind.DURATION, default="5s", help="validation timeout (with --run-validation)"),
    _flag("skip-rule-apply", kind=Kind.BOOL, default="false", help="apply nothing"),
    _flag(
        "run-validation",
        kind=Kind.BOOL,
        default="false",
        help="check with real connections that capture works (exit 126 when not)",
    ),
    _flag(
        "redirect-dns",
        kind=Kind.BOOL,
        default="false",
        field="redirect_dns",
        extra_env=("ISTIO_META_DNS_CAPTURE",),
        help="capture DNS to the agent (port 15053)",
    ),
    _flag(
        "drop-invalid",
        kind=Kind.BOOL,
        default="false",
        field="drop_invalid",
        extra_env=("INVALID_DROP",),
        help="drop packets conntrack finds INVALID",
    ),
    _flag(
        "dual-stack",
        kind=Kind.BOOL,
        default="false",
        extra_env=("ISTIO_DUAL_STACK",),
        help="the pod may have IPv4 and IPv6 addresses (IPv6 rules when it has any IPv6 address)",
    ),
    _flag(
        "capture-all-dns",
        kind=Kind.BOOL,
        default="false",
        field="capture_all_dns",
        help="capture every DNS query on port 53, not only those to the resolv.conf servers",
    ),
    _flag("network-namespace", help="the network namespace to program: a path or a name under /var/run/netns"),
    _flag(
        "cni-mode",
        kind=Kind.BOOL,
        default="false",
        help="run as Istio's CNI plugin does (accepted: the rules are the same; the standard xtables lock is used)",
    ),
    _flag(
        "reconcile",
        kind=Kind.BOOL,
        default="false",
        help="replace rules of ours that differ from the wanted ones instead of failing",
    ),
    _flag("cleanup-only", kind=Kind.BOOL, default="false", help="remove our rules and program nothing"),
    _flag(
        "force-apply",
        kind=Kind.BOOL,
        default="false",
        help="apply even when the rules appear to be in place",
    ),
    _flag(
        "native-nftables",
        kind=Kind.BOOL,
        default="false",
        help="use nftables instead of iptables (needs the nftables backend)",
    ),
    _flag(
        "force-iptables-binary",
        kind=Kind.CHOICE,
        choices=("", "nft", "legacy"),
        help='iptables variant: "nft" or "legacy" (default: legacy when legacy tables hold rules, else nft)',
    ),
    _flag(
        "enable-ipv6",
        kind=Kind.CHOICE,
        choices=("auto", "true", "false"),
        default="auto",
        extra_env=("ENABLE_INBOUND_IPV6",),
        extension=True,
        help='also program IPv6: "auto" decides from the pod\'s addresses as istio-iptables does',
    ),
    _flag(
        "resolv-conf",
        default=RESOLV_CONF,
        extension=True,
        help="where to read the DNS servers for --redirect-dns",
    ),
)

#: Variables without a flag (their value feeds a configuration field, or None: used otherwise).
ENV_ONLY: Final[dict[str, tuple[str | None, str, str]]] = {
    "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR": (
        "host_ipv4_loopback_cidr",
        "127.0.0.1/32",
        "IPv4 destinations that count as localhost outbound",
    ),
    "ISTIO_OUTBOUND_OWNER_GROUPS": ("owner_groups_include", "*", "groups whose outbound traffic is captured"),
    "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE": (
        "owner_groups_exclude",
        "",
        "groups whose outbound traffic is never captured",
    ),
    "ENVOY_USER": (None, DEFAULT_ENVOY_USER, "the user whose uid is the proxy's when -u is empty"),
}

#: Flags of earlier istio-iptables releases, refused with what to use instead.
RETIRED: Final = {
    "force-legacy-iptables": "--force-iptables-binary=legacy (its replacement in istio-iptables)",
    "iptables-trace-logging": "'meshredirect graph' to see the rules (istio-iptables dropped this flag)",
    "restore-format": "nothing: the rules are always applied with iptables-restore (istio-iptables dropped -f)",
    "host-nsenter-exec": "--network-namespace PATH, which enters the namespace with nsenter",
}

_BY_LONG: Final = {f.name: f for f in FLAGS}
_BY_SHORT: Final = {f.short: f for f in FLAGS if f.short}
#: Policy field -> configuration field, to name the flag in errors raised by the policy.
_CONFIG_OF_POLICY_FIELD: Final = {
    "outbound_port": "proxy_port",
    "inbound_port": "inbound_capture_port",
    "inbound_tunnel_port": "inbound_tunnel_port",
    "proxy_uids": "proxy_uid",
    "proxy_gids": "proxy_gid",
    "inbound_mode": "inbound_interception_mode",
    "tproxy_mark": "inbound_tproxy_mark",
    "tproxy_route_table": "inbound_tproxy_route_table",
    "inbound_ports": "inbound_ports_include",
    "inbound_ports_exclude": "inbound_ports_exclude",
    "outbound_cidrs": "outbound_ip_ranges_include",
    "outbound_cidrs_exclude": "outbound_ip_ranges_exclude",
    "outbound_ports": "outbound_ports_include",
    "outbound_ports_exclude": "outbound_ports_exclude",
    "exclude_interfaces": "exclude_interfaces",
    "reroute_interfaces": "reroute_virtual_interfaces",
    "owner_groups_include": "owner_groups_include",
    "owner_groups_exclude": "owner_groups_exclude",
    "loopback_cidr": "host_ipv4_loopback_cidr",
    "drop_invalid": "drop_invalid",
    "dns.enabled": "redirect_dns",
    "dns.capture_all": "capture_all_dns",
}


def _parse_bool(text: str, where: str) -> bool:
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise PolicyError(where, expected=_BOOL_EXPECTED, got=text)


def _parse_duration(text: str, where: str) -> float:
    """Go ``time.ParseDuration`` to seconds; negative durations are refused."""
    if text == "0":
        return 0.0
    if not _DURATION.match(text):
        raise PolicyError(where, expected="a duration such as 5s, 1m30s or 500ms", got=text)
    seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(text))
    if text.startswith("-") and seconds:
        raise PolicyError(where, expected="a duration that is not negative", got=text)
    return seconds


def _check_value(flag: IstioFlag, text: str, where: str) -> None:
    match flag.kind:
        case Kind.STRING:
            return
        case Kind.BOOL:
            _parse_bool(text, where)
        case Kind.DURATION:
            _parse_duration(text, where)
        case Kind.UINT16:
            if not text.isdigit() or int(text) > 65535:
                raise PolicyError(where, expected="a number 0-65535", got=text)
        case Kind.CHOICE:
            if text not in flag.choices:
                shown = " or ".join(repr(c) for c in flag.choices if c) + (" (or empty)" if "" in flag.choices else "")
                raise PolicyError(where, expected=shown, got=text)


def _unknown(arg: str, names: Iterable[str]) -> PolicyError:
    close = difflib.get_close_matches(arg, list(names), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return PolicyError("istio-iptables", expected=f"a known flag{hint}", got=arg)


@attrs.frozen(kw_only=True)
class IstioFlags:
    """A parsed ``istio-iptables`` invocation: every flag's value and where it came from."""

    #: Flag name -> its text (the default when nothing set it).
    values: Mapping[str, str]
    #: Flag name -> how it was set (``-p/--envoy-port``, ``ENVOY_PORT (environment)``); defaults absent.
    sources: Mapping[str, str]
    #: The environment-only variables that were set.
    env_only: Mapping[str, str]
    #: ``-h`` or ``--help`` was given.
    help: bool = False

    def text(self, name: str) -> str:
        return self.values[name]

    def flag(self, name: str) -> bool:
        """A boolean flag's value."""
        return _parse_bool(self.values[name], name)

    def seconds(self, name: str) -> float:
        """A duration flag's value in seconds."""
        return _parse_duration(self.values[name], name)

    def given(self, name: str) -> bool:
        """Whether the flag was set on the command line or in the environment."""
        return name in self.sources

    def where(self, name: str) -> str:
        """How errors name the origin of a flag's value."""
        return self.sources.get(name) or f"{_BY_LONG[name].label} (default)"

    # ------------------------------------------------------------------ to a policy

    def config(
        self,
        *,
        proxy_uid_lookup: Callable[[str], int | None],
        dns_servers: Sequence[str],
        enable_ipv6: bool,
    ) -> tuple[dict[str, Any], list[str]]:
        """The configuration fields of :func:`~meshredirect.frontends.istio.policy_from_istio_config`, and warnings.

        ``proxy_uid_lookup`` maps a user name to its uid (``ENVOY_USER``, when
        ``-u`` is empty); ``dns_servers`` are resolv.conf's; ``enable_ipv6``
        whether the pod has IPv6 (Istio detects it from the pod's addresses).
        """
        config: dict[str, Any] = {}
        for flag in FLAGS:
            if flag.field is not None:
                config[flag.field] = self.flag(flag.name) if flag.kind is Kind.BOOL else self.values[flag.name]
        for variable, (field, default, _help) in ENV_ONLY.items():
            if field is not None:
                config[field] = self.env_only.get(variable, default)
        warnings: list[str] = []
        if not config["proxy_uid"].strip():
            user = self.env_only.get("ENVOY_USER", DEFAULT_ENVOY_USER)
            uid = proxy_uid_lookup(user)
            config["proxy_uid"] = str(uid) if uid is not None else DEFAULT_PROXY_UID
        mode = config["inbound_interception_mode"]
        if mode not in ("", "REDIRECT", "TPROXY"):
            raise PolicyError(
                self.where("istio-inbound-interception-mode"),
                expected="REDIRECT or TPROXY (istio-iptables would silently treat any other value as REDIRECT)",
                got=mode,
            )
        config["inbound_interception_mode"] = mode or "REDIRECT"
        v4 = [s for s in dns_servers if ipaddress.ip_address(s).version == 4]
        v6 = [s for s in dns_servers if ipaddress.ip_address(s).version == 6]
        config["dns_servers_v4"], config["dns_servers_v6"] = v4, v6
        config["enable_ipv6"] = enable_ipv6
        if config["redirect_dns"] and not config["capture_all_dns"] and not (v4 or (v6 and enable_ipv6)):
            warnings.append(
                f"--redirect-dns is set but --capture-all-dns is not and {self.values['resolv-conf']} names no "
                "DNS server for the families programmed: DNS capture is disabled (as istio-iptables does)"
            )
        if str(config["inbound_ports_exclude"]).strip(", ") and str(config["inbound_ports_include"]).strip() != "*":
            warnings.append(
                f"{self.where('istio-local-exclude-ports')} is ignored: inbound exclusions apply only with "
                "-b '*' (as in istio-iptables)"
            )
        return config, warnings

    def policy(
        self,
        *,
        proxy_uid_lookup: Callable[[str], int | None],
        dns_servers: Sequence[str],
        enable_ipv6: bool,
        warnings: list[str] | None = None,
    ) -> Any:
        """The :class:`~meshredirect.policy.Policy` of this invocation; errors name the flag that gave the value."""
        from meshredirect.frontends.istio import policy_from_istio_config

        config, found = self.config(proxy_uid_lookup=proxy_uid_lookup, dns_servers=dns_servers, enable_ipv6=enable_ipv6)
        if warnings is not None:
            warnings.extend(found)
        try:
            return policy_from_istio_config(config)
        except PolicyError as exc:
            raise self.rename(exc) from None

    def rename(self, exc: PolicyError) -> PolicyError:
        """The same error, naming the flag or variable that set the field instead of the policy field."""
        where = self.origin_of(exc.field)
        if where is None:
            return exc
        if isinstance(exc, UnsafePolicyError):
            return UnsafePolicyError(where, reason=exc.reason, got=exc.got)
        return PolicyError(where, expected=exc.expected, got=exc.got)

    def origin_of(self, policy_field: str) -> str | None:
        """The flag or variable that set a policy field (``-p/--envoy-port``), or None when unknown."""
        config_field = _CONFIG_OF_POLICY_FIELD.get(policy_field)
        if policy_field == "dns.servers":
            return self.values["resolv-conf"]
        if config_field is None:
            return None
        for variable, (field, _default, _help) in ENV_ONLY.items():
            if field == config_field:
                return f"{variable} (environment)"
        for flag in FLAGS:
            if flag.field == config_field:
                if config_field == "proxy_gid" and not self.values["proxy-gid"].strip():
                    return f"{self.where('proxy-uid')} (also the gid: -g is empty)"
                return self.where(flag.name)
        return None


def parse_istio_flags(argv: Sequence[str], environ: Mapping[str, str]) -> IstioFlags:
    """Read an ``istio-iptables`` command line and environment (see the module docstring).

    >>> flags = parse_istio_flags(["-nb*", "--redirect-dns=false", "-p=15001"], environ={"ISTIO_META_DNS_CAPTURE": "true"})
    >>> flags.flag("dry-run"), flags.text("istio-inbound-ports"), flags.flag("redirect-dns"), flags.where("envoy-port")
    (True, '*', False, '-p/--envoy-port')
    """
    values = {f.name: f.default for f in FLAGS}
    sources: dict[str, str] = {}
    for flag in FLAGS:
        for variable in flag.env:
            if variable in environ:
                where = f"{variable} (environment)"
                _check_value(flag, environ[variable], where)
                values[flag.name], sources[flag.name] = environ[variable], where
    env_only = {name: environ[name] for name in ENV_ONLY if name in environ}
    wants_help = False

    def take(flag: IstioFlag, value: str, where: str) -> None:
        _check_value(flag, value, where)
        values[flag.name], sources[flag.name] = value, where

    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            if i < len(args):
                raise PolicyError("istio-iptables", expected="only flags (no arguments)", got=args[i])
            break
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            if name == "help":
                wants_help = True
                continue
            long_flag = _BY_LONG.get(name)
            if name in RETIRED:
                raise PolicyError(f"--{name}", expected=f"a current flag; use {RETIRED[name]}", got=arg)
            if long_flag is None:
                raise _unknown(f"--{name}", [f"--{n}" for n in _BY_LONG])
            flag = long_flag
            if flag.kind is Kind.BOOL:
                take(flag, value if eq else "true", flag.label)
            elif eq:
                take(flag, value, flag.label)
            elif i < len(args):
                take(flag, args[i], flag.label)
                i += 1
            else:
                raise PolicyError(flag.label, expected="a value", got="nothing (the command line ends)")
            continue
        if arg.startswith("-") and len(arg) > 1:
            cluster = arg[1:]
            j = 0
            while j < len(cluster):
                letter = cluster[j]
                j += 1
                if letter == "h":
                    wants_help = True
                    continue
                short_flag = _BY_SHORT.get(letter)
                if short_flag is None:
                    raise _unknown(f"-{letter}", [f"-{s}" for s in _BY_SHORT])
                flag = short_flag
                rest = cluster[j:]
                if flag.kind is Kind.BOOL:
                    if rest.startswith("="):
                        take(flag, rest[1:], flag.label)
                        break
                    take(flag, "true", flag.label)
                    continue
                if rest:
                    take(flag, rest.removeprefix("="), flag.label)
                elif i < len(args):
                    take(flag, args[i], flag.label)
                    i += 1
                else:
                    raise PolicyError(flag.label, expected="a value", got="nothing (the command line ends)")
                break
            continue
        raise PolicyError("istio-iptables", expected="only flags (no arguments)", got=arg)
    return IstioFlags(values=values, sources=sources, env_only=env_only, help=wants_help)


def parse_resolv_conf(text: str) -> tuple[str, ...]:
    """The ``nameserver`` addresses of a resolv.conf, in order (a zone index such as ``%eth0`` dropped).

    >>> parse_resolv_conf("search svc.cluster.local\\nnameserver 10.96.0.10\\nnameserver fd00::a%eth0 # x\\n")
    ('10.96.0.10', 'fd00::a')
    """
    servers: list[str] = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(words) >= 2 and words[0] == "nameserver":
            address = words[1].split("%", 1)[0]
            try:
                servers.append(str(ipaddress.ip_address(address)))
            except ValueError:
                continue
    return tuple(servers)


def addresses_enable_ipv6(addresses: Iterable[str], *, dual_stack: bool) -> bool | None:
    """Whether ``istio-iptables`` would program IPv6 for a pod with these addresses (in interface order).

    Loopback and link-local addresses do not count. Without dual stack the first
    address decides; with it, any IPv6 address. None when no address counts
    (``istio-iptables`` fails then).

    >>> addresses_enable_ipv6(["127.0.0.1", "fe80::1", "10.1.0.5", "fd00::5"], dual_stack=False)
    False
    >>> addresses_enable_ipv6(["127.0.0.1", "10.1.0.5", "fd00::5"], dual_stack=True)
    True
    """
    found = False
    for text in addresses:
        address = ipaddress.ip_address(text.split("/", 1)[0].split("%", 1)[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if address.is_loopback or address.is_link_local or address.is_multicast:
            continue
        if not dual_stack:
            return address.version == 6
        found = True
        if address.version == 6:
            return True
    return False if found else None


def format_help() -> str:
    """The help text of ``meshredirect istio-iptables``."""
    lines = [
        "usage: meshredirect istio-iptables [flags]",
        "",
        "Program the rules istio-iptables would, with its flags, short forms and environment variables.",
        "",
        "flags:",
    ]
    for flag in FLAGS:
        names = (f"-{flag.short}, " if flag.short else "    ") + f"--{flag.name}"
        kind = "" if flag.kind is Kind.BOOL else f" {flag.kind.value}"
        details = [f"env {', '.join(flag.env)}"]
        if flag.default:
            details.append(f"default {flag.default}")
        if flag.extension:
            details.append("meshredirect extension")
        lines.append(f"  {names + kind:<48}{flag.help} ({'; '.join(details)})")
    lines += ["", "environment only:"]
    for variable, (_field, default, text) in ENV_ONLY.items():
        lines.append(f"  {variable:<48}{text} (default {default or 'empty'})")
    return "\n".join(lines) + "\n"
