"""An independent numpy model of the kernel contract, to hold the torch reference to it.

Written from docs/kernels.md, not from kernels/reference.py: numpy float32 arithmetic
(each operation rounded, no fma), uint32 hash lanes, canonical indices built segment by
segment, bits packed with numpy's packbits.
"""

import numpy as np

MUL_1, MUL_2 = np.uint32(0x7FEB352D), np.uint32(0x846CA68B)


def lowbias32(x):
    x = x.astype(np.uint32)
    x ^= x >> np.uint32(16)
    x *= MUL_1
    x ^= x >> np.uint32(15)
    x *= MUL_2
    x ^= x >> np.uint32(16)
    return x


def uniform(index, seed):
    """index: int64 (64-bit rule) or int32 (uint32 bits) numpy array."""
    index = np.asarray(index)
    if index.dtype == np.int64:
        bits = index.view(np.uint64)
        low, high = (bits & np.uint64(0xFFFFFFFF)).astype(np.uint32), (bits >> np.uint64(32)).astype(np.uint32)
    else:
        low, high = index.astype(np.int64).astype(np.uint32), np.zeros(index.shape, np.uint32)
    x = lowbias32(low ^ np.uint32(seed & 0xFFFFFFFF))
    x = lowbias32(x ^ np.uint32((seed >> 32) & 0xFFFFFFFF))
    x = np.where(high != 0, lowbias32(x ^ high), x)
    return (x >> np.uint32(8)).astype(np.float32) / np.float32(1 << 24)


def canon(numels, canon_starts):
    """(canonical index, segment) of every chunk position, segment by segment."""
    parts = [np.arange(c, c + n, dtype=np.int64) for n, c in zip(numels, canon_starts)]
    segs = [np.full(n, s, dtype=np.int64) for s, n in enumerate(numels)]
    return (np.concatenate(parts) if parts else np.zeros(0, np.int64),
            np.concatenate(segs) if segs else np.zeros(0, np.int64))


def pack(bits):
    return np.packbits(np.asarray(bits, dtype=np.uint8), bitorder="little")


def compress(g, m_T, b_T, numels, canon_starts, *, beta, seed, mask_T=None, used_P=None, amsgrad=False,
             state_offset=0, beta2=None, rms=False, ratio_scale=1.0, g_scale=1.0):
    """Returns (bits, m_T, b_T, flag) without touching the inputs."""
    g = np.asarray(g, dtype=np.float32)
    m_T, b_T = np.array(m_T, dtype=np.float32), np.array(b_T, dtype=np.float32)
    index, seg = canon(numels, canon_starts)
    state = index - state_offset
    active = np.ones(g.shape, bool)
    if mask_T is not None:
        active &= np.asarray(mask_T)[state] != 0
    if used_P is not None:
        active &= np.asarray(used_P)[seg] != 0
    finite = np.isfinite(g)
    update = active & finite
    beta2 = beta if beta2 is None else beta2
    # g_scale folds into the (1 - beta) constants (squared for rms's g * g), each rounded once
    beta32, omb32 = np.float32(beta), np.float32((1.0 - beta) * g_scale)
    beta2_32, omb2_32 = np.float32(beta2), np.float32((1.0 - beta2) * (g_scale * g_scale if rms else g_scale))
    m, b = m_T[state], b_T[state]
    with np.errstate(invalid="ignore", over="ignore"):
        m_new = beta32 * m + omb32 * g
        b_new = beta2_32 * b + omb2_32 * (g * g if rms else np.abs(g))
        if amsgrad:
            b_new = np.maximum(b, b_new)
    m = np.where(update, m_new, m)
    b = np.where(update, b_new, b)
    m_T[state], b_T[state] = m, b
    with np.errstate(divide="ignore", invalid="ignore"):
        denominator = np.sqrt(b) if rms else b  # float32 sqrt, correctly rounded
        ratio = np.where(b <= 0, np.float32(0), (m * np.float32(ratio_scale)) / denominator).astype(np.float32)
    probability = (np.float32(1) + ratio) * np.float32(0.5)
    bits = update & (uniform(index, seed) < probability)
    return pack(bits), m_T, b_T, bool((active & ~finite).any())


def apply_packed(xs, numels, canon_starts, counts, *, num_rows, lr_P, wd_P, mask_T=None, used_P=None,
                 state_offset=0):
    """xs: list of float32 numpy arrays (flat); counts: int per chunk element. Returns new arrays."""
    out, at = [], 0
    for s, (x, n, c) in enumerate(zip(xs, numels, canon_starts)):
        x = np.array(x, dtype=np.float32)
        mean = (2 * counts[at:at + n].astype(np.int64) - num_rows).astype(np.float32) / np.float32(num_rows)
        lr, wd = np.float32(lr_P[s]), np.float32(wd_P[s])
        new = x - lr * (mean + wd * x)
        active = np.ones(n, bool)
        if mask_T is not None:
            active &= np.asarray(mask_T)[c - state_offset:c - state_offset + n] != 0
        if used_P is not None:
            active &= bool(used_P[s])
        out.append(np.where(active, new, x))
        at += n
    return out
