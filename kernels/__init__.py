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
    >>> import torch
    >>> from dist_supernet import kernels
    >>> bits = kernels.pack_bits(torch.tensor([True, False, True]))
    >>> int(bits[0])
    5
"""

import contextlib
import functools
import os
import sys
import threading
import warnings


def _hand_over_top_level_name() -> None:
    """Reached as top-level ``kernels`` (the repository root on sys.path): give the name to its owner.

    ``python -m pytest`` or ``python -m ...`` run from a clone puts the repository root first on
    sys.path, where this folder then answers ``import kernels``, the name of Hugging Face's package
    (transformers imports it when it is installed, and fails on ours). This folder is
    ``dist_supernet.kernels``; the top-level name is resolved on the rest of sys.path instead.
    """
    import importlib.machinery
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec("kernels", rest)
    if spec is None:
        raise ModuleNotFoundError(f"No module named 'kernels' ({os.path.dirname(os.path.abspath(__file__))} "
                                  "is dist_supernet.kernels, not a top-level package)", name="kernels")
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module  # what the import statement returns once this file has run
    spec.loader.exec_module(module)


if __name__ == "kernels":
    _hand_over_top_level_name()

from dist_supernet.kernels import reference  # noqa: E402 (after the top-level-name check)
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
    """Compile (or load from cache) and tune the kernels before the first step, off the hot path.

    CPU: each numba kernel runs once on a tiny input (loading its cached machine code, or
    compiling it the first time on this machine). CUDA (Triton): compress and apply_packed_ of
    local mode (one row, fp32) run on dummy tensors of each size in ``bucket_numels`` inside
    :func:`tuning`. Birder attached to DDP warms exactly the launches of its collective instead
    (:mod:`dist_supernet.optim.warmup`); launches that were not warmed are tuned later by
    :func:`tune_missed`.

    Example::
        >>> kernels.warmup("cpu")
    """
    import torch

    device = torch.device(device)
    backend = backend_for(torch.empty(0, device=device))
    if backend == "triton":
        ops = sys.modules[__name__]  # the dispatched ops are defined from the registry at import
        with tuning():
            for numel in sorted({int(n) for n in bucket_numels if int(n) > 0}):
                g = torch.zeros(numel, device=device)
                starts, canon = index_map([numel], device=device)
                flag = torch.zeros(1, dtype=torch.uint8, device=device)
                used = torch.ones(1, dtype=torch.uint8, device=device)
                bits = ops.compress(g, torch.zeros_like(g), torch.zeros_like(g), starts, canon, beta=0.9, seed=0,
                                    used_P=used, flag=flag)
                one = torch.ones(1, device=device)
                ops.apply_packed_([g], starts, canon, bits.view(1, -1), planes=False, num_rows=1, lr_P=one, wd_P=one,
                                  used_P=used)
    elif backend == "numba":
        from dist_supernet.kernels import cpu

        cpu.warmup()


def _launcher_module():
    """The Triton launch module if a Triton kernel was ever imported (else nothing was launched or missed)."""
    return sys.modules.get("dist_supernet.kernels.ops._launch")


@contextlib.contextmanager
def tuning():
    """Within this block, Triton launches of an untuned key benchmark every config first (this thread only).

    Enter it only around launches on dummy tensors of the real sizes: tuning reruns each kernel
    in place. A no-op without triton, under the interpreter and with DIST_SUPERNET_AUTOTUNE=0.

    Example::
        >>> with kernels.tuning():
        ...     kernels.compress(torch.zeros(n, device="cuda"), m_dummy, b_dummy, *kernels.index_map([n], device="cuda"),
        ...                      beta=0.9, seed=0)
    """
    if not triton_available():
        yield
        return
    from dist_supernet.kernels.ops import _launch

    with _launch.tuning():
        yield


def tune_missed() -> int:
    """Tune, on dummies, the Triton launches that ran untuned since the last call; returns how many.

    Cheap when there is nothing to do (one dict check). Call it where no collective is in flight:
    ``Birder.step`` does, so DDP's rebuilt buckets (step 2) are tuned before step 3.

    Example::
        >>> kernels.tune_missed()
        0
    """
    launcher = _launcher_module()
    return launcher.tune_missed() if launcher is not None else 0


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
    "tune_missed",
    "tuning",
    "warmup",
    *OPS,
]
