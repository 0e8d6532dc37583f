"""The policy routing TPROXY needs, set up idempotently and removed exactly.

TPROXY marks the packets of intercepted connections; for the kernel to deliver
them to the proxy's transparent socket (and to route the app's replies back to
it), a policy rule sends marked packets to a route table whose default route is
local, once per IP family:

    ip -4 rule add fwmark 0x539 lookup 133 protocol 157
    ip -4 route add local default dev lo table 133 proto 157

Both carry the routing protocol number :data:`ROUTE_PROTOCOL`, which marks
them as meshredirect's: reading them back finds exactly ours (another tool's
identical rule stays untouched), so applying converges on what the policy
needs (adding what is missing, removing ours that it no longer needs) and
cleanup removes ours and nothing else.

>>> from meshredirect.policy import Policy
>>> [route.rule_argv("add") for route in routes_for(Policy(inbound_mode="TPROXY", families="both"))]  # doctest: +NORMALIZE_WHITESPACE
[('ip', '-4', 'rule', 'add', 'fwmark', '0x539', 'lookup', '133', 'protocol', '157'),
 ('ip', '-6', 'rule', 'add', 'fwmark', '0x539', 'lookup', '133', 'protocol', '157')]
>>> routes_for(Policy())
()
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Final

import attrs

from meshredirect.apply.base import ApplyFailed, Runner
from meshredirect.errors import EnvironmentProblem
from meshredirect.ir import Family
from meshredirect.policy import InterceptionMode, Policy

__all__ = ["ROUTE_PROTOCOL", "RouteCommand", "RoutingApplier", "TproxyRoute", "routes_for"]

#: The routing protocol number meshredirect tags its ip rules and routes with (not one of the numbers
#: /etc/iproute2/rt_protos reserves for kernels and routing daemons).
ROUTE_PROTOCOL: Final = 157
_FAMILY_FLAG: Final = {Family.IPV4: "-4", Family.IPV6: "-6"}


@attrs.frozen(kw_only=True, order=True)
class TproxyRoute:
    """Marked packets of one family are delivered locally: a rule (mark to table) and the table's local route."""

    family: Family = attrs.field(order=lambda f: f.value)
    mark: int
    table: int

    def rule_argv(self, verb: str) -> tuple[str, ...]:
        flag = _FAMILY_FLAG[self.family]
        table, protocol = str(self.table), str(ROUTE_PROTOCOL)
        return ("ip", flag, "rule", verb, "fwmark", hex(self.mark), "lookup", table, "protocol", protocol)

    def route_argv(self, verb: str) -> tuple[str, ...]:
        flag = _FAMILY_FLAG[self.family]
        table, protocol = str(self.table), str(ROUTE_PROTOCOL)
        return ("ip", flag, "route", verb, "local", "default", "dev", "lo", "table", table, "proto", protocol)


def routes_for(policy: Policy) -> tuple[TproxyRoute, ...]:
    """The policy routing a policy needs: one per family when it intercepts inbound with TPROXY."""
    if policy.inbound_mode is not InterceptionMode.TPROXY or not policy.captures_inbound:
        return ()
    return tuple(
        TproxyRoute(family=family, mark=policy.tproxy_mark, table=policy.tproxy_route_table)
        for family in (Family.IPV4, Family.IPV6)
        if family in policy.families
    )


@attrs.frozen(kw_only=True)
class RouteCommand:
    """One ``ip`` command and the command that undoes it."""

    argv: tuple[str, ...]
    undo: tuple[str, ...]

    def __str__(self) -> str:
        return " ".join(self.argv)


class RoutingApplier:
    """Reads and changes our policy routing through a runner (see :class:`~meshredirect.apply.iptables.Runner`)."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    def _lists(self, family: Family, commands: Sequence[str]) -> list[list[dict[str, object]]]:
        """The JSON answers of several ``ip`` read commands of one family, from one ``ip -batch`` process."""
        argv = ("ip", "-j", "-N", _FAMILY_FLAG[family], "-batch", "-")
        result = self.runner(argv, "".join(command + "\n" for command in commands))
        if result.returncode != 0:
            raise EnvironmentProblem(f"{' '.join(argv)} failed: {result.stderr.strip() or result.stdout.strip()}")
        answers = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
        if len(answers) != len(commands):
            raise EnvironmentProblem(f"{' '.join(argv)} answered {len(answers)} times to {len(commands)} commands")
        return [[entry for entry in answer if isinstance(entry, dict)] for answer in answers]

    def installed(self, family: Family) -> tuple[set[tuple[int, int]], set[int], set[int]]:
        """In one family: our rules (mark, table), the tables holding our local default route, and the
        tables holding another tool's local default route (ours cannot be added there: it exists)."""
        rule_list, route_list = self._lists(family, ("rule show", "route show table all type local"))
        rules = set()
        for entry in rule_list:
            if str(entry.get("protocol")) != str(ROUTE_PROTOCOL) or "fwmark" not in entry:
                continue
            mark, _, mask = str(entry["fwmark"]).partition("/")
            if mask and int(mask, 16) != 0xFFFFFFFF:
                continue
            rules.add((int(mark, 16), int(str(entry.get("table")))))
        ours: set[int] = set()
        theirs: set[int] = set()
        for entry in route_list:
            if entry.get("dst") != "default" or entry.get("dev") != "lo" or "table" not in entry:
                continue
            table = int(str(entry["table"]))
            (ours if str(entry.get("protocol")) == str(ROUTE_PROTOCOL) else theirs).add(table)
        return rules, ours, theirs

    def plan(self, wanted: Iterable[TproxyRoute], families: Sequence[Family]) -> list[RouteCommand]:
        """The commands that make our routing in ``families`` exactly ``wanted`` (none when it is)."""
        wanted = list(wanted)
        commands: list[RouteCommand] = []
        for family in families:
            rules, tables, foreign = self.installed(family)
            mine = [route for route in wanted if route.family is family]
            want_rules = {(route.mark, route.table) for route in mine}
            want_tables = {route.table for route in mine}
            for mark, table in sorted(rules - want_rules):
                old = TproxyRoute(family=family, mark=mark, table=table)
                commands.append(RouteCommand(argv=old.rule_argv("del"), undo=old.rule_argv("add")))
            for table in sorted(tables - want_tables):
                old = TproxyRoute(family=family, mark=0, table=table)
                commands.append(RouteCommand(argv=old.route_argv("del"), undo=old.route_argv("add")))
            for route in mine:
                if route.table not in tables and route.table not in foreign:
                    commands.append(RouteCommand(argv=route.route_argv("add"), undo=route.route_argv("del")))
                    tables.add(route.table)
                if (route.mark, route.table) not in rules:
                    commands.append(RouteCommand(argv=route.rule_argv("add"), undo=route.rule_argv("del")))
                    rules.add((route.mark, route.table))
        return commands

    def execute(self, commands: Sequence[RouteCommand]) -> list[RouteCommand]:
        """Run the commands in order; when one fails, undo those done and raise."""
        done: list[RouteCommand] = []
        for command in commands:
            try:
                result = self.runner(command.argv)
                error = None if result.returncode == 0 else (result.stderr.strip() or result.stdout.strip())
            except EnvironmentProblem as exc:
                error = str(exc)
            if error is not None:
                undone = self.revert(done)
                if "device is not up" in error:
                    error += " (lo is down in the namespace: ip link set lo up)"
                raise ApplyFailed(f"{command} failed: {error}", undone=undone)
            done.append(command)
        return done

    def revert(self, done: Sequence[RouteCommand]) -> bool:
        """Undo commands, last first; True when every undo worked."""
        ok = True
        for command in reversed(done):
            try:
                if self.runner(command.undo).returncode != 0:
                    ok = False
            except EnvironmentProblem:
                ok = False
        return ok
