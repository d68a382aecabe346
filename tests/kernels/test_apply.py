"""apply_update_ and the chunk-wise apply_packed_ on every backend: exact values, masks, formats, dtypes."""

import pytest
import torch

from dist_supernet.kernels import reference as ref

from .conftest import chunk

ODD_SIZES = [0, 1, 31, 33, 4097]


@pytest.mark.parametrize("numel", ODD_SIZES)
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_apply_update_exact(compiled, numel, weight_decay):
    device = compiled.device
    x = torch.randn(numel, device=device)
    update = torch.randn(numel, device=device)
    mask = torch.rand(numel, device=device) < 0.5
    for kwargs in (dict(), dict(mask=mask)):
        x_c, x_r = x.clone(), x.clone()
        assert compiled.apply_update_(x_c, update, lr=0.01, weight_decay=weight_decay, **kwargs) is x_c
        ref.apply_update_(x_r, update, lr=0.01, weight_decay=weight_decay, **kwargs)
        assert torch.equal(x_c, x_r)


def test_apply_update_mask_and_formats(backend):
    device = backend.device
    x = torch.randn(4, 6, 3, 5, device=device).to(memory_format=torch.channels_last)
    update = torch.randn(4, 6, 3, 5, device=device)
    mask = torch.rand(4, 6, 3, 5, device=device) < 0.5
    x0 = x.clone()
    backend.apply_update_(x, update, lr=0.1, weight_decay=0.1, mask=mask)
    assert torch.equal(x[~mask], x0[~mask])  # masks apply to logical elements (channels_last too)
    want = (x0 - 0.1 * (update + 0.1 * x0))[mask]
    torch.testing.assert_close(x[mask], want, rtol=1e-6, atol=1e-7)  # want rounds 0.1 in fp64 scalars
    for dtype in (torch.bfloat16, torch.float16):
        x_h = torch.randn(77, device=device).to(dtype)
        x_r = x_h.clone()
        backend.apply_update_(x_h, update.reshape(-1)[:77], lr=0.01, weight_decay=0.05)
        ref.apply_update_(x_r, update.reshape(-1)[:77], lr=0.01, weight_decay=0.05)
        assert x_h.dtype == dtype and torch.equal(x_h, x_r)


def _payload(planes, numel, num_rows, device):
    if planes:
        row_bytes = 24  # C = 192 elements per chunk row: blocks and segments cross rows
        num_chunk_rows = max(1, -(-numel // (row_bytes * 8)))
        num_planes = ref.count_bits(num_rows)
        counts = torch.randint(0, num_rows + 1, (num_chunk_rows, row_bytes * 8), dtype=torch.int32)
        return torch.stack([ref.pack_counts(c, num_planes) for c in counts]).to(device)
    return torch.randint(0, 256, (num_rows, ref.num_bytes(numel) + 1), dtype=torch.uint8, device=device)


def _params(numels, device, *, formats=False):
    xs = [torch.randn(n, device=device) for n in numels]
    if formats:  # a bf16 parameter, a channels_last one, a transposed one
        xs[0] = xs[0].to(torch.bfloat16)
        xs[2] = torch.randn(3, 4, 2, 5, device=device).to(memory_format=torch.channels_last)
        xs[3] = torch.randn(41, 2, device=device).t()
    return xs


@pytest.mark.parametrize("planes", [False, True])
@pytest.mark.parametrize("masks", [False, True])
@pytest.mark.parametrize("formats", [False, True])
def test_apply_packed_exact(compiled, planes, masks, formats):
    device = compiled.device
    numels = [4097, 0, 120, 82, 31, 1]
    canon_starts = [2**32 - 4000, 7, 3, 200, 2**32 + 97, 2**32 + 200]  # one crosses 2**32
    offset, total = 3, 2**32 + 300
    num_rows = 5 if not planes else 6
    numel = sum(numels)
    payload = _payload(planes, numel, num_rows, device)
    starts, canon = chunk(numels, canon_starts, device=device)
    kwargs = dict(planes=planes, num_rows=num_rows, lr_P=torch.rand(6, device=device) * 0.1,
                  wd_P=torch.rand(6, device=device) * 0.1)
    if masks:
        # state_offset: the mask covers canonical [offset, total) without allocating 2**32 entries
        span = 400
        mask_T = torch.zeros(span + 4000 + 300, dtype=torch.bool, device=device)
        kwargs.update(mask_T=torch.rand(mask_T.numel(), device=device) < 0.6,
                      used_P=torch.tensor([1, 1, 1, 0, 1, 1], dtype=torch.uint8, device=device),
                      state_offset=2**32 - 4400)
        canon_starts = [2**32 - 4000, 2**32 - 4400, 2**32 - 4390, 2**32 - 4200, 2**32 + 97, 2**32 + 200]
        starts, canon = chunk(numels, canon_starts, device=device)
    del offset, total
    xs = _params(numels, device, formats=formats)
    ys = [x.clone() for x in xs]
    compiled.apply_packed_(xs, starts, canon, payload, **kwargs)
    ref.apply_packed_(ys, starts, canon, payload, **kwargs)
    for x, y in zip(xs, ys):
        assert x.dtype == y.dtype and x.stride() == y.stride()
        assert torch.equal(x, y)


def test_apply_packed_moves_only_active(backend):
    device = backend.device
    numels = [50, 0, 30]
    starts, canon = chunk(numels, [0, 50, 50], device=device)
    rows = torch.stack([ref.pack_bits(torch.rand(80, device=device) < 0.5) for _ in range(3)])
    mask_T = torch.rand(80, device=device) < 0.5
    used_P = torch.tensor([1, 1, 0], dtype=torch.uint8, device=device)
    xs = [torch.randn(n, device=device) for n in numels]
    x0 = [x.clone() for x in xs]
    backend.apply_packed_(xs, starts, canon, rows, planes=False, num_rows=3, lr_P=torch.full((3,), 0.5, device=device),
                          wd_P=torch.zeros(3, device=device), mask_T=mask_T, used_P=used_P)
    assert torch.equal(xs[2], x0[2])  # unused segment
    mean = ref.unpack_mean(rows, 50)
    assert torch.equal(xs[0][~mask_T[:50]], x0[0][~mask_T[:50]])
    assert torch.equal(xs[0][mask_T[:50]], (x0[0] - 0.5 * mean)[mask_T[:50]])


def test_apply_packed_errors_and_empty(backend):
    device = backend.device
    starts, canon = chunk([5, 3], device=device)
    xs = [torch.zeros(5, device=device), torch.zeros(3, device=device)]
    lr = torch.zeros(2, device=device)
    with pytest.raises(ValueError, match="too few"):
        backend.apply_packed_(xs, starts, canon, torch.zeros((2, 0), dtype=torch.uint8, device=device), planes=False,
                              num_rows=2, lr_P=lr, wd_P=lr)
    with pytest.raises(ValueError, match="planes=True"):
        backend.apply_packed_(xs, starts, canon, torch.zeros((2, 1), dtype=torch.uint8, device=device), planes=True,
                              num_rows=2, lr_P=lr, wd_P=lr)
    with pytest.raises(ValueError, match="one per segment"):
        backend.apply_packed_(xs[:1], starts, canon, torch.zeros((2, 1), dtype=torch.uint8, device=device),
                              planes=False, num_rows=2, lr_P=lr, wd_P=lr)
    empty_starts, empty_canon = chunk([0], device=device)
    backend.apply_packed_([torch.zeros(0, device=device)], empty_starts, empty_canon,
                          torch.zeros((2, 0), dtype=torch.uint8, device=device), planes=False, num_rows=2,
                          lr_P=lr[:1], wd_P=lr[:1])


def test_warmup_launches_on_dummies_of_each_size():
    # kernels.warmup on the Triton backend: compress and apply_packed_ at each size inside kernels.tuning()
    # (on CUDA each key is tuned; under the interpreter the default config runs).
    from dist_supernet import kernels

    if not kernels.triton_available():
        pytest.skip("triton is not importable")
    from dist_supernet.kernels.ops import _launch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    previous = kernels.get_backend()
    kernels.set_backend("triton")
    try:
        with _launch.record() as launches:
            kernels.warmup(device, [1000, 37, 1000])
    finally:
        kernels.set_backend(previous)
    assert [(e.kernel, e.key[2], e.tuning) for e in launches] == [
        ("_compress_kernel", 6, True), ("_apply_packed_kernel", 6, True),
        ("_compress_kernel", 10, True), ("_apply_packed_kernel", 10, True)]
