"""Leaderboard figures (seaborn, PNG): pure functions of DataFrames — no store, no torch
(docs/architecture.md, "Data flows one way").

Every function takes a tidy frame, writes one PNG and returns its path. Figures are drawn on a bare matplotlib
``Figure`` (no pyplot state), so they are safe in any thread and never open a window. Accuracies arrive as
fractions and are drawn in percent.
"""
from __future__ import annotations

import contextlib
import os
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
    # Drawn to a temp name, then renamed: a full disk leaves the previous figure, never half of one.
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        fig.savefig(tmp, dpi=DPI, metadata={"Software": None})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def seed_points(runs: pd.DataFrame, summary: pd.DataFrame, path, metric_label: str = "test accuracy (%)",
                chance: float | None = None) -> Path:
    """``seed_points_figure`` saved as a PNG at ``path``."""
    return _save(seed_points_figure(runs, summary, metric_label, chance), path)


def seed_points_figure(runs: pd.DataFrame, summary: pd.DataFrame, metric_label: str = "test accuracy (%)",
                       chance: float | None = None):
    """Per-seed points of every method with its mean and 95 % t-interval.

    ``runs``: columns method, seed, value (fraction), optionally degenerate (bool: a collapsed run, drawn as a red
    ×). ``summary``: the rows of ``stats.compare`` (method, mean, ci_low, ci_high; None where fewer than 2 seeds).
    ``chance``: 1/K as a fraction, drawn as a dashed line; when any run collapsed the axis starts at 0, so a
    collapse that every seed shares (10.20 % ± 0.00) is not drawn as a tight, real result."""
    import seaborn as sns

    order = list(summary["method"])
    fig, axes = _figure(max(1.2 + 1.1 * len(order), 4.6), 3.6)
    ax = axes[0, 0]
    data = runs.assign(value=runs["value"] * 100)
    bad = data["degenerate"].astype(bool) if "degenerate" in data else pd.Series(False, index=data.index)
    with _seeded_numpy(0):  # seaborn jitters with numpy's global generator: seeded, a redraw is byte-identical
        sns.stripplot(data=data[~bad], x="method", y="value", order=order, hue="method", hue_order=order,
                      legend=False, jitter=0.12, size=6, alpha=0.8, ax=ax, palette=method_palette(order))
    if bad.any():
        where = {m: i for i, m in enumerate(order)}
        jitter = np.random.default_rng(0).uniform(-0.12, 0.12, int(bad.sum()))  # seeded: redraws are identical
        ax.scatter([where[m] + j for m, j in zip(data.method[bad], jitter, strict=True)], data.value[bad], marker="x", color="red", s=45, lw=1.6,
                   zorder=4, label="collapsed run")
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
    if limits is not None and bad.any():  # a collapse: show it against the whole scale from 0, chance included
        limits = (0.0, min(max(limits[1], (chance or 0) * 100 + 5.0, 20.0), 100.0))
    if limits is not None:
        ax.set_ylim(*limits)
    if chance is not None and (bad.any() or (limits is not None and limits[0] <= chance * 100 <= limits[1])):
        ax.axhline(chance * 100, color="0.3", ls="--", lw=1.0, zorder=1, label=f"chance ({chance * 100:.2f} %)")
    if bad.any() or (chance is not None and ax.get_legend_handles_labels()[0]):
        ax.legend(loc="best", fontsize=8)
    ax.set_xticks(range(len(order)), order)  # the categories even when every run collapsed (no dots drawn)
    ax.set_xlim(-0.5, len(order) - 0.5)
    ax.set_xlabel("")
    ax.set_ylabel(metric_label)
    title = "seeds (dots), mean (bar), 95 % CI (whisker)"
    if no_interval:
        title += "\nno whisker: fewer than 3 seeds" + ("" if len(no_interval) == len(order) else
                                                      f" ({', '.join(no_interval)})")
    ax.set_title(title, fontsize=10)
    ax.tick_params(axis="x", rotation=30 if len(order) > 4 else 0)
    return fig


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


@contextlib.contextmanager
def _seeded_numpy(seed: int):
    """numpy's global generator seeded for the block, and restored after it (callers' draws are not disturbed)."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def method_palette(methods: list[str]) -> dict:
    """One distinct colour per method: seaborn's default palette up to its 10 colours, evenly spaced hues beyond
    (the default cycles: in a 13-method run ses and ses+spectral_norm were both orange, so a dashed SES target
    "in the method's colour" named neither)."""
    import seaborn as sns

    colours = sns.color_palette(n_colors=len(methods)) if len(methods) <= 10 else sns.color_palette("husl",
                                                                                                     len(methods))
    return dict(zip(methods, colours, strict=True))


DASHES = ["", (4, 1.5), (1, 1), (6, 2, 1, 2), (3, 1, 1, 1, 1, 1), (8, 3), (2, 2), (5, 1, 1, 1)]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p", "d"]
BANDS_UP_TO = 4  # more methods than this: no confidence bands (a dozen overlapping bands read as one grey smear)


def method_styles(methods: list[str]) -> tuple[dict, dict, dict]:
    """Per method a colour (``method_palette``), a dash pattern and a marker, so that no two of a dozen methods share
    all three and lines stay apart where colours are close: (palette, dashes, markers) as seaborn takes them."""
    palette = method_palette(methods)
    dashes = {m: DASHES[i % len(DASHES)] for i, m in enumerate(methods)}
    markers = {m: MARKERS[i % len(MARKERS)] for i, m in enumerate(methods)}
    return palette, dashes, markers


def erank_curves(history: pd.DataFrame, targets: pd.DataFrame, path) -> Path:
    """Effective rank of each diagnostic layer over epochs, one panel per layer, a line per method (mean over
    seeds, band = seaborn's bootstrap 95 % CI, seeded so redraws match) and the SES target d^β (eq. 5) as a dashed
    line in the method's colour.

    ``history``: columns method, seed, epoch, layer, erank. ``targets``: columns method, layer, target."""
    return _save(erank_figure(history, targets), path)


def erank_figure(history: pd.DataFrame, targets: pd.DataFrame):
    """The figure of ``erank_curves``; the legend sits outside the panels (inside the first one it hid that panel's
    lines and title once a run had a dozen methods). Each method has its own colour, dash pattern and marker; past
    ``BANDS_UP_TO`` methods the bands are left out (the mean lines alone)."""
    import seaborn as sns

    layers = list(dict.fromkeys(history["layer"]))
    methods = list(dict.fromkeys(history["method"]))
    palette, dashes, markers = method_styles(methods)
    band = ("ci", 95) if len(methods) <= BANDS_UP_TO else None
    ncols = min(len(layers), 3)
    nrows = -(-len(layers) // ncols)
    fig, axes = _figure(4.2 * ncols + 2.0, 3.3 * nrows + 0.4, ncols=ncols, nrows=nrows)
    for ax, layer in zip(axes.flat, layers, strict=False):
        sns.lineplot(data=history[history.layer == layer], x="epoch", y="erank", hue="method", hue_order=methods,
                     style="method", style_order=methods, dashes=dashes, markers=markers, markersize=5,
                     palette=palette, errorbar=band, seed=0, ax=ax, legend=ax is axes.flat[0])
        for t in targets[targets.layer == layer].itertuples():
            ax.axhline(t.target, color=palette.get(t.method, "black"), ls=":", lw=1.6)
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
    fig.suptitle("effective rank per diagnostic layer" + (" (dotted: SES target d^β, in the method's colour)"
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


def reliability(bins: pd.DataFrame, path, ece: dict | None = None) -> Path:
    """``reliability_figure`` saved as a PNG at ``path``."""
    return _save(reliability_figure(bins, ece), path)


def reliability_figure(bins: pd.DataFrame, ece: dict | None = None):
    """Reliability diagram (Guo et al. 2017, Fig. 1): accuracy per confidence bin against the diagonal of perfect
    calibration, one panel per method, seeds pooled; the gap to the diagonal per bin is what ECE averages.

    ``bins``: columns method, bin (0-based of ``n_bins``), count, correct, conf_sum (summed or per seed). ``ece``:
    method -> the mean ECE over seeds (a fraction) the leaderboard's table prints; the title shows it with the same
    two decimals. Without it, the ECE of the pooled bins (which differs from the mean of the seeds' ECEs)."""
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
        if ece is not None and method in ece:
            ax.set_title(f"{method} (mean ECE {ece[method] * 100:.2f} %)", fontsize=10)
        else:
            pooled_ece = float(np.abs(p["correct"] - p["conf_sum"]).sum() / max(p["count"].sum(), 1))
            ax.set_title(f"{method} (pooled ECE {pooled_ece * 100:.2f} %)", fontsize=10)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
    axes.flat[0].legend(loc="upper left", fontsize=8)
    for ax in list(axes.flat)[len(methods):]:
        ax.set_visible(False)
    return fig


def learning_curve(runs: pd.DataFrame, path) -> Path:
    """Test accuracy (%) against the number of training samples, a line per method (mean, band = bootstrap 95 % CI
    over seeds), log-scaled x. ``runs``: columns method, train_size, seed, test_acc (fraction)."""
    import seaborn as sns

    fig, axes = _figure(5.5, 3.8)
    ax = axes[0, 0]
    data = runs.assign(test_acc=runs["test_acc"] * 100)
    methods = list(dict.fromkeys(data["method"]))
    palette, dashes, markers = method_styles(methods)
    sns.lineplot(data=data, x="train_size", y="test_acc", hue="method", hue_order=methods, style="method",
                 style_order=methods, dashes=dashes, markers=markers, palette=palette, seed=0, ax=ax,
                 errorbar=("ci", 95) if len(methods) <= BANDS_UP_TO else None)
    ax.set_xscale("log")
    ax.set_xticks(sorted(data["train_size"].unique()))
    ax.set_xticklabels([str(int(v)) for v in sorted(data["train_size"].unique())])
    ax.minorticks_off()
    ax.set_xlabel("training samples")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("learning curve (mean over seeds" + (", bootstrap 95 % CI)" if len(methods) <= BANDS_UP_TO
                                                      else ")"), fontsize=10)
    if len(methods) > 6:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return _save(fig, path)


def paired_differences(pairs: pd.DataFrame, rows: pd.DataFrame, margin_pp: float, path,
                       reference: str = "baseline") -> Path:
    """``paired_differences_figure`` saved as a PNG at ``path``."""
    return _save(paired_differences_figure(pairs, rows, margin_pp, reference), path)


def paired_differences_figure(pairs: pd.DataFrame, rows: pd.DataFrame, margin_pp: float, reference: str = "baseline"):
    """The comparison every test of the table makes, drawn: per method (one row each) the per-seed differences to
    the reference in pp (dots; grey × where either run of the pair collapsed), their mean (diamond) and its 95 %
    t-interval (bar), a line at 0 and the equivalence margin ±``margin_pp`` shaded.

    ``pairs``: columns method, seed, delta (fraction), degenerate (bool). ``rows``: the methods' rows of
    ``stats.compare`` (method, delta, delta_ci_low, delta_ci_high) plus ``label``, the row's y tick text (the
    report puts the table's Δ [CI] there, so the figure's numbers are the table's)."""
    methods = list(rows["method"])
    fig, axes = _figure(8.0, 1.3 + 0.42 * max(len(methods), 2))
    ax = axes[0, 0]
    palette = method_palette([reference, *[m for m in methods if m != reference]])  # seed_points' colours
    ax.axvspan(-margin_pp, margin_pp, color="0.9", zorder=0, label=f"equivalence margin ±{margin_pp:g} pp")
    ax.axvline(0, color="0.3", lw=1.0, zorder=1)
    rng = np.random.default_rng(0)  # jitter only, seeded so a redraw is byte-identical
    for i, r in enumerate(rows.itertuples()):
        y = len(methods) - 1 - i
        mine = pairs[pairs.method == r.method]
        jitter = rng.uniform(-0.12, 0.12, len(mine))
        ok = ~mine.degenerate.astype(bool).to_numpy()
        ax.scatter(mine.delta[ok] * 100, y + jitter[ok], color=palette[r.method], s=22, alpha=0.75, zorder=2)
        ax.scatter(mine.delta[~ok] * 100, y + jitter[~ok], color="0.45", marker="x", s=30, zorder=2)
        if r.delta is not None:
            if r.delta_ci_low is not None:
                ax.plot([r.delta_ci_low * 100, r.delta_ci_high * 100], [y, y], color="black", lw=2, zorder=3)
            ax.scatter([r.delta * 100], [y], marker="D", color="black", s=36, zorder=4)
    ax.set_yticks(range(len(methods)))
    ax.set_yticklabels(list(rows["label"])[::-1], fontsize=9)
    ax.set_ylim(-0.6, len(methods) - 0.4)
    ax.set_xlabel(f"Δ test accuracy vs {reference} (pp), paired by seed")
    ax.set_title(f"difference to {reference} per seed (dots), mean (◆) and 95 % CI (bar)", fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower right", fontsize=8)  # outside: never over a row's points
    return fig
