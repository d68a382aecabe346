"""Weight-sharing supernet training on top of :class:`Trainer`: the step, its checkpoint state, the report.

Picked by the entry point when the model family is registered with
``supernet=True`` (``model=ofa_cnn``, ``model=elastic_vit``); the ``supernet``
config group says how (``conf/supernet/*.yaml``).

One optimizer step, on every rank (top to bottom in :meth:`train_step`):

1. the sampler draws the step's archs from the global step alone, so every rank
   draws the same (sandwich: max, min, ``num_archs`` random; progressive
   shrinking restricts which dimensions vary at this step);
2. with Birder, the union of the archs' parameter masks goes to
   ``optimizer.set_grad_mask``: elements no subnet of the step reads are not
   moved and their m, b are not decayed (derived from the archs, hence the
   same on every rank);
3. per micro-batch, per arch: ``set_active``, forward, loss, backward. The max
   subnet (first in a sandwich) learns the labels; the others learn its
   detached soft labels (in-place distillation, ``student_loss``). Every
   backward but the very last of the step runs under ``no_sync()``, so the
   gradients of all subnets and micro-batches accumulate locally and the
   compression hook exchanges them ONCE;
4. optimizer and LR schedule step.

The logged ``loss`` is the first subnet's cross-entropy (the max subnet's in a sandwich).
``evaluate()`` scores the max subnet after BN recalibration. After the last
step, ``_finish`` searches and reports subnets (``supernet_report``).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from dist_supernet.optim import Birder
from dist_supernet.supernet import (
    Supernet,
    arch_key,
    build_sampler,
    elastic_at,
    student_loss,
)
from dist_supernet.train.supernet_report import SubnetEvaluator, search_and_report
from dist_supernet.train.trainer import Trainer

_MASK_CACHE_SIZE = 64  # flat masks of recent archs; max and min recur every sandwich step


class SupernetTrainer(Trainer):
    """:class:`Trainer` for a weight-sharing supernet: sampled subnets per step, search and export at the end.

    Example::
        trainer = SupernetTrainer(cfg, output_dir=Path("outputs/run"))   # cfg.model.name=ofa_cnn, cfg.supernet
        summary = trainer.fit()   # also writes subnets.json, subnets/*.pt and pareto.png
    """

    def __init__(self, cfg: DictConfig, output_dir: Path, *, check_only: bool = False):
        self._mask_cache: dict[str, torch.Tensor] = {}
        self.report: dict | None = None
        super().__init__(cfg, output_dir, check_only=check_only)
        if check_only:  # the pre-flight: Trainer's validation pass (the supernet group included), no process group
            return
        recal = self.scfg.get("bn_recalibration") or {}
        self.evaluator = SubnetEvaluator(self.model, self.data, batch_size=self.cfg.trainer.batch_size,
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
        self.max_key = arch_key(model.max_arch())

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
        return {
            "supernet": {
                "max_accuracy": by_name["max"]["accuracy"],
                "min_accuracy": by_name["min"]["accuracy"],
                "searched": [{k: e[k] for k in ("name", "flops_limit", "flops", "params", "accuracy")}
                             for e in self.report["subnets"] if "flops_limit" in e],
                "sampler": self.arch_sampler.name,
                "subnets_file": "subnets.json",
                "report_wall_time_s": self.report["wall_time_s"],
            }
        }

    # -- the step ------------------------------------------------------------------------

    def elastic_dims(self, step: int) -> frozenset[str]:
        return elastic_at(self.scfg["progressive_shrinking"], step, self.model.elastic_dims)

    def train_step(self) -> torch.Tensor:
        """One optimizer step: every sampled subnet on every micro-batch, one exchange; returns the logged loss."""
        archs = self.arch_sampler.sample(self.step, self.elastic_dims(self.step))
        if isinstance(self.optimizer, Birder):
            self.optimizer.set_grad_mask(self._step_mask(archs))
        has_teacher = arch_key(archs[0]) == self.max_key
        num_micro = self.cfg.trainer.grad_accum
        logged_loss = torch.zeros((), device=self.device)
        for micro in range(num_micro):
            index = next(self.sampler)
            x, y = self.data.x_train[index].to(self.device), self.data.y_train[index].to(self.device)
            teacher_logits = None
            for i, arch in enumerate(archs):
                self.model.set_active(arch)
                last = micro == num_micro - 1 and i == len(archs) - 1
                with contextlib.nullcontext() if last else self.ddp_model.no_sync():
                    logits = self.ddp_model(x)
                    if teacher_logits is None:  # the teacher itself, or no teacher in this step
                        loss = F.cross_entropy(logits, y)
                    else:
                        loss = student_loss(logits, y, teacher_logits, self.distill_weight, self.distill_temperature)
                    (loss / num_micro).backward()
                if i == 0:
                    logged_loss += loss.detach() / num_micro
                    if has_teacher:
                        teacher_logits = logits.detach()
        self.nonfinite.step(self.step + 1)  # optimizer.step(), or skipped on every rank if any saw NaN/Inf
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return logged_loss

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
    def evaluate(self, split: str = "val") -> tuple[float, float]:
        """Loss and accuracy of the max subnet on ``split`` after BN recalibration (the supernet is left as it was)."""
        return self.evaluator.score(self.model.max_arch(), split=split)

    def _finish(self, last_row: dict | None, wall_time_s: float) -> dict:
        comp = self.cfg.compression
        title = (f"{self.cfg.model['name']} supernet, {self.step} steps, {comp.name}/{comp.collective}, "
                 f"{self.world_size} ranks")
        self.report = search_and_report(
            self.model, self.evaluator, self.scfg.get("search") or {}, elastic=self.elastic_dims(max(0, self.step - 1)),
            seed=self.cfg.trainer.seed, output_dir=self.output_dir, is_rank0=self.is_rank0, title=title,
        )
        return super()._finish(last_row, wall_time_s)
