"""The baselines a user would otherwise pick, behind the same interface and byte count.

- ``none``: DDP's fp32 all-reduce (torch's ``allreduce_hook``);
- ``fp16`` / ``bf16``: torch's compress hooks (bf16 needs NCCL);
- ``powersgd``: torch's PowerSGD hook (rank ``powersgd_rank``, error feedback,
  compression from the second iteration on: torch's default of 1000 vanilla
  iterations would make short comparisons measure fp32). On gloo each bucket
  finishes before the next starts (see ``_counting_powersgd_hook``).

Each is wrapped to add the bytes it put on the wire to a :class:`CommStats`.

The registry: :data:`BASELINES` maps each ``compression=<name>`` to a
:class:`Baseline` subclass, which carries its config schema (``config``, a
dataclass: keys, types, defaults and ranges, see :mod:`dist_supernet.schema`),
the process-group backends it runs on, and how to register its hook from a
validated config (:meth:`Baseline.register_hook`). The config validation, the
trainer, the sweep's pre-check and the benchmarks read it. A new baseline is
one class decorated with :func:`register_baseline` (plus its
``conf/compression/<name>.yaml``); a run sees it once its module is imported,
e.g. by the config's top-level ``plugins=[...]`` key (:mod:`dist_supernet.plugins`).
"""

import dataclasses
from typing import ClassVar

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd

from dist_supernet.comm.collectives import CollectiveError
from dist_supernet.comm.registry import add_entry
from dist_supernet.schema import bounded, range_problem, type_problem
from dist_supernet.comm.stats import CommStats, all_reduce_bytes
from dist_supernet.comm.topology import Topology
from dist_supernet.errors import ConfigError


def _named_failure(name: str, topology: Topology):
    """A future callback that re-raises a failed all-reduce (a peer stopped: timeout) naming stage and rank."""

    def check(future):
        try:
            return future.wait()  # done already inside a then() callback; blocks in the in-order PowerSGD path
        except Exception as error:
            raise CollectiveError(f"{name} collective failed in stage 'all-reduce gradient bucket' (world) on rank "
                                  f"{topology.rank} of {topology.world_size}: {error}") from error

    return check


def _counting_hook(stats: CommStats, topology: Topology, bytes_per_element: int, inner, name: str = "allreduce"):
    members = list(range(topology.world_size))

    def hook(process_group, bucket):
        stats.add(
            all_reduce_bytes(bucket.buffer().numel() * bytes_per_element, members, topology),
            exchanges=int(bucket.is_last()),
        )
        return inner(process_group, bucket).then(_named_failure(name, topology))

    return hook


def _counting_powersgd_hook(stats: CommStats, topology: Topology, *, in_order: bool):
    members = list(range(topology.world_size))

    def hook(state: powersgd.PowerSGDState, bucket) -> torch.futures.Future[torch.Tensor]:
        before = state.total_numel_after_compression
        future = powersgd.powerSGD_hook(state, bucket)
        # PowerSGD counts what it all-reduces (P, Q and the uncompressed tensors) once it
        # compresses; during its vanilla warm-up iteration nothing is counted: fp32 then.
        numel = state.total_numel_after_compression - before or bucket.buffer().numel()
        stats.add(all_reduce_bytes(numel * 4, members, topology), exchanges=int(bucket.is_last()))
        if not in_order:
            return future.then(_named_failure("powersgd", topology))
        # torch's hook issues its P and Q all-reduces from future callbacks, which on gloo
        # run on whichever thread completes a future: with several buckets two ranks can
        # issue them in different orders and the job crashes or hangs (seen by
        # benchmarks/slow_link.py on a 10M-parameter model). Finishing each bucket before
        # DDP hands over the next keeps one order; it gives up overlap for this baseline.
        done = torch.futures.Future()
        done.set_result(_named_failure("powersgd", topology)(future))
        return done

    return hook


# -- the registry ---------------------------------------------------------------------------


@dataclasses.dataclass
class BaselineConfig:
    """The ``compression`` keys every baseline has (``conf/compression/<name>.yaml``)."""

    name: str = "none"
    collective: str = "allreduce"  # the baselines reduce with DDP's all-reduce; the 1-bit ones need birder
    num_nodes: int | None = bounded(None, min=1)  # node layout for the byte split; null: from torchrun


class Baseline:
    """One baseline compression: its name, config schema, backends, and how to register its hook.

    Subclasses set ``name`` and ``config`` (a :class:`BaselineConfig` subclass for extra keys)
    and implement :meth:`register_hook`; :func:`register_baseline` adds them to :data:`BASELINES`.
    """

    name: ClassVar[str] = "base"
    config: ClassVar[type] = BaselineConfig
    backends: ClassVar[tuple[str, ...]] = ("gloo", "nccl")  # process-group backends it runs on
    backend_hint: ClassVar[str] = ""  # what to use instead where the backend is missing

    @classmethod
    def register_hook(cls, ddp_model, cfg, *, stats: CommStats, topology: Topology) -> None:
        """Register this baseline's comm hook on ``ddp_model`` for the validated ``cfg``, counting into ``stats``.

        The hook must reduce over ``ddp_model.process_group`` (pass it as the hook's state): under
        ``sync=diloco`` that is the node's ranks, and ``topology`` is that group's.
        """
        raise NotImplementedError


BASELINES: dict[str, type[Baseline]] = {}


def register_baseline(cls: type[Baseline]) -> type[Baseline]:
    """Class decorator: make ``cls`` the baseline ``compression=<cls.name>`` builds.

    Example::
        @dataclasses.dataclass
        class MyConfig(BaselineConfig):
            name: str = "mine"
            chunks: int = bounded(2, min=1)   # why: ...

        @register_baseline
        class Mine(Baseline):
            name, config = "mine", MyConfig

            @classmethod
            def register_hook(cls, ddp_model, cfg, *, stats, topology):
                # the DDP module's group: the node's ranks under sync=diloco, the world otherwise
                ddp_model.register_comm_hook(ddp_model.process_group, my_counting_hook(stats, topology, cfg.chunks))
    """
    add_entry(BASELINES, cls, base=Baseline, key="compression", what="baseline", reserved=("birder",),
              check=_check_config_class)
    return cls


def _check_config_class(cls) -> None:
    if not (dataclasses.is_dataclass(cls.config) and issubclass(cls.config, BaselineConfig)):
        raise TypeError(f"baseline {cls.name!r}: config must be a dataclass subclass of BaselineConfig")


class _TorchAllReduce(Baseline):
    """A torch default hook that all-reduces the bucket at ``bytes_per_element``, counted."""

    inner: ClassVar = staticmethod(default_hooks.allreduce_hook)
    bytes_per_element: ClassVar[int] = 4

    @classmethod
    def register_hook(cls, ddp_model, cfg, *, stats, topology):
        label = "allreduce" if cls.name == "none" else cls.name  # how an error names it: "allreduce collective failed"
        # The DDP module's own group (the node's ranks under sync=diloco): None would be the world.
        ddp_model.register_comm_hook(ddp_model.process_group,
                                     _counting_hook(stats, topology, cls.bytes_per_element, cls.inner, label))


@register_baseline
class NoCompression(_TorchAllReduce):
    """DDP's own fp32 all-reduce."""

    name = "none"


@register_baseline
class FP16(_TorchAllReduce):
    """torch's ``fp16_compress_hook``: 2 bytes per element."""

    name = "fp16"
    inner = staticmethod(default_hooks.fp16_compress_hook)
    bytes_per_element = 2


@register_baseline
class BF16(_TorchAllReduce):
    """torch's ``bf16_compress_hook``: 2 bytes per element, fp32's range; NCCL only."""

    name = "bf16"
    inner = staticmethod(default_hooks.bf16_compress_hook)
    bytes_per_element = 2
    backends = ("nccl",)
    backend_hint = "; use fp16 on gloo"


@dataclasses.dataclass
class PowerSGDConfig(BaselineConfig):
    name: str = "powersgd"
    rank: int = bounded(4, min=1)  # PowerSGD's matrix approximation rank


@register_baseline
class PowerSGD(Baseline):
    """torch's PowerSGD hook, rank ``rank``, compressing from the second iteration on."""

    name = "powersgd"
    config = PowerSGDConfig

    @classmethod
    def register_hook(cls, ddp_model, cfg, *, stats, topology):
        state = powersgd.PowerSGDState(
            process_group=ddp_model.process_group,  # the DDP module's own group, not always the world
            matrix_approximation_rank=cfg.rank,
            start_powerSGD_iter=2,  # the smallest torch allows with error feedback
            min_compression_rate=2,
        )
        in_order = dist.get_backend() == "gloo"
        ddp_model.register_comm_hook(state, _counting_powersgd_hook(stats, topology, in_order=in_order))


def baseline_config(name: str, **options):
    """The validated config of baseline ``name`` from keyword options (the schema's defaults elsewhere).

    Raises ConfigError ``compression.<key>=<value>: reason`` for an unknown name or key, a value of the wrong
    type or out of its range.

    Example::
        >>> baseline_config("powersgd", rank=2).rank
        2
    """
    if name not in BASELINES:
        raise ConfigError("compression", name, f"expected one of {', '.join(('birder', *BASELINES))}")
    schema = BASELINES[name].config
    keys = [f.name for f in dataclasses.fields(schema) if f.name != "name"]
    for key, value in options.items():
        if key not in keys:
            raise ConfigError(f"compression.{key}", value,
                              f"unknown key for compression={name} (expected one of {', '.join(keys)})")
    cfg = schema(name=name, **options)
    problem = type_problem(cfg) or range_problem(cfg)
    if problem is not None:
        raise ConfigError(f"compression.{problem[0]}", problem[1], problem[2])
    return cfg


def register_baseline_hook(ddp_model, baseline, *, topology: Topology | None = None, **options) -> CommStats:
    """Register a baseline on a DDP module; return the stats it adds to.

    ``baseline``: a name with the schema's keys as keyword options, or a validated config
    (``TrainConfig.compression``, as the trainer passes it).

    Example::
        stats = register_baseline_hook(ddp_model, "powersgd", rank=4)
        ...train...
        print(stats.snapshot()["bytes_total"])
    """
    cfg = baseline_config(baseline, **options) if isinstance(baseline, str) else baseline
    cls = BASELINES[cfg.name]
    backend = dist.get_backend()
    if backend not in cls.backends:
        raise ValueError(f"compression={cfg.name}: needs the {' or '.join(b.upper() for b in cls.backends)} "
                         f"backend, this process group is {backend}{cls.backend_hint}")
    topology = topology or Topology.from_env()
    stats = CommStats()
    cls.register_hook(ddp_model, cfg, stats=stats, topology=topology)
    return stats


__all__ = ["BASELINES", "Baseline", "BaselineConfig", "PowerSGDConfig", "baseline_config", "register_baseline",
           "register_baseline_hook"]
