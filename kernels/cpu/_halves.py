"""bf16 / fp16 parameters in the numba kernels: exact widening to fp32, narrowing rounded to nearest even.

numpy has no bf16 and numba's fp16 support is partial, so both travel as uint16 bits and are
converted by hand, bit for bit as torch converts finite values (and the Triton kernels:
kernels/ops/_launch.py ``load_x`` / ``store_x``). NaN becomes a quiet NaN (0x7FC0 for bf16,
0x7E00 with the sign for fp16); NaN payloads are not part of the contract.
"""

import numba
import numpy as np

from dist_supernet.kernels.cpu._common import helper

X_FP32, X_BF16, X_FP16 = 0, 1, 2  # x_kind, as kernels.ops._launch.X_KINDS


U32 = numba.uint32  # numba widens uint32 arithmetic to 64 bits (mixed with int64: to float64): cast each step


@helper
def widen(bits, x_kind, out):
    """out[i] = the fp32 value of bf16 / fp16 bits[i] (exact). out: float32, len(bits) elements."""
    words = out.view(np.uint32)
    if x_kind == X_BF16:
        for i in range(bits.shape[0]):
            words[i] = U32(U32(bits[i]) << U32(16))
        return
    for i in range(bits.shape[0]):
        h = U32(bits[i])
        sign = U32(U32(h & U32(0x8000)) << U32(16))
        exponent = U32(U32(h >> U32(10)) & U32(0x1F))
        mantissa = U32(h & U32(0x3FF))
        if exponent == 0x1F:  # inf, NaN
            words[i] = U32(sign | U32(0x7F800000) | U32(mantissa << U32(13)))
        elif exponent != 0:
            words[i] = U32(sign | U32(U32(exponent + U32(112)) << U32(23)) | U32(mantissa << U32(13)))
        elif mantissa == 0:
            words[i] = sign
        else:  # subnormal m * 2**-24: normalise so bit 10 is the implicit one
            biased = U32(113)
            while U32(mantissa & U32(0x400)) == 0:
                mantissa = U32(mantissa << U32(1))
                biased = U32(biased - U32(1))
            words[i] = U32(sign | U32(biased << U32(23)) | U32(U32(mantissa & U32(0x3FF)) << U32(13)))


@helper
def narrow_one(word, x_kind):
    """bf16 / fp16 bits of the fp32 with bits ``word``, rounded to nearest even."""
    u = U32(word)
    magnitude = U32(u & U32(0x7FFFFFFF))
    if x_kind == X_BF16:
        if magnitude > U32(0x7F800000):
            return numba.uint16(0x7FC0)
        return numba.uint16(U32(U32(u + U32(0x7FFF) + U32(U32(u >> U32(16)) & U32(1))) >> U32(16)))
    sign = U32(U32(u >> U32(16)) & U32(0x8000))
    if magnitude > U32(0x7F800000):
        return numba.uint16(U32(sign | U32(0x7E00)))
    if magnitude >= U32(0x477FF000):  # halfway past 65504 and up: the even neighbour is inf
        return numba.uint16(U32(sign | U32(0x7C00)))
    if magnitude >= U32(0x38800000):  # a normal fp16: rebias the exponent, round 13 bits away
        rounded = U32(magnitude + U32(0xFFF) + U32(U32(magnitude >> U32(13)) & U32(1)))
        return numba.uint16(U32(sign | U32(U32(rounded - U32(0x38000000)) >> U32(13))))
    if magnitude <= U32(0x33000000):  # at most 2**-25 (a tie with 0 at exactly 2**-25): 0
        return numba.uint16(sign)
    significand = U32(U32(magnitude & U32(0x7FFFFF)) | U32(0x800000))
    shift = U32(U32(126) - U32(magnitude >> U32(23)))  # units of 2**-24 (the smallest subnormal)
    quotient = U32(significand >> shift)
    remainder = U32(significand & U32(U32(U32(1) << shift) - U32(1)))
    half = U32(U32(1) << U32(shift - U32(1)))
    if remainder > half or (remainder == half and U32(quotient & U32(1)) != 0):
        quotient = U32(quotient + U32(1))
    return numba.uint16(U32(sign | quotient))
