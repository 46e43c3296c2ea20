"""The leaderboard's figures section: which figures a benchmark's runs allow, drawn by :mod:`regbench.figures`,
with captions that say what is drawn and, for every figure the README lists that is not drawn, why. Pure functions of
the runs frame (``report.runs_frame``) and the statistics table: no store, no torch.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from regbench import cells

# Every figure the leaderboard can embed, in its order (the README lists them): file name -> what it shows.
FIGURES = {
    "paired_differences.png": "paired differences to baseline",
    "test_acc_seeds.png": "per-seed points",
    "erank.png": "erank vs the SES target",
    "reliability.png": "reliability",
    "corruptions.png": "corruption heatmap",
    "learning_curve.png": "learning curve",
}


def section(df: pd.DataFrame, table, curve: pd.DataFrame, folder: Path, written: list | None,
            reference: str = "baseline", margin_pp: float = 0.5, curve_note: str = "") -> list[str]:
    """Draw every figure the runs allow and return the markdown that embeds them (paths relative to OUT), then one
    line per listed figure that is not drawn, with the reason. ``table``: ``stats.compare`` indexed by method (None
    without reference runs); ``df`` carries a ``degenerate`` column (the reason a run collapsed, "" if not);
    ``curve``: the learning-curve frame ("" reasons in ``curve_note`` when empty)."""
    from regbench import degenerate, figures

    written = written if written is not None else []
    lines = ["", "## Figures", ""]
    skipped: dict[str, str] = {}

    def embed(path: Path, caption: str):
        written.append(path)
        lines.extend([f"![{caption}](figures/{path.name})", "", f"*{caption}*", ""])

    collapsed = set(df.method[df.degenerate.astype(bool)]) if "degenerate" in df else set()
    chance = degenerate.chance_level(df)
    if table is not None and len(table) > 1:
        embed(figures.paired_differences(paired_frame(df, reference), paired_rows(table, reference), margin_pp,
                                         folder / "paired_differences.png", reference=reference),
              f"Δ test accuracy against {reference} (pp) per seed (dots, paired by seed), the mean (diamond) and "
              f"its 95 % t-interval (bar), one row per method; the label repeats the table's Δ [95 % CI]; shaded: "
              f"the equivalence margin ±{margin_pp:g} pp; grey ×: a seed where either run collapsed. Read this, "
              f"not overlapping per-method intervals: every test is on these paired differences.")
    else:
        skipped["paired_differences.png"] = (f"no method to compare with {reference}" if table is not None
                                             else f"no finished {reference} runs to compare with")
    if table is not None:
        summary = table.reset_index()[["method", "mean", "ci_low", "ci_high"]]
        runs = df[["method", "seed"]].assign(value=df.test_acc, degenerate=df.get("degenerate", "").astype(bool))
        caption = "Test accuracy per seed (dots), mean (bar) and 95 % t-interval (whisker) per method"
        if chance is not None:
            caption += f"; dashed: chance (1/{round(1 / chance)} = {chance * 100:.2f} %)"
        if collapsed:
            caption += ("; red ×: a collapsed run (one predicted class, or accuracy within noise of chance), and "
                        "the axis starts at 0 so a collapse does not read as a tight result")
        embed(figures.seed_points(runs, summary, folder / "test_acc_seeds.png", chance=chance), caption + ".")
    else:
        skipped["test_acc_seeds.png"] = f"no finished {reference} runs, so no table to draw"
    history, targets = _erank_history(df)
    if not history.empty:
        merged = merge_identical_layers(history)
        panels = {layer: layer.split(" = ") for layer in dict.fromkeys(merged.layer)}
        targets = targets.assign(layer=targets.layer.map(
            {part: name for name, parts in panels.items() for part in parts})).drop_duplicates()
        embed(figures.erank_curves(merged, targets, folder / "erank.png"), erank_caption(df, targets, panels))
    else:
        skipped["erank.png"] = "the runs recorded no effective-rank history"
    bins = _reliability_bins(df)
    if not bins.empty:
        ece = {m: float(df.ece[df.method == m].mean()) for m in dict.fromkeys(bins.method)}
        embed(figures.reliability(bins, folder / "reliability.png", ece=ece),
              "Reliability diagram on the clean test set: accuracy per confidence bin (blue, the seeds' bins pooled) "
              "against the diagonal of perfect calibration; red hatching = gap to the bin's mean confidence (above "
              "the bar: over-confident, inside it: under-confident); the title's ECE is the mean over seeds, the "
              "table's number.")
    else:
        skipped["reliability.png"] = "the runs recorded no reliability bins (no test evaluation)"
    blocks = seed_blocks(df)
    if not blocks.empty:
        embed(figures.corruption_heatmap(blocks, folder / "corruptions.png"),
              "Accuracy (%) per corruption × severity, mean over seeds, one panel per method.")
    else:
        skipped["corruptions.png"] = "no shift set was evaluated (run with `--shift`, e.g. `--shift digits_c_style`)"
    if not curve.empty:
        embed(figures.learning_curve(curve, folder / "learning_curve.png"),
              f"Test accuracy vs training samples over the benchmarks of this store with this benchmark's protocol "
              f"({', '.join(str(int(n)) for n in sorted(curve.train_size.unique()))} samples): mean over seeds "
              f"with a bootstrap 95 % band.")
    else:
        skipped["learning_curve.png"] = curve_note or "no learning-curve data"
    if skipped:
        lines += ["Not drawn:", *(f"- `{name}` ({FIGURES[name]}): {why}" for name, why in skipped.items()), ""]
    return lines


def paired_rows(table: pd.DataFrame, reference: str) -> pd.DataFrame:
    """The methods' rows of the statistics table (indexed by method) with the paired figure's row labels: the
    method and the table's own Δ [95 % CI] text, so the figure prints the table's numbers."""
    from regbench import degenerate

    rows = table.reset_index()
    rows = rows[rows.method != reference]
    return rows.assign(label=[f"{r.method}  {cells.delta_text(r)}" + ("  (collapsed)" if r.verdict ==
                              degenerate.COLLAPSED else "") for r in rows.itertuples()])


def paired_frame(df: pd.DataFrame, reference: str) -> pd.DataFrame:
    """Per method and seed shared with the reference: Δ = method − reference (fractions), and whether either run
    of the pair collapsed."""
    ref = df[df.method == reference].set_index("seed")
    rows = []
    for r in df[df.method != reference].itertuples():
        if r.seed in ref.index:
            bad = bool(getattr(r, "degenerate", "")) or bool(ref.loc[r.seed].get("degenerate", ""))
            rows.append({"method": r.method, "seed": r.seed, "delta": r.test_acc - ref.loc[r.seed, "test_acc"],
                         "degenerate": bad})
    return pd.DataFrame(rows, columns=["method", "seed", "delta", "degenerate"])


def ses_beta(method: str, hparams: dict) -> float | None:
    """β of the SES part of a method: ``beta`` of ``ses`` itself, ``ses.beta`` of a composite with an SES part;
    None otherwise (another method's ``beta``, e.g. confidence_penalty's, is no SES target)."""
    if method == "ses":
        return hparams.get("beta")
    if "ses" in method.split("+"):
        return hparams.get("ses.beta")
    return None


def _erank_history(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Long frame (method, seed, epoch, layer, erank) from the stored histories, and the SES targets d^β of every
    run with an SES part and a known β, on the diagnostic layers it shapes (d = the layer's width stored by the
    engine). The layers SES shapes are those it reports an entropy for (``ses_entropy/<layer>``); runs stored
    before that was recorded fall back to the layer rule "auto" (SES hooks the diagnostic layers)."""
    rows, targets = [], {}
    for run in df.itertuples():
        hp = run.config.get("hparams", {})
        beta = ses_beta(run.method, hp)
        rule = hp.get("layers") if run.method == "ses" else hp.get("ses.layers")
        for h in run.history:
            shaped = {k.split("/", 1)[1] for k in {**run.metrics, **h} if k.startswith("ses_entropy/")}
            for layer in run.layers:
                if f"erank/{layer}" in h:
                    rows.append({"method": run.method, "seed": run.seed, "epoch": h["epoch"], "layer": layer,
                                 "erank": h[f"erank/{layer}"]})
                hooked = layer in shaped if shaped else rule == "auto"
                if beta is not None and hooked and h.get(f"width/{layer}"):
                    targets[(run.method, layer)] = float(h[f"width/{layer}"]) ** float(beta)
    return (pd.DataFrame(rows),
            pd.DataFrame([{"method": m, "layer": lay, "target": t} for (m, lay), t in targets.items()],
                         columns=["method", "layer", "target"]))


def erank_caption(df: pd.DataFrame, targets: pd.DataFrame, panels: dict) -> str:
    """The effective-rank figure's caption: what is drawn, and for a method with an SES β and no target line, the
    reason read from its runs (never a guessed cause). ``panels``: panel name → the layers it shows."""
    caption = ("Effective rank (SES eq. 4) of each diagnostic layer over epochs, mean over seeds with a bootstrap "
               "95 % band")
    if any(len(parts) > 1 for parts in panels.values()):
        caption += "; a panel named \"a = b\" is one series recorded at two layers with identical values"
    with_beta = sorted({r.method for r in df.itertuples() if ses_beta(r.method, r.config.get("hparams", {}))
                        is not None})
    drawn = sorted(set(targets.method))
    caption += f"; dashed: the SES target d^β of {', '.join(drawn)} in its colour (d = layer width)" if drawn else ""
    missing = [m for m in with_beta if m not in drawn]
    caption += (f"; no target for {', '.join(missing)}: its runs recorded no width for the layers it shapes."
                if missing else "." if with_beta else "; no SES run here, so no target d^β.")
    return caption


def merge_identical_layers(history: pd.DataFrame) -> pd.DataFrame:
    """Layers whose effective-rank series are identical in every run and epoch (e.g. the last block's output and
    the global-average pool under ``conv_reduce=gap``: the pool's covariance is the block's) become one panel named
    "a = b", so one quantity is not drawn twice as if it were two."""
    if history.empty:
        return history
    series = {layer: frame.sort_values(["method", "seed", "epoch"])[["method", "seed", "epoch", "erank"]]
              .reset_index(drop=True) for layer, frame in history.groupby("layer", sort=False)}
    rename, groups = {}, []
    for layer, values in series.items():
        for group in groups:
            first = series[group[0]]
            if len(first) == len(values) and first[["method", "seed", "epoch"]].equals(values[["method", "seed",
                                                                                                "epoch"]]) \
                    and np.allclose(first.erank.to_numpy(float), values.erank.to_numpy(float), rtol=1e-9, atol=0):
                group.append(layer)
                break
        else:
            groups.append([layer])
    for group in groups:
        for layer in group:
            rename[layer] = " = ".join(group)
    return history.assign(layer=history.layer.map(rename))


def _reliability_bins(df: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for run in df.itertuples():
        rel = run.metrics.get("test_reliability")
        if rel:
            for b, (n, c, s) in enumerate(zip(rel["count"], rel["correct"], rel["conf_sum"], strict=True)):
                rows.append({"method": run.method, "seed": run.seed, "bin": b, "count": n, "correct": c,
                             "conf_sum": s})
    return pd.DataFrame(rows)


def seed_blocks(df: pd.DataFrame) -> pd.DataFrame:
    """One row per run, corruption and severity: the run's accuracy on that shifted test set (robustness table and
    heatmap)."""
    rows = []
    for run in df.itertuples():
        for key, acc in run.metrics.items():
            if key.startswith(("shift/", "shift_extra/")):
                family, corruption, severity = key.split("/")
                name = corruption + (" (extra)" if family == "shift_extra" else "")
                rows.append({"method": run.method, "seed": run.seed, "corruption": name, "severity": int(severity),
                             "acc": acc})
    return pd.DataFrame(rows)
