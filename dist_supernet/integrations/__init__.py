"""Birder in the frameworks people already train with: the glue, so that a script changes a line or two.

- :mod:`dist_supernet.integrations.lightning`: ``BirderDDPStrategy``, a Lightning ``DDPStrategy``
  that attaches every Birder ``configure_optimizers`` returns;
- :mod:`dist_supernet.integrations.accelerate`: ``attach(model, optimizer)`` after
  ``accelerator.prepare``;
- :mod:`dist_supernet.integrations.transformers`: ``BirderCallback`` for the Hugging Face
  ``Trainer`` (attach after the Trainer's DDP wrap; every rank's m, b in its checkpoints).

Each module imports its framework only when one of its names is used, so importing them needs none
of Lightning, Accelerate or transformers installed; using a name without its framework raises one
ImportError saying what to install.
"""
