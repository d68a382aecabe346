"""Birder in PyTorch Lightning: ``configure_optimizers`` returns Birder, ``BirderDDPStrategy`` attaches it.

The lines a script changes::

    def configure_optimizers(self):
        return Birder(groups, lr=3e-3)                     # was: torch.optim.AdamW(groups, lr=...)

    trainer = pl.Trainer(strategy=BirderDDPStrategy(), ...)   # was: strategy="ddp"

Why a strategy subclass and not ``DDPStrategy(ddp_comm_hook=..., ddp_comm_state=...)``: Lightning
2.x registers ``ddp_comm_hook`` only when the root device is CUDA (on CPU/gloo it is dropped without
a word), and the hook state would have to exist before the process group does. Lightning builds the
optimizers right after it wraps the model in DDP (``DDPStrategy.setup``: ``configure_ddp()`` then
``setup_optimizers()``), so the subclass attaches every Birder there, on every rank, on CPU and GPU
alike. Lightning's habits keep working: ``gradient_clip_val`` clips this rank's own gradient (it
cannot rescale Birder's update), ``accumulate_grad_batches`` uses ``no_sync()`` (one 1-bit exchange
per optimizer step), ``precision="bf16-mixed"`` autocasts.

The class is built on first use from the Lightning that is installed: ``lightning.pytorch`` when
that is what the process imported (or the only one installed), else ``pytorch_lightning``. With both
installed, import your Lightning before this name. Importing this module needs no Lightning.
"""

import sys

_PACKAGES = ("pytorch_lightning", "lightning.pytorch")


def _ddp_strategy_base():
    order = _PACKAGES
    if "lightning.pytorch" in sys.modules and "pytorch_lightning" not in sys.modules:
        order = _PACKAGES[::-1]
    errors = []
    for package in order:
        try:
            module = __import__(f"{package}.strategies", fromlist=["DDPStrategy"])
            return module.DDPStrategy
        except ImportError as error:
            errors.append(f"{package}: {error}")
    raise ImportError("dist_supernet.integrations.lightning.BirderDDPStrategy needs PyTorch Lightning "
                      f"(pip install lightning, or pytorch-lightning); {'; '.join(errors)}")


def _build_strategy_class():
    from dist_supernet.optim import Birder

    base = _ddp_strategy_base()

    class BirderDDPStrategy(base):
        """Lightning's ``DDPStrategy`` that attaches every Birder optimizer to the DDP module it just built.

        Takes ``DDPStrategy``'s arguments (``process_group_backend="gloo"``, ``find_unused_parameters``,
        ``bucket_cap_mb``, ...).

        Example::
            trainer = pl.Trainer(accelerator="gpu", devices=8, strategy=BirderDDPStrategy())
            trainer.fit(module)   # module.configure_optimizers() returns Birder(...)
        """

        def setup_optimizers(self, trainer):
            super().setup_optimizers(trainer)  # calls configure_optimizers(), after configure_ddp()
            for optimizer in self.optimizers:
                if isinstance(optimizer, Birder) and not optimizer.hooked:
                    optimizer.attach(self.model)  # self.model is the DistributedDataParallel module here

    BirderDDPStrategy.__module__ = __name__
    return BirderDDPStrategy


def __getattr__(name):
    if name == "BirderDDPStrategy":
        cls = _build_strategy_class()
        globals()[name] = cls  # built once per process
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

