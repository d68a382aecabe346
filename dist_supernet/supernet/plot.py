"""Accuracy vs FLOPs scatter with the Pareto front, written to PNG (matplotlib's Agg canvas, no global backend)."""

from __future__ import annotations

import os
from collections.abc import Sequence


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points no other point beats on both axes (lower cost, higher accuracy), sorted by cost.

    Example::
        >>> pareto_front([(1, 0.5), (2, 0.4), (3, 0.9), (2, 0.7)])
        [(1, 0.5), (2, 0.7), (3, 0.9)]
    """
    front, best = [], float("-inf")
    for cost, accuracy in sorted(points, key=lambda p: (p[0], -p[1])):
        if accuracy > best:
            front.append((cost, accuracy))
            best = accuracy
    return front


def plot_accuracy_vs_flops(
    points: Sequence[tuple[float, float]],
    path: str | os.PathLike,
    *,
    title: str = "",
    xlabel: str = "MFLOPs (multiply-accumulates)",
    ylabel: str = "accuracy",
    flops_scale: float = 1e-6,
    highlight: tuple[float, float] | None = None,
) -> list[tuple[float, float]]:
    """Scatter ``(flops, accuracy)`` points, draw their Pareto front, save PNG at ``path``; returns the front.

    ``highlight`` marks one point (e.g. the searched subnet) with a star.

    Example::
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "pareto.png")
        >>> plot_accuracy_vs_flops([(1e6, 0.5), (3e6, 0.9), (2e6, 0.4)], path)
        [(1000000.0, 0.5), (3000000.0, 0.9)]
        >>> os.path.getsize(path) > 0
        True
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    points = [(float(f), float(a)) for f, a in points]
    front = pareto_front(points)
    fig = Figure(figsize=(6, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if points:
        ax.scatter([f * flops_scale for f, _ in points], [a for _, a in points], s=12, alpha=0.5, label="subnets")
        ax.plot([f * flops_scale for f, _ in front], [a for _, a in front], "-o", color="C3", ms=4,
                drawstyle="steps-post", label="Pareto front")
    if highlight is not None:
        ax.scatter([highlight[0] * flops_scale], [highlight[1]], marker="*", s=160, color="C2", zorder=3,
                   label="selected")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if points or highlight is not None:
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(os.fspath(path))
    return front
