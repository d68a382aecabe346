"""Birder in Hugging Face Accelerate: one call after ``accelerator.prepare``.

The lines a script changes::

    optimizer = Birder(groups, lr=3e-3)                    # was: torch.optim.AdamW(groups, lr=...)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    attach(model, optimizer)                               # new: the 1-bit exchange replaces DDP's all-reduce

Accelerate's own habits keep working: ``accelerator.accumulate(model)`` uses ``no_sync()`` (one
1-bit exchange per optimizer step), ``accelerator.clip_grad_norm_`` clips this rank's own gradient
(it cannot rescale Birder's update), ``mixed_precision="bf16"`` autocasts. Nothing here imports
Accelerate.
"""

from dist_supernet.integrations._wrapped import attach_wrapped


def attach(model, optimizer) -> bool:
    """Attach the Birder inside ``optimizer`` to the DDP module inside ``model`` (call on every rank).

    ``model`` and ``optimizer`` are what ``accelerator.prepare`` returned (an
    ``AcceleratedOptimizer`` is unwrapped, a ``torch.compile``-d DDP module too). Returns True
    when the hook is attached (calling again is a no-op), False on one process, where Accelerate
    does not wrap the model and Birder runs locally. TypeError if the optimizer holds no Birder, or
    if several processes run and the model is not DDP (FSDP, DeepSpeed).

    Example::
        model, optimizer = accelerator.prepare(model, Birder(model.parameters(), lr=3e-3))
        attach(model, optimizer)
    """
    return attach_wrapped(model, optimizer, where="dist_supernet.integrations.accelerate.attach")


__all__ = ["attach"]
