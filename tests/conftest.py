import os

import torch

# The Triton kernels run in the CPU interpreter when there is no GPU; the flag is read when a
# @triton.jit function is defined, so it must be set before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_sessionstart(session):
    # Compile the numba kernels once, here, before any test spawns worker processes: on a fresh clone
    # (CI) every process of the first distributed tests would otherwise compile them at the same time
    # (~45 s each on 2 cores); compiled once, they load from numba's on-disk cache in ~1 s.
    from dist_supernet import kernels

    # DIST_SUPERNET_NUMBA_WARMUP=0: a run that tests no numba kernel (benchmarks/gpu_check.sh on a GPU
    # machine, whose CPU has no cached machine code) skips the ~30 s compile.
    if kernels.numba_available() and os.environ.get("DIST_SUPERNET_NUMBA_WARMUP", "1") != "0":
        kernels.warmup("cpu")
