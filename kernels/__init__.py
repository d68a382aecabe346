"""Birder's compression kernels: Triton on CUDA tensors, pure torch elsewhere.

Every public function here has the same signature as its reference in
:mod:`kernels.reference` (the contract: bit layout, random stream, state
update) and dispatches on the device of its first tensor argument:

- ``"auto"`` (default): Triton for CUDA tensors when triton imports, torch otherwise;
- ``"torch"``: always the reference path;
- ``"triton"``: always Triton (CPU tensors need ``TRITON_INTERPRET=1`` set
  before this package is imported).

Importing this package never needs triton or a GPU.

Example::
    >>> import torch, kernels
    >>> kernels.set_backend("torch")
    >>> bits = kernels.pack_bits(torch.tensor([True, False, True]))
    >>> int(bits[0])
    5
"""

import os

from kernels import reference
from kernels.reference import count_bits, num_bytes, pack_bits, uniform, unpack_bits

BACKENDS = ("auto", "torch", "triton")
_backend = os.environ.get("DIST_SUPERNET_KERNELS", "auto")


def set_backend(name: str) -> None:
    """Choose the kernel backend for the whole process: one of ``BACKENDS``."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"kernels backend={name!r}: expected one of {', '.join(BACKENDS)}")
    _backend = name


def get_backend() -> str:
    return _backend


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _use_triton(tensor) -> bool:
    if _backend == "torch":
        return False
    if _backend == "triton":
        return True
    return tensor.is_cuda and triton_available()




def _triton_module(name: str):
    import importlib

    return importlib.import_module(f"kernels.ops.{name}")


def compress(g, m, b, index, *, beta, seed, mask=None, amsgrad=False):
    """Fused Birder compress; see :func:`kernels.reference.compress`."""
    if _use_triton(g):
        return _triton_module("compress").compress(
            g, m, b, index, beta=beta, seed=seed, mask=mask, amsgrad=amsgrad
        )
    return reference.compress(g, m, b, index, beta=beta, seed=seed, mask=mask, amsgrad=amsgrad)


def unpack_mean(packed_NB, numel, *, mask=None):
    """N packed rows -> float32 mean of ±1; see :func:`kernels.reference.unpack_mean`."""
    if _use_triton(packed_NB):
        return _triton_module("unpack_mean").unpack_mean(packed_NB, numel, mask=mask)
    return reference.unpack_mean(packed_NB, numel, mask=mask)


def unpack_counts(packed_NB, numel):
    """N packed rows -> int32 exact counts; see :func:`kernels.reference.unpack_counts`."""
    if _use_triton(packed_NB):
        return _triton_module("unpack_mean").unpack_counts(packed_NB, numel)
    return reference.unpack_counts(packed_NB, numel)


def counts_to_mean(counts, num_rows, *, mask=None):
    """Exact counts -> float32 mean of ±1; see :func:`kernels.reference.counts_to_mean`."""
    return reference.counts_to_mean(counts, num_rows, mask=mask)


def pack_counts(counts_D, num_planes):
    """Counts -> K bit planes; see :func:`kernels.reference.pack_counts`."""
    if _use_triton(counts_D):
        return _triton_module("pack_counts").pack_counts(counts_D, num_planes)
    return reference.pack_counts(counts_D, num_planes)


def unpack_planes(planes_KB, numel):
    """K bit planes -> int32 counts; see :func:`kernels.reference.unpack_planes`."""
    if _use_triton(planes_KB):
        return _triton_module("pack_counts").unpack_planes(planes_KB, numel)
    return reference.unpack_planes(planes_KB, numel)


def requantize(counts, num_rows, index, *, seed):
    """Exact counts -> 1 unbiased bit each; see :func:`kernels.reference.requantize`."""
    if _use_triton(counts):
        return _triton_module("requantize").requantize(counts, num_rows, index, seed=seed)
    return reference.requantize(counts, num_rows, index, seed=seed)


def apply_update_(x, update, *, lr, weight_decay, mask=None):
    """x -= lr * (update + weight_decay * x); see :func:`kernels.reference.apply_update_`."""
    if _use_triton(x):
        return _triton_module("apply_update").apply_update_(
            x, update, lr=lr, weight_decay=weight_decay, mask=mask
        )
    return reference.apply_update_(x, update, lr=lr, weight_decay=weight_decay, mask=mask)


def apply_packed_(x, packed_NB, *, lr, weight_decay, mask=None):
    """x -= lr * (mean of N packed rows + wd * x), fused; see :func:`kernels.reference.apply_packed_`."""
    if _use_triton(x):
        return _triton_module("apply_packed").apply_packed_(
            x, packed_NB, lr=lr, weight_decay=weight_decay, mask=mask
        )
    return reference.apply_packed_(x, packed_NB, lr=lr, weight_decay=weight_decay, mask=mask)


__all__ = [
    "BACKENDS",
    "apply_packed_",
    "apply_update_",
    "compress",
    "count_bits",
    "counts_to_mean",
    "get_backend",
    "num_bytes",
    "pack_bits",
    "pack_counts",
    "requantize",
    "set_backend",
    "triton_available",
    "uniform",
    "unpack_bits",
    "unpack_counts",
    "unpack_mean",
    "unpack_planes",
]
