"""The 1-bit collectives on real gloo processes against plain dist.all_reduce.

World 4 runs as 2 simulated nodes x 2 processes (LOCAL_WORLD_SIZE=2).
"""

import math

import pytest
import torch
import torch.distributed as dist

from dist_supernet import kernels
from dist_supernet.comm import CommGroups, Topology, build_collective, chunk_elems, mix_seed
from dist_supernet.comm.collectives import whole_chunk_map
from tests.distributed.harness import run_workers

SIZES = (0, 1, 7, 9, 33, 4097)


def _random_signs(numel, rank, trial):
    gen = torch.Generator().manual_seed(1000 * rank + 7 * trial + numel)
    return torch.rand(numel, generator=gen) < 0.5


def _reference_mean(signs):
    values = signs.to(torch.float32) * 2 - 1
    dist.all_reduce(values)
    return values / dist.get_world_size()


def _same_on_all_ranks(tensor):
    rows = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, tensor)
    return all(torch.equal(rows[0], row) for row in rows)


def _collectives_worker(rank, world_size):
    checks = {}
    topo = Topology.from_env()
    groups = CommGroups.create(topo, hierarchical=True)
    exact = {
        "allgather": build_collective("allgather", topo, groups),
        "two_phase": build_collective("two_phase", topo, groups),
    }
    # One rank per node (4 "nodes") and one node: hierarchical is exact there too.
    topo_flat = Topology(world_size, rank, 1)
    exact["hierarchical_1_per_node"] = build_collective(
        "hierarchical", topo_flat, CommGroups.create(topo_flat, hierarchical=True), inter_node="allgather"
    )
    topo_one = Topology(world_size, rank, world_size)
    exact["hierarchical_1_node"] = build_collective(
        "hierarchical", topo_one, CommGroups.create(topo_one, hierarchical=True)
    )
    randomized = {
        "two_phase_requantize": build_collective("two_phase", topo, groups, requantize=True),
        "hierarchical": build_collective("hierarchical", topo, groups),
        # The inter-node reduce-scatter form (issue 12), forced, on L x N and on N pretend nodes x 1.
        "hierarchical_rs": build_collective("hierarchical", topo, groups, inter_node="reduce_scatter"),
        "hierarchical_rs_1_per_node": build_collective(
            "hierarchical", topo_flat, CommGroups.create(topo_flat, hierarchical=True), inter_node="reduce_scatter"
        ),
    }
    for numel in SIZES:
        signs = _random_signs(numel, rank, 0)
        bits = kernels.pack_bits(signs)
        index = whole_chunk_map(numel)
        reference = _reference_mean(signs)
        for name, coll in exact.items():
            out = coll.reduce(bits, numel, index, seed=123)
            checks[f"{name}/{numel}/exact"] = torch.equal(out, reference)
            checks[f"{name}/{numel}/same"] = _same_on_all_ranks(out)
        for name, coll in randomized.items():
            out = coll.reduce(bits, numel, index, seed=123)
            checks[f"{name}/{numel}/same"] = _same_on_all_ranks(out)
            checks[f"{name}/{numel}/range"] = bool(((out >= -1) & (out <= 1)).all())
    # Unbiasedness of the randomised stages: many seeds on fixed inputs.
    numel, trials = 4097, 64
    signs = _random_signs(numel, rank, 1)
    bits = kernels.pack_bits(signs)
    # A chunk of three parameters at scattered canonical offsets: draws keyed by canonical index.
    index = (torch.tensor([0, 1000, 1001, numel]), torch.tensor([5, 70000, 3]))
    reference = _reference_mean(signs)
    for name, coll in randomized.items():
        total = torch.zeros(numel)
        for trial in range(trials):
            total += coll.reduce(bits, numel, index, seed=mix_seed(9, trial))
        error = total / trials - reference
        # Each output element has variance <= 1, so the overall mean error has std <= 1/sqrt(trials*numel).
        checks[f"{name}/unbiased_overall"] = abs(error.mean().item()) < 5 / math.sqrt(trials * numel)
        checks[f"{name}/unbiased_rms"] = error.pow(2).mean().sqrt().item() < 1.5 / math.sqrt(trials)
    # Masked elements decode to 0.
    mask = torch.arange(33) % 3 == 0
    out = exact["two_phase"].reduce(kernels.pack_bits(_random_signs(33, rank, 2)), 33, whole_chunk_map(33), seed=1, mask_D=mask)
    checks["mask_zero"] = bool((out[~mask] == 0).all())
    # Bytes: formulas by hand for D = 4097 on 2 nodes x 2.
    d = 4097
    wire = {name: coll.wire_bytes(d) for name, coll in {**exact, **randomized}.items()}
    checks["wire"] = {name: (w.intra, w.inter) for name, w in wire.items()}
    return checks


def _expected_wire(world_size, local, numel):
    """Per-rank bytes by hand from the formulas in dist_supernet/comm/stats.py."""
    nodes = world_size // local
    n = world_size
    nbytes = math.ceil(numel / 8)
    ring_cross = (nodes if nodes > 1 else 0) / n  # fraction of ring links crossing a node boundary
    allgather_total = (n - 1) * nbytes
    chunk = chunk_elems(numel, n) // 8
    other_node_peers = n - local
    same_node_peers = local - 1
    two_phase_a2a = (chunk * same_node_peers, chunk * other_node_peers)
    planes = math.ceil(math.log2(n + 1))
    two_phase_ag = (n - 1) * chunk * planes
    hchunk = chunk_elems(numel, local) // 8
    counted_rows = nodes if nodes > 1 else local
    hier_intra = (local - 1) * hchunk + (local - 1) * hchunk * math.ceil(math.log2(counted_rows + 1))
    hier_inter = (nodes - 1) * hchunk
    # reduce_scatter form: chunks a multiple of 8 * nodes, sub-chunks of chunk / nodes.
    rs_chunk = chunk_elems(numel, local, 8 * nodes) // 8 if nodes > 1 else hchunk
    rs_intra = (local - 1) * rs_chunk * 2
    rs_inter = 2 * (nodes - 1) * (rs_chunk // nodes)
    flat_chunk = chunk_elems(numel, 1, 8 * n) // 8
    return {
        "hierarchical_rs": (rs_intra, rs_inter) if nodes > 1 else (hier_intra, hier_inter),
        "hierarchical_rs_1_per_node": (0.0, 2 * (n - 1) * (flat_chunk // n)),
        "allgather": (allgather_total * (1 - ring_cross), allgather_total * ring_cross),
        "two_phase": (
            two_phase_a2a[0] + two_phase_ag * (1 - ring_cross),
            two_phase_a2a[1] + two_phase_ag * ring_cross,
        ),
        "two_phase_requantize": (
            two_phase_a2a[0] + (n - 1) * chunk * (1 - ring_cross),
            two_phase_a2a[1] + (n - 1) * chunk * ring_cross,
        ),
        "hierarchical": (hier_intra, hier_inter),
    }


@pytest.mark.parametrize("world_size,local", [(2, 2), (4, 2)])
def test_collectives_match_all_reduce(world_size, local):
    results = run_workers(_collectives_worker, world_size, local_world_size=local)
    for rank, checks in enumerate(results):
        checks = dict(checks)
        wire = checks.pop("wire")
        failed = [name for name, ok in checks.items() if not ok]
        assert not failed, f"rank {rank}: {failed}"
        expected = _expected_wire(world_size, local, 4097)
        for name, (intra, inter) in expected.items():
            assert wire[name] == pytest.approx((intra, inter)), name
    # The only inter-node traffic of hierarchical is (N - 1) * D / L bits per rank.
    if world_size == 4:
        assert results[0]["wire"]["hierarchical"][1] < results[0]["wire"]["allgather"][1] / 2
        # 4 pretend nodes x 1: the reduce-scatter form sends 2 (N - 1) / N bits per element, not N - 1.
        assert results[0]["wire"]["hierarchical_rs_1_per_node"][1] == pytest.approx(2 * 3 / 4 * 4128 / 8)
