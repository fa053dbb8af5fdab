"""Matplotlib panels shared by the per-run figure and the paper's figures."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # figures are files; never open a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402

PERCENTILE_STYLES = {"p15": ":", "p50": "-", "p85": "--"}
# Each estimate of BN's inference statistics (measures/bn_estimators.py) in the figures.
ESTIMATE_LABELS = {
    "ema_0.1": "EMA, momentum 0.1 (torch's default)",
    "ema_0.01": "EMA, momentum 0.01",
    "cumulative": "cumulative average",
    "algorithm2": "Algorithm 2 (K batches)",
    "precise": "precise BN (whole training set)",
}
ESTIMATE_COLORS = {
    "ema_0.1": "tab:red",
    "ema_0.01": "tab:orange",
    "cumulative": "tab:green",
    "algorithm2": "tab:blue",
    "precise": "black",
}
# Each model.norm's name and colour in the batch-size figures.
NORM_LABELS = {
    "none": "no normalisation",
    "bn": "BN",
    "batch_renorm": "Batch Renorm",
    "group_norm": "GroupNorm",
    "layer_norm": "LayerNorm",
}
NORM_COLORS = {
    "none": "tab:gray",
    "bn": "tab:red",
    "batch_renorm": "tab:orange",
    "group_norm": "tab:blue",
    "layer_norm": "tab:green",
}


def plot_accuracy_band(
    ax: Axes, steps: Sequence[int], runs: np.ndarray, label: str, color: str | None = None
) -> None:
    """Mean test accuracy over runs (rows) with a min-max band."""
    runs = np.atleast_2d(runs)
    (line,) = ax.plot(steps, runs.mean(axis=0), label=label, color=color)
    if runs.shape[0] > 1:
        ax.fill_between(
            steps,
            runs.min(axis=0),
            runs.max(axis=0),
            alpha=0.25,
            color=line.get_color(),
            linewidth=0,
        )
    ax.set_xlabel("training step")
    ax.set_ylabel("test accuracy (%)")


def plot_percentiles(
    ax: Axes, steps: Sequence[int], traces: Mapping[str, Sequence[float]], title: str
) -> None:
    """The 15th/50th/85th percentile traces of one unit's input to its nonlinearity."""
    for key, style in PERCENTILE_STYLES.items():
        if key in traces:
            ax.plot(steps, traces[key], style, color="black", label=f"{key[1:]}th percentile")
    ax.set_title(title)
    ax.set_xlabel("training step")
    ax.set_ylabel("input to sigmoid")


def save(fig: plt.Figure, path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_run(
    history: Sequence[Mapping[str, float]], monitor: str, layer: str, title: str, path
) -> None:
    """A run's own figure: its accuracy (`monitor`) and its `layer` percentile traces."""
    steps = [r["step"] for r in history]
    fig, (acc_ax, act_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    plot_accuracy_band(acc_ax, steps, np.array([[r[monitor] for r in history]]), title)
    acc_ax.set_title(f"{title}: {monitor}")
    traces = {k: [r[f"act/{layer}/{k}"] for r in history] for k in PERCENTILE_STYLES}
    plot_percentiles(act_ax, steps, traces, f"{title}: {layer} unit input percentiles")
    act_ax.legend(fontsize=8)
    save(fig, path)
