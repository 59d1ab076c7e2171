"""The paper's six training-dynamics panels from ``metrics.jsonl`` files, several runs overlaid.

Panels (paper Figure "training dynamics"): OTS weight, policy-gradient loss, accuracy, gradient
norm, response length and KL to the reference. Each panel plots the first metric name of its
list that a run logged; a run without any of them leaves that panel's line out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from tapo_jax.train.metrics import METRICS_FILE, read_metrics

__all__ = ["PANELS", "plot_runs"]

# (title, metric names in order of preference)
PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("OTS weight (mean)", ("ots_weight_mean",)),
    ("policy-gradient loss", ("pg_loss_orig", "loss")),
    ("accuracy", ("accuracy",)),
    ("grad norm", ("grad_norm",)),
    ("response length", ("response_length_mean",)),
    ("KL to reference", ("kl",)),
)


def _series(records: list[dict], names: Sequence[str]) -> tuple[np.ndarray, np.ndarray] | None:
    for name in names:
        pts = [(r["step"], r[name]) for r in records
               if name in r and isinstance(r[name], (int, float)) and "step" in r]
        if pts:
            steps, vals = zip(*sorted(pts))
            return np.asarray(steps, float), np.asarray(vals, float)
    return None


def _smooth(y: np.ndarray, weight: float) -> np.ndarray:
    """Exponential moving average (TensorBoard-style), debiased at the start."""
    if weight <= 0 or len(y) < 2:
        return y
    out, acc = np.empty_like(y), 0.0
    for i, v in enumerate(y):
        acc = weight * acc + (1 - weight) * v
        out[i] = acc / (1 - weight ** (i + 1))
    return out


def _rolling(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing rolling mean over ``window`` points (fewer at the start)."""
    if window <= 1 or len(y) < 2:
        return y
    c = np.cumsum(np.insert(np.asarray(y, float), 0, 0.0))
    idx = np.arange(1, len(y) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def plot_runs(run_dirs: Sequence[str | Path] | str | Path, out_png: str | Path, *,
              labels: Sequence[str] | None = None, smoothing: float = 0.0,
              title: str | None = None, rolling: int = 0) -> Path:
    """Draw the six panels for every run in ``run_dirs`` (run directories or ``metrics.jsonl``
    paths) into ``out_png`` (2 x 3 grid, one legend entry per run). Returns the PNG path.

    ``labels`` default to the run directory names; ``smoothing`` in [0, 1) is the weight of an
    exponential moving average drawn over the raw (faint) curve; ``rolling`` > 1 draws a
    trailing rolling mean of that many steps over the raw (faint) curve instead.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if isinstance(run_dirs, (str, Path)):
        run_dirs = [run_dirs]
    paths = [Path(p) for p in run_dirs]
    if not paths:
        raise ValueError("plot_runs needs at least one run directory")
    if labels is None:
        labels = [p.parent.name if p.name == METRICS_FILE else p.name for p in paths]
    if len(labels) != len(paths):
        raise ValueError(f"{len(labels)} labels for {len(paths)} runs")
    runs = [read_metrics(p) for p in paths]

    fig, axes = plt.subplots(2, 3, figsize=(15, 8), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (panel_title, names) in zip(axes.flat, PANELS):
        drawn = False
        for i, (records, label) in enumerate(zip(runs, labels)):
            s = _series(records, names)
            if s is None:
                continue
            x, y = s
            c = colors[i % len(colors)]
            if rolling > 1 or smoothing > 0:
                line = _rolling(y, rolling) if rolling > 1 else _smooth(y, smoothing)
                ax.plot(x, y, color=c, alpha=0.25, linewidth=1)
                ax.plot(x, line, color=c, label=label, linewidth=1.8)
            else:
                ax.plot(x, y, color=c, label=label, linewidth=1.5)
            drawn = True
        ax.set_title(panel_title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes,
                    color="gray")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
