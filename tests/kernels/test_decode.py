"""pack_bits, unpack_counts, unpack_mean, counts_to_mean, pack_counts, unpack_planes on every backend."""

import pytest
import torch

from dist_supernet.kernels import reference as ref

ODD_SIZES = [0, 1, 31, 33, 4097]


def _rows(num_rows, numel, device, extra_bytes=0):
    return torch.randint(0, 256, (num_rows, ref.num_bytes(numel) + extra_bytes), dtype=torch.uint8, device=device)


@pytest.mark.parametrize("numel", ODD_SIZES)
def test_pack_bits(backend, numel):
    bits = torch.rand(numel + 3, device=backend.device) < 0.5
    for view in (bits[:numel], bits[3:]):  # an offset view too
        assert torch.equal(backend.pack_bits(view), ref.pack_bits(view.cpu()).to(backend.device))
        assert torch.equal(ref.unpack_bits(backend.pack_bits(view), view.numel()).bool(), view)


@pytest.mark.parametrize("numel", ODD_SIZES)
@pytest.mark.parametrize("num_rows", [1, 3, 8, 300])
def test_counts_and_mean(backend, numel, num_rows):
    if num_rows == 300 and backend.name == "triton":
        pytest.skip("300 rows test numba's 255-row lane flush; the interpreter takes 1-2 s per case for it")
    device = backend.device
    rows = _rows(num_rows, numel, device, extra_bytes=2)  # rows wider than ceil(D / 8)
    counts = backend.unpack_counts(rows, numel)
    assert counts.dtype == torch.int32
    assert torch.equal(counts, ref.unpack_bits(rows, numel).sum(0, dtype=torch.int32))
    mask = torch.rand(numel, device=device) < 0.5
    want = (counts * 2 - num_rows).float() / num_rows
    assert torch.equal(backend.unpack_mean(rows, numel), want)
    assert torch.equal(backend.unpack_mean(rows, numel, mask=mask), torch.where(mask, want, torch.zeros_like(want)))
    assert torch.equal(backend.counts_to_mean(counts, num_rows), want)
    assert torch.equal(backend.counts_to_mean(counts.long(), num_rows, mask=mask), torch.where(mask, want, 0 * want))


def test_all_zero_all_one_and_strided_rows(backend):
    device, numel = backend.device, 45
    ones = torch.stack([ref.pack_bits(torch.ones(numel, dtype=torch.bool, device=device))] * 5)
    assert torch.equal(backend.unpack_counts(ones, numel), torch.full((numel,), 5, dtype=torch.int32, device=device))
    assert torch.equal(backend.unpack_mean(torch.zeros_like(ones), numel), -torch.ones(numel, device=device))
    wide = _rows(6, 64 * 8, device)
    every_other = wide[::2]
    assert torch.equal(backend.unpack_counts(every_other, numel), ref.unpack_counts(every_other, numel))


@pytest.mark.parametrize("numel", ODD_SIZES)
@pytest.mark.parametrize("num_rows", [1, 7, 255, 1000])
def test_pack_counts_and_unpack_planes(backend, numel, num_rows):
    device = backend.device
    num_planes = ref.count_bits(num_rows)
    counts = torch.randint(0, num_rows + 1, (numel,), dtype=torch.int32, device=device)
    counts[: min(2, numel)] = torch.tensor([0, num_rows], dtype=torch.int32, device=device)[: min(2, numel)]
    planes = backend.pack_counts(counts, num_planes)
    assert planes.shape == (num_planes, ref.num_bytes(numel)) and planes.dtype == torch.uint8
    assert torch.equal(planes, ref.pack_counts(counts.cpu(), num_planes).to(device))
    assert torch.equal(backend.pack_counts(counts.long(), num_planes), planes)
    assert torch.equal(backend.unpack_planes(planes, numel), counts)
    batched = torch.stack([planes, torch.roll(planes, 1, dims=0)]).unsqueeze(0)
    assert torch.equal(backend.unpack_planes(batched, numel), ref.unpack_planes(batched, numel))


def test_empty_and_errors(backend):
    device = backend.device
    assert backend.unpack_mean(torch.zeros((3, 0), dtype=torch.uint8, device=device), 0).shape == (0,)
    assert backend.unpack_counts(torch.zeros((3, 0), dtype=torch.uint8, device=device), 0).dtype == torch.int32
    assert backend.pack_counts(torch.empty(0, dtype=torch.int32, device=device), 3).shape == (3, 0)
    assert backend.pack_counts(torch.ones(9, dtype=torch.int32, device=device), 0).shape == (0, 2)
    assert backend.unpack_planes(torch.empty((2, 3, 0), dtype=torch.uint8, device=device), 0).shape == (2, 0)
    if backend.name != "torch":  # the reference does not validate its decoders' shapes
        with pytest.raises(ValueError, match="too few"):
            backend.unpack_mean(torch.zeros((2, 1), dtype=torch.uint8, device=device), 9)
        with pytest.raises(ValueError, match="integer"):
            backend.pack_counts(torch.zeros(4, device=device), 2)


def test_out_buffers(backend):
    device, numel, num_rows = backend.device, 1001, 3
    rows = _rows(num_rows, numel, device)
    counts = ref.unpack_counts(rows, numel)
    planes = ref.pack_counts(counts, 2)
    for fn, args, dtype, shape in (
        (backend.unpack_counts, (rows, numel), torch.int32, (numel,)),
        (backend.unpack_mean, (rows, numel), torch.float32, (numel,)),
        (backend.counts_to_mean, (counts, num_rows), torch.float32, (numel,)),
        (backend.unpack_planes, (torch.stack([planes, planes]), numel), torch.int32, (2, numel)),
    ):
        out = torch.full(shape, 7, dtype=dtype, device=device)
        assert fn(*args, out=out) is out
        assert torch.equal(out, fn(*args))
        with pytest.raises(ValueError, match="out shape"):
            fn(*args, out=torch.empty(numel + 1, dtype=dtype, device=device))
        with pytest.raises(ValueError, match="out shape"):
            fn(*args, out=torch.empty(shape, dtype=torch.float64, device=device))
