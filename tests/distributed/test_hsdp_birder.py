"""Birder on FSDP2 (1-bit HSDP) on real gloo processes, checked against a single-process reference.

Two pretend nodes x 2 processes (and x 1): the model is sharded with plain ``fully_shard`` over each
node's ranks and Birder's hook exchanges one bit per element across the nodes. Rank 0 recomputes
every step from the gradients every rank saw (FSDP's node-averaged shards, as ``.grad`` holds them)
with the torch reference kernels: each rank's m, b over its own shards (in parameter order, the draws
seeded by the global rank and keyed by where the element lives in that rank's state), the mean of the
replicas' bits, the update; every rank's parameters must equal it bit for bit. A wrong padding or
offset map changes which draw or which m, b an element gets, so the parameters differ.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dist_supernet import Birder
from dist_supernet.comm import mix_seed
from dist_supernet.kernels import reference as ref
from tests.distributed.harness import identical_across_ranks, run_workers

LR, WD, BETA, SEED = 0.01, 0.1, 0.9, 3
VOCAB, WIDTH, SEQ = 11, 6, 5


class TinyLM(nn.Module):
    """A causal transformer block between a tied embedding/head, with shapes that shard unevenly over 2 ranks:
    11 embedding rows (6 + 5), a 1-row gate (rank 1's shard is empty), a frozen projection."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, WIDTH)
        self.frozen = nn.Linear(WIDTH, WIDTH)
        self.frozen.requires_grad_(False)
        self.block = Block()
        self.gate = nn.Linear(WIDTH, 1)
        self.branch = nn.Linear(WIDTH, WIDTH)  # used in the steps that say so (conditional control flow)
        self.use_branch = True

    def forward(self, idx):
        h = self.emb(idx)
        h = h + self.frozen(h)
        if self.use_branch:
            h = h + self.branch(h)
        h = self.block(h)
        h = h * torch.sigmoid(self.gate(h))
        return h @ self.emb.weight.t()  # tied head


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(WIDTH)
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.proj = nn.Linear(WIDTH, WIDTH)

    def forward(self, h):
        b, t, c = h.shape
        q, k, v = self.qkv(self.ln(h)).view(b, t, 3, 2, c // 2).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return h + self.proj(a.transpose(1, 2).reshape(b, t, c))


def _build(mesh, reduce_dtype=None):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    torch.manual_seed(0)
    model = TinyLM().to(mesh.device_type)
    policy = MixedPrecisionPolicy(reduce_dtype=reduce_dtype) if reduce_dtype else MixedPrecisionPolicy()
    fully_shard(model.block, mesh=mesh["shard"], mp_policy=policy)
    fully_shard(model, mesh=mesh["shard"], mp_policy=policy)
    return model


def _batch(step, rank, micro=0):
    gen = torch.Generator().manual_seed(1000 * step + 10 * rank + micro)
    idx = torch.randint(0, VOCAB, (4, SEQ), generator=gen)
    return idx, torch.roll(idx, -1, dims=1)


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _device(model):
    return _local(next(model.parameters())).device


def _full(model):
    return torch.cat([p.full_tensor().reshape(-1) for p in model.parameters()])



def _branch_used(step, rank):
    """The conditional branch: rank 0 uses it in even steps, nobody else ever."""
    return rank == 0 and step % 2 == 0


def _run(model, opt, steps, rank, *, accumulate=False, clip=None, scaler=None, overflow_at=None, branch=False):
    """Train ``steps`` steps; per step this rank's local (grads before clipping, params after the step)."""
    record = []
    for step in range(steps):
        model.use_branch = _branch_used(step, rank) if branch else True
        micro = (0, 1) if accumulate else (0,)
        for m in micro:
            model.set_requires_gradient_sync(m == micro[-1])
            idx, target = (t.to(_device(model)) for t in _batch(step, rank, m))
            loss = F.cross_entropy(model(idx).reshape(-1, VOCAB), target.reshape(-1)) / len(micro)
            if overflow_at == step and rank == dist.get_world_size() - 1:
                loss = loss * float("inf")  # every gradient of the last rank non-finite
            (scaler.scale(loss) if scaler else loss).backward()
        grads = [_local(p.grad).cpu().clone() if p.grad is not None else None for p in model.parameters()]
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)  # cannot change Birder's update
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        record.append((grads, [_local(p).detach().cpu().clone() for p in model.parameters()]))
    return record


def _reference(initial, records, world_size, num_nodes, shapes, requires_grad, used=None):
    """Recompute every rank's parameters from the recorded gradients; returns the first mismatch or None.

    ``initial[r]``: rank r's local parameters before training; ``records[r][t]``: (grads, params) of step t;
    ``used(t, i)``: whether some rank computed a gradient of parameter i in step t (None: always).
    """
    local = world_size // num_nodes
    params = [list(p) for p in initial]
    offsets = []
    for r in range(world_size):
        sizes = [p.numel() for p in initial[r]]
        offsets.append([sum(sizes[:i]) for i in range(len(sizes))])
    state = [{"m": torch.zeros(sum(p.numel() for p in initial[r]) + 64),
              "b": torch.zeros(sum(p.numel() for p in initial[r]) + 64)} for r in range(world_size)]
    for t in range(len(records[0])):
        bits = {}
        for r in range(world_size):
            grads = records[r][t][0]
            for i, g in enumerate(grads):
                if not requires_grad[i]:
                    continue
                n = g.numel()
                starts, canon = torch.tensor([0, n]), torch.tensor([offsets[r][i]])
                flag = torch.tensor([1 if used is None or used(t, i) else 0], dtype=torch.uint8)
                bits[r, i] = ref.compress(g.reshape(-1), state[r]["m"], state[r]["b"], starts, canon, beta=BETA,
                                          seed=mix_seed(SEED, r, t, 0), used_P=flag)
        for r in range(world_size):
            shard = r % local
            replicas = [node * local + shard for node in range(num_nodes)]
            for i, x in enumerate(params[r]):
                if not requires_grad[i] or x.numel() == 0:
                    continue
                x = x.clone()
                rows = torch.stack([bits[q, i] for q in replicas])
                starts, canon = torch.tensor([0, x.numel()]), torch.tensor([0])
                flag = torch.tensor([1 if used is None or used(t, i) else 0], dtype=torch.uint8)
                ref.apply_packed_([x], starts, canon, rows, planes=False, num_rows=num_nodes,
                                  lr_P=torch.tensor([LR]), wd_P=torch.tensor([WD]), used_P=flag)
                params[r][i] = x
        for r in range(world_size):
            for i, (want, got) in enumerate(zip(params[r], records[r][t][1])):
                if not torch.equal(want, got):
                    return f"step {t}, rank {r}, parameter {i} {shapes[i]}: max diff {(want - got).abs().max()}"
    return None


def _train_and_check(checks, name, rank, world_size, mesh, num_nodes, reduce_dtype=None, track_unused=False,
                     steps=2, **kwargs):
    """Train a fresh model; rank 0 checks every rank's parameters against the reference (``checks[name...]``)."""
    model = _build(mesh, reduce_dtype)
    params = list(model.parameters())
    shapes = [tuple(p.shape) for p in params]
    requires_grad = [p.requires_grad for p in params]
    opt = Birder(params, lr=LR, beta=BETA, weight_decay=WD, seed=SEED)
    opt.attach(model, mesh=mesh, track_unused=track_unused)
    initial = [_local(p).detach().cpu().clone() for p in params]
    record = _run(model, opt, steps, rank, branch=track_unused, **kwargs)
    everything = [None] * world_size
    dist.all_gather_object(everything, (initial, record))
    if rank == 0:
        branch = {i for i, (n, _) in enumerate(model.named_parameters()) if n.startswith("branch.")}
        used = (lambda t, i: i not in branch or any(_branch_used(t, r) for r in range(world_size))) \
            if track_unused else None
        checks[f"{name}: reference"] = _reference([e[0] for e in everything], [e[1] for e in everything],
                                                  world_size, num_nodes, shapes, requires_grad, used)
    checks[f"{name}: replicas identical"] = identical_across_ranks(_full(model))
    checks[f"{name}: exchanges"] = opt.comm_stats.snapshot()["num_exchanges"]
    checks[f"{name}: frozen unchanged"] = torch.equal(_local(model.frozen.weight).cpu(), initial[1])
    checks[f"{name}: state floats"] = opt.compressor.m.numel()
    checks[f"{name}: bytes across nodes"] = opt.comm_stats.snapshot()["bytes_inter"]
    checks["params"] = sum(p.numel() for p in params if p.requires_grad)
    return model


def _hsdp_worker(rank, world_size, num_nodes, device="cpu"):
    from dist_supernet.optim.fsdp import hsdp_mesh

    mesh = hsdp_mesh(device, num_nodes=num_nodes)
    checks = {}
    if device == "cuda":  # every process on the one GPU, over gloo: one rank per node (FSDP's own groups of 1)
        _train_and_check(checks, "fp32", rank, world_size, mesh, num_nodes, steps=3, clip=0.05)
        _train_and_check(checks, "bf16", rank, world_size, mesh, num_nodes, reduce_dtype=torch.bfloat16)
        _train_and_check(checks, "track_unused", rank, world_size, mesh, num_nodes, track_unused=True, steps=4)
        return checks
    if world_size == 2:  # 2 nodes x 1: conditional control flow (track_unused); 1 node x 2: plain FSDP
        _train_and_check(checks, "track_unused", rank, world_size, mesh, num_nodes, track_unused=True, steps=4)
        _train_and_check(checks, "one node", rank, world_size, hsdp_mesh("cpu", num_nodes=1), 1, steps=2)
        return checks
    _train_and_check(checks, "fp32", rank, world_size, mesh, num_nodes, steps=4, clip=0.05)
    _train_and_check(checks, "accumulate", rank, world_size, mesh, num_nodes, accumulate=True)
    _train_and_check(checks, "bf16", rank, world_size, mesh, num_nodes, reduce_dtype=torch.bfloat16)
    _train_and_check(checks, "fp16", rank, world_size, mesh, num_nodes, reduce_dtype=torch.float16)

    # An overflow on the last rank: under GradScaler (step 1) every rank's scaler skips and backs off alike;
    # without one (step 2) Birder itself skips the step on every rank.
    model = _build(mesh)
    opt = Birder(model.parameters(), lr=LR, beta=BETA, weight_decay=WD, seed=SEED)
    opt.attach(model, mesh=mesh)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for step in range(4):
        before = _full(model)
        _run(model, opt, 1, rank, scaler=scaler if step < 2 else None, overflow_at=0 if step in (1, 2) else None)
        if step in (1, 2):
            checks[f"overflow {step}: params unchanged"] = torch.equal(before, _full(model))
    checks["overflow: scale"] = scaler.get_scale()
    checks["overflow: birder skips"] = opt.skipped_steps
    checks["overflow: replicas identical"] = identical_across_ranks(_full(model))
    return checks


def test_hsdp_2x2_matches_the_reference_bit_for_bit():
    results = run_workers(_hsdp_worker, 4, 2, timeout_s=300)
    checks = results[0]
    for name in ("fp32", "accumulate", "bf16", "fp16"):
        assert checks[f"{name}: reference"] is None, checks[f"{name}: reference"]
        assert all(r[f"{name}: replicas identical"] for r in results), name
        assert all(r[f"{name}: frozen unchanged"] for r in results), name
    # One exchange per optimizer step, also with two micro-batches.
    assert checks["fp32: exchanges"] == 4 and checks["accumulate: exchanges"] == 2
    # Birder's state: this rank's shard only (8 bytes per parameter / 2 ranks per node, plus padding scratch).
    assert sum(r["fp32: state floats"] for r in results[:2]) <= checks["params"] + 2 * 64
    assert max(r["fp32: state floats"] for r in results) < 0.6 * checks["params"]
    # 1 bit per element of the shard (and a few flag bytes) across nodes, per step.
    assert checks["fp32: bytes across nodes"] < 4 * (checks["params"] / 2 / 8 + 32)
    for r in results:
        assert r["overflow 1: params unchanged"] and r["overflow 2: params unchanged"]
        assert r["overflow: replicas identical"]
        assert r["overflow: scale"] == 2.0**9  # backed off once, on every rank
        assert r["overflow: birder skips"] == 1  # the step without GradScaler


def test_hsdp_2x1_unused_parameters_and_plain_fsdp_match_the_reference():
    results = run_workers(_hsdp_worker, 2, 2, timeout_s=300)
    checks = results[0]
    for name in ("track_unused", "one node"):
        assert checks[f"{name}: reference"] is None, checks[f"{name}: reference"]
        assert all(r[f"{name}: replicas identical"] for r in results), name
    # One node: no replica to exchange with, only the ranks' agreement on skips crosses no node boundary.
    assert all(r["one node: bytes across nodes"] == 0 for r in results)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (benchmarks/gpu_check.sh runs it on a lent device)")
def test_hsdp_on_cuda_matches_the_cpu_reference_bit_for_bit():
    # The Triton kernels and the hook's CUDA stream under FSDP2; the reference runs the torch kernels on CPU.
    results = run_workers(_hsdp_worker, 2, 2, "cuda", timeout_s=300)
    for name in ("fp32", "bf16", "track_unused"):
        assert results[0][f"{name}: reference"] is None, results[0][f"{name}: reference"]
        assert all(r[f"{name}: replicas identical"] for r in results), name
