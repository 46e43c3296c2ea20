"""Leaderboards, figures and the tidy export, generated from the store only (DESIGN.md §2): no torch, no training,
no MLflow.

``write_report(storage, benchmark, out_dir)`` writes ``leaderboard.md`` and its figures (``figures/*.png``, drawn by
:mod:`regbench.figures`): one row per method with mean ± 95 % CI over seeds, the difference to ``baseline`` with its
CI, Holm-adjusted p, Hedges' g and a verdict from :func:`regbench.stats.compare`, then robustness and calibration
sections when the runs have them. ``export_frame`` is the tidy table of ``regbench export``; ``write_summary`` ranks
methods over several benchmarks (:func:`regbench.stats.rank_across`, Demšar 2006).
"""
from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.stats

from regbench import stats
from regbench.errors import ConfigError, RegbenchError
from regbench.store import (
    final_study_name,
    final_trials,
    load_spec,
    selection,
    spent,
    trials_of,
)

REFERENCE = "baseline"


def runs_frame(storage, benchmark: str, spec: dict) -> pd.DataFrame:
    """One row per completed final run of the spec's configurations (a tidy frame for stats and reports)."""
    rows, seeds = [], set(spec["seeds"])
    for method, info in spec["methods"].items():
        group_key = selection(storage, benchmark, method, info).get("group_key")
        if group_key is None:  # still tuning: no finals yet
            continue
        for t in final_trials(storage, benchmark, method, group_key):
            seed = int(json.loads(t.user_attrs["config"])["seed"])  # a param only in stores before issue 20
            if seed not in seeds:  # the store may hold other seeds of the same config
                continue
            m, layers = t.user_attrs["metrics"], t.user_attrs.get("diagnostic_layers", [])
            rows.append({
                "method": method, "seed": seed, "trial": t.number,
                "test_acc": m.get("test_acc", math.nan), "val_acc": m["val_acc"], "train_acc": m["train_acc"],
                "shift_acc": m.get("shift_acc", math.nan), "shift_extra_acc": m.get("shift_extra_acc", math.nan),
                "shift_blocks": {k: v for k, v in m.items() if k.startswith("shift/")},
                "gap": m["gap"], "ece": m.get("test_ece", math.nan), "nll": m.get("test_nll", math.nan),
                "erank": m.get(f"erank/{layers[-1]}", math.nan) if layers else math.nan,
                "erank_layer": layers[-1] if layers else "", "seconds_per_epoch": m["seconds_per_epoch"],
                "finished": t.datetime_complete, "torch": t.user_attrs.get("env", {}).get("torch", "?"),
                "regbench": t.user_attrs.get("env", {}).get("regbench", "?"),
                "git_commit": t.user_attrs.get("env", {}).get("git_commit", ""),
                "device": t.user_attrs.get("env", {}).get("device", "?"),
                "dataset": spec["dataset"], "model": spec["model"], "train_size": _train_size(t, spec),
                "config": json.loads(t.user_attrs.get("config", "{}")), "metrics": m, "layers": layers,
                "history": t.user_attrs.get("history", []),
            })
    return pd.DataFrame(rows)


def _train_size(trial, spec: dict):
    """Training samples of a run, when the command fixed them (--train-size or K per class); None = the full split."""
    cfg = json.loads(trial.user_attrs.get("config", "{}"))
    if cfg.get("train_size"):
        return int(cfg["train_size"])
    if cfg.get("train_per_class") and spec.get("num_classes"):
        return int(cfg["train_per_class"]) * int(spec["num_classes"])
    return None


def mean_cell(values: pd.Series, scale: float = 1.0, digits: int = 2, min_seeds: int = stats.MIN_SEEDS) -> str:
    """Mean ± half-width of its 95 % t-interval over seeds (the interval stats.compare gives). Below ``min_seeds``
    the mean alone, with the seed count in words: at 2 seeds the interval's t quantile is 12.7 and it means
    nothing (a 69 % accuracy ± 46 pp)."""
    v = values.dropna() * scale
    if v.empty:
        return "–"
    if len(v) < min_seeds:
        return f"{v.mean():.{digits}f}"  # the seeds column gives n; the legend says in words why no interval
    low, high = stats._ci(v.to_numpy(), 0.05)
    if low is None or not math.isfinite(low):  # every seed equal: no spread, the interval is the point
        return f"{v.mean():.{digits}f} ± 0"
    return f"{v.mean():.{digits}f} ± {(high - low) / 2:.{digits}f}"


_mean_ci = mean_cell


def timing_cell(values: pd.Series, digits: int = 3) -> str:
    """Median and range of a timing over seeds: wall time is skewed by the machine's load and is not a quantity
    anyone wants a t-interval of (a mean ± interval at n = 2 even went negative)."""
    v = values.dropna()
    if v.empty:
        return "–"
    if len(v) == 1:
        return f"{v.iloc[0]:.{digits}f}"
    return f"{v.median():.{digits}f} ({v.min():.{digits}f}–{v.max():.{digits}f})"


def _num(value, fmt: str = "{:.2f}") -> str:
    """None → "–", inf → "> 1000" (seeds needed beyond stats.MAX_SEEDS), else formatted."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float) and math.isinf(value):
        return f"> {stats.MAX_SEEDS}"
    return fmt.format(value)


def _p(p) -> str:
    return "–" if p is None else ("< 0.001" if p < 0.001 else f"{p:.3f}")


def _mark(p, alpha: float = 0.05) -> str:
    if p is None:
        return "–"
    return "***" if p < 0.001 else "**" if p < 0.01 else "*" if p < alpha else "ns"


def _delta_cell(row) -> str:
    if row.verdict == "reference":
        return "—"
    if row.delta is None:
        return "–"
    text = f"{row.delta * 100:+.2f}"
    if row.delta_ci_low is not None:
        text += f" [{row.delta_ci_low * 100:+.2f}, {row.delta_ci_high * 100:+.2f}]"
    else:
        text += " (no interval, see notes)"
    return text


def test_cells(row) -> str:
    """The comparison columns of one method's row of stats.compare (Δ in pp, p, sig., g, verdict, power)."""
    return (f"{_delta_cell(row)} | {_p(row.p_holm)} | {_mark(row.p_holm)} | {_num(row.hedges_g, '{:+.2f}')} | "
            f"{row.verdict} | {_num(row.seeds_needed, '{}')}")


test_cells.__test__ = False  # not a pytest test when imported into a test module


def _relative_mce(df: pd.DataFrame, method: str) -> str:
    """mCE-style (Hendrycks & Dietterich 2019): per benchmark corruption, the method's error summed over severities
    over baseline's, averaged over corruptions; errors are seed means. 1.00 = as robust as baseline, lower = better."""
    def errors(rows):
        blocks = pd.DataFrame(list(rows.shift_blocks)).mean()
        return {k: 1 - v for k, v in blocks.items()}

    ref, mine = df[df.method == REFERENCE], df[df.method == method]
    if ref.empty or mine.empty or not len(mine.shift_blocks.iloc[0]):
        return "–"
    e_ref, e_mine = errors(ref), errors(mine)
    corruptions = sorted({k.split("/")[1] for k in e_mine})  # benchmark blocks only: extra ones are "shift_extra/"
    ratios = []
    for c in corruptions:
        keys = [k for k in e_mine if k.split("/")[1] == c and k in e_ref]
        denominator = sum(e_ref[k] for k in keys)
        if denominator > 0:
            ratios.append(sum(e_mine[k] for k in keys) / denominator)
    return f"{sum(ratios) / len(ratios):.3f}" if ratios else "–"


def _train_acc_line(spec: dict) -> list[str]:
    """The header line that says train accuracy (and so the gap) was measured on a sample (``--train-acc-sample``):
    a choice that changes a column's numbers is named where the column is read (issue 19)."""
    base = spec.get("base") or {}
    base = json.loads(base) if isinstance(base, str) else base
    n = base.get("train_acc_sample")
    if not n:
        return []
    return [f"- train accuracy, and so the gap, measured each epoch on a fixed sample of {n} training images "
            f"(`--train-acc-sample {n}`: the same images for every method and seed), not the whole training split"]


def leaderboard(storage, benchmark: str, margin_pp: float = 0.5, figures_dir: Path | None = None,
                figure_paths: list | None = None) -> str:
    """The leaderboard markdown; with ``figures_dir`` the figures are drawn there too (paths appended to
    ``figure_paths``) and embedded by relative path."""
    spec = load_spec(storage, benchmark)
    if spec is None:
        raise RegbenchError(f"no benchmark named {benchmark!r} in this store; run `regbench run` first")
    if not margin_pp > 0:
        raise ConfigError(f"--margin {margin_pp} must be > 0 (percentage points of accuracy, e.g. 0.5)")
    df = runs_frame(storage, benchmark, spec)
    methods = list(spec["methods"])
    lines = [f"# Leaderboard: {benchmark}", "",
             f"- command: `{spec['command']}`",
             (f"- dataset `{spec['dataset']}`, model `{spec['model']}`, {spec['epochs']} epochs, "
             f"seeds {', '.join(map(str, spec['seeds']))} (shared by every method, so differences are paired)")]
    proto = spec.get("protocol") or {}
    tuned = bool(proto.get("trials") or proto.get("budget_epochs"))
    if tuned:
        budget = " and ".join(x for x in (f"{proto['trials']} trials" if proto.get("trials") else "",
                                          f"{proto['budget_epochs']} epochs" if proto.get("budget_epochs") else "") if x)
        lines.append(f"- tuning: every method got {budget} of Optuna TPE (seed {proto.get('sampler_seed', 0)}, "
                     f"{proto.get('pruner', 'median')} pruner) over its search space"
                     + (" plus the shared lr and weight decay" if proto.get("tune_shared") else "")
                     + f", objective `{proto.get('objective', 'val_acc')}` on the validation split (test never read); "
                       "the best trial was rerun over the seeds below")
    else:
        lines.append("- no tuning: every method ran with its defaults (and any `--set`)")
    if spec.get("shift"):
        if spec["shift"].endswith("_style"):
            lines.append(f"- shift set `{spec['shift']}`: generated CIFAR-C-style corruptions of the test split "
                         f"(\"-style\": not comparable with official CIFAR-C numbers)")
        else:
            lines.append(f"- shift set `{spec['shift']}`: the official corruption files (md5-checked)")
    lines += _train_acc_line(spec)
    if not df.empty:
        finished = max(df.finished)
        lines.append(f"- regbench {df.regbench.iloc[-1]}, torch {df.torch.iloc[-1]}, device {df.device.iloc[-1]}, "
                     f"git {df.git_commit.iloc[-1][:10] or 'n/a'}; last run finished "
                     f"{finished.replace(microsecond=0) if isinstance(finished, dt.datetime) else finished}")
        lines.append(f"- final effective rank (SES eq. 4) of `{df.erank_layer.iloc[-1]}` on 512 validation samples, "
                     f"last epoch")
    margin = margin_pp / 100
    table = (stats.compare(df, "test_acc", reference=REFERENCE, margin=margin).set_index("method")
             if not df.empty and REFERENCE in set(df.method) else None)
    shifted = not df.empty and df.shift_acc.notna().any()
    shift_head = " corruption acc % | extra corr. acc % | rel. mCE |" if shifted else ""
    lines += ["", ("| method | seeds | test acc % | Δ test vs baseline (pp) [95 % CI] | p (Holm) | sig. | Hedges' g | "
                  "verdict | seeds for 80 % power | gap (pp) | ECE % | NLL "
                  f"|{shift_head} final erank | s/epoch | hparams; budget spent |"),
              "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|---|" if shifted else "") + "---|---|---|"]
    budgets = {m: _budget(storage, benchmark, m, spec["methods"][m]) for m in methods}
    notes = []
    for method in methods:
        mine = df[df.method == method] if not df.empty else df
        chosen = selection(storage, benchmark, method, spec["methods"][method])
        info = spec["methods"][method]
        hparams = chosen.get("hparams", info["hparams"])
        shown = [k for k in hparams if k in set(info.get("space", [])) | set(info.get("fixed", {}))]
        hp = _hparams_text({**{k: hparams[k] for k in (shown if "space" in info else hparams)},
                            **chosen.get("shared", {})})
        if info.get("space") == [] and proto and tuned:
            hp = (hp if hp != "–" else "defaults") + " (nothing to tune)"
        hp += f"; {budgets[method]}"
        if mine.empty:
            lines.append(f"| {method} | 0 | no finished runs | | | | | | | | | |{' | | |' if shifted else ''} | "
                         f"| {hp} |")
            continue
        if table is not None and method in table.index:
            r = table.loc[method]
            r = r.rename(method)
            test = test_cells(r)
            if r.note:
                notes.append(f"- {method}: {r.note}")
        else:
            test = "n/a (no baseline runs) | – | – | – | – | –"
        lines.append(f"| {method} | {len(mine)} | {_mean_ci(mine.test_acc, 100)} | {test} | "
                     f"{_mean_ci(mine.gap, 100)} | {_mean_ci(mine.ece, 100)} | {_mean_ci(mine.nll, 1, 3)} | "
                     + (f"{_mean_ci(mine.shift_acc, 100)} | {_mean_ci(mine.shift_extra_acc, 100)} | "
                        f"{_relative_mce(df, method)} | " if shifted else "") +
                     f"{_mean_ci(mine.erank, 1, 1)} | "
                     f"{timing_cell(mine.seconds_per_epoch)} | {hp} |")
    fewest = int(df.groupby("method").size().min()) if not df.empty else 0
    lines += ["", *_legend(table, margin_pp, shifted, fewest)]
    if notes:
        lines += ["", "Notes from the tests:", *notes]
    if not df.empty and df.ece.notna().any():
        lines += _calibration(df, methods)
    if shifted:
        lines += _robustness(df, methods)
    if figures_dir is not None and not df.empty:
        lines += _figures(df, table, spec, storage, benchmark, Path(figures_dir), figure_paths)
    if proto.get("oracle"):
        lines += _oracle(storage, methods, spec)
    return "\n".join(lines) + "\n"


def _legend(table, margin_pp: float, shifted: bool, fewest: int = stats.MIN_SEEDS) -> list[str]:
    tests = sorted(set(table.test.dropna())) if table is not None else []
    how = {"paired t": "a paired t-test on the per-seed differences (same seeds, so the seed's noise cancels)",
           "Welch t": "Welch's t-test (seeds not shared with baseline)"}
    used = "; ".join(how.get(t, t) for t in tests) or "none could be made"
    few = [] if fewest >= stats.MIN_SEEDS else [
        f"**Too few seeds for statistics: {fewest} seed{'s' if fewest != 1 else ''} where at least "
        f"{stats.MIN_SEEDS} are needed.** Rows with fewer than {stats.MIN_SEEDS} seeds give means only (no ±), and "
        f"no test is made against a reference with fewer: with 2 seeds a 95 % t-interval uses "
        f"t = 12.7 (it spans most of the scale), a t-test has 1 degree of freedom and Hedges' g is undefined, so "
        f"none is printed (\"–\", reasons in the notes below). Rerun with `--seeds {stats.MIN_SEEDS}` or more "
        f"(the runs already in the store are kept).", ""]
    return few + [
        "Mean ± half-width of the 95 % t-interval over seeds; test accuracy and gap at the last epoch (gap = train − "
        "test accuracy); ECE (15 bins) and NLL on the clean test set. Δ: mean difference to baseline in percentage "
        f"points with its 95 % interval, per method (not adjusted for the table's several comparisons, so it can "
        f"exclude 0 while the Holm-adjusted p is ≥ 0.05). Test: {used}; p is Holm-adjusted over the methods of "
        "this table. sig.: "
        "\\*\\*\\* p < 0.001, \\*\\* p < 0.01, \\* p < 0.05, ns not significant, – no test possible. Hedges' g: "
        "bias-corrected standardized difference (|g| ≈ 0.2 small, 0.8 large). Verdict: better/worse when the "
        f"Holm-adjusted p < 0.05; else equivalent when the TOST equivalence test shows |Δ| < {margin_pp:g} pp "
        "(`regbench report --margin PP`); else inconclusive (more seeds needed). Seeds for 80 % power: per method, "
        "to detect the observed effect at α = 0.05. s/epoch: median over seeds (min–max), wall time on the "
        "machine named above; no interval (timings are not a quantity to test). \"–\": not computable, the reason is in "
        "the notes."
        + (" Corruption columns: mean accuracy over the 15 benchmark corruptions × 5 severities, over the 4 "
           "extra ones separately, and the mCE-style error relative to baseline (1.00 = as robust; lower is "
           "better)." if shifted else "")
        + " Budget: training epochs and wall time spent by the method, tuning trials included."]


def _figures(df: pd.DataFrame, table, spec: dict, storage, benchmark: str, folder: Path,
             written: list | None) -> list[str]:
    """Draw every figure the runs allow and return the markdown that embeds them (paths relative to OUT)."""
    from regbench import figures

    written = written if written is not None else []
    lines = ["", "## Figures", ""]

    def embed(path: Path, caption: str):
        written.append(path)
        lines.extend([f"![{caption}](figures/{path.name})", "", f"*{caption}*", ""])

    if table is not None:
        summary = table.reset_index()[["method", "mean", "ci_low", "ci_high"]]
        runs = df[["method", "seed"]].assign(value=df.test_acc)
        embed(figures.seed_points(runs, summary, folder / "test_acc_seeds.png"),
              "Test accuracy per seed (dots), mean (bar) and 95 % t-interval (whisker) per method.")
    history, targets = _erank_history(df)
    if not history.empty:
        merged = merge_identical_layers(history)
        panels = {layer: layer.split(" = ") for layer in dict.fromkeys(merged.layer)}
        targets = targets.assign(layer=targets.layer.map(
            {part: name for name, parts in panels.items() for part in parts})).drop_duplicates()
        embed(figures.erank_curves(merged, targets, folder / "erank.png"), erank_caption(df, targets, panels))
    bins = _reliability_bins(df)
    if not bins.empty:
        embed(figures.reliability(bins, folder / "reliability.png"),
              "Reliability diagram on the clean test set, seeds pooled: accuracy per confidence bin (blue) against "
              "the diagonal of perfect calibration; red hatching = gap to the bin's mean confidence (above the bar: "
              "over-confident, inside it: under-confident); the title's ECE is over the pooled seeds.")
    blocks = _blocks(df)
    if not blocks.empty:
        embed(figures.corruption_heatmap(blocks, folder / "corruptions.png"),
              "Accuracy (%) per corruption × severity, mean over seeds, one panel per method.")
    curve = _learning_curve_frame(storage, spec)
    if not curve.empty:
        embed(figures.learning_curve(curve, folder / "learning_curve.png"),
              f"Test accuracy vs training samples over the benchmarks of this store on {spec['dataset']}/"
              f"{spec['model']} ({', '.join(str(n) for n in sorted(curve.train_size.unique()))} samples).")
    return lines if written else []


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


def _blocks(df: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for run in df.itertuples():
        for key, acc in run.metrics.items():
            if key.startswith(("shift/", "shift_extra/")):
                family, corruption, severity = key.split("/")
                name = corruption + (" (extra)" if family == "shift_extra" else "")
                rows.append({"method": run.method, "seed": run.seed, "corruption": name, "severity": int(severity),
                             "acc": acc})
    return pd.DataFrame(rows)


def _calibration(df: pd.DataFrame, methods: list[str]) -> list[str]:
    brier = df.metrics.map(lambda m: m.get("test_brier", math.nan))
    lines = ["", "## Calibration", "", ("Clean test set, mean ± 95 % CI over seeds (the mean alone below 3 seeds); lower is better for all three "
             "(ECE: 15 equal-width confidence bins, Guo et al. 2017; Brier: multi-class, Σ_k (p_k − 1[y=k])²)."), "",
             "| method | ECE % | NLL | Brier |", "|---|---|---|---|"]
    for m in methods:
        mine = df.method == m
        if mine.any():
            # The name in backticks: a row starting "| method |" is the main table's (scripts look rows up that way)
            lines.append(f"| `{m}` | {_mean_ci(df.ece[mine], 100)} | {_mean_ci(df.nll[mine], 1, 3)} | "
                         f"{_mean_ci(brier[mine], 1, 3)} |")
    return lines


def _robustness(df: pd.DataFrame, methods: list[str]) -> list[str]:
    """Per corruption (rows) and method (columns): accuracy % at severities 1…5, seed means."""
    blocks = _blocks(df)
    if blocks.empty:
        return []
    means = blocks.groupby(["corruption", "method", "severity"])["acc"].mean().mul(100)
    shown = [m for m in methods if m in set(blocks.method)]
    lines = ["", "## Robustness", "", ("Accuracy % per corruption at severity 1 / 2 / 3 / 4 / 5 (mean over seeds); "
             "\"(extra)\" marks the held-out corruptions outside the benchmark mean."), "",
             "| corruption | " + " | ".join(shown) + " |", "|---|" + "---|" * len(shown)]
    for corruption in sorted(blocks.corruption.unique(), key=lambda c: ("(extra)" in c, c)):
        cells = []
        for m in shown:
            try:
                cells.append(" / ".join(f"{v:.0f}" for v in means.loc[(corruption, m)].sort_index()))
            except KeyError:
                cells.append("–")
        lines.append(f"| {corruption} | " + " | ".join(cells) + " |")
    return lines


def _learning_curve_frame(storage, spec: dict) -> pd.DataFrame:
    """Final runs of every benchmark in this store on the same dataset and model, when they span ≥ 2 train sizes."""
    import optuna

    rows = []
    for name in [s for s in optuna.get_all_study_names(storage) if ":" not in s]:
        other = load_spec(storage, name)
        if not other or other.get("dataset") != spec["dataset"] or other.get("model") != spec["model"]:
            continue
        frame = runs_frame(storage, name, other)
        if not frame.empty:
            rows.append(frame[["method", "seed", "train_size", "test_acc"]])
    curve = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()
    if curve.empty or curve.train_size.dropna().nunique() < 2:
        return pd.DataFrame()
    return curve.dropna(subset=["train_size"])


def _hparams_text(hparams: dict) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    return ", ".join(f"{k}={fmt(v)}" for k, v in hparams.items()) or "–"


def _budget(storage, benchmark: str, method: str, info: dict) -> str:
    tuning = spent(trials_of(storage, info.get("tune_study")))
    finals = spent(trials_of(storage, final_study_name(benchmark, method)))
    epochs, seconds = tuning["epochs"] + finals["epochs"], tuning["seconds"] + finals["seconds"]
    text = f"{epochs} epochs, {seconds / 60:.1f} min"
    return text + (f" ({tuning['trials']} tuning trials)" if info.get("tune_study") else "")


def _oracle(storage, methods: list[str], spec: dict) -> list[str]:
    """ORACLE: each method's tuning trial with the best *test* accuracy. Selecting on test is optimistic and not a
    valid comparison; it bounds how much the validation-based selection above may have missed."""
    lines = ["", "## ORACLE (selected on test — optimistic, not a valid comparison)", "",
             "| method | ORACLE test acc % | tuning trial | hparams |", "|---|---|---|---|"]
    for method in methods:
        done = [t for t in trials_of(storage, spec["methods"][method].get("tune_study"))
                if t.state.name == "COMPLETE" and "test_acc" in t.user_attrs.get("metrics", {})]
        if not done:
            lines.append(f"| {method} | – | – | no tuning trial with a test score |")
            continue
        best = max(done, key=lambda t: t.user_attrs["metrics"]["test_acc"])
        import json
        cfg = json.loads(best.user_attrs["config"])
        lines.append(f"| {method} | {best.user_attrs['metrics']['test_acc'] * 100:.2f} | {best.number} | "
                     f"{_hparams_text(cfg['hparams'])} |")
    lines.append("")
    lines.append("ORACLE: one tuning run (seed 10000) per method, chosen by its test accuracy; never use it to rank "
                 "methods.")
    return lines


def write_leaderboard(storage, benchmark: str, out_dir: Path, margin_pp: float = 0.5) -> Path:
    return write_report(storage, benchmark, out_dir, margin_pp)[0]


def write_report(storage, benchmark: str, out_dir: Path, margin_pp: float = 0.5) -> list[Path]:
    """OUT/leaderboard.md and OUT/figures/*.png, regenerated from the store; returns [markdown, *figures]. The
    markdown is replaced atomically, so a failure leaves the previous leaderboard whole."""
    out_dir = Path(out_dir)
    figures: list[Path] = []
    text = leaderboard(storage, benchmark, margin_pp, figures_dir=out_dir / "figures", figure_paths=figures)
    path = out_dir / "leaderboard.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return [path, *figures]


# ---------------------------------------------------------------------------------------------------------------
# Tidy export and the cross-benchmark summary.

# Scalars stored with a run's metrics that come from its last epoch's history row: exported under names that say so,
# so they cannot be mistaken for the configuration (``lr`` is the configured peak rate, not the schedule's last
# value) or for a whole-run total (``seconds_per_epoch`` is the run's mean).
LAST_EPOCH_NAMES = {"lr": "last_epoch_lr", "seconds": "last_epoch_seconds", "epoch": "epochs_trained",
                    "train_loss": "last_epoch_train_loss", "reg_loss": "last_epoch_reg_loss"}
RECIPE = ("lr", "weight_decay", "epochs", "batch_size", "optimizer", "schedule")


def export_frame(storage, benchmark: str) -> pd.DataFrame:
    """One row per final run: dataset, model, train_size, method, seed, trial, the hparams as ``hp.<name>``, the
    recipe as configured (``lr`` is the configured peak learning rate), every scalar metric under its stored name
    (accuracies as fractions) except the last epoch's history values, which are renamed (``LAST_EPOCH_NAMES``).
    Integer-valued columns are integers (pandas ``Int64``, empty where a method lacks the hparam), booleans booleans.
    Non-scalar records (reliability bins) stay in the store. Columns are documented in README.md ("Export")."""
    spec = load_spec(storage, benchmark)
    if spec is None:
        raise RegbenchError(f"no benchmark named {benchmark!r} in this store; run `regbench run` first")
    df = runs_frame(storage, benchmark, spec)
    rows = []
    for run in df.itertuples():
        cfg = run.config
        row = {"benchmark": benchmark, "dataset": run.dataset, "model": run.model, "train_size": run.train_size,
               "method": run.method, "seed": run.seed, "trial": run.trial}
        row.update({f"hp.{k}": (json.dumps(v) if isinstance(v, (dict, list)) else v)
                    for k, v in cfg.get("hparams", {}).items()})
        row.update({k: cfg.get(k) for k in RECIPE})
        row.update({LAST_EPOCH_NAMES.get(k, k): v for k, v in run.metrics.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)})
        rows.append(row)
    return _typed(rows)


def _typed(rows: list[dict]) -> pd.DataFrame:
    """The frame of ``rows`` where a column whose stored values are all integers (or all booleans), missing values
    aside, gets pandas' nullable Int64 (boolean) dtype: a method without ``hp.rank`` must not turn another's 32
    into 32.0. Types are read from the stored values, before pandas widens a column with gaps to float."""
    frame = pd.DataFrame(rows)
    for column in frame.columns:
        values = [r[column] for r in rows if r.get(column) is not None
                  and not (isinstance(r[column], float) and math.isnan(r[column]))]
        if not values:
            continue
        if all(isinstance(v, bool) for v in values):
            frame[column] = pd.array([r.get(column) for r in rows], dtype="boolean")
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            frame[column] = pd.array([r.get(column) for r in rows], dtype="Int64")
    return frame


PARENT_METRICS = {"test_acc": "test_acc", "val_acc": "val_acc", "train_acc": "train_acc", "gap": "gap",
                  "ece": "test_ece", "nll": "test_nll", "shift_acc": "shift_acc"}


def parent_results(storage, benchmark: str) -> dict[str, dict]:
    """Per method, what its MLflow parent run shows: ``metrics`` = each final metric's mean over seeds under the
    children's name (fractions, as the children log them), ``<name>_ci_low``/``_ci_high`` (95 % t-interval) when the
    method has at least ``stats.MIN_SEEDS`` seeds, ``n_seeds``, ``seconds_per_epoch_median`` and, against
    baseline, ``delta_test_acc`` (and ``p_holm_test_acc`` when a test could be made); ``params`` = the selected
    hparams (``hparams.<name>``) and the recipe as configured. The same numbers as the leaderboard's."""
    spec = load_spec(storage, benchmark)
    if spec is None:
        return {}
    df = runs_frame(storage, benchmark, spec)
    if df.empty:
        return {}
    table = (stats.compare(df, "test_acc", reference=REFERENCE).set_index("method")
             if REFERENCE in set(df.method) else None)
    out = {}
    for method, mine in df.groupby("method", sort=False):
        metrics: dict = {"n_seeds": len(mine), "seconds_per_epoch_median": float(mine.seconds_per_epoch.median())}
        for column, name in PARENT_METRICS.items():
            values = mine[column].dropna()
            if values.empty:
                continue
            metrics[name] = float(values.mean())
            low, high = stats._ci(values.to_numpy(float), 0.05, stats.MIN_SEEDS)
            if low is not None and math.isfinite(low):
                metrics[f"{name}_ci_low"], metrics[f"{name}_ci_high"] = low, high
        if table is not None and method in table.index and method != REFERENCE:
            row = table.loc[method]
            if row.delta is not None:
                metrics["delta_test_acc"] = float(row.delta)
            if row.p_holm is not None:
                metrics["p_holm_test_acc"] = float(row.p_holm)
        config = mine.config.iloc[0]
        params = {f"hparams.{k}": v for k, v in config.get("hparams", {}).items()}
        params.update({k: config.get(k) for k in RECIPE})
        out[method] = {"metrics": metrics, "params": params}
    return out


def write_export(storage, benchmark: str, out_dir: Path, fmt: str = "csv") -> Path:
    if fmt not in ("csv", "parquet"):
        raise ConfigError(f"--format {fmt!r} is not one of: csv, parquet")
    if fmt == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise ConfigError("--format parquet needs pyarrow: pip install pyarrow (or use --format csv)") from None
    frame = export_frame(storage, benchmark)
    path = Path(out_dir) / f"results.{fmt}"
    tmp = path.with_name(path.name + ".tmp")
    frame.to_csv(tmp, index=False) if fmt == "csv" else frame.to_parquet(tmp, index=False)
    tmp.replace(path)
    return path


def summary(frames: list[pd.DataFrame], folder: Path, metric: str = "test_acc") -> tuple[str, list[Path]]:
    """Rank methods across benchmarks (Demšar 2006 §3.2): mean rank per method over the (dataset, model, train
    size) cells, Friedman/Iman-Davenport tests, Nemenyi CD and its diagram. ``frames``: ``export_frame`` outputs."""
    df = pd.concat(frames, ignore_index=True)
    df["train_size"] = df["train_size"].map(lambda v: "full" if v is None or pd.isna(v) else str(int(v)))
    cells = df[["dataset", "model", "train_size"]].drop_duplicates()
    ranking = stats.rank_across(df, metric, by=("dataset", "model", "train_size"))
    lines = ["# Summary across benchmarks", "",
             f"{len(cells)} benchmark cell(s) (dataset × model × training samples): "
             + ", ".join(f"{r.dataset}/{r.model}/{r.train_size}" for r in cells.itertuples())
             + f"; metric `{metric}` (seed mean per cell), methods ranked 1 = best within each cell.", ""]
    if ranking.n_cells:
        lines += ["| method | mean rank | " + " | ".join("/".join(map(str, i)) for i in ranking.per_cell.index) + " |",
                  "|---|---|" + "---|" * len(ranking.per_cell)]
        for method, rank in ranking.ranks.items():
            lines.append(f"| {method} | {rank:.2f} | "
                         + " | ".join(f"{v:g}" for v in ranking.per_cell[method]) + " |")
    written: list[Path] = []
    lines.append("")
    if ranking.friedman_p is not None:
        lines.append(f"Friedman χ² = {ranking.friedman_stat:.2f}, p = {_p(ranking.friedman_p)}; Iman-Davenport "
                     f"F = {_num(ranking.iman_davenport_f)}, p = {_p(ranking.iman_davenport_p)}; Nemenyi critical "
                     f"difference CD = {ranking.cd:.2f} at α = {ranking.alpha:g} (q = {ranking.q_alpha:.3f}, "
                     f"k = {len(ranking.ranks)} methods, N = {ranking.n_cells} cells). Methods whose mean ranks "
                     f"differ by less than CD are not significantly different; groups: "
                     + ("; ".join("{" + ", ".join(g) + "}" for g in ranking.cliques()) or "none") + ".")
        k, n = len(ranking.ranks), ranking.n_cells
        floor = float(scipy.stats.chi2.sf(n * (k - 1), k - 1))  # every cell ranking the methods the same way
        if floor >= ranking.alpha:
            lines += ["", f"**With N = {n} cells and k = {k} methods no ranking can be significant**: the largest "
                          f"possible Friedman χ² is N(k − 1) = {n * (k - 1)}, p = {floor:.3f} ≥ {ranking.alpha:g}. "
                          "Read the ranks as a description of these cells, not as evidence; the χ² approximation "
                          "wants N > 10 and k > 5 (Demšar 2006 §3.2.2)."]
        path = stats.plot_critical_difference(ranking, None, Path(folder) / "figures" / "critical_difference.png",
                                              title=f"{metric}, {ranking.n_cells} cells")
        written.append(path)
        lines += ["", f"![critical-difference diagram](figures/{path.name})", "",
                  ("*Critical-difference diagram (Demšar 2006, Fig. 1): mean rank per method (1 = best, left); thick "
                  "bars join methods within CD of each other (not significantly different, Nemenyi).*")]
    if ranking.note:
        lines += ["", f"Note: {ranking.note}."]
    return "\n".join(lines) + "\n", written


def write_summary(frames: list[pd.DataFrame], folder: Path, metric: str = "test_acc") -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text, written = summary(frames, folder, metric)
    path = folder / "summary.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return [path, *written]
