"""Counting the bytes each collective puts on the wire, intra- and inter-node.

The counts are the bytes THIS rank sends under the algorithm each primitive is
modelled on (the same model for every compression choice, so ratios are fair):

- all-gather of ``x`` bytes per rank over a group of ``k``: a ring, each rank
  sends ``(k - 1) * x``;
- all-reduce of ``x`` bytes over ``k``: a ring reduce-scatter + all-gather,
  each rank sends ``2 * (k - 1) / k * x``;
- all-to-all with ``c`` bytes for each peer: direct, each rank sends ``c`` to
  each of its ``k - 1`` peers.

For the ring primitives the ring runs over the group's ranks in rank order;
a link crosses a node boundary when its two ends are on different nodes, and a
rank's share of inter-node bytes is the ring's average: ``total * links
crossing / k``. For all-to-all the split is exact: ``c`` per peer on another
node is inter-node. A group that lies inside one node sends only intra-node
bytes; the inter-node group of the hierarchical collective sends only
inter-node bytes.
"""

import dataclasses
import threading

from dist_supernet.comm.topology import Topology


@dataclasses.dataclass
class WireBytes:
    """Bytes sent by one rank, split by where they go."""

    intra: float = 0.0
    inter: float = 0.0

    def __add__(self, other: "WireBytes") -> "WireBytes":
        return WireBytes(self.intra + other.intra, self.inter + other.inter)

    def __mul__(self, times: float) -> "WireBytes":
        return WireBytes(self.intra * times, self.inter * times)

    @property
    def total(self) -> float:
        return self.intra + self.inter


def _crossing_fraction(members: list[int], topology: Topology) -> float:
    k = len(members)
    if k < 2:
        return 0.0
    crossing = sum(
        topology.node_of(members[i]) != topology.node_of(members[(i + 1) % k]) for i in range(k)
    )
    return crossing / k


def all_gather_bytes(payload: float, members: list[int], topology: Topology) -> WireBytes:
    """A ring all-gather of ``payload`` bytes per rank over ``members``."""
    total = (len(members) - 1) * payload
    inter = total * _crossing_fraction(members, topology)
    return WireBytes(total - inter, inter)


def all_reduce_bytes(payload: float, members: list[int], topology: Topology) -> WireBytes:
    """A ring all-reduce of ``payload`` bytes over ``members``."""
    k = len(members)
    total = 2 * (k - 1) / k * payload if k > 1 else 0.0
    inter = total * _crossing_fraction(members, topology)
    return WireBytes(total - inter, inter)


def all_to_all_bytes(chunk: float, members: list[int], topology: Topology) -> WireBytes:
    """A direct all-to-all sending ``chunk`` bytes to each other member, from this rank."""
    me = topology.node_rank
    peers = [r for r in members if r != topology.rank]
    inter = sum(chunk for r in peers if topology.node_of(r) != me)
    intra = sum(chunk for r in peers if topology.node_of(r) == me)
    return WireBytes(float(intra), float(inter))


class CommStats:
    """Cumulative bytes this rank sent, and the number of compressed exchanges.

    Thread safe: the Birder hook adds from its communication thread while the
    training loop reads.

    Example::
        >>> stats = CommStats()
        >>> stats.add(WireBytes(intra=10, inter=2))
        >>> stats.snapshot()["bytes_total"]
        12
    """

    def __init__(self):
        self._lock = threading.Lock()
        self.bytes_intra = 0
        self.bytes_inter = 0
        self.num_exchanges = 0

    def add(self, wire: WireBytes, *, exchanges: int = 1) -> None:
        with self._lock:
            self.bytes_intra += int(round(wire.intra))
            self.bytes_inter += int(round(wire.inter))
            self.num_exchanges += exchanges

    @property
    def bytes_total(self) -> int:
        return self.bytes_intra + self.bytes_inter

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "bytes_intra": self.bytes_intra,
                "bytes_inter": self.bytes_inter,
                "bytes_total": self.bytes_intra + self.bytes_inter,
                "num_exchanges": self.num_exchanges,
            }

    def state_dict(self) -> dict:
        return self.snapshot()

    def load_state_dict(self, state: dict) -> None:
        with self._lock:
            self.bytes_intra = int(state.get("bytes_intra", 0))
            self.bytes_inter = int(state.get("bytes_inter", 0))
            self.num_exchanges = int(state.get("num_exchanges", 0))
