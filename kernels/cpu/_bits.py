"""Bit decoding (and counts -> mean) shared by the numba kernels that read packed rows or planes (no kernel here).

Counting set bits of N rows (or summing K weighted planes) one bit at a time does not
vectorise. Instead each payload byte is spread to eight 0/1 byte lanes of a uint64 with one
multiply (``spread``), and lanes are added as whole words: eight counters per add, each lane
at most 255 before it is flushed into the int32 counts.

A payload is seen as uint8 [R, K, Cb]: exact-count planes as they arrive (element j is in
row j // C, C = 8 Cb, and plane k weighs 2**k), or N rows of bits as [1, N, B'] with every
plane weighing 1. Legend: R chunk rows, K planes (or N rows), Cb bytes per plane.
"""

import numba
import numpy as np

from dist_supernet.kernels.cpu._common import helper

_REPLICATE = np.uint64(0x0101010101010101)
_SELECT = np.uint64(0x8040201008040201)  # lane k keeps bit k of the replicated byte
_ROUND_UP = np.uint64(0x7F7F7F7F7F7F7F7F)  # lane value 2**k + 0x7F sets the lane's bit 7, never carries
_LOW_BITS = np.uint64(0x0101010101010101)


@helper
def spread(byte):
    """uint8 -> uint64 whose byte lane k is bit k of byte (0 or 1), little-endian lanes."""
    x = (numba.uint64(byte) * _REPLICATE) & _SELECT
    return ((x + _ROUND_UP) >> numba.uint64(7)) & _LOW_BITS


@helper
def decode_counts(payload, weighted, first, numel, lanes, counts):
    """counts[:numel] = the exact counts of elements first .. first + numel - 1 (int32).

    payload: uint8 [R, K, Cb]; weighted: plane k weighs 2**k (planes) or 1 (rows of bits).
    first is a multiple of 8 and [first, first + numel) lies within one row of C = 8 Cb
    elements. lanes: uint8 scratch of at least numel rounded up to 8.
    """
    num_planes = payload.shape[1]
    row_bytes = payload.shape[2]
    row = first // (row_bytes * 8)
    byte0 = (first - row * row_bytes * 8) >> 3
    num_bytes = (numel + 7) >> 3
    words = lanes.view(np.uint64)
    out = counts[:numel]
    for i in range(numel):
        out[i] = 0
    k = 0
    while k < num_planes:
        # a group of planes whose lane sums stay <= 255: planes 0..7 with their weights in
        # the lane, then each higher plane alone (weighted at the flush); or 255 rows of bits
        if weighted:
            end = min(num_planes, 8) if k < 8 else k + 1
            flush_shift = 0 if k < 8 else k
        else:
            end = min(num_planes, k + 255)
            flush_shift = 0
        for q in range(num_bytes):
            words[q] = 0
        for plane in range(k, end):
            shift = numba.uint64(plane if (weighted and plane < 8) else 0)
            src = payload[row, plane, byte0:byte0 + num_bytes]
            for q in range(num_bytes):
                words[q] += spread(src[q]) << shift
        lane = lanes[:numel]
        for i in range(numel):
            out[i] += numba.int32(lane[i]) << flush_shift
        k = end


@helper
def to_mean(counts, num_rows, mask, has_mask, out):
    """out[i] = float32(2 counts[i] - num_rows) / num_rows (one rounding), 0 where mask[i] == 0."""
    rows = np.float32(num_rows)
    for i in range(out.shape[0]):
        mean = np.float32(2 * counts[i] - num_rows) / rows
        if has_mask:
            mean = mean if mask[i] != 0 else np.float32(0.0)
        out[i] = mean
