"""BN recalibration, single process: running stats become the true mean / unbiased var of the active features."""

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dist_supernet.supernet import ElasticViT, OFACNN
from dist_supernet.supernet.bn_recalibration import recalibrate_bn
from dist_supernet.supernet.export import export_subnet

STAT_ATOL = 1e-5  # fp32 features, float64 sums


def _data(num_batches=4, batch=6, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 1, size, size, generator=g) * 2 + 1.5, torch.zeros(batch)) for _ in range(num_batches)]


def _features_per_bn(model, batches):
    """Every BN input, concatenated over batches, from a train-mode pass that leaves running stats alone."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    seen = {bn: [] for bn in bns}
    handles = [bn.register_forward_pre_hook(lambda m, inp: seen[m].append(inp[0].detach())) for bn in bns]
    saved = [(bn.momentum, bn.running_mean.clone(), bn.running_var.clone()) for bn in bns]
    model.train()
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    for h in handles:
        h.remove()
    for bn, (momentum, mean, var) in zip(bns, saved):
        bn.momentum, bn.running_mean[:], bn.running_var[:] = momentum, mean, var
    return {bn: torch.cat(xs) for bn, xs in seen.items() if xs}


def test_stem_stats_equal_the_data_stats_and_the_rest_is_untouched():
    torch.manual_seed(0)
    net = OFACNN(1, 8, 10)
    net.set_active(net.min_arch())
    batches = _data()
    stem_bn = net.stem.bn
    C = net.stem.conv.active_out_channels
    assert C < stem_bn.num_features
    stem_bn.running_mean.fill_(7.0)
    tracked = stem_bn.num_batches_tracked.clone()
    net.train(False)

    seen = recalibrate_bn(net, batches)

    assert seen == 24
    x = torch.cat([b[0] for b in batches])
    feats = F.conv2d(x, net.stem.conv.active_weight(1), None, 1, 1)  # the stem BN's input
    torch.testing.assert_close(stem_bn.running_mean[:C], feats.mean(dim=(0, 2, 3)), atol=STAT_ATOL, rtol=0)
    torch.testing.assert_close(stem_bn.running_var[:C], feats.var(dim=(0, 2, 3), unbiased=True),
                               atol=STAT_ATOL, rtol=1e-5)
    assert torch.all(stem_bn.running_mean[C:] == 7.0)  # channels of wider subnets: untouched
    assert torch.equal(stem_bn.num_batches_tracked, tracked)
    assert not net.training and all(not m.training for m in net.modules())
    assert all(m.momentum == 0.1 for m in net.modules() if isinstance(m, nn.BatchNorm2d))


def test_every_layer_gets_the_stats_of_its_train_mode_inputs():
    torch.manual_seed(1)
    net = OFACNN(1, 8, 10)
    arch = net.sample(random.Random(2))
    net.set_active(arch)
    batches = _data(num_batches=3, seed=1)
    expected = _features_per_bn(net, batches)
    skipped = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d) and m not in expected]
    skipped_before = [m.running_mean.clone() for m in skipped]

    recalibrate_bn(net, batches, num_batches=3)

    for bn, feats in expected.items():
        C = feats.shape[1]
        torch.testing.assert_close(bn.running_mean[:C], feats.mean(dim=(0, 2, 3)), atol=STAT_ATOL, rtol=0)
        torch.testing.assert_close(bn.running_var[:C], feats.var(dim=(0, 2, 3)), atol=STAT_ATOL, rtol=1e-5)
    assert skipped and all(torch.equal(m.running_mean, b) for m, b in zip(skipped, skipped_before))

    # The exported subnet carries the recalibrated stats, and recalibrating it gives the same stats.
    plain = export_subnet(net, arch)
    before = {k: v.clone() for k, v in plain.state_dict().items() if "running" in k}
    for m in plain.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
    assert recalibrate_bn(plain, iter(batches)) == 18
    for k, v in plain.state_dict().items():
        if "running" in k:
            torch.testing.assert_close(v, before[k], atol=STAT_ATOL, rtol=1e-5)


def test_num_batches_limits_the_pass_and_models_without_bn_are_fine():
    net = OFACNN(1, 8, 10)
    assert recalibrate_bn(net, _data(num_batches=5), num_batches=2) == 12
    vit = ElasticViT(1, 8, 10)
    assert recalibrate_bn(vit, [torch.randn(3, 1, 8, 8)]) == 3
    with pytest.raises(ValueError, match="num_batches"):
        recalibrate_bn(net, _data(), num_batches=0)
