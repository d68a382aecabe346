"""Compressed collectives: 1-bit reductions for Birder, the baselines, topology and byte counts.

Dependencies point one way: ``optim`` -> ``comm`` -> ``kernels``.
"""

from dist_supernet.comm.baselines import (
    BASELINES,
    Baseline,
    BaselineConfig,
    baseline_config,
    register_baseline,
    register_baseline_hook,
)
from dist_supernet.comm.collectives import (
    COLLECTIVES,
    CollectiveError,
    OneBitCollective,
    build_collective,
    chunk_elems,
    collective_choices,
    register_collective,
)
from dist_supernet.comm.seeding import mix_seed
from dist_supernet.comm.stats import CommStats, WireBytes
from dist_supernet.comm.topology import CommGroups, Topology

__all__ = [
    "BASELINES",
    "Baseline",
    "BaselineConfig",
    "COLLECTIVES",
    "CollectiveError",
    "CommGroups",
    "CommStats",
    "OneBitCollective",
    "Topology",
    "WireBytes",
    "baseline_config",
    "build_collective",
    "chunk_elems",
    "collective_choices",
    "mix_seed",
    "register_baseline",
    "register_baseline_hook",
    "register_collective",
]
