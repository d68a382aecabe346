"""model=gpt without processes: shapes, causality, tied weights, GPT-2's init, config errors naming the key."""

import math

import pytest
import torch
import torch.nn.functional as F

from dist_supernet.errors import ConfigError
from dist_supernet.models import TEXT, build_model, model_data_kind
from dist_supernet.models.gpt import GPT, Block, CausalSelfAttention, GPTConfig, gpt_config


@pytest.fixture(autouse=True)
def one_thread():
    """Small matmuls on 2 busy cores: two OpenMP threads spin against each other (30 steps: 35 s vs 0.9 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_logits_are_causal_and_the_head_is_tied():
    torch.manual_seed(0)
    model = build_model({"name": "gpt", "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16}, vocab_size=50)
    model.eval()
    idx = torch.randint(0, 50, (3, 16))
    logits = model(idx)
    assert logits.shape == (3, 16, 50) and model_data_kind("gpt") == TEXT
    changed = idx.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % 50  # only positions >= 9 differ
    after = model(changed)
    assert torch.allclose(after[:, :9], logits[:, :9], atol=1e-6)  # earlier positions see nothing later
    assert not torch.allclose(after[:, 9:], logits[:, 9:])
    assert model(idx[:, :5]).shape == (3, 5, 50)  # shorter contexts are fine
    with pytest.raises(ValueError, match="longer than block_size=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    assert model.lm_head.weight is model.transformer.wte.weight
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names and len(names) == len(set(names))  # DDP and Birder see it once
    untied = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32, tie_weights=False))
    assert untied.num_params() == model.num_params() + 50 * 32


def test_gpt2_initialisation_and_a_few_steps_learn():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=40, block_size=32, n_layer=2, n_head=4, n_embd=48)
    model = GPT(config)
    std = lambda name: dict(model.named_parameters())[name].std().item()  # noqa: E731
    assert abs(std("transformer.h.0.attn.c_attn.weight") - 0.02) < 0.002
    assert abs(std("transformer.h.0.mlp.c_proj.weight") - 0.02 / math.sqrt(4)) < 0.001
    assert model.transformer.h[0].mlp.c_fc.out_features == 4 * 48  # mlp_ratio 4
    # At init the next-token loss is that of a uniform guess; AdamW brings a repeated pattern down fast.
    idx = torch.arange(33).remainder(5).repeat(4, 1)
    loss = lambda: F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())  # noqa: E731
    assert abs(loss().item() - math.log(40)) < 0.2
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(25):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < 0.5


def test_parts_are_reusable_with_their_own_sizes():
    block = Block(n_embd=24, n_head=3, mlp_hidden=40, dropout=0.1, bias=False)
    assert block(torch.zeros(2, 7, 24)).shape == (2, 7, 24)
    assert block.mlp.c_fc.out_features == 40 and block.ln_1.bias is None and block.attn.c_attn.bias is None
    with pytest.raises(ConfigError, match="^n_head=5: must divide n_embd=24$"):
        CausalSelfAttention(24, 5)


@pytest.mark.parametrize("cfg, message", [
    ({"n_head": 3}, "model.n_head=3: must divide model.n_embd=128"),
    ({"n_layer": 0}, "model.n_layer=0: expected a positive integer"),
    ({"block_size": 1.5}, "model.block_size=1.5: expected a positive integer"),
    ({"dropout": 1.0}, "model.dropout=1.0: expected a number in [0, 1)"),
    ({"tie_weights": "yes"}, "model.tie_weights=yes: expected true or false"),
    ({"n_layers": 2}, "model.n_layers=2: unknown key for gpt"),
    ({"n_layer": 1000, "n_embd": 4096, "n_head": 32}, "model.n_embd=4096: with model.n_layer=1000 gives"),
])
def test_config_errors_name_the_key(cfg, message):
    with pytest.raises(ConfigError) as error:
        gpt_config({"name": "gpt", **cfg}, vocab_size=100)
    assert str(error.value).startswith(message), str(error.value)
