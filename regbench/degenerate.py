"""Degenerate outcomes of finished runs: a run that predicts one class for every test image, or whose test accuracy
is within noise of chance. Pure functions of stored metrics (no torch, no store).

A collapsed run still has a test accuracy, often with no spread at all over seeds (every seed predicts the same
class: 10.20 % ± 0.00), so a table of means and t-tests reads it as a tight, real result. The leaderboard marks such
runs, gives a method all of whose runs collapsed the verdict "collapsed" instead of a comparison, and warns when the
reference collapsed.

What a run records (the engine, at the end of training, on the test split): ``test_pred_classes`` (distinct
predicted classes), ``test_majority_frac`` (share of the most predicted class), ``test_count`` (test images) and
``num_classes``. Stores written before those were recorded fall back to the accuracy-vs-chance test alone, with the
test size read from the reliability bins (their counts sum to it) and the class count from ``CLASSES``.
"""
from __future__ import annotations

import math

import pandas as pd
from scipy import stats as sps

ALPHA = 0.05  # a run whose accuracy does not exceed chance at this level (one-sided binomial test) is "at chance"
# Classes of the built-in data sets, for stores recorded before a run stored its own class count (the data sets'
# modules import torch, which a report must not).
CLASSES = {"mnist1d": 10, "digits": 10, "mnist5k": 10, "mnist": 10, "mnist_m": 10, "mnist_m_style": 10,
           "cifar10": 10, "cifar100": 100}
COLLAPSED = "collapsed"
MAJORITY = 0.99  # a run that puts at least this share of the test images in one class predicts "one class"


def test_count(metrics: dict) -> int | None:
    """Test images a run was scored on: recorded, else the sum of its reliability bins' counts."""
    if metrics.get("test_count"):
        return int(metrics["test_count"])
    bins = (metrics.get("test_reliability") or {}).get("count")
    return int(sum(bins)) if bins else None


test_count.__test__ = False  # not a pytest test when imported into a test module


def num_classes(metrics: dict, dataset: str | None) -> int | None:
    if metrics.get("num_classes"):
        return int(metrics["num_classes"])
    return CLASSES.get(dataset or "")


def chance_p(acc: float, n: int, k: int) -> float:
    """One-sided binomial test that ``acc`` on ``n`` images exceeds chance 1/k: P(X ≥ correct | p = 1/k)."""
    correct = round(acc * n)
    return float(sps.binomtest(correct, n, 1.0 / k, alternative="greater").pvalue)


def assess(metrics: dict, dataset: str | None = None, alpha: float = ALPHA) -> str:
    """Why a run is degenerate, in words ("" when it is not)."""
    acc = metrics.get("test_acc")
    if acc is None or (isinstance(acc, float) and math.isnan(acc)):
        return ""
    if metrics.get("test_pred_classes") == 1:
        return f"predicted one class for every test image ({acc * 100:.2f} % correct)"
    if (metrics.get("test_majority_frac") or 0) >= MAJORITY:
        return (f"predicted one class for {metrics['test_majority_frac'] * 100:.1f} % of the test images "
                f"({acc * 100:.2f} % correct)")
    n, k = test_count(metrics), num_classes(metrics, dataset)
    if not n or not k:
        return ""
    p = chance_p(acc, n, k)
    if p >= alpha:
        return (f"at chance: {acc * 100:.2f} % on {n} test images against 1/{k} = {100 / k:.2f} % "
                f"(one-sided binomial p = {p:.2f})")
    return ""


def flags(df: pd.DataFrame) -> pd.Series:
    """Per run of a ``report.runs_frame`` frame, why it is degenerate ("" when not), aligned with ``df``."""
    if df.empty:
        return pd.Series([], dtype=object)
    return pd.Series([assess(r.metrics, r.dataset) for r in df.itertuples()], index=df.index, dtype=object)


def chance_level(df: pd.DataFrame) -> float | None:
    """1/K of the frame's data set (one value: a leaderboard is one data set), None when unknown."""
    ks = {num_classes(r.metrics, r.dataset) for r in df.itertuples()} - {None}
    return 1.0 / ks.pop() if len(ks) == 1 else None


def collapsed_methods(df: pd.DataFrame, reasons: pd.Series) -> list[str]:
    """Methods every one of whose runs is degenerate, in the frame's order."""
    out = []
    for method in dict.fromkeys(df["method"]):
        mine = reasons[df["method"] == method]
        if len(mine) and mine.astype(bool).all():
            out.append(method)
    return out


def override_verdicts(table: pd.DataFrame | None, df: pd.DataFrame, reference: str) -> list[str]:
    """The methods all of whose runs collapsed; in ``table`` (``stats.compare`` indexed by method) their verdict
    becomes "collapsed" instead of a comparison. The leaderboard and the MLflow descriptions both call this, so they
    say the same."""
    collapsed = collapsed_methods(df, df.degenerate) if not df.empty else []
    if table is not None:
        table.loc[[m for m in collapsed if m != reference and m in table.index], "verdict"] = COLLAPSED
    return collapsed


def mark(runs: pd.DataFrame) -> str:
    """The table's mark after a method's test accuracy: " ⚠ k/n collapsed" when k of its n runs collapsed."""
    if "degenerate" not in runs or runs.empty:
        return ""
    k = int(runs.degenerate.astype(bool).sum())
    return f" ⚠ {k}/{len(runs)} collapsed" if k else ""


def header_lines(df: pd.DataFrame, collapsed: list[str], reference: str) -> list[str]:
    """The header's warning when runs collapsed: loud when the reference did (no comparison means anything then)."""
    if df.empty or "degenerate" not in df or not df.degenerate.astype(bool).any():
        return []
    bad = df[df.degenerate.astype(bool)]
    lines = []
    if reference in collapsed:
        first = bad[bad.method == reference].degenerate.iloc[0]
        lines.append(f"- **⚠ the reference `{reference}` collapsed in every run** (e.g. seed "
                     f"{bad[bad.method == reference].seed.iloc[0]}: {first}): no comparison with it is meaningful; "
                     f"fix the recipe (a lower `--lr`, more `--epochs`) and rerun under a new `--name`")
    lines.append(f"- ⚠ {len(bad)} of {len(df)} runs collapsed (one predicted class, or test accuracy within noise "
                 f"of chance; one-sided binomial test at α = {ALPHA:g})"
                 + (f", every run of {', '.join(collapsed)} among them" if collapsed else "")
                 + ": marked ⚠ in the table, red × in the per-seed figure, listed under \"Collapsed runs\"")
    return lines


def notes(df: pd.DataFrame) -> list[str]:
    """One line per collapsed run, with the reason."""
    if df.empty or "degenerate" not in df or not df.degenerate.astype(bool).any():
        return []
    bad = df[df.degenerate.astype(bool)].sort_values(["method", "seed"], kind="stable")
    return ["", "Collapsed runs:", *(f"- {r.method} seed {r.seed}: {r.degenerate}" for r in bad.itertuples())]
