"""Low-frequency synchronisation on one process: config errors, quantizers, fragments, the schedule, the merge rules.

The multi-process behaviour (replicas, bytes, resume) is in tests/distributed/test_diloco.py.
"""

import math

import pytest
import torch

from dist_supernet.comm import mix_seed
from dist_supernet.errors import ConfigError
from dist_supernet.sync import FP32, DiLoCo, Int4, OneBit
from dist_supernet.sync.exchange import MeanExchange
from dist_supernet.sync.fragments import FlatParams, split_fragments
from hydra import compose, initialize_config_dir

from dist_supernet.train.config import check_group_choices, register_resolvers, validate
from tests.configs import compose_train
from tests.unit.test_config import CONF_DIR

DILOCO = ["sync=diloco", "compression=none", "optim=adamw"]
BAD_SYNC = [
    (["sync.every=0"], "sync.every=0: must be >= 1"),
    (["sync.every=10", "sync.fragments=11"], "sync.fragments=11: must be <= every=10"),
    (["sync.quantizer=birder"], "sync.quantizer=birder: Birder is its own outer optimizer"),
    (["sync.outer=birder"], "sync.outer=birder: Birder is its own outer optimizer"),
    (["sync.quantizer=int8"], "sync.quantizer=int8: expected one of fp32, int4, onebit, birder"),
    (["sync.delay=3"], "sync.delay=3: overlaps exchanges with inner steps only when streaming=true"),
    (["sync.streaming=true", "sync.delay=100"], "sync.delay=100: must be < every=100"),
    (["sync.merge_alpha=1.5"], "sync.merge_alpha=1.5: must be in [0.0, 1.0]"),
    (["sync.outer_lr=0"], "sync.outer_lr=0: must be in (0, 10.0]"),
    (["sync.form=ring"], "sync.form=ring: expected one of auto, allgather, reduce_scatter"),
    (["sync.backup_device=tpu"], "sync.backup_device=tpu: expected one of cpu, cuda"),
    (["sync.every=ten"], "sync.every=ten: expected int"),
    (["trainer.parallelism=hsdp"], "trainer.parallelism=hsdp: sync=diloco keeps a whole replica on each rank"),
]


def test_bad_sync_config_is_one_line_naming_the_key():
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):  # once: composing costs ~0.1 s
        for overrides, message in BAD_SYNC:
            with pytest.raises(ConfigError) as info:
                validate(compose("train", overrides=[*DILOCO, *overrides]))
            text = str(info.value)
            assert text.startswith(message) and "\n" not in text, (overrides, text)


def test_sync_group_choices_and_the_inner_compression():
    assert validate(compose_train()).sync.name == "none"
    run = validate(compose_train(*DILOCO, "sync.streaming=true", "sync.fragments=4"))
    assert run.sync.resolved_delay() == 12  # H // (2 F)
    with pytest.raises(ConfigError, match=r"^compression\.name=birder: sync=diloco runs DDP inside each node"):
        validate(compose_train("sync=diloco"))
    with pytest.raises(ConfigError, match=r"^sync=lowfreq: expected one of diloco, none$"):
        check_group_choices(["sync=lowfreq"], CONF_DIR)


def test_library_errors_use_the_library_names():
    net = torch.nn.Linear(4, 2)
    with pytest.raises(ConfigError, match=r"^sync_every=0: must be >= 1"):
        DiLoCo(net, sync_every=0)
    with pytest.raises(ConfigError, match=r"^outer_optimizer=birder"):
        DiLoCo(net, outer_optimizer="birder", quantizer="onebit")


# -- quantizers ------------------------------------------------------------------------------


def test_fp32_is_exact_and_counts_32_bits():
    q = FP32()
    xs = [torch.randn(37) for _ in range(3)]
    rows = torch.stack([q.encode(x, 0) for x in xs])
    assert rows.shape == (3, 4 * 37) and q.bits_per_element(37) == 32
    assert torch.equal(q.decode_mean(rows, 37, 0), ((xs[0] + xs[1]) + xs[2]) * (1 / 3))


def test_int4_is_unbiased_and_bounded():
    torch.manual_seed(0)
    q = Int4()
    x = torch.randn(1000) ** 3
    trials = 2000
    est = torch.stack([q.decode_mean(q.encode(x, mix_seed(7, s)).view(1, -1), 1000, 0) for s in range(trials)])
    sd = est.std(0)
    varies = sd > 0  # a block's absmax element is exact
    z = (est.mean(0) - x)[varies] / (sd[varies] / math.sqrt(trials))
    assert float(z.pow(2).mean().sqrt()) < 1.2 and float(z.abs().max()) < 5.5
    # every element within one level (scale / 7) of its value; 4 bits + a float32 scale per 256
    scale = x.view(-1, 250).abs().amax(1)  # (1000 elements: blocks of 256 hold parts of two rows; bound loosely)
    assert float((est[0] - x).abs().max()) <= float(x.abs().max()) / 7 + 1e-6
    assert q.bits_per_element(1024) == 4.125 and scale.numel() == 4


def test_onebit_payload_is_one_bit_and_a_scale_per_block():
    q = OneBit()
    assert q.payload_bytes(1024) == 128 + 4 and q.payload_bytes(1025) == 2 * (128 + 4)
    assert q.bits_per_element(1 << 20) == 1 + 32 / 1024
    x = torch.randn(3000)
    payload = q.encode(x, 5)
    mean = q.decode_mean(torch.stack([payload, payload]), 3000, 5)
    assert torch.allclose(mean, q.decode_mean(payload.view(1, -1), 3000, 5))  # the mean of equal rows
    assert math.isclose(float((mean * x).sum()), float((x * x).sum()), rel_tol=1e-4)  # DRIVE: <x^, x> = |x|^2


def test_a_single_node_exchange_is_the_vector_itself():
    x = torch.randn(10)
    exchange = MeanExchange(OneBit(), None, num_nodes=1, node_rank=0)
    assert torch.equal(exchange.mean(x, 0), x) and exchange.wire_bytes(10).total == 0


# -- fragments --------------------------------------------------------------------------------


def test_fragments_cover_every_element_once_and_shards_cover_each_fragment():
    params = [torch.zeros(10), torch.zeros(0), torch.zeros(3, 7), torch.zeros(5)]
    total = sum(p.numel() for p in params)
    for count in (1, 2, 3, 36):
        frags = split_fragments(params, count, local_rank=0, local_world_size=1)
        seen = sorted((i, first + k) for f in frags for i, first, n in f.segments for k in range(n))
        assert len(seen) == total and len(set(seen)) == total
        assert sum(f.numel for f in frags) == total and all(f.numel > 0 for f in frags)
        for frag in frags:  # the L shards of a fragment tile it exactly
            shards = [split_fragments(params, count, local_rank=r, local_world_size=3)[frag.index] for r in range(3)]
            assert [(s.shard_lo, s.shard_hi) for s in shards] == sorted((s.shard_lo, s.shard_hi) for s in shards)
            assert shards[0].shard_lo == 0 and shards[-1].shard_hi == frag.numel
            assert all(a.shard_hi == b.shard_lo for a, b in zip(shards, shards[1:]))


def test_fragments_from_modules_and_their_errors():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    params = list(net.parameters())
    frags = split_fragments(params, [net[1], net[0]], local_rank=0, local_world_size=1)
    assert [[i for i, _, _ in f.segments] for f in frags] == [[2, 3], [0, 1]]
    with pytest.raises(ValueError, match=r"fragments\[1\] holds a parameter that an earlier fragment holds too"):
        split_fragments(params, [net, net[0]], local_rank=0, local_world_size=1)
    with pytest.raises(ValueError, match=r"fragments\[0\] holds a parameter that is not one of the model's"):
        split_fragments(params, [torch.nn.Linear(1, 1)], local_rank=0, local_world_size=1)
    flat = FlatParams(params)
    values = torch.arange(frags[0].numel, dtype=torch.float32)
    flat.assign(frags[0], values)
    assert torch.equal(flat.gather(frags[0]), values) and torch.equal(net[1].bias.data, values[-2:])


# -- the schedule and the merge rules ----------------------------------------------------------


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _inner_step(net, opt, step):
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(step))
    net(x).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def test_schedule_offsets_and_sends():
    d = DiLoCo(_net(), sync_every=12, fragments=4, streaming=True, quantizer="fp32")
    assert d.offsets == [3, 6, 9, 12] and d.delay == 1  # tau = 12 // (2 * 4)
    assert [s for s in range(1, 30) if d.due(1, s)] == [6, 18]
    d = DiLoCo(_net(), sync_every=12, fragments=4, quantizer="fp32")
    assert d.offsets == [12] * 4 and d.delay == 0


@pytest.mark.parametrize("merge", ["mix", "delta", "blocking"])
def test_merge_rules_on_an_overlapped_result(merge):
    # One node, fp32, outer sgd lr 0.5: theta_global = backup - 0.5 (backup - theta_sent), known exactly.
    # The result arrives tau = 2 inner steps after the send; the replica has moved on to theta_local.
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    streaming = dict(streaming=True, delay=2, merge=merge if merge != "blocking" else "mix", merge_alpha=0.25)
    if merge == "blocking":
        streaming = {}
    d = DiLoCo(net, opt, sync_every=4, quantizer="fp32", outer_optimizer="sgd", outer_lr=0.5, **streaming)
    flat = lambda: torch.cat([p.detach().reshape(-1).clone() for p in net.parameters()])  # noqa: E731
    backup = flat()
    for step in range(1, 4):
        _inner_step(net, opt, step)
        d.step()
    _inner_step(net, opt, 4)
    sent = flat()
    d.step()  # step 4: the send (and, blocking, the merge)
    delta = backup - sent
    theta_global = backup - delta * 0.5
    if merge != "blocking":
        _inner_step(net, opt, 5)
        d.step()
        assert d.pending  # in flight until step 6
        _inner_step(net, opt, 6)
        local = flat()
        d.step()  # step 6: the merge
        expected = torch.lerp(local, theta_global, 0.75) if merge == "mix" else local - (sent - theta_global)
    else:
        expected = theta_global
    assert torch.allclose(flat(), expected, atol=1e-7, rtol=0), merge
    assert torch.equal(d.state[0].backup, theta_global)  # the weights at the last sync: theta_global either way
    d.finish()
    assert d.state[0].synced_at == d.num_steps
