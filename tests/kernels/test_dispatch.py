"""The dispatch, the op table, and the numba backend's compile options, cache and threads."""

import subprocess
import sys
import warnings
from types import SimpleNamespace

import numba
import pytest
import torch

from dist_supernet import kernels
from dist_supernet.kernels import reference as ref
from dist_supernet.kernels.registry import OPS, implementation, launcher_path

from .conftest import chunk


@pytest.fixture
def restore_backend():
    previous = kernels._backend
    yield
    kernels._backend = previous


def test_every_op_is_public_and_has_its_reference(backend):
    for name, op in OPS.items():
        assert getattr(kernels, name).__wrapped__ is op.reference
        assert callable(getattr(backend, name))
    assert implementation("unpack_bits", "numba") is ref.unpack_bits  # no launcher: the reference serves


def test_launchers_resolve(compiled):
    for name in OPS:
        path = launcher_path(name, compiled.name)
        if path is not None:
            assert implementation(name, compiled.name).__module__ == path.split(":")[0]


def test_auto_picks_numba_on_cpu_and_torch_on_request(restore_backend):
    cpu = torch.zeros(1)
    kernels.set_backend("auto")
    assert kernels.backend_for(cpu) == ("numba" if kernels.numba_available() else "torch")
    kernels.set_backend("torch")
    assert kernels.backend_for(cpu) == "torch"
    kernels.set_backend("numba")
    with pytest.raises(ValueError, match="numba"):
        kernels.backend_for(SimpleNamespace(is_cuda=True))
    with pytest.raises(ValueError, match="backend='cuda'"):
        kernels.set_backend("cuda")
    kernels._backend = "fast"  # as DIST_SUPERNET_KERNELS=fast would
    with pytest.raises(ValueError, match="DIST_SUPERNET_KERNELS='fast'"):
        kernels.compress(cpu, cpu, cpu, *chunk([1]), beta=0.9, seed=0)


def test_cuda_on_the_torch_path_warns_once(restore_backend, monkeypatch):
    monkeypatch.setitem(kernels._available, "triton", False)
    monkeypatch.setattr(kernels, "_warned", set())
    kernels.set_backend("auto")
    fake_cuda = SimpleNamespace(is_cuda=True)
    with pytest.warns(RuntimeWarning, match="CUDA tensors take the pure-torch path"):
        assert kernels.backend_for(fake_cuda) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.backend_for(fake_cuda) == "torch"  # once
        kernels.set_backend("torch")
        assert kernels.backend_for(fake_cuda) == "torch"  # asked for: silent


def test_dispatch_gives_the_reference_bits(restore_backend):
    g = torch.randn(100)
    starts, canon = chunk([60, 40], [40, 0])
    results = []
    for name in ("torch", "auto"):
        kernels.set_backend(name)
        m, b = torch.zeros(100), torch.ones(100)
        results.append((kernels.compress(g, m, b, starts, canon, beta=0.9, seed=4), m, b))
    assert all(torch.equal(x, y) for x, y in zip(*results))


def test_numba_kernels_release_the_gil_without_fastmath():
    pytest.importorskip("numba")
    import dist_supernet.kernels.cpu  # noqa: F401

    dispatchers = []
    for name in OPS:
        path = launcher_path(name, "numba")
        if path is None:
            continue
        module = sys.modules.get(path.split(":")[0]) or __import__(path.split(":")[0], fromlist=["_"])
        dispatchers += [v for k, v in vars(module).items() if isinstance(v, numba.core.registry.CPUDispatcher)
                        and k.endswith("_kernel")]
    assert len(dispatchers) >= 10
    for dispatcher in dispatchers:
        options = dispatcher.targetoptions
        assert options["nogil"] and not options.get("fastmath"), dispatcher
        assert type(dispatcher._cache).__name__ != "NullCache", dispatcher  # cache=True took


def test_split_over_threads_gives_the_same_bits(monkeypatch):
    pytest.importorskip("numba")
    from dist_supernet.kernels.cpu import _common

    monkeypatch.setattr(_common, "MIN_ELEMENTS_PER_THREAD", 1000)
    g = torch.randn(9001)
    starts, canon = chunk([3000, 0, 6001], [6001, 0, 0])
    previous = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert _common.num_threads_for(9001) == threads
            m, b = torch.zeros(9001), torch.full((9001,), 0.5)
            outs.append((implementation("compress", "numba")(g, m, b, starts, canon, beta=0.9, seed=1), m, b))
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(x, y) for x, y in zip(*outs))


def test_no_cache_location_falls_back_to_memory(monkeypatch):
    pytest.importorskip("numba")
    from numba.core import caching

    from dist_supernet.kernels.cpu import _common

    monkeypatch.setattr(getattr(caching, "CacheImpl", None) or caching._CacheImpl, "_locator_classes", [])
    monkeypatch.setattr(_common, "_warned_cache", type(_common._warned_cache)())

    def twice(x):
        return 2 * x

    with pytest.warns(RuntimeWarning, match="no writable numba cache"):
        compiled = _common.kernel(twice)
    assert compiled(21) == 42


def test_a_new_process_loads_the_cached_kernels():
    pytest.importorskip("numba")
    kernels.warmup("cpu")  # compiles into the cache if this machine has not yet
    code = (
        "import torch\nfrom dist_supernet import kernels\nimport dist_supernet.kernels.cpu.compress as c\n"
        "s, k = kernels.index_map([9])\n"
        "c.compress(torch.ones(9), torch.zeros(9), torch.zeros(9), s, k, beta=0.9, seed=0)\n"
        "st = c._compress_kernel.stats\n"
        "print(sum(st.cache_hits.values()), sum(st.cache_misses.values()))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    hits, misses = map(int, result.stdout.split())
    assert (hits, misses) == (1, 0), result.stderr
