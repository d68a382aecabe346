"""Birder's exchange engine: chunks of canonical elements in, packed 1-bit results out, per step.

Legend: D elements in a chunk, P segments (parameters or parts of them) in a chunk, T canonical elements.

The engine knows nothing of DDP or FSDP. An adapter maps its framework's buffer
to a :class:`~dist_supernet.optim.compressor.Chunk` (a DDP bucket in
``optim/hook.py``, an FSDP reduce-scatter output in ``optim/fsdp.py``) and
hands it to :meth:`ExchangeEngine.submit`; the engine runs the compressor's
fused compress (m, b, one random bit per element), the 1-bit collective and,
once per step, the MAX all-reduce of the step's flags (non-finite gradients,
the next piece size); it keeps every packed result in the step's
:class:`Round` for :meth:`Birder.step`, which decodes them straight into the
update. One path per chunk: adapter -> engine -> collective -> engine ->
adapter (the chunk's future).

Why two worker threads: the 1-bit collectives have one to three stages with
local work between them, and on CPU the compress kernel costs about as much
per chunk as its bits take on a 1 Gbit/s link. :meth:`submit` hands each chunk
to a per-engine pipeline and returns at once, so backward keeps computing while
chunks are compressed and exchanged. On CPU the thread ``birder-compress``
cuts a chunk into pieces (sized by the measured link: see ``PIECE_SECONDS``)
and compresses them one after another, and the thread ``birder-comm`` runs
each piece's collective as soon as it is compressed: the next piece is
compressed while this one is on the wire (both threads release the GIL: numba
kernels and gloo waits). Every collective is issued from ``birder-comm`` in
submission order, which adapters keep the same on every rank. Pieces are
byte-aligned, so the bits, counts and update are those of the whole chunk,
exactly. On GPU the kernels are asynchronous already: a whole chunk runs on a
CUDA stream, either on the comm thread (waiting on an event recorded when the
chunk was ready and completing the future on that stream) or inline on the
caller's current stream (``inline=True``: FSDP calls its hook on a stream of
ours). The engine's process groups are its own (see ``CommGroups``). Flags
stay on the device; the optimizer reads them once per step.
"""

import logging
import math
import queue
import threading
import time

import torch

from dist_supernet.comm import Topology, WireBytes
from dist_supernet.comm.collectives import all_reduce_max_over
from dist_supernet.optim.compressor import BirderCompressor

log = logging.getLogger(__name__)

# Pieces of a CPU chunk (see the module docstring), sized by the link: each rank measures the
# fastest rate (elements per second) any piece of the step went through its collective, proposes
# pieces of PIECE_SECONDS at that rate (a power of two in [2**MIN_PIECE_LOG2, 2**MAX_PIECE_LOG2]),
# and the ranks take the largest proposal in the step's flag all-reduce, so every rank cuts the next
# step's chunks alike. PIECE_SECONDS: benchmarks/slow_link.py (10.5M-parameter MLP, 2 nodes x 1
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

    A job is a callable that handles its own errors (they go to the chunk's future).
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

    def call_comm(self, fn, *, after_compress: bool = False):
        """``fn()`` on the comm thread, after everything queued there; its result (or its error) here.

        ``after_compress``: also after every compress job queued so far (and the collectives they queue).
        """
        done, box = threading.Event(), {}

        def job():
            try:
                box["result"] = fn()
            except BaseException as error:
                box["error"] = error
            finally:
                done.set()

        if after_compress:
            self.compress(lambda: self.comm(job))
        else:
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


class Exchange:
    """One chunk's way through the engine: its future, set once (the chunk's buffer, or the first error)."""

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
            self.future.set_exception(error)  # handed to the adapter (DDP raises it in backward)
        self.done.set()


class Round:
    """What one backward's exchanges left for the optimizer."""

    def __init__(self, device):
        self.entries = []  # (chunk, packed, used_P or None), in submission order
        self.exchanges = []  # every Exchange of this round, to wait on
        self.nonfinite_local = torch.zeros(1, dtype=torch.uint8, device=device)
        self.nonfinite_ranks = None  # uint8 [flag world] after the step's flag all-reduce (skip_nonfinite)
        self.best_rate = 0.0  # elements per second of this rank's fastest piece (CPU pipeline)
        self.complete = False
        self.held = []  # grad_clip: the chunks waiting for the step's last one (their dispatch arguments)
        self.sum_squares = None  # grad_clip: of this rank's gradient so far, fp32 (a tensor on its device)


class ExchangeEngine:
    """compress -> pieces -> 1-bit collective -> packed result, for any chunk of canonical elements.

    Hyperparameters: ``skip_nonfinite`` (a NaN/Inf on any rank makes every rank skip the
    step: one MAX all-reduce of flags per step), ``piece_numel`` (CPU chunks go in pieces of
    about this many elements; None: sized by the measured link, see PIECE_SECONDS; the
    result does not depend on it), and the compressor's (``beta``, ``amsgrad``, ``seed``, the
    1-bit ``collective`` it is connected to).
    Per-element state: the compressor's ``m``, ``b`` (fp32, canonical order); nothing else.
    Per-step state: the grad mask (``canonical_mask``), the :class:`Round` of packed results
    waiting for :meth:`Birder.step`.
    Stats: ``stats`` (bytes on the wire, exchanges).

    ``flag_group``: ``(topology, process group)`` the step's flags are MAX-reduced over;
    default: the collective's own (every rank that exchanges). It must hold every rank whose
    skip decision has to agree (FSDP: the whole world, while the collective runs across replicas).

    Example::
        engine = ExchangeEngine(compressor)                  # compressor.connect(...) done
        exchange = engine.submit(grad_D, compressor.chunk(params))
        engine.finish()                                      # after the step's last chunk
        round_ = engine.take_round()                         # Birder.step applies round_.entries
    """

    def __init__(self, compressor: BirderCompressor, *, skip_nonfinite: bool = True, piece_numel: int | None = None,
                 flag_group: tuple | None = None):
        if piece_numel is not None and (not isinstance(piece_numel, int) or piece_numel < 8):
            raise ValueError(f"piece_numel={piece_numel!r}: must be None (sized by the link) or an int >= 8")
        # hyperparameters
        self.compressor = compressor
        self.skip_nonfinite = bool(skip_nonfinite)
        self.piece_numel = piece_numel
        self.piece_log2 = FIRST_PIECE_LOG2  # the agreed piece size while piece_numel is None
        self._flag_group = flag_group
        # per-step state
        self.canonical_mask = None  # bool [T] for the coming step, or None
        self._round = None
        self._pipeline = _Pipeline()

    # -- what the optimizer, the trainer and the adapters read ----------------------------

    @property
    def params(self):
        return self.compressor.params

    @property
    def stats(self):
        return self.compressor.stats

    @property
    def topology(self) -> Topology:
        """The collective's topology (the ranks that exchange bits)."""
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

    @property
    def flag_topology(self) -> Topology:
        """The topology of the ranks whose flags (and skip decisions) agree each step."""
        return self._flag_group[0] if self._flag_group is not None else self.topology

    def all_reduce_flags(self, stage: str, flags: torch.Tensor) -> WireBytes:
        """In-place MAX all-reduce of a small flag tensor over the flag group; returns its wire bytes."""
        if self._flag_group is None:
            return self.collective.all_reduce_max(stage, flags)
        topology, group = self._flag_group
        return all_reduce_max_over(stage, flags, group, topology, name="birder flags")

    def take_round(self) -> "Round | None":
        """The complete round of the last backward (None if there was none); the next backward starts afresh."""
        current, self._round = self._round, None
        if current is not None and not current.complete:
            raise RuntimeError("Birder: step() while the exchange of the last backward is still running")
        return current

    def end_step(self) -> None:
        """Called by the optimizer after applying (or skipping) a step."""
        self.compressor.step += 1
        self.canonical_mask = None

    def close(self) -> None:
        """End of training: drop the process groups while the interpreter is whole, after
        ``destroy_process_group()``; the engine cannot exchange afterwards."""
        comp = self.compressor
        comp.collective, comp.groups = None, None
        self._flag_group = None if self._flag_group is None else (self._flag_group[0], None)
        self._round = None

    # -- one step's exchanges ---------------------------------------------------------------

    def current_round(self, device) -> Round:
        """The round this backward's chunks join (a new one after a completed round)."""
        if self._round is None or self._round.complete:
            # A round nobody stepped on (GradScaler skipped the step, or step() was not called) is dropped.
            self._round = Round(device)
        return self._round

    def submit(self, grad_D: torch.Tensor, chunk, *, used_P: torch.Tensor | None = None, reduce_used: bool = False,
               is_last: bool = False, inline: bool = False, future=None) -> Exchange:
        """Exchange one chunk of this step; returns its :class:`Exchange` (``.future`` completes with ``grad_D``).

        ``grad_D``: the chunk's gradient (read until the exchange is done: the adapter keeps it alive
        and unchanged; on the step's last chunk with ``skip_nonfinite``, its first element becomes
        NaN on a rank with a finite gradient when another rank's was not). ``used_P``: this rank's
        "got a gradient" flags of the chunk's segments (None: all used); ``reduce_used``: OR them over
        the flag group first (a collective, in order). ``is_last``: the step's last chunk: the flags'
        all-reduce follows it (else the adapter calls :meth:`finish`). ``inline`` (CUDA): run on the
        caller's current stream now instead of the comm thread.
        """
        round_ = self.current_round(grad_D.device)
        if future is None:
            future = torch.futures.Future(devices=[grad_D.device]) if grad_D.is_cuda else torch.futures.Future()
        exchange = Exchange(future)
        round_.exchanges.append(exchange)
        poison = grad_D if is_last else None
        ready = None
        if grad_D.is_cuda and not inline:
            ready = torch.cuda.Event()
            ready.record()  # on the caller's stream: the chunk's gradient is complete after this
        args = (grad_D, chunk, round_, exchange, used_P, reduce_used, poison, inline, ready)
        if self.compressor.clip is None:
            self._dispatch(*args)
            return exchange
        # grad_clip: this rank's gradient norm is known only after its last chunk; hold the chunks until then
        # (the 1-bit exchange then starts after backward instead of overlapping it).
        squares = torch.linalg.vector_norm(grad_D.detach(), dtype=torch.float32).square()  # no full-size temporary
        round_.sum_squares = squares if round_.sum_squares is None else round_.sum_squares + squares
        round_.held.append(args)
        if is_last:
            norm = float(round_.sum_squares.sqrt())  # one host read per step (a sync on CUDA)
            # A non-finite norm: the step is skipped on every rank (skip_nonfinite); m, b take the finite
            # elements unscaled, as without clipping.
            self.compressor.set_grad_norm(norm)
            held, round_.held = round_.held, []
            for held_args in held:
                self._dispatch(*held_args)
        return exchange

    def _dispatch(self, grad_D, chunk, round_, exchange, used_P, reduce_used, poison, inline, ready) -> None:
        """Start one submitted chunk's exchange: inline, on the comm stream, or through the CPU pipeline."""
        if grad_D.is_cuda and inline:
            try:
                exchange.finish(self._exchange_whole(grad_D, chunk, round_, used_P, reduce_used, poison))
            except BaseException as error:
                exchange.fail(error)
        elif grad_D.is_cuda:
            stream = self._pipeline.stream(grad_D.device)

            def job():
                try:
                    with torch.cuda.device(grad_D.device), torch.cuda.stream(stream):
                        stream.wait_event(ready)
                        grad_D.record_stream(stream)
                        exchange.finish(self._exchange_whole(grad_D, chunk, round_, used_P, reduce_used, poison))
                except BaseException as error:
                    exchange.fail(error)

            self._pipeline.comm(job)
        else:
            self._pipeline.compress(
                lambda: self.compress_pieces(grad_D, chunk, round_, exchange, used_P=used_P, reduce_used=reduce_used,
                                             poison=poison))

    def finish(self, *, inline: bool = False) -> Round | None:
        """After the step's last :meth:`submit` (adapters without an ``is_last`` chunk): wait for every
        exchange, agree on the flags; returns the completed round (None if nothing was submitted).

        Raises the first exchange error. On CPU the flags' all-reduce runs on the comm thread after the
        queued pieces; ``inline`` (CUDA): on the caller's current stream.
        """
        round_ = self._round
        if round_ is None or round_.complete:
            return None
        device = round_.nonfinite_local.device
        if device.type == "cuda" and inline:
            self._finish_round(round_, None)
        else:
            # After the chunks still being compressed: their collectives come first, in the same order everywhere.
            self._pipeline.call_comm(lambda: self._finish_round(round_, None), after_compress=True)
        for exchange in round_.exchanges:
            exchange.done.wait()
            if exchange.failed:
                exchange.future.wait()  # raises the exchange's error here
        return round_

    # -- the stages (public: benchmarks/step_worker.py --profile times them) -----------------

    def _used_flags(self, used_P, reduce_used):
        if used_P is None or not reduce_used:
            return used_P, None
        used_P = used_P.clone()
        return used_P, self.all_reduce_flags("all-reduce used-parameter flags", used_P)

    def _exchange_whole(self, grad_D, chunk, round_: Round, used_P, reduce_used, poison) -> torch.Tensor:
        """Compress and reduce one whole chunk (the GPU path: one stream, kernels asynchronous)."""
        used_P, wire = self._used_flags(used_P, reduce_used)
        packed = self.compressor.exchange(grad_D, chunk, mask_T=self.canonical_mask, used_P=used_P,
                                          flag=round_.nonfinite_local, extra_wire=wire, count_exchange=False)
        round_.entries.append((chunk, packed, used_P))
        if poison is not None:
            self._finish_round(round_, poison)
        return grad_D

    def compress_pieces(self, grad_D, chunk, round_: Round, exchange: Exchange, *, used_P=None,
                        reduce_used=False, poison=None) -> None:
        """On ``birder-compress``: compress the chunk piece by piece, queueing each piece's collective."""
        try:
            comp = self.compressor
            wire = None
            if used_P is not None and reduce_used:
                # A collective: issued from the comm thread, in order (this waits for the queued pieces).
                used_P, wire = self._pipeline.call_comm(lambda: self._used_flags(used_P, True))
            pieces = comp.split(chunk, self.piece_numel or 1 << self.piece_log2)
            for k, piece in enumerate(pieces):
                used_piece = used_P if used_P is None or piece.parent_params is None else used_P[piece.parent_params]
                bits_B = comp.compress(grad_D[piece.start : piece.start + piece.numel], piece,
                                       mask_T=self.canonical_mask, used_P=used_piece, flag=round_.nonfinite_local)
                last_piece = k == len(pieces) - 1

                def reduce(bits_B=bits_B, piece=piece, used_piece=used_piece, extra=wire if k == 0 else None,
                           last_piece=last_piece):
                    self.reduce_piece(bits_B, piece, used_piece, round_, exchange, grad_D, extra_wire=extra,
                                      last_piece=last_piece, poison=poison)

                self._pipeline.comm(reduce)
        except BaseException as error:  # the future fails in order, after the pieces already queued
            self._pipeline.comm(lambda error=error: exchange.fail(error))  # bound: `error` ends with the block

    def reduce_piece(self, bits_B, piece, used_piece, round_: Round, exchange: Exchange, grad_D, *,
                     extra_wire, last_piece: bool, poison=None) -> None:
        """On ``birder-comm``: one piece's collective; the chunk's future after its last piece."""
        if exchange.failed:
            return
        try:
            started = time.perf_counter()
            packed = self.compressor.reduce(bits_B, piece, extra_wire=extra_wire, count_exchange=False)
            seconds = time.perf_counter() - started
            if seconds > 0:
                round_.best_rate = max(round_.best_rate, piece.numel / seconds)
            round_.entries.append((piece, packed, used_piece))
            if last_piece:
                if poison is not None:
                    self._finish_round(round_, poison)
                exchange.finish(grad_D)
        except BaseException as error:
            exchange.fail(error)

    def _finish_round(self, round_: Round, poison: torch.Tensor | None) -> None:
        """After the step's last chunk: agree on the non-finite flags (and the next piece size); the
        round is ready for the optimizer. ``poison``: a gradient that becomes non-finite here on a rank
        whose own was finite when another rank's was not (None: the adapter does it)."""
        on_cpu = round_.nonfinite_local.device.type != "cuda"
        if round_.entries and self.collective is not None:
            self.stats.add(WireBytes(), exchanges=1)  # one compressed exchange per step, however many chunks
        if self.skip_nonfinite:
            topo = self.flag_topology
            world = topo.world_size
            # One MAX all-reduce: each rank's non-finite flag and, on CPU, the next step's piece size.
            flags = torch.zeros(world + int(on_cpu), dtype=torch.uint8, device=round_.nonfinite_local.device)
            ranks = flags[:world]
            ranks[topo.rank] = round_.nonfinite_local[0]
            if on_cpu:
                flags[world] = propose_piece_log2(round_.best_rate) if round_.best_rate else self.piece_log2
            self.stats.add(self.all_reduce_flags("all-reduce non-finite flags", flags), exchanges=0)
            if on_cpu:
                self.piece_log2 = int(flags[world])
            round_.nonfinite_ranks = ranks
            if poison is not None and poison.numel():
                poison_where_others_failed(poison, round_)
        round_.complete = True


def poison_where_others_failed(grad: torch.Tensor, round_: Round) -> None:
    """Make ``grad``'s first element NaN when some rank saw NaN/Inf and this rank did not (no host sync).

    Then every rank's ``.grad`` is non-finite, as an averaged gradient would be: GradScaler skips the
    step and backs off its scale identically on every rank, and clipping code sees it too.
    """
    poison = (round_.nonfinite_ranks.max() > 0) & (round_.nonfinite_local[0] == 0)
    head = grad.reshape(-1)[:1]
    head.copy_(torch.where(poison, torch.full_like(head, float("nan")), head))
