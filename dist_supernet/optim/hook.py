"""Birder's DDP communication hook: a thin adapter that feeds DDP's buckets to the compressor.

Legend: D elements in a bucket, P parameters in a bucket, T elements in the model.

The hook follows torch's ``ddp_comm_hooks`` convention: a stateful function
``birder_hook(state, bucket) -> Future[Tensor]``. Per bucket it runs the
compressor's fused compress and 1-bit collective and keeps the collective's
packed result for :meth:`Birder.step`, which decodes it straight into the
update (one fused decode-and-apply pass per bucket: ū is never a float tensor).

What ``.grad`` holds after backward: **this rank's own gradient** (the
bucket is handed back unchanged, not averaged), so clipping, gradient-norm
logging and GradScaler's inf checks see real gradients and cannot rescale
Birder's update (every coordinate moves by at most ``lr`` anyway). If any
rank's gradient had a NaN/Inf this step, the first element of the last
bucket is set to NaN on every rank that had none, so every rank's ``.grad``
is non-finite, as DDP's averaged gradient would be: GradScaler skips the step
and backs off its scale identically on every rank.

Why two worker threads: the 1-bit collectives have one to three stages with
local work between them, and on CPU the compress kernel costs about as much
per bucket as its bits take on a 1 Gbit/s link. The hook hands each bucket to
a per-rank pipeline and returns at once, so backward keeps computing while
buckets are compressed and exchanged (DDP's overlap). On CPU the thread
``birder-compress`` cuts a bucket into pieces (sized by the measured link:
see ``PIECE_SECONDS``) and compresses them one after another, and the thread
``birder-comm`` runs each piece's collective as soon as it is compressed: the
next piece is compressed while this one is on the wire (both threads release
the GIL: numba kernels and gloo waits). Every collective is issued from
``birder-comm`` in the order DDP calls the hook, which is the same on every
rank. Pieces are byte-aligned, so the bits, counts and update are those of the
whole bucket, exactly. On GPU the kernels are asynchronous already: one thread
runs each whole bucket on its own CUDA stream, waiting on an event recorded
when the bucket was ready and completing the future on that stream, so DDP's
consumer waits on exactly that work while backward keeps running. The
threads use their own process groups (see ``CommGroups``). Flags (non-finite,
used) stay on the device; the optimizer reads them once per step.
"""

import logging
import math
import queue
import threading
import time
import weakref

import torch
import torch.distributed as dist

from dist_supernet.comm import Topology
from dist_supernet.optim.compressor import STAGE_COMPRESS, BirderCompressor  # noqa: F401 (re-exported)
from dist_supernet.optim.compressor import flat_like_memory, memory_perm

class _StatesByParam:
    """The newest BirderState of each parameter, by identity (a tensor's == is elementwise, so no
    WeakKeyDictionary); entries go with their parameter."""

    def __init__(self):
        self._entries = {}  # id(param) -> (weakref to param, state)

    def __setitem__(self, param, state):
        key = id(param)
        self._entries[key] = (weakref.ref(param, lambda _, key=key: self._entries.pop(key, None)), state)

    def forget(self, state):
        for key in [k for k, (_, s) in self._entries.items() if s is state]:
            del self._entries[key]

    def get(self, param):
        entry = self._entries.get(id(param))
        if entry is None or entry[0]() is not param:
            return None
        return entry[1]


log = logging.getLogger(__name__)

# Compressor states by parameter: Birder(params) and BirderDDP(model)/attach() find each other in any order.
_STATE_OF = _StatesByParam()


# Pieces of a CPU bucket (see the module docstring), sized by the link: each rank measures the
# fastest rate (elements per second) any piece of the step went through its collective, proposes
# pieces of PIECE_SECONDS at that rate (a power of two in [2**MIN_PIECE_LOG2, 2**MAX_PIECE_LOG2]),
# and the ranks take the largest proposal in the step's flag all-reduce, so every rank cuts the next
# step's buckets alike. PIECE_SECONDS: benchmarks/slow_link.py (10.5M-parameter MLP, 2 nodes x 1
# process, 2026-12-01) measured 2**18-element pieces (32 KiB, 2.7 ms at 96 Mbit/s) fastest at
# 100 Mbit/s: 222 ms/step, against 2**17 272 ms, 2**19 238 ms, 2**21 262 ms and whole buckets
# 272 ms (both directions share the shaped queue, and shorter messages keep it short); on
# loopback, 2**21 and whole buckets took 106-110 ms/step and 2**19 128 ms (gloo's ~0.5 ms per call).
PIECE_SECONDS = 0.003
FIRST_PIECE_LOG2 = 21  # before the first measurement: 256 KiB of bits (comm.collectives.MIN_PEER_BYTES)
MIN_PIECE_LOG2, MAX_PIECE_LOG2 = 16, 24


def propose_piece_log2(elements_per_second: float) -> int:
    """log2 of the piece (elements) that takes PIECE_SECONDS at this rate, within the bounds.

    Example::
        >>> propose_piece_log2(87e6), propose_piece_log2(1e12), propose_piece_log2(0.0)
        (18, 24, 16)
    """
    if elements_per_second <= 0:
        return MIN_PIECE_LOG2
    return min(MAX_PIECE_LOG2, max(MIN_PIECE_LOG2, round(math.log2(elements_per_second * PIECE_SECONDS))))


class _Pipeline:
    """Two daemon threads, ``birder-compress`` and ``birder-comm``, each running its jobs in order.

    A job is a callable that handles its own errors (they go to the bucket's future).
    """

    def __init__(self):
        self._queues = {"birder-compress": queue.SimpleQueue(), "birder-comm": queue.SimpleQueue()}
        self._threads = {}
        self._lock = threading.Lock()
        self._streams = {}

    def stream(self, device):
        """The pipeline's own CUDA stream on ``device`` (created once)."""
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device=device)
        return self._streams[device]

    def _put(self, name, job):
        with self._lock:
            thread = self._threads.get(name)
            if thread is None or not thread.is_alive():
                thread = threading.Thread(target=self._run, args=(self._queues[name],), name=name, daemon=True)
                self._threads[name] = thread
                thread.start()
        self._queues[name].put(job)

    def compress(self, job) -> None:
        self._put("birder-compress", job)

    def comm(self, job) -> None:
        self._put("birder-comm", job)

    def call_comm(self, fn):
        """``fn()`` on the comm thread, after everything queued there; its result (or its error) here."""
        done, box = threading.Event(), {}

        def job():
            try:
                box["result"] = fn()
            except BaseException as error:
                box["error"] = error
            finally:
                done.set()

        self.comm(job)
        done.wait()
        if "error" in box:
            raise box["error"]
        return box["result"]

    @staticmethod
    def _run(jobs):
        while True:
            job = jobs.get()
            try:
                job()
            except Exception:  # a bug in a job (each handles its own errors): logged, the thread goes on
                log.exception("Birder: a pipeline job raised")


class _Bucket:
    """One bucket's way through the pipeline: its future, set once (result or the first error)."""

    def __init__(self, future):
        self.future = future
        self.failed = False
        self.done = threading.Event()

    def finish(self, result) -> None:
        self.future.set_result(result)
        self.done.set()

    def fail(self, error) -> None:
        if not self.failed:
            self.failed = True
            self.future.set_exception(error)  # handed to DDP, which raises it in backward
        self.done.set()


class _Round:
    """What one backward's exchange left for the optimizer."""

    def __init__(self, device):
        self.entries = []  # (chunk, packed, used_P or None), in DDP's bucket order
        self.nonfinite_local = torch.zeros(1, dtype=torch.uint8, device=device)
        self.nonfinite_ranks = None  # uint8 [world] after the last bucket (skip_nonfinite)
        self.best_rate = 0.0  # elements per second of this rank's fastest piece (CPU pipeline)
        self.complete = False


class BirderState:
    """State of the Birder comm hook (PowerSGDState-style).

    Hyperparameters: ``skip_nonfinite``, ``track_unused``, ``piece_numel`` (CPU
    buckets are compressed and sent in pieces of about this many elements; None:
    sized by the measured link, see PIECE_SECONDS; the result does not depend on
    it), and those of the compressor (``beta``, ``amsgrad``, ``seed``, the 1-bit
    ``collective``).
    Per-element state: the compressor's ``m``, ``b`` (fp32, canonical order,
    8 bytes per parameter); nothing per element besides.
    Per-step state: the grad mask, per-parameter "used" flags, the round of
    packed results waiting for :meth:`Birder.step`.
    Stats: ``stats`` (bytes on the wire, exchanges).

    Example::
        ddp_model = DistributedDataParallel(model)
        state = BirderState.for_ddp(ddp_model, collective="two_phase")
        ddp_model.register_comm_hook(state, birder_hook)
    """

    def __init__(
        self,
        params,
        *,
        beta: float = 0.9,
        amsgrad: bool = False,
        seed: int = 0,
        collective: str | None = "auto",
        requantize: bool = False,
        num_nodes: int | None = None,
        inter_node: str = "auto",
        track_unused: bool = False,
        skip_nonfinite: bool = True,
        timeout_s: float | None = None,
        piece_numel: int | None = None,
    ):
        if piece_numel is not None and (not isinstance(piece_numel, int) or piece_numel < 8):
            raise ValueError(f"piece_numel={piece_numel!r}: must be None (sized by the link) or an int >= 8")
        self.compressor = BirderCompressor(params, beta=beta, amsgrad=amsgrad, seed=seed)
        self.skip_nonfinite = bool(skip_nonfinite)
        self.piece_numel = piece_numel
        self.piece_log2 = FIRST_PIECE_LOG2  # the agreed piece size while piece_numel is None
        self.track_unused = False
        self.used_local = None
        self.attached = False
        self.superseded_by = None  # the state that replaced this one at attach (another parameter order)
        if collective is not None:
            self.compressor.connect(collective, requantize=requantize, num_nodes=num_nodes, timeout_s=timeout_s,
                                    inter_node=inter_node)
        if track_unused:
            self.enable_unused_tracking()
        self.canonical_mask = None  # bool [T] for the coming step, or None
        # Parameters whose chunk order is their memory order, not the logical one (e.g. channels_last).
        self._strided = [p for p in self.params if not p.is_contiguous() and memory_perm(p) is not None]
        self._round = None
        self._pipeline = _Pipeline()
        for p in self.params:
            _STATE_OF[p] = self

    @classmethod
    def for_ddp(cls, ddp_model, **kwargs) -> "BirderState":
        """A state over ``ddp_model``'s parameters; tracks unused ones when DDP may have some.

        With ``find_unused_parameters`` or ``static_graph`` a parameter may get no
        gradient; the hook then OR-reduces per-parameter "got a gradient" flags
        across ranks (one small all-reduce per bucket) so that every rank skips
        the same parameters.
        """
        may_skip = getattr(ddp_model, "find_unused_parameters", False) or getattr(ddp_model, "static_graph", False)
        kwargs.setdefault("track_unused", bool(may_skip))
        return cls(list(ddp_model.module.parameters()), **kwargs)

    @staticmethod
    def of(params) -> "BirderState | None":
        """The state that manages the first of ``params`` (from an earlier Birder or BirderDDP), if any."""
        for p in params:
            return _STATE_OF.get(p)
        return None

    # -- what the optimizer and the trainer read ----------------------------------------

    @property
    def params(self):
        return self.compressor.params

    @property
    def stats(self):
        return self.compressor.stats

    @property
    def topology(self) -> Topology:
        return self.compressor.topology

    @property
    def collective(self):
        return self.compressor.collective

    @property
    def step(self) -> int:
        return self.compressor.step

    @step.setter
    def step(self, value: int) -> None:
        self.compressor.step = int(value)

    def enable_unused_tracking(self) -> None:
        """Count a parameter as used in a step only if its gradient was computed on some rank."""
        if self.track_unused:
            return
        self.track_unused = True
        self.used_local = torch.zeros(len(self.params), dtype=torch.uint8, device=self.compressor.device)
        for i, p in enumerate(self.params):
            if p.requires_grad:
                # A tensor hook runs before the gradient is accumulated, so before DDP's own
                # post-accumulate hook can declare the bucket ready and start the exchange.
                p.register_hook(self._marker(i))

    def _marker(self, position):
        used = self.used_local

        def mark(grad):
            used[position] = 1

        return mark

    def set_grad_mask(self, masks) -> None:
        """Elements that may move in the coming step (True) — the rest keep x, m and b.

        ``masks``: None (every element that got a gradient), a bool tensor over
        all parameters in canonical order (the DDP module's ``parameters()``
        order), or a dict ``{param: bool tensor}`` (parameters left out are
        fully active). Must be identical on every rank: derive it from the
        sampled architectures, never from a local ``grad == 0``.
        """
        comp = self.compressor
        if masks is None:
            self.canonical_mask = None
            return
        if isinstance(masks, torch.Tensor):
            if masks.numel() != comp.numel_total:
                raise ValueError(f"set_grad_mask: a mask of {masks.numel()} elements, the model has {comp.numel_total}")
            flat = masks.reshape(-1).to(device=comp.device, dtype=torch.bool)
            for p in self._strided:  # logical order in, chunk (memory) order for channels_last and the like
                start = comp.offset[p]
                flat[start : start + p.numel()] = flat_like_memory(flat[start : start + p.numel()].view(p.shape), p)
            self.canonical_mask = flat
            return
        flat = torch.ones(comp.numel_total, dtype=torch.bool, device=comp.device)
        for p, mask in masks.items():
            if p not in comp.offset:
                raise ValueError("set_grad_mask: a masked parameter is not managed by this Birder state")
            start = comp.offset[p]
            flat[start : start + p.numel()] = flat_like_memory(mask.reshape(p.shape), p).to(comp.device, torch.bool)
        self.canonical_mask = flat

    def take_round(self) -> "_Round | None":
        """The complete round of the last backward (None if there was none); the next backward starts afresh."""
        current, self._round = self._round, None
        if current is not None and not current.complete:
            raise RuntimeError("Birder: step() while the exchange of the last backward is still running")
        return current

    def close(self) -> None:
        """End of training: drop the process groups (and this state's registry entries) while the
        interpreter is whole, after ``destroy_process_group()``; the state cannot exchange afterwards."""
        comp = self.compressor
        comp.collective, comp.groups = None, None
        self._round = None
        _STATE_OF.forget(self)

    def end_step(self) -> None:
        """Called by the optimizer after applying (or skipping) a step."""
        self.compressor.step += 1
        self.canonical_mask = None

    # -- the exchange of one bucket (on the worker thread) ---------------------------------

    def _begin_round(self, device) -> "_Round":
        if self._round is None or self._round.complete:
            # A round nobody stepped on (GradScaler skipped the step, or step() was not called) is dropped.
            self._round = _Round(device)
        return self._round

    def exchange_bucket(self, grad_D: torch.Tensor, chunk, round_: _Round, *, is_last: bool) -> torch.Tensor:
        """Compress and reduce one whole bucket; on the last one, agree on the step's flags. Returns ``grad_D``.

        The GPU path (one thread, the pipeline's CUDA stream); CPU buckets go through
        :meth:`compress_pieces` and :meth:`reduce_piece` instead, with the same result.
        """
        comp = self.compressor
        used_P, wire = None, None
        if self.used_local is not None:
            used_P = self.used_local[chunk.positions]  # a copy: the flags of this bucket
            wire = comp.collective.all_reduce_max("all-reduce used-parameter flags", used_P)
        packed = comp.exchange(grad_D, chunk, mask_T=self.canonical_mask, used_P=used_P,
                               flag=round_.nonfinite_local, extra_wire=wire, count_exchange=is_last)
        round_.entries.append((chunk, packed, used_P))
        if is_last:
            self._finish_round(grad_D, round_)
        return grad_D

    def compress_pieces(self, grad_D, chunk, round_: _Round, bucket: _Bucket, *, is_last: bool) -> None:
        """On ``birder-compress``: compress the bucket piece by piece, queueing each piece's collective."""
        try:
            comp = self.compressor
            used_P, wire = None, None
            if self.used_local is not None:
                used_P = self.used_local[chunk.positions]  # a copy: the flags of this bucket
                # A collective: issued from the comm thread, in order (this waits for the queued pieces).
                wire = self._pipeline.call_comm(
                    lambda: comp.collective.all_reduce_max("all-reduce used-parameter flags", used_P))
            pieces = comp.split(chunk, self.piece_numel or 1 << self.piece_log2)
            for k, piece in enumerate(pieces):
                used_piece = used_P if used_P is None or piece.parent_params is None else used_P[piece.parent_params]
                bits_B = comp.compress(grad_D[piece.start : piece.start + piece.numel], piece,
                                       mask_T=self.canonical_mask, used_P=used_piece, flag=round_.nonfinite_local)
                last_piece = k == len(pieces) - 1

                def reduce(bits_B=bits_B, piece=piece, used_piece=used_piece, extra=wire if k == 0 else None,
                           last_piece=last_piece):
                    self.reduce_piece(bits_B, piece, used_piece, round_, bucket, grad_D, extra_wire=extra,
                                       last_piece=last_piece, is_last=is_last)

                self._pipeline.comm(reduce)
        except BaseException as error:  # the future fails in order, after the pieces already queued
            self._pipeline.comm(lambda error=error: bucket.fail(error))  # bound: `error` ends with the block

    def reduce_piece(self, bits_B, piece, used_piece, round_: _Round, bucket: _Bucket, grad_D, *,
                      extra_wire, last_piece: bool, is_last: bool) -> None:
        """On ``birder-comm``: one piece's collective; the bucket's future after its last piece."""
        if bucket.failed:
            return
        try:
            started = time.perf_counter()
            packed = self.compressor.reduce(bits_B, piece, extra_wire=extra_wire,
                                            count_exchange=is_last and last_piece)
            seconds = time.perf_counter() - started
            if seconds > 0:
                round_.best_rate = max(round_.best_rate, piece.numel / seconds)
            round_.entries.append((piece, packed, used_piece))
            if last_piece:
                if is_last:
                    self._finish_round(grad_D, round_)
                bucket.finish(grad_D)
        except BaseException as error:
            bucket.fail(error)

    def _finish_round(self, grad_D: torch.Tensor, round_: _Round) -> None:
        """After the last bucket: agree on the non-finite flags; the round is ready for the optimizer."""
        comp = self.compressor
        if self.used_local is not None:
            self.used_local.zero_()  # backward is over: the next marks belong to the next step
        if self.skip_nonfinite:
            world = comp.topology.world_size
            # One MAX all-reduce: each rank's non-finite flag and, on CPU, the next step's piece size.
            flags = torch.zeros(world + int(not grad_D.is_cuda), dtype=torch.uint8, device=grad_D.device)
            ranks = flags[:world]
            ranks[comp.topology.rank] = round_.nonfinite_local[0]
            if not grad_D.is_cuda:
                flags[world] = propose_piece_log2(round_.best_rate) if round_.best_rate else self.piece_log2
            comp.stats.add(comp.collective.all_reduce_max("all-reduce non-finite flags", flags), exchanges=0)
            if not grad_D.is_cuda:
                self.piece_log2 = int(flags[world])
            round_.nonfinite_ranks = ranks
            if grad_D.numel():
                # Every rank's .grad non-finite when any rank's is (see the module docstring).
                poison = (ranks.max() > 0) & (round_.nonfinite_local[0] == 0)
                head = grad_D[:1]
                head.copy_(torch.where(poison, torch.full_like(head, float("nan")), head))
        round_.complete = True


def birder_hook(state: BirderState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: 1 bit per gradient element on the wire; the future hands back this rank's gradient.

    The packed result waits in ``state`` for :meth:`Birder.step`.

    Example::
        ddp_model.register_comm_hook(BirderState.for_ddp(ddp_model), birder_hook)
    """
    grad_D = bucket.buffer()
    chunk = state.compressor.chunk(bucket.parameters())
    if chunk.numel != grad_D.numel():
        raise RuntimeError(f"bucket {bucket.index()} holds {grad_D.numel()} elements, its parameters {chunk.numel}")
    is_last = bucket.is_last()
    round_ = state._begin_round(grad_D.device)
    pipeline = state._pipeline
    task = _Bucket(torch.futures.Future(devices=[grad_D.device]) if grad_D.is_cuda else torch.futures.Future())
    if grad_D.is_cuda:
        ready = torch.cuda.Event()
        ready.record()  # on backward's stream: the bucket's gradient is complete after this
        stream = pipeline.stream(grad_D.device)

        def job():
            try:
                with torch.cuda.device(grad_D.device), torch.cuda.stream(stream):
                    stream.wait_event(ready)
                    grad_D.record_stream(stream)
                    task.finish(state.exchange_bucket(grad_D, chunk, round_, is_last=is_last))
            except BaseException as error:
                task.fail(error)

        pipeline.comm(job)
    else:
        pipeline.compress(lambda: state.compress_pieces(grad_D, chunk, round_, task, is_last=is_last))
    if is_last:
        # The last bucket: return only once every collective of this step is done, so that DDP's own
        # collectives after backward (its unused-parameter all-reduce, from this thread) never run
        # concurrently with the pipeline's on another communicator (unsafe on NCCL; a hang with
        # CUDA_DEVICE_MAX_CONNECTIONS=1). Nothing is lost: backward has no work left to overlap.
        task.done.wait()
    return task.future
