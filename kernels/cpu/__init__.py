"""Compiled CPU backend (numba): one kernel per file, ``_x_kernel`` + launcher ``x()``.

Each launcher has its reference's signature (:mod:`dist_supernet.kernels.reference`) and gives the same
bits and values. Reached through the dispatch in :mod:`kernels`; importing a module here
needs numba. The jit options, the on-disk cache and the thread policy are in
:mod:`dist_supernet.kernels.cpu._common`.
"""


def warmup() -> None:
    """Run every numba kernel once on tiny inputs: loads its cached machine code (or compiles it).

    Each kernel has one signature per input dtype it accepts (counts int32 and int64), all
    warmed here, so no compile happens later on the hook's thread.
    """
    import torch

    from dist_supernet.kernels import reference
    from dist_supernet.kernels.cpu import (apply_packed, apply_update, compress, counts_to_mean, onebit_decode, onebit_encode,
                             pack_bits, pack_counts, requantize, rht, uniform, unpack_counts, unpack_mean, unpack_planes)

    starts, canon = reference.index_map([5, 4])
    flag = torch.zeros(1, dtype=torch.uint8)
    compress.compress(torch.zeros(9), torch.zeros(9), torch.zeros(9), starts, canon, beta=0.9, seed=0, flag=flag)
    rows = torch.zeros((2, 2), dtype=torch.uint8)
    for dtype in (torch.int32, torch.int64):
        counts = torch.zeros(9, dtype=dtype)
        requantize.requantize(counts, 2, starts, canon, 0, seed=0)
        pack_counts.pack_counts(counts, 2)
        counts_to_mean.counts_to_mean(counts, 2)
        uniform.uniform(counts, 0)
    unpack_counts.unpack_counts(rows, 9)
    unpack_mean.unpack_mean(rows, 9)
    unpack_planes.unpack_planes(rows, 9)
    pack_bits.pack_bits(torch.zeros(9, dtype=torch.bool))
    apply_update.apply_update_(torch.zeros(9), torch.zeros(9), lr=0.1, weight_decay=0.1)
    lr = torch.zeros(2)
    apply_packed.apply_packed_([torch.zeros(5), torch.zeros(4)], starts, canon, rows, planes=False, num_rows=2,
                               lr_P=lr, wd_P=lr)
    apply_packed.apply_packed_([torch.zeros(5), torch.zeros(4)], starts, canon, rows.view(1, 2, 2), planes=True,
                               num_rows=2, lr_P=lr, wd_P=lr)
    for dtype in (torch.bfloat16, torch.float16):  # the x_kind branches compile into the same signature
        apply_packed.apply_packed_([torch.zeros(5, dtype=dtype), torch.zeros(4, dtype=dtype)], starts, canon, rows,
                                   planes=False, num_rows=2, lr_P=lr, wd_P=lr)
    rht.rht(torch.zeros(9), 0, 8)
    bits, scales = onebit_encode.onebit_encode(torch.zeros(9), 0, 8)
    onebit_decode.onebit_decode(bits.view(1, -1), scales.view(1, -1), 9, 0, 8)
