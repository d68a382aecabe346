"""Birder in the Hugging Face ``Trainer``: the Trainer builds Birder, ``BirderCallback`` attaches it.

The lines a script changes::

    trainer = Trainer(model=model, args=args, train_dataset=train,
                      optimizer_cls_and_kwargs=(Birder, {"lr": 3e-3}))   # new: Birder instead of AdamW
    trainer.add_callback(BirderCallback(trainer))                        # new: the 1-bit exchange

Where each piece goes, and why:

- ``optimizer_cls_and_kwargs``: the Trainer's own ``create_optimizer`` builds Birder from its
  decay / no-decay parameter groups (``args.weight_decay`` on the first, 0 on the second) with these
  keyword arguments; Birder's ``lr`` is its own (every coordinate moves at most lr per step, so it
  is not AdamW's ``args.learning_rate``). The Trainer's LR schedule (warm-up, decay) scales it.
  ``optimizers=(Birder(...), None)`` works as well.
- The Trainer wraps the model in DDP inside ``train()`` (``accelerator.prepare``), after it built
  the optimizer and loaded a checkpoint, and calls ``on_train_begin`` right after that, before the
  first forward: the callback attaches Birder there to ``trainer.model_wrapped`` (the DDP module).
  A callback composes with any Trainer subclass (``Seq2SeqTrainer``, TRL's trainers).
- Checkpoints: the Trainer writes ``optimizer.pt`` on rank 0 only, and Birder's m, b differ per
  rank. Before every save (on the step or epoch where ``control.should_save`` is set, or each
  evaluation with ``save_strategy="best"``) the callback gathers every rank's m, b into rank 0's
  state dict (``Birder.consolidate_state_dict``: 8 bytes per parameter per rank on rank 0 while it
  saves); on ``resume_from_checkpoint`` each rank loads its own, and training continues
  bit-identically (same world size; another world size starts every rank from their mean).
  ``save_on_each_node=True`` saves on ranks that hold only their own m, b: those nodes resume from
  them, with Birder's warning.
- ``max_grad_norm`` (on by default) clips ``.grad`` after backward; with Birder ``.grad`` holds this
  rank's own gradient (the exchange ran during backward), so the logged ``grad_norm`` is rank 0's
  own gradient norm and clipping cannot rescale Birder's update (every coordinate moves at most lr).

One process (no DDP wrap): nothing to attach, Birder runs locally. FSDP or DeepSpeed: TypeError at
``on_train_begin``. Importing this module needs no transformers; ``BirderCallback`` is built from
``transformers.TrainerCallback`` on first use.
"""

from dist_supernet.integrations._wrapped import attach_wrapped, find_birder


def _build_callback_class():
    try:
        from transformers import TrainerCallback
    except ImportError as error:
        raise ImportError("dist_supernet.integrations.transformers.BirderCallback needs transformers "
                          f"(pip install transformers): {error}") from error
    import torch.distributed as dist

    class BirderCallback(TrainerCallback):
        """Attaches the Trainer's Birder after the Trainer's DDP wrap; puts every rank's m, b in its checkpoints.

        Example::
            trainer = Trainer(model=model, args=args, train_dataset=train,
                              optimizer_cls_and_kwargs=(Birder, {"lr": 3e-3}))
            trainer.add_callback(BirderCallback(trainer))
            trainer.train()          # or trainer.train(resume_from_checkpoint=True)
        """

        def __init__(self, trainer):
            self.trainer = trainer

        def _birder(self, optimizer):
            return find_birder(optimizer if optimizer is not None else self.trainer.optimizer)

        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            if find_birder(optimizer) is None:
                raise TypeError(f"BirderCallback: the Trainer's optimizer is {type(optimizer).__name__}, not "
                                "dist_supernet.Birder; pass Trainer(..., optimizer_cls_and_kwargs=(Birder, "
                                "{'lr': ...})) or optimizers=(Birder(...), None)")
            attach_wrapped(self.trainer.model_wrapped, optimizer, where="BirderCallback")

        def _consolidate_if_saving(self, args, control, optimizer):
            birder = self._birder(optimizer)
            if args.save_only_model or birder is None or not birder.hooked:
                return
            if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
                return
            # Every rank reaches here on the same step: the flags below come from the global step and the
            # evaluation metrics, which the Trainer gathers, so the collective is called everywhere alike.
            best = str(getattr(args.save_strategy, "value", args.save_strategy)) == "best"
            if control.should_save or (best and control.should_evaluate):
                birder.consolidate_state_dict(to=0)

        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            self._consolidate_if_saving(args, control, optimizer)

        def on_epoch_end(self, args, state, control, optimizer=None, **kwargs):
            self._consolidate_if_saving(args, control, optimizer)

    BirderCallback.__module__ = __name__
    return BirderCallback


def __getattr__(name):
    if name == "BirderCallback":
        cls = _build_callback_class()
        globals()[name] = cls  # built once per process
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

