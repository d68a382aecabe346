"""After supernet training: BN recalibration, accuracy of subnets, evolutionary search, export, report files.

What a supernet run leaves in its output directory (rank 0 writes, every rank computes):

- ``subnets.json``: the max and min subnets and one searched subnet per FLOPs
  budget, each with arch, FLOPs (multiply-accumulates per image), params,
  test accuracy (``accuracy``) and val accuracy after BN recalibration; plus
  how the search ran;
- ``subnets/<name>.pt``: each of them exported to a plain module (``load_subnet``);
- ``pareto.png``: accuracy vs FLOPs of every subnet scored, with the Pareto front.

Accuracy of one subnet (:meth:`SubnetEvaluator.score`): its BN running stats
are re-estimated on ``num_batches`` train batches per rank (exact statistics,
all-reduced, see ``recalibrate_bn``), then the val (or test) split is scored; the shared
BN buffers are put back afterwards, so scoring leaves the supernet as it was.
Two ways, same numbers up to float summation order:

- distributed (every rank, collectives): rank r recalibrates on its batches and
  scores val[r::world], sums all-reduced — for the few reported subnets;
- local (one rank, no collectives): the same batches of ALL ranks and the whole
  val split on this rank — for the search with ``split_evaluation: true``,
  where each rank scores different candidates.

The subnet reported for a FLOPs budget is the most accurate subnet scored by
any of the searches (or the min subnet) that fits the budget. The search
scores on the val split; the report quotes the test split (``data.test_fraction``,
0.2 for digits), which nothing before it looked at, so a searched subnet's
number is not inflated by its selection. Without a test split the report
falls back to val and says so in ``subnets.json`` (``accuracy_split``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

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
_EVAL_CHUNK = 512  # val images per forward: bounds memory on bigger val splits


class SubnetEvaluator:
    """Scores subnets of ``model`` on ``data`` (a ``dist_supernet.data`` split) after BN recalibration.

    Construct on every rank (it creates one single-rank process group per rank
    for the local mode).

    Example::
        evaluator = SubnetEvaluator(model, data, batch_size=32, num_batches=20, seed=0, device=device)
        val_loss, accuracy = evaluator.score(model.max_arch())             # collective
        val_loss, accuracy = evaluator.score(arch, local=True)             # this rank alone
    """

    def __init__(self, model: Supernet, data, *, batch_size: int, num_batches: int, seed: int,
                 device: torch.device):
        self.model, self.data, self.device = model, data, device
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if distributed else 0
        self.world_size = dist.get_world_size() if distributed else 1
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
        self.num_recal_images = sum(len(c) for c in chunks)
        # Local mode recalibrates inside a group of one, so recalibrate_bn's all-reduce stays on this rank.
        self.local_group = dist.new_subgroups(group_size=1)[0] if distributed and self.world_size > 1 else None

    @property
    def report_split(self) -> str:
        """The split reported numbers come from: test when the dataset has one, else val."""
        return "test" if self.data.has_test else "val"

    @contextmanager
    def recalibrated(self, arch: dict, *, local: bool = False) -> Iterator[Supernet]:
        """``arch`` active with recalibrated BN stats inside the block; arch and BN buffers restored after."""
        model = self.model
        saved = {name: buf.clone() for name, buf in model.named_buffers()}
        with model.using(arch):
            try:
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
        """``(loss, accuracy)`` of the active subnet as it is (BN stats included) on ``split`` (val | test)."""
        if split not in ("val", "test"):
            raise ValueError(f"split={split!r}: expected val or test")
        was_training = model.training
        model.eval()
        x, y = (self.data.x_val, self.data.y_val) if split == "val" else (self.data.x_test, self.data.y_test)
        if not local:
            x, y = x[self.rank :: self.world_size], y[self.rank :: self.world_size]
        loss_sum, correct = 0.0, 0
        for start in range(0, len(y), _EVAL_CHUNK):
            xb, yb = x[start : start + _EVAL_CHUNK].to(self.device), y[start : start + _EVAL_CHUNK].to(self.device)
            logits = model(xb)
            loss_sum += F.cross_entropy(logits, yb, reduction="sum").item()
            correct += (logits.argmax(dim=1) == yb).sum().item()
        count = len(y)
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
                      output_dir: Path, is_rank0: bool, title: str = "") -> dict:
    """Search one subnet per FLOPs budget, score max / min / searched, export them, write the report files.

    Collective: call on every rank. Returns the ``subnets.json`` payload.
    """
    started = time.perf_counter()
    settings = {k: v for k, v in search_cfg.items() if k not in ("flops_limit", "flops_fractions")}
    split = bool(settings.pop("split_evaluation", True))
    budgets = flops_budgets(model, search_cfg, elastic)

    # One cache over all budgets: the searches share many candidates. With split evaluation
    # a rank scores alone (local), otherwise every rank scores every candidate together.
    cache: dict[str, float] = {}

    def accuracy(arch: dict) -> float:
        key = arch_key(arch)
        if key not in cache:
            cache[key] = evaluator.score(arch, local=split)[1]
        return cache[key]

    # arch key -> {"arch", "flops", "params", "accuracy"}: every subnet scored, for the picks and the plot.
    # The min subnet is scored too: it fits every budget and, trained at every sandwich step, it often
    # beats random subnets a few times its size after a short run.
    smallest = model.min_arch(elastic)
    candidates = {arch_key(smallest): {"arch": smallest, "flops": model.flops(smallest),
                                       "params": model.params(smallest), "accuracy": accuracy(smallest)}}
    histories = []
    for i, budget in enumerate(budgets):
        result = evolutionary_search(model, accuracy, flops_limit=budget, elastic=elastic, seed=seed + i,
                                     split_evaluation=split, **settings)
        for entry in result.evaluated:
            candidates[arch_key(entry["arch"])] = {"arch": entry["arch"], "flops": entry["flops"],
                                                   "params": entry["params"], "accuracy": entry["score"]}
        histories.append([round(score, 4) for score in result.history])  # best accuracy after each generation
    # Per budget, the best subnet scored by ANY search (or the min) that fits it; ties to fewer FLOPs.
    searched = []
    for i, budget in enumerate(budgets):
        fits = [c for c in candidates.values() if c["flops"] <= budget]
        best = max(fits, key=lambda c: (c["accuracy"], -c["flops"], arch_key(c["arch"])))
        searched.append((f"searched_{i + 1}", budget, best["arch"]))
    if dist.is_available() and dist.is_initialized():
        # Locally scored anchors may differ in the last bit between ranks: rank 0's picks for everyone.
        box = [searched]
        dist.broadcast_object_list(box, src=0)
        searched = box[0]
    search_wall_s = time.perf_counter() - started

    named = [("max", None, model.max_arch()), ("min", None, model.min_arch(elastic)), *searched]
    subnet_dir = output_dir / "subnets"
    if is_rank0:
        subnet_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    report_split = evaluator.report_split
    for name, budget, arch in named:
        with evaluator.recalibrated(arch) as recalibrated:
            val_loss, val_acc = evaluator.score_active(recalibrated)
            loss, acc = evaluator.score_active(recalibrated, split=report_split)
            if is_rank0:
                save_subnet(subnet_dir / f"{name}.pt", export_subnet(recalibrated, arch))
        entry = {"name": name, "arch": arch, "flops": model.flops(arch), "params": model.params(arch),
                 "accuracy": acc, "loss": loss, "val_accuracy": val_acc, "val_loss": val_loss,
                 "file": f"subnets/{name}.pt"}
        if budget is not None:
            entry["flops_limit"] = budget
        entries.append(entry)

    report = {
        "flops": "multiply-accumulates per image (convs and linear layers)",
        "accuracy": f"{report_split} split ({len(evaluator.data.y_test if report_split == 'test' else evaluator.data.y_val)}"
                    f" images) after BN recalibration on {evaluator.num_recal_images} train images; the search "
                    f"scored candidates on the val split ({len(evaluator.data.y_val)} images)",
        "accuracy_split": report_split,
        "subnets": entries,
        "search": {"flops_limits": budgets, "split_evaluation": split, "num_evaluated": len(candidates),
                   "best_per_generation": histories, "wall_time_s": round(search_wall_s, 3), **settings},
        "wall_time_s": round(time.perf_counter() - started, 3),
    }
    if is_rank0:
        (output_dir / "subnets.json").write_text(json.dumps(report, indent=2) + "\n")
        plot_subnets(list(candidates.values()), entries, output_dir / "pareto.png", title=title,
                     report_split=report_split)
        log.info("subnets (after BN recalibration; search on val, %d candidates scored in %.1f s; "
                 "accuracy = %s split):\n%s", len(candidates), search_wall_s, report_split, format_table(entries))
    return report


def format_table(entries: list[dict]) -> str:
    """The subnets as an aligned text table (what rank 0 logs): val accuracy (searched on), reported accuracy."""
    lines = [f"  {'subnet':<12} {'MFLOPs':>8} {'limit':>8} {'params':>8} {'val acc':>8} {'accuracy':>9}"]
    for e in entries:
        limit = f"{e['flops_limit'] / 1e6:8.3f}" if "flops_limit" in e else f"{'':>8}"
        val = e.get("val_accuracy", e["accuracy"])
        lines.append(f"  {e['name']:<12} {e['flops'] / 1e6:8.3f} {limit} {e['params']:8d} {val:8.4f} "
                     f"{e['accuracy']:9.4f}")
    return "\n".join(lines)


def plot_subnets(candidates: list[dict], entries: list[dict], path: str | os.PathLike, *, title: str = "",
                 report_split: str = "test") -> None:
    """Scatter every scored candidate, the Pareto front over all points, and the named subnets labelled."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    scale = 1e-6
    # Everything on the val split (what the search compared); the named subnets' labels add the reported one.
    val = lambda e: e.get("val_accuracy", e["accuracy"])  # noqa: E731
    points = [(c["flops"], c["accuracy"]) for c in candidates] + [(e["flops"], val(e)) for e in entries]
    front = pareto_front(points)
    fig = Figure(figsize=(6.4, 4.8), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if candidates:
        ax.scatter([c["flops"] * scale for c in candidates], [c["accuracy"] for c in candidates], s=10,
                   alpha=0.35, color="C0", label="subnets scored by the search")
    ax.plot([f * scale for f, _ in front], [a for _, a in front], "-", color="C3", drawstyle="steps-post",
            label="Pareto front")
    for i, e in enumerate(entries):
        ax.scatter([e["flops"] * scale], [val(e)], marker="*" if "flops_limit" in e else "o", s=110,
                   color=f"C{2 + i % 7}" if i else "C1", zorder=3, edgecolors="black", linewidths=0.5)
        label = f"{e['name']} {val(e):.3f}" + (f" ({report_split} {e['accuracy']:.3f})" if report_split != "val" else "")
        ax.annotate(label, (e["flops"] * scale, val(e)),
                    textcoords="offset points", xytext=(5, -11), fontsize=8)
        if "flops_limit" in e:
            ax.axvline(e["flops_limit"] * scale, color="gray", lw=0.6, ls=":")
    ax.set_xlabel("MFLOPs per image (multiply-accumulates)")
    ax.set_ylabel("val accuracy after BN recalibration")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(os.fspath(path))
