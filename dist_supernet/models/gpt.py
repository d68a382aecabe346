"""A decoder-only GPT language model, written the way nanoGPT writes it (and nothing else in it).

Token and learned position embeddings, ``n_layer`` pre-LayerNorm blocks of causal
self-attention (``F.scaled_dot_product_attention``) and an MLP, a final LayerNorm
and a linear head to ``vocab_size`` logits, optionally tied to the token
embedding. ``GPT(config)(idx_BT)`` returns logits ``[B, T, V]``; the loss is the
caller's (the trainer's cross-entropy over every position). No parallelism
here: DDP, compression and the data's batching wrap it from outside.

The pieces are separate classes with plain constructor arguments, so that an
elastic (MatFormer-style) GPT can mirror them and export its subnets to them:
``CausalSelfAttention(n_embd, n_head, ..., head_dim=None)`` (``n_head * head_dim``
wide inside, ``n_embd`` by default), ``MLP(n_embd, hidden, ...)`` (the hidden
width is an argument, not ``4 * n_embd`` fixed), ``Block(n_embd, n_head,
mlp_hidden, ...)``; parameter names match nanoGPT's (``transformer.wte``,
``transformer.h.0.attn.c_attn``, ``lm_head``). ``GPTConfig.layers`` gives each
block its own heads and MLP width (an exported subnet of ``model=elastic_gpt``).

Shapes: B batch, T tokens (<= block_size), C = n_embd, H heads, D head dim (C / H unless given), V vocab.

Sizes (``model.*``, non-embedding parameters ~ 12·n_layer·n_embd²):

| n_layer | n_head | n_embd | parameters (vocab 100, block 128, tied) |
| ---: | ---: | ---: | ---: |
| 2 | 2 | 64 | 0.11M |
| 4 | 4 | 128 | 0.82M |
| 6 | 6 | 384 | 10.7M |
| 12 | 12 | 768 | 85.2M |

Example::
    >>> model = GPT(GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=32))
    >>> model(torch.zeros(3, 16, dtype=torch.long)).shape
    torch.Size([3, 16, 65])
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from dist_supernet.models import TEXT, register_model
from dist_supernet.models._checks import known_keys, probability
from dist_supernet.errors import ConfigError

MAX_PARAMS = 2_000_000_000  # why: beyond ~2B parameters a CPU/GPU single-replica model is a typo, not a plan


@dataclasses.dataclass
class GPTConfig:
    vocab_size: int  # from the data (data=text: the characters of the corpus)
    block_size: int = 128  # longest context; the learned position table has this many rows
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio * n_embd (GPT-2's 4)
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm layers, as GPT-2
    tie_weights: bool = True  # lm_head shares the token embedding (GPT-2 does)
    head_dim: int | None = None  # width of one head; None: n_embd // n_head (GPT-2)
    # Per block (n_head, mlp_hidden), overriding n_head and mlp_ratio (len == n_layer); None: every block alike.
    layers: tuple[tuple[int, int], ...] | None = None

    def block_sizes(self) -> list[tuple[int, int]]:
        """``(n_head, mlp_hidden)`` of each block."""
        if self.layers is None:
            return [(self.n_head, self.mlp_ratio * self.n_embd)] * self.n_layer
        if len(self.layers) != self.n_layer:
            raise ValueError(f"GPTConfig.layers has {len(self.layers)} entries, n_layer={self.n_layer}")
        return [(int(h), int(k)) for h, k in self.layers]


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t sees positions <= t.

    Example::
        >>> attn = CausalSelfAttention(n_embd=32, n_head=4)
        >>> attn(torch.zeros(2, 5, 32)).shape
        torch.Size([2, 5, 32])
    """

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0, bias: bool = True,
                 head_dim: int | None = None):
        super().__init__()
        if head_dim is None:
            if n_embd % n_head != 0:
                raise ConfigError("n_head", n_head, f"must divide n_embd={n_embd}")
            head_dim = n_embd // n_head
        self.n_head, self.n_embd, self.head_dim, self.dropout = n_head, n_embd, head_dim, dropout
        inner = n_head * head_dim  # E: n_embd unless a head_dim is given (a subnet with fewer heads)
        self.c_attn = nn.Linear(n_embd, 3 * inner, bias=bias)  # q, k, v of every head in one matmul
        self.c_proj = nn.Linear(inner, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        B, T, C = x_BTC.shape
        E = self.n_head * self.head_dim
        q, k, v = self.c_attn(x_BTC).split(E, dim=2)
        # [B, T, E] -> [B, H, T, D]
        q_BHTD, k_BHTD, v_BHTD = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        y_BHTD = F.scaled_dot_product_attention(q_BHTD, k_BHTD, v_BHTD, is_causal=True,
                                                dropout_p=self.dropout if self.training else 0.0)
        y_BTE = y_BHTD.transpose(1, 2).contiguous().view(B, T, E)
        return self.resid_dropout(self.c_proj(y_BTE))


class MLP(nn.Module):
    """Position-wise feed-forward: Linear(C -> hidden), GELU, Linear(hidden -> C).

    Example::
        >>> MLP(n_embd=32, hidden=128)(torch.zeros(2, 5, 32)).shape
        torch.Size([2, 5, 32])
    """

    def __init__(self, n_embd: int, hidden: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, hidden, bias=bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(hidden, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x_BTC))))


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``.

    Example::
        >>> Block(n_embd=32, n_head=2, mlp_hidden=64)(torch.zeros(2, 5, 32)).shape
        torch.Size([2, 5, 32])
    """

    def __init__(self, n_embd: int, n_head: int, mlp_hidden: int, dropout: float = 0.0, bias: bool = True,
                 head_dim: int | None = None):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias, head_dim)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, mlp_hidden, dropout, bias)

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        x_BTC = x_BTC + self.attn(self.ln_1(x_BTC))
        return x_BTC + self.mlp(self.ln_2(x_BTC))


class GPT(nn.Module):
    """Token ids ``[B, T]`` -> next-token logits ``[B, T, vocab_size]``.

    Initialised as GPT-2 (nanoGPT): normal(0, 0.02) weights, zero biases, and each
    residual branch's output projection scaled by 1/sqrt(2·n_layer) so the
    residual stream's variance does not grow with depth.

    Example::
        >>> model = GPT(GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=1, n_embd=8))
        >>> model.num_params() == sum(p.numel() for p in model.parameters())
        True
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        c = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(c.vocab_size, c.n_embd),
            wpe=nn.Embedding(c.block_size, c.n_embd),
            drop=nn.Dropout(c.dropout),
            h=nn.ModuleList([Block(c.n_embd, n_head, mlp_hidden, c.dropout, c.bias, c.head_dim)
                             for n_head, mlp_hidden in c.block_sizes()]),
            ln_f=nn.LayerNorm(c.n_embd, bias=c.bias),
        ))
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        if c.tie_weights:
            self.lm_head.weight = self.transformer.wte.weight  # one Parameter: parameters() lists it once
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * c.n_layer))

    @property
    def block_size(self) -> int:
        """The longest context this model takes (the data cuts its sequences to this length)."""
        return self.config.block_size

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            torch.nn.init.zeros_(module.bias)

    def fsdp_units(self) -> list[nn.Module]:
        """The blocks: what FSDP2 shards as its own units (the root keeps the embeddings, ``ln_f`` and the head,
        tied to the token embedding: a tied parameter must stay in one unit)."""
        return list(self.transformer.h)

    def num_params(self) -> int:
        """Parameters, each tied tensor counted once."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx_BT: torch.Tensor) -> torch.Tensor:
        B, T = idx_BT.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens, longer than block_size={self.config.block_size}")
        pos_T = torch.arange(T, dtype=torch.long, device=idx_BT.device)
        x_BTC = self.transformer.drop(self.transformer.wte(idx_BT) + self.transformer.wpe(pos_T))
        for block in self.transformer.h:
            x_BTC = block(x_BTC)
        return self.lm_head(self.transformer.ln_f(x_BTC))


_KEYS = ("block_size", "n_layer", "n_head", "n_embd", "mlp_ratio", "dropout", "bias", "tie_weights")


def _positive_int(key: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(key, value, "expected a positive integer")
    return value


def _flag(key: str, value) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, value, "expected true or false")
    return value


def gpt_config(cfg: Mapping, vocab_size: int) -> GPTConfig:
    """The checked :class:`GPTConfig` of a ``model`` config group; ConfigError naming the key otherwise.

    Example::
        >>> gpt_config({"name": "gpt", "n_layer": 2}, vocab_size=65).n_layer
        2
    """
    known_keys("gpt", cfg, _KEYS)
    defaults = GPTConfig(vocab_size=vocab_size)
    get = lambda key: cfg.get(key, getattr(defaults, key))  # noqa: E731
    config = GPTConfig(
        vocab_size=_positive_int("vocab_size", vocab_size),
        **{key: _positive_int(f"model.{key}", get(key)) for key in ("block_size", "n_layer", "n_head", "n_embd",
                                                                     "mlp_ratio")},
        dropout=probability("model.dropout", get("dropout")),
        bias=_flag("model.bias", get("bias")),
        tie_weights=_flag("model.tie_weights", get("tie_weights")),
    )
    if config.n_embd % config.n_head:
        raise ConfigError("model.n_head", config.n_head, f"must divide model.n_embd={config.n_embd}")
    approx = 12 * config.n_layer * config.n_embd ** 2 + (config.vocab_size + config.block_size) * config.n_embd
    if approx > MAX_PARAMS:
        raise ConfigError("model.n_embd", config.n_embd, f"with model.n_layer={config.n_layer} gives ~{approx:.3g} "
                                                         f"parameters, more than {MAX_PARAMS:.0e}")
    return config


@register_model("gpt", data=TEXT)
def build_gpt(cfg: Mapping, vocab_size: int) -> GPT:
    return GPT(gpt_config(cfg, vocab_size))


__all__ = ["GPT", "GPTConfig", "Block", "CausalSelfAttention", "MLP", "build_gpt", "gpt_config"]
