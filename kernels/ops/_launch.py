"""Launch and tuning of the Triton kernels of this package (no kernel here).

Every kernel here is memory-bandwidth bound and works on whole bytes of packed bits (8
elements per byte), so one tuning knob, BLOCK_BYTES, plus num_warps covers them all. Every
launcher calls :func:`launch`, which picks the config, enters the tensor's CUDA device and
compiles without fma contraction.

Why not ``triton.autotune``: its tuning benchmarks the real arguments of the first call of
each key, so in-place kernels need ``restore_value`` (a clone of the whole model's m and b in
every timed call: the timing measures the clone, and the clone costs 8 B/param on the comm
thread during backward); it keeps per-call state on the kernel object (two threads calling
one kernel race); and Triton 3.6 benchmarks even a single pruned config (under the CPU
interpreter that fails: there is no driver). Here instead:

- tuning runs only inside :func:`tuning` (this thread), which only warm-up code enters, and
  warm-up passes dummy tensors of a bucket's size (``dist_supernet.optim.warmup``), so
  tuning never touches real m, b or parameters and needs no restore;
- chunks above TUNE_NUMEL_CAP elements share a key and are tuned on dummies of that size;
- a launch whose key is not tuned yet runs the default config at once (no benchmark, no host
  sync on the comm thread) and is remembered with a closure that can replay it on dummies;
  :func:`tune_missed` (``kernels.tune_missed()``, called by ``Birder.step`` where no
  collective is in flight) tunes those: DDP's rebuilt buckets after step 1, masks first set
  later;
- the tuner's only state is the table key -> config (a dict insert under a lock), so launches
  from the comm thread and from ``step()`` may run at once;
- ``DIST_SUPERNET_AUTOTUNE=0`` keeps every kernel on its default config (kernel tests on a
  GPU: each new key compiles one config, not eight), and the interpreter
  (TRITON_INTERPRET=1) always does.

The key of a launch (:func:`tune_key`): kernel name, device, ceil(log2(numel)), the dtypes of
its tensor arguments, its constexpr flags and its loop bounds (rows, planes).

The default config (1024 bytes = 8192 elements per program, 8 warps) was NOT measured on a
GPU: none was lent when it was chosen. Large blocks keep the interpreter fast (it pays per
program, not per element).

Rounding: every launch passes ``enable_fp_fusion=False`` (:data:`LAUNCH_OPTIONS`), so the
compiler does not contract ``a * b + c`` into an fma: m, b and x round as the contract in
:mod:`dist_supernet.kernels.reference` says (issue 11: with fusion on, m and b differed at 4097 elements).
"""

import contextlib
import dataclasses
import logging
import os
import threading

import torch
import triton
import triton.language as tl

log = logging.getLogger(__name__)

DEFAULT_BLOCK_BYTES = 1024  # unmeasured on GPU, see the module docstring
DEFAULT_NUM_WARPS = 8  # unmeasured on GPU, see the module docstring
MAX_NUMEL = 2**31 - 1  # chunk-local element offsets are int64 in the kernels; numel is one int32 argument
LAUNCH_OPTIONS = {"enable_fp_fusion": False}  # no fma contraction: the contract's rounding
AUTOTUNE_ENV = "DIST_SUPERNET_AUTOTUNE"  # "0": every kernel keeps its default config
# triton.testing.do_bench per config while tuning (ms): a launch at bucket size takes 10-500 us on a GPU,
# so 25 ms gives 50+ repeats; the defaults (25, 100) would cost ~1 s per key for 8 configs.
BENCH_WARMUP_MS, BENCH_REP_MS = 5, 25
# Chunks above 2**26 elements share one key: they are bandwidth-bound alike, and tuning them on
# dummies of their full size would cost up to 16 B per element of the step-1 bucket (the whole model).
TUNE_NUMEL_CAP = 1 << 26


@dataclasses.dataclass(frozen=True)
class Config:
    """One launch config: bytes of packed output per program and warps per program."""

    block_bytes: int
    num_warps: int


DEFAULT = Config(DEFAULT_BLOCK_BYTES, DEFAULT_NUM_WARPS)


def byte_block_configs() -> list:
    """The tuning space of every kernel here: BLOCK_BYTES x num_warps (default included)."""
    return [Config(block_bytes, num_warps) for block_bytes in (128, 256, 512, 1024) for num_warps in (4, 8)]


_lock = threading.Lock()  # the tables below; held for microseconds, never while a kernel runs
_tune_lock = threading.Lock()  # one tuning at a time (held while benchmarking)
# The CPU interpreter patches triton.language's module state during each launch, so two threads
# interpreting at once break each other (the hook's CPU pipeline compresses on one thread while
# the other reduces): interpreted launches take turns. Compiled launches keep no such state.
_interpreter_lock = threading.Lock()
_best: dict = {}  # tuning key -> Config
_missed: dict = {}  # tuning key -> zero-argument closure that replays the launch on dummies
_warned_miss: set = set()
_tuning = threading.local()  # .active: this thread's launches may benchmark (dummy arguments only)
_recorders: list = []


def _benchmark(fn) -> float:
    """Median ms of ``fn`` (one launch); replaced by tests with a fake."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=BENCH_WARMUP_MS, rep=BENCH_REP_MS, return_mode="median")


def interpreting() -> bool:
    """Whether Triton runs in its CPU interpreter (``triton.knobs`` exists from Triton 3.3 only)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def autotune_enabled() -> bool:
    """Whether launches may be tuned: compiled Triton and ``DIST_SUPERNET_AUTOTUNE`` not 0/false/off/no."""
    return not interpreting() and os.environ.get(AUTOTUNE_ENV, "1").strip().lower() not in ("0", "false", "off", "no")


@contextlib.contextmanager
def tuning():
    """Within this block, this thread's launches of an untuned key benchmark every config first.

    Enter it only around launches on dummy tensors (the warm-up): the benchmark reruns the
    kernel, in place, many times. Tuning is serialized by one lock.
    """
    previous = getattr(_tuning, "active", False)
    _tuning.active = True
    try:
        yield
    finally:
        _tuning.active = previous


@contextlib.contextmanager
def record():
    """Yields a list that receives one :class:`Launch` per kernel launch of any thread (tests, gpu_check)."""
    launches = []
    with _lock:
        _recorders.append(launches)
    try:
        yield launches
    finally:
        with _lock:
            _recorders.remove(launches)


@dataclasses.dataclass(frozen=True)
class Launch:
    kernel: str
    key: tuple
    config: Config
    thread: str
    tuning: bool


def device_guard(device: torch.device):
    """``torch.cuda.device(device)`` for a CUDA device: Triton launches on the *current* device, so a
    process that never called set_device(k) would launch on GPU 0 with pointers into GPU k."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _device_key(device: torch.device) -> str:
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def tune_key(kernel, device, numel, args, constexprs, loop_bounds) -> tuple:
    """What a tuned config is kept for: (kernel, device, ceil(log2 numel), tensor dtypes, constexprs, loop bounds)."""
    dtypes = tuple(str(a.dtype).removeprefix("torch.") for a in args if isinstance(a, torch.Tensor))
    return (kernel.__name__, _device_key(device), size_class(dummy_numel(numel)), dtypes, tuple(sorted(constexprs.items())),
            tuple(int(b) for b in loop_bounds))


def _run(kernel, config, numel, args, constexprs, num_batch):
    num_bytes = (int(numel) + 7) // 8
    grid = (triton.cdiv(num_bytes, config.block_bytes), *(() if num_batch is None else (int(num_batch),)))
    with _interpreter_lock if interpreting() else contextlib.nullcontext():
        kernel[grid](*args, **constexprs, BLOCK_BYTES=config.block_bytes, num_warps=config.num_warps, **LAUNCH_OPTIONS)


def _tune(kernel, key, numel, args, device, constexprs, num_batch) -> Config:
    with _tune_lock:
        config = _best.get(key)
        if config is not None:  # another thread tuned it meanwhile
            return config
        timings = {}
        for candidate in byte_block_configs():
            try:
                timings[candidate] = _benchmark(lambda c=candidate: _run(kernel, c, numel, args, constexprs, num_batch))
            except Exception as error:  # a config that does not compile or fit is not a candidate
                log.debug("tuning %s: %s failed: %s", key[0], candidate, error)
        config = min(timings, key=timings.get) if timings else DEFAULT
        with _lock:
            _best[key] = config
            _missed.pop(key, None)
        return config


def _note_miss(key, warm) -> None:
    with _lock:
        if key in _missed or key in _best:
            return
        _missed[key] = warm
        first = key[0] not in _warned_miss
        _warned_miss.add(key[0])
    if first:
        log.warning("kernels: %s launched with its default config for an untuned key %s (not warmed up); "
                    "it is tuned on dummies at the next kernels.tune_missed()", key[0], key[2:])


def launch(kernel, numel: int, args, *, device, constexprs=None, loop_bounds=(), num_batch=None, warm=None) -> None:
    """``kernel[grid](*args, **constexprs, BLOCK_BYTES=, num_warps=)`` over ceil(numel / 8) bytes, on ``device``.

    Grid: one program per BLOCK_BYTES bytes on axis 0, num_batch on axis 1 when given. The config:
    the tuned one for this key, else the default (tuning first when inside :func:`tuning`).
    ``warm``: a zero-argument closure that repeats this launch on dummy tensors (same key), kept for
    :func:`tune_missed`; it must not hold the real tensors.

    Example::
        >>> launch(_pack_counts_kernel, numel, (counts, planes, numel, num_bytes, num_planes),
        ...        device=counts.device, loop_bounds=(num_planes,))
    """
    device = torch.device(device)
    constexprs = constexprs or {}
    key = tune_key(kernel, device, numel, args, constexprs, loop_bounds)
    config = _best.get(key)
    active = getattr(_tuning, "active", False)
    if config is None:
        if not autotune_enabled():
            config = DEFAULT
        elif active:
            with device_guard(device):
                config = _tune(kernel, key, numel, args, device, constexprs, num_batch)
        else:
            config = DEFAULT
            if warm is not None:
                _note_miss(key, warm)
    if _recorders:
        entry = Launch(kernel.__name__, key, config, threading.current_thread().name, active)
        with _lock:
            for launches in _recorders:
                launches.append(entry)
    with device_guard(device):
        _run(kernel, config, numel, args, constexprs, num_batch)


def tune_missed() -> int:
    """Tune, on dummies, every key launched untuned since the last call; returns how many were tuned.

    Call where no collective is in flight (``Birder.step`` does, before applying): tuning
    benchmarks, which waits for the GPU.
    """
    if not _missed:
        return 0
    with _lock:
        pending = list(_missed.items())
    tuned = 0
    for key, warm in pending:
        with tuning():
            warm()
        with _lock:
            if _missed.pop(key, None) is not None and key not in _best:
                log.error("kernels: the warm-up closure of %s did not launch its key %s", key[0], key[2:])
                _best[key] = DEFAULT  # do not retry every step
            else:
                tuned += 1
    return tuned


def tuned_keys() -> dict:
    """A copy of the tuned table: key -> Config."""
    with _lock:
        return dict(_best)


def missed_keys() -> list:
    """Keys launched untuned and not tuned since."""
    with _lock:
        return list(_missed)


def reset() -> None:
    """Forget every tuned config and miss (tests)."""
    with _lock:
        _best.clear()
        _missed.clear()
        _warned_miss.clear()


@triton.jit
def byte_tile(numel, BLOCK_BYTES: tl.constexpr):
    """This program's BLOCK_BYTES bytes and their [BLOCK_BYTES, 8] elements (row = byte, column = bit, LSB first).

    Returns (byte, bit, offsets, in_range, byte_in_range): element 8 * byte + bit is in range below
    numel, a byte when it holds at least one element. int64: 8 * byte passes 2**31 at the top of
    the int32 range of numel.
    """
    byte = tl.program_id(0).to(tl.int64) * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    bit = tl.arange(0, 8)
    offsets = byte[:, None] * 8 + bit[None, :]
    return byte, bit, offsets, offsets < numel, byte * 8 < numel


def as_counts(counts: torch.Tensor) -> torch.Tensor:
    """A flat contiguous int32/int64 view of integer counts (other integer dtypes cast to int32)."""
    flat = counts.reshape(-1).contiguous()
    return flat if flat.dtype in (torch.int32, torch.int64) else flat.to(torch.int32)


def dummy_numel(numel: int) -> int:
    """Elements of the dummy tensors that tune a chunk of numel elements: numel, at most TUNE_NUMEL_CAP."""
    return min(int(numel), TUNE_NUMEL_CAP)


def size_class(numel: int) -> int:
    """Tuning key: ceil(log2(numel)), so buckets of similar size share one tuning run."""
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


# Parameter dtypes the kernels load and store themselves (fp32 arithmetic in registers, one
# rounding at the store); other dtypes go through an fp32 copy. bf16 travels as int16 bits.
X_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def x_view(x: torch.Tensor) -> torch.Tensor:
    """The tensor a kernel addresses for parameter x: bf16 as its int16 bits (see :func:`load_x`)."""
    return x.view(torch.int16) if x.dtype == torch.bfloat16 else x


@triton.jit
def x_pointers(address, offsets, X_KIND: tl.constexpr):
    """Element pointers of a parameter given its int64 data pointer, typed as :func:`load_x` reads them."""
    if X_KIND == 0:
        ptr = address.to(tl.pointer_type(tl.float32), bitcast=True) + offsets
    elif X_KIND == 1:
        ptr = address.to(tl.pointer_type(tl.int16), bitcast=True) + offsets
    else:
        ptr = address.to(tl.pointer_type(tl.float16), bitcast=True) + offsets
    return ptr


@triton.jit
def load_x(ptr, mask, X_KIND: tl.constexpr):
    """fp32 values of parameter elements (fp32, bf16 as int16 bits, or fp16 pointers)."""
    if X_KIND == 1:
        # through the bits: the widening is exact and runs alike compiled and interpreted
        bits = tl.load(ptr, mask=mask, other=0).to(tl.uint16, bitcast=True).to(tl.uint32)
        x = (bits << 16).to(tl.float32, bitcast=True)
    else:
        x = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    return x


@triton.jit
def store_x(ptr, x, mask, X_KIND: tl.constexpr):
    """Store fp32 ``x`` in the parameter's dtype, rounded to nearest even once."""
    if X_KIND == 0:
        tl.store(ptr, x, mask=mask)
    elif X_KIND == 1:
        # by hand: the interpreter's own fp32 -> bf16 cast truncates. NaN -> 0x7FC0, as torch on CPU.
        u = x.to(tl.uint32, bitcast=True)
        rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        bits = tl.where(x != x, 0x7FC0, rounded).to(tl.uint16)
        tl.store(ptr, bits.to(tl.int16, bitcast=True), mask=mask)
    else:
        tl.store(ptr, x.to(tl.float16), mask=mask)
