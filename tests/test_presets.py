"""Presets: their documented values, and what LoopbackCapture.NONE changes in the compiled rules."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given, settings

from meshredirect.compiler import ChainNames, compile_policy
from meshredirect.errors import PolicyError
from meshredirect.ir import Family, InterfaceMatch, Jump, MarkMatch, SetMark
from meshredirect.policy import InterceptionMode, LoopbackCapture, Policy
from meshredirect.presets import PRESETS, preset
from meshredirect.semantics.equivalence import Difference, equivalent
from meshredirect.semantics.model import Origin
from meshredirect.testing.strategies import policies
from meshredirect.values import ALL, IdSet, PortSet


def test_linkerd_values_follow_proxy_init_defaults() -> None:
    p = preset("linkerd")
    assert (p.outbound_port, p.inbound_port, p.inbound_tunnel_port) == (4140, 4143, None)
    assert p.proxy_uids == IdSet.of(2102) and p.proxy_gids == IdSet(())
    assert p.inbound_ports is ALL
    assert p.inbound_ports_exclude == PortSet.of(4190, 4191, 4567, 4568)
    assert p.outbound_ports_exclude == PortSet.of(4567, 4568)
    assert p.loopback_capture is LoopbackCapture.NONE
    assert p.families == frozenset({Family.IPV4}) and not p.dns.enabled


def test_kuma_values_follow_its_default_config() -> None:
    p = preset("kuma")
    assert (p.outbound_port, p.inbound_port, p.inbound_tunnel_port) == (15001, 15006, None)
    assert p.proxy_uids == IdSet.of(5678) and p.proxy_gids == IdSet(())
    assert p.inbound_ports is ALL and p.inbound_ports_exclude == PortSet(())
    assert p.loopback_capture is LoopbackCapture.PROXY
    assert p.chain_prefix == "KUMA_MESH" and p.families == frozenset({Family.IPV4, Family.IPV6})


def test_every_preset_is_documented_with_a_source() -> None:
    for name, factory in PRESETS.items():
        assert factory.__doc__ and ("Source" in factory.__doc__ or name == "istio"), name


def test_unknown_preset_suggests_the_closest() -> None:
    with pytest.raises(PolicyError) as info:
        preset("linkred")
    assert (
        str(info.value)
        == "preset: expected one of istio, istio-1.4, kuma, linkerd (did you mean 'linkerd'?), got 'linkred'"
    )


def _hairpin_rules(policy: Policy) -> list[object]:
    """Rules that send a local connection over lo to the inbound port (nat) or mark it for TPROXY (mangle)."""
    names = ChainNames(policy.chain_prefix)
    found: list[object] = []
    for table, _chain, rule in compile_policy(policy).rules():
        over_lo = any(isinstance(m, InterfaceMatch) and m.name == "lo" and not m.negate for m in rule.matches)
        if not over_lo:
            continue
        if isinstance(rule.target, Jump) and rule.target.chain == names.in_redirect:
            found.append(rule)
        if (
            table.name == "mangle"
            and isinstance(rule.target, SetMark)
            and not any(isinstance(m, MarkMatch) for m in rule.matches)
        ):
            found.append(rule)
    return found


@pytest.mark.parametrize("mode", list(InterceptionMode))
def test_loopback_capture_none_compiles_no_hairpin(mode: InterceptionMode) -> None:
    base = Policy(inbound_mode=mode)
    assert _hairpin_rules(base), "the PROXY hairpin exists, so the check below can fail"
    assert _hairpin_rules(attrs.evolve(base, loopback_capture=LoopbackCapture.ALL))
    assert _hairpin_rules(attrs.evolve(base, loopback_capture=LoopbackCapture.NONE)) == []


def test_loopback_capture_none_still_returns_everything_over_lo() -> None:
    ruleset = compile_policy(preset("linkerd"))
    output = ruleset.tables[0].chain("PROXY_INIT_OUTPUT")
    assert any(
        [type(m) for m in r.matches] == [InterfaceMatch] and r.matches[0].name == "lo"  # type: ignore[attr-defined]
        for r in output.rules
    )


# ----------------------------------------------------------------------------- proofs (semantics engine)


def hairpin_only(policy: Policy, differences: tuple[Difference, ...]) -> bool:
    """Every difference is a local connection of the proxy over lo to a non-loopback address."""
    for difference in differences:
        c = difference.example
        socket = c.socket
        if c.origin is not Origin.LOCAL or c.oif != "lo" or socket is None:
            return False
        if socket.uid not in policy.proxy_uids and socket.gid not in policy.proxy_gids:
            return False
        if c.dst in policy.loopback_for(c.family):
            return False
    return True


def test_linkerd_differs_from_a_hairpinning_linkerd_only_in_the_hairpin() -> None:
    linkerd = preset("linkerd")
    differences = equivalent(
        compile_policy(linkerd), compile_policy(attrs.evolve(linkerd, loopback_capture=LoopbackCapture.PROXY))
    )
    assert differences and hairpin_only(linkerd, differences)
    assert {str(d.first.verdict).split(" ")[0] for d in differences} == {"passed"}


@settings(max_examples=15, deadline=None)
@given(policies())
def test_none_removes_the_hairpin_and_nothing_else(policy: Policy) -> None:
    """Proof per generated policy (every connection class): NONE and PROXY differ only in the proxy's hairpin."""
    none = attrs.evolve(policy, loopback_capture=LoopbackCapture.NONE)
    proxy = attrs.evolve(policy, loopback_capture=LoopbackCapture.PROXY)
    assert hairpin_only(policy, equivalent(compile_policy(none), compile_policy(proxy)))


def test_the_hairpin_check_fails_on_a_wider_difference() -> None:
    """ALL also captures the app's own connections over lo: not a hairpin-only difference."""
    policy = Policy()
    differences = equivalent(
        compile_policy(attrs.evolve(policy, loopback_capture=LoopbackCapture.NONE)),
        compile_policy(attrs.evolve(policy, loopback_capture=LoopbackCapture.ALL)),
    )
    assert differences and not hairpin_only(policy, differences)
