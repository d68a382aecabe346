"""The end of a sweep: one comparison table (Markdown and CSV) and two loss plots in the sweep dir.

Reads every job dir under the sweep dir that holds a ``sweep_job.json``
(see :mod:`dist_supernet.sweep.jobs`), with its ``summary.json`` and
``metrics.jsonl`` when the job got that far, and writes:

- ``sweep_summary.md`` and ``sweep_summary.csv``: one row per job, failed and
  invalid ones included with their reason. Columns: every override that
  varied between jobs, final loss, eval loss and accuracy (blank for text), bytes per step (per rank),
  median step time, train time, job time;
- ``loss_vs_step.png`` and ``loss_vs_time.png``: training loss, one line per job.

Definitions (also printed under the Markdown table):

- ``bytes_per_step`` = ``bytes_sent_total / steps / world_size``: the mean bytes
  one rank put on the wire per step, from the project's byte accounting
  (``CommStats``), so jobs with different world sizes compare;
- ``median_step_s``: the median over consecutive ``metrics.jsonl`` rows of
  Δ``wall_time_s`` / Δ``step`` (with ``trainer.log_every=1``, the launcher's
  default, that is the median time of one step; the first step, which includes
  DDP's set-up, has no predecessor and is left out);
- ``train_time_s``: the summary's ``wall_time_s`` (the training loop);
  ``job_time_s``: torchrun launch to exit (process start-up included).

Run again on a finished (or interrupted) sweep: ``python -m dist_supernet.sweep --report multirun/<stamp>``.

Example::
    >>> paths = write_report(Path("multirun/2026-11-22_10-00-00"))     # doctest: +SKIP
    >>> sorted(p.name for p in paths)                                   # doctest: +SKIP
    ['loss_vs_step.png', 'loss_vs_time.png', 'sweep_summary.csv', 'sweep_summary.md']
"""

import csv
import dataclasses
import json
import statistics
from pathlib import Path

from dist_supernet.sweep.jobs import RECORD_FILE, JobRecord

TABLE_MD = "sweep_summary.md"
TABLE_CSV = "sweep_summary.csv"
PLOT_STEP = "loss_vs_step.png"
PLOT_TIME = "loss_vs_time.png"
METRIC_COLUMNS = ("final_loss", "eval_loss", "eval_accuracy", "bytes_per_step", "median_step_s", "train_time_s", "job_time_s")


@dataclasses.dataclass
class JobResult:
    """One job dir read back: its record, and its summary and metrics rows when it wrote them."""

    job_dir: Path
    record: JobRecord
    summary: dict | None
    rows: list[dict]

    @property
    def overrides(self) -> dict[str, str]:
        """``key -> value`` of the job's overrides (``+``/``~`` prefixes dropped)."""
        return dict(_split_override(o) for o in self.record.overrides)


def _split_override(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def collect(sweep_dir: Path) -> list[JobResult]:
    """Every job of the sweep, in job-number order."""
    results = []
    for record_path in Path(sweep_dir).glob(f"*/{RECORD_FILE}"):
        job_dir = record_path.parent
        summary_path, metrics_path = job_dir / "summary.json", job_dir / "metrics.jsonl"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
        rows = []
        if metrics_path.is_file():
            rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
        results.append(JobResult(job_dir, JobRecord.load(job_dir), summary, rows))
    return sorted(results, key=lambda r: r.record.num)


def split_overrides(jobs: list[JobResult]) -> tuple[list[str], dict[str, str]]:
    """(keys whose value differs between jobs, in first-seen order; ``{key: value}`` shared by all jobs).

    A key a job does not set counts as a value of its own (the config's default).
    """
    keys: list[str] = []
    for job in jobs:
        keys += [k for k in job.overrides if k not in keys]
    values = {k: {job.overrides.get(k) for job in jobs} for k in keys}
    varied = [k for k in keys if len(values[k]) > 1]
    common = {k: next(iter(values[k])) for k in keys if len(values[k]) == 1}
    return varied, common


def median_step_time(rows: list[dict]) -> float | None:
    """Median of Δwall_time_s / Δstep over consecutive rows (None with fewer than two rows)."""
    deltas = [(b["wall_time_s"] - a["wall_time_s"]) / (b["step"] - a["step"])
              for a, b in zip(rows, rows[1:]) if b["step"] > a["step"]]
    return statistics.median(deltas) if deltas else None


def table_rows(jobs: list[JobResult]) -> tuple[list[str], list[dict]]:
    """(column names, one dict per job) for the comparison table; numbers unformatted, None when missing."""
    varied, _ = split_overrides(jobs)
    columns = ["job", "status", *varied, *METRIC_COLUMNS, "reason"]
    rows = []
    for job in jobs:
        summary = job.summary or {}
        steps, world_size = summary.get("steps"), summary.get("world_size")
        bytes_total = summary.get("bytes_sent_total")
        bytes_per_step = bytes_total / steps / world_size if bytes_total is not None and steps else None
        row = {"job": job.record.num, "status": job.record.status, "reason": job.record.reason}
        row.update({k: job.overrides.get(k, "(default)") for k in varied})
        row.update({
            "final_loss": summary.get("final_loss"),
            "eval_loss": summary.get("eval_loss"),
            "eval_accuracy": summary.get("eval_accuracy"),
            "bytes_per_step": _round(bytes_per_step, 1),
            "median_step_s": _round(median_step_time(job.rows), 6),
            "train_time_s": summary.get("wall_time_s"),
            "job_time_s": job.record.job_time_s if job.record.status != "invalid" else None,
        })
        rows.append(row)
    return columns, rows


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _md_cell(column: str, value) -> str:
    if value is None:
        return "–" if column in METRIC_COLUMNS else ""
    if column in ("final_loss", "eval_loss"):
        return f"{value:.4f}"
    if column == "eval_accuracy":
        return f"{100 * value:.2f}%"
    if column == "bytes_per_step":
        return f"{value:,.0f}"
    if column == "median_step_s":
        return f"{1000 * value:.1f}"
    if column in ("train_time_s", "job_time_s"):
        return f"{value:.1f}" if value >= 10 else f"{value:.2f}"
    return str(value).replace("|", "\\|")


MD_HEADERS = {"final_loss": "final loss", "eval_loss": "eval loss", "eval_accuracy": "eval accuracy", "bytes_per_step": "bytes/step/rank",
              "median_step_s": "median step (ms)", "train_time_s": "train (s)", "job_time_s": "job (s)"}


def markdown_table(columns: list[str], rows: list[dict]) -> str:
    lines = ["| " + " | ".join(MD_HEADERS.get(c, c) for c in columns) + " |",
             "|" + "|".join(" ---: " if c in METRIC_COLUMNS else " --- " for c in columns) + "|"]
    lines += ["| " + " | ".join(_md_cell(c, row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_report(sweep_dir: Path) -> list[Path]:
    """Write the table (Markdown, CSV) and the two plots into ``sweep_dir``; returns their paths."""
    sweep_dir = Path(sweep_dir)
    jobs = collect(sweep_dir)
    columns, rows = table_rows(jobs)
    _, common = split_overrides(jobs)

    csv_path = sweep_dir / TABLE_CSV
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows({c: "" if row.get(c) is None else row.get(c) for c in columns} for row in rows)

    counts = ", ".join(f"{sum(r['status'] == s for r in rows)} {s}" for s in ("ok", "failed", "invalid"))
    common_text = " ".join(f"{k}={v}" for k, v in common.items())
    md = [f"# Sweep {sweep_dir.name}", "",
          f"{len(rows)} jobs: {counts}." + (f" Overrides shared by every job: `{common_text}`." if common else ""),
          "", markdown_table(columns, rows), "",
          "bytes/step/rank = bytes_sent_total / steps / world_size (the project's byte accounting); "
          "median step = median of Δwall_time_s/Δstep between consecutive metrics.jsonl rows; "
          "train = the training loop's wall time; job = torchrun launch to exit. "
          "invalid = rejected by the config check before launch (not run).", "",
          f"![loss vs step]({PLOT_STEP})", "", f"![loss vs wall time]({PLOT_TIME})", ""]
    md_path = sweep_dir / TABLE_MD
    md_path.write_text("\n".join(md))
    plots = plot_losses(jobs, sweep_dir / PLOT_STEP, sweep_dir / PLOT_TIME)
    return [md_path, csv_path, *plots]


def job_label(job: JobResult, varied: list[str]) -> str:
    """The job's varied overrides, ``#num`` when nothing varied."""
    parts = [f"{k}={job.overrides[k]}" for k in varied if k in job.overrides]
    return f"#{job.record.num} " + " ".join(parts) if parts else f"#{job.record.num}"


def running_mean(values: list[float], window: int) -> list[float]:
    """Mean of the last ``window`` values at each point (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_losses(jobs: list[JobResult], step_path: Path, time_path: Path,
                smooth_fraction: float = 0.02) -> list[Path]:
    """Loss vs step and loss vs wall time, one line per job with metrics (failed jobs dashed).

    Per-step losses of small batches are noisy: each line is a running mean over
    ``smooth_fraction`` of the job's rows (at least 1).
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogFormatter

    varied, _ = split_overrides(jobs)
    for path, x_key, x_label in ((step_path, "step", "step"), (time_path, "wall_time_s", "wall time (s)")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for job in (j for j in jobs if j.rows):
            window = max(1, round(smooth_fraction * len(job.rows)))
            ax.plot([r[x_key] for r in job.rows], running_mean([r["loss"] for r in job.rows], window),
                    linestyle="-" if job.record.status == "ok" else "--", label=job_label(job, varied))
        ax.set_xlabel(x_label)
        ax.set_ylabel(f"train loss (running mean, {smooth_fraction:.0%} of rows)")
        ax.set_yscale("log")
        # Plain numbers on the log axis (1, 0.1; 2.05 within a decade), not 2.05x10^0.
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1.5, 0.5)))
        if ax.get_lines():
            ax.legend(fontsize="small")
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return [step_path, time_path]
