"""model=elastic_gpt without processes: slicing and masks, export equal to a plain GPT, FLOPs and params by hand,
the config, and the text report (search on val perplexity, table, plot, exported files)."""

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from dist_supernet.errors import ConfigError
from dist_supernet.models import TEXT, build_model, is_supernet, model_data_kind
from dist_supernet.models.gpt import GPT, CausalSelfAttention
from dist_supernet.supernet import build_supernet, check_supernet_config, export_subnet, load_subnet, save_subnet
from dist_supernet.supernet.elastic import ElasticEmbedding
from dist_supernet.supernet.elastic_gpt import ElasticCausalSelfAttention, ElasticGPT
from dist_supernet.train.parallel import fsdp_units

# Every dimension elastic, the embedding width too; head_dim = 32 / 4 = 8.
SPACE = dict(block_size=12, n_layers=[1, 2, 3], n_heads=[1, 2, 4], n_embds=[16, 24, 32], mlp_ratios=[0.5, 1, 2])
# Logits of an exported subnet against the supernet's: the same weights, the same operations, but c_attn's rows
# in another order and contiguous copies instead of strided slices, so a BLAS may sum a dot product in another
# order: |error| <= K * 2^-24 * sum|terms| per layer, with K <= 64 terms of size ~0.02 * |x| here: ~1e-6 on
# logits of size ~1. On the x86 CPUs we run on they are bit-identical (the test prints the largest difference).
LOGIT_ATOL = 1e-5


def _net(**overrides) -> ElasticGPT:
    torch.manual_seed(0)
    return ElasticGPT(vocab_size=29, **{**SPACE, **overrides})


def _mixnmatch(net: ElasticGPT) -> dict:
    """A random subnet whose blocks differ in heads and MLP width (Mix'n'Match), narrower than max."""
    rng = random.Random(5)
    while True:
        arch = net.sample(rng)
        if len(set(arch["n_head"])) > 1 and len(set(arch["mlp_ratio"])) > 1 and arch["n_embd"] < net.max_embd:
            return arch


def test_elastic_layers_slice_the_leading_parts():
    wte = ElasticEmbedding(29, 32)
    wte.set_active(embed_dim=24)
    idx = torch.randint(0, 29, (2, 5))
    assert torch.equal(wte(idx), wte.weight[idx][..., :24])
    assert wte.used_slices(0) == {"weight": (slice(None), slice(0, 24))}

    # Two of four heads on a 24-wide input: a plain attention built from the export computes the same.
    torch.manual_seed(0)
    attn = ElasticCausalSelfAttention(32, max_heads=4, head_dim=8)
    attn.set_active(n_head=2)
    x = torch.randn(3, 7, 24)
    plain = CausalSelfAttention(24, 2, head_dim=8)
    plain.load_state_dict(attn.export_state(24))
    assert torch.allclose(attn(x), plain(x), atol=LOGIT_ATOL, rtol=0)
    # head-major rows: heads 0 and 1 are rows 0..47 (q, k, v of head 0, then of head 1)
    assert attn.used_slices(24) == {"c_attn.weight": (slice(0, 48), slice(0, 24)), "c_attn.bias": (slice(0, 48),),
                                    "c_proj.weight": (slice(0, 24), slice(0, 16)), "c_proj.bias": (slice(0, 24),)}
    exported_q = attn.export_state(24)["c_attn.weight"][:16]  # the plain module's q rows: head 0's q, head 1's q
    assert torch.equal(exported_q, torch.cat([attn.c_attn.weight[0:8, :24], attn.c_attn.weight[24:32, :24]]))


def test_masks_cover_exactly_the_elements_that_get_a_gradient():
    net = _net()
    for arch in (net.min_arch(), _mixnmatch(net), net.max_arch()):
        net.zero_grad(set_to_none=False)
        net.set_active(arch)
        idx = torch.randint(0, 29, (4, 12), generator=torch.Generator().manual_seed(1))
        net(idx).square().mean().backward()
        masks = net.active_masks(arch)
        names = {p: n for n, p in net.named_parameters()}
        assert len(masks) == len(names) == len(list(net.parameters()))  # the tied weight once
        for p, mask in masks.items():
            grad = torch.zeros_like(p) if p.grad is None else p.grad  # None: a skipped block
            assert not bool(grad[~mask].any()), (names[p], arch)  # nothing outside the mask is read
            if names[p].endswith("c_attn.bias"):  # a key bias adds q·b_k to all of a query's scores: softmax
                grad, mask = (t.view(-1, 3, 8)[:, [0, 2]] for t in (grad, mask))  # cancels it, its gradient is ~0
            if mask.any():  # and the mask is not too wide
                assert (grad[mask] != 0).float().mean() > 0.99, (names[p], arch)
        if arch == net.max_arch():
            assert all(bool(m.all()) for m in masks.values())
    # The tied head reads the embedding's active columns: under wte's one name.
    wte = net.transformer.wte.weight
    assert net.lm_head.weight is wte and bool(net.active_masks(net.min_arch())[wte][:, :16].all())


def test_export_gives_a_plain_gpt_with_the_same_logits(tmp_path):
    net = _net().eval()
    idx = torch.randint(0, 29, (3, 12), generator=torch.Generator().manual_seed(2))
    worst = 0.0
    for name, arch in (("max", net.max_arch()), ("min", net.min_arch()), ("mixnmatch", _mixnmatch(net))):
        plain = export_subnet(net, arch)
        assert type(plain) is GPT and plain.lm_head.weight is plain.transformer.wte.weight
        assert plain.num_params() == net.params(arch)
        assert [b.attn.n_head for b in plain.transformer.h] == arch["n_head"]
        with torch.no_grad():
            net.set_active(arch)
            expected = net(idx)
            got = plain(idx)
            save_subnet(tmp_path / f"{name}.pt", plain)
            loaded, config = load_subnet(tmp_path / f"{name}.pt")  # rebuilt from the config alone
            assert config["arch"] == arch and torch.equal(loaded(idx), got)
        worst = max(worst, (got - expected).abs().max().item())
        assert torch.allclose(got, expected, atol=LOGIT_ATOL, rtol=0), (name, (got - expected).abs().max())
    print(f"largest |exported - supernet| logit difference: {worst:.3g}")
    # Training mode with dropout 0 and the standalone builder: the same plain module.
    alone = build_model({"name": "subnet", "arch": "min", "space": {"name": "elastic_gpt", **SPACE}}, vocab_size=29)
    assert type(alone) is GPT and alone.block_size == 12 and alone.num_params() == net.params(net.min_arch())


def test_flops_and_params_by_hand():
    net = ElasticGPT(10, block_size=8, n_layers=[1, 2], n_heads=[1, 2], n_embds=[16], mlp_ratios=[1, 2])
    arch = {"n_embd": 16, "n_layer": 2, "n_head": [2, 1], "mlp_ratio": [1, 2]}  # head_dim 8, hidden 16 and 32
    # wte 10x16, wpe 8x16, ln_f 2x16; block 0: 2 LNs, c_attn 16x48+48, c_proj 16x16+16, c_fc 16x16+16,
    # c_proj 16x16+16; block 1 (1 head, hidden 32): 2 LNs, c_attn 16x24+24, c_proj 8x16+16, c_fc 16x32+32,
    # c_proj 32x16+16; the head is tied.
    block0 = 64 + (768 + 48) + (256 + 16) + (256 + 16) + (256 + 16)
    block1 = 64 + (384 + 24) + (128 + 16) + (512 + 32) + (512 + 16)
    assert net.params(arch) == 160 + 128 + 32 + block0 + block1 == 3704
    assert export_subnet(net, arch).num_params() == 3704
    assert ElasticGPT(10, block_size=8, n_layers=[2], n_heads=[2], n_embds=[16], mlp_ratios=[1],
                      tie_weights=False, bias=False).params({"n_embd": 16, "n_layer": 2, "n_head": [2, 2],
                                                             "mlp_ratio": [1, 1]}) == 160 + 128 + 16 + 2 * (
        32 + 768 + 256 + 256 + 256) + 160
    # MACs per token at T = 8: c_attn 16x48, q·k and att·v 2x8x16, c_proj 16x16, MLP 2x16x16; then
    # 16x24, 2x8x8, 8x16, 2x16x32; the head 16x10.
    attention = 2 * 8 * 16 + 2 * 8 * 8
    linear = (768 + 256 + 512) + (384 + 128 + 1024) + 160
    assert net.flops(arch) == linear + attention == 3616
    assert net.flops(arch, 4) == linear + attention // 2  # attention grows with the context, the rest does not


def test_in_place_distillation_is_a_mean_over_next_token_positions():
    from types import SimpleNamespace

    from dist_supernet.train.supernet_trainer import SupernetTrainer

    trainer = SimpleNamespace(distill_weight=0.5, distill_temperature=2.0, distill_start=0, step=0)
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(3, 7, 11, generator=gen), torch.randn(3, 7, 11, generator=gen)
    targets = torch.randint(0, 11, (3, 7), generator=gen)
    loss = SupernetTrainer.loss(trainer, student, targets, teacher)
    # by hand: per position KL(teacher_T || student_T) * T^2 and cross-entropy, each a mean over the 21 positions
    p_t = F.softmax(teacher / 2, dim=-1)
    kl = (p_t * (p_t.log() - F.log_softmax(student / 2, dim=-1))).sum(-1).mean() * 4
    ce = -F.log_softmax(student, dim=-1).gather(-1, targets[..., None]).mean()
    assert torch.allclose(loss, 0.5 * kl + 0.5 * ce, atol=1e-6)
    assert torch.allclose(SupernetTrainer.loss(trainer, student, targets, None), ce, atol=1e-6)  # the teacher's
    # distillation.start_step: the students learn the labels before it, the mix from it on
    trainer.distill_start, trainer.step = 5, 4
    assert torch.allclose(SupernetTrainer.loss(trainer, student, targets, teacher), ce, atol=1e-6)
    trainer.step = 5
    assert torch.allclose(SupernetTrainer.loss(trainer, student, targets, teacher), 0.5 * kl + 0.5 * ce, atol=1e-6)
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match=r"^supernet.distillation.start_step="):
            check_supernet_config({"distillation": {"start_step": bad}}, build_supernet({"name": "elastic_gpt"},
                                                                                         vocab_size=11))


def test_zero_init_residual_makes_every_depth_compute_the_shallowest_subnet():
    torch.manual_seed(0)
    net = ElasticGPT(vocab_size=20, block_size=8, n_layers=[1, 2, 3], n_heads=[1, 2], n_embds=[16],
                     zero_init_residual=True)
    idx = torch.randint(0, 20, (2, 8))
    outs = []
    for depth in (1, 2, 3):
        net.set_active({**net.max_arch(), "n_layer": depth, "n_head": [2] * depth, "mlp_ratio": [4] * depth})
        outs.append(net(idx))
    # every block is the identity at init (its output projections are 0): the depths agree, not trivially
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2]) and outs[0].std() > 0
    assert all(not p.any() for n, p in net.named_parameters() if n.endswith("c_proj.weight"))
    plain = ElasticGPT(vocab_size=20, block_size=8, n_layers=[1, 2, 3], n_heads=[1, 2], n_embds=[16])
    assert all(p.any() for n, p in plain.named_parameters() if n.endswith("c_proj.weight"))


def test_registration_config_errors_and_fsdp_units():
    assert is_supernet("elastic_gpt") and model_data_kind("elastic_gpt") == TEXT
    assert model_data_kind("subnet", {"name": "subnet", "space": {"name": "elastic_gpt"}}) == TEXT
    assert model_data_kind("subnet", {"name": "subnet", "space": {"name": "ofa_cnn"}}) == "image"
    net = build_model({"name": "elastic_gpt", "n_layers": [1, 2], "block_size": 16}, vocab_size=30)
    assert net.block_size == 16 and net.num_subnets() == 9 + 81 and net.head_dim == 32
    units = fsdp_units(net)
    assert units == list(net.transformer.h)
    in_units = {id(p) for u in units for p in u.parameters()}
    assert id(net.transformer.wte.weight) not in in_units and id(net.lm_head.weight) not in in_units
    for cfg, message in (({"n_heads": [3]}, "model.n_heads=[3]: the largest must divide"),
                         ({"n_layer": 2}, "model.n_layer=2: unknown key for elastic_gpt"),
                         ({"dropout": 1.5}, "model.dropout=1.5: expected a number in [0, 1)"),
                         ({"n_layers": [0, 2]}, "model.n_layers=[0,2]: choices must be positive")):
        with pytest.raises(ConfigError) as error:
            build_supernet({"name": "elastic_gpt", **cfg}, vocab_size=30)
        assert str(error.value).startswith(message), str(error.value)
    mid = {"n_embd": 128, "n_layer": 2, "n_head": [2, 2], "mlp_ratio": [2, 2]}
    checked = check_supernet_config({"report_archs": {"mid": mid}}, net)
    assert checked["report_archs"] == {"mid": mid}
    with pytest.raises(ConfigError, match=r"^supernet.report_archs.mid=.*n_head\[1\]=3: expected one of \[1, 2, 4\]"):
        check_supernet_config({"report_archs": {"mid": {**mid, "n_head": [2, 3]}}}, net)
    with pytest.raises(ConfigError, match="name 'max'"):
        check_supernet_config({"report_archs": {"max": mid}}, net)


def test_text_report_searches_on_val_perplexity_and_exports(tmp_path):
    from dist_supernet.data import load_text
    from dist_supernet.train.supernet_report import SubnetEvaluator, format_table, search_and_report

    words = ["elastic", "supernet", "token", "birder", "matformer", "heads", "width", "depth", "the", "a"]
    rng = random.Random(0)
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(600)))
    data = load_text(str(path), val_fraction=0.1, test_fraction=0.1, eval_windows=6)
    torch.manual_seed(0)
    net = ElasticGPT(data.vocab_size, block_size=16, n_layers=[1, 2], n_heads=[1, 2], n_embds=[16, 32],
                     mlp_ratios=[1, 2])
    evaluator = SubnetEvaluator(net, data, batch_size=4, num_batches=2, seed=0, device=torch.device("cpu"))
    assert evaluator.metric == "perplexity" and evaluator.batches == []  # no BatchNorm: nothing to recalibrate
    mid = {"n_embd": 16, "n_layer": 2, "n_head": [2, 1], "mlp_ratio": [2, 1]}
    report = search_and_report(net, evaluator, {"population_size": 4, "num_generations": 1,
                                                "flops_fractions": [0.3, 0.6]},
                               elastic=None, seed=0, output_dir=tmp_path / "run", is_rank0=True,
                               report_archs={"mid": mid})
    assert report["metric"] == "perplexity" and report["report_split"] == "test" and "accuracy_split" not in report
    assert "val split (6 windows of 16 tokens)" in report["perplexity"] and "per token" in report["flops"]
    names = [e["name"] for e in report["subnets"]]
    assert names == ["max", "min", "searched_1", "searched_2", "mid"]
    for entry in report["subnets"]:
        assert entry["flops"] <= entry.get("flops_limit", entry["flops"])
        val_loss, _ = evaluator.score(entry["arch"], split="val")
        test_loss, _ = evaluator.score(entry["arch"], split="test")
        assert entry["val_loss"] == val_loss and entry["loss"] == test_loss and "accuracy" not in entry
        assert entry["perplexity"] == math.exp(test_loss)
        # The exported file alone gives the reported test loss.
        module, _ = load_subnet(tmp_path / "run" / entry["file"])
        with torch.no_grad():
            total = sum(F.cross_entropy(module(x).flatten(0, 1), y.flatten(), reduction="sum").item()
                        for x, y in data.eval_batches("test", rank=0, world_size=1, batch_size=4, model=module))
        tokens = sum(y.numel() for _, y in data.eval_batches("test", rank=0, world_size=1, batch_size=4,
                                                             model=module))
        assert abs(total / tokens - entry["loss"]) < 1e-5, entry["name"]
    # the best val loss among everything scored under a budget (lower perplexity is better)
    searched = {e["name"]: e for e in report["subnets"]}["searched_2"]
    assert searched["val_loss"] <= {e["name"]: e for e in report["subnets"]}["min"]["val_loss"]
    saved = json.loads((tmp_path / "run" / "subnets.json").read_text())
    assert saved["subnets"][-1]["arch"] == mid
    assert (tmp_path / "run" / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    header = format_table(report["subnets"], metric="perplexity").splitlines()[0].split()
    assert header == ["subnet", "MFLOPs/tok", "limit", "params", "val", "loss", "val", "ppl", "test", "ppl"]
