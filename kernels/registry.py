"""The one table of kernel ops: name -> reference, numba launcher, Triton launcher.

The dispatch in :mod:`kernels`, the kernel tests (tests/kernels) and the benchmark
(benchmarks/bench_kernels.py) all read this table, so a new kernel is one file per backend
plus one line here. Launchers are named ``"module:function"`` and imported only when asked
for: importing this table needs neither numba nor triton.

Example::
    >>> from dist_supernet.kernels.registry import OPS, implementation
    >>> OPS["compress"].numba
    'dist_supernet.kernels.cpu.compress:compress'
    >>> implementation("pack_bits", "torch").__module__
    'dist_supernet.kernels.reference'
"""

import dataclasses
import importlib
from typing import Callable

from dist_supernet.kernels import reference

BACKENDS = ("auto", "torch", "numba", "triton")
COMPILED = ("numba", "triton")


@dataclasses.dataclass(frozen=True)
class Op:
    """One kernel op: its contract and where each backend's launcher lives (None: the reference serves)."""

    name: str
    reference: Callable
    numba: str | None
    triton: str | None
    device_arg: tuple[int, str]  # (position, keyword) of the tensor whose device picks the backend


def _op(name, numba, triton, device_arg=(0, None)):
    return Op(name, getattr(reference, name), numba, triton, device_arg)


OPS: dict[str, Op] = {
    op.name: op
    for op in (
        _op("uniform", "dist_supernet.kernels.cpu.uniform:uniform", "dist_supernet.kernels.ops.uniform_hash:uniform_hash", (0, "index")),
        _op("pack_bits", "dist_supernet.kernels.cpu.pack_bits:pack_bits", None, (0, "bits_D")),
        _op("unpack_bits", None, None, (0, "packed_NB")),
        _op("compress", "dist_supernet.kernels.cpu.compress:compress", "dist_supernet.kernels.ops.compress:compress", (0, "g_D")),
        _op("requantize", "dist_supernet.kernels.cpu.requantize:requantize", "dist_supernet.kernels.ops.requantize:requantize", (0, "counts_C")),
        _op("unpack_counts", "dist_supernet.kernels.cpu.unpack_counts:unpack_counts", "dist_supernet.kernels.ops.unpack_counts:unpack_counts",
            (0, "packed_NB")),
        _op("unpack_mean", "dist_supernet.kernels.cpu.unpack_mean:unpack_mean", "dist_supernet.kernels.ops.unpack_mean:unpack_mean",
            (0, "packed_NB")),
        _op("counts_to_mean", "dist_supernet.kernels.cpu.counts_to_mean:counts_to_mean", None, (0, "counts")),
        _op("pack_counts", "dist_supernet.kernels.cpu.pack_counts:pack_counts", "dist_supernet.kernels.ops.pack_counts:pack_counts",
            (0, "counts_D")),
        _op("unpack_planes", "dist_supernet.kernels.cpu.unpack_planes:unpack_planes", "dist_supernet.kernels.ops.unpack_planes:unpack_planes",
            (0, "planes_KB")),
        _op("apply_update_", "dist_supernet.kernels.cpu.apply_update:apply_update_", "dist_supernet.kernels.ops.apply_update:apply_update_",
            (0, "x")),
        _op("apply_packed_", "dist_supernet.kernels.cpu.apply_packed:apply_packed_", "dist_supernet.kernels.ops.apply_packed:apply_packed_",
            (3, "payload")),
        _op("rht", "dist_supernet.kernels.cpu.rht:rht", "dist_supernet.kernels.ops.rht:rht", (0, "x_D")),
        _op("onebit_encode", "dist_supernet.kernels.cpu.onebit_encode:onebit_encode",
            "dist_supernet.kernels.ops.onebit_encode:onebit_encode", (0, "x_D")),
        _op("onebit_decode", "dist_supernet.kernels.cpu.onebit_decode:onebit_decode",
            "dist_supernet.kernels.ops.onebit_decode:onebit_decode", (0, "bits_NB")),
    )
}


def launcher_path(name: str, backend: str) -> str | None:
    """"module:function" of an op's launcher in a compiled backend, or None where the reference serves."""
    if backend not in COMPILED:
        raise ValueError(f"backend={backend!r}: expected one of {', '.join(COMPILED)}")
    return getattr(OPS[name], backend)


def implementation(name: str, backend: str) -> Callable:
    """The function that runs op ``name`` on ``backend`` ("torch", "numba" or "triton"), imported now.

    Ops a backend does not implement are served by the reference. Raises ImportError when the
    backend's package (numba, triton) cannot be imported.
    """
    if name not in OPS:
        raise ValueError(f"kernel op={name!r}: expected one of {', '.join(OPS)}")
    if backend == "torch":
        return OPS[name].reference
    path = launcher_path(name, backend)
    if path is None:
        return OPS[name].reference
    module, function = path.split(":")
    return getattr(importlib.import_module(module), function)
