"""Fused Birder compress: update m and b at canonical offsets, binary-randomise r = m / b, pack 8 bits per byte.

One pass over the chunk: reads g (fp32/bf16/fp16), m and b (and the mask) at canon(j), writes
m, b and the packed bits: 20 bytes per fp32 element plus 1/8 for the bits; the index map is
P + 1 + P int64, looked up per element (binary search, see dist_supernet.kernels.ops._segments). Contract:
:func:`dist_supernet.kernels.reference.compress`, bit for bit (launched with enable_fp_fusion=False).

Legend: D elements of the chunk, B = ceil(D / 8) bytes, P segments, T canonical elements;
each program owns BLOCK_BYTES bytes of output, i.e. a [BLOCK_BYTES, 8] tile of elements
(row = output byte, column = bit position, LSB first).
"""

import torch
import triton
import triton.language as tl

from dist_supernet.kernels import reference
from dist_supernet.kernels.ops import _launch
from dist_supernet.kernels.ops._segments import canonical_index
from dist_supernet.kernels.ops.uniform_hash import uniform_from_index


# Tuned on dummy m, b of a bucket's size only (kernels.ops._launch): never on the real state.
# P varies between the warm-up's dummies and the real chunks: not specialized, so no recompile.
@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "state_offset", "num_segments", "num_steps", "ratio_scale"])
def _compress_kernel(
    g_ptr,  # [D] gradient, fp32 / bf16 / fp16, read
    m_ptr,  # [T] fp32 momentum, updated in place at canon(j) - state_offset
    b_ptr,  # [T] fp32 EMA of |g|, updated in place at canon(j) - state_offset
    seg_starts_ptr,  # [P + 1] int64 chunk-local segment starts
    seg_canon_ptr,  # [P] int64 canonical index of each segment's first element
    mask_ptr,  # [T] uint8 view of the bool mask (1 = got a gradient); unused unless HAS_MASK
    used_ptr,  # [P] uint8 (0 = segment unused this step); unused unless HAS_USED
    flag_ptr,  # [1] uint8, set to 1 when an active g is not finite; unused unless HAS_FLAG
    out_ptr,  # [B] uint8 packed bits, written (padding bits 0)
    numel,  # D
    num_bytes,  # B
    num_segments,  # P (>= 1)
    num_steps,  # ceil(log2(P)): binary-search steps
    state_offset,  # canonical index of m_ptr[0]
    beta,  # fp32 EMA factor
    one_minus_beta,  # fp32 (1 - beta) g_scale, rounded once on the host, as the reference does
    seed_lo,  # int32 bits of seed & 0xFFFFFFFF
    seed_hi,  # int32 bits of seed >> 32
    beta2,  # fp32 EMA factor of b (beta for the paper's rule)
    one_minus_beta2,  # fp32 (1 - beta2), rounded once on the host
    ratio_scale,  # fp32 factor of m in r (1.0: r = m / b exactly)
    HAS_MASK: tl.constexpr,
    HAS_USED: tl.constexpr,
    HAS_FLAG: tl.constexpr,
    AMSGRAD: tl.constexpr,  # b = max(b_prev, b_new)
    RMS: tl.constexpr,  # b is the EMA of g * g and r = m / sqrt(b)
    BLOCK_BYTES: tl.constexpr,  # output bytes per program (8 elements each)
):
    byte = tl.program_id(0).to(tl.int64) * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    bit = tl.arange(0, 8)
    offsets = byte[:, None] * 8 + bit[None, :]
    in_range = offsets < numel
    canon, seg = canonical_index(seg_starts_ptr, seg_canon_ptr, offsets, num_segments, num_steps)
    state = canon - state_offset

    active = in_range
    if HAS_MASK:
        active = active & (tl.load(mask_ptr + state, mask=in_range, other=0) != 0)
    if HAS_USED:
        active = active & (tl.load(used_ptr + seg, mask=in_range, other=0) != 0)
    g = tl.load(g_ptr + offsets, mask=in_range, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + state, mask=in_range, other=0.0)
    b = tl.load(b_ptr + state, mask=in_range, other=0.0)
    g_abs = tl.abs(g)
    finite = g_abs < float("inf")  # False for inf and NaN
    update = active & finite

    # The contract's rounding: each product rounded, then the sum (no fma: enable_fp_fusion=False).
    m_new = m * beta + g * one_minus_beta
    if RMS:
        b_new = b * beta2 + (g * g) * one_minus_beta2
    else:
        b_new = b * beta2 + g_abs * one_minus_beta2
    if AMSGRAD:
        b_new = tl.maximum(b, b_new)
    m_new = tl.where(update, m_new, m)
    b_new = tl.where(update, b_new, b)
    tl.store(m_ptr + state, m_new, mask=update)
    tl.store(b_ptr + state, b_new, mask=update)
    if HAS_FLAG:
        bad = tl.max((active & ~finite).to(tl.int32))
        tl.store(flag_ptr, tl.full((), 1, tl.uint8), mask=bad > 0)

    # r = 0 where b <= 0 (a NaN b gives a NaN probability, so bit 0, as in the reference).
    # div_rn: IEEE division, so |m| == b gives exactly +-1 on GPU too (Triton's default fp32
    # '/' is approximate there). The denominator is 1 where b <= 0 only to keep 0 / 0 out of
    # the interpreter's warnings.
    # sqrt_rn likewise (Triton's default sqrt is approximate on GPU).
    b_safe = tl.where(b_new <= 0.0, 1.0, b_new)
    if RMS:
        b_safe = tl.sqrt_rn(b_safe)
    ratio = tl.where(b_new <= 0.0, 0.0, tl.div_rn(m_new * ratio_scale, b_safe))
    probability = (ratio + 1.0) * 0.5
    bits = update & (uniform_from_index(canon, seed_lo, seed_hi) < probability)
    packed = tl.sum(bits.to(tl.int32) << bit[None, :], axis=1)
    tl.store(out_ptr + byte, packed.to(tl.uint8), mask=byte < num_bytes)


def compress(g_D, m_T, b_T, seg_starts, seg_canon, *, beta, seed, mask_T=None, used_P=None, amsgrad=False,
             flag=None, state_offset=0, beta2=None, rms=False, ratio_scale=1.0, g_scale=1.0):
    """Triton twin of :func:`dist_supernet.kernels.reference.compress`: same bits, same m and b.

    m_T, b_T (fp32, contiguous) are updated in place; returns uint8 [ceil(D / 8)].

    Example::
        >>> g = torch.tensor([1.0, -2.0, 0.0], device="cuda")
        >>> m, b = torch.zeros_like(g), torch.zeros_like(g)
        >>> starts, canon = kernels.index_map([3], device="cuda")
        >>> bits = compress(g, m, b, starts, canon, beta=0.9, seed=0)
        >>> kernels.reference.unpack_bits(bits, 3).tolist()[:2]   # |r| = 1: deterministic
        [1, 0]
    """
    num_segments = reference.check_index_map(seg_starts, seg_canon)
    numel = g_D.numel()
    _launch.check_numel(numel)
    for name, tensor in (("m_T", m_T), ("b_T", b_T)):
        _launch.check_inplace(name, tensor)
        if tensor.dtype != torch.float32:
            raise ValueError(f"{name} dtype={tensor.dtype}: Birder state is float32")
    num_bytes = (numel + 7) // 8
    out = torch.empty(num_bytes, dtype=torch.uint8, device=g_D.device)
    if numel == 0:
        return out
    mask_u8 = _launch.mask_bytes(mask_T)
    used_u8 = _launch.mask_bytes(used_P)
    seed_lo, seed_hi = _launch.seed_halves(seed)
    beta2 = beta if beta2 is None else beta2
    beta_f, omb_f, beta2_f, omb2_f = reference.rule_constants(beta, beta2, rms, g_scale)
    g_flat = g_D.reshape(-1).contiguous()
    device = g_D.device
    g_dtype, has_mask, has_used, has_flag = g_D.dtype, mask_u8 is not None, used_u8 is not None, flag is not None

    def warm():  # the same key on dummies of this size (for _launch.tune_missed): never the real m, b
        n = _launch.dummy_numel(numel)
        dummy = torch.zeros(n, device=device)
        compress(torch.zeros(n, dtype=g_dtype, device=device), dummy, torch.zeros_like(dummy),
                 *reference.index_map([n], device=device), beta=0.9, seed=0, amsgrad=amsgrad, rms=rms,
                 mask_T=torch.ones(n, dtype=torch.uint8, device=device) if has_mask else None,
                 used_P=torch.ones(1, dtype=torch.uint8, device=device) if has_used else None,
                 flag=torch.zeros(1, dtype=torch.uint8, device=device) if has_flag else None)

    _launch.launch(
        _compress_kernel, numel,
        (g_flat, m_T, b_T, seg_starts.contiguous(), seg_canon.contiguous(),
         out if mask_u8 is None else mask_u8, out if used_u8 is None else used_u8, out if flag is None else flag, out,
         numel, num_bytes, num_segments, _launch.search_steps(num_segments), int(state_offset),
         beta_f, omb_f, seed_lo, seed_hi, beta2_f, omb2_f, reference.as_float32(ratio_scale)),
        device=device, warm=warm,
        constexprs=dict(HAS_MASK=has_mask, HAS_USED=has_used, HAS_FLAG=has_flag, AMSGRAD=bool(amsgrad),
                        RMS=bool(rms)),
    )
    return out
