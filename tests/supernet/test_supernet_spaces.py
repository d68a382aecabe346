"""Both spaces at 8x8 and 28x28: export equality, exact params, FLOPs vs counters, subnet counts, masks vs grads."""

import itertools
import random

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dist_supernet.supernet import ElasticViT, OFACNN, arch_key, build_supernet, step_masks, union_masks
from dist_supernet.supernet.export import export_subnet
from dist_supernet.supernet.subnets import Attention

SPACES = [("ofa_cnn", 8), ("ofa_cnn", 28), ("elastic_vit", 8), ("elastic_vit", 28)]
EXPORT_ATOL = 1e-5  # fp32; same ops on sliced vs copied weights


def _archs(net, num_random=3, seed=0):
    rng = random.Random(seed)
    return [net.max_arch(), net.min_arch()] + [net.sample(rng) for _ in range(num_random)]


def _randomize_bn_stats(net):
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.5, 2.0)


def hook_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates per image counted by forward hooks on the plain module's layers."""
    total = 0

    def conv(m, inputs, out):
        nonlocal total
        total += out[0].numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear(m, inputs, out):
        nonlocal total
        total += out[0].numel() * m.in_features

    def attention(m, inputs, out):
        nonlocal total
        tokens = inputs[0].shape[1]
        total += 2 * tokens * tokens * m.q.out_features  # q k^T and attn v

    handles = []
    for m in model.modules():
        hook = {nn.Conv2d: conv, nn.Linear: linear, Attention: attention}.get(type(m))
        if hook is not None:
            handles.append(m.register_forward_hook(hook))
    with torch.no_grad():
        model(x[:1])
    for h in handles:
        h.remove()
    return total


@pytest.mark.parametrize("name, size", SPACES)
def test_export_params_and_flops(name, size):
    torch.manual_seed(0)
    net = build_supernet({"name": name}, 1, size, 10)
    _randomize_bn_stats(net)
    net.eval()
    x = torch.randn(3, 1, size, size)
    for arch in _archs(net):
        net.set_active(arch)
        plain = export_subnet(net, arch)
        assert not any(isinstance(p, type(net)) for p in plain.modules())
        torch.testing.assert_close(plain(x), net(x), atol=EXPORT_ATOL, rtol=0)
        assert net.params(arch) == sum(p.numel() for p in plain.parameters())
        # Hooks count the same ops the formula does: exact.
        assert net.flops(arch) == hook_macs(plain, x)
        # torch's dispatch-level counter: 2 FLOPs per MAC, nothing else counted (bias adds are not): within 0.1%.
        with FlopCounterMode(display=False) as counter:
            plain(x[:1])
        assert counter.get_total_flops() == pytest.approx(2 * net.flops(arch), rel=1e-3)


def test_flops_scale_with_image_size_and_are_monotone_in_each_choice():
    net = OFACNN(1, 28, 10)
    assert net.flops(net.max_arch(), image_size=8) < net.flops(net.max_arch())
    big, small = net.max_arch(), net.max_arch()
    small["kernel_size"][1][0] = 3
    assert net.flops(small) < net.flops(big) and net.params(small) < net.params(big)
    assert net.flops(net.min_arch()) < net.flops(net.min_arch(["kernel"])) < net.flops(net.max_arch())


def _tiny_spaces():
    return [
        OFACNN(1, 8, 10, stage_widths=[8, 8], depths=[1, 2], kernel_sizes=[3, 5], expand_ratios=[2],
               width_mults=[0.5, 1.0]),
        ElasticViT(1, 8, 10, embed_dims=[8, 16], num_heads=[1, 2], head_dim=4, mlp_ratios=[1, 2], depths=[1, 2]),
    ]


@pytest.mark.parametrize("net", _tiny_spaces(), ids=["ofa_cnn", "elastic_vit"])
def test_num_subnets_counts_distinct_archs(net):
    genes = net.genes()
    for elastic in (None, [net.elastic_dims[0]], [net.elastic_dims[1]]):
        dims = net.resolve_elastic(elastic)
        options = [g.choices if g.dim in dims else (g.choices[-1],) for g in genes]
        distinct = {arch_key(net.genes_to_arch(v)) for v in itertools.product(*options)}
        assert net.num_subnets(elastic) == len(distinct)


@pytest.mark.parametrize("name, size, kwargs", [
    ("ofa_cnn", 8, {}), ("ofa_cnn", 28, {}), ("ofa_cnn", 8, {"kernel_transform": True}),
    ("elastic_vit", 8, {}), ("elastic_vit", 28, {}),
])
def test_masks_match_gradient_pattern(name, size, kwargs):
    """Unused slices get exactly no gradient; used slices get gradient.

    Exceptions on the used side are data or algebra, not slicing: ReLU zeros
    can cancel a few depthwise taps on 2x2 maps, and the bias of a projection
    BN (linear path into a train-mode BN) has an analytically zero gradient.
    """
    torch.manual_seed(0)
    net = build_supernet({"name": name, **kwargs}, 1, size, 10).train()
    for arch in _archs(net, num_random=2, seed=1):
        net.zero_grad(set_to_none=True)
        net.set_active(arch)
        out = net(torch.randn(8, 1, size, size))
        (out * torch.randn_like(out)).sum().backward()
        masks = net.active_masks(arch)
        assert set(masks) == set(net.parameters())
        used, zero_used = 0, 0
        for pname, param in net.named_parameters():
            grad = torch.zeros_like(param) if param.grad is None else param.grad
            mask = masks[param]
            assert mask.dtype == torch.bool and mask.shape == param.shape
            assert torch.all(grad[~mask] == 0), f"{pname}: gradient outside the mask"
            if pname.endswith("project.bn.bias"):
                continue
            if mask.any():
                assert torch.any(grad[mask] != 0), f"{pname}: marked used but no gradient at all"
            used += int(mask.sum())
            zero_used += int((grad[mask] == 0).sum())
        assert zero_used <= 0.002 * used


def test_union_masks_is_elementwise_or():
    net = OFACNN(1, 8, 10)
    archs = [net.min_arch(), net.sample(random.Random(3))]
    union = step_masks(net, archs)
    a, b = (net.active_masks(x) for x in archs)
    for p in net.parameters():
        assert torch.equal(union[p], a[p] | b[p])
    assert union_masks([a])[net.classifier.weight].data_ptr() != a[net.classifier.weight].data_ptr()


def test_masks_leave_out_padding_only_kernel_taps():
    net = OFACNN(1, 8, 10)  # stage 3 runs on 2x2 maps: a 5x5 depthwise kernel's outer ring never meets data
    mask = net.active_masks(net.max_arch())[net.stages[2][1].depthwise.conv.weight]
    assert mask[..., 1:4, 1:4].all()
    assert not mask[..., 0, :].any() and not mask[..., :, 4].any()
    mask = OFACNN(1, 28, 10).active_masks(net.max_arch())
    assert all(m.all() for m in mask.values())  # 4x4 maps and larger: every tap of the max arch is used


def test_restricted_sampling_mutation_and_crossover_stay_valid():
    for net in (OFACNN(1, 8, 10), ElasticViT(1, 8, 10)):
        rng = random.Random(0)
        only = [net.elastic_dims[0]]
        assert net.num_subnets(only) < net.num_subnets()
        fixed = {g.name: g.choices[-1] for g in net.genes() if g.dim != only[0]}
        for _ in range(20):
            arch = net.sample(rng, only)
            values = net.arch_to_genes(arch)
            for gene, value in zip(net.genes(), values):
                if gene.name in fixed:
                    assert value == fixed[gene.name]
            child = net.mutate(arch, rng, prob=0.5)
            mixed = net.crossover(arch, child, rng)
            for candidate in (child, mixed):
                assert net.validate_arch(candidate) == candidate
        mutated = net.mutate(net.max_arch(), rng, prob=1.0, elastic=only)
        for gene, value in zip(net.genes(), net.arch_to_genes(mutated)):
            if gene.name in fixed:
                assert value == fixed[gene.name]


@pytest.mark.parametrize("arch_change, match", [
    (lambda a: a.pop("depth"), "depth"),
    (lambda a: a.update(width_mult=[1.0]), "width_mult"),
    (lambda a: a["kernel_size"][0].append(3), "kernel_size"),
    (lambda a: a["kernel_size"][0].__setitem__(0, 7), r"kernel_size\[0\]\[0\]"),
    (lambda a: a.update(extra=1), "extra"),
])
def test_invalid_arch_names_the_key(arch_change, match):
    net = OFACNN(1, 8, 10)
    arch = net.max_arch()
    arch_change(arch)
    with pytest.raises(ValueError, match=match):
        net.set_active(arch)


@pytest.mark.parametrize("cfg, match", [
    ({"name": "resnet"}, "model.name"),
    ({"name": "ofa_cnn", "kernel_sizes": []}, "kernel_sizes"),
    ({"name": "ofa_cnn", "kernel_sizes": [3, 4]}, "kernel_sizes"),
    ({"name": "ofa_cnn", "depths": []}, "depths"),
    ({"name": "ofa_cnn", "stage_strides": [2]}, "stage_strides"),
    ({"name": "elastic_vit", "patch_size": 3}, "patch_size"),
    ({"name": "elastic_vit", "mlp_ratios": [0, 2]}, "mlp_ratios"),
    ({"name": "elastic_vit", "kernel_sizes": [3]}, "model.kernel_sizes"),
])
def test_bad_model_config_names_the_key(cfg, match):
    with pytest.raises(ValueError, match=match):
        build_supernet(cfg, 1, 8, 10)


def test_elastic_restriction_rejects_unknown_dims():
    with pytest.raises(ValueError, match="heads"):
        OFACNN(1, 8, 10).min_arch(["heads"])
