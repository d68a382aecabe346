"""Fused Birder compress: update m and b, binary-randomise r = m / b, pack 8 bits per byte.

One pass over the bucket: reads g (fp32/bf16/fp16), m, b, index (and the mask),
writes m, b and the packed bits: 24 bytes per element plus 1/8 for the bits
(fp32 g), the minimum for this state layout. Contract: :func:`kernels.reference.compress`.

Legend: D elements, B = ceil(D / 8) bytes; each program owns BLOCK_BYTES
bytes of output, i.e. a [BLOCK_BYTES, 8] tile of elements (row = output byte,
column = bit position, LSB first).
"""

import torch
import triton
import triton.language as tl

from kernels.ops import _launch
from kernels.ops.uniform_hash import uniform_from_index


@triton.autotune(
    configs=_launch.byte_block_configs(),
    key=["size_class"],
    prune_configs_by={"early_config_prune": _launch.keep_default_when_interpreting},
    restore_value=["m_ptr", "b_ptr"],  # tuning runs the kernel several times: undo its in-place updates
)
@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _compress_kernel(
    g_ptr,  # [D] gradient, fp32 / bf16 / fp16, read
    m_ptr,  # [D] fp32 momentum, updated in place
    b_ptr,  # [D] fp32 EMA of |g|, updated in place
    index_ptr,  # [D] int32 canonical indices (the hash counter of each draw)
    mask_ptr,  # [D] uint8 view of the bool mask (1 = got a gradient); unused unless HAS_MASK
    out_ptr,  # [B] uint8 packed bits, written (padding bits 0)
    numel,  # D
    num_bytes,  # B
    beta,  # fp32 EMA factor
    one_minus_beta,  # fp32 (1 - beta), rounded once on the host as torch rounds its scalar
    seed_lo,  # int32 bits of seed & 0xFFFFFFFF
    seed_hi,  # int32 bits of seed >> 32
    size_class,  # autotune key only: ceil(log2(D))
    HAS_MASK: tl.constexpr,  # masked-out elements keep m, b and emit bit 0
    AMSGRAD: tl.constexpr,  # b = max(b_prev, b_new)
    BLOCK_BYTES: tl.constexpr,  # output bytes per program (8 elements each)
):
    byte = tl.program_id(0) * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    bit = tl.arange(0, 8)
    offsets = byte[:, None] * 8 + bit[None, :]
    in_range = offsets < numel

    g = tl.load(g_ptr + offsets, mask=in_range, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offsets, mask=in_range, other=0.0)
    b = tl.load(b_ptr + offsets, mask=in_range, other=0.0)
    g_abs = tl.abs(g)

    # Same rounding as the reference: its unmasked path is m.mul_(beta).add_(g, alpha=1-beta),
    # which torch evaluates as fma(g, 1-beta, m*beta) on CPU and CUDA; its masked and AMSGrad
    # paths are m*beta + g*(1-beta) with every product rounded.
    if HAS_MASK:
        m_new = m * beta + g * one_minus_beta
    else:
        m_new = tl.fma(g, one_minus_beta, m * beta)
    if HAS_MASK or AMSGRAD:
        b_new = b * beta + g_abs * one_minus_beta
    else:
        b_new = tl.fma(g_abs, one_minus_beta, b * beta)
    if AMSGRAD:
        b_new = tl.maximum(b, b_new)
    if HAS_MASK:
        keep = tl.load(mask_ptr + offsets, mask=in_range, other=0) != 0
        m_new = tl.where(keep, m_new, m)
        b_new = tl.where(keep, b_new, b)
    tl.store(m_ptr + offsets, m_new, mask=in_range)
    tl.store(b_ptr + offsets, b_new, mask=in_range)

    # r = 0 where b <= 0, written as the reference's masked_fill(b <= 0) so a NaN b gives a NaN
    # probability (bit 0) in both. div_rn: IEEE division, so |m| == b gives exactly +-1 on GPU
    # too (Triton's default fp32 '/' is approximate there).
    # The denominator is 1 where b <= 0 only to keep 0 / 0 out of the interpreter's warnings.
    b_safe = tl.where(b_new <= 0.0, 1.0, b_new)
    ratio = tl.where(b_new <= 0.0, 0.0, tl.div_rn(m_new, b_safe))
    probability = (ratio + 1.0) * 0.5
    index = tl.load(index_ptr + offsets, mask=in_range, other=0)
    bits = (uniform_from_index(index, seed_lo, seed_hi) < probability) & in_range
    if HAS_MASK:
        bits = bits & keep
    packed = tl.sum(bits.to(tl.int32) << bit[None, :], axis=1)
    tl.store(out_ptr + byte, packed.to(tl.uint8), mask=byte < num_bytes)


def compress(
    g: torch.Tensor,
    m: torch.Tensor,
    b: torch.Tensor,
    index: torch.Tensor,
    *,
    beta: float,
    seed: int,
    mask: torch.Tensor | None = None,
    amsgrad: bool = False,
) -> torch.Tensor:
    """Triton twin of :func:`kernels.reference.compress`: same bits, m and b within fp32 rounding.

    m and b (fp32, contiguous) are updated in place; returns uint8 [ceil(D / 8)].

    Example::
        >>> g = torch.tensor([1.0, -2.0, 0.0], device="cuda")
        >>> m, b = torch.zeros_like(g), torch.zeros_like(g)
        >>> index = torch.arange(3, dtype=torch.int32, device="cuda")
        >>> bits = compress(g, m, b, index, beta=0.9, seed=0)
        >>> kernels.reference.unpack_bits(bits, 3).tolist()[:2]   # |r| = 1: deterministic
        [1, 0]
    """
    numel = g.numel()
    _launch.check_numel(numel)
    for name, tensor in (("m", m), ("b", b)):
        _launch.check_inplace(name, tensor, numel)
        if tensor.dtype != torch.float32:
            raise ValueError(f"{name} dtype={tensor.dtype}: Birder state is float32")
    _launch.check_same_numel("index", index, numel)
    num_bytes = (numel + 7) // 8
    out = torch.empty(num_bytes, dtype=torch.uint8, device=g.device)
    if numel == 0:
        return out
    mask_u8 = _launch.mask_bytes(mask, numel)
    seed_lo, seed_hi = _launch.seed_halves(seed)
    g_flat = g.reshape(-1).contiguous()
    index_flat = index.reshape(-1).to(torch.int32).contiguous()
    grid = lambda meta: (triton.cdiv(num_bytes, meta["BLOCK_BYTES"]),)  # noqa: E731
    _compress_kernel[grid](
        g_flat,
        m,
        b,
        index_flat,
        g_flat if mask_u8 is None else mask_u8,
        out,
        numel,
        num_bytes,
        float(beta),
        1.0 - float(beta),
        seed_lo,
        seed_hi,
        _launch.size_class(numel),
        HAS_MASK=mask_u8 is not None,
        AMSGRAD=bool(amsgrad),
    )
    return out
