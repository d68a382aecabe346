"""How a pseudo-gradient crosses the slow link: a flat float32 vector -> bytes -> the mean of several.

Legend: D elements, N rows (one per node) averaged, P payload bytes, NB blocks.

A :class:`Quantizer` encodes one vector into a fixed-size uint8 payload and decodes N
payloads (every node's encoding of its own vector) into their mean. The exchange
(:mod:`dist_supernet.sync.exchange`) moves the payloads; it knows nothing of what is in them.

- ``fp32``: the vector's bytes; the exact mean (the reference DiLoCo exchange).
- ``int4``: a float32 scale (the absolute maximum) per block of 256, each element stochastically
  rounded to one of 15 levels in [-scale, scale] (unbiased: E[round] = value): 4.125 bits per
  element. A baseline: no compiled kernel (torch).
- ``onebit``: DRIVE's one-bit estimator on a two-round randomized Hadamard rotation
  (``kernels.onebit_encode`` / ``onebit_decode``): one bit per coordinate and a float32 scale per
  block of 1024, 1.03 bits per element; every node uses the same rotation (the shared seed),
  so the rows are averaged in the rotated domain and rotated back once (docs/diloco.md).

``shared_seed``: whether the decoder needs the encoder's seed (the rotation) — then every
node encodes with the round's seed; otherwise each node mixes its own rank into it, so
stochastic rounding errors are independent across nodes.
"""

from typing import ClassVar

import torch

from dist_supernet import kernels
from dist_supernet.kernels.reference import as_float32, num_blocks


class Quantizer:
    """Base: encode a float32 vector to a fixed-size payload; decode N payloads to their mean."""

    name: ClassVar[str] = "base"
    shared_seed: ClassVar[bool] = False
    granule: int = 8  # a reduce-scatter cuts the vector at multiples of this (whole blocks)

    def payload_bytes(self, numel: int) -> int:
        raise NotImplementedError

    def encode(self, x_D: torch.Tensor, seed: int) -> torch.Tensor:
        raise NotImplementedError

    def decode_mean(self, rows_NP: torch.Tensor, numel: int, seed: int) -> torch.Tensor:
        raise NotImplementedError

    def bits_per_element(self, numel: int) -> float:
        """Payload bits per element of a vector of ``numel`` (padding and scales included)."""
        return 8 * self.payload_bytes(numel) / max(1, numel)


def _mean_rows(values_ND: torch.Tensor) -> torch.Tensor:
    """The rows' mean, summed in row order then times fl(1 / N): the same bits on every rank."""
    acc = values_ND[0].clone()
    for i in range(1, values_ND.shape[0]):
        acc += values_ND[i]
    return acc.mul_(as_float32(1.0 / values_ND.shape[0]))


def _split(rows_NP: torch.Tensor, scale_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 [N, scale_bytes / 4] scales, uint8 [N, rest]) of payload rows that start with their scales."""
    rows = rows_NP.shape[0]
    scales = rows_NP[:, :scale_bytes].reshape(-1).view(torch.float32).view(rows, -1)  # reshape: a dense copy
    return scales, rows_NP[:, scale_bytes:].contiguous()


class FP32(Quantizer):
    """The vector itself: 32 bits per element, the exact mean.

    Example::
        >>> q = FP32()
        >>> rows = torch.stack([q.encode(torch.tensor([1.0, 2.0]), 0), q.encode(torch.tensor([3.0, 0.0]), 0)])
        >>> q.decode_mean(rows, 2, 0).tolist()
        [2.0, 1.0]
    """

    name = "fp32"

    def payload_bytes(self, numel):
        return 4 * int(numel)

    def encode(self, x_D, seed):
        return x_D.detach().reshape(-1).to(torch.float32).clone().view(torch.uint8)

    def decode_mean(self, rows_NP, numel, seed):
        return _mean_rows(rows_NP.contiguous().view(torch.float32)[:, :numel])


class Int4(Quantizer):
    """4-bit stochastic rounding with a float32 absmax scale per block: unbiased, 4 + 32 / block bits per element.

    Level k in [-7, 7] stands for k * scale / 7; t = 7 x / scale is rounded to floor(t + u) with u
    the counter-based uniform of (seed, element index), so E[level] = t. Stored as k + 8 in a
    nibble, element 2i in the low nibble of byte i.

    Example::
        >>> q = Int4(block=8)
        >>> x = torch.tensor([0.7, -0.7, 0.0, 0.35])
        >>> q.decode_mean(q.encode(x, 1).view(1, -1), 4, 1)[:3].tolist()   # the extremes are exact
        [0.699999988079071, -0.699999988079071, 0.0]
    """

    name = "int4"
    LEVELS = 7  # why: 15 levels, symmetric, fit a nibble with one code spare

    def __init__(self, block: int = 256):
        # why 256: the scale costs 32 / 256 = 0.125 bits per element; smaller blocks track the range better
        if block < 2 or block % 2:
            raise ValueError(f"block={block}: expected an even number >= 2")
        self.block = self.granule = int(block)

    def payload_bytes(self, numel):
        return 4 * num_blocks(numel, self.block) + (num_blocks(numel, self.block) * self.block) // 2

    def encode(self, x_D, seed):
        numel = x_D.numel()
        nblocks = num_blocks(numel, self.block)
        x = torch.zeros(nblocks * self.block, dtype=torch.float32, device=x_D.device)
        x[:numel] = x_D.reshape(-1)
        x = x.view(nblocks, self.block)
        scales = x.abs().amax(dim=1)
        t = x * (self.LEVELS / torch.where(scales > 0, scales, 1.0)).unsqueeze(1)
        u = kernels.uniform(torch.arange(nblocks * self.block, dtype=torch.int64, device=x.device), seed)
        levels = torch.floor(t + u.view_as(t)).clamp_(-self.LEVELS, self.LEVELS).to(torch.uint8) + self.LEVELS + 1
        nibbles = levels.view(-1, 2)
        packed = nibbles[:, 0] | (nibbles[:, 1] << 4)
        return torch.cat([scales.contiguous().view(torch.uint8), packed])

    def decode_mean(self, rows_NP, numel, seed):
        nblocks = num_blocks(numel, self.block)
        scales, packed = _split(rows_NP, 4 * nblocks)
        levels = torch.stack([packed & 15, packed >> 4], dim=2).view(rows_NP.shape[0], nblocks, self.block)
        values = (levels.to(torch.float32) - (self.LEVELS + 1)) * (scales / self.LEVELS).unsqueeze(2)
        return _mean_rows(values.view(rows_NP.shape[0], -1))[:numel]


class OneBit(Quantizer):
    """One bit per coordinate of a randomized Hadamard rotation plus a scale per block (DRIVE's, unbiased).

    Example::
        >>> q = OneBit(block=8)
        >>> payload = q.encode(torch.tensor([1.0, -2.0, 0.5]), seed=3)
        >>> payload.numel(), q.decode_mean(payload.view(1, -1), 3, seed=3).shape
        (5, torch.Size([3]))
    """

    name = "onebit"
    shared_seed = True

    def __init__(self, block: int = 1024):
        # why 1024: 32 / 1024 = 0.03 bits of scale per element, and the two-round rotation is
        # measurably unbiased from 256 on (tests/kernels/test_hadamard.py); 8 is biased
        self.block = self.granule = int(block)
        kernels.reference.check_block(self.block)

    def payload_bytes(self, numel):
        nblocks = num_blocks(numel, self.block)
        return 4 * nblocks + nblocks * self.block // 8

    def encode(self, x_D, seed):
        bits, scales = kernels.onebit_encode(x_D.detach().reshape(-1).to(torch.float32), seed, self.block)
        return torch.cat([scales.view(torch.uint8), bits])

    def decode_mean(self, rows_NP, numel, seed):
        scales, bits = _split(rows_NP, 4 * num_blocks(numel, self.block))
        return kernels.onebit_decode(bits, scales, numel, seed, self.block)


QUANTIZERS: dict[str, type[Quantizer]] = {cls.name: cls for cls in (FP32, Int4, OneBit)}


def build_quantizer(name: str) -> Quantizer:
    """The quantizer ``sync.quantizer=<name>`` selects (``birder`` is an outer optimizer, not one of these)."""
    if name not in QUANTIZERS:
        raise ValueError(f"quantizer={name!r}: expected one of {', '.join(QUANTIZERS)}")
    return QUANTIZERS[name]()
