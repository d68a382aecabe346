"""Launch helpers shared by the Triton kernels of this package (no kernel here).

Block sizes: every kernel here is memory-bandwidth bound and works on whole
bytes of the packed output (8 elements per byte), so one tuning knob,
BLOCK_BYTES, plus num_warps, covers them all. The default below (1024 bytes =
8192 elements per program, 8 warps) was NOT measured on a GPU: no GPU was
available when these kernels were written, so on CUDA ``triton.autotune``
picks among ``byte_block_configs()`` per size class, and under the CPU
interpreter (TRITON_INTERPRET=1) the default is used without tuning, because
large blocks keep the interpreter fast (it pays per program, not per element).
"""

import torch
import triton

DEFAULT_BLOCK_BYTES = 1024  # unmeasured on GPU, see the module docstring
DEFAULT_NUM_WARPS = 8  # unmeasured on GPU, see the module docstring
MAX_NUMEL = 2**31 - 1  # offsets and canonical indices are int32


def byte_block_configs() -> list:
    """Autotune space for the byte-blocked kernels: BLOCK_BYTES x num_warps."""
    return [
        triton.Config({"BLOCK_BYTES": block_bytes}, num_warps=num_warps)
        for block_bytes in (128, 256, 512, 1024)
        for num_warps in (4, 8)
    ]


def interpreting() -> bool:
    return bool(triton.knobs.runtime.interpret)


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


def seed_halves(seed: int) -> tuple[int, int]:
    """The low and high 32 bits of a 64-bit seed, each as the int32 with the same bits."""
    halves = []
    for value in (int(seed) & 0xFFFFFFFF, (int(seed) >> 32) & 0xFFFFFFFF):
        halves.append(value - (1 << 32) if value >= (1 << 31) else value)
    return halves[0], halves[1]


def check_numel(numel: int) -> None:
    if numel > MAX_NUMEL:
        raise ValueError(f"numel={numel}: the Triton kernels take at most {MAX_NUMEL} elements per call")


def check_same_numel(name: str, tensor: torch.Tensor, numel: int) -> None:
    if tensor.numel() != numel:
        raise ValueError(f"{name} has {tensor.numel()} elements, expected {numel}")


def mask_bytes(mask: torch.Tensor | None, numel: int) -> torch.Tensor | None:
    """A bool mask as a flat contiguous uint8 view (Triton loads uint8 portably; bool is stored 1 byte)."""
    if mask is None:
        return None
    if mask.dtype != torch.bool:
        raise ValueError(f"mask dtype={mask.dtype}: expected torch.bool")
    check_same_numel("mask", mask, numel)
    return mask.reshape(-1).contiguous().view(torch.uint8)


def check_inplace(name: str, tensor: torch.Tensor, numel: int) -> None:
    """State updated in place must be flat-addressable: a copy would silently drop the update."""
    check_same_numel(name, tensor, numel)
    if not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous: it is updated in place")
