"""dist_supernet: Birder 1-bit compressed data-parallel training and weight-sharing supernets.

The one-line swap-in for existing DDP code::

    ddp_model = torch.nn.parallel.DistributedDataParallel(model)
    opt = dist_supernet.Birder(ddp_model, lr=3e-4, weight_decay=0.01)

Constructing :class:`Birder` from a DDP module registers the 1-bit comm hook.
"""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy so that `import dist_supernet` stays cheap and never touches torch.distributed.
    if name in ("Birder", "BirderDDP", "BirderState", "birder_hook"):
        from dist_supernet import optim

        return getattr(optim, name)
    raise AttributeError(f"module 'dist_supernet' has no attribute {name!r}")


__all__ = ["Birder", "BirderDDP", "BirderState", "birder_hook"]
