"""DiLoCo on real gloo processes: 2 nodes x 1 rank, 2 nodes x 2 ranks and 4 nodes x 1 rank (one spawn each layout).

Each worker trains a small MLP with DDP inside its node (the inner group) and runs several
scenarios in turn on the same processes (each spawn costs seconds): the exact average of the
nodes' weights (fp32, outer sgd lr 1), replicas identical within a node after every step and
across nodes after every blocking sync, the global weights identical on every node after every
merge, every replica equal after finish(), the bytes counted per sync against the payload
formula, the Streaming merge rules on an overlapped exchange, Birder as the outer optimizer,
the reduce-scatter form, and a resume from state_dict mid-stream that ends bit-identical.
"""

import hashlib

import pytest
import torch
import torch.distributed as dist

from dist_supernet.comm import Topology, chunk_elems
from dist_supernet.kernels.reference import num_blocks
from dist_supernet.sync import DiLoCo, SyncGroups

from .harness import run_workers

SHAPES = [(24, 16), (24,), (5, 24), (5,)]  # 4 parameters, 509 elements: fragments straddle parameters


def _model():
    torch.manual_seed(0)  # the same initial weights on every rank
    return torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.Tanh(), torch.nn.Linear(24, 5))


def _digest(params) -> str:
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def _gather(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _distinct_shards(diloco) -> int:
    """How many different global-weight shards the ranks of one local rank hold (1: every node agrees)."""
    local = diloco.groups.topology.local_world_size
    digests = _gather(_digest([st.backup for st in diloco.state]))
    return max(len(set(digests[r::local])) for r in range(local))


def _train(net, ddp, inner, diloco, steps, rank, *, start=0, on_step=None):
    for step in range(start, start + steps):
        gen = torch.Generator().manual_seed(1000 * rank + step)  # each rank its own data
        x = torch.randn(8, 16, generator=gen)
        loss = (ddp(x) - x[:, :5]).pow(2).mean()
        loss.backward()
        inner.step()
        inner.zero_grad()
        diloco.step()
        if on_step is not None:
            on_step(step + 1)


def _setup(topo, groups, **options):
    net = _model()
    ddp = torch.nn.parallel.DistributedDataParallel(net, process_group=groups.inner)
    inner = torch.optim.AdamW(net.parameters(), lr=3e-2)
    return net, ddp, inner, DiLoCo(net, inner, groups=groups, **options)


def _expected_inter_bytes(diloco, payload) -> int:
    """(N - 1) payloads per fragment shard (allgather), the quantizer's own payload size formula."""
    nodes = diloco.groups.topology.num_nodes
    return sum((nodes - 1) * payload(f.shard_len) for f in diloco.fragments if f.shard_len)


def _worker(rank, world_size, num_nodes):
    topo = Topology.from_env(num_nodes)
    groups = SyncGroups.create(topo, timeout_s=60)
    node_of = [r // topo.local_world_size for r in range(world_size)]
    report = {}

    # 1. fp32 + sgd lr 1, not streamed: the sync is the nodes' exact average; then all replicas are one.
    net, ddp, inner, d = _setup(topo, groups, sync_every=4, fragments=3, quantizer="fp32", outer_optimizer="sgd",
                                outer_lr=1.0)
    params = list(net.parameters())
    checks = []

    def check_average(step):
        digests = _gather(_digest(params))
        same_node = all(digests[r] == digests[rank] for r in range(world_size) if node_of[r] == node_of[rank])
        checks.append((step, same_node, len(set(digests)) == 1))

    before = d.stats.snapshot()
    _train(net, ddp, inner, d, 3, rank, on_step=check_average)
    local = [p.detach().clone() for p in params]
    # the 4th step syncs: compute what each node holds just before (replay the step on a copy)
    _train(net, ddp, inner, d, 1, rank, start=3, on_step=check_average)
    after = d.stats.snapshot()
    report["fp32_checks"] = checks
    report["fp32_inter"] = after["bytes_inter"] - before["bytes_inter"]
    report["fp32_expected_inter"] = _expected_inter_bytes(d, lambda n: 4 * n)
    report["fp32_exchanges"] = after["num_exchanges"] - before["num_exchanges"]
    report["fp32_num_fragments"] = len(d.fragments)
    report["fp32_local_before_last_step"] = [t.sum().item() for t in local]
    d.close()

    # model averaging is exact: run 4 steps without DiLoCo from the same start, average over nodes by hand
    net2, ddp2, inner2, d2 = _setup(topo, groups, sync_every=1000, quantizer="fp32", outer_optimizer="sgd",
                                    outer_lr=1.0)
    _train(net2, ddp2, inner2, d2, 4, rank)
    flat = torch.cat([p.detach().reshape(-1) for p in net2.parameters()])
    nodes_flat = _gather(flat)
    manual = torch.stack([nodes_flat[n * topo.local_world_size] for n in range(num_nodes)]).mean(0)
    synced = torch.cat([p.detach().reshape(-1) for p in params])
    report["average_error"] = float((synced - manual).abs().max())
    d2.close()

    # 2. onebit + nesterov, streamed (F=3, tau=2, mix): global weights equal on every node after each merge;
    #    bytes per exchange = the one-bit payload formula; finish() makes every replica equal.
    net, ddp, inner, d = _setup(topo, groups, sync_every=6, fragments=3, quantizer="onebit", streaming=True, delay=2)
    backups = []

    def check_backups(step):
        d.wait()  # the sync thread may be mid-update: compare what the exchanges in flight end with
        backups.append((step, _distinct_shards(d)))

    before = d.stats.snapshot()
    _train(net, ddp, inner, d, 6, rank, on_step=check_backups)
    mid = d.stats.snapshot()
    onebit = lambda n: 4 * num_blocks(n, 1024) + num_blocks(n, 1024) * 128  # noqa: E731
    report["onebit_inter_per_round"] = mid["bytes_inter"] - before["bytes_inter"]
    report["onebit_expected_inter"] = _expected_inter_bytes(d, onebit)
    report["onebit_offsets"] = d.offsets
    report["onebit_delay"] = d.delay

    # resume mid-stream: save at step 9 (fragment 0 in flight: sent at 8, merged at 10), continue to 14, then
    # restore the state into fresh objects and replay steps 10..14: the same bits.
    _train(net, ddp, inner, d, 3, rank, start=6, on_step=check_backups)
    saved_pending = sorted(d.pending)
    saved = {"model": {k: v.clone() for k, v in net.state_dict().items()},
             "inner": __import__("copy").deepcopy(inner.state_dict()),
             "sync": {k: v for k, v in d.state_dict().items()}}
    saved["sync"] = __import__("copy").deepcopy(saved["sync"])
    _train(net, ddp, inner, d, 5, rank, start=9, on_step=check_backups)
    first_run = _digest(list(net.parameters()))
    d.finish()
    report["backups_equal"] = backups
    report["after_finish_equal"] = len(set(_gather(_digest(list(net.parameters()))))) == 1
    d.close()

    net, ddp, inner, d = _setup(topo, groups, sync_every=6, fragments=3, quantizer="onebit", streaming=True, delay=2)
    net.load_state_dict(saved["model"])
    inner.load_state_dict(saved["inner"])
    d.load_state_dict(saved["sync"])
    report["restored_pending"] = (saved_pending, sorted(d.pending))
    _train(net, ddp, inner, d, 5, rank, start=9)
    report["resume_identical"] = _digest(list(net.parameters())) == first_run
    d.close()

    # 3. the other rules: delta merge; Birder as the outer optimizer; int4; the reduce-scatter form. Each
    #    must keep the global weights equal across nodes and end with equal replicas.
    for name, options in {
        "delta": dict(quantizer="onebit", streaming=True, fragments=2, delay=1, merge="delta"),
        "birder": dict(quantizer="birder", outer_optimizer="birder", outer_lr=0.01, fragments=2),
        "int4": dict(quantizer="int4", fragments=2),
        "reduce_scatter": dict(quantizer="onebit", form="reduce_scatter", fragments=2, streaming=True),
    }.items():
        net, ddp, inner, d = _setup(topo, groups, sync_every=4, **options)
        start = _digest(list(net.parameters()))
        before = d.stats.snapshot()
        _train(net, ddp, inner, d, 9, rank)
        d.wait()
        globals_equal = _distinct_shards(d) == 1
        d.finish()
        report[name] = (globals_equal, len(set(_gather(_digest(list(net.parameters()))))) == 1,
                        start != _digest(list(net.parameters())), d.stats.snapshot()["bytes_inter"] > before["bytes_inter"])
        d.close()
    return report


def _check(reports, num_nodes):
    for rank, r in enumerate(reports):
        # within a node after every step, across nodes exactly after the blocking sync at step 4
        assert [c[1] for c in r["fp32_checks"]] == [True] * 4, r["fp32_checks"]
        assert [c[2] for c in r["fp32_checks"]] == [False, False, False, True], r["fp32_checks"]
        assert r["average_error"] < 1e-6, r["average_error"]
        assert r["fp32_inter"] == r["fp32_expected_inter"] > 0
        assert r["fp32_exchanges"] == r["fp32_num_fragments"] == 3
        assert r["onebit_offsets"] == [2, 4, 6] and r["onebit_delay"] == 2
        assert r["onebit_inter_per_round"] == r["onebit_expected_inter"] > 0
        assert all(n == 1 for _, n in r["backups_equal"]), r["backups_equal"]
        assert r["after_finish_equal"]
        assert r["restored_pending"] == ([0], [0])  # fragment 0, sent at step 8, is merged at 10
        assert r["resume_identical"]
        for name in ("delta", "birder", "int4", "reduce_scatter"):
            assert r[name] == (True, True, True, True), (name, r[name])


@pytest.mark.parametrize("world_size,num_nodes", [(2, 2), (4, 2)], ids=["2x1", "2x2"])
def test_diloco_replicas_bytes_merge_and_resume(world_size, num_nodes):
    reports = run_workers(_worker, world_size, num_nodes, local_world_size=world_size // num_nodes, timeout_s=240)
    _check(reports, num_nodes)


def test_app_diloco_2x2_killed_mid_exchange_resumes_bit_identical(tmp_path):
    """The training app, 2 nodes x 2 ranks, streamed one-bit DiLoCo; the last rank dies at step 16 while
    fragment 0's exchange (sent at 15, merged at 17) may still be in flight. torchrun restarts every rank,
    they resume from the checkpoint of step 15 (which holds that exchange's result) and end bit-identical
    to the uninterrupted run: same weights, same bytes, every replica equal."""
    from . import jobs

    common = [*jobs.PLAIN, "sync=diloco", "sync.every=10", "sync.fragments=2", "sync.streaming=true",
              "compression.num_nodes=2", "trainer.max_steps=30", "trainer.checkpoint_every=15", "trainer.log_every=5"]
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    jobs.run(jobs.torchrun(*common, f"hydra.run.dir={reference}", nproc=4), cwd=tmp_path, check=True)
    out = jobs.run(jobs.torchrun(*common, "trainer.crash_at_step=16", f"hydra.run.dir={crashed}", nproc=4,
                                 max_restarts=1), cwd=tmp_path, check=True)
    want, _ = jobs.read_run(reference)
    got, _ = jobs.read_run(crashed)
    assert got["resumed_from_step"] == 15, out.stdout[-2000:]
    assert want["resumed_from_step"] is None and want["params_in_sync"] and got["params_in_sync"]
    for key in ("params_sha256", "eval_loss", "bytes_inter_total", "bytes_intra_total"):
        assert got[key] == want[key], key
    sync = want["sync"]
    assert (sync["num_nodes"], sync["ranks_per_node"], sync["delay"], sync["quantizer"]) == (2, 2, 2, "onebit")
    assert 0 < want["bytes_inter_total"] < want["bytes_intra_total"] / 100  # DDP inside the node dwarfs the sync
