"""Seeds for the counter-based random stream: independent per (base seed, rank, step, stage).

splitmix64 is a bijection on 64-bit integers with full avalanche, so folding
each part in with it gives unrelated seeds for neighbouring steps and ranks.
"""

MASK64 = (1 << 64) - 1


def splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & MASK64
    return value ^ (value >> 31)


def mix_seed(*parts: int) -> int:
    """One 64-bit seed from integer parts, e.g. ``mix_seed(base, rank, step, stage)``.

    Example::
        >>> mix_seed(0, 1, 2) != mix_seed(0, 2, 1)
        True
    """
    seed = 0
    for part in parts:
        seed = splitmix64(seed ^ (int(part) & MASK64))
    return seed
