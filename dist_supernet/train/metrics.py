"""What rank 0 writes while training: metrics.jsonl, metrics.csv, TensorBoard events, loss.png, a progress bar.

``metrics.jsonl`` has one JSON object per logged step, ``metrics.csv`` the same
rows with a fixed header (columns a row lacks are empty), and with
``trainer.tensorboard`` (``auto``: when ``torch.utils.tensorboard`` imports) the
same numbers as TensorBoard scalars in event files in the run directory
(``tensorboard --logdir outputs``; tags in :data:`TENSORBOARD_TAGS`). On resume
the rows after the checkpoint's step are dropped, and the event file written
next purges the later events of the earlier ones (``SummaryWriter(purge_step=)``),
so a restarted run's files read as if it had never stopped. On other ranks every
method is a no-op.

Example::
    >>> writer = MetricsWriter(out_dir, enabled=(rank == 0), tensorboard="auto")
    >>> writer.write({"step": 10, "loss": 0.5, "wall_time_s": 1.2, "bytes_sent": 4096})
    >>> writer.scalars({"subnet/max/accuracy": 0.98}, step=10)
    >>> writer.plot_loss(out_dir / "loss.png")
    >>> writer.close()
"""

import csv
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)

CSV_COLUMNS = (
    "step", "epoch", "loss", "lr", "wall_time_s", "bytes_sent", "bytes_intra", "bytes_inter",
    "val_loss", "val_accuracy", "skipped_steps", "train_time_s", "val_perplexity",  # new columns go last
)
# A metrics row's key -> its TensorBoard tag (keys a row lacks are not written).
TENSORBOARD_TAGS = {
    "loss": "train/loss",
    "lr": "train/lr",
    "train_time_s": "train/train_time_s",
    "skipped_steps": "train/skipped_steps",
    "bytes_sent": "comm/bytes_sent",
    "bytes_intra": "comm/bytes_intra",
    "bytes_inter": "comm/bytes_inter",
    "val_loss": "val/loss",
    "val_accuracy": "val/accuracy",
    "val_perplexity": "val/perplexity",
}
# Also written: train/step_time_s, seconds per step in train_step alone since the previous row
# (Δtrain_time_s / Δstep: no evaluation, logging or checkpoints).


def tensorboard_import_error() -> str | None:
    """Why ``torch.utils.tensorboard`` does not import here (None: it does)."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except Exception as error:  # a broken install (protobuf) raises more than ImportError
        return f"{type(error).__name__}: {error}"
    return None


class MetricsWriter:
    """Appends rows to ``metrics.jsonl`` and ``metrics.csv`` in ``out_dir``, and TensorBoard scalars.

    ``tensorboard``: ``"auto"`` (event files when ``torch.utils.tensorboard`` imports, silent
    otherwise), ``True`` (the config check made sure it imports) or ``False``.
    """

    def __init__(self, out_dir: str | Path, *, enabled: bool, tensorboard: str | bool = False):
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self.jsonl_path = self.out_dir / "metrics.jsonl"
        self.csv_path = self.out_dir / "metrics.csv"
        self.tensorboard = tensorboard
        self._summary_writer = None
        self._purge_step = None  # set on resume: the next event file hides the earlier files' later events
        self._last_timing = (0, 0.0)  # (step, train_time_s) of the previous row: train/step_time_s
        self._tensorboard_off = not enabled or tensorboard is False

    def rows(self) -> list[dict]:
        if not self.jsonl_path.is_file():
            return []
        with open(self.jsonl_path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def truncate_after(self, step: int) -> None:
        """Keep only rows with ``row["step"] <= step`` (resume from a checkpoint at ``step``)."""
        if not self.enabled:
            return
        self._purge_step = step + 1
        kept = [row for row in self.rows() if row["step"] <= step]
        timed = [row for row in kept if "train_time_s" in row]
        self._last_timing = (timed[-1]["step"], timed[-1]["train_time_s"]) if timed else None
        self.jsonl_path.write_text("".join(json.dumps(row) + "\n" for row in kept))
        with open(self.csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, CSV_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(kept)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        new_csv = not self.csv_path.is_file()
        with open(self.csv_path, "a", newline="") as f:
            writer = csv.DictWriter(f, CSV_COLUMNS, extrasaction="ignore")
            if new_csv:
                writer.writeheader()
            writer.writerow(row)
        values = {tag: row[key] for key, tag in TENSORBOARD_TAGS.items() if row.get(key) is not None}
        if self._last_timing is not None and "train_time_s" in row and row["step"] > self._last_timing[0]:
            last_step, last_time = self._last_timing
            values["train/step_time_s"] = (row["train_time_s"] - last_time) / (row["step"] - last_step)
        self._last_timing = (row["step"], row["train_time_s"]) if "train_time_s" in row else None
        self.scalars(values, step=row["step"])

    def scalars(self, values: dict[str, float], *, step: int) -> None:
        """TensorBoard scalars ``{tag: value}`` at ``step`` (a no-op without TensorBoard, and off rank 0)."""
        writer = self._tensorboard_writer()
        if writer is None:
            return
        for tag, value in values.items():
            writer.add_scalar(tag, float(value), global_step=step)

    def _tensorboard_writer(self):
        if self._summary_writer is None and not self._tensorboard_off:
            error = tensorboard_import_error()
            if error is not None:
                if self.tensorboard is True:  # the config check passed, yet it does not import now
                    raise RuntimeError(f"trainer.tensorboard=true: torch.utils.tensorboard does not import: {error}")
                log.debug("trainer.tensorboard=auto: no event files (%s)", error)  # silent by design
                self._tensorboard_off = True
                return None
            from torch.utils.tensorboard import SummaryWriter

            self._summary_writer = SummaryWriter(log_dir=str(self.out_dir), purge_step=self._purge_step)
        return self._summary_writer

    def flush(self) -> None:
        if self._summary_writer is not None:
            self._summary_writer.flush()

    def close(self) -> None:
        """Flush and close the event file (its writer thread would lose queued events at os._exit)."""
        if self._summary_writer is not None:
            self._summary_writer.close()
            self._summary_writer = None
        self._tensorboard_off = True  # nothing after the close: no second event file
    def plot_loss(self, path: str | Path, title: str = "") -> None:
        """Training loss (and val accuracy, or val loss for text, when logged) against step, as a PNG."""
        if not self.enabled:
            return
        import matplotlib

        matplotlib.use("Agg")  # no display on cluster nodes
        import matplotlib.pyplot as plt

        rows = self.rows()
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
        evals = [r for r in rows if r.get("val_accuracy") is not None]
        text_evals = [r for r in rows if r.get("val_perplexity") is not None]
        if text_evals:  # a language model: val loss on the loss axis
            ax.plot([r["step"] for r in text_evals], [r["val_loss"] for r in text_evals], "o-", label="val loss")
            ax.legend()
        if evals:
            acc_ax = ax.twinx()
            acc_ax.plot([r["step"] for r in evals], [r["val_accuracy"] for r in evals], "o-", color="C1",
                        label="val accuracy")
            acc_ax.set_ylabel("val accuracy")
            acc_ax.set_ylim(0, 1)
            fig.legend(loc="upper right", bbox_to_anchor=(1, 1), bbox_transform=ax.transAxes)
        ax.set_title(title)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


class Progress:
    """A tqdm bar on rank 0 when stderr is a terminal; otherwise a log line every ``log_every`` steps."""

    def __init__(self, total: int, initial: int, *, enabled: bool, log_every: int):
        self.enabled = enabled
        self.log_every = log_every
        self.total = total
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step")

    def update(self, step: int, row: dict | None) -> None:
        """Called after every step; ``row`` is the logged metrics row, when the step logged one."""
        if self.bar is not None:
            self.bar.update(1)
            if row is not None:
                self.bar.set_postfix(loss=f"{row['loss']:.4f}", MB=f"{row['bytes_sent'] / 2**20:.2f}")
        elif self.enabled and row is not None:
            extra = f" val_acc {row['val_accuracy']:.4f}" if row.get("val_accuracy") is not None else ""
            if row.get("val_perplexity") is not None:
                extra = f" val_loss {row['val_loss']:.4f} val_ppl {row['val_perplexity']:.2f}"
            log.info("step %d/%d loss %.4f sent %.2f MiB %.1f s%s", step, self.total, row["loss"],
                     row["bytes_sent"] / 2**20, row["wall_time_s"], extra)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
