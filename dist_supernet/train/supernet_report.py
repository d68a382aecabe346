"""After supernet training: BN recalibration, scores of subnets, evolutionary search, export, report files.

What a supernet run leaves in its output directory (rank 0 writes, every rank computes):

- ``subnets.json``: the max and min subnets, any ``supernet.report_archs``, and one
  searched subnet per FLOPs budget, each with arch, FLOPs (multiply-accumulates per
  image, or per token for a language model), params, and its metrics on the
  reported split and on val (images: ``accuracy``, ``loss``, ``val_accuracy``,
  ``val_loss`` after BN recalibration; text: ``perplexity``, ``loss``,
  ``val_perplexity``, ``val_loss``); plus how the search ran;
- ``subnets/<name>.pt``: each of them exported to a plain module (``load_subnet``);
- ``pareto.png``: accuracy (images) or val perplexity (text) vs FLOPs of every subnet
  scored, with the Pareto front.

Score of one subnet (:meth:`SubnetEvaluator.score`): for a model with BatchNorm its
running stats are re-estimated on ``num_batches`` train batches per rank (exact
statistics, all-reduced, see ``recalibrate_bn``) and put back afterwards, so scoring
leaves the supernet as it was; then the data's fixed evaluation set of the val (or
test) split is scored (``data.eval_batches``: every image, or ``data.eval_windows``
windows of text): mean loss per target and accuracy. Two ways, same numbers up to
float summation order:

- distributed (every rank, collectives): rank r recalibrates on its batches and
  scores its interleaved share of the set, sums all-reduced — for the few reported subnets;
- local (one rank, no collectives): the same batches of ALL ranks and the whole
  set on this rank — for the search with ``split_evaluation: true``,
  where each rank scores different candidates.

The search maximises accuracy (images) or minimises the val loss, i.e. the
perplexity (text). The subnet reported for a FLOPs budget is the best subnet scored
by any of the searches (or the min subnet) that fits the budget. The search scores
on the val split; the report quotes the test split (``data.test_fraction``), which
nothing before it looked at, so a searched subnet's number is not inflated by its
selection. Without a test split the report falls back to val and says so in
``subnets.json`` (``report_split``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from dist_supernet.supernet import (
    Supernet,
    arch_key,
    evolutionary_search,
    export_subnet,
    pareto_front,
    recalibrate_bn,
    save_subnet,
)

log = logging.getLogger(__name__)

DEFAULT_FLOPS_FRACTIONS = (0.25, 0.5, 0.75)


class SubnetEvaluator:
    """Scores subnets of ``model`` on ``data`` (a ``dist_supernet.data`` dataset, images or text).

    Images: after BN recalibration, accuracy. Text: the next-token loss and its perplexity
    (no BatchNorm, nothing to recalibrate). Construct on every rank (it creates one
    single-rank process group per rank for the local mode).

    Example::
        evaluator = SubnetEvaluator(model, data, batch_size=32, num_batches=20, seed=0, device=device)
        val_loss, accuracy = evaluator.score(model.max_arch())             # collective
        val_loss, accuracy = evaluator.score(arch, local=True)             # this rank alone
        evaluator.metrics(val_loss, accuracy)                             # {"loss", "accuracy" | "perplexity"}
    """

    def __init__(self, model: Supernet, data, *, batch_size: int, num_batches: int, seed: int,
                 device: torch.device):
        self.model, self.data, self.device, self.batch_size = model, data, device, batch_size
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if distributed else 0
        self.world_size = dist.get_world_size() if distributed else 1
        self.metric = "perplexity" if data.kind == "text" else "accuracy"  # what the report and the plot show
        self.batches: list[torch.Tensor] = []
        if any(isinstance(m, _BatchNorm) for m in model.modules()):
            # Recalibration images: a fixed draw from the train split (not the training stream, which it
            # must not advance), cut into training-size batches (BN sees batch statistics as in training);
            # batch j belongs to rank j % world_size.
            generator = torch.Generator().manual_seed(seed + 7919)
            num_train = len(data.y_train)
            take = min(num_train, self.world_size * num_batches * batch_size)
            chunks = list(torch.randperm(num_train, generator=generator)[:take].split(batch_size))
            if len(chunks) > 1 and len(chunks[-1]) < batch_size:
                chunks.pop()
            self.batches = chunks
        self.num_recal_images = sum(len(c) for c in self.batches)
        # Local mode recalibrates inside a group of one, so recalibrate_bn's all-reduce stays on this rank.
        self.local_group = dist.new_subgroups(group_size=1)[0] if distributed and self.world_size > 1 else None

    @property
    def report_split(self) -> str:
        """The split reported numbers come from: test when the dataset has one, else val."""
        return "test" if self.data.has_test else "val"

    def metrics(self, loss: float, accuracy: float) -> dict:
        """The data's metrics of a score: ``{"loss", "accuracy"}`` (images) or ``{"loss", "perplexity"}`` (text)."""
        return self.data.eval_metrics(loss, accuracy)

    def objective(self, loss: float, accuracy: float) -> float:
        """What the search maximises: accuracy (images), minus the loss (text: the lowest perplexity)."""
        return -loss if self.metric == "perplexity" else accuracy

    def metric_of(self, objective: float) -> float:
        """The reported metric of an :meth:`objective` value (perplexity = exp(loss) for text)."""
        return math.exp(min(-objective, 700.0)) if self.metric == "perplexity" else objective

    def describe_split(self, split: str) -> str:
        """``"val split (180 images)"`` or ``"val split (128 windows of 128 tokens)"``."""
        if self.data.kind == "text":
            windows = len(self.data.eval_windows_of(split, self.model.block_size))
            return f"{split} split ({windows} windows of {self.model.block_size} tokens)"
        return f"{split} split ({len(self.data.y_test if split == 'test' else self.data.y_val)} images)"

    @contextmanager
    def recalibrated(self, arch: dict, *, local: bool = False) -> Iterator[Supernet]:
        """``arch`` active with recalibrated BN stats inside the block; arch and BN buffers restored after."""
        model = self.model
        saved = {name: buf.clone() for name, buf in model.named_buffers()}
        with model.using(arch):
            try:
                if self.batches:
                    mine = self.batches if local else self.batches[self.rank :: self.world_size]
                    batches = (self.data.x_train[index] for index in mine)
                    recalibrate_bn(model, batches, group=self.local_group if local else None)
                yield model
            finally:
                for name, buf in model.named_buffers():
                    buf.copy_(saved[name])

    @torch.no_grad()
    def score(self, arch: dict, *, local: bool = False, split: str = "val") -> tuple[float, float]:
        """``(loss, accuracy)`` of ``arch`` on ``split`` after BN recalibration; collective unless ``local``."""
        with self.recalibrated(arch, local=local) as model:
            return self.score_active(model, local=local, split=split)

    @torch.no_grad()
    def score_active(self, model: Supernet, *, local: bool = False, split: str = "val") -> tuple[float, float]:
        """``(loss, accuracy)`` of the active subnet as it is (BN stats included) on ``split`` (val | test).

        The loss is the mean cross-entropy per target (an image's label, or each next token).
        """
        if split not in ("val", "test"):
            raise ValueError(f"split={split!r}: expected val or test")
        was_training = model.training
        model.eval()
        rank, world = (0, 1) if local else (self.rank, self.world_size)
        loss_sum, correct, count = 0.0, 0, 0
        for x, y in self.data.eval_batches(split, rank=rank, world_size=world, batch_size=self.batch_size,
                                           model=model):
            x, y = x.to(self.device), y.to(self.device)
            logits = model(x)
            loss_sum += F.cross_entropy(logits.flatten(0, -2), y.flatten(), reduction="sum").item()
            correct += (logits.argmax(dim=-1) == y).sum().item()
            count += y.numel()
        model.train(was_training)
        if not local and self.world_size > 1:
            totals = torch.tensor([loss_sum, correct, count], dtype=torch.float64, device=self.device)
            dist.all_reduce(totals)
            loss_sum, correct, count = totals.tolist()
        return loss_sum / count, correct / count


def flops_budgets(model: Supernet, search_cfg: Mapping, elastic) -> list[int | None]:
    """The FLOPs limits to search under: ``flops_limit`` if set, else one per ``flops_fractions`` entry.

    Example::
        >>> from dist_supernet.supernet import OFACNN
        >>> net = OFACNN(1, 8, 10)
        >>> low, high = net.flops(net.min_arch()), net.flops(net.max_arch())
        >>> flops_budgets(net, {"flops_fractions": [0.0, 1.0]}, None) == [low, high]
        True
    """
    if search_cfg.get("flops_limit") is not None:
        return [int(search_cfg["flops_limit"])]
    fractions = search_cfg.get("flops_fractions") or DEFAULT_FLOPS_FRACTIONS
    low, high = model.flops(model.min_arch(elastic)), model.flops(model.max_arch())
    return [int(round(low + f * (high - low))) for f in fractions]


def search_and_report(model: Supernet, evaluator: SubnetEvaluator, search_cfg: Mapping, *, elastic, seed: int,
                      output_dir: Path, is_rank0: bool, title: str = "",
                      report_archs: Mapping[str, dict] | None = None) -> dict:
    """Search one subnet per FLOPs budget, score max / min / ``report_archs`` / searched, export them, write the
    report files.

    ``report_archs``: more subnets to score and export by name (``supernet.report_archs``), e.g. the ones a
    benchmark compares with standalone twins. Collective: call on every rank. Returns the ``subnets.json`` payload.
    """
    started = time.perf_counter()
    settings = {k: v for k, v in search_cfg.items() if k not in ("flops_limit", "flops_fractions")}
    split = bool(settings.pop("split_evaluation", True))
    budgets = flops_budgets(model, search_cfg, elastic)
    metric = evaluator.metric

    # One cache over all budgets: the searches share many candidates. With split evaluation
    # a rank scores alone (local), otherwise every rank scores every candidate together.
    cache: dict[str, float] = {}

    def objective(arch: dict) -> float:
        key = arch_key(arch)
        if key not in cache:
            cache[key] = evaluator.objective(*evaluator.score(arch, local=split))
        return cache[key]

    def candidate(arch: dict, flops: int, params: int, score: float) -> dict:
        return {"arch": arch, "flops": flops, "params": params, "score": score, metric: evaluator.metric_of(score)}

    # arch key -> {"arch", "flops", "params", "score", <metric>}: every subnet scored, for the picks and the plot.
    # The min subnet is scored too: it fits every budget and, trained at every sandwich step, it often
    # beats random subnets a few times its size after a short run.
    smallest = model.min_arch(elastic)
    candidates = {arch_key(smallest): candidate(smallest, model.flops(smallest), model.params(smallest),
                                                objective(smallest))}
    histories = []
    for i, budget in enumerate(budgets):
        result = evolutionary_search(model, objective, flops_limit=budget, elastic=elastic, seed=seed + i,
                                     split_evaluation=split, **settings)
        for entry in result.evaluated:
            candidates[arch_key(entry["arch"])] = candidate(entry["arch"], entry["flops"], entry["params"],
                                                            entry["score"])
        # The best metric (accuracy or perplexity) after each generation.
        histories.append([round(evaluator.metric_of(score), 4) for score in result.history])
    # Per budget, the best subnet scored by ANY search (or the min) that fits it; ties to fewer FLOPs.
    searched = []
    for i, budget in enumerate(budgets):
        fits = [c for c in candidates.values() if c["flops"] <= budget]
        best = max(fits, key=lambda c: (c["score"], -c["flops"], arch_key(c["arch"])))
        searched.append((f"searched_{i + 1}", budget, best["arch"]))
    if dist.is_available() and dist.is_initialized():
        # Locally scored anchors may differ in the last bit between ranks: rank 0's picks for everyone.
        box = [searched]
        dist.broadcast_object_list(box, src=0)
        searched = box[0]
    search_wall_s = time.perf_counter() - started

    extra = [(name, None, model.validate_arch(arch)) for name, arch in (report_archs or {}).items()]
    named = [("max", None, model.max_arch()), ("min", None, model.min_arch(elastic)), *searched, *extra]
    subnet_dir = output_dir / "subnets"
    if is_rank0:
        subnet_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    report_split = evaluator.report_split
    for name, budget, arch in named:
        with evaluator.recalibrated(arch) as recalibrated:
            val = evaluator.metrics(*evaluator.score_active(recalibrated))
            reported = evaluator.metrics(*evaluator.score_active(recalibrated, split=report_split))
            if is_rank0:
                save_subnet(subnet_dir / f"{name}.pt", export_subnet(recalibrated, arch))
        entry = {"name": name, "arch": arch, "flops": model.flops(arch), "params": model.params(arch), **reported,
                 **{f"val_{k}": v for k, v in val.items()}, "file": f"subnets/{name}.pt"}
        if budget is not None:
            entry["flops_limit"] = budget
        entries.append(entry)

    recal = f" after BN recalibration on {evaluator.num_recal_images} train images" if evaluator.batches else ""
    report = {
        "flops": model.flops_note,
        "metric": metric,
        metric: f"{evaluator.describe_split(report_split)}{recal}; the search scored candidates on the "
                f"{evaluator.describe_split('val')}",
        "report_split": report_split,
        "subnets": entries,
        "search": {"flops_limits": budgets, "split_evaluation": split, "num_evaluated": len(candidates),
                   "best_per_generation": histories, "wall_time_s": round(search_wall_s, 3), **settings},
        "wall_time_s": round(time.perf_counter() - started, 3),
    }
    if metric == "accuracy":
        report["accuracy_split"] = report_split  # the name subnets.json has always used for images
    if is_rank0:
        (output_dir / "subnets.json").write_text(json.dumps(report, indent=2) + "\n")
        plot_subnets(list(candidates.values()), entries, output_dir / "pareto.png", title=title,
                     report_split=report_split, metric=metric, per_token=metric == "perplexity")
        log.info("subnets (%ssearch on val, %d candidates scored in %.1f s; %s = %s split):\n%s",
                 "after BN recalibration; " if evaluator.batches else "", len(candidates), search_wall_s, metric,
                 report_split, format_table(entries, metric=metric, report_split=report_split))
    return report


def format_table(entries: list[dict], *, metric: str = "accuracy", report_split: str = "test") -> str:
    """The subnets as an aligned text table (what rank 0 logs).

    Images: val accuracy (searched on) and the reported accuracy. Text: MFLOPs per token, val loss, val
    perplexity (searched on) and the reported split's perplexity.
    """
    if metric == "perplexity":
        lines = [f"  {'subnet':<12} {'MFLOPs/tok':>10} {'limit':>8} {'params':>8} {'val loss':>8} {'val ppl':>8} "
                 f"{report_split + ' ppl':>9}"]
        for e in entries:
            limit = f"{e['flops_limit'] / 1e6:8.3f}" if "flops_limit" in e else f"{'':>8}"
            lines.append(f"  {e['name']:<12} {e['flops'] / 1e6:10.3f} {limit} {e['params']:8d} {e['val_loss']:8.4f} "
                         f"{e['val_perplexity']:8.3f} {e['perplexity']:9.3f}")
        return "\n".join(lines)
    lines = [f"  {'subnet':<12} {'MFLOPs':>8} {'limit':>8} {'params':>8} {'val acc':>8} {'accuracy':>9}"]
    for e in entries:
        limit = f"{e['flops_limit'] / 1e6:8.3f}" if "flops_limit" in e else f"{'':>8}"
        val = e.get("val_accuracy", e["accuracy"])
        lines.append(f"  {e['name']:<12} {e['flops'] / 1e6:8.3f} {limit} {e['params']:8d} {val:8.4f} "
                     f"{e['accuracy']:9.4f}")
    return "\n".join(lines)


def plot_subnets(candidates: list[dict], entries: list[dict], path: str | os.PathLike, *, title: str = "",
                 report_split: str = "test", metric: str = "accuracy", per_token: bool = False) -> None:
    """Scatter every scored candidate, the Pareto front over all points, and the named subnets labelled.

    ``metric``: ``accuracy`` (higher is better) or ``perplexity`` (lower is better; the front is the lowest).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    scale = 1e-6
    sign = -1.0 if metric == "perplexity" else 1.0  # pareto_front keeps the highest: negate what should be low
    # Everything on the val split (what the search compared); the named subnets' labels add the reported one.
    val = lambda e: e.get(f"val_{metric}", e[metric])  # noqa: E731
    points = [(c["flops"], sign * c[metric]) for c in candidates] + [(e["flops"], sign * val(e)) for e in entries]
    front = pareto_front(points)
    fig = Figure(figsize=(6.4, 4.8), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if candidates:
        ax.scatter([c["flops"] * scale for c in candidates], [c[metric] for c in candidates], s=10,
                   alpha=0.35, color="C0", label="subnets scored by the search")
    ax.plot([f * scale for f, _ in front], [sign * a for _, a in front], "-", color="C3", drawstyle="steps-post",
            label="Pareto front")
    digits = 2 if metric == "perplexity" else 3
    for i, e in enumerate(entries):
        ax.scatter([e["flops"] * scale], [val(e)], marker="*" if "flops_limit" in e else "o", s=110,
                   color=f"C{2 + i % 7}" if i else "C1", zorder=3, edgecolors="black", linewidths=0.5)
        label = f"{e['name']} {val(e):.{digits}f}" + (
            f" ({report_split} {e[metric]:.{digits}f})" if report_split != "val" else "")
        ax.annotate(label, (e["flops"] * scale, val(e)),
                    textcoords="offset points", xytext=(5, -11), fontsize=8)
        if "flops_limit" in e:
            ax.axvline(e["flops_limit"] * scale, color="gray", lw=0.6, ls=":")
    ax.set_xlabel("MFLOPs per token (multiply-accumulates)" if per_token
                  else "MFLOPs per image (multiply-accumulates)")
    ax.set_ylabel("val perplexity" if metric == "perplexity" else "val accuracy after BN recalibration")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right" if metric == "perplexity" else "lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(os.fspath(path))
