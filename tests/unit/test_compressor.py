"""BirderCompressor without processes: canonical layout, index maps, no 2**31 cap, chunk cache."""

import torch

from dist_supernet import kernels
from dist_supernet.optim import BirderCompressor


def test_more_than_2_pow_31_elements_build_without_allocating():
    # Meta tensors: shapes without memory. The index map is int64, so offsets past 2**31 are exact.
    params = [torch.nn.Parameter(torch.empty(2**31 + 5, device="meta")), torch.nn.Parameter(torch.empty(3, 7, device="meta"))]
    comp = BirderCompressor(params, beta=0.9)
    assert comp.numel_total == 2**31 + 5 + 21
    assert comp.m.device.type == "meta" and comp.m.numel() == comp.numel_total
    chunk = comp.chunk([params[1], params[0]])  # DDP's order: reversed
    assert chunk.seg_canon.dtype == torch.int64
    assert chunk.seg_canon.tolist() == [2**31 + 5, 0]
    assert chunk.seg_starts.tolist() == [0, 21, 21 + 2**31 + 5]
    assert comp.views(params[1])["m"].shape == (3, 7)


def test_draws_past_2_pow_32_follow_the_canonical_index():
    # A chunk of 40 elements whose parameter starts at canonical index 2**32 + 7: the re-quantisation
    # draws equal uniform() at those 64-bit indices (the kernels' hash takes the high half too).
    first = 2**32 + 7
    seg_starts, seg_canon = torch.tensor([0, 40]), torch.tensor([first])
    counts = torch.arange(40, dtype=torch.int32) % 5
    bits = kernels.requantize(counts, 4, seg_starts, seg_canon, 0, seed=11)
    u = kernels.uniform(torch.arange(first, first + 40, dtype=torch.int64), 11)
    expected = kernels.pack_bits(u < counts.to(torch.float32) / 4)
    assert torch.equal(bits, expected)
    low = kernels.uniform(torch.arange(7, 47, dtype=torch.int64), 11)
    assert not torch.equal(u, low)  # the high half enters the hash


def test_chunk_cache_follows_a_bucket_rebuild_and_state_stays_by_canonical_index():
    params = [torch.nn.Parameter(torch.randn(n)) for n in (5, 3, 8)]
    comp = BirderCompressor(params, beta=0.5)
    first = comp.chunk(params[::-1])
    assert comp.chunk(params[::-1]) is first  # cached
    g = torch.cat([torch.full((8,), 2.0), torch.full((3,), -1.0), torch.full((5,), 4.0)])
    comp.compress(g, first)
    m_after = comp.m.clone()
    # DDP rebuilds its buckets: a new grouping of the same parameters; the old chunk is dropped.
    rebuilt = [comp.chunk([params[0], params[1]]), comp.chunk([params[2]])]
    assert all(c is not first for c in comp._chunks.values()) and len(comp._chunks) == 2
    assert rebuilt[0].seg_canon.tolist() == [0, 5] and rebuilt[1].seg_canon.tolist() == [8]
    # m is by canonical index: parameter 0 got 4.0, 1 got -1.0, 2 got 2.0 (times 1 - beta).
    assert torch.equal(m_after, torch.cat([torch.full((5,), 2.0), torch.full((3,), -0.5), torch.full((8,), 1.0)]))


def test_nonfinite_elements_never_enter_m_b_and_raise_the_flag():
    params = [torch.nn.Parameter(torch.zeros(16))]
    comp = BirderCompressor(params, beta=0.9)
    chunk = comp.chunk(params)
    g = torch.ones(16)
    g[3], g[9] = float("nan"), float("inf")
    flag = torch.zeros(1, dtype=torch.uint8)
    comp.compress(g, chunk, flag=flag)
    assert int(flag[0]) == 1
    assert comp.m[3] == 0 and comp.b[9] == 0
    finite = torch.ones(16, dtype=torch.bool)
    finite[[3, 9]] = False
    assert torch.allclose(comp.m[finite], torch.full((14,), 0.1)) and bool(torch.isfinite(comp.m).all())


def test_bucket_cap_keeps_each_peers_message_above_the_measured_knee():
    from dist_supernet.comm.collectives import MIN_PEER_BYTES, bucket_cap_mb

    for world in (2, 4, 16, 64, 128):
        cap_bytes = bucket_cap_mb(world) * 2**20
        assert cap_bytes // 4 // (8 * world) >= MIN_PEER_BYTES  # D / (8 n) bytes to each peer
        assert bucket_cap_mb(world) >= 25
    assert bucket_cap_mb(100_000) == 1024  # capped: past 128 ranks the floor is not kept (documented)


def test_pieces_are_byte_aligned_and_give_the_whole_chunks_bits_state_and_update():
    torch.manual_seed(0)
    shapes = [(37,), (0,), (5, 13), (2, 3, 4, 5), (1,), (129,)]
    params = [torch.nn.Parameter(torch.randn(*s)) for s in shapes]
    params[3].data = params[3].data.to(memory_format=torch.channels_last)  # chunk order = memory order
    initial = [p.detach().clone() for p in params]
    total = sum(p.numel() for p in params)
    g = torch.randn(total)
    g[50] = float("nan")
    mask = torch.rand(total) < 0.8
    used = torch.tensor([1, 0, 1, 1, 1, 0], dtype=torch.uint8)  # DDP's order below: params reversed
    results = {}
    for piece_numel in (10**6, 64, 8, 24):
        for p, x in zip(params, initial):
            p.data.copy_(x)
        comp = BirderCompressor(params, beta=0.9, seed=5)
        comp.step = 3
        chunk = comp.chunk(params[::-1])
        pieces = comp.split(chunk, piece_numel)
        assert len(pieces) == 1 or comp.split(chunk, piece_numel) is pieces  # cached with the chunk
        # The pieces tile the chunk in order, each starts at a multiple of 8 (byte-aligned bits).
        assert [p.start for p in pieces] == [sum(q.numel for q in pieces[:k]) for k in range(len(pieces))]
        assert sum(p.numel for p in pieces) == chunk.numel
        assert all(p.start % 8 == 0 and p.numel <= max(piece_numel, 8) for p in pieces[1:])
        flag = torch.zeros(1, dtype=torch.uint8)
        bits = []
        for piece in pieces:
            used_piece = used if piece.parent_params is None else used[piece.parent_params]
            bits.append(comp.compress(g[piece.start : piece.start + piece.numel], piece, mask_T=mask,
                                      used_P=used_piece, flag=flag))
        rows = torch.cat(bits).view(1, -1)
        for piece in pieces:  # the update, piece by piece, into views of the parameters
            lo, hi = piece.start, piece.start + piece.numel
            used_piece = used if piece.parent_params is None else used[piece.parent_params]
            num = len(piece.params)
            kernels.apply_packed_(piece.param_views(), piece.seg_starts, piece.seg_canon,
                                  rows[:, lo // 8 : -(-hi // 8)], planes=False, num_rows=1,
                                  lr_P=torch.full((num,), 0.5), wd_P=torch.full((num,), 0.1), mask_T=mask,
                                  used_P=used_piece)
        xs = [p.detach().clone() for p in params]
        results[piece_numel] = (rows, comp.m.clone(), comp.b.clone(), int(flag[0]), xs, len(pieces))
    whole = results[10**6]
    assert whole[5] == 1 and [results[n][5] for n in (64, 8, 24)] == [6, 44, 15]  # ceil(352 / n)
    # The update moved a used parameter and left the unused ones (used_P = 0) alone.
    assert not torch.equal(whole[4][5], initial[5]) and torch.equal(whole[4][0], initial[0])
    for piece_numel in (64, 8, 24):
        rows, m, b, flag, xs, _ = results[piece_numel]
        assert torch.equal(rows, whole[0]) and torch.equal(m, whole[1]) and torch.equal(b, whole[2])
        assert flag == whole[3] == 1
        assert all(torch.equal(x, y) for x, y in zip(xs, whole[4])), piece_numel
    assert params[3].is_contiguous(memory_format=torch.channels_last)


def test_a_compress_error_reaches_the_buckets_future_in_order():
    # The hook's pipeline: an error on the compress thread fails that bucket's future (DDP raises it in
    # backward) after the pieces already queued; the bucket is marked done so the last hook returns.
    import pytest

    from dist_supernet.optim.engine import Exchange, Round
    from dist_supernet.optim.hook import BirderState

    params = [torch.nn.Parameter(torch.randn(40))]
    state = BirderState(params, collective=None, piece_numel=16)
    chunk = state.compressor.chunk(params)
    calls = []

    def compress(grad_D, piece, **kwargs):
        calls.append(piece.start)
        if piece.start == 16:
            raise ValueError("compress failed on piece 2")
        return torch.zeros(2, dtype=torch.uint8)

    state.compressor.compress = compress
    bucket = Exchange(torch.futures.Future())
    round_ = Round(torch.device("cpu"))
    state.compress_pieces(torch.zeros(40), chunk, round_, bucket)
    assert bucket.done.wait(10)
    assert calls == [0, 16] and bucket.failed
    with pytest.raises(ValueError, match="compress failed on piece 2"):
        bucket.future.wait()
    assert len(round_.entries) == 1  # the piece before the error was reduced, in order
