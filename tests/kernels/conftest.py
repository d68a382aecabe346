"""Fixtures for the kernel tests: every backend of kernels.registry, held to the reference.

Without CUDA the Triton kernels run in the interpreter (TRITON_INTERPRET=1), set here before
any module holding a @triton.jit function is imported. The interpreter runs one program at a
time in numpy, so the Triton cases stay at a few programs of 1024 bytes (8192 elements).
The numba kernels compile on first use on a machine (~25 s for all of them), then load from
numba's cache (kernels/cpu/__pycache__).
"""

import os
from types import SimpleNamespace

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dist_supernet import kernels  # noqa: E402  (after the env var; importing the package itself never imports triton)
from dist_supernet.kernels import reference as ref  # noqa: E402
from dist_supernet.kernels.registry import OPS, implementation  # noqa: E402

BACKEND_NAMES = ("torch", "numba", "triton")
SKIP_REASON = {
    "numba": "numba is not importable: install numba to test the CPU kernels",
    "triton": "triton is not importable: install the 'triton' extra to test the Triton kernels",
}


def _available(name: str) -> bool:
    return {"torch": True, "numba": kernels.numba_available(), "triton": kernels.triton_available()}[name]


@pytest.fixture(scope="session", params=BACKEND_NAMES)
def backend(request):
    """One backend: ``.name``, ``.device`` and one attribute per op of kernels.registry.OPS."""
    name = request.param
    if not _available(name):
        pytest.skip(SKIP_REASON[name])
    device = "cuda" if name == "triton" and torch.cuda.is_available() else "cpu"
    return SimpleNamespace(name=name, device=device, **{op: implementation(op, name) for op in OPS})


@pytest.fixture(scope="session", params=[name for name in BACKEND_NAMES if name != "torch"])
def compiled(request):
    """The compiled backends only (numba, Triton): for checks the reference passes by construction."""
    name = request.param
    if not _available(name):
        pytest.skip(SKIP_REASON[name])
    device = "cuda" if name == "triton" and torch.cuda.is_available() else "cpu"
    return SimpleNamespace(name=name, device=device, **{op: implementation(op, name) for op in OPS})


@pytest.fixture(autouse=True)
def _fixed_torch_seed():
    """Inputs are random but reproducible; the draws themselves come from the seeded hash."""
    torch.manual_seed(0)


def chunk(numels, canon_starts=None, device="cpu"):
    """(seg_starts, seg_canon) on device for a chunk of segments with these numels."""
    return ref.index_map(numels, canon_starts, device=device)
