"""``apply`` and ``cleanup``: a policy's rules (and TPROXY routing) into a network namespace, and out again.

Both read the target first and report what they did in an :class:`Outcome`:
which namespace, which backend and iptables variant (and why), per family
whether our rules changed or were already up to date, and which routing
commands ran. With ``dry_run`` they only plan: the outcome carries the
documents and commands that would run, and the kernel is not touched.

Any failure leaves the previous state: when the kernel refuses a document or
a routing command, every change made so far is undone and
:class:`~meshredirect.apply.base.ApplyFailed` says what was refused.

>>> outcome = Outcome(action="apply", backend="iptables", namespace="network namespace /var/run/netns/pod",
...                   variant=VariantChoice(variant="nft", reason="the legacy tables hold no rules"),
...                   changes=(AppliedChange(family=Family.IPV4, document="", changed=False,
...                                          tool="iptables-nft-restore --noflush"),), routing=(),
...                   dry_run=False)
>>> print(outcome.report())
apply: network namespace /var/run/netns/pod, backend iptables
iptables variant: nft (the legacy tables hold no rules)
ipv4 (iptables-nft-restore): already up to date
nothing changed: already up to date
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from typing import Final

import attrs

from meshredirect.apply.base import FAMILIES, AppliedChange, Applier, ApplyFailed, Runner, planned
from meshredirect.apply.iptables import VARIANTS, IptablesApplier, VariantChoice, detect_variant
from meshredirect.apply.netns import Target, require_nftables_bindings, require_root, require_tool
from meshredirect.apply.routing import RouteCommand, RoutingApplier, TproxyRoute, routes_for
from meshredirect.errors import BackendNotFoundError, EnvironmentProblem, PolicyError
from meshredirect.ir import Family, Ruleset, TProxy
from meshredirect.policy import Policy

__all__ = ["APPLY_BACKENDS", "Outcome", "apply", "cleanup", "families_of"]

#: The backends the apply layer can load into a kernel.
APPLY_BACKENDS: Final = ("iptables", "nftables")
#: The chain prefix cleanup removes when given no policy (the default policy's).
DEFAULT_PREFIX: Final = "ISTIO"


@attrs.frozen(kw_only=True)
class Outcome:
    """What an apply or a cleanup did (or, in a dry run, would do)."""

    action: str
    backend: str
    namespace: str
    variant: VariantChoice | None
    changes: tuple[AppliedChange, ...]
    routing: tuple[RouteCommand, ...]
    dry_run: bool

    @property
    def changed(self) -> bool:
        return any(change.changed for change in self.changes) or bool(self.routing)

    def report(self) -> str:
        """A few lines for people: where, how, and per family what changed."""
        lines = [f"{self.action}{' (dry run)' if self.dry_run else ''}: {self.namespace}, backend {self.backend}"]
        if self.variant is not None:
            lines.append(f"iptables variant: {self.variant.variant} ({self.variant.reason})")
        verb = "would change" if self.dry_run else "changed"
        for change in self.changes:
            state = verb if change.changed else "already up to date"
            label = "ipv4+ipv6" if change.family is Family.INET else change.family.value
            lines.append(f"{label} ({change.tool.split(' ')[0]}): {state}")
        for command in self.routing:
            lines.append(f"routing: {'would run' if self.dry_run else 'ran'} {command}")
        if not self.changed:
            lines.append("nothing changed: already up to date" if self.action == "apply" else "nothing of ours found")
        return "\n".join(lines)

    def documents(self) -> str:
        """Everything that runs (or would run), as text: each document under a comment naming its tool."""
        parts = [f"# {change.tool}\n{change.document}" for change in self.changes if change.document]
        parts += [str(command) + "\n" for command in self.routing]
        return "".join(parts)


def families_of(value: Iterable[Family | str] | Family | str | None) -> tuple[Family, ...]:
    """The families to touch: None means both; accepts ``ipv4``, ``ipv6``, ``both``, ``4``, ``6``.

    >>> families_of(None), families_of("ipv6"), families_of(["4", Family.IPV6])
    ((<Family.IPV4: 'ipv4'>, <Family.IPV6: 'ipv6'>), (<Family.IPV6: 'ipv6'>,), (<Family.IPV4: 'ipv4'>, <Family.IPV6: 'ipv6'>))
    """
    if value is None:
        return FAMILIES
    items = [value] if isinstance(value, (str, Family)) else list(value)
    chosen: set[Family] = set()
    for item in items:
        text = item.value if isinstance(item, Family) else str(item).strip().lower()
        if text in ("both", "dual", "all"):
            chosen.update(FAMILIES)
        elif text in ("ipv4", "4", "v4"):
            chosen.add(Family.IPV4)
        elif text in ("ipv6", "6", "v6"):
            chosen.add(Family.IPV6)
        else:
            raise PolicyError("families", expected="ipv4, ipv6 or both", got=item)
    if not chosen:
        raise PolicyError("families", expected="at least one of ipv4, ipv6", got="none")
    return tuple(f for f in FAMILIES if f in chosen)


def _check_backend(backend: str) -> None:
    if backend not in APPLY_BACKENDS:
        close = difflib.get_close_matches(backend, APPLY_BACKENDS, n=1, cutoff=0.5)
        raise BackendNotFoundError(backend, APPLY_BACKENDS, close[0] if close else None)


def _check_variant(variant: str | None) -> None:
    if variant is not None and variant not in VARIANTS:
        raise PolicyError("iptables variant", expected="nft or legacy (or none to detect it)", got=variant)


def _target_of(
    what: Policy | Ruleset, routing: Sequence[TproxyRoute] | None
) -> tuple[Ruleset, tuple[TproxyRoute, ...]]:
    if isinstance(what, Policy):
        from meshredirect.compiler import compile_policy

        return compile_policy(what), tuple(routing) if routing is not None else routes_for(what)
    if isinstance(what, Ruleset):
        if routing is None and any(isinstance(rule.target, TProxy) for _, _, rule in what.rules()):
            raise PolicyError(
                "routing",
                expected="the TPROXY policy routing (routing=routes_for(policy)) for a ruleset with TPROXY "
                "targets, or the Policy itself",
                got="none",
            )
        return what, tuple(routing or ())
    raise PolicyError("target", expected="a Policy or a compiled Ruleset", got=type(what).__name__)


def _iptables(
    runner: Runner, variant: str | None, families: Sequence[Family], target: Target | None = None
) -> tuple[IptablesApplier, VariantChoice]:
    if variant is None:
        choice = detect_variant(runner, families, target=target)
    else:
        choice = VariantChoice(variant=variant, reason="as asked")
    for family in families:
        for tool in ("save", "restore"):
            require_tool(f"{'ip6tables' if family is Family.IPV6 else 'iptables'}-{choice.variant}-{tool}")
    return IptablesApplier(runner, variant=choice.variant), choice


def _nftables(where: Target) -> Applier:
    """The nftables applier (see :mod:`meshredirect.apply.nftables`), or what this build or machine lacks."""
    from meshredirect.apply.nftables import NftablesApplier

    require_nftables_bindings()
    applier = NftablesApplier(where)
    applier.layout  # noqa: B018 (raises now, before anything is read, when this build has no nftables backend)
    return applier


def apply(
    what: Policy | Ruleset,
    *,
    backend: str = "iptables",
    netns: str | Target | None = None,
    families: Iterable[Family | str] | Family | str | None = None,
    variant: str | None = None,
    dry_run: bool = False,
    routing: Sequence[TproxyRoute] | None = None,
) -> Outcome:
    """Make our rules in a network namespace what a policy (or a compiled ruleset) says.

    ``netns``: a path (``/var/run/netns/X``, ``/proc/PID/ns/net``), a name under
    /var/run/netns, or None for the current namespace. ``families``: which
    families to touch (default both: a family the policy leaves out loses our
    rules there). ``variant``: ``nft`` or ``legacy``; None detects it.
    ``routing``: TPROXY policy routing, derived from a Policy when not given.
    """
    _check_backend(backend)
    _check_variant(variant)
    ruleset, routes = _target_of(what, routing)
    prefix = ruleset.owner_prefix
    if prefix is None:
        raise PolicyError("owner_prefix", expected="the prefix of our chain names (compile_policy sets it)", got=None)
    chosen = families_of(families)
    require_root("apply")
    where = Target.of(netns)
    where.check()
    runner: Runner = where.run
    if backend == "iptables":
        applier, choice = _iptables(runner, variant, chosen, where)
        ours: Applier = applier
    else:
        ours, choice = _nftables(where), None
    steps = ours.plan(ruleset, chosen)
    router = RoutingApplier(runner)
    commands = router.plan(routes, chosen)
    if dry_run:
        changes = [planned(step) for step in steps]
        return _outcome("apply", backend, where, choice, changes, commands, dry_run=True)
    changes = ours.execute(steps, prefix)
    try:
        router.execute(commands)
    except ApplyFailed as exc:
        undone = ours.revert(steps, prefix)
        raise ApplyFailed(exc.message, undone=exc.undone and undone) from None
    except BaseException:
        ours.revert(steps, prefix)
        raise
    return _outcome("apply", backend, where, choice, changes, commands, dry_run=False)


def cleanup(
    what: Policy | Ruleset | str | None = None,
    *,
    backend: str = "iptables",
    netns: str | Target | None = None,
    families: Iterable[Family | str] | Family | str | None = None,
    variant: str | None = None,
    dry_run: bool = False,
) -> Outcome:
    """Remove our chains, the jumps into them, our tables and our TPROXY routing; nothing else.

    ``what`` names whose rules are ours: a Policy or Ruleset (its chain prefix)
    or the prefix itself (default ``ISTIO``). With ``variant`` None, both
    iptables variants are cleaned (whichever has our rules).
    """
    _check_backend(backend)
    _check_variant(variant)
    if isinstance(what, Policy):
        prefix = what.chain_prefix
    elif isinstance(what, Ruleset):
        if what.owner_prefix is None:
            raise PolicyError("owner_prefix", expected="the prefix of our chain names", got=None)
        prefix = what.owner_prefix
    else:
        prefix = what or DEFAULT_PREFIX
    chosen = families_of(families)
    require_root("cleanup")
    where = Target.of(netns)
    where.check()
    runner: Runner = where.run
    choice: VariantChoice | None = None
    if backend == "iptables":
        variants = [variant] if variant is not None else [v for v in VARIANTS if _installed(v, chosen)]
        if not variants:
            _iptables(runner, "nft", chosen)  # raises, naming the missing tool and its package
        choice = VariantChoice(
            variant=",".join(variants),
            reason="as asked" if variant is not None else "cleanup looks at every installed variant",
        )
        applier_list: list[Applier] = [IptablesApplier(runner, variant=v) for v in variants]
    else:
        applier_list = [_nftables(where)]
    plans = [(applier, applier.plan_cleanup(prefix, chosen)) for applier in applier_list]
    router = RoutingApplier(runner)
    commands = router.plan((), chosen)
    changes: list[AppliedChange] = []
    if dry_run:
        for _, steps in plans:
            changes += [planned(step) for step in steps]
        return _outcome("cleanup", backend, where, choice, changes, commands, dry_run=True)
    done = []
    try:
        for applier, steps in plans:
            changes += applier.execute(steps, prefix)
            done.append((applier, steps))
        router.execute(commands)
    except ApplyFailed as exc:
        undone = all([applier.revert(steps, prefix) for applier, steps in reversed(done)])
        raise ApplyFailed(exc.message, undone=exc.undone and undone) from None
    except BaseException:
        for applier, steps in reversed(done):
            applier.revert(steps, prefix)
        raise
    return _outcome("cleanup", backend, where, choice, changes, commands, dry_run=False)


def _installed(variant: str, families: Sequence[Family]) -> bool:
    try:
        for family in families:
            require_tool(f"{'ip6tables' if family is Family.IPV6 else 'iptables'}-{variant}-restore")
    except EnvironmentProblem:
        return False
    return True


def _outcome(  # noqa: PLR0917 (one positional per field of the outcome, in its order)
    action: str,
    backend: str,
    where: Target,
    choice: VariantChoice | None,
    changes: Sequence[AppliedChange],
    commands: Sequence[RouteCommand],
    *,
    dry_run: bool,
) -> Outcome:
    return Outcome(
        action=action,
        backend=backend,
        namespace=where.describe(),
        variant=choice,
        changes=tuple(changes),
        routing=tuple(commands),
        dry_run=dry_run,
    )
