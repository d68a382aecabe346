"""Weight-sharing supernet training on top of :class:`Trainer`: the step, its checkpoint state, the report.

Picked by the entry point when the model family is registered with
``supernet=True`` (``model=ofa_cnn``, ``model=elastic_vit`` on images,
``model=elastic_gpt`` on text); the ``supernet`` config group says how
(``conf/supernet/*.yaml``).

One optimizer step, on every rank, is :meth:`Trainer.train_step` running the
plan that :meth:`plan_step` makes:

1. the sampler draws the step's archs from the global step alone, so every rank
   draws the same (sandwich: max, min, ``num_archs`` random; progressive
   shrinking restricts which dimensions vary at this step): one pass each;
2. with Birder, the union of the archs' parameter masks goes to
   ``optimizer.set_grad_mask``: elements no subnet of the step reads are not
   moved and their m, b are not decayed (derived from the archs, hence the
   same on every rank);
3. per micro-batch, per arch: ``set_active``, forward, loss, backward. The max
   subnet (first in a sandwich) learns the labels; the others learn its
   detached soft labels (in-place distillation, :meth:`loss`; for a language
   model, its next-token distribution at every position). Every
   backward but the very last of the step runs under ``no_sync()``, so the
   gradients of all subnets and micro-batches accumulate locally and the
   compression hook exchanges them ONCE;
4. optimizer and LR schedule step.

The logged ``loss`` is the first subnet's cross-entropy (the max subnet's in a sandwich).
``evaluate()`` scores the max subnet (after BN recalibration, for a model with BN).
After the last step, ``_finish`` searches and reports subnets (``supernet_report``).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from dist_supernet.supernet import (
    Supernet,
    arch_key,
    build_sampler,
    elastic_at,
    student_loss,
)
from dist_supernet.train.supernet_report import SubnetEvaluator, search_and_report
from dist_supernet.train.trainer import StepPlan, SubnetPass, Trainer

_MASK_CACHE_SIZE = 64  # flat masks of recent archs; max and min recur every sandwich step


class SupernetTrainer(Trainer):
    """:class:`Trainer` for a weight-sharing supernet: sampled subnets per step, search and export at the end.

    Example::
        trainer = SupernetTrainer(cfg, output_dir=Path("outputs/run"))   # cfg.model.name=ofa_cnn, cfg.supernet
        summary = trainer.fit()   # also writes subnets.json, subnets/*.pt and pareto.png
    """

    def __init__(self, cfg: DictConfig, output_dir: Path, *, check_only: bool = False):
        super().__init__(cfg, output_dir, check_only=check_only)  # calls setup_model
        if check_only:  # the pre-flight: Trainer's validation pass (the supernet group included), no process group
            return
        recal = self.scfg.get("bn_recalibration") or {}
        # The whole supernet on this rank (hsdp: a replica gathered from the shards, refreshed before each use).
        self.evaluator = SubnetEvaluator(self.parallel.eval_model(), self.data, batch_size=self.cfg.trainer.batch_size,
                                         num_batches=recal.get("num_batches", 20), seed=self.cfg.trainer.seed,
                                         device=self.device)

    # -- hooks ---------------------------------------------------------------------------

    def setup_model(self, model: torch.nn.Module) -> None:
        assert isinstance(model, Supernet), f"model {self.cfg.model['name']} is registered as a supernet"
        self.scfg = self.checked.supernet  # checked against this family by the validation pass (check_config)
        self.arch_sampler = build_sampler(self.scfg.get("sampler") or {}, model, seed=self.cfg.trainer.seed)
        distill = self.scfg.get("distillation") or {}
        self.distill_weight = float(distill.get("weight", 1.0))
        self.distill_temperature = float(distill.get("temperature", 1.0))
        self.distill_start = int(distill.get("start_step", 0))
        self.max_key = arch_key(model.max_arch())
        self._mask_cache: dict[str, torch.Tensor] = {}
        self.report: dict | None = None  # the subnet report, after the last step

    def ddp_kwargs(self) -> dict:
        # DDP checks that every parameter got a gradient in the step's LAST backward (the only one
        # outside no_sync), and that one runs the last sampled subnet: a shallow one skips whole blocks
        # even in a sandwich step, where the max subnet (whose logits the others need first) runs
        # first. find_unused_parameters lets DDP reduce such parameters' locally accumulated gradients
        # anyway; Birder then also OR-reduces per-parameter "got a gradient" flags over the whole step.
        return {"find_unused_parameters": True}

    def extra_state(self) -> dict:
        return {"arch_sampler": self.arch_sampler.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        if "arch_sampler" in state:  # the sampler replays from the seed anyway; this restores its cache
            self.arch_sampler.load_state_dict(state["arch_sampler"])

    def extra_summary(self) -> dict:
        if self.report is None:
            return {}
        by_name = {e["name"]: e for e in self.report["subnets"]}
        metric = self.report["metric"]  # accuracy (images) or perplexity (text), on the reported split
        return {
            "supernet": {
                f"max_{metric}": by_name["max"][metric],
                f"min_{metric}": by_name["min"][metric],
                "searched": [{k: e[k] for k in ("name", "flops_limit", "flops", "params", metric)}
                             for e in self.report["subnets"] if "flops_limit" in e],
                "sampler": self.arch_sampler.name,
                "subnets_file": "subnets.json",
                "report_wall_time_s": self.report["wall_time_s"],
            }
        }

    # -- the step ------------------------------------------------------------------------

    def elastic_dims(self, step: int) -> frozenset[str]:
        return elastic_at(self.scfg["progressive_shrinking"], step, self.model.elastic_dims)

    def plan_step(self) -> StepPlan:
        """One pass per sampled arch; the max subnet, when sampled first (a sandwich), teaches the rest."""
        archs = self.arch_sampler.sample(self.step, self.elastic_dims(self.step))
        has_teacher = arch_key(archs[0]) == self.max_key
        passes = [SubnetPass(activate=functools.partial(self.model.set_active, arch), teaches=has_teacher and i == 0)
                  for i, arch in enumerate(archs)]
        return StepPlan(passes, grad_mask=functools.partial(self._step_mask, archs))

    def loss(self, logits: torch.Tensor, y: torch.Tensor, teacher_logits: torch.Tensor | None) -> torch.Tensor:
        """The labels for the teacher itself (or every subnet of a step without one), its soft labels for the rest.

        Logits ``[B, classes]`` or ``[B, T, vocab]`` (a language model: one distribution per position): both
        are flattened to one row per target, so the loss and the KL are means over targets.
        """
        logits, y = logits.flatten(0, -2), y.flatten()
        if teacher_logits is None:
            return F.cross_entropy(logits, y)
        # Before distillation.start_step the teacher is still near its initial guess: every subnet learns the labels.
        weight = self.distill_weight if self.step >= self.distill_start else 0.0
        return student_loss(logits, y, teacher_logits.flatten(0, -2), weight, self.distill_temperature)

    def _step_mask(self, archs: list[dict]) -> torch.Tensor:
        """Union of the archs' element masks, flat in parameter order (Birder's canonical order)."""
        union = None
        for arch in archs:
            key = arch_key(arch)
            flat = self._mask_cache.get(key)
            if flat is None:
                masks = self.model.active_masks(arch)
                flat = torch.cat([masks[p].reshape(-1) for p in self.model.parameters()])
                if len(self._mask_cache) >= _MASK_CACHE_SIZE:
                    self._mask_cache.pop(next(iter(self._mask_cache)))
                self._mask_cache[key] = flat
            union = flat.clone() if union is None else union.logical_or_(flat)
        return union

    # -- evaluation and the end ------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, split: str = "val") -> dict:
        """The data's metrics (``{"loss", "accuracy"}`` or ``{"loss", "perplexity"}``) of the max subnet on ``split``,
        after BN recalibration for a model with BN (the supernet is left as it was)."""
        self.parallel.eval_model()  # hsdp: refresh the replica the evaluator scores (a collective)
        loss, accuracy = self.evaluator.score(self.model.max_arch(), split=split)
        return self.data.eval_metrics(loss, accuracy)

    def _finish(self, last_row: dict | None, wall_time_s: float) -> dict:
        comp = self.cfg.compression
        title = (f"{self.cfg.model['name']} supernet, {self.step} steps, {comp.name}/{comp.collective}, "
                 f"{self.world_size} ranks")
        self.report = search_and_report(
            self.parallel.eval_model(), self.evaluator, self.scfg.get("search") or {},
            elastic=self.elastic_dims(max(0, self.step - 1)),
            seed=self.cfg.trainer.seed, output_dir=self.output_dir, is_rank0=self.is_rank0, title=title,
            report_archs=self.scfg.get("report_archs") or {},
        )
        # Each reported subnet's accuracies and size at the last step (TensorBoard; subnets.json has them all).
        self.metrics.scalars({f"subnet/{entry['name']}/{tag}": entry[key] * scale
                              for entry in self.report["subnets"]
                              for key, tag, scale in (("accuracy", "accuracy", 1), ("val_accuracy", "val_accuracy", 1),
                                                      ("flops", "mflops", 1e-6))
                              if entry.get(key) is not None}, step=self.step)
        return super()._finish(last_row, wall_time_s)
