"""Does weight sharing cost the subnets quality? Supernet subnets vs the same archs trained alone.

Runs of the training application per seed, each ``torchrun --standalone
--nproc_per_node=2 -m dist_supernet.train``, with the same optimizer,
compression (default: Birder, 1 bit per element), data, batch, LR schedule and
step budget. Two families (``--family``):

- ``cnn`` (the default): the default main job (``model=ofa_cnn supernet=sandwich``
  on digits: max + min + 2 random subnets per step, in-place distillation); its
  ``subnets.json`` gives the max and the min subnet's test accuracy after BN
  recalibration. Standalone: ``model=subnet model.arch=max|min``, the same
  architecture as a plain module, initialised as the fresh supernet's slice
  (``export_subnet``), trained alone; test accuracy from its ``summary.json``.
- ``gpt``: ``experiment=elastic_gpt_small`` (the elastic GPT on text, same sandwich
  and distillation on next-token distributions) against four subnets trained alone
  as plain ``GPT`` modules: max, min, ``mid`` (every per-block choice at its middle
  value, the middle depth: a MatFormer "M" granularity) and ``mixnmatch`` (the max
  depth, heads and MLP width growing from the first block to the last: MatFormer's
  Mix'n'Match rule); both middle ones are scored by the supernet run through
  ``supernet.report_archs``. Compared: the validation loss (nats per character) of
  each, the supernet's from ``subnets.json``, the standalone's from its ``summary.json``;
  the test loss is recorded too.

"Same steps" means the same number of optimizer steps and batches: within
one supernet step each sampled subnet sees the batch once, as a standalone
model does in its step (the max and the min every step, plus two random subnets and
distillation). The supernet's search is cut to a token size (it is not what this
compares). ``--overrides`` change every run (``compression=none optim=adamw``: DDP fp32 +
AdamW); ``--supernet-overrides`` only the supernet (a recipe lever), so one
standalone baseline serves every lever (it is trained once per overrides,
steps and seed, and reused).

Usage::

    python benchmarks/supernet_vs_standalone.py                  # cnn, 300 steps, seed 0: ~3 min on 2 busy cores
    python benchmarks/supernet_vs_standalone.py --steps 1000 --seeds 0 1 2 --tag birder_1000
    python benchmarks/supernet_vs_standalone.py --overrides compression=none optim=adamw --tag adamw
    python benchmarks/supernet_vs_standalone.py --supernet-overrides supernet.distillation.weight=0.5 --tag kd05
    python benchmarks/supernet_vs_standalone.py --family gpt --seeds 0 1 2 --tag gpt   # ~10 min a seed
    python benchmarks/supernet_vs_standalone.py --quick          # 10 steps, smoke (--family gpt too)

Writes ``benchmarks/results/supernet_vs_standalone_<date>[_<tag>].md`` (and ``.json``);
the runs stay in ``outputs/supernet_vs_standalone_<date>/``.
"""

import argparse
import hashlib
import json
import os
import statistics
import time
from pathlib import Path

import common
from common import REPO
RUN_TIMEOUT_S = 1800
# The supernet run's search only has to produce its report; max and min are scored regardless.
TOKEN_SEARCH = ["supernet.search.population_size=4", "supernet.search.num_generations=0"]
GPT_SUBNETS = ("max", "mid", "mixnmatch", "min")
DEFAULT_STEPS = {"cnn": 300, "gpt": None}  # gpt: experiment=elastic_gpt_small's own budget


def hydra_value(value) -> str:
    """A plain value (dict, list, str, number, bool, None) as Hydra's override grammar writes it.

    Example::
        >>> hydra_value({"n_layer": 2, "n_head": [1, 2], "name": "elastic_gpt", "bias": True})
        "{n_layer:2,n_head:[1,2],name:'elastic_gpt',bias:true}"
    """
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        return "'" + value.replace("'", "\\'") + "'"
    return repr(value)


def gpt_plan(every_run: list[str]) -> tuple[dict, dict]:
    """The elastic GPT space of these overrides (its ``model`` config) and the four compared archs by name."""
    from dist_supernet.supernet import build_supernet
    from dist_supernet.train.config import register_resolvers
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    register_resolvers()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=elastic_gpt_small", *every_run])
    space_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    space = build_supernet(space_cfg, vocab_size=2)  # the archs do not depend on the vocabulary
    heads, ratios, depths = space.n_heads, space.mlp_ratios, space.n_layers
    depth = space.max_depth

    def ramp(choices):  # the first block smallest, the last largest
        return [choices[round(j * (len(choices) - 1) / max(1, depth - 1))] for j in range(depth)]

    mid_depth = depths[len(depths) // 2]
    archs = {
        "max": space.max_arch(),
        "mid": space.validate_arch({"n_embd": space.n_embds[len(space.n_embds) // 2], "n_layer": mid_depth,
                                    "n_head": [heads[len(heads) // 2]] * mid_depth,
                                    "mlp_ratio": [ratios[len(ratios) // 2]] * mid_depth}),
        "mixnmatch": space.validate_arch({"n_embd": space.max_embd, "n_layer": depth, "n_head": ramp(heads),
                                          "mlp_ratio": ramp(ratios)}),
        "min": space.min_arch(),
    }
    return space_cfg, archs


def torchrun(run_dir: Path, overrides: list[str]) -> float:
    """One training-application job on 2 local processes; returns its wall time in seconds."""
    cmd = common.torchrun_command(2, "-m", "dist_supernet.train", *overrides, f"hydra.run.dir={run_dir}")
    return common.run_logged(cmd, run_dir.parent / f"{run_dir.name}.log", timeout_s=RUN_TIMEOUT_S,
                             env=common.repo_env(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1"))


def _key(overrides: list[str]) -> str:
    """A short stable name for a set of overrides: a run is trained once and reused by every table that needs it."""
    return hashlib.sha256(" ".join(sorted(overrides)).encode()).hexdigest()[:10]


def run_seed(root: Path, seed: int, steps: int | None, overrides: list[str], supernet_overrides: list[str],
             family: str = "cnn") -> list[dict]:
    """The runs of one seed; one row per (subnet, how it was trained).

    ``overrides`` go to every run (optimizer, compression, data); ``supernet_overrides`` only to the
    supernet (recipe levers: sampler, distillation, model init). A standalone run with the same
    overrides, steps and seed is trained once and reused from ``root/../standalone`` (supernet runs
    likewise from ``root/../supernet``): delete a run directory to retrain it.
    """
    every_run = [*([f"trainer.max_steps={steps}"] if steps else []), f"trainer.seed={seed}", "trainer.eval_every=0",
                 "trainer.checkpoint_every=0", "trainer.log_every=50", *overrides]
    if family == "gpt":
        every_run = ["experiment=elastic_gpt_small", *every_run]
        space_cfg, archs = gpt_plan(every_run[1:])
        names = GPT_SUBNETS
        extra = {k: v for k, v in archs.items() if k not in ("max", "min")}
        sup_cmd = [*every_run, *TOKEN_SEARCH, f"supernet.report_archs={hydra_value(extra)}", *supernet_overrides]
        # The standalone GPT keeps GPT-2's standard init (as the CNN baseline keeps its own): zero-init residual
        # blocks are a supernet recipe lever, not part of the architecture.
        space = {k: v for k, v in space_cfg.items() if k not in ("name", "zero_init_residual")}
        alone_cmds = {name: [*every_run, "model=subnet", "model.space.name=elastic_gpt",
                             *(f"+model.space.{k}={hydra_value(v)}" for k, v in space.items()),
                             f"model.arch={hydra_value(archs[name])}"] for name in names}
    else:
        names = ("max", "min")
        sup_cmd = [*every_run, *TOKEN_SEARCH, *supernet_overrides]
        alone_cmds = {name: [*every_run, "model=subnet", f"model.arch={name}"] for name in names}
    rows = []
    run_dir = root.parent / "supernet" / f"{_key(sup_cmd)}_seed{seed}"
    job_s = 0.0
    if not (run_dir / "subnets.json").is_file():
        job_s = torchrun(run_dir, sup_cmd)
    summary = json.loads((run_dir / "summary.json").read_text())
    report_file = json.loads((run_dir / "subnets.json").read_text())
    report = {e["name"]: e for e in report_file["subnets"]}
    split = report_file.get("report_split", report_file.get("accuracy_split", "val"))
    for name in names:
        e = report[name]
        row = {"seed": seed, "subnet": name, "trained": "supernet", "arch": e["arch"], "split": split,
               "flops": e["flops"], "params": e["params"], "train_wall_s": summary["train_time_s"],
               "job_wall_s": round(job_s, 1), "bytes_sent": summary["bytes_sent_total"],
               "run_dir": str(run_dir.relative_to(REPO))}
        if family == "gpt":
            row.update(val_loss=e["val_loss"], loss=e["loss"])
        else:
            row.update(accuracy=e["accuracy"], val_accuracy=e.get("val_accuracy", e["accuracy"]))
        rows.append(row)
    print(f"  seed {seed} supernet: " + ", ".join(f"{n} {_quality(rows[-len(names) + i], family)}"
                                                  for i, n in enumerate(names))
          + f" ({split}; {summary['train_time_s']:.0f} s training{', reused' if not job_s else ''})", flush=True)
    for name in names:
        alone_cmd = alone_cmds[name]
        run_dir = root.parent / "standalone" / f"{name}_{_key(alone_cmd)}_seed{seed}"
        job_s = 0.0
        if not (run_dir / "summary.json").is_file():
            job_s = torchrun(run_dir, alone_cmd)
        summary = json.loads((run_dir / "summary.json").read_text())
        row = {"seed": seed, "subnet": name, "trained": "standalone", "arch": report[name]["arch"],
               "split": "test" if any(k.startswith("test_") for k in summary) else "val",
               "flops": report[name]["flops"], "params": summary["num_params"],
               "train_wall_s": summary["train_time_s"], "job_wall_s": round(job_s, 1),
               "bytes_sent": summary["bytes_sent_total"], "run_dir": str(run_dir.relative_to(REPO))}
        if family == "gpt":
            row.update(val_loss=summary["eval_loss"], loss=summary.get("test_loss", summary["eval_loss"]))
        else:
            row.update(accuracy=summary.get("test_accuracy", summary["eval_accuracy"]),
                       val_accuracy=summary["eval_accuracy"])
        rows.append(row)
        print(f"  seed {seed} standalone {name}: {_quality(row, family)} ({summary['train_time_s']:.0f} s training"
              f"{', reused' if not job_s else ''})", flush=True)
    return rows


def _quality(row: dict, family: str) -> str:
    return f"val loss {row['val_loss']:.4f}" if family == "gpt" else f"{row['accuracy']:.4f}"


def _mean_std(values: list[float], scale: float = 100, digits: int = 2) -> str:
    if len(values) == 1:
        return f"{scale * values[0]:.{digits}f}"
    return f"{scale * statistics.mean(values):.{digits}f} ± {scale * statistics.stdev(values):.{digits}f}"


def table(rows: list[dict]) -> str:
    """Markdown: per subnet, supernet vs standalone accuracy (mean ± std over seeds), gap in points, cost."""
    lines = ["| subnet | MFLOPs | params (exported) | supernet, after BN recal. (%) | standalone (%) | "
             "supernet − standalone (points) | training s, supernet / standalone | MiB sent, supernet / standalone |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name in ("max", "min"):
        sup = [r for r in rows if r["subnet"] == name and r["trained"] == "supernet"]
        alone = [r for r in rows if r["subnet"] == name and r["trained"] == "standalone"]
        gaps = [100 * (s["accuracy"] - a["accuracy"]) for s, a in zip(sup, alone)]
        gap = f"{gaps[0]:+.2f}" if len(gaps) == 1 else f"{statistics.mean(gaps):+.2f} ± {statistics.stdev(gaps):.2f}"
        lines.append(
            f"| {name} | {sup[0]['flops'] / 1e6:.3f} | {sup[0]['params']} | {_mean_std([r['accuracy'] for r in sup])} "
            f"| {_mean_std([r['accuracy'] for r in alone])} | {gap} "
            f"| {statistics.median(r['train_wall_s'] for r in sup):.0f} / "
            f"{statistics.median(r['train_wall_s'] for r in alone):.0f} "
            f"| {statistics.median(r['bytes_sent'] for r in sup) / 2**20:.2f} / "
            f"{statistics.median(r['bytes_sent'] for r in alone) / 2**20:.2f} |")
    return "\n".join(lines)


def gpt_table(rows: list[dict]) -> str:
    """Markdown: per subnet, supernet vs standalone val loss (mean ± std over seeds), the gap, test loss, cost."""
    lines = ["| subnet | arch | MFLOPs / token | params | val loss: supernet | val loss: alone | "
             "supernet − alone (per seed) | test loss: supernet / alone | training s, supernet / alone |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name in GPT_SUBNETS:
        sup = [r for r in rows if r["subnet"] == name and r["trained"] == "supernet"]
        alone = [r for r in rows if r["subnet"] == name and r["trained"] == "standalone"]
        gaps = [s["val_loss"] - a["val_loss"] for s, a in zip(sup, alone)]
        gap = (f"{gaps[0]:+.4f}" if len(gaps) == 1 else f"{statistics.mean(gaps):+.4f} ± {statistics.stdev(gaps):.4f}"
               f" ({', '.join(f'{g:+.3f}' for g in gaps)})")
        arch = sup[0]["arch"]
        arch_text = f"{arch['n_layer']} x {arch['n_embd']}, heads {arch['n_head']}, MLP ratio {arch['mlp_ratio']}"
        lines.append(
            f"| {name} | {arch_text} | {sup[0]['flops'] / 1e6:.3f} | {sup[0]['params']} "
            f"| {_mean_std([r['val_loss'] for r in sup], 1, 4)} | {_mean_std([r['val_loss'] for r in alone], 1, 4)} "
            f"| {gap} | {statistics.mean(r['loss'] for r in sup):.4f} / {statistics.mean(r['loss'] for r in alone):.4f} "
            f"| {statistics.median(r['train_wall_s'] for r in sup):.0f} / "
            f"{statistics.median(r['train_wall_s'] for r in alone):.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=("cnn", "gpt"), default="cnn",
                        help="cnn: ofa_cnn on digits (max, min); gpt: elastic_gpt on text (max, mid, mixnmatch, min)")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps of every run (default: cnn 300, the main job's; gpt: its experiment's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--overrides", nargs="*", default=[],
                        help="Hydra overrides for every run, e.g. compression=none optim=adamw")
    parser.add_argument("--supernet-overrides", nargs="*", default=[],
                        help="Hydra overrides for the supernet run only (recipe levers), e.g. supernet.distillation.weight=0.5")
    parser.add_argument("--tag", default="", help="suffix of the result files (one file per compared setting)")
    parser.add_argument("--quick", action="store_true", help="10 steps, one seed: a smoke test")
    args = parser.parse_args()
    steps = args.steps if args.steps is not None else DEFAULT_STEPS[args.family]
    steps, seeds = (10, [0]) if args.quick else (steps, args.seeds)
    date = common.today()
    root = REPO / "outputs" / f"supernet_vs_standalone_{date}" / (args.tag or "default")
    root.mkdir(parents=True, exist_ok=True)
    load_before = common.load_average()[0]
    cpu = common.cpu_name()
    start = time.perf_counter()
    rows = []
    for seed in seeds:
        rows += run_seed(root, seed, steps, args.overrides, args.supernet_overrides, args.family)
    total_s = time.perf_counter() - start
    load_after = common.load_average()[0]
    command = "python benchmarks/supernet_vs_standalone.py" + (" --family gpt" if args.family == "gpt" else "") + (
        " --quick" if args.quick else (f" --steps {steps}" if args.steps is not None else "")
        + f" --seeds {' '.join(map(str, seeds))}")
    if args.overrides:
        command += " --overrides " + " ".join(args.overrides)
    if args.supernet_overrides:
        command += " --supernet-overrides " + " ".join(args.supernet_overrides)
    if args.tag:
        command += f" --tag {args.tag}"
    split = rows[0]["split"]
    machine = (f"Machine: {cpu}, {os.cpu_count()} cores shared with other users (1-min load average "
               f"{load_before:.1f} at the start, {load_after:.1f} at the end), torch CPU, 2 gloo processes.")
    seeds_text = f"Seeds: {', '.join(map(str, seeds))}" + (" (mean ± sample std)." if len(seeds) > 1 else ".")
    if args.family == "gpt":
        steps_text = steps or "the experiment's"
        text = "\n".join([
            f"# Elastic GPT supernet vs standalone GPTs, {steps_text} steps ({date}{', ' + args.tag if args.tag else ''})",
            "",
            f"Command: `{command}` ({total_s / 60:.1f} min; runs already trained with the same overrides, "
            f"steps and seed are reused). {machine}",
            "",
            "Every run: `experiment=elastic_gpt_small` (the embedded Python-docs corpus, character level; batch and "
            f"block size of the experiment) with these overrides for every run: `{' '.join(args.overrides) or '(none)'}`; "
            f"for the supernet only: `{' '.join(args.supernet_overrides) or '(none)'}`. Supernet: `model=elastic_gpt "
            "supernet=sandwich` (max + min + 2 random subnets per step; the other subnets learn the labels and/or "
            "the max's next-token distributions as the experiment's `supernet.distillation` says), its recipe as "
            "`conf/experiment/elastic_gpt_small.yaml` sets it; each subnet's losses from its `subnets.json`. Alone: "
            "`model=subnet` with the same space and arch, a plain `GPT` initialised as the fresh supernet's slice "
            "(GPT-2's standard init: without `zero_init_residual`), its `summary.json`. Loss: mean nats per character over "
            f"the fixed `data.eval_windows` windows of val (and test). {seeds_text}",
            "",
            gpt_table(rows),
            "",
            "Training seconds are the trainer's steps alone (`train_time_s`); on a shared machine they are noisy. A "
            "supernet step runs 4 subnets (the max, the min, 2 random), so it costs about 2-3 standalone max steps "
            "of compute, and trains the whole family at once.",
            "",
        ])
    else:
        text = "\n".join([
            f"# Supernet vs standalone: max and min subnets, {steps} steps ({date}{', ' + args.tag if args.tag else ''})",
            "",
            f"Command: `{command}` ({total_s / 60:.1f} min; runs already trained with the same overrides, "
            f"steps and seed are reused). {machine}",
            "",
            "Every run: the default `conf/` (digits: train / val / test split, batch 32 per rank, default optimizer "
            "and compression) with these overrides for every run: "
            f"`{' '.join(args.overrides) or '(none)'}`; for the supernet only: "
            f"`{' '.join(args.supernet_overrides) or '(none)'}`. Supernet: `model=ofa_cnn supernet=sandwich`; its "
            "max / min subnet after BN recalibration (`subnets.json`). Standalone: `model=subnet model.arch=max|min`, "
            "initialised as a fresh supernet's slice, its own BN running stats (`summary.json`). "
            f"Accuracy on the {split} split. {seeds_text}",
            "",
            table(rows),
            "",
            "Training seconds are the trainer's steps alone (`train_time_s`); on a shared machine they are noisy. A "
            "supernet step runs 4 subnets, so it costs about 4 standalone max steps of compute but trains the whole "
            "space at once; the bytes differ because the supernet's exchange covers all of its parameters every step.",
            "",
        ])
    out = common.results_path("supernet_vs_standalone", "", date=date, tag=args.tag)
    common.write_results(out, text, {"command": command, "family": args.family, "steps": steps, "seeds": seeds,
                                     "overrides": args.overrides, "supernet_overrides": args.supernet_overrides,
                                     "load_average_start": load_before, "load_average_end": load_after,
                                     "cpu": cpu, "wall_time_s": round(total_s, 1), "rows": rows}, indent=2)
    print(text)
    print(f"wrote {out}.md")


if __name__ == "__main__":
    main()
