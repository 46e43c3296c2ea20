"""Leaderboard figures (seaborn, PNG): pure functions of DataFrames — no store, no torch (DESIGN.md §2).

Every function takes a tidy frame, writes one PNG and returns its path. Figures are drawn on a bare matplotlib
``Figure`` (no pyplot state), so they are safe in any thread and never open a window. Accuracies arrive as
fractions and are drawn in percent.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

DPI = 120


def _figure(width: float, height: float, ncols: int = 1, nrows: int = 1, **kw):
    import seaborn as sns
    from matplotlib.figure import Figure

    sns.set_theme(style="whitegrid", context="notebook")  # global rcParams, same for every figure
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Metadata pinned: a PNG redrawn from the same store is byte-identical (no "Software"/date chunk drift).
    fig.savefig(path, dpi=DPI, metadata={"Software": None})
    return path


def seed_points(runs: pd.DataFrame, summary: pd.DataFrame, path, metric_label: str = "test accuracy (%)") -> Path:
    """Per-seed points of every method with its mean and 95 % t-interval.

    ``runs``: columns method, seed, value (fraction). ``summary``: the rows of ``stats.compare`` (method, mean,
    ci_low, ci_high; None where fewer than 2 seeds)."""
    import seaborn as sns

    order = list(summary["method"])
    fig, axes = _figure(1.2 + 1.1 * len(order), 3.6)
    ax = axes[0, 0]
    data = runs.assign(value=runs["value"] * 100)
    sns.stripplot(data=data, x="method", y="value", order=order, hue="method", hue_order=order, legend=False,
                  jitter=0.12, size=6, alpha=0.8, ax=ax)
    no_interval = []
    for i, row in enumerate(summary.itertuples()):
        if row.mean is None:
            continue
        ax.plot([i - 0.28, i + 0.28], [row.mean * 100] * 2, color="black", lw=2)
        if row.ci_low is not None:
            # An accuracy lies in [0, 100] %: a t-interval reaching past either end is drawn up to it.
            low, high = max(row.ci_low * 100, 0.0), min(row.ci_high * 100, 100.0)
            ax.errorbar(i + 0.3, row.mean * 100, yerr=[[row.mean * 100 - low], [high - row.mean * 100]],
                        color="black", capsize=4, lw=1.2)
        else:
            no_interval.append(row.method)
    limits = percent_limits(data["value"], summary)
    if limits is not None:
        ax.set_ylim(*limits)
    ax.set_xlabel("")
    ax.set_ylabel(metric_label)
    title = "seeds (dots), mean (bar), 95 % CI (whisker)"
    if no_interval:
        title += "\nno whisker: fewer than 3 seeds" + ("" if len(no_interval) == len(order) else
                                                      f" ({', '.join(no_interval)})")
    ax.set_title(title, fontsize=10)
    ax.tick_params(axis="x", rotation=30 if len(order) > 4 else 0)
    return _save(fig, path)


def percent_limits(values: pd.Series, summary: pd.DataFrame) -> tuple[float, float] | None:
    """y-limits of an accuracy axis in percent: the points and the intervals with a margin, never outside [0, 100]
    (a t-interval past 100 % is drawn up to 100, not as an axis to 120 %). ``values`` in percent, ``summary``
    fractions as stats.compare gives them."""
    values = values.dropna()
    if not len(values):
        return None
    ends = [v * 100 for r in summary.itertuples() for v in (r.ci_low, r.ci_high) if v is not None]
    low, high = min([values.min(), *ends]), max([values.max(), *ends])
    pad = max((high - low) * 0.08, 0.5)
    return max(low - pad, 0.0), min(high + pad, 100.0)


def method_palette(methods: list[str]) -> dict:
    """One distinct colour per method: seaborn's default palette up to its 10 colours, evenly spaced hues beyond
    (the default cycles: in a 13-method run ses and ses+spectral_norm were both orange, so a dashed SES target
    "in the method's colour" named neither)."""
    import seaborn as sns

    colours = sns.color_palette(n_colors=len(methods)) if len(methods) <= 10 else sns.color_palette("husl",
                                                                                                     len(methods))
    return dict(zip(methods, colours, strict=True))


def erank_curves(history: pd.DataFrame, targets: pd.DataFrame, path) -> Path:
    """Effective rank of each diagnostic layer over epochs, one panel per layer, a line per method (mean over
    seeds, band = seaborn's bootstrap 95 % CI, seeded so redraws match) and the SES target d^β (eq. 5) as a dashed
    line in the method's colour.

    ``history``: columns method, seed, epoch, layer, erank. ``targets``: columns method, layer, target."""
    return _save(erank_figure(history, targets), path)


def erank_figure(history: pd.DataFrame, targets: pd.DataFrame):
    """The figure of ``erank_curves``; the legend sits outside the panels (inside the first one it hid that panel's
    lines and title once a run had a dozen methods)."""
    import seaborn as sns

    layers = list(dict.fromkeys(history["layer"]))
    methods = list(dict.fromkeys(history["method"]))
    palette = method_palette(methods)
    ncols = min(len(layers), 3)
    nrows = -(-len(layers) // ncols)
    fig, axes = _figure(4.2 * ncols + 2.0, 3.3 * nrows + 0.4, ncols=ncols, nrows=nrows)
    for ax, layer in zip(axes.flat, layers, strict=False):
        sns.lineplot(data=history[history.layer == layer], x="epoch", y="erank", hue="method", hue_order=methods,
                     palette=palette, errorbar=("ci", 95), seed=0, ax=ax, legend=ax is axes.flat[0])
        for t in targets[targets.layer == layer].itertuples():
            ax.axhline(t.target, color=palette.get(t.method, "black"), ls="--", lw=1.2)
        ax.set_title(layer, fontsize=10)
        ax.set_ylabel("effective rank")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    first = axes.flat[0]
    if first.get_legend() is not None:
        handles, labels = first.get_legend_handles_labels()
        first.get_legend().remove()
        fig.legend(handles, labels, title="method", loc="outside right upper", fontsize=9)
    for ax in list(axes.flat)[len(layers):]:
        ax.set_visible(False)
    fig.suptitle("effective rank per diagnostic layer" + (" (dashed: SES target d^β, in the method's colour)"
                                                           if len(targets) else ""), fontsize=11)
    return fig


def corruption_heatmap(blocks: pd.DataFrame, path) -> Path:
    """Accuracy (%) per corruption (rows) × severity (columns), one panel per method, seed means.

    ``blocks``: columns method, seed, corruption, severity, acc (fraction)."""
    import seaborn as sns

    methods = list(dict.fromkeys(blocks["method"]))
    table = blocks.groupby(["method", "corruption", "severity"], sort=False)["acc"].mean().mul(100)
    corruptions = sorted(blocks["corruption"].unique(), key=lambda c: ("(extra)" in c, c))  # extras last
    fig, axes = _figure(1.6 + 2.9 * len(methods), 0.9 + 0.3 * len(corruptions), ncols=len(methods), sharey=True)
    low, high = float(table.min()), float(table.max())
    for i, (ax, method) in enumerate(zip(axes[0], methods, strict=True)):
        grid = table.loc[method].unstack("severity").reindex(corruptions)
        sns.heatmap(grid, ax=ax, vmin=low, vmax=high, cmap="viridis", annot=True, fmt=".0f",
                    annot_kws={"fontsize": 7}, cbar=i == len(methods) - 1,
                    cbar_kws={"label": "accuracy (%)"} if i == len(methods) - 1 else None)
        ax.set_title(method, fontsize=10)
        ax.set_xlabel("severity")
        ax.set_ylabel("corruption" if i == 0 else "")
    return _save(fig, path)


def reliability(bins: pd.DataFrame, path) -> Path:
    """Reliability diagram (Guo et al. 2017, Fig. 1): accuracy per confidence bin against the diagonal of perfect
    calibration, one panel per method, seeds pooled; the gap to the diagonal per bin is what ECE averages.

    ``bins``: columns method, bin (0-based of ``n_bins``), count, correct, conf_sum (summed or per seed)."""
    methods = list(dict.fromkeys(bins["method"]))
    n_bins = int(bins["bin"].max()) + 1 if len(bins) else 15
    n_bins = max(n_bins, 15)
    pooled = bins.groupby(["method", "bin"], sort=False)[["count", "correct", "conf_sum"]].sum()
    ncols = min(len(methods), 4)
    nrows = -(-len(methods) // ncols)
    fig, axes = _figure(3.0 * ncols, 3.1 * nrows, ncols=ncols, nrows=nrows)
    width = 1.0 / n_bins
    edges = np.arange(n_bins) * width
    for ax, method in zip(axes.flat, methods, strict=False):
        p = pooled.loc[method].reindex(range(n_bins), fill_value=0)
        filled = p["count"] > 0
        acc = np.where(filled, p["correct"] / p["count"].where(filled, 1), 0.0)
        conf = np.where(filled, p["conf_sum"] / p["count"].where(filled, 1), 0.0)
        ax.bar(edges, acc, width=width, align="edge", color="C0", edgecolor="black", lw=0.5, label="accuracy")
        # Hatched, unfilled: where accuracy exceeds confidence (under-confidence) the gap overlays the blue bar.
        ax.bar(edges[filled], (conf - acc)[filled], bottom=acc[filled], width=width, align="edge", fill=False,
               hatch="////", edgecolor="C3", lw=0.8, label="gap to mean confidence")
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ece = float(np.abs(p["correct"] - p["conf_sum"]).sum() / max(p["count"].sum(), 1))
        ax.set_title(f"{method} (ECE {ece * 100:.1f} %)", fontsize=10)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
    axes.flat[0].legend(loc="upper left", fontsize=8)
    for ax in list(axes.flat)[len(methods):]:
        ax.set_visible(False)
    return _save(fig, path)


def learning_curve(runs: pd.DataFrame, path) -> Path:
    """Test accuracy (%) against the number of training samples, a line per method (mean, band = bootstrap 95 % CI
    over seeds), log-scaled x. ``runs``: columns method, train_size, seed, test_acc (fraction)."""
    import seaborn as sns

    fig, axes = _figure(5.5, 3.8)
    ax = axes[0, 0]
    data = runs.assign(test_acc=runs["test_acc"] * 100)
    sns.lineplot(data=data, x="train_size", y="test_acc", hue="method", marker="o", errorbar=("ci", 95), seed=0, ax=ax)
    ax.set_xscale("log")
    ax.set_xticks(sorted(data["train_size"].unique()))
    ax.set_xticklabels([str(int(v)) for v in sorted(data["train_size"].unique())])
    ax.minorticks_off()
    ax.set_xlabel("training samples")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("learning curve (mean, bootstrap 95 % CI over seeds)", fontsize=10)
    return _save(fig, path)
