"""Birder's compression kernels: numba on CPU tensors, Triton on CUDA tensors, pure torch as the contract.

Every public op here has the signature of its reference in :mod:`dist_supernet.kernels.reference` (the
contract: bit layout, random stream, state update, rounding) and dispatches on the device of
its main tensor argument. The ops and their launchers are listed once, in
:mod:`dist_supernet.kernels.registry`. Backends (``set_backend`` or the ``DIST_SUPERNET_KERNELS``
environment variable, read at import):

- ``"auto"`` (default): Triton for CUDA tensors, numba for CPU tensors, each when it
  imports; otherwise torch. CUDA tensors that fall back to torch because triton does not
  import get one RuntimeWarning (that path is 10-50x slower);
- ``"torch"``: always the reference;
- ``"numba"``: numba for CPU tensors (CUDA tensors raise ValueError);
- ``"triton"``: always Triton (CPU tensors need ``TRITON_INTERPRET=1`` set before the first
  Triton module is imported).

All backends give the same bits, m, b and x. Importing this package needs neither numba nor
triton nor a GPU.

Example::
    >>> import torch, kernels
    >>> bits = kernels.pack_bits(torch.tensor([True, False, True]))
    >>> int(bits[0])
    5
"""

import functools
import os
import threading
import warnings

from dist_supernet.kernels import reference
from dist_supernet.kernels.reference import count_bits, index_map, num_bytes
from dist_supernet.kernels.registry import BACKENDS, OPS, implementation

ENV_VAR = "DIST_SUPERNET_KERNELS"
_backend = os.environ.get(ENV_VAR, "auto")
_available: dict[str, bool] = {}
_warned: set[str] = set()
_lock = threading.Lock()


def set_backend(name: str) -> None:
    """Choose the kernel backend for the whole process: one of ``BACKENDS``."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"kernels backend={name!r}: expected one of {', '.join(BACKENDS)}")
    _backend = name


def get_backend() -> str:
    """The backend in use; ValueError naming DIST_SUPERNET_KERNELS if it holds an unknown name."""
    if _backend not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={_backend!r}: expected one of {', '.join(BACKENDS)}")
    return _backend


def _importable(package: str) -> bool:
    if package not in _available:
        try:
            __import__(package)
            _available[package] = True
        except Exception as error:  # a broken install raises more than ImportError
            _available[package] = False
            _available[package + ":error"] = f"{type(error).__name__}: {error}"
    return _available[package]


def triton_available() -> bool:
    """Whether triton imports (needed for CUDA tensors to take the fast path)."""
    return _importable("triton")


def numba_available() -> bool:
    """Whether numba imports (needed for CPU tensors to take the fast path)."""
    return _importable("numba")


def _warn_once(key: str, message: str) -> None:
    with _lock:
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=4)


def backend_for(tensor) -> str:
    """The backend ("torch", "numba" or "triton") that ops on ``tensor`` take now."""
    backend = get_backend()
    is_cuda = getattr(tensor, "is_cuda", False)
    if backend == "torch":
        return "torch"
    if backend == "triton":
        return "triton"
    if backend == "numba":
        if is_cuda:
            raise ValueError(f"{ENV_VAR}=numba: numba kernels take CPU tensors, got a CUDA tensor")
        return "numba"
    if is_cuda:
        if triton_available():
            return "triton"
        _warn_once("cuda-torch", "kernels: CUDA tensors take the pure-torch path because triton does not import "
                   f"({_available.get('triton:error')}); compression will be 10-50x slower. Install triton, or set "
                   f"{ENV_VAR}=torch to choose this path on purpose.")
        return "torch"
    if numba_available():
        return "numba"
    _warn_once("cpu-torch", "kernels: CPU tensors take the pure-torch path because numba does not import "
               f"({_available.get('numba:error')}); compression will be ~10x slower. Install numba, or set "
               f"{ENV_VAR}=torch to choose this path on purpose.")
    return "torch"


@functools.lru_cache(maxsize=None)
def _resolved(name: str, backend: str):
    return implementation(name, backend)


def _device_tensor(op, args, kwargs):
    position, keyword = op.device_arg
    value = args[position] if len(args) > position else kwargs.get(keyword)
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return value


def _make_public(op):
    @functools.wraps(op.reference)
    def public(*args, **kwargs):
        return _resolved(op.name, backend_for(_device_tensor(op, args, kwargs)))(*args, **kwargs)

    public.__module__ = __name__
    public.__doc__ = f"Dispatched :func:`dist_supernet.kernels.reference.{op.name}` (see kernels.registry).\n\n" + (
        op.reference.__doc__ or "")
    return public


for _name, _op in OPS.items():
    globals()[_name] = _make_public(_op)
del _name, _op


def warmup(device, bucket_numels=()) -> None:
    """Compile (or load from cache) and autotune every kernel before the first step, off the hot path.

    CPU: each numba kernel runs once on a tiny input (loading its cached machine code, or
    compiling it the first time on this machine). CUDA: Triton's autotuner runs on dummy
    tensors of each bucket size in ``bucket_numels`` (see dist_supernet.kernels.ops._launch.autotune_warmup),
    so tuning does not happen inside the first backward on the comm thread.

    Example::
        >>> kernels.warmup("cpu")
    """
    import torch

    device = torch.device(device)
    backend = backend_for(torch.empty(0, device=device))
    if backend == "triton" and device.type == "cuda":
        from dist_supernet.kernels.ops import _launch

        _launch.autotune_warmup(bucket_numels, device)
    elif backend == "numba":
        from dist_supernet.kernels import cpu

        cpu.warmup()


__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "OPS",
    "backend_for",
    "count_bits",
    "get_backend",
    "index_map",
    "num_bytes",
    "numba_available",
    "reference",
    "set_backend",
    "triton_available",
    "warmup",
    *OPS,
]
