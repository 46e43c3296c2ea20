"""Leaderboards, figures and the tidy export, generated from the store only
(docs/architecture.md, "Data flows one way"): no torch, no training, no MLflow.

``write_report(storage, benchmark, out_dir)`` writes ``leaderboard.md`` and its figures (``figures/*.png``, drawn by
:mod:`regbench.figures`): one row per method with mean ± 95 % CI over seeds, the difference to ``baseline`` with its
CI, Holm-adjusted p, Hedges' g, a verdict from :func:`regbench.stats.compare` (or "collapsed",
:mod:`regbench.degenerate`) and the smallest Δ the seeds could detect, then robustness and calibration sections when
the runs have them; the figures section is :mod:`regbench.report_figures`, the cells' text :mod:`regbench.cells`,
the LaTeX version :mod:`regbench.latex`, the cross-benchmark summary :mod:`regbench.summary`.
``export_frame`` (regbench/tidy.py) is the tidy table of ``regbench export``; ``write_summary`` ranks methods over
several benchmarks (:func:`regbench.stats.rank_across`, Demšar 2006).
"""
from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path

import pandas as pd

from regbench import degenerate, fairness, record, report_figures, stats
from regbench.cells import delta_text as _delta_cell
from regbench.cells import hparams_text as _hparams_text
from regbench.cells import mark as _mark
from regbench.cells import mean_cell, timing_cell
from regbench.cells import num as _num
from regbench.cells import p_text as _p
from regbench.errors import ConfigError, RegbenchError
from regbench.report_figures import seed_blocks
from regbench.store import load_spec, plan_finals, selection, trials_of
from regbench.tidy import RECIPE, export_frame, runs_frame

REFERENCE = "baseline"
_mean_ci = mean_cell


def test_cells(row) -> str:
    """The comparison columns of one method's row of stats.compare (Δ in pp, p, sig., g, verdict, and the smallest
    Δ these seeds detect with 80 % power)."""
    mde = None if getattr(row, "mde", None) is None else row.mde * 100
    return (f"{_delta_cell(row)} | {_p(row.p_holm)} | {_mark(row.p_holm)} | {_num(row.hedges_g, '{:+.2f}')} | "
            f"{row.verdict} | {_num(mde, '{:.2f}')}")


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
    a choice that changes a column's numbers is named where the column is read."""
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
    if not df.empty:
        df["degenerate"] = degenerate.flags(df)
    methods = list(spec["methods"])
    lines = [f"# Leaderboard: {benchmark}", "",
             f"- command: `{spec['command']}`",
             (f"- dataset `{spec['dataset']}`, model `{spec['model']}`, {spec['epochs']} epochs, "
             f"seeds {', '.join(map(str, spec['seeds']))} (shared by every method, so differences are paired)")]
    proto = spec.get("protocol") or {}
    tuned = bool(proto.get("trials") or proto.get("budget_epochs"))
    lines += fairness.tuning_lines(storage, spec)  # the rule, then what each arm spent, counted from the store
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
    collapsed = degenerate.override_verdicts(table, df, REFERENCE)
    lines += degenerate.header_lines(df, collapsed, REFERENCE)
    shifted = not df.empty and df.shift_acc.notna().any()
    shift_head = " corruption acc % | extra corr. acc % | rel. mCE |" if shifted else ""
    alpha_plan = stats.power_alpha(table)
    lines += ["", ("| method | seeds | test acc % | Δ test vs baseline (pp) [95 % CI] | p (Holm) | sig. | Hedges' g | "
                  f"verdict | detectable Δ (pp), 80 % power, α = {alpha_plan:.3g} | gap (pp) | ECE % | NLL "
                  f"|{shift_head} final erank | s/epoch | hparams; budget spent |"),
              "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|---|" if shifted else "") + "---|---|---|"]
    budgets = {m: _budget(storage, benchmark, m, spec["methods"][m], spec["seeds"]) for m in methods}
    notes = []
    for method in methods:
        mine = df[df.method == method] if not df.empty else df
        chosen = selection(storage, benchmark, method, spec["methods"][method])
        info = spec["methods"][method]
        hparams = chosen.get("hparams", info["hparams"])
        shown = [k for k in hparams if k in set(info.get("space", [])) | set(info.get("fixed", {}))]
        hp = _hparams_text({**{k: hparams[k] for k in (shown if "space" in info else hparams)},
                            **chosen.get("shared", {})})
        if not info.get("tune_study") and proto and tuned:  # an arm tuning left out: said in its own row too
            hp = (hp if hp != "–" else "defaults") + (" (untuned: `--untuned`)" if method in (
                proto.get("untuned") or ()) else " (nothing to tune)")
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
        lines.append(f"| {method} | {len(mine)} | {_mean_ci(mine.test_acc, 100)}{degenerate.mark(mine)} | {test} | "
                     f"{_mean_ci(mine.gap, 100)} | {_mean_ci(mine.ece, 100)} | {_mean_ci(mine.nll, 1, 3)} | "
                     + (f"{_mean_ci(mine.shift_acc, 100)} | {_mean_ci(mine.shift_extra_acc, 100)} | "
                        f"{_relative_mce(df, method)} | " if shifted else "") +
                     f"{_mean_ci(mine.erank, 1, 1)} | "
                     f"{timing_cell(mine.seconds_per_epoch)} | {hp} |")
    fewest = int(df.groupby("method").size().min()) if not df.empty else 0
    lines += ["", *_legend(table, margin_pp, shifted, fewest)]
    if notes:
        lines += ["", "Notes from the tests:", *notes]
    lines += degenerate.notes(df)
    if not df.empty and df.ece.notna().any():
        lines += _calibration(df, methods)
    if shifted:
        lines += _robustness(df, methods)
    if figures_dir is not None and not df.empty:
        curve, why = _learning_curve_frame(storage, spec)
        lines += report_figures.section(df, table, curve, Path(figures_dir), figure_paths, REFERENCE, margin_pp, why)
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
        "(`regbench report --margin PP`); else inconclusive (more seeds needed); collapsed when every run of the "
        "method collapsed (⚠: one predicted class, or test accuracy within noise of chance; no comparison is "
        "made then). Detectable Δ: the smallest true difference to baseline that these seeds would detect with "
        "80 % power, from the seed-to-seed spread of the differences alone (no effect is assumed: a mean "
        "difference from a few seeds is too rough to plan on), at Holm's strictest level α/m over the table's m "
        f"tests ({stats.power_alpha_text(table)}); a real effect smaller than it can easily read as ns. s/epoch: median over seeds (min–max), wall time on the "
        "machine named above; no interval (timings are not a quantity to test). \"–\": not computable, the reason is in "
        "the notes."
        + (" Corruption columns: mean accuracy over the 15 benchmark corruptions × 5 severities, over the 4 "
           "extra ones separately, and the mCE-style error relative to baseline (1.00 = as robust; lower is "
           "better)." if shifted else "")
        + " Budget: training epochs and wall time spent by the method, tuning trials included."]


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
    blocks = seed_blocks(df)
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


def _learning_curve_frame(storage, spec: dict) -> tuple[pd.DataFrame, str]:
    """Final runs of every benchmark in this store on the same dataset and model under the same protocol but for the
    training samples, when they span ≥ 2 train sizes; else an empty frame and the reason, in words."""
    import optuna

    from regbench import summary

    rows, other_protocol = [], []
    mine = summary.protocol_key(spec, drop=summary.SPLIT_SIZE)
    for name in [s for s in optuna.get_all_study_names(storage) if ":" not in s]:
        other = load_spec(storage, name)
        if not other or other.get("dataset") != spec["dataset"] or other.get("model") != spec["model"]:
            continue
        if summary.protocol_key(other, drop=summary.SPLIT_SIZE) != mine:
            other_protocol.append(name)
            continue
        frame = runs_frame(storage, name, other)
        if not frame.empty:
            rows.append(frame[["method", "seed", "train_size", "test_acc"]])
    curve = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=["train_size"])
    sizes = curve.train_size.dropna().nunique()
    if sizes < 2:
        why = (f"a learning curve needs benchmarks at ≥ 2 training-set sizes (`--train-size`) of "
               f"{spec['dataset']}/{spec['model']} with this protocol in this store; it holds {sizes}")
        if other_protocol:
            why += f" (left out, another protocol: {', '.join(other_protocol)})"
        return pd.DataFrame(), why
    return curve.dropna(subset=["train_size"]), ""


def _budget(storage, benchmark: str, method: str, info: dict, seeds=None) -> str:
    """What the current plan spent on a method: its tuning study and its selected configuration's final runs over the
    plan's seeds (never a superseded plan's runs, nor an earlier selection's)."""
    tuned = trials_of(storage, info.get("tune_study"))
    tuning = {**record.spent(tuned), "trials": fairness.tuning_spent(tuned)["trials"]}  # as the header counts them
    finals = record.spent(plan_finals(storage, benchmark, method, info, seeds if seeds is not None else []))
    epochs, seconds = tuning["epochs"] + finals["epochs"], tuning["seconds"] + finals["seconds"]
    text = f"{epochs} epochs, {seconds / 60:.1f} min"
    return text + (f" ({tuning['trials']} tuning trials)" if info.get("tune_study") else "")


def _oracle(storage, methods: list[str], spec: dict) -> list[str]:
    """ORACLE: each method's tuning trial with the best *test* accuracy. Selecting on test is optimistic and not a
    valid comparison; it bounds how much the validation-based selection above may have missed."""
    lines = ["", "## ORACLE (selected on test — optimistic, not a valid comparison)", "",
             "| method | ORACLE test acc % | tuning trial | hparams |", "|---|---|---|---|"]
    for method in methods:
        runs = [record.RunRecord.of(t) for t in trials_of(storage, spec["methods"][method].get("tune_study"))]
        done = [r for r in runs if r.complete and "test_acc" in r.metrics]
        if not done:
            lines.append(f"| {method} | – | – | no tuning trial with a test score |")
            continue
        best = max(done, key=lambda r: r.metrics["test_acc"])
        lines.append(f"| {method} | {best.metrics['test_acc'] * 100:.2f} | {best.number} | "
                     f"{_hparams_text(best.config['hparams'])} |")
    lines.append("")
    lines.append("ORACLE: one tuning run (seed 10000) per method, chosen by its test accuracy; never use it to rank "
                 "methods.")
    return lines


def write_report(storage, benchmark: str, out_dir: Path, margin_pp: float = 0.5, latex: bool = False) -> list[Path]:
    """OUT/leaderboard.md (and with ``latex`` OUT/leaderboard.tex, its tables in booktabs) and OUT/figures/*.png,
    regenerated from the store; returns [markdown, (tex,) *figures]. Files are replaced atomically, so a failure
    leaves the previous leaderboard whole."""
    from regbench import latex as _latex

    out_dir = Path(out_dir)
    figures: list[Path] = []
    text = leaderboard(storage, benchmark, margin_pp, figures_dir=out_dir / "figures", figure_paths=figures)
    path = _latex.write(out_dir / "leaderboard.md", text)
    tex = [_latex.write(out_dir / "leaderboard.tex", _latex.leaderboard_tex(text))] if latex else []
    return [path, *tex, *figures]


def summary_input(storage, benchmark: str):
    """What the cross-benchmark summary needs of one benchmark: its name, stored spec and export frame."""
    from regbench import summary

    return summary.Entry(benchmark, load_spec(storage, benchmark), export_frame(storage, benchmark))


def write_summary(entries, folder: Path, metric: str = "test_acc", latex: bool = False) -> list[Path]:
    """FOLDER/summary.md (``regbench.summary``); ``entries`` from :func:`summary_input`."""
    from regbench import summary

    return summary.write_summary(entries, folder, metric, latex)


# ---------------------------------------------------------------------------------------------------------------
# The cross-benchmark summary (the tidy export is regbench/tidy.py).

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
            low, high = stats.t_ci(values.to_numpy(float), 0.05, stats.MIN_SEEDS)
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
