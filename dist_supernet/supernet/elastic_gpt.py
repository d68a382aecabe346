"""An elastic GPT language model: one set of weights, a family of decoder-only GPTs (MatFormer-style).

The supernet mirrors ``dist_supernet/models/gpt.py`` (nanoGPT: token and learned
position embeddings, pre-LayerNorm blocks of causal self-attention and a GELU
MLP, a final LayerNorm, a head tied to the token embedding) with every layer
sliced from one shared weight. Elastic dimensions:

- ``mlp``: each block's feed-forward width, nested as MatFormer's: the first
  ``round(mlp_ratio * max n_embd)`` hidden units (rows of ``c_fc``, columns of
  ``c_proj``), from ``mlp_ratios``;
- ``heads``: each block's number of heads, the first ``n_head`` of them, each
  ``head_dim`` wide (``max n_embd / max n_heads``, fixed): ``c_attn``'s rows of
  those heads' q, k and v and ``c_proj``'s matching columns, from ``n_heads``;
- ``depth``: the number of blocks, from ``n_layers``; the last blocks are skipped;
- ``embed``: the width of the residual stream, from ``n_embds`` (a single
  choice by default): the leading columns of both embeddings (and so of the tied
  head) and of every weight that reads the stream, the leading rows of every
  weight that writes it; LayerNorms normalise over the active width.

Per-layer choices (heads and MLP width of each block) are genes of their own, so
the sampler trains and the search finds "Mix'n'Match" subnets, not only the
uniform ones. Arch dict (per-block lists cut to the depth)::

    {"n_embd": 128, "n_layer": 3, "n_head": [4, 2, 4], "mlp_ratio": [4, 1, 2]}

``c_attn``'s rows are kept head by head, ``[head][q | k | v][head_dim]``, so that
the first ``n_head`` heads are one leading slice of rows (one matmul, one mask
slice); :func:`export_state` reorders them to the plain module's ``[q | k | v]``.

Counting, per token at ``block_size`` tokens of context: FLOPs are
multiply-accumulates of every linear layer (the head included) and of the two
attention matmuls over the whole context (q·k and attention·v, ``T`` keys each,
without discounting the causal mask, as nanoGPT's and PaLM's FLOPs estimates);
embeddings lookups, LayerNorms, softmax, GELU and additions are not counted.
``params`` is exact for the exported ``GPT`` (the tied head counted once).

Shapes: B batch, T tokens, C active embedding width, h active heads, d head dim, E = h·d, V vocab.

Example::
    >>> net = ElasticGPT(vocab_size=50, block_size=16, n_layers=[1, 2], n_heads=[1, 2], n_embds=[32],
    ...                  mlp_ratios=[1, 4])
    >>> net.set_active({"n_embd": 32, "n_layer": 2, "n_head": [2, 1], "mlp_ratio": [1, 4]})
    >>> net(torch.zeros(3, 16, dtype=torch.long)).shape
    torch.Size([3, 16, 50])
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dist_supernet.errors import ConfigError
from dist_supernet.models import TEXT
from dist_supernet.models.gpt import GPT, GPTConfig
from dist_supernet.supernet.elastic import (
    ElasticComposite,
    ElasticEmbedding,
    ElasticLayerNorm,
    ElasticLinear,
    Index,
    Layer,
    chained,
    check_choices,
    per_layer,
)
from dist_supernet.supernet.space import Gene, Supernet


def mlp_hidden(mlp_ratio: float, max_embed_dim: int) -> int:
    """Hidden width of a block's MLP: ``round(mlp_ratio * max_embed_dim)``, at least 1 (nested: a prefix of the max)."""
    return max(1, int(round(mlp_ratio * max_embed_dim)))


class ElasticCausalSelfAttention(nn.Module, ElasticComposite):
    """Causal self-attention over the first ``n_head`` heads (``head_dim`` each); width follows the input.

    Mirrors ``models.gpt.CausalSelfAttention`` (``c_attn``, ``c_proj``, SDPA), with ``c_attn``'s rows
    ordered head by head so the active heads are its leading rows.

    Example::
        >>> attn = ElasticCausalSelfAttention(64, max_heads=4, head_dim=16)
        >>> attn.set_active(n_head=2)
        >>> attn(torch.zeros(2, 5, 48)).shape
        torch.Size([2, 5, 48])
    """

    def __init__(self, max_embed_dim: int, max_heads: int, head_dim: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        self.max_heads, self.head_dim, self.dropout = max_heads, head_dim, dropout
        self.c_attn = ElasticLinear(max_embed_dim, 3 * max_heads * head_dim, bias=bias)  # [head][q|k|v][d] rows
        self.c_proj = ElasticLinear(max_heads * head_dim, max_embed_dim, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)
        self.active_heads = max_heads

    def set_active(self, n_head: int | None = None) -> None:
        n_head = self.max_heads if n_head is None else n_head
        if not 1 <= n_head <= self.max_heads:
            raise ValueError(f"n_head={n_head!r}: expected 1..{self.max_heads}")
        self.active_heads = n_head
        self.c_attn.set_active(out_features=3 * n_head * self.head_dim)

    def _follow_input(self, in_features: int) -> None:
        self.c_proj.set_active(out_features=in_features)

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        B, T, C = x_BTC.shape
        h, d = self.active_heads, self.head_dim
        self._follow_input(C)
        qkv_BThkd = self.c_attn(x_BTC).view(B, T, h, 3, d)
        q_BhTd, k_BhTd, v_BhTd = (qkv_BThkd[:, :, :, i].transpose(1, 2) for i in range(3))
        y_BhTd = F.scaled_dot_product_attention(q_BhTd, k_BhTd, v_BhTd, is_causal=True,
                                                dropout_p=self.dropout if self.training else 0.0)
        y_BTE = y_BhTd.transpose(1, 2).contiguous().view(B, T, h * d)
        return self.resid_dropout(self.c_proj(y_BTE))

    def layers(self, in_features: int) -> Iterable[Layer]:
        self._follow_input(in_features)
        return [("c_attn", self.c_attn, in_features), ("c_proj", self.c_proj, self.active_heads * self.head_dim)]

    def export_state(self, in_features: int) -> dict[str, torch.Tensor]:
        state = super().export_state(in_features)
        h, d = self.active_heads, self.head_dim
        for name in ("c_attn.weight", "c_attn.bias"):
            if name in state:  # [h, 3, d, ...] -> [3, h, d, ...]: the plain module's q | k | v
                rows = state[name]
                state[name] = rows.view(h, 3, d, *rows.shape[1:]).transpose(0, 1).reshape(rows.shape).clone()
        return state

    def out_features(self, in_features: int) -> int:
        return in_features


class ElasticGPTMLP(nn.Module, ElasticComposite):
    """``c_fc`` -> GELU -> ``c_proj`` over the first ``hidden`` units (MatFormer's nested FFN); width follows the input.

    Example::
        >>> mlp = ElasticGPTMLP(64, max_hidden=256)
        >>> mlp.set_active(hidden=64)
        >>> mlp(torch.zeros(2, 5, 48)).shape
        torch.Size([2, 5, 48])
    """

    def __init__(self, max_embed_dim: int, max_hidden: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        self.max_hidden = max_hidden
        self.c_fc = ElasticLinear(max_embed_dim, max_hidden, bias=bias)
        self.gelu = nn.GELU()
        self.c_proj = ElasticLinear(max_hidden, max_embed_dim, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def set_active(self, hidden: int | None = None) -> None:
        self.c_fc.set_active(out_features=self.max_hidden if hidden is None else hidden)

    def _follow_input(self, in_features: int) -> None:
        self.c_proj.set_active(out_features=in_features)

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        self._follow_input(x_BTC.shape[-1])
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x_BTC))))

    def layers(self, in_features: int) -> Iterable[Layer]:
        self._follow_input(in_features)
        return chained([("c_fc", self.c_fc), ("c_proj", self.c_proj)], in_features)

    def out_features(self, in_features: int) -> int:
        return in_features


class ElasticGPTBlock(nn.Module, ElasticComposite):
    """Pre-LN block ``x + attn(ln_1(x))``, ``x + mlp(ln_2(x))`` with elastic heads and MLP width; mirrors ``gpt.Block``.

    Example::
        >>> block = ElasticGPTBlock(64, max_heads=4, head_dim=16, max_hidden=256)
        >>> block.set_active(n_head=1, hidden=32)
        >>> block(torch.zeros(2, 5, 48)).shape
        torch.Size([2, 5, 48])
    """

    def __init__(self, max_embed_dim: int, max_heads: int, head_dim: int, max_hidden: int, dropout: float = 0.0,
                 bias: bool = True):
        super().__init__()
        self.ln_1 = ElasticLayerNorm(max_embed_dim, bias=bias)
        self.attn = ElasticCausalSelfAttention(max_embed_dim, max_heads, head_dim, dropout, bias)
        self.ln_2 = ElasticLayerNorm(max_embed_dim, bias=bias)
        self.mlp = ElasticGPTMLP(max_embed_dim, max_hidden, dropout, bias)

    def set_active(self, n_head: int | None = None, hidden: int | None = None) -> None:
        self.attn.set_active(n_head=n_head)
        self.mlp.set_active(hidden=hidden)

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        x_BTC = x_BTC + self.attn(self.ln_1(x_BTC))
        return x_BTC + self.mlp(self.ln_2(x_BTC))

    def layers(self, in_features: int) -> Iterable[Layer]:
        # The residual stream: every part reads (and the block writes) the input's width.
        return [(name, getattr(self, name), in_features) for name in ("ln_1", "attn", "ln_2", "mlp")]

    def out_features(self, in_features: int) -> int:
        return in_features


class ElasticGPT(Supernet):
    """Elastic GPT supernet over token ids; ``set_active(arch)`` then ``forward(idx_BT)`` runs that subnet.

    Initialised as GPT-2 (``models.gpt.GPT``): normal(0, 0.02) weights, zero biases, residual output
    projections scaled by 1/sqrt(2 · max depth). ``fsdp_units()``: the blocks (the root keeps the
    embeddings, the final LayerNorm and the tied head: tied parameters must share one FSDP unit).

    Example::
        >>> net = ElasticGPT(vocab_size=40, block_size=8, n_layers=[1, 2], n_heads=[1, 2], n_embds=[16, 32])
        >>> net.set_active(net.min_arch())
        >>> net(torch.zeros(2, 8, dtype=torch.long)).shape
        torch.Size([2, 8, 40])
    """

    family = "elastic_gpt"
    data_kind = TEXT
    elastic_dims = ("embed", "depth", "heads", "mlp")
    flops_note = ("multiply-accumulates per token at block_size tokens of context (linear layers, the head, and "
                  "attention's q·k and attention·v over the whole context)")

    def __init__(
        self,
        vocab_size: int,
        *,
        block_size: int = 128,
        n_layers: Sequence[int] = (2, 3, 4),
        n_heads: Sequence[int] = (1, 2, 4),
        n_embds: Sequence[int] = (128,),
        mlp_ratios: Sequence[float] = (1, 2, 4),
        dropout: float = 0.0,
        bias: bool = True,
        tie_weights: bool = True,
        zero_init_residual: bool = False,
    ):
        super().__init__()
        for key, value in (("vocab_size", vocab_size), ("block_size", block_size)):
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ConfigError(key, value, "expected a positive integer")
        self.n_layers = check_choices("n_layers", n_layers)
        self.n_heads = check_choices("n_heads", n_heads)
        self.n_embds = check_choices("n_embds", n_embds)
        self.mlp_ratios = check_choices("mlp_ratios", mlp_ratios)
        for key, values in (("n_layers", self.n_layers), ("n_heads", self.n_heads), ("n_embds", self.n_embds)):
            if any(isinstance(v, bool) or int(v) != v for v in values):
                raise ConfigError(key, values, "expected positive integers")
        if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout < 1:
            raise ConfigError("dropout", dropout, "expected a number in [0, 1)")
        for key, value in (("bias", bias), ("tie_weights", tie_weights), ("zero_init_residual", zero_init_residual)):
            if not isinstance(value, bool):
                raise ConfigError(key, value, "expected true or false")
        max_embd, max_heads = int(self.n_embds[-1]), int(self.n_heads[-1])
        if max_embd % max_heads:
            raise ConfigError("n_heads", self.n_heads, f"the largest must divide the largest of n_embds={max_embd} "
                                                       "(head_dim = largest n_embd / largest n_heads)")
        self.vocab_size, self.block_size = int(vocab_size), int(block_size)
        self.head_dim = max_embd // max_heads
        self.max_embd, self.max_depth = max_embd, int(self.n_layers[-1])
        self.dropout, self.bias, self.tie_weights = float(dropout), bias, tie_weights
        self.zero_init_residual = zero_init_residual
        max_hidden = mlp_hidden(self.mlp_ratios[-1], max_embd)

        self.transformer = nn.ModuleDict(dict(
            wte=ElasticEmbedding(self.vocab_size, max_embd),
            wpe=ElasticEmbedding(self.block_size, max_embd),
            drop=nn.Dropout(dropout),
            h=nn.ModuleList([ElasticGPTBlock(max_embd, max_heads, self.head_dim, max_hidden, dropout, bias)
                             for _ in range(self.max_depth)]),
            ln_f=ElasticLayerNorm(max_embd, bias=bias),
        ))
        self.lm_head = ElasticLinear(max_embd, self.vocab_size, bias=False)
        if tie_weights:
            self.lm_head.weight = self.transformer.wte.weight  # one Parameter: DDP, Birder and masks see it once
        self._init_weights()
        self._genes = self._build_genes()
        self.set_active(self.max_arch())

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (ElasticLinear, ElasticEmbedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, ElasticLinear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                if self.zero_init_residual:
                    # BigNAS: every block starts as the identity, so every depth computes what the shallowest
                    # subnet computes and the blocks that only deeper subnets run start out of the way.
                    nn.init.zeros_(p)
                else:
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.max_depth))

    def fsdp_units(self) -> list[nn.Module]:
        """The FSDP2 units besides the root: the blocks (see ``train/parallel.py``)."""
        return list(self.transformer.h)

    # ---- search space ---------------------------------------------------------------------------
    def _build_genes(self) -> list[Gene]:
        genes = [Gene("n_embd", "embed", tuple(self.n_embds)), Gene("n_layer", "depth", tuple(self.n_layers))]
        for j in range(self.max_depth):
            genes.append(Gene(f"n_head[{j}]", "heads", tuple(self.n_heads)))
            genes.append(Gene(f"mlp_ratio[{j}]", "mlp", tuple(self.mlp_ratios)))
        return genes

    def genes(self) -> list[Gene]:
        return self._genes

    def genes_to_arch(self, values: Sequence) -> dict:
        n_embd, depth, *per_block = values
        return {"n_embd": n_embd, "n_layer": depth, "n_head": list(per_block[0 : 2 * depth : 2]),
                "mlp_ratio": list(per_block[1 : 2 * depth : 2])}

    def arch_to_genes(self, arch: dict) -> list:
        for key in ("n_embd", "n_layer", "n_head", "mlp_ratio"):
            if key not in arch:
                raise ValueError(f"arch is missing key {key!r} (elastic_gpt needs n_embd, n_layer, n_head, mlp_ratio)")
        depth = arch["n_layer"]
        if depth not in self.n_layers:
            raise ValueError(f"arch n_layer={depth!r}: expected one of {self.n_layers}")
        for key in ("n_head", "mlp_ratio"):
            if not isinstance(arch[key], (list, tuple)) or len(arch[key]) != depth:
                raise ValueError(f"arch {key}={arch[key]!r}: expected a list of n_layer={depth} values")
        values = [arch["n_embd"], depth]
        for j in range(self.max_depth):
            values += [arch["n_head"][j], arch["mlp_ratio"][j]] if j < depth else [None, None]
        return values

    def num_subnets(self, elastic: Iterable[str] | None = None) -> int:
        dims = self.resolve_elastic(elastic)
        embeds = len(self.n_embds) if "embed" in dims else 1
        per_block = (len(self.n_heads) if "heads" in dims else 1) * (len(self.mlp_ratios) if "mlp" in dims else 1)
        depths = self.n_layers if "depth" in dims else [self.max_depth]
        return embeds * sum(per_block**d for d in depths)

    def subnet_config(self, arch: dict) -> dict:
        """Resolved sizes of ``arch``: everything :func:`gpt_subnet` needs to build the plain ``GPT``, JSON-able."""
        arch = self.validate_arch(arch)
        return {
            "family": self.family,
            "arch": arch,
            "vocab_size": self.vocab_size,
            "block_size": self.block_size,
            "n_embd": int(arch["n_embd"]),
            "head_dim": self.head_dim,
            "blocks": [{"n_head": int(h), "mlp_hidden": mlp_hidden(r, self.max_embd)}
                       for h, r in zip(arch["n_head"], arch["mlp_ratio"])],
            "dropout": self.dropout,
            "bias": self.bias,
            "tie_weights": self.tie_weights,
        }

    def flops(self, arch: dict, seq_len: int | None = None) -> int:
        """Multiply-accumulates per token with ``seq_len`` (default ``block_size``) tokens of context."""
        cfg = self.subnet_config(arch)
        T = self.block_size if seq_len is None else seq_len
        C = cfg["n_embd"]
        total = 0
        for b in cfg["blocks"]:
            E = b["n_head"] * self.head_dim
            total += 3 * C * E + 2 * T * E + E * C  # c_attn; q·k and attention·v over T keys; c_proj
            total += 2 * C * b["mlp_hidden"]  # c_fc, c_proj
        return total + C * self.vocab_size  # lm_head

    def params(self, arch: dict) -> int:
        """Parameters of the exported ``GPT`` (the tied head counted once), embeddings and LayerNorms included."""
        cfg = self.subnet_config(arch)
        C, bias = cfg["n_embd"], int(self.bias)
        norm = C * (1 + bias)
        total = (self.vocab_size + self.block_size) * C + norm  # wte, wpe, ln_f
        for b in cfg["blocks"]:
            E, hidden = b["n_head"] * self.head_dim, b["mlp_hidden"]
            total += 2 * norm + C * 3 * E + 3 * E * bias + E * C + C * bias  # ln_1, ln_2, c_attn, c_proj
            total += C * hidden + hidden * bias + hidden * C + C * bias  # c_fc, c_proj
        return total + (0 if self.tie_weights else self.vocab_size * C)

    # ---- weight sharing -------------------------------------------------------------------------
    def _apply_arch(self, arch: dict) -> None:
        self.transformer.wte.set_active(embed_dim=arch["n_embd"])
        self.transformer.wpe.set_active(embed_dim=arch["n_embd"])
        for j in range(arch["n_layer"]):
            self.transformer.h[j].set_active(n_head=arch["n_head"][j],
                                             hidden=mlp_hidden(arch["mlp_ratio"][j], self.max_embd))
        self.active_depth = arch["n_layer"]

    def _layers(self) -> list[Layer]:
        C = self.transformer.wte.active_embed_dim
        layers = [("transformer.wte", self.transformer.wte, C), ("transformer.wpe", self.transformer.wpe, C)]
        layers += [(f"transformer.h.{j}", self.transformer.h[j], C) for j in range(self.active_depth)]
        return layers + [("transformer.ln_f", self.transformer.ln_f, C), ("lm_head", self.lm_head, C)]

    def _used_slices(self) -> dict[str, Index]:
        used = per_layer(self._layers(), "used_slices")
        if self.tie_weights:  # the head reads wte's active columns, already marked under wte's (only) name
            del used["lm_head.weight"]
        return used

    def _export_state(self) -> dict[str, torch.Tensor]:
        return per_layer(self._layers(), "export_state")  # tied: lm_head.weight too, as GPT's state_dict has it

    def forward(self, idx_BT: torch.Tensor) -> torch.Tensor:
        B, T = idx_BT.shape
        if T > self.block_size:
            raise ValueError(f"sequence of {T} tokens, longer than block_size={self.block_size}")
        pos_T = torch.arange(T, dtype=torch.long, device=idx_BT.device)
        x_BTC = self.transformer.drop(self.transformer.wte(idx_BT) + self.transformer.wpe(pos_T))
        for j in range(self.active_depth):
            x_BTC = self.transformer.h[j](x_BTC)
        return self.lm_head(self.transformer.ln_f(x_BTC))


def gpt_subnet(config: dict) -> GPT:
    """The plain ``models.gpt.GPT`` of a subnet config (``ElasticGPT.subnet_config``), freshly initialised.

    Example::
        >>> net = ElasticGPT(vocab_size=30, block_size=8, n_layers=[1, 2], n_heads=[1, 2], n_embds=[16])
        >>> plain = gpt_subnet(net.subnet_config(net.min_arch()))
        >>> type(plain).__name__, plain.num_params() == net.params(net.min_arch())
        ('GPT', True)
    """
    blocks = config["blocks"]
    return GPT(GPTConfig(
        vocab_size=config["vocab_size"], block_size=config["block_size"], n_layer=len(blocks),
        n_head=blocks[0]["n_head"], n_embd=config["n_embd"], dropout=config["dropout"], bias=config["bias"],
        tie_weights=config["tie_weights"], head_dim=config["head_dim"],
        layers=tuple((b["n_head"], b["mlp_hidden"]) for b in blocks),
    ))


__all__ = ["ElasticCausalSelfAttention", "ElasticGPT", "ElasticGPTBlock", "ElasticGPTMLP", "gpt_subnet", "mlp_hidden"]
