"""Fixtures for the kernel tests: Triton launchers (interpreted on CPU) and the device to test on.

Without CUDA the Triton kernels run in the interpreter (TRITON_INTERPRET=1),
set here before any module holding a @triton.jit function is imported.
"""

import importlib
import os
from types import SimpleNamespace

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kernels  # noqa: E402  (after the env var; importing the package itself never imports triton)

TRITON_SKIP_REASON = "triton is not importable: install the 'triton' extra to test the Triton kernels"


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session")
def tk():
    """The Triton launchers, one attribute per public function; skips when triton is missing."""
    if not kernels.triton_available():
        pytest.skip(TRITON_SKIP_REASON)
    names = {
        "compress": ("compress", "compress"),
        "unpack_mean": ("unpack_mean", "unpack_mean"),
        "unpack_counts": ("unpack_mean", "unpack_counts"),
        "pack_counts": ("pack_counts", "pack_counts"),
        "unpack_planes": ("pack_counts", "unpack_planes"),
        "requantize": ("requantize", "requantize"),
        "apply_update_": ("apply_update", "apply_update_"),
        "apply_packed_": ("apply_packed", "apply_packed_"),
        "uniform_hash": ("uniform_hash", "uniform_hash"),
    }
    return SimpleNamespace(
        **{name: getattr(importlib.import_module(f"kernels.ops.{module}"), attr) for name, (module, attr) in names.items()}
    )


@pytest.fixture
def triton_backend(tk):
    """Route the public ``kernels.*`` functions to Triton for one test, then restore the backend."""
    previous = kernels.get_backend()
    kernels.set_backend("triton")
    yield
    kernels.set_backend(previous)


@pytest.fixture(autouse=True)
def _fixed_torch_seed():
    """Inputs are random but reproducible; the draws themselves come from the seeded hash."""
    torch.manual_seed(0)
