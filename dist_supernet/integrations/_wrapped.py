"""Find Birder and the DDP module behind the wrappers frameworks put around them (no framework imported)."""

from torch.nn.parallel import DistributedDataParallel

from dist_supernet.optim import Birder


def find_birder(optimizer):
    """The :class:`Birder` inside ``optimizer`` (Accelerate's ``AcceleratedOptimizer`` and the like keep it
    as ``.optimizer``), or None."""
    seen = set()
    while optimizer is not None and not isinstance(optimizer, Birder) and id(optimizer) not in seen:
        seen.add(id(optimizer))
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer if isinstance(optimizer, Birder) else None


def find_ddp(model):
    """The DistributedDataParallel module ``model`` is or wraps (``torch.compile``'s ``_orig_mod``), or None."""
    seen = set()
    while model is not None and not isinstance(model, DistributedDataParallel) and id(model) not in seen:
        seen.add(id(model))
        model = getattr(model, "_orig_mod", None)
    return model if isinstance(model, DistributedDataParallel) else None


def attach_wrapped(model, optimizer, *, where: str) -> bool:
    """Attach the Birder in ``optimizer`` to the DDP module in ``model``; see ``accelerate.attach``.

    ``where`` names the caller in errors. True when attached (now or before), False on one process.
    """
    import torch.distributed as dist

    birder = find_birder(optimizer)
    if birder is None:
        raise TypeError(f"{where}: the optimizer is {type(optimizer).__name__}, not dist_supernet.Birder "
                        "(nor a wrapper holding one as .optimizer)")
    ddp = find_ddp(model)
    if ddp is None:
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world > 1:
            raise TypeError(f"{where}: {world} processes but the model is a {type(model).__name__}, not "
                            "DistributedDataParallel; this glue attaches Birder's DDP comm hook (a framework's "
                            "FSDP or DeepSpeed wrap is not supported; for 1-bit HSDP shard over each node's "
                            "ranks yourself and call birder.attach(model, mesh=hsdp_mesh()))")
        return False  # one process, no wrap: Birder runs locally
    if not birder.hooked:
        birder.attach(ddp)
    return True
