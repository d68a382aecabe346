"""Launch helpers shared by the Triton kernels of this package (no kernel here).

Once for every kernel: its autotune decorator (:func:`byte_blocked`), its launch
(:func:`launch_bytes`: grid, autotune key, compile options), a program's tile of bytes
and elements (:func:`byte_tile`) and the argument checks; each kernel file keeps its
kernel, with a comment per kernel argument, and its launcher ``x()``.

Block sizes: every kernel here is memory-bandwidth bound and works on whole bytes of the
packed output (8 elements per byte), so one tuning knob, BLOCK_BYTES, plus num_warps, covers
them all. The default below (1024 bytes = 8192 elements per program, 8 warps) was NOT
measured on a GPU: no GPU was available when these kernels were written, so on CUDA
``triton.autotune`` picks among ``byte_block_configs()`` per size class, ahead of the first
step when :func:`autotune_warmup` is called (``kernels.warmup``), and under the CPU
interpreter (TRITON_INTERPRET=1) the default is used without tuning, because large blocks
keep the interpreter fast (it pays per program, not per element).

Rounding: every launch passes ``enable_fp_fusion=False`` (:data:`LAUNCH_OPTIONS`), so the
compiler does not contract ``a * b + c`` into an fma: m, b and x round as the contract in
:mod:`dist_supernet.kernels.reference` says (issue 11: with fusion on, m and b differed at 4097 elements).
"""

import os

import torch
import triton
import triton.language as tl

DEFAULT_BLOCK_BYTES = 1024  # unmeasured on GPU, see the module docstring
DEFAULT_NUM_WARPS = 8  # unmeasured on GPU, see the module docstring
MAX_NUMEL = 2**31 - 1  # chunk-local offsets are int32 in the kernels; canonical indices are int64
LAUNCH_OPTIONS = {"enable_fp_fusion": False}  # no fma contraction: the contract's rounding


def byte_block_configs() -> list:
    """Autotune space for the byte-blocked kernels: BLOCK_BYTES x num_warps."""
    return [
        triton.Config({"BLOCK_BYTES": block_bytes}, num_warps=num_warps)
        for block_bytes in (128, 256, 512, 1024)
        for num_warps in (4, 8)
    ]


@triton.jit
def byte_tile(numel, BLOCK_BYTES: tl.constexpr):
    """This program's BLOCK_BYTES bytes and their [BLOCK_BYTES, 8] elements (row = byte, column = bit, LSB first).

    Returns (byte, bit, offsets, in_range, byte_in_range): element 8 * byte + bit is in range below
    numel, a byte when it holds at least one element. Offsets are int32 (numel <= MAX_NUMEL).
    """
    byte = tl.program_id(0) * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    bit = tl.arange(0, 8)
    offsets = byte[:, None] * 8 + bit[None, :]
    return byte, bit, offsets, offsets < numel, byte * 8 < numel


def byte_blocked(restore_value=None):
    """``@triton.autotune`` of every byte-blocked kernel here: BLOCK_BYTES x num_warps per size class.

    The kernel takes ``size_class`` (the autotune key, its last runtime argument) and the
    constexpr ``BLOCK_BYTES``; under the interpreter only the default config runs.
    restore_value names the pointers the kernel updates in place: tuning runs it several times
    and restores them in between.

    Example::
        >>> @byte_blocked(restore_value=["x_ptr"])
        ... @triton.jit
        ... def _x_kernel(x_ptr, numel, size_class, BLOCK_BYTES: tl.constexpr): ...
    """
    return triton.autotune(
        configs=byte_block_configs(),
        key=["size_class"],
        prune_configs_by={"early_config_prune": keep_default_when_interpreting},
        restore_value=restore_value,
    )


def launch_bytes(kernel, numel: int, *args, num_batch: int | None = None, **constexprs) -> None:
    """``kernel[grid](*args, size_class(numel), **constexprs)`` over the ceil(numel / 8) bytes of numel elements.

    Grid: one program per BLOCK_BYTES bytes (8 elements each) on axis 0, num_batch on axis 1
    when given. Compiled with :data:`LAUNCH_OPTIONS` (no fma contraction).

    Example::
        >>> launch_bytes(_pack_counts_kernel, numel, counts, planes, numel, num_bytes, num_planes)
    """
    num_bytes = (int(numel) + 7) // 8
    batch = () if num_batch is None else (int(num_batch),)
    grid = lambda meta: (triton.cdiv(num_bytes, meta["BLOCK_BYTES"]), *batch)  # noqa: E731
    kernel[grid](*args, size_class(numel), **constexprs, **LAUNCH_OPTIONS)


def as_counts(counts: torch.Tensor) -> torch.Tensor:
    """A flat contiguous int32/int64 view of integer counts (other integer dtypes cast to int32)."""
    flat = counts.reshape(-1).contiguous()
    return flat if flat.dtype in (torch.int32, torch.int64) else flat.to(torch.int32)


def interpreting() -> bool:
    """Whether Triton runs in its CPU interpreter (``triton.knobs`` exists from Triton 3.3 only)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def keep_default_when_interpreting(configs, named_args, **kwargs):
    """``early_config_prune`` hook: one config under the interpreter, so nothing is benchmarked."""
    if not interpreting():
        return configs
    default = [
        config
        for config in configs
        if config.kwargs["BLOCK_BYTES"] == DEFAULT_BLOCK_BYTES and config.num_warps == DEFAULT_NUM_WARPS
    ]
    return default or configs[-1:]


def size_class(numel: int) -> int:
    """Autotune key: ceil(log2(numel)), so buckets of similar size share one tuning run."""
    return max(int(numel) - 1, 0).bit_length()


def search_steps(num_segments: int) -> int:
    """Binary-search steps that find any element's segment among num_segments: ceil(log2(P))."""
    return max(int(num_segments) - 1, 0).bit_length()


def seed_halves(seed: int) -> tuple[int, int]:
    """The low and high 32 bits of a 64-bit seed, each as the int32 with the same bits."""
    halves = []
    for value in (int(seed) & 0xFFFFFFFF, (int(seed) >> 32) & 0xFFFFFFFF):
        halves.append(value - (1 << 32) if value >= (1 << 31) else value)
    return halves[0], halves[1]


def check_numel(numel: int) -> None:
    if numel > MAX_NUMEL:
        raise ValueError(f"numel={numel}: the Triton kernels take at most {MAX_NUMEL} elements per chunk")


def check_same_numel(name: str, tensor: torch.Tensor, numel: int) -> None:
    if tensor.numel() != numel:
        raise ValueError(f"{name} has {tensor.numel()} elements, expected {numel}")


def mask_bytes(mask: torch.Tensor | None, numel: int | None = None) -> torch.Tensor | None:
    """A bool/uint8 mask as a flat contiguous uint8 view (Triton loads uint8 portably; bool is 1 byte)."""
    if mask is None:
        return None
    if mask.dtype not in (torch.bool, torch.uint8):
        raise ValueError(f"mask dtype={mask.dtype}: expected torch.bool or torch.uint8")
    if numel is not None:
        check_same_numel("mask", mask, numel)
    flat = mask.reshape(-1).contiguous()
    return flat.view(torch.uint8) if flat.dtype == torch.bool else flat


def check_inplace(name: str, tensor: torch.Tensor, numel: int | None = None) -> None:
    """State updated in place must be flat-addressable: a copy would silently drop the update."""
    if numel is not None:
        check_same_numel(name, tensor, numel)
    if not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous: it is updated in place")


def autotune_warmup(bucket_numels, device, *, num_rows: int = 2, chunk_numels=()) -> None:
    """Run the autotuner of every kernel on dummy tensors of the real sizes, before the first step.

    bucket_numels: the element counts of the chunks that compress and apply_packed_ will see
    (DDP's buckets); chunk_numels: those of the collective's chunks (requantize, pack_counts,
    unpack_planes; default: each bucket split over num_rows ranks). Tuning results are cached
    per size class (ceil(log2(numel))) and dtype, so the first backward does not benchmark
    configs on the comm thread while collectives are in flight. A no-op under the interpreter
    (which runs one fixed config).

    Example::
        >>> autotune_warmup([25_000_000, 3_000_000], "cuda", num_rows=8)
    """
    if interpreting():
        return
    warm_calls(bucket_numels, device, num_rows=num_rows, chunk_numels=chunk_numels)


def warm_calls(bucket_numels, device, *, num_rows: int = 2, chunk_numels=()) -> None:
    """The launches autotune_warmup makes: every kernel once per size, on dummy tensors (zeros)."""
    from dist_supernet.kernels.ops import apply_packed, compress, pack_counts, requantize, unpack_counts, unpack_mean, unpack_planes

    device = torch.device(device)
    num_planes = max(1, int(num_rows).bit_length())
    chunk_numels = list(chunk_numels) or [-(-int(n) // num_rows) for n in bucket_numels]
    for numel in sorted({int(n) for n in bucket_numels if int(n) > 0}):
        g = torch.zeros(numel, device=device)
        starts = torch.tensor([0, numel], dtype=torch.int64, device=device)
        canon = torch.zeros(1, dtype=torch.int64, device=device)
        compress.compress(g, torch.zeros_like(g), torch.zeros_like(g), starts, canon, beta=0.9, seed=0)
        rows = torch.zeros((num_rows, (numel + 7) // 8), dtype=torch.uint8, device=device)
        unpack_mean.unpack_mean(rows, numel)
        unpack_counts.unpack_counts(rows, numel)
        one = torch.ones(1, device=device)
        apply_packed.apply_packed_([g], starts, canon, rows, planes=False, num_rows=num_rows, lr_P=one, wd_P=one)
        del g, rows
    for numel in sorted({int(n) for n in chunk_numels if int(n) > 0}):
        counts = torch.zeros(numel, dtype=torch.int32, device=device)
        starts = torch.tensor([0, numel], dtype=torch.int64, device=device)
        canon = torch.zeros(1, dtype=torch.int64, device=device)
        requantize.requantize(counts, num_rows, starts, canon, 0, seed=0)
        planes = pack_counts.pack_counts(counts, num_planes)
        unpack_planes.unpack_planes(planes, numel)
