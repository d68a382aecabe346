"""What only a GPU would show, checked on CPU: CUDA's division, bf16/fp16 parameters, int32 offsets, tuning.

- CUDA computes ``tensor / python_number`` as a multiply by the fp32 reciprocal (1 ulp off at
  n = 6, 7, 10-15, ...); :class:`CudaScalarDivision` makes CPU torch do the same, so a reference
  that divides by a Python int fails here as it would on a GPU.
- bf16 / fp16 chunks are applied in their own dtype by numba and Triton: bit-equal to the reference.
- Triton's config choice and its launch layer (kernels.ops._launch): every config gives the same
  bits, tuning happens only on dummies inside ``tuning()``, misses run the default config and are
  tuned by ``tune_missed()``, ``DIST_SUPERNET_AUTOTUNE=0`` never benchmarks, launches enter the
  tensor's device.
"""

import threading

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from dist_supernet import kernels
from dist_supernet.kernels import reference as ref

from .conftest import chunk

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where the Triton kernels run (else interpreted)
ROWS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 20, 33]  # 6, 7, 10-15, 20, 33: reciprocal is off


class CudaScalarDivision(TorchFunctionMode):
    """float32 ``tensor / number`` computed as CUDA does: ``tensor * fl32(1 / number)``."""

    DIVISIONS = {torch.Tensor.__truediv__, torch.Tensor.div, torch.div, torch.true_divide, torch.Tensor.true_divide}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func in self.DIVISIONS and len(args) == 2 and not kwargs and isinstance(args[1], (int, float))
                and isinstance(args[0], torch.Tensor) and args[0].dtype == torch.float32):
            return args[0] * float(np.float32(1.0) / np.float32(args[1]))
        return func(*args, **kwargs)


def _exact_mean(counts, n):
    return torch.from_numpy(np.float32(2 * counts.numpy().astype(np.int64) - n).astype(np.float32) / np.float32(n))


def test_the_emulation_is_off_by_one_ulp_where_cuda_is():
    counts = torch.arange(0, 8, dtype=torch.int32)
    with CudaScalarDivision():
        by_reciprocal = (counts * 2 - 7).to(torch.float32) / 7
    assert not torch.equal(by_reciprocal, _exact_mean(counts, 7))


@pytest.mark.parametrize("num_rows", ROWS)
def test_reference_divides_exactly_on_cuda_too(num_rows):
    counts = torch.arange(0, num_rows + 1, dtype=torch.int32).repeat(3)
    numel = counts.numel()
    with CudaScalarDivision():
        mean = ref.counts_to_mean(counts, num_rows)
        rows = torch.stack([ref.pack_bits(counts > r) for r in range(num_rows)])  # row r: 1 where count > r
        unpacked = ref.unpack_mean(rows, numel)
        xs = [torch.zeros(numel)]
        ref.apply_packed_(xs, *chunk([numel]), rows, planes=False, num_rows=num_rows, lr_P=torch.ones(1),
                          wd_P=torch.zeros(1))
        starts, canon = chunk([numel])
        bits = ref.requantize(counts, num_rows, starts, canon, 0, seed=11)
    exact = _exact_mean(counts, num_rows)
    assert torch.equal(mean, exact) and torch.equal(unpacked, exact) and torch.equal(xs[0], -exact)
    assert torch.equal(bits, ref.requantize(counts, num_rows, starts, canon, 0, seed=11))


@pytest.mark.parametrize("num_rows", ROWS)
def test_compiled_means_are_exact_quotients(compiled, num_rows):
    device = compiled.device
    counts = torch.arange(0, num_rows + 1, dtype=torch.int32).repeat(3)
    numel = counts.numel()
    rows = torch.stack([ref.pack_bits(counts > r) for r in range(num_rows)]).to(device)
    exact = _exact_mean(counts, num_rows)
    assert torch.equal(compiled.unpack_mean(rows, numel).cpu(), exact)
    xs = [torch.zeros(numel, device=device)]
    compiled.apply_packed_(xs, *chunk([numel], device=device), rows, planes=False, num_rows=num_rows,
                           lr_P=torch.ones(1, device=device), wd_P=torch.zeros(1, device=device))
    assert torch.equal(xs[0].cpu(), -exact)
    starts, canon = chunk([numel], device=device)
    assert torch.equal(compiled.requantize(counts.to(device), num_rows, starts, canon, 0, seed=11).cpu(),
                       ref.requantize(counts, num_rows, *chunk([numel]), 0, seed=11))


def _half_values(dtype, numel, gen):
    """Values of ``dtype`` that stress the conversions: normals, subnormals, the top of the range, signed zeros."""
    x = torch.randn(numel, generator=gen) * 3
    info = torch.finfo(dtype)
    special = torch.tensor([0.0, -0.0, info.tiny, -info.tiny, info.tiny / 8, info.max, -info.max, info.max / 2,
                            info.smallest_normal * 1.5, 1.0, -1.0])
    count = min(numel, special.numel())
    x[:count] = special[:count]
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("planes", [False, True])
def test_half_chunks_apply_in_their_dtype_bit_equal(backend, dtype, planes):
    device = backend.device
    gen = torch.Generator().manual_seed(3)
    numels = [4100, 0, 333, 7]
    numel = sum(numels)
    num_rows = 6
    if planes:
        counts = torch.randint(0, num_rows + 1, (1, 8 * ref.num_bytes(numel)), generator=gen, dtype=torch.int32)
        payload = torch.stack([ref.pack_counts(c, ref.count_bits(num_rows)) for c in counts])
    else:
        payload = torch.randint(0, 256, (num_rows, ref.num_bytes(numel)), generator=gen, dtype=torch.uint8)
    starts, canon = chunk(numels, [500, 0, 4600, 4933])
    mask_T = torch.rand(5000, generator=gen) < 0.7
    # lr large enough that the fp16 top of the range overflows to inf in some elements
    kwargs = dict(planes=planes, num_rows=num_rows, lr_P=torch.tensor([0.5, 0.1, 1e-3, 300.0]),
                  wd_P=torch.tensor([0.0, 0.1, 0.01, 0.5]), mask_T=mask_T,
                  used_P=torch.tensor([1, 1, 1, 1], dtype=torch.uint8))
    xs = [_half_values(dtype, n, gen) for n in numels]
    want = [x.clone() for x in xs]
    ref.apply_packed_(want, starts, canon, payload, **kwargs)
    got = [x.to(device) for x in xs]
    backend.apply_packed_(got, *chunk(numels, [500, 0, 4600, 4933], device=device), payload.to(device),
                          **{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})
    for g, w in zip(got, want):
        assert g.dtype == dtype
        assert torch.equal(g.cpu().view(torch.int16), w.view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_apply_update_bit_equal(backend, dtype):
    gen = torch.Generator().manual_seed(4)
    x = _half_values(dtype, 5000, gen)
    update = torch.randn(5000, generator=gen)
    mask = torch.rand(5000, generator=gen) < 0.5
    want = ref.apply_update_(x.clone(), update, lr=0.7, weight_decay=0.05, mask=mask)
    got = backend.apply_update_(x.to(backend.device), update.to(backend.device), lr=0.7, weight_decay=0.05,
                                mask=mask.to(backend.device))
    assert torch.equal(got.cpu().view(torch.int16), want.view(torch.int16))


def test_rows_a_gib_apart_do_not_overflow_int32(backend):
    # plane * plane_stride passes 2**31 at the third row: 2 GiB of address space (a few pages touched on CPU).
    device, stride = backend.device, 1 << 30
    try:
        storage = torch.empty(2 * stride + 64, dtype=torch.uint8, device=device)
    except RuntimeError:
        pytest.skip("cannot reserve 2 GiB of address space here")
    rows = storage.as_strided((3, 8), (stride, 1))
    values = torch.tensor([[0xFF] * 8, [0x0F] * 8, [0xA5] * 8], dtype=torch.uint8)
    rows.copy_(values)
    xs = [torch.zeros(64, device=device)]
    backend.apply_packed_(xs, *chunk([64], device=device), rows, planes=False, num_rows=3,
                          lr_P=torch.ones(1, device=device), wd_P=torch.zeros(1, device=device))
    assert torch.equal(xs[0].cpu(), -ref.unpack_mean(values, 64))
    assert torch.equal(backend.unpack_counts(rows, 64).cpu(), ref.unpack_counts(values, 64))


# -- the Triton launch layer ---------------------------------------------------------------------

@pytest.fixture
def launch_layer():
    if not kernels.triton_available():
        pytest.skip("triton is not importable")
    from dist_supernet.kernels.ops import _launch

    _launch.reset()
    yield _launch
    _launch.reset()


def _every_op(device=DEVICE):
    """One launch of every Triton op on small inputs; returns their outputs (m, b and x included)."""
    from dist_supernet.kernels.registry import implementation

    op = {name: implementation(name, "triton") for name in
          ("compress", "requantize", "unpack_counts", "unpack_mean", "pack_counts", "unpack_planes",
           "apply_packed_", "apply_update_")}
    gen = torch.Generator().manual_seed(5)
    numel = 5000  # 5 programs of the smallest block (128 bytes): several programs under every config
    g = torch.randn(numel, generator=gen).to(device)
    m, b = torch.zeros(numel, device=device), torch.zeros(numel, device=device)
    starts, canon = chunk([3000, 2000], [2000, 0], device=device)
    flag = torch.zeros(1, dtype=torch.uint8, device=device)
    bits = op["compress"](g, m, b, starts, canon, beta=0.9, seed=3, flag=flag)
    counts = torch.randint(0, 6, (numel,), generator=gen, dtype=torch.int32).to(device)
    rows = torch.randint(0, 256, (5, numel // 8), generator=gen, dtype=torch.uint8).to(device)
    planes = op["pack_counts"](counts, 3)
    xs = [torch.randn(n, generator=gen).to(device, torch.bfloat16) for n in (3000, 2000)]
    op["apply_packed_"](xs, starts, canon, rows, planes=False, num_rows=5, lr_P=torch.full((2,), 0.1, device=device),
                        wd_P=torch.full((2,), 0.01, device=device))
    x = torch.randn(numel, generator=gen).to(device)
    op["apply_update_"](x, g, lr=0.1, weight_decay=0.01)
    return [bits, m, b, flag, op["requantize"](counts, 5, starts, canon, 0, seed=2), op["unpack_counts"](rows, numel),
            op["unpack_mean"](rows, numel), planes, op["unpack_planes"](planes, numel), *xs, x]


def test_every_config_gives_the_same_bits(launch_layer, monkeypatch):
    want = _every_op()
    for config in launch_layer.byte_block_configs():
        if config == launch_layer.DEFAULT:
            continue
        monkeypatch.setattr(launch_layer, "DEFAULT", config)
        with launch_layer.record() as launches:
            got = _every_op()
        assert {entry.config for entry in launches} == {config}
        assert all(torch.equal(a, b) for a, b in zip(got, want)), config


@pytest.fixture
def tuner(launch_layer, monkeypatch):
    """The launch layer with tuning enabled (as on a GPU) and a fake, recording benchmark."""
    calls, timed = [], threading.local()
    chosen = launch_layer.Config(512, 4)
    real_run = launch_layer._run

    def run(kernel, config, *args):  # tells the fake benchmark which config it times; runs only real launches
        timed.config = config
        if not getattr(timed, "benchmarking", False):
            real_run(kernel, config, *args)

    def bench(fn):  # config (512, 4) is the fastest
        calls.append(threading.current_thread().name)
        timed.benchmarking = True
        try:
            fn()
        finally:
            timed.benchmarking = False
        return 1.0 if timed.config == chosen else 2.0

    monkeypatch.setattr(launch_layer, "autotune_enabled", lambda: True)
    monkeypatch.setattr(launch_layer, "_benchmark", bench)
    monkeypatch.setattr(launch_layer, "_run", run)
    launch_layer.calls, launch_layer.chosen = calls, chosen
    return launch_layer


def test_a_miss_runs_the_default_and_is_tuned_later_on_dummies(tuner):
    g = torch.randn(3000, device=DEVICE)
    m, b = torch.zeros(3000, device=DEVICE), torch.zeros(3000, device=DEVICE)
    starts, canon = chunk([3000], device=DEVICE)
    m_want, b_want = m.clone(), b.clone()
    ref.compress(g, m_want, b_want, starts, canon, beta=0.9, seed=1)
    with tuner.record() as launches:
        _triton("compress")(g, m, b, starts, canon, beta=0.9, seed=1)
    assert tuner.calls == [] and launches[0].config == tuner.DEFAULT  # no benchmark on the launching thread
    assert torch.equal(m, m_want) and torch.equal(b, b_want)  # the real state moved once
    assert [key[0] for key in tuner.missed_keys()] == ["_compress_kernel"]
    assert tuner.tune_missed() == 1
    assert len(tuner.calls) == len(tuner.byte_block_configs()) and tuner.missed_keys() == []
    assert torch.equal(m, m_want) and torch.equal(b, b_want)  # tuning ran on dummies
    with tuner.record() as launches:
        _triton("compress")(g, m, b, starts, canon, beta=0.9, seed=2)
    assert launches[0].config == tuner.chosen and launches[0].key in tuner.tuned_keys()


def _triton(name):
    from dist_supernet.kernels.registry import implementation

    return implementation(name, "triton")


def test_every_warm_closure_replays_its_own_key(tuner):
    with tuner.record() as launches:
        _every_op()
    keys = {entry.key for entry in launches}
    assert set(tuner.missed_keys()) == keys and len(keys) == 8
    assert tuner.tune_missed() == 8  # an error is logged and the key dropped if a closure missed its key
    assert set(tuner.tuned_keys()) == keys and all(c == tuner.chosen for c in tuner.tuned_keys().values())


def test_switch_off_never_benchmarks(tuner, monkeypatch):
    monkeypatch.setattr(tuner, "autotune_enabled", lambda: False)
    with kernels.tuning(), tuner.record() as launches:
        _every_op()
    assert tuner.calls == [] and tuner.missed_keys() == [] and {e.config for e in launches} == {tuner.DEFAULT}


def test_autotune_switch_reads_the_environment(launch_layer, monkeypatch):
    monkeypatch.setattr(launch_layer, "interpreting", lambda: False)
    for value, enabled in (("0", False), ("off", False), ("1", True), ("", True)):
        monkeypatch.setenv(launch_layer.AUTOTUNE_ENV, value)
        assert launch_layer.autotune_enabled() is enabled
    monkeypatch.setattr(launch_layer, "interpreting", lambda: True)
    monkeypatch.setenv(launch_layer.AUTOTUNE_ENV, "1")
    assert launch_layer.autotune_enabled() is False


def test_tuning_is_serialized_and_never_blocks_other_launches(tuner, monkeypatch):
    # The interpreter itself is not thread-safe, so the kernels are stubbed: what is checked is the
    # launch layer's own state (a compiled launch keeps none).
    benchmarking, most, runs = [0], [0], []
    release = threading.Event()

    def bench(fn):
        benchmarking[0] += 1
        most[0] = max(most[0], benchmarking[0])
        release.wait(5)  # hold the tuning while the plain launch below runs
        fn()
        benchmarking[0] -= 1
        return 1.0

    monkeypatch.setattr(tuner, "_benchmark", bench)
    monkeypatch.setattr(tuner, "_run", lambda kernel, config, *args: runs.append((threading.current_thread().name,
                                                                                   config)))
    kernel = type("K", (), {"__name__": "_stub_kernel"})()

    def tune():
        with kernels.tuning():
            tuner.launch(kernel, 1000, (), device="cpu")

    tuners = [threading.Thread(target=tune, name=f"tune{i}") for i in range(2)]
    for thread in tuners:
        thread.start()
    plain = threading.Thread(target=lambda: tuner.launch(kernel, 1000, (), device="cpu", warm=lambda: None),
                             name="plain")
    plain.start()
    plain.join(5)
    assert not plain.is_alive()  # not blocked by the tuning in progress
    release.set()
    for thread in tuners:
        thread.join(10)
    assert most[0] == 1  # one benchmark at a time
    assert sum(1 for name, _ in runs if name.startswith("tune")) == len(tuner.byte_block_configs()) + 2
    assert ("plain", tuner.DEFAULT) in runs and len(tuner.tuned_keys()) == 1


def test_launches_enter_the_tensors_device(launch_layer, monkeypatch):
    entered = []
    real_guard = launch_layer.device_guard

    def guard(device):
        entered.append(device)
        return real_guard(device)

    monkeypatch.setattr(launch_layer, "device_guard", guard)
    _every_op()
    assert len(entered) >= 8 and set(entered) == {torch.device(DEVICE)}
    cuda_guard = real_guard(torch.device("cuda", 3))
    assert isinstance(cuda_guard, torch.cuda.device) and cuda_guard.idx == 3
