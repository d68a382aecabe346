"""Who is on which node, and the process groups the 1-bit collectives run on.

torchrun numbers ranks node by node (rank = node_rank * local_world_size +
local_rank), so a node is a contiguous block of ranks. ``num_nodes`` in config
overrides the node count taken from torchrun's environment, so that one machine
can pretend to be several nodes (2 local processes acting as 2 nodes).
"""

import dataclasses
import os
from datetime import timedelta

import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class Topology:
    """The node layout of a job.

    Example::
        >>> topo = Topology(world_size=4, rank=3, local_world_size=2)
        >>> topo.node_rank, topo.local_rank, topo.num_nodes
        (1, 1, 2)
        >>> topo.node_members(0), topo.cross_members(1)
        ([0, 1], [1, 3])
    """

    world_size: int
    rank: int
    local_world_size: int

    def __post_init__(self):
        if self.local_world_size < 1 or self.world_size % self.local_world_size:
            raise ValueError(
                f"local_world_size={self.local_world_size} does not divide world_size={self.world_size}"
            )

    @property
    def num_nodes(self) -> int:
        return self.world_size // self.local_world_size

    @property
    def node_rank(self) -> int:
        return self.rank // self.local_world_size

    @property
    def local_rank(self) -> int:
        return self.rank % self.local_world_size

    def node_of(self, rank: int) -> int:
        return rank // self.local_world_size

    def node_members(self, node: int) -> list[int]:
        """Global ranks on ``node``."""
        start = node * self.local_world_size
        return list(range(start, start + self.local_world_size))

    def cross_members(self, local_rank: int) -> list[int]:
        """Global ranks with this local rank, one per node (the inter-node group)."""
        return [node * self.local_world_size + local_rank for node in range(self.num_nodes)]

    @classmethod
    def from_env(cls, num_nodes: int | None = None) -> "Topology":
        """Layout of the running job: torchrun's LOCAL_WORLD_SIZE, or ``num_nodes`` when given.

        Raises ValueError naming ``num_nodes`` when it does not divide the world size.
        """
        if dist.is_available() and dist.is_initialized():
            world_size, rank = dist.get_world_size(), dist.get_rank()
        else:
            world_size = int(os.environ.get("WORLD_SIZE", 1))
            rank = int(os.environ.get("RANK", 0))
        if num_nodes is not None:
            if not isinstance(num_nodes, int) or num_nodes < 1 or world_size % num_nodes:
                raise ValueError(
                    f"num_nodes={num_nodes!r} does not divide the world size {world_size}"
                )
            return cls(world_size, rank, world_size // num_nodes)
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        if world_size % local_world_size:
            raise ValueError(
                f"LOCAL_WORLD_SIZE={local_world_size} does not divide the world size {world_size}; "
                "nodes must run the same number of processes"
            )
        return cls(world_size, rank, local_world_size)


@dataclasses.dataclass
class CommGroups:
    """Process groups owned by one compressed-communication state.

    The hook issues its collectives from its own worker thread; giving it
    groups of its own keeps them from interleaving with DDP's and the
    trainer's collectives on the default group, whose order could otherwise
    differ between ranks.
    """

    world: object | None
    node: object | None = None
    cross: object | None = None

    @classmethod
    def create(cls, topology: Topology, *, hierarchical: bool, timeout_s: float | None = None):
        """Create the groups on every rank (a collective call: all ranks, same order)."""
        if not (dist.is_available() and dist.is_initialized()) or topology.world_size == 1:
            return cls(world=None)
        kwargs = {}
        if timeout_s is not None:
            kwargs["timeout"] = timedelta(seconds=float(timeout_s))
        world = dist.new_group(list(range(topology.world_size)), **kwargs)
        if not hierarchical:
            return cls(world=world)
        node, _ = dist.new_subgroups_by_enumeration(
            [topology.node_members(n) for n in range(topology.num_nodes)], **kwargs
        )
        cross, _ = dist.new_subgroups_by_enumeration(
            [topology.cross_members(r) for r in range(topology.local_world_size)], **kwargs
        )
        return cls(world=world, node=node, cross=cross)
