"""The plugin's use of the apply layer: load, remove and read back our rules in a pod's namespace.

ADD and DEL are the public apply layer (:func:`meshredirect.apply.apply` and
:func:`~meshredirect.apply.cleanup`) with ``netns=CNI_NETNS``: one transaction
per table and family (iptables) or one for every family (nftables), TPROXY's
policy routing, undo of any failure across tables and routing, iptables
variant detection, and the backend the configuration names.

CHECK is semantic: :func:`installed` reads our rules back from the namespace
as IR (iptables: ``iptables-save`` of the variant in use through the iptables
reader, restricted by :func:`owned_part` to our chains and the jumps into them;
nftables: our tables from ``nft -j list ruleset`` through the nftables reader)
and :func:`differences` proves them equivalent to the compiled ruleset with the
semantics engine, naming the classes of connections they treat differently.
Rules that changed only in form (reordered where order does not matter,
merged, loaded by another tool) pass; other tools' rules are not ours to
check (``meshredirect validate`` finds one that takes connections first).

>>> from meshredirect.compiler import compile_policy
>>> from meshredirect.ir import Ruleset
>>> from meshredirect.policy import Policy
>>> from meshredirect.semantics.model import Environment
>>> expected = compile_policy(Policy())
>>> differences(expected, Installed(ruleset=Ruleset(), where="the iptables-nft tables"), Environment.default())
['none of our rules are in the iptables-nft tables']
>>> differences(expected, Installed(ruleset=expected, where="the iptables-nft tables"), Environment.default())
[]
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import attrs

# Imported for the signatures' sake (the documentation resolves them); ADD loads every one anyway.
from meshredirect.apply.actions import Outcome
from meshredirect.cni.config import PluginConfig
from meshredirect.ir import Chain, ChainPolicy, Family, Goto, Jump, Ruleset, Table
from meshredirect.policy import Policy

if TYPE_CHECKING:
    # Not at run time: the semantics engine costs ADD and DEL start-up they do not need (CHECK loads it).
    import meshredirect.semantics.model
    from meshredirect.semantics.equivalence import Difference

__all__ = ["MAX_SHOWN", "Installed", "differences", "installed", "load", "owned_part", "remove"]

#: Both families are looked at: a family the policy leaves out must hold none of our rules.
ALL_FAMILIES: Final = (Family.IPV4, Family.IPV6)
#: How many differing connection classes CHECK lists in the error's details (the count says how many there are).
MAX_SHOWN: Final = 8


def load(policy: Policy, config: PluginConfig, netns: str) -> Outcome:
    """ADD: make our rules (and TPROXY routing) in ``netns`` what ``policy`` says."""
    from meshredirect.apply.actions import apply

    return apply(policy, backend=config.backend, netns=netns, variant=config.variant)


def remove(prefix: str, config: PluginConfig, netns: str) -> Outcome:
    """DEL: remove our chains, jumps, tables and routing from ``netns`` (iptables: every variant holding some)."""
    from meshredirect.apply.actions import cleanup

    return cleanup(prefix, backend=config.backend, netns=netns, variant=config.variant)


@attrs.frozen(kw_only=True)
class Installed:
    """Our rules as read back from a namespace."""

    #: Our part of the namespace's rules, as IR.
    ruleset: Ruleset
    #: Where they were read, for messages ("the iptables-nft tables", "nftables table istio").
    where: str
    #: The routing commands that would make our TPROXY policy routing what the policy needs (none: it is).
    routing: tuple[str, ...] = ()


def owned_part(ruleset: Ruleset, prefix: str) -> Ruleset:
    """Our part of iptables rules read from a namespace: our chains (``prefix_...``), and in the built-in chains
    only the rules that jump or go to ours (with the default ACCEPT policy; another tool's policy is not ours).

    >>> from meshredirect.ir import Accept, Hook, Rule, iptables_base_chain
    >>> output = Chain(name="OUTPUT", base=iptables_base_chain("nat", Hook.OUTPUT),
    ...                rules=(Rule(target=Jump(chain="KUBE-X")), Rule(target=Jump(chain="ISTIO_OUTPUT"))))
    >>> table = Table(family=Family.IPV4, name="nat", chains=(output, Chain(name="ISTIO_OUTPUT", rules=()),
    ...                                                     Chain(name="KUBE-X", rules=(Rule(target=Accept()),))))
    >>> [(c.name, len(c.rules)) for c in owned_part(Ruleset(tables=(table,)), "ISTIO").tables[0].chains]
    [('OUTPUT', 1), ('ISTIO_OUTPUT', 0)]
    """
    mine = prefix + "_"
    tables = []
    for table in ruleset.tables:
        chains = []
        for chain in table.chains:
            if chain.name.startswith(mine):
                chains.append(chain)
            elif chain.base is not None:
                jumps = tuple(
                    rule
                    for rule in chain.rules
                    if isinstance(rule.target, (Jump, Goto)) and rule.target.chain.startswith(mine)
                )
                if jumps:
                    base = attrs.evolve(chain.base, policy=ChainPolicy.ACCEPT)
                    chains.append(Chain(name=chain.name, rules=jumps, base=base))
        if chains:
            tables.append(Table(family=table.family, name=table.name, chains=tuple(chains)))
    return Ruleset(tables=tuple(tables), owner_prefix=prefix)


def installed(policy: Policy, config: PluginConfig, netns: str) -> Installed:
    """CHECK: read our rules (and our TPROXY routing) back from ``netns``; see the module docstring."""
    from meshredirect.apply.netns import Target
    from meshredirect.apply.routing import RoutingApplier, routes_for

    target = Target.of(netns)
    target.check()
    routing = tuple(str(command) for command in RoutingApplier(target.run).plan(routes_for(policy), ALL_FAMILIES))
    if config.backend == "nftables":
        from meshredirect.apply.nftables import NftablesApplier

        nft = NftablesApplier(target)
        name = nft.table_name(policy.chain_prefix)
        return Installed(ruleset=nft.ours(name, ALL_FAMILIES), where=f"nftables table {name}", routing=routing)
    from meshredirect.apply.iptables import IptablesApplier, detect_variant

    variant = config.variant or detect_variant(target.run, ALL_FAMILIES, target=target).variant
    applier = IptablesApplier(target.run, variant=variant)
    from meshredirect.readers.iptables import read_iptables

    tables: list[Table] = []
    for family in ALL_FAMILIES:
        tool = applier.tool(family, "save")
        read = read_iptables(applier.saved(family), family=family, path=f"{tool} in {netns}")
        tables += owned_part(read, policy.chain_prefix).tables
    ours = Ruleset(tables=tuple(tables), owner_prefix=policy.chain_prefix)
    return Installed(ruleset=ours, where=f"the iptables-{variant} tables", routing=routing)


def differences(expected: Ruleset, found: Installed, env: meshredirect.semantics.model.Environment) -> list[str]:
    """What differs between the compiled ruleset and our rules as installed, for people (empty: nothing).

    Each line is a class of connections the two treat differently, with an example and both verdicts.
    """
    from meshredirect.semantics.equivalence import equivalence_report

    problems = [f"policy routing differs: it needs {command}" for command in found.routing]
    if not found.ruleset.tables and expected.tables:
        return [f"none of our rules are in {found.where}", *problems]
    ours = owned_part(expected, expected.owner_prefix) if expected.owner_prefix else expected
    report = equivalence_report(ours, found.ruleset, env)
    if report.differences:
        count = len(report.differences)
        problems.append(
            f"{count} class{'es' if count != 1 else ''} of connections treated differently by the rules in "
            f"{found.where} (a proof over {report.classes} classes):"
        )
        problems += [_line(d) for d in report.differences[:MAX_SHOWN]]
        if count > MAX_SHOWN:
            problems.append(f"... and {count - MAX_SHOWN} more")
    return problems


def _line(difference: Difference) -> str:
    aspect = "" if difference.aspect == "verdict" else f" (they differ in: {difference.aspect})"
    return (
        f"- {difference.example}: policy: {difference.first.verdict}; installed: {difference.second.verdict}"
        f"{aspect}\n  class: {difference.description}"
    )
