"""The Triton launches Birder warms up at attach are exactly those DDP training then makes.

Runs the Triton kernels in the CPU interpreter on real gloo processes, with tuning switched on
and a fake benchmark (it times nothing): the keys (kernel, size class, dtypes, flags,
rows) launched inside the warm-up must equal the keys of three training steps, DDP's rebuilt
buckets of step 2 included; a key the prediction missed must be tuned by the next step, so from
step 3 on nothing runs untuned (a grad mask first set in step 2 is such a key); and tuning must
never run on the comm thread.
"""

import torch

from .harness import run_workers

INTERPRET = {"TRITON_INTERPRET": "1", "DIST_SUPERNET_KERNELS": "triton"}


def _warm_keys_worker(rank, world_size, variants):
    return [_warm_keys_run(rank, **variant) for variant in variants]


def _warm_keys_run(rank, collective, dtype_name, mask_from_step2=False, **birder_kwargs):
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    from dist_supernet import Birder, kernels
    from dist_supernet.kernels.ops import _launch

    dtype = getattr(torch, dtype_name)
    _launch.reset()
    _launch.autotune_enabled = lambda: True  # as on a GPU; the interpreter would never tune
    _launch._benchmark = lambda fn: 1.0  # nothing timed: the keys are what is checked
    torch.manual_seed(0)
    # uneven layers, so that DDP's buckets (one for step 1, 0.01 MB caps after) have several sizes
    model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.ReLU(), torch.nn.Linear(40, 70), torch.nn.ReLU(),
                                torch.nn.Linear(70, 5)).to(dtype)
    with _launch.record() as launches:
        ddp = DistributedDataParallel(model, bucket_cap_mb=0.01)
        opt = Birder(ddp, lr=1e-2, collective=collective, **birder_kwargs)
        attached = len(launches)
        gen = torch.Generator().manual_seed(rank)
        shared = torch.Generator().manual_seed(7)  # the grad mask must be the same on every rank
        steps = []
        for step in range(3):
            start = len(launches)
            if mask_from_step2 and step > 0:  # a mask the warm-up could not know of: tuned by tune_missed
                opt.set_grad_mask(torch.rand(sum(p.numel() for p in model.parameters()), generator=shared) < 0.9)
            x = torch.randn(8, 24, generator=gen).to(dtype)
            y = torch.randint(0, 5, (8,), generator=gen)
            F.cross_entropy(ddp(x).float(), y).backward()
            opt.step()
            opt.zero_grad()
            steps.append(launches[start:])
    warmed = {e.key for e in launches[:attached]}
    trained = [{e.key for e in step if not e.tuning} for step in steps]
    late = [{e.key for e in step if e.tuning} for step in steps]  # tuned by tune_missed in step()
    flat = torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])
    return {
        "warmed": warmed, "trained": trained, "late": late,
        "untuned_step3": [e.key for e in steps[2] if not e.tuning and e.config == _launch.DEFAULT
                          and e.key not in _launch.tuned_keys()],
        "tuning_threads": sorted({e.thread for e in launches if e.tuning}),
        "missed_at_end": _launch.missed_keys(), "backend": kernels.get_backend(), "params": flat.tolist(),
    }


VARIANTS = [
    # exact counts: unpack_counts, pack_counts, the apply of planes; fp32 buckets
    dict(collective="two_phase", dtype_name="float32", mask_from_step2=True),
    # re-quantized counts: requantize, the apply of one row; bf16 buckets and parameters
    dict(collective="two_phase", dtype_name="bfloat16", requantize=True),
]


def test_warmed_keys_are_the_trained_keys():
    # 2 processes for both variants (one spawn); hierarchical as 2 nodes x 2 runs in gpu_check on a GPU
    ranks = run_workers(_warm_keys_worker, 2, VARIANTS, env=INTERPRET, timeout_s=240)
    for v, variant in enumerate(VARIANTS):
        results = [runs[v] for runs in ranks]
        for result in results:
            assert result["backend"] == "triton"
            trained = set().union(*result["trained"])
            late = set().union(*result["late"])
            names = {key[0] for key in trained}
            assert {"_compress_kernel", "_apply_packed_kernel", "_unpack_counts_kernel"} <= names
            assert ("_requantize_kernel" if variant.get("requantize") else "_pack_counts_kernel") in names
            assert {key[3][0] for key in trained if key[0] == "_compress_kernel"} == {variant["dtype_name"]}
            if variant.get("mask_from_step2"):  # the mask's keys were unknown at attach: tuned late, by step()
                assert trained <= result["warmed"] | late
                assert late and all(dict(key[4]).get("HAS_MASK") for key in late)
            else:  # nothing warmed in vain, nothing trained cold
                diff = result["warmed"] ^ trained
                assert not diff and not late, sorted(diff)
            assert result["warmed"] >= result["trained"][0]  # step 1 (one bucket per dtype) was predicted
            assert result["untuned_step3"] == [] and result["missed_at_end"] == []
            assert result["tuning_threads"] == ["MainThread"]  # never on birder-comm / birder-compress
        assert all(results[0]["params"] == r["params"] for r in results[1:])  # replicas bit-identical
