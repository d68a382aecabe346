"""Shared pieces of the numba CPU kernels (no kernel here): the jit options and cache, the hash, threads.

Every kernel in this package is compiled with the same options, chosen for the contract in
:mod:`dist_supernet.kernels.reference`:

- ``fastmath=False``: LLVM may then neither contract ``a * b + c`` into an fma nor reorder
  sums, so m, b and x round exactly as the reference does (checked bit for bit by the tests);
- ``nogil=True``: the hook's worker thread compresses while backward runs in another thread;
- ``error_model="numpy"``: no Python ZeroDivisionError check in the loops (the kernels never
  divide by 0; where b <= 0 the ratio is not taken);
- ``cache=True``: compiled machine code is stored next to the source (``__pycache__``), or in
  the user's cache dir when that is read-only (numba's own fallback), so a machine compiles
  each kernel once per checkout, not once per process. When no cache location is writable at
  all, the kernels compile in memory for this process, with one warning. numba keys a cache
  entry on the kernel file's timestamp only, so a change to the shared helpers (this file,
  _bits.py) drops the package's cache at the next import (:func:`_drop_stale_cache`).

The threads a kernel uses are chosen by :func:`run_split`: at most ``torch.get_num_threads()``,
so two ranks under torchrun (OMP_NUM_THREADS=1) run one thread each.
"""

import concurrent.futures
import hashlib
import math
import pathlib
import threading
import warnings

import numba
import numpy as np
import torch
from numba import types
from numba.core import cgutils  # noqa: F401  (keeps numba's codegen helpers importable for the intrinsic)
from numba.extending import intrinsic

BLOCK = 4096  # elements per scratch block: 4 KiB of 0/1 bytes + 16 KiB of int32 counts stay in L1/L2
MIN_ELEMENTS_PER_THREAD = 1 << 18  # below this a thread costs more than it saves (~50 us to hand work over)
GATHER_BITS = np.uint64(0x0102040810204080)  # eight 0/1 bytes -> the top byte's 8 bits, see pack8
INV_2_24 = np.float32(1.0 / (1 << 24))
MUL_1 = np.uint32(0x7FEB352D)
MUL_2 = np.uint32(0x846CA68B)

_OPTIONS = dict(nogil=True, fastmath=False, error_model="numpy", boundscheck=False)
_warned_cache = threading.Event()
_HERE = pathlib.Path(__file__).resolve().parent
_HELPER_FILES = ("_common.py", "_bits.py", "_halves.py", "_hadamard.py")  # compiled into every kernel, invisible to numba's cache key


def _drop_stale_cache() -> None:
    """Delete this package's cached kernels when a helper file changed since they were compiled.

    numba keys a cached kernel on its own file's timestamp only; the inlined helpers here and in
    _bits.py would otherwise keep stale machine code after an edit. Best effort: a read-only
    tree keeps its cache (an installed package does not change without a reinstall).
    """
    cache_dir = _HERE / "__pycache__"
    digest = hashlib.sha256(b"".join((_HERE / name).read_bytes() for name in _HELPER_FILES)).hexdigest()
    stamp = cache_dir / "numba_helpers.sha256"
    try:
        if stamp.read_text() == digest:
            return
    except OSError:
        pass
    try:
        for stale in [*cache_dir.glob("*.nbi"), *cache_dir.glob("*.nbc")]:
            stale.unlink(missing_ok=True)
        cache_dir.mkdir(exist_ok=True)
        stamp.write_text(digest)
    except OSError:
        pass


_drop_stale_cache()


def kernel(fn):
    """njit with this package's options and on-disk cache; falls back to an in-memory compile."""
    try:
        return numba.njit(cache=True, **_OPTIONS)(fn)
    except RuntimeError as error:  # numba: "cannot cache function ...: no locator available"
        if not _warned_cache.is_set():
            _warned_cache.set()
            warnings.warn(f"kernels.cpu: no writable numba cache ({error}); compiling in memory for this process",
                          RuntimeWarning, stacklevel=2)
        return numba.njit(cache=False, **_OPTIONS)(fn)


def helper(fn):
    """An inlined helper of the kernels (compiled into each caller, cached with it)."""
    return numba.njit(inline="always", **_OPTIONS)(fn)


@helper
def mix32(x):
    # lowbias32. numba widens uint32 arithmetic to 64 bits: each step is cast back to
    # uint32 (measured: without the casts the products are 64-bit and the bits wrong).
    x = numba.uint32(x ^ (x >> numba.uint32(16)))
    x = numba.uint32(x * MUL_1)
    x = numba.uint32(x ^ (x >> numba.uint32(15)))
    x = numba.uint32(x * MUL_2)
    x = numba.uint32(x ^ (x >> numba.uint32(16)))
    return x


@helper
def uniform32(lo, seed_lo, seed_hi):
    """The draw for a canonical index whose high 32 bits are 0 (lo: its uint32 low half)."""
    x = mix32(numba.uint32(lo ^ seed_lo))
    x = mix32(numba.uint32(x ^ seed_hi))
    return np.float32(x >> numba.uint32(8)) * INV_2_24


@helper
def uniform64(index, seed_lo, seed_hi):
    """The draw for any int64 canonical index: the third round only where hi32(index) != 0."""
    lo = numba.uint32(index & 0xFFFFFFFF)
    hi = numba.uint32((index >> 32) & 0xFFFFFFFF)
    x = mix32(numba.uint32(lo ^ seed_lo))
    x = mix32(numba.uint32(x ^ seed_hi))
    if hi != 0:
        x = mix32(numba.uint32(x ^ hi))
    return np.float32(x >> numba.uint32(8)) * INV_2_24


@helper
def pack8(words, num_bytes, out, first_byte):
    """out[first_byte + k] = the 8 bits of the 8 0/1 bytes in words[k], k < num_bytes.

    One int64 multiply per output byte (see dist_supernet.kernels.reference.pack_bits): the loop stays
    vectorisable, unlike setting bits one by one (measured 4x slower in issue 9).
    """
    for k in range(num_bytes):
        out[first_byte + k] = numba.uint8((words[k] * GATHER_BITS) >> numba.uint64(56))


@helper
def segment_of(seg_starts, j):
    """The last segment s with seg_starts[s] <= j (so the non-empty one holding j)."""
    num_segments = seg_starts.shape[0] - 1
    return max(np.searchsorted(seg_starts[:num_segments], j, side="right") - 1, 0)


@intrinsic
def _address_to_float32_ptr(typingctx, address):
    """int64 address -> float32* (numba has no Python-level cast; this is the known recipe)."""
    signature = types.CPointer(types.float32)(types.int64)

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(types.CPointer(types.float32)))

    return signature, codegen


@intrinsic
def _address_to_uint16_ptr(typingctx, address):
    """int64 address -> uint16* (bf16 / fp16 parameters as their bits)."""
    signature = types.CPointer(types.uint16)(types.int64)

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(types.CPointer(types.uint16)))

    return signature, codegen


@helper
def float32_array_at(address, numel):
    """The float32 array of numel elements at a data pointer (a torch tensor's data_ptr())."""
    return numba.carray(_address_to_float32_ptr(address), (numel,))


@helper
def uint16_array_at(address, numel):
    """The uint16 array of numel elements at a data pointer (the bits of a bf16 / fp16 tensor)."""
    return numba.carray(_address_to_uint16_ptr(address), (numel,))


def numpy_view(tensor: torch.Tensor) -> np.ndarray:
    """A zero-copy numpy view of a CPU tensor (bool as uint8)."""
    tensor = tensor.detach()
    if tensor.dtype == torch.bool:
        tensor = tensor.view(torch.uint8)
    return tensor.numpy()


EMPTY_U8 = np.zeros(0, dtype=np.uint8)
EMPTY_F32 = np.zeros(0, dtype=np.float32)


def optional_u8(tensor: torch.Tensor | None, name: str) -> np.ndarray:
    """A bool/uint8 tensor as a flat contiguous uint8 array; an empty one for None."""
    if tensor is None:
        return EMPTY_U8
    if tensor.dtype not in (torch.bool, torch.uint8):
        raise ValueError(f"{name} dtype={tensor.dtype}: expected torch.bool or torch.uint8")
    return numpy_view(tensor.reshape(-1).contiguous())


def check_index_map(seg_starts: np.ndarray, seg_canon: np.ndarray, numel: int | None, state_offset: int,
                    state_sizes: dict) -> None:
    """Host checks of a chunk's index map before a kernel runs without bounds checks (P-sized work).

    seg_starts must run from 0 to numel (when given) without decreasing, and every non-empty
    segment's canonical range, less state_offset, must lie inside each state tensor: the kernels
    index m, b, mask and x there unchecked, so a bad map would corrupt memory instead of raising.
    """
    if seg_starts[0] != 0 or (numel is not None and seg_starts[-1] != numel) or (np.diff(seg_starts) < 0).any():
        raise ValueError(f"seg_starts={seg_starts.tolist()[:8]}...: expected 0 .. {numel}, non-decreasing")
    lengths = np.diff(seg_starts)
    used = lengths > 0
    if not used.any():
        return
    first = seg_canon[used] - state_offset
    last = first + lengths[used]
    for name, size in state_sizes.items():
        if first.min() < 0 or last.max() > size:
            raise ValueError(f"{name} has {size} elements (state_offset={state_offset}): the index map reaches "
                             f"canonical [{int(first.min()) + state_offset}, {int(last.max()) + state_offset})")


def seed_halves(seed: int) -> tuple[np.uint32, np.uint32]:
    return np.uint32(int(seed) & 0xFFFFFFFF), np.uint32((int(seed) >> 32) & 0xFFFFFFFF)


_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def num_threads_for(numel: int) -> int:
    """Threads for a kernel over numel elements: at most torch.get_num_threads(); 1 for small work."""
    return max(1, min(torch.get_num_threads(), numel // MIN_ELEMENTS_PER_THREAD))


def run_split(fn, numel: int, *args):
    """fn(*args, lo, hi) over [0, numel) in at most num_threads_for(numel) pieces; returns the results.

    Pieces start at multiples of 512 elements (64 output bytes: no two threads write one
    cache line of packed bits). The kernels release the GIL, so plain Python threads run
    them in parallel; with one thread (the default under torchrun) fn runs in the caller.
    """
    threads = num_threads_for(numel)
    if threads == 1:
        return [fn(*args, 0, numel)]
    global _pool
    with _pool_lock:
        if _pool is None or _pool._max_workers < threads:
            _pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kernels-cpu")
    step = math.ceil(numel / threads / 512) * 512
    bounds = [(lo, min(lo + step, numel)) for lo in range(0, numel, step)]
    futures = [_pool.submit(fn, *args, lo, hi) for lo, hi in bounds[1:]]
    first = fn(*args, *bounds[0])
    return [first] + [future.result() for future in futures]
