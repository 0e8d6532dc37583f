"""The support matrix the documentation shows: every IR node sample x every installed backend."""

from __future__ import annotations

from typing import ClassVar

from meshredirect.backend import Rendering, available_backends, create_backend
from meshredirect.errors import UnsupportedError
from meshredirect.ir import Hook, OwnerMatch, Redirect, Ruleset
from meshredirect.support import node_types, sample_ruleset, support_matrix
from meshredirect.testing.samples import SAMPLE_MATCHES, SAMPLE_TARGETS

SAMPLES = [node for nodes in (*SAMPLE_MATCHES.values(), *SAMPLE_TARGETS.values()) for node in nodes]


def test_the_matrix_covers_every_sample_of_every_node_for_every_backend() -> None:
    cells = support_matrix()
    assert [(c.backend, c.node) for c in cells] == [(b, n) for b in available_backends() for n in SAMPLES]
    assert {c.node_type for c in cells} == set(node_types())


def test_each_cell_is_what_the_backend_does() -> None:
    for cell in support_matrix():
        backend = create_backend(cell.backend)
        try:
            backend.render(sample_ruleset(cell.node))
        except UnsupportedError as exc:
            assert (cell.lowers, cell.reason) == (False, exc.reason)
        else:
            assert (cell.lowers, cell.reason) == (True, None)


def test_the_iptables_backends_lower_every_sample() -> None:
    cells = support_matrix(["iptables-save", "iptables-restore"])
    assert [c for c in cells if not c.lowers] == []


class _NoOwners:
    """A backend that cannot express owner matches (to see the matrix report a refusal)."""

    name: ClassVar[str] = "no-owners"

    def render(self, ruleset: Ruleset) -> Rendering:
        for _, _, rule in ruleset.rules():
            for match in rule.matches:
                if isinstance(match, OwnerMatch):
                    raise UnsupportedError(self.name, match, "no sockets here")
        return Rendering(backend=self.name, artifacts=())


def test_a_refusal_is_reported_with_its_reason() -> None:
    cells = support_matrix([_NoOwners()])
    refused = [c for c in cells if not c.lowers]
    assert refused and all(c.node_type == "OwnerMatch" and c.reason == "no sockets here" for c in refused)
    assert len(refused) == len(SAMPLE_MATCHES[OwnerMatch])


def test_samples_stand_where_the_kernel_takes_them() -> None:
    (table,) = sample_ruleset(Redirect()).tables
    assert table.name == "nat" and table.chains[0].base is not None and table.chains[0].base.hook is Hook.OUTPUT
