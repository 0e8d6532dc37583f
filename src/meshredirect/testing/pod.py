"""A pod and its peer: two throwaway network namespaces joined by two veth pairs, dual stack.

::

    pod                                   peer
    eth0  10.77.0.1/24 fd77::1/64  <->  eth0  10.77.0.2/24 fd77::2/64
                                          (also 10.77.9.2, fd77:9::2: an "excluded" network)
    eth1  10.78.0.1/24 fd78::1/64  <->  eth1  10.78.0.2/24 fd78::2/64  (an interface to exclude)
    lo    127.0.0.1, ::1, ::6/128 (the IPv6 passthrough source)
    default routes via the peer's eth0

Neighbours are static and IPv6 addresses skip duplicate address detection,
so the first packet flows at once. Every pod network uses the same addresses:
they live in their own namespaces, so several can exist side by side.

>>> PodNetwork.ADDRESSES["pod"][4], PodNetwork.ADDRESSES["peer_excluded"][6]
('10.77.0.1', 'fd77:9::2')
"""

from __future__ import annotations

from types import TracebackType
from typing import ClassVar, Final

from meshredirect.apply.netns import Target
from meshredirect.testing.netns import NetNamespace

__all__ = ["PodNetwork"]

#: Fixed link-layer addresses, so neighbours can be static.
MACS: Final = {
    ("pod", "eth0"): "02:00:00:77:00:01",
    ("peer", "eth0"): "02:00:00:77:00:02",
    ("pod", "eth1"): "02:00:00:78:00:01",
    ("peer", "eth1"): "02:00:00:78:00:02",
}


class PodNetwork:
    """Creates the pod and peer namespaces on enter, deletes both on exit (also when the block fails)."""

    ADDRESSES: ClassVar[dict[str, dict[int, str]]] = {
        "pod": {4: "10.77.0.1", 6: "fd77::1"},
        "peer": {4: "10.77.0.2", 6: "fd77::2"},
        "peer_excluded": {4: "10.77.9.2", 6: "fd77:9::2"},
        "excluded_network": {4: "10.77.9.0/24", 6: "fd77:9::/64"},
        "pod_eth1": {4: "10.78.0.1", 6: "fd78::1"},
        "peer_eth1": {4: "10.78.0.2", 6: "fd78::2"},
    }

    def __init__(self) -> None:
        self.pod = NetNamespace()
        self.peer = NetNamespace()

    @property
    def pod_target(self) -> Target:
        return Target.of(str(self.pod.path))

    @property
    def peer_target(self) -> Target:
        return Target.of(str(self.peer.path))

    def address(self, name: str, version: int) -> str:
        return self.ADDRESSES[name][version]

    def create(self) -> PodNetwork:
        try:
            self.pod.create()
            self.peer.create()
            for ns in (self.pod, self.peer):
                ns.run(["sysctl", "-q", "-w", "net.ipv6.conf.default.accept_dad=0", "net.ipv6.conf.all.accept_dad=0"])
            self.pod.run(
                ["ip", "-batch", "-"],
                input=(
                    f"link add eth0 address {MACS['pod', 'eth0']} type veth peer name eth0 "
                    f"address {MACS['peer', 'eth0']} netns {self.peer.name}\n"
                    f"link add eth1 address {MACS['pod', 'eth1']} type veth peer name eth1 "
                    f"address {MACS['peer', 'eth1']} netns {self.peer.name}\n"
                ),
            )
            self.pod.run(["ip", "-batch", "-"], input=self._pod_commands())
            self.peer.run(["ip", "-batch", "-"], input=self._peer_commands())
        except BaseException:
            self.delete()
            raise
        return self

    def _pod_commands(self) -> str:
        a = self.ADDRESSES
        return "".join(
            line + "\n"
            for line in (
                "addr add ::6/128 dev lo",
                f"addr add {a['pod'][4]}/24 dev eth0",
                f"addr add {a['pod'][6]}/64 dev eth0 nodad",
                f"addr add {a['pod_eth1'][4]}/24 dev eth1",
                f"addr add {a['pod_eth1'][6]}/64 dev eth1 nodad",
                "link set eth0 up",
                "link set eth1 up",
                f"route add default via {a['peer'][4]} dev eth0",
                f"route add default via {a['peer'][6]} dev eth0",
                f"neigh replace {a['peer'][4]} lladdr {MACS['peer', 'eth0']} dev eth0 nud permanent",
                f"neigh replace {a['peer'][6]} lladdr {MACS['peer', 'eth0']} dev eth0 nud permanent",
                f"neigh replace {a['peer_eth1'][4]} lladdr {MACS['peer', 'eth1']} dev eth1 nud permanent",
                f"neigh replace {a['peer_eth1'][6]} lladdr {MACS['peer', 'eth1']} dev eth1 nud permanent",
            )
        )

    def _peer_commands(self) -> str:
        a = self.ADDRESSES
        return "".join(
            line + "\n"
            for line in (
                f"addr add {a['peer'][4]}/24 dev eth0",
                f"addr add {a['peer'][6]}/64 dev eth0 nodad",
                f"addr add {a['peer_excluded'][4]}/32 dev eth0",
                f"addr add {a['peer_excluded'][6]}/128 dev eth0 nodad",
                f"addr add {a['peer_eth1'][4]}/24 dev eth1",
                f"addr add {a['peer_eth1'][6]}/64 dev eth1 nodad",
                "link set eth0 up",
                "link set eth1 up",
                f"neigh replace {a['pod'][4]} lladdr {MACS['pod', 'eth0']} dev eth0 nud permanent",
                f"neigh replace {a['pod'][6]} lladdr {MACS['pod', 'eth0']} dev eth0 nud permanent",
                f"neigh replace {a['pod_eth1'][4]} lladdr {MACS['pod', 'eth1']} dev eth1 nud permanent",
                f"neigh replace {a['pod_eth1'][6]} lladdr {MACS['pod', 'eth1']} dev eth1 nud permanent",
            )
        )

    def delete(self) -> None:
        self.pod.delete()
        self.peer.delete()

    def __enter__(self) -> PodNetwork:
        return self.create()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.delete()
