"""The Hugging Face Trainer recipe (examples/hf_trainer_birder.py) on 2 real gloo processes.

One spawn, two trainings of the example's own tiny GPT-2 on the project's character-level text corpus
(the recipe users copy is the one tested): A, 16 steps of 2 accumulated micro-batches with the
Trainer's clipping and checkpoints at steps 8 and 16; B, a fresh Trainer resumed from A's checkpoint-8. That clipping
cannot change Birder's update is tested on plain DDP (test_swap_in.py); here, that the Trainer's
clipping runs on each rank's real gradient.
"""

import importlib.util
import math
import os

import pytest
import torch

from tests.distributed.harness import identical_across_ranks, run_workers

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples")
STEPS, ACCUMULATE, CLIP = 16, 2, 1.0  # CLIP: TrainingArguments' default max_grad_norm


def _example(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _flat(tensors):
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def _run(example, output_dir, *, resume=None):
    from transformers import TrainerCallback

    class GradNorms(TrainerCallback):
        """This rank's gradient norm after the Trainer's clipping (the callback runs after it, before step())."""

        def __init__(self):
            self.after_clip = []

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.after_clip.append(float(torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(p.grad) for p in model.parameters() if p.grad is not None]))))

    norms = GradNorms()
    trainer = example.make_trainer(output_dir, max_steps=STEPS, save_steps=STEPS // 2, max_grad_norm=CLIP,
                                   accumulate=ACCUMULATE, callbacks=[norms])
    trainer.train(resume_from_checkpoint=resume)
    birder = trainer.optimizer.optimizer
    model = trainer.model
    logs = {row["step"]: row for row in trainer.state.log_history if "loss" in row}
    return dict(trainer=trainer, birder=birder, params=_flat(model.parameters()),
                m=_flat(birder.state[p]["m"] for p in model.parameters()),
                b=_flat(birder.state[p]["b"] for p in model.parameters()),
                losses=[logs[s]["loss"] for s in sorted(logs)], grad_norms=[logs[s]["grad_norm"] for s in sorted(logs)],
                after_clip=norms.after_clip)


def _worker(rank, world_size, root):
    from torch.nn.parallel import DistributedDataParallel

    example = _example("hf_trainer_birder")
    checks = {}
    a = _run(example, os.path.join(root, "a"))
    birder, stats = a["birder"], a["birder"].comm_stats.snapshot()
    checks["hooked"] = birder.hooked and isinstance(a["trainer"].model_wrapped, DistributedDataParallel)
    checks["steps"], checks["exchanges"] = birder.num_steps, stats["num_exchanges"]
    checks["bytes_per_param_step"] = stats["bytes_total"] / STEPS / a["params"].numel()
    checks["replicas_identical"] = identical_across_ranks(a["params"])
    checks["losses"] = a["losses"]
    checks["grad_norms"], checks["after_clip"] = a["grad_norms"], a["after_clip"]
    saved = torch.load(os.path.join(root, "a", f"checkpoint-{STEPS // 2}", "optimizer.pt"), weights_only=True)
    per_rank = saved["birder"]["per_rank"]
    checks["saved_per_rank_shape"] = None if per_rank is None else tuple(per_rank.shape[:2])

    b = _run(example, os.path.join(root, "b"), resume=os.path.join(root, "a", f"checkpoint-{STEPS // 2}"))
    checks["resumed_steps"] = b["birder"].num_steps
    checks["resume_params_identical"] = torch.equal(a["params"], b["params"])
    checks["resume_state_identical"] = torch.equal(a["m"], b["m"]) and torch.equal(a["b"], b["b"])
    checks["resume_losses_identical"] = a["losses"][STEPS // 2:] == b["losses"][STEPS // 2:]

    # Forgetting optimizer_cls_and_kwargs leaves the Trainer's AdamW: one clear error at train().
    callback = example.BirderCallback(a["trainer"])
    try:
        callback.on_train_begin(None, None, None, optimizer=torch.optim.AdamW(torch.nn.Linear(2, 2).parameters()))
        checks["adamw_error"] = None
    except TypeError as error:
        checks["adamw_error"] = str(error)
    return checks


def test_hf_trainer_recipe(tmp_path):
    pytest.importorskip("transformers")
    results = run_workers(_worker, 2, str(tmp_path), timeout_s=420)
    for rank, checks in enumerate(results):
        assert checks["hooked"], (rank, checks)
        # One 1-bit exchange per optimizer step (the micro-batches before it ran under no_sync()),
        # >= 16x below fp32's 4 bytes per parameter per step.
        assert checks["steps"] == STEPS and checks["exchanges"] == STEPS, (rank, checks)
        assert 0 < checks["bytes_per_param_step"] <= 4.0 / 16, (rank, checks["bytes_per_param_step"])
        assert checks["replicas_identical"], rank
        losses = checks["losses"]
        assert len(losses) == STEPS and sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, (rank, losses)
        # The Trainer clipped: its logged norm (rank 0's own gradient) went above max_grad_norm, and
        # after clipping every rank's .grad was within it.
        assert all(math.isfinite(n) for n in checks["grad_norms"]), checks["grad_norms"]
        assert max(checks["grad_norms"]) > CLIP, checks["grad_norms"]
        assert len(checks["after_clip"]) == STEPS and max(checks["after_clip"]) <= CLIP * (1 + 1e-4), checks
        # Resumed from checkpoint-8 on a fresh Trainer: the same params, m, b and losses as A at step 16.
        assert checks["resumed_steps"] == STEPS, checks
        assert checks["resume_params_identical"] and checks["resume_state_identical"], (rank, checks)
        assert checks["resume_losses_identical"], rank
        assert checks["saved_per_rank_shape"] == (2, 2), checks["saved_per_rank_shape"]  # every rank's m, b
        assert "optimizer_cls_and_kwargs=(Birder" in (checks["adamw_error"] or ""), checks["adamw_error"]
