"""Two real gloo processes: samplers, BN recalibration and search agree on every rank (one spawn for all checks)."""

import random

import torch

from dist_supernet.supernet import OFACNN, arch_key
from dist_supernet.supernet.bn_recalibration import recalibrate_bn
from dist_supernet.supernet.sampler import ComplexityAwareSampler, SandwichSampler, UniformSampler
from dist_supernet.supernet.search import evolutionary_search
from tests.distributed.harness import run_workers

RECAL_ARCH_SEED = 5
SEARCH = dict(population_size=10, num_generations=3, mutate_prob=0.3, seed=2)


def _rank_batches(rank):
    # Different data and a different number of batches per rank: the all-reduce must weight by counts.
    g = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(4, 1, 8, 8, generator=g) * 1.5 + rank for _ in range(2 + rank)]


def _synthetic(space):
    weights = [random.Random(7).uniform(-1, 1) for _ in space.genes()]
    weights = [w * (i % 3 - 1) for i, w in enumerate(weights)]

    def evaluate(arch):
        values = space.arch_to_genes(arch)
        return sum(w * g.choices.index(v) for w, g, v in zip(weights, space.genes(), values) if v is not None)

    return evaluate


def _worker(rank, world_size):
    torch.manual_seed(0)  # identical initial weights on every rank, as DDP guarantees
    net = OFACNN(1, 8, 10)
    out = {}

    samplers = [SandwichSampler(UniformSampler(net, seed=3, num_archs=2)),
                ComplexityAwareSampler(net, seed=3, num_archs=2, num_bins=4)]
    out["archs"] = [[arch_key(a) for a in s.sample(step, ["kernel", "depth"])] for s in samplers for step in range(8)]

    arch = net.sample(random.Random(RECAL_ARCH_SEED))
    net.set_active(arch)
    out["num_samples"] = recalibrate_bn(net, _rank_batches(rank))
    # Plain lists: tensors put on a multiprocessing queue are shared by fd and die with the worker.
    out["bn"] = {k: v.tolist() for k, v in net.state_dict().items() if "running" in k}

    evaluate = _synthetic(net)
    calls = []
    result = evolutionary_search(net, lambda a: calls.append(1) or evaluate(a), **SEARCH)
    evaluated = [arch_key(e["arch"]) for e in result.evaluated]
    out["search"] = (result.best_arch, result.best_score, result.history, evaluated)
    out["local_evaluations"] = len(calls)
    replicated = evolutionary_search(net, evaluate, split_evaluation=False, **SEARCH)
    out["replicated_best"] = replicated.best_arch
    return out


def test_two_ranks_agree():
    rank0, rank1 = run_workers(_worker, 2, timeout_s=60)

    assert rank0["archs"] == rank1["archs"]

    assert rank0["num_samples"] == rank1["num_samples"] == 4 * (2 + 3)
    for key, value in rank0["bn"].items():
        assert value == rank1["bn"][key], key  # bit-identical on both ranks
    # ... and equal to one process recalibrating on both ranks' data.
    torch.manual_seed(0)
    single = OFACNN(1, 8, 10)
    single.set_active(single.sample(random.Random(RECAL_ARCH_SEED)))
    recalibrate_bn(single, _rank_batches(0) + _rank_batches(1))
    for key, value in single.state_dict().items():
        if "running" in key:
            torch.testing.assert_close(torch.tensor(rank0["bn"][key]), value, atol=1e-5, rtol=1e-5)

    assert rank0["search"] == rank1["search"]
    total = len(rank0["search"][3])
    assert rank0["local_evaluations"] + rank1["local_evaluations"] == total
    assert abs(rank0["local_evaluations"] - rank1["local_evaluations"]) <= SEARCH["num_generations"] + 1
    local = evolutionary_search(single, _synthetic(single), **SEARCH)  # no process group: same decisions
    assert local.best_arch == rank0["search"][0] and local.history == rank0["search"][2]
    assert rank0["replicated_best"] == rank1["replicated_best"] == local.best_arch
