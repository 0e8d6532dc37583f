"""Our nftables tables loaded through libnftables' bindings into real namespaces, and read back.

Checks that what the kernel lists (``nft -j list ruleset``, read by the core's
reader) is exactly the layout the backend loaded, for every Istio case, for
generated policies and for every IR node the backend lowers; that the text
rendering loads to the same rules; that a failed transaction changes nothing;
that cleanup leaves other tools' tables byte for byte; that an IPv4-only
policy does not capture IPv6 (real connections); and that the rules on a
connection's path do not grow with the number of excluded CIDRs and ports.
"""

from __future__ import annotations

import grp
import ipaddress
import json
import sys

import attrs
import pytest
from hypothesis import HealthCheck, given, settings

from conformance import ISTIO, istio_cases
from conftest import require_kernel
from kernel.test_iptables_load import FOREIGN_V4
from meshredirect.api import render, resolve_groups
from meshredirect.apply.nftables import NftablesApplier, NftablesRequestFailed
from meshredirect.compiler import compile_policy
from meshredirect.errors import EnvironmentProblem, UnsafePolicyError
from meshredirect.frontends.istio import policy_from_istio_config
from meshredirect.ir import (
    Accept,
    AddressMatch,
    Chain,
    CtState,
    CtStateMatch,
    Direction,
    Family,
    Goto,
    Hook,
    InterfaceMatch,
    Jump,
    MarkMatch,
    Match,
    OwnerKind,
    OwnerMatch,
    PortMatch,
    Protocol,
    ProtocolMatch,
    Redirect,
    Return,
    Rule,
    Ruleset,
    SetMark,
    Table,
    iptables_base_chain,
)
from meshredirect.policy import Policy
from meshredirect.readers.nftables import read_nft_json
from meshredirect.semantics.equivalence import equivalence_report
from meshredirect.semantics.model import Environment
from meshredirect.testing.netns import NetNamespace
from meshredirect.testing.samples import SAMPLE_MATCHES, SAMPLE_TARGETS, TARGET_PLACES
from meshredirect.testing.strategies import policies
from meshredirect.values import AddressSet, IdSet, PortSet
from meshredirect_nftables import NftLowering

pytestmark = pytest.mark.kernel

CASES = istio_cases()


@pytest.fixture(autouse=True)
def _kernel() -> None:
    require_kernel()


def _system_group(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def assert_loads_and_reads_back(ruleset: Ruleset, **options: object) -> Ruleset:
    """Load through the bindings into a fresh namespace; the kernel's listing reads back as the layout."""
    with NetNamespace() as ns:
        applier = NftablesApplier(ns.name, **options)  # type: ignore[arg-type]
        change = applier.apply(ruleset)
        back = applier.read()
    laid = applier.laid_out(ruleset)
    assert change.changed == bool(laid.tables)
    assert back == laid, "the kernel's rules read back differ from what was loaded"
    return back


@pytest.mark.parametrize("case", sorted(CASES))
def test_istio_case_loads_and_reads_back_as_loaded(case: str) -> None:
    policy = policy_from_istio_config(CASES[case])
    if policy.unresolved_groups():
        missing = [g for g in policy.unresolved_groups() if _system_group(g) is None]
        if missing:
            with pytest.raises(UnsafePolicyError, match=f"group '{missing[0]}' does not exist on this machine"):
                resolve_groups(policy, _system_group)
            return
        policy = resolve_groups(policy, _system_group)
    ruleset = compile_policy(policy)
    back = assert_loads_and_reads_back(ruleset)
    # What the kernel holds means what the compiler meant (and what the iptables backends render), class by class.
    report = equivalence_report(ruleset, back, Environment.for_policy(policy))
    assert report.equivalent, "\n".join(str(d) for d in report.differences[:3])


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policies())
def test_generated_policies_load_and_read_back_as_loaded(policy: Policy) -> None:
    assert_loads_and_reads_back(compile_policy(policy))


def _sample_ruleset() -> Ruleset:
    """Every sample node the backend lowers, each in a rule of a chain where the kernel accepts it."""
    lowering = NftLowering(table="samples")
    rules: dict[tuple[str, Hook], list[Rule]] = {}

    def keep(rule: Rule, place: tuple[str, Hook]) -> None:
        table = Table(family=Family.IPV4, name=place[0], chains=(
            Chain(name=place[1].value, rules=(rule,), base=iptables_base_chain(*place)),
            Chain(name="MESH_NEXT", rules=(Rule(target=Return()),))))  # fmt: skip
        try:
            lowering.commands(Ruleset(tables=(table,)))
        except Exception:  # refused: shown by the support matrix in tests/test_nftables_backend.py
            return
        rules.setdefault(place, []).append(rule)

    for match in (m for items in SAMPLE_MATCHES.values() for m in items):
        incoming = isinstance(match, InterfaceMatch) and match.direction is Direction.SOURCE
        keep(Rule(matches=(match,), target=Accept()), ("filter", Hook.FORWARD if incoming else Hook.OUTPUT))
    for target in (t for items in SAMPLE_TARGETS.values() for t in items):
        needs_tcp = type(target).__name__ in ("Redirect", "TProxy", "Masquerade", "Dnat")
        extra: tuple[Match, ...] = (ProtocolMatch(protocol=Protocol.TCP),) if needs_tcp else ()
        keep(Rule(matches=extra, target=target), TARGET_PLACES.get(type(target), ("mangle", Hook.OUTPUT)))
    tables = []
    for name in ("raw", "mangle", "nat", "filter"):
        chains = [
            Chain(name=hook.value, rules=tuple(rules[(name, hook)]), base=iptables_base_chain(name, hook))
            for hook in Hook
            if (name, hook) in rules
        ]
        chains.append(Chain(name="MESH_NEXT", rules=(Rule(target=Return()),)))
        tables.append(Table(family=Family.IPV4, name=name, chains=tuple(chains)))
    return Ruleset(tables=tuple(tables))


def test_every_sample_node_the_backend_lowers_reads_back_from_the_kernel_as_loaded() -> None:
    ruleset = _sample_ruleset()
    lowered = sum(len(c.rules) for t in ruleset.tables for c in t.chains)
    assert lowered >= 40  # everything but the refused nodes
    assert_loads_and_reads_back(ruleset, table="samples")


@pytest.mark.parametrize(
    "policy",
    [Policy(), Policy(families="both", inbound_mode="TPROXY", drop_invalid=True, dns={"enabled": True, "capture_all": True},
                      exclude_interfaces="eth9", reroute_interfaces="net1", outbound_ports_exclude="5432,6379-6380")],
    ids=["default", "everything"],
)  # fmt: skip
def test_the_text_rendering_loads_to_the_same_rules_as_the_json(policy: Policy) -> None:
    ruleset = compile_policy(policy)
    text = render(ruleset, "nftables").artifacts
    with NetNamespace() as ns:
        for artifact in text:
            ns.run(["nft", "-f", "-"], input=artifact.content)
        back = read_nft_json(ns.run(["nft", "-j", "list", "ruleset"]).stdout)
    assert back == NftLowering().layout(ruleset)


# ----------------------------------------------------------------------------- transactions


def _listing(ns: NetNamespace) -> str:
    return ns.run(["nft", "list", "ruleset"]).stdout


def test_applying_twice_changes_nothing_and_a_new_policy_replaces_the_old_one() -> None:
    dual = compile_policy(Policy(families="both", inbound_mode="TPROXY"))
    plain = compile_policy(Policy(inbound_ports=""))
    with NetNamespace() as ns:
        applier = NftablesApplier(ns.name)
        assert applier.apply(dual).changed
        once = _listing(ns)
        assert not applier.apply(dual).changed
        assert _listing(ns) == once
        assert applier.apply(plain).changed  # the ip6 table of the dual-stack policy goes too
        assert applier.read() == applier.laid_out(plain) == NftLowering().layout(plain)


def test_families_in_scope_decide_which_tables_of_ours_are_touched() -> None:
    """An inet table of ours is in scope when both IPv4 and IPv6 are (the default), not for one family alone."""
    ruleset = compile_policy(Policy())
    inet = attrs.evolve(ruleset, tables=tuple(attrs.evolve(t, family=Family.INET) for t in ruleset.tables))
    with NetNamespace() as ns:
        applier = NftablesApplier(ns.name)
        assert applier.apply(inet).changed and not applier.apply(inet).changed
        assert applier.apply(ruleset, [Family.IPV4]).changed
        assert [t.family for t in applier.read().tables] == [Family.INET, Family.IPV4]
        assert applier.apply(ruleset).changed  # both families: our inet table goes
        assert [t.family for t in applier.read().tables] == [Family.IPV4]
        assert not applier.cleanup("ISTIO", [Family.IPV6]).changed
        assert applier.cleanup("ISTIO").changed and not applier.read().tables


def test_a_rule_the_kernel_rejects_leaves_the_previous_table_intact() -> None:
    with NetNamespace() as ns:
        applier = NftablesApplier(ns.name)
        applier.apply(compile_policy(Policy()))
        before = ns.run(["nft", "-j", "list", "ruleset"]).stdout
        commands = applier.layout.commands(compile_policy(Policy(inbound_mode="TPROXY", inbound_ports="80")))
        # nft accepts this rule; the kernel refuses tproxy outside prerouting, so the whole batch fails.
        bad = {"add": {"rule": {"family": "ip", "table": "istio", "chain": "nat-OUTPUT", "expr": [
            {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}},
            {"tproxy": {"port": 1}}, {"accept": None}]}}}  # fmt: skip
        with pytest.raises(NftablesRequestFailed) as info:
            applier.load({"nftables": [*commands[Family.IPV4], bad]})
        assert "Operation not supported" in info.value.error
        assert str(info.value).startswith("nft refused the rules: ")
        assert ns.run(["nft", "-j", "list", "ruleset"]).stdout == before


def test_cleanup_keeps_other_tables_byte_for_byte() -> None:
    istio_nft = (ISTIO / "nftables" / "inbound-ports-wildcard-tproxy.golden").read_text()
    with NetNamespace() as ns:
        ns.run(["iptables-nft-restore"], input=FOREIGN_V4)
        ns.run(["nft", "-f", "-"], input=istio_nft)
        before = _listing(ns)
        applier = NftablesApplier(ns.name)
        applier.apply(compile_policy(Policy(families="both", inbound_mode="TPROXY", drop_invalid=True)))
        during = _listing(ns)
        assert "table ip istio {" in during and "table ip6 istio {" in during and "table ip nat {" in during
        change = applier.cleanup("ISTIO")
        assert change.changed and change.family is Family.INET
        assert [c["delete"]["table"]["family"] for c in json.loads(change.document)["nftables"]] == ["ip", "ip6"]
        assert _listing(ns) == before
        assert not applier.cleanup("istio").changed


def test_a_missing_namespace_is_a_clear_environment_problem() -> None:
    with pytest.raises(EnvironmentProblem, match="network namespace /var/run/netns/mr-no-such-ns does not exist"):
        NftablesApplier("mr-no-such-ns").read()


# ----------------------------------------------------------------------------- families, by real connections

#: Runs inside the namespace: listeners on the outbound port, then one connection per family to an address
#: routed out of a veth interface (not local, so not exempt as loopback). Captured connections are
#: redirected to the listener; the others leave by the veth, where nobody answers (the connect times out).
_PROBE = """
import json, socket, sys
port = int(sys.argv[1])
listeners = {}
for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
    s = socket.socket(family, socket.SOCK_STREAM)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((host, port)); s.listen(8); listeners[family] = s
result = {}
for family, address in ((socket.AF_INET, "10.9.0.2"), (socket.AF_INET6, "fd09::2")):
    c = socket.socket(family, socket.SOCK_STREAM); c.settimeout(0.5)
    try:
        c.connect((address, 80)); result[address] = "captured"
    except OSError:
        result[address] = "not captured"
    c.close()
print(json.dumps(result))
"""


@pytest.mark.parametrize(
    ("families", "expected"),
    [("ipv4", {"10.9.0.2": "captured", "fd09::2": "not captured"}),
     ("ipv6", {"10.9.0.2": "not captured", "fd09::2": "captured"}),
     ("both", {"10.9.0.2": "captured", "fd09::2": "captured"})],
)  # fmt: skip
def test_a_policy_captures_only_its_own_families(families: str, expected: dict[str, str]) -> None:
    with NetNamespace() as ns:
        for command in (
            ["ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1"],
            ["ip", "link", "set", "v0", "up"],
            ["ip", "link", "set", "v1", "up"],
            ["ip", "addr", "add", "10.9.0.1/24", "dev", "v0"],
            ["ip", "-6", "addr", "add", "fd09::1/64", "dev", "v0", "nodad"],
        ):
            ns.run(command)
        NftablesApplier(ns.name).apply(compile_policy(Policy(families=families)))
        got = json.loads(ns.run([sys.executable, "-c", _PROBE, "15001"]).stdout)
    assert got == expected


# ----------------------------------------------------------------------------- rules on the path

EXCLUDED_CIDRS = 1000
EXCLUDED_PORTS = 100


def _excluding(cidrs: int, ports: int) -> Policy:
    networks = [str(ipaddress.ip_network((0x0B000000 + (i << 10), 23))) for i in range(cidrs)]  # 11.x, apart
    port_list = [20000 + 2 * i for i in range(ports)]  # not adjacent: each stays its own member
    return Policy(outbound_cidrs_exclude=networks, outbound_ports_exclude=port_list, inbound_ports_exclude=port_list)


def rules_on_paths(table: Table, hook: Hook) -> int:
    """Rules a packet can meet at a hook: every rule of every chain reachable from its base chains (an upper bound)."""
    seen: set[str] = set()
    todo = [c.name for c in table.chains if c.base is not None and c.base.hook is hook]
    count = 0
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for rule in table.chain(name).rules:
            count += 1
            if isinstance(rule.target, (Jump, Goto)):
                todo.append(rule.target.chain)
    return count


def test_rules_on_a_connections_path_do_not_grow_with_excluded_cidrs_and_ports() -> None:
    with NetNamespace() as ns:
        applier = NftablesApplier(ns.name)
        applier.apply(compile_policy(_excluding(1, 1)))
        few = applier.read().tables[0]
        applier.apply(compile_policy(_excluding(EXCLUDED_CIDRS, EXCLUDED_PORTS)))
        many = applier.read().tables[0]
    for hook in (Hook.OUTPUT, Hook.PREROUTING):
        assert rules_on_paths(many, hook) == rules_on_paths(few, hook)
    # The kernel really holds the 1,000 CIDRs and 100 ports, each set in one rule: one lookup (the CIDRs share
    # theirs with the loopback address, which returns too).
    excluded = [
        m
        for c in many.chains
        for r in c.rules
        for m in r.matches
        if isinstance(m, AddressMatch) and len(m.addresses) > 1
    ]
    assert [len(m.addresses) for m in excluded] == [EXCLUDED_CIDRS + 1]
    port_sets = sorted(
        len(m.ports.intervals)
        for c in many.chains
        for r in c.rules
        for m in r.matches
        if getattr(m, "ports", None) and len(m.ports.intervals) > 1
    )  # type: ignore[union-attr]
    assert port_sets == [EXCLUDED_PORTS, EXCLUDED_PORTS + 1]  # outbound, and inbound with the tunnel port 15008
    # iptables, for contrast, puts one rule per CIDR on the path.
    iptables = render(compile_policy(_excluding(EXCLUDED_CIDRS, EXCLUDED_PORTS)), "iptables-save").text()
    assert iptables.count("-A ISTIO_OUTPUT -d 11.") == EXCLUDED_CIDRS


def test_istio_nft_goldens_load_and_read_back_without_unknown_nodes() -> None:
    """Istio's own nft rules (text) load into a namespace and read back as IR the semantics engine can run."""
    groups = {"java": 1001, "ftp": 1002}  # group names resolved as tests/test_compile_golden.py does
    for path in sorted((ISTIO / "nftables").glob("*.golden")):
        text = path.read_text()
        for name, gid in groups.items():
            text = text.replace(f"skgid {name} ", f"skgid {gid} ").replace(f"skgid != {name} ", f"skgid != {gid} ")
        with NetNamespace() as ns:
            ns.run(["nft", "-f", "-"], input=text)
            ruleset = read_nft_json(ns.run(["nft", "-j", "list", "ruleset"]).stdout, path=path.name)
        unknown = [r for t in ruleset.tables for c in t.chains for r in c.rules if "Unknown" in repr(r)]
        assert ruleset.tables and not unknown, path.name


FOREIGN_NFT = """\
table ip other {
    set excluded { type ipv4_addr; flags interval; elements = { 10.96.0.0/12, 192.168.1.1, 172.16.0.0-172.16.0.3 } }
    chain out {
        type nat hook output priority -100; policy accept;
        counter ip daddr @excluded return
        ip daddr 127.0.0.1/32 counter return
        meta l4proto tcp tcp dport { 15090, 15020-15021 } counter return
        meta skuid != { 1337, 5-9 } counter jump redir
        ip daddr vmap { 10.0.0.0/8 : jump redir, 11.0.0.0/8 : return }
        ct state established,related accept
        meta mark & 0xff == 0x3a meta mark set meta mark & 0xffff00ff ^ 0x1200
    }
    chain redir {
        meta l4proto tcp counter redirect to :15001
    }
}
"""


def test_a_real_listing_of_foreign_rules_reads_as_the_ir_it_means() -> None:
    """Handles, counters, metainfo, reordered elements, plain /32 addresses, ranges: what nft prints, read exactly."""
    with NetNamespace() as ns:
        ns.run(["nft", "-f", "-"], input=FOREIGN_NFT)
        listing = ns.run(["nft", "-j", "list", "ruleset"]).stdout
    table = read_nft_json(listing).tables[0]
    dst = Direction.DESTINATION
    out = table.chain("out").rules
    assert [(r.matches, r.target) for r in out] == [
        (
            (AddressMatch(direction=dst, addresses=AddressSet.of("10.96.0.0/12", "192.168.1.1", "172.16.0.0/30")),),
            Return(),
        ),
        ((AddressMatch(direction=dst, addresses=AddressSet.of("127.0.0.1")),), Return()),
        ((PortMatch(protocol=Protocol.TCP, ports=PortSet.of((15020, 15021), 15090)),), Return()),
        (
            (OwnerMatch(kind=OwnerKind.UID, ids=IdSet.of(1337, (5, 9)), negate=True, socketless=False),),
            Jump(chain="redir"),
        ),
        ((AddressMatch(direction=dst, addresses=AddressSet.of("11.0.0.0/8")),), Return()),
        ((AddressMatch(direction=dst, addresses=AddressSet.of("10.0.0.0/8")),), Jump(chain="redir")),
        ((CtStateMatch(states={CtState.ESTABLISHED, CtState.RELATED}),), Accept()),
        ((MarkMatch(value=0x3A, mask=0xFF),), SetMark(value=0x1200, mask=0xFF00)),
    ]
    assert table.chain("redir").rules == (
        Rule(matches=(ProtocolMatch(protocol=Protocol.TCP),), target=Redirect(ports=PortSet.of(15001))),
    )
    base = table.chain("out").base
    assert base is not None and (base.hook, base.priority) == (Hook.OUTPUT, -100)


#: Runs in the pod: the app listens on 80, the proxy (optionally) on 15006 with IP_TRANSPARENT; prints who accepted.
_POD = """
import json, select, socket, sys
transparent = sys.argv[1] == "1"
listeners = {}
app = socket.socket(); app.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); app.bind(("0.0.0.0", 80)); app.listen(4)
listeners[app] = "app"
if transparent:
    proxy = socket.socket(); proxy.setsockopt(socket.SOL_IP, 19, 1)  # IP_TRANSPARENT
    proxy.bind(("0.0.0.0", 15006)); proxy.listen(4); listeners[proxy] = "proxy"
print("ready", flush=True)
ready, _, _ = select.select(list(listeners), [], [], 1.5)
who = "nothing"
for s in ready:
    conn, _ = s.accept(); who = f"{listeners[s]} as {conn.getsockname()[0]}:{conn.getsockname()[1]}"; conn.close()
print(who, flush=True)
"""
_PEER = """
import socket
c = socket.socket(); c.settimeout(0.7)
try:
    c.connect(("10.10.0.1", 80))
except OSError:
    pass
"""


def _tproxy_probe(load: list[tuple[list[str], str]], *, transparent_listener: bool) -> str:
    """A connection from a peer namespace to the pod's port 80 in TPROXY mode: who accepts it?"""
    import subprocess

    with NetNamespace() as pod, NetNamespace() as peer:
        for command in (
            ["ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1"],
            ["ip", "link", "set", "v1", "netns", peer.name],
            ["ip", "link", "set", "v0", "up"],
            ["ip", "addr", "add", "10.10.0.1/24", "dev", "v0"],
            ["ip", "rule", "add", "fwmark", "1337", "lookup", "133"],
            ["ip", "route", "add", "local", "default", "dev", "lo", "table", "133"],
        ):
            pod.run(command)
        peer.run(["ip", "link", "set", "v1", "up"])
        peer.run(["ip", "addr", "add", "10.10.0.2/24", "dev", "v1"])
        for argv, text in load:
            pod.run(argv, input=text)
        server = pod.popen([sys.executable, "-c", _POD, "1" if transparent_listener else "0"], stdout=subprocess.PIPE)
        try:
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"
            peer.run([sys.executable, "-c", _PEER])
            return server.stdout.readline().strip()
        finally:
            server.kill()
            server.wait()


@pytest.mark.parametrize("listener", [True, False], ids=["proxy listening", "proxy down"])
def test_tproxy_with_real_connections_and_the_istio_nft_finding(listener: bool) -> None:
    """Ours drops when no transparent listener exists, as xt_TPROXY does; Istio's nft rule lets the app get it."""
    case = "inbound-ports-wildcard-tproxy"
    ours = render(compile_policy(policy_from_istio_config(CASES[case])), "nftables").text()
    istio_nft = (ISTIO / "nftables" / f"{case}.golden").read_text()
    istio_iptables = (ISTIO / "iptables" / f"{case}.v4.restore").read_text()
    got = {
        "ours": _tproxy_probe([(["nft", "-f", "-"], ours)], transparent_listener=listener),
        "istio iptables": _tproxy_probe(
            [(["iptables-nft-restore", "--noflush"], istio_iptables)], transparent_listener=listener
        ),
        "istio nft": _tproxy_probe([(["nft", "-f", "-"], istio_nft)], transparent_listener=listener),
    }
    if listener:
        assert got == dict.fromkeys(got, "proxy as 10.10.0.1:80")
    else:
        assert got == {"ours": "nothing", "istio iptables": "nothing", "istio nft": "app as 10.10.0.1:80"}


def test_without_a_namespace_the_applier_works_in_its_own_process_namespace() -> None:
    """With no namespace given the applier acts in its own: run it inside a throwaway namespace, never the host's."""
    code = (
        "from meshredirect.apply.nftables import NftablesApplier\n"
        "from meshredirect.compiler import compile_policy\n"
        "from meshredirect.policy import Policy\n"
        "applier = NftablesApplier()\n"
        "print(applier.apply(compile_policy(Policy())).changed, applier.apply(compile_policy(Policy())).changed)\n"
        "print([t.name for t in applier.read().tables])\n"
    )
    with NetNamespace() as ns:
        out = ns.run([sys.executable, "-c", code]).stdout.split("\n")
    assert out[:2] == ["True False", "['istio']"]


def test_a_dry_run_is_checked_by_the_kernel_and_changes_nothing() -> None:
    with NetNamespace() as ns:
        applier = NftablesApplier(ns.name)
        applier.apply(compile_policy(Policy()))
        before = ns.run(["nft", "-j", "list", "ruleset"]).stdout
        change = applier.apply(compile_policy(Policy(inbound_mode="TPROXY")), dry_run=True)
        assert change.changed and change.document  # would change
        assert ns.run(["nft", "-j", "list", "ruleset"]).stdout == before
        # The kernel, not only nft, checks it: a rule only the kernel refuses fails the dry run.
        bad = {"add": {"rule": {"family": "ip", "table": "istio", "chain": "nat-OUTPUT", "expr": [
            {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}},
            {"tproxy": {"port": 1}}, {"accept": None}]}}}  # fmt: skip
        with pytest.raises(NftablesRequestFailed, match="Operation not supported"):
            applier.load({"nftables": [bad]}, check_only=True)
        assert ns.run(["nft", "-j", "list", "ruleset"]).stdout == before
