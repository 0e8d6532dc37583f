"""Value sets: normalisation and set operations agree with plain Python sets."""

from __future__ import annotations

import ipaddress
import itertools

from hypothesis import given
from hypothesis import strategies as st

from meshredirect.values import AddressSet, PortSet, _collapse

ports = st.lists(
    st.one_of(
        st.integers(1, 200),
        st.tuples(st.integers(1, 200), st.integers(0, 20)).map(lambda t: (t[0], min(t[0] + t[1], 200))),
    )
)


def members(items: list[int | tuple[int, int]]) -> set[int]:
    out: set[int] = set()
    for item in items:
        lo, hi = item if isinstance(item, tuple) else (item, item)
        out.update(range(lo, hi + 1))
    return out


@given(ports, ports)
def test_port_sets_behave_as_sets(a: list[int | tuple[int, int]], b: list[int | tuple[int, int]]) -> None:
    sa, sb = PortSet.of(*a), PortSet.of(*b)
    assert set(sa) == members(a)
    assert set(sa.union(sb)) == members(a) | members(b)
    assert set(sa.difference(sb)) == members(a) - members(b)
    assert sa.intersects(sb) == bool(members(a) & members(b))
    intervals = sa.intervals
    assert all(hi + 1 < lo2 for (_, hi), (lo2, _) in itertools.pairwise(intervals))
    assert PortSet.parse(str(sa), field="f") == sa


v4 = st.builds(lambda a, p: ipaddress.IPv4Network((a, p), strict=False), st.integers(0, 2**32 - 1), st.integers(20, 32))
v6 = st.builds(lambda a, p: ipaddress.IPv6Network((a, p), strict=False), st.integers(0, 2**16), st.integers(116, 128))


@given(st.lists(st.one_of(v4, v6), max_size=10))
def test_collapse_is_the_minimal_cidr_cover(networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> None:
    want = [
        *ipaddress.collapse_addresses([n for n in networks if n.version == 4]),  # type: ignore[type-var]
        *ipaddress.collapse_addresses([n for n in networks if n.version == 6]),  # type: ignore[type-var]
    ]
    assert list(_collapse(networks)) == want
    assert AddressSet(tuple(networks)) == AddressSet(tuple(want))
