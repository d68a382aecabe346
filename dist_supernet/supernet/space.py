"""Supernet base class: a search space over JSON-able architecture dicts plus the shared, sliced weights.

An architecture ("arch") is a plain dict of ints, floats and lists, e.g. for
the CNN ``{"width_mult": [...], "depth": [...], "kernel_size": [[...]], ...}``.
Internally a space is a flat list of :class:`Gene` s (one per decision, e.g.
"kernel of block 2 of stage 1"), each tagged with the *elastic dimension* it
belongs to ("kernel", "depth", ...). Sampling, mutation and crossover work gene
by gene; progressive shrinking restricts them to some dimensions, the others
pinned at their largest choice.

Per-block genes exist for every block up to the maximum depth; in the arch dict
the per-block lists are cut to the active depth, so two different dicts are
two different subnets. Genes of skipped blocks come back as ``None`` from
``arch_to_genes`` and are drawn fresh when mutation or crossover needs them.

The weight-sharing side: ``set_active(arch)`` configures the elastic layers,
``active_masks(arch)`` says which elements of every parameter that arch reads,
``export_state(arch)`` / ``subnet_config(arch)`` feed ``export.py``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from dist_supernet.models import IMAGE
from dist_supernet.supernet.elastic import Index, chained, per_layer


@dataclass(frozen=True)
class Gene:
    """One architectural decision: ``choices`` ascend, so ``choices[0]`` gives the smallest subnet."""

    name: str  # where it lives in the arch dict, for error messages: "kernel_size[1][0]"
    dim: str  # elastic dimension it belongs to: "kernel", "depth", ...
    choices: tuple


def arch_key(arch: dict) -> str:
    """Canonical string of an arch (sorted JSON): a dict key, and the same bytes on every rank."""
    return json.dumps(arch, sort_keys=True)


class Supernet(nn.Module):
    """Base of the weight-sharing supernets (``OFACNN``, ``ElasticViT``, ``ElasticGPT``).

    Subclasses define ``family``, ``elastic_dims`` (and ``data_kind`` for a language
    model) and implement the hooks marked below; everything else (sampling, masks,
    restriction) lives here.
    """

    family: str = ""
    elastic_dims: tuple[str, ...] = ()
    # The data it trains on, which fixes its constructor's leading arguments (``dist_supernet.models``):
    # IMAGE -> (in_channels, image_size, num_classes), TEXT -> (vocab_size).
    data_kind: str = IMAGE
    flops_note: str = "multiply-accumulates per image (convs and linear layers)"  # what flops() counts, for reports

    # ---- to implement in a subclass -------------------------------------------------------------
    def genes(self) -> list[Gene]:
        raise NotImplementedError

    def genes_to_arch(self, values: Sequence) -> dict:
        """Arch dict from one value per gene (values of skipped blocks are ignored)."""
        raise NotImplementedError

    def arch_to_genes(self, arch: dict) -> list:
        """One value per gene, ``None`` for skipped blocks; ``ValueError`` naming the key if arch is malformed."""
        raise NotImplementedError

    def num_subnets(self, elastic: Iterable[str] | None = None) -> int:
        """Number of distinct subnets (distinct arch dicts) when only ``elastic`` dims vary."""
        raise NotImplementedError

    def flops(self, arch: dict, input_size: int | None = None) -> int:
        """Multiply-accumulates per sample (an image at ``input_size`` px; a token at ``input_size`` of context)."""
        raise NotImplementedError

    def params(self, arch: dict) -> int:
        raise NotImplementedError

    def subnet_config(self, arch: dict) -> dict:
        raise NotImplementedError

    def _apply_arch(self, arch: dict) -> None:
        """Push a validated arch into the elastic layers."""
        raise NotImplementedError

    def _active_layers(self) -> Iterator[tuple[str, nn.Module]]:
        """(name, elastic module) in forward order for the active arch; the first reads ``in_channels``."""
        raise NotImplementedError

    def _used_slices(self) -> dict[str, Index]:
        """``{param_name: Index}`` for the active arch (names as in ``named_parameters``)."""
        return per_layer(chained(self._active_layers(), self.in_channels), "used_slices")

    def _export_state(self) -> dict[str, torch.Tensor]:
        """State dict of the plain module (``families.build_subnet(subnet_config(arch))``) for the active arch."""
        return per_layer(chained(self._active_layers(), self.in_channels), "export_state")

    # ---- search space ---------------------------------------------------------------------------
    def resolve_elastic(self, elastic: Iterable[str] | None) -> frozenset[str]:
        """``None`` means every dimension; unknown names raise ``ValueError``."""
        if elastic is None:
            return frozenset(self.elastic_dims)
        dims = frozenset(elastic)
        unknown = sorted(dims - set(self.elastic_dims))
        if unknown:
            raise ValueError(f"elastic={sorted(dims)!r}: unknown dimension(s) {unknown} for {self.family}; "
                             f"expected a subset of {list(self.elastic_dims)}")
        return dims

    def validate_arch(self, arch: dict) -> dict:
        """Canonical copy of ``arch`` (values replaced by the matching choice objects); ``ValueError`` if invalid."""
        if not isinstance(arch, dict):
            raise ValueError(f"arch={arch!r}: expected a dict")
        values = self.arch_to_genes(arch)
        canonical = []
        for gene, value in zip(self.genes(), values):
            if value is None:
                canonical.append(gene.choices[-1])
                continue
            match = [c for c in gene.choices if c == value]
            if not match:
                raise ValueError(f"arch {gene.name}={value!r}: expected one of {list(gene.choices)}")
            canonical.append(match[0])
        result = self.genes_to_arch(canonical)
        extra = sorted(set(arch) - set(result))
        if extra:
            raise ValueError(f"arch keys {extra}: unknown for {self.family}; expected {sorted(result)}")
        return result

    def max_arch(self) -> dict:
        return self.genes_to_arch([g.choices[-1] for g in self.genes()])

    def min_arch(self, elastic: Iterable[str] | None = None) -> dict:
        """Smallest subnet when only ``elastic`` dims may shrink (the others stay at max)."""
        dims = self.resolve_elastic(elastic)
        return self.genes_to_arch([g.choices[0] if g.dim in dims else g.choices[-1] for g in self.genes()])

    def sample(self, rng: random.Random, elastic: Iterable[str] | None = None) -> dict:
        """Uniform over each gene of the ``elastic`` dims (not uniform over subnets: shallow ones are likelier).

        Example::
            >>> from dist_supernet.supernet import OFACNN
            >>> space = OFACNN(in_channels=1, image_size=8, num_classes=10)
            >>> arch = space.sample(random.Random(0), elastic=["kernel"])
            >>> arch["depth"] == space.max_arch()["depth"]
            True
        """
        dims = self.resolve_elastic(elastic)
        return self.genes_to_arch([rng.choice(g.choices) if g.dim in dims else g.choices[-1] for g in self.genes()])

    def _filled_genes(self, arch: dict, rng: random.Random) -> list:
        values = self.arch_to_genes(self.validate_arch(arch))
        # Every gene draws, so the number of draws does not depend on the arch.
        fresh = [rng.choice(g.choices) for g in self.genes()]
        return [f if v is None else v for v, f in zip(values, fresh)]

    def mutate(
        self, arch: dict, rng: random.Random, prob: float, elastic: Iterable[str] | None = None
    ) -> dict:
        """Redraw each gene of the ``elastic`` dims with probability ``prob``."""
        dims = self.resolve_elastic(elastic)
        values = self._filled_genes(arch, rng)
        out = []
        for gene, value in zip(self.genes(), values):
            redraw = rng.random() < prob
            new = rng.choice(gene.choices)
            out.append(new if redraw and gene.dim in dims else value)
        return self.genes_to_arch(out)

    def crossover(
        self, arch_a: dict, arch_b: dict, rng: random.Random, elastic: Iterable[str] | None = None
    ) -> dict:
        """Each gene from one of the two parents, with equal probability."""
        dims = self.resolve_elastic(elastic)
        values_a = self._filled_genes(arch_a, rng)
        values_b = self._filled_genes(arch_b, rng)
        out = []
        for gene, a, b in zip(self.genes(), values_a, values_b):
            pick_b = rng.random() < 0.5
            out.append(b if pick_b and gene.dim in dims else a)
        return self.genes_to_arch(out)

    # ---- weight sharing -------------------------------------------------------------------------
    def set_active(self, arch: dict) -> None:
        """Make ``forward`` run the subnet ``arch``.

        Example::
            >>> from dist_supernet.supernet import OFACNN
            >>> net = OFACNN(in_channels=1, image_size=8, num_classes=10)
            >>> net.set_active(net.min_arch())
            >>> net(torch.zeros(2, 1, 8, 8)).shape
            torch.Size([2, 10])
        """
        arch = self.validate_arch(arch)
        self._apply_arch(arch)
        self.active_arch = arch

    @contextmanager
    def using(self, arch: dict):
        """Run a block with ``arch`` active, then restore the previous arch."""
        previous = self.active_arch
        self.set_active(arch)
        try:
            yield self
        finally:
            self.set_active(previous)

    def active_masks(self, arch: dict) -> dict[nn.Parameter, torch.Tensor]:
        """For every parameter, a bool mask of the elements ``arch`` reads (True = used).

        Feeds the optimizer's no-gradient rule: elements outside the union of
        the masks of a step's subnets must not move. Derived from the arch
        alone, so it is identical on every rank.

        Example::
            >>> from dist_supernet.supernet import OFACNN
            >>> net = OFACNN(in_channels=1, image_size=8, num_classes=10)
            >>> masks = net.active_masks(net.min_arch())
            >>> bool(masks[net.classifier.weight].all())  # head width shrinks at min
            False
        """
        with self.using(arch):
            used = self._used_slices()
        params = dict(self.named_parameters())
        # Full shapes, plain tensors (an FSDP2-sharded parameter is a DTensor: its mask is still whole).
        masks = {p: torch.zeros(p.shape, dtype=torch.bool, device=p.device) for p in params.values()}
        for name, index in used.items():
            masks[params[name]][index] = True
        return masks

    def export_state(self, arch: dict) -> dict[str, torch.Tensor]:
        """Copied weights (and BN buffers) of ``arch``, keyed like the plain module of ``subnet_config(arch)``."""
        with self.using(arch):
            return self._export_state()


def union_masks(masks: Iterable[dict[nn.Parameter, torch.Tensor]]) -> dict[nn.Parameter, torch.Tensor]:
    """Element-wise OR of several ``active_masks`` results (the subnets of one step).

    Example::
        >>> from dist_supernet.supernet import OFACNN
        >>> net = OFACNN(in_channels=1, image_size=28, num_classes=10)
        >>> both = union_masks([net.active_masks(net.min_arch()), net.active_masks(net.max_arch())])
        >>> all(bool(m.all()) for m in both.values())
        True
    """
    result: dict[nn.Parameter, torch.Tensor] = {}
    for mask_dict in masks:
        for param, mask in mask_dict.items():
            if param in result:
                result[param] = result[param] | mask
            else:
                result[param] = mask.clone()
    return result


def step_masks(supernet: Supernet, archs: Iterable[dict]) -> dict[nn.Parameter, torch.Tensor]:
    """Union of the masks of all archs of one training step (e.g. the sandwich)."""
    return union_masks(supernet.active_masks(arch) for arch in archs)
