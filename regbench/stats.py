"""Statistics over seeds: pure functions of a tidy DataFrame (docs/architecture.md, "Data flows one way": no torch, no
store, no training).

The frame has one row per final run with columns ``method``, ``seed`` and metrics (accuracies as fractions), plus
``dataset`` and ``model`` for the cross-dataset summary — the frame ``report.runs_frame`` and ``regbench export``
write.

- :func:`compare` answers, per method, "is it better than the reference, and how sure are we": CIs, paired or Welch
  t-test, Holm across the table, Wilcoxon, Hedges' g, seeds needed for 80 % power, a TOST equivalence test and a
  one-word verdict, and the smallest difference the seeds could detect (:func:`detectable_effect`).
- :func:`rank_across` ranks methods over several (dataset, model) cells: mean ranks, Friedman test and the Nemenyi
  critical difference of Demšar (2006); :func:`plot_critical_difference` draws his CD diagram.

References: Demšar, "Statistical comparisons of classifiers over multiple data sets", JMLR 7 (2006) §3.2;
Holm, Scand. J. Statist. 6 (1979); Hedges, J. Educ. Stat. 6 (1981); Borenstein, Hedges, Higgins & Rothstein,
"Introduction to Meta-Analysis" (2009) ch. 4; Lakens, Front. Psychol. 4:863 (2013); Schuirmann, J. Pharmacokinet.
Biopharm. 15 (1987) for TOST.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats as sps
from statsmodels.stats import weightstats as ws
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestIndPower, TTestPower

from regbench.errors import ConfigError, DataError

MIN_SEEDS = 3  # below this, a 95 % t-interval uses t ≥ 12.7 (1 df) and Hedges' J is 0: no interval, test or g
SPREAD_EPS = 1e-12  # a spread this small is float rounding (metrics are ratios like k/N), not seed noise
MAX_SEEDS = 1000  # beyond this the power answer is "more than anyone will run": reported as math.inf

COLUMNS = ["method", "n", "mean", "ci_low", "ci_high", "delta", "delta_ci_low", "delta_ci_high", "test", "p",
           "p_holm", "wilcoxon_p", "hedges_g", "seeds_needed", "tost_p", "verdict", "note", "spread", "mde",
           "mde_alpha"]


# ---------------------------------------------------------------------------------------------------------------
# Input checks: a user's mistake is one clear line (house rule), never a KeyError deep in pandas.

def _check_frame(df: pd.DataFrame, metric: str, needed=("method", "seed")) -> None:
    if not isinstance(df, pd.DataFrame) or df.empty:
        raise DataError("the results frame is empty; run the benchmark's final seeds first (`regbench run`)")
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise DataError(f"the results frame lacks column(s) {', '.join(missing)}; pass the tidy frame of "
                        f"`regbench export` (one row per final run)")
    if metric not in df.columns:
        numeric = sorted(c for c in df.columns if c not in needed and pd.api.types.is_numeric_dtype(df[c]))
        raise ConfigError(f"unknown metric {metric!r}; choose one of: {', '.join(numeric)}")


def _check_alpha(alpha: float) -> None:
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha={alpha} must lie in (0, 1), e.g. 0.05 for 95 % intervals")


def _values(df: pd.DataFrame, method: str, metric: str) -> pd.Series:
    """The method's metric indexed by seed, NaN (metric not recorded) dropped; a repeated seed is an error."""
    rows = df[df["method"] == method]
    if rows["seed"].duplicated().any():
        seed = rows["seed"][rows["seed"].duplicated()].iloc[0]
        raise DataError(f"method {method!r} has several runs with seed {seed}; pass one (dataset, model, hparams) "
                        f"cell at a time, e.g. df[(df.dataset == ...) & (df.model == ...)]")
    return rows.set_index("seed")[metric].astype(float).dropna().sort_index()


# ---------------------------------------------------------------------------------------------------------------
# Effect sizes and power.

def hedges_correction(dof: float) -> float | None:
    """Small-sample bias correction J = 1 − 3/(4·df − 1) (Hedges 1981; Borenstein et al. 2009 eq. 4.22).

    None for df ≤ 1: the approximation gives J = 0 at df = 1 (and a negative J below), which would turn any
    difference into g = 0; g is undefined there, not zero."""
    if dof <= 1:
        return None
    return 1.0 - 3.0 / (4.0 * dof - 1.0)


def hedges_g_paired(method: np.ndarray, reference: np.ndarray) -> float | None:
    """Hedges' g for seed-paired runs, the "av" form: mean difference over the average within-method spread.

    g = J(n − 1) · mean(d) / sqrt((s_m² + s_r²) / 2)   (Borenstein et al. 2009 §4 "matched groups", eqs. 4.18,
    4.22; Lakens 2013 eq. 10 calls this d_av, there with the arithmetic mean of the two SDs).

    Why not d_z = mean(d)/sd(d): d_z grows with the correlation that seed pairing induces, so it is not comparable
    with the unpaired g of a Welch row or with another paper; g_av measures the gain in units of seed-to-seed noise,
    which is what a reader wants. d_z still drives the power calculation, because the paired test's power depends
    on it (Lakens 2013 §"Power analysis").
    """
    n = len(method)
    if n < 2:
        return None
    spread = math.sqrt((np.var(method, ddof=1) + np.var(reference, ddof=1)) / 2.0)
    correction = hedges_correction(n - 1)
    if spread <= SPREAD_EPS or correction is None:
        return None
    return correction * float(np.mean(method - reference)) / spread


def hedges_g_independent(method: np.ndarray, reference: np.ndarray) -> float | None:
    """Hedges' g for unpaired runs: g = J(n₁ + n₂ − 2) · (m₁ − m₂) / s_pooled (Hedges 1981; Borenstein eq. 4.18–4.20).

    s_pooled = sqrt(((n₁ − 1)s₁² + (n₂ − 1)s₂²) / (n₁ + n₂ − 2)).
    """
    n1, n2 = len(method), len(reference)
    if n1 < 2 or n2 < 2:
        return None
    pooled = math.sqrt(((n1 - 1) * np.var(method, ddof=1) + (n2 - 1) * np.var(reference, ddof=1)) / (n1 + n2 - 2))
    correction = hedges_correction(n1 + n2 - 2)
    if pooled <= SPREAD_EPS or correction is None:
        return None
    return correction * float(np.mean(method) - np.mean(reference)) / pooled


def seeds_needed(effect: float, alpha: float = 0.05, power: float = 0.8, paired: bool = True) -> float:
    """Seeds per method for a two-sided t-test at ``alpha`` to reach ``power`` if the true effect were ``effect``.

    ``effect`` is the standardized effect the test sees: d_z = mean(d)/sd(d) for the paired test (statsmodels
    ``TTestPower``: one-sample t on the differences, nobs = pairs), Cohen's d with the pooled SD for Welch
    (``TTestIndPower`` with equal group sizes, nobs1 = seeds per method). Power is P(|T| > t_crit) with T
    noncentral t (df = n − 1 resp. 2n − 2, noncentrality d·√n resp. d·√(n/2)).

    This is a planning number ("to detect a gain this large, run this many seeds"), not "observed power", which is
    a function of the p-value and says nothing new (Hoenig & Heisey, Am. Stat. 55, 2001). Returns an integer ≥ 2,
    or ``math.inf`` when the effect is ~0 or more than ``MAX_SEEDS`` seeds would be needed.
    """
    effect = abs(float(effect))
    if not math.isfinite(effect) or effect < 1e-9:
        return math.inf
    solver = TTestPower() if paired else TTestIndPower()

    def power_at(n):  # positional: the group-size argument is `nobs` in one class and `nobs1` in the other
        value = float(solver.power(effect, n, alpha))
        # scipy's noncentral t returns NaN far in its tail (noncentrality d·√n in the tens): power there is 1.
        return 1.0 if math.isnan(value) else value

    # Power grows with n, so bisect on integers: exact, and robust where solve_power's float root search fails
    # (huge effects put the root below n = 2, where the t distribution has < 1 df).
    if power_at(MAX_SEEDS) < power:
        return math.inf
    low, high = 1, MAX_SEEDS  # invariant: power_at(high) >= power, and low is below the answer
    while high - low > 1:
        mid = (low + high) // 2
        if mid >= 2 and power_at(mid) >= power:
            high = mid
        else:
            low = mid
    return high


def detectable_effect(spread: float, n: int, alpha: float, power: float = 0.8, paired: bool = True,
                      n_ref: int | None = None) -> float | None:
    """The smallest true difference (in the metric's units) that a two-sided t-test at ``alpha`` detects with
    probability ``power`` at these seeds: the standardized effect solved by statsmodels (``TTestPower`` on the
    ``n`` paired differences, or ``TTestIndPower`` with ``n`` and ``n_ref`` runs for Welch) times ``spread`` (the SD
    of the per-seed differences, or the pooled SD). Unlike :func:`seeds_needed` it assumes no effect: only the
    noise, which the seeds estimate far better than a mean difference. None when it cannot be computed."""
    if n < 2 or not spread or not math.isfinite(spread) or spread <= SPREAD_EPS:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # statsmodels' root finder warns on its way; the answer is checked below
        if paired:
            d = TTestPower().solve_power(effect_size=None, nobs=n, alpha=alpha, power=power)
        else:
            d = TTestIndPower().solve_power(effect_size=None, nobs1=n, ratio=(n_ref or n) / n, alpha=alpha,
                                            power=power)
    d = float(np.asarray(d).reshape(-1)[0])
    return d * spread if math.isfinite(d) and d > 0 else None


def power_alpha(table: pd.DataFrame | None, alpha: float = 0.05) -> float:
    """The level the detectable-effect column plans at: ``alpha`` over the number of tests the table made (Holm's
    strictest step), ``alpha`` itself when it made none."""
    m = 0 if table is None else int(table["p"].notna().sum())
    return alpha / m if m else alpha


def power_alpha_text(table: pd.DataFrame | None, alpha: float = 0.05) -> str:
    m = 0 if table is None else int(table["p"].notna().sum())
    return f"α = {alpha:g}/{m} = {alpha / m:.3g}" if m else f"no test was made, α = {alpha:g}"


# ---------------------------------------------------------------------------------------------------------------
# One method against the reference.

def t_interval(values, alpha: float = 0.05) -> tuple[float, float, float]:
    """(mean, low, high): the (1 − alpha) Student-t interval of the mean over seeds, the one every table and suite
    uses (NaN bounds for one value or any non-finite value; the point itself when all values are equal)."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2 or not np.all(np.isfinite(v)):  # one value, or an inf/NaN: no interval (the mean says which)
        return (float(v.mean()) if len(v) else float("nan")), float("nan"), float("nan")
    if np.ptp(v) == 0:  # no spread: the interval is the point (t would divide by zero)
        return float(v[0]), float(v[0]), float(v[0])
    with np.errstate(over="ignore", invalid="ignore"):  # values near the float limit overflow: no interval either
        low, high = ws.DescrStatsW(v).tconfint_mean(alpha=alpha)
        mean = float(v.mean())
    if not (np.isfinite(low) and np.isfinite(high) and np.isfinite(mean)):
        return mean, float("nan"), float("nan")
    return mean, float(low), float(high)


def t_ci(values: np.ndarray, alpha: float, min_seeds: int = 2) -> tuple[float | None, float | None]:
    """The (1 - alpha) t-interval of the mean, or (None, None) below ``min_seeds`` values."""
    if len(values) < max(2, min_seeds):
        return None, None
    _, low, high = t_interval(values, alpha)
    return (float(low), float(high)) if np.isfinite(low) else (None, None)


def _wilcoxon(diff: np.ndarray) -> float | None:
    """scipy's signed-rank test (exact null distribution for small n without ties; zero differences dropped)."""
    if np.all(diff == 0):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "exact p-value not possible with ties/zeros": scipy falls back, fine
        return float(sps.wilcoxon(diff).pvalue)


def _g_note(g, spread_free: bool) -> str:
    """Why Hedges' g is missing, in words (the table prints "–")."""
    if g is not None:
        return ""
    return ("Hedges' g undefined: no seed-to-seed spread within the methods to standardize by" if spread_free
            else "Hedges' g undefined at these degrees of freedom")


def _compare_one(x: pd.Series, y: pd.Series, alpha: float, margin: float, power: float,
                 min_seeds: int = MIN_SEEDS) -> dict:
    """x = method, y = reference, both indexed by seed. Returns the row's statistics (verdict set later)."""
    row = {"delta": None, "delta_ci_low": None, "delta_ci_high": None, "test": None, "p": None,
           "wilcoxon_p": None, "hedges_g": None, "seeds_needed": None, "tost_p": None, "note": "",
           "spread": None, "n_ref": len(y)}
    if len(x) == 0 or len(y) == 0:
        who = "this method" if len(x) == 0 else "the reference"
        row["note"] = f"no recorded values for {who}: nothing to compare"
        return row
    row["delta"] = float(x.mean() - y.mean())
    if len(x) < max(2, min_seeds) or len(y) < max(2, min_seeds):
        need = max(2, min_seeds)
        row["note"] = (f"{len(x)} seed(s) here and {len(y)} for the reference: tests, intervals and effect sizes "
                       f"need at least {need} seeds on each side (at 2 seeds a 95 % t-interval uses t = 12.7 and "
                       f"Hedges' g is undefined); run --seeds {need} or more")
        return row
    paired = set(x.index) == set(y.index)
    xs, ys = x.to_numpy(), y.loc[x.index].to_numpy() if paired else y.to_numpy()
    if paired:
        diff = xs - ys
        row["test"] = "paired t"
        d = ws.DescrStatsW(diff)
        if d.std <= SPREAD_EPS:  # equal differences up to float rounding: t would be rounding noise / rounding noise
            row["note"] = ("every seed differs from the reference by the same amount (the Δ shown): no seed-to-seed "
                           "spread of the difference, so t-based tests, intervals and power cannot be computed")
            row["wilcoxon_p"] = _wilcoxon(diff)
            row["hedges_g"] = hedges_g_paired(xs, ys)
            flat = math.sqrt((np.var(xs, ddof=1) + np.var(ys, ddof=1)) / 2.0) <= SPREAD_EPS
            row["note"] = _join(row["note"], _g_note(row["hedges_g"], flat))
            return row
        row["p"] = float(d.ttest_mean(0.0)[1])
        row["spread"] = float(diff.std(ddof=1))
        row["delta_ci_low"], row["delta_ci_high"] = (float(v) for v in d.tconfint_mean(alpha=alpha))
        row["wilcoxon_p"] = _wilcoxon(diff)
        row["hedges_g"] = hedges_g_paired(xs, ys)
        flat = math.sqrt((np.var(xs, ddof=1) + np.var(ys, ddof=1)) / 2.0) <= SPREAD_EPS
        row["note"] = _join(row["note"], _g_note(row["hedges_g"], flat))
        row["seeds_needed"] = seeds_needed(diff.mean() / diff.std(ddof=1), alpha, power, paired=True)
        row["tost_p"] = float(ws.ttost_paired(xs, ys, -margin, margin)[0])
    else:
        row["test"] = "Welch t"
        if np.std(xs) <= SPREAD_EPS and np.std(ys) <= SPREAD_EPS:
            row["note"] = "no seed-to-seed spread on either side: the Welch t-test cannot be computed"
            return row
        row["p"] = float(ws.ttest_ind(xs, ys, usevar="unequal")[1])
        row["spread"] = math.sqrt(((len(xs) - 1) * np.var(xs, ddof=1) + (len(ys) - 1) * np.var(ys, ddof=1))
                                  / (len(xs) + len(ys) - 2))
        cm = ws.CompareMeans(ws.DescrStatsW(xs), ws.DescrStatsW(ys))
        row["delta_ci_low"], row["delta_ci_high"] = (float(v) for v in cm.tconfint_diff(alpha=alpha,
                                                                                          usevar="unequal"))
        row["hedges_g"] = hedges_g_independent(xs, ys)
        g = row["hedges_g"]
        row["note"] = _g_note(g, True)
        if g is not None:  # Cohen's d (uncorrected): the effect the t-test itself sees
            row["seeds_needed"] = seeds_needed(g / hedges_correction(len(xs) + len(ys) - 2), alpha, power,
                                               paired=False)
        row["tost_p"] = float(ws.ttost_ind(xs, ys, -margin, margin, usevar="unequal")[0])
        shared = len(set(x.index) & set(y.index))
        row["note"] = _join(row["note"], f"seeds differ from the reference's ({shared} shared): unpaired Welch test, "
                                         f"no Wilcoxon signed-rank check")
    return row


def _verdict(row: dict, alpha: float, margin: float, higher_is_better: bool) -> str:
    """Holm-significant → better/worse; else TOST inside ±margin → equivalent; else inconclusive."""
    if row["p_holm"] is not None and row["p_holm"] < alpha:
        up = row["delta"] > 0
        word = "better" if up == higher_is_better else "worse"
        if row["tost_p"] is not None and row["tost_p"] < alpha:
            row["note"] = _join(row["note"], "the difference is real but also within the equivalence margin (TOST)")
        return word
    if row["tost_p"] is not None and row["tost_p"] < alpha:
        return "equivalent"
    return "inconclusive"


def _join(a: str, b: str) -> str:
    return f"{a}; {b}" if a else b


def compare(df: pd.DataFrame, metric: str, reference: str = "baseline", alpha: float = 0.05,
            margin: float = 0.005, higher_is_better: bool = True, power: float = 0.8,
            min_seeds: int = MIN_SEEDS) -> pd.DataFrame:
    """One row per method: is it better than ``reference`` on ``metric``, and how sure are we.

    Columns (``COLUMNS``): ``n`` seeds; ``mean`` and its (1 − alpha) t-interval ``ci_low``/``ci_high``;
    ``delta`` = mean(method) − mean(reference) with its interval; ``test``: "paired t" when the method and the
    reference ran the same seeds (one-sample t on the per-seed differences, statsmodels ``DescrStatsW``; the same
    seed shares the initialisation and data order, so pairing removes that noise), else "Welch t" (statsmodels
    ``ttest_ind(usevar="unequal")``, Welch 1947); ``p`` raw two-sided; ``p_holm`` Holm-adjusted over the table's
    methods (statsmodels ``multipletests(method="holm")``, Holm 1979) — one table is one family of questions;
    ``wilcoxon_p`` the signed-rank check (scipy; paired only: with n ≤ 5 seeds its smallest two-sided p is
    2/2ⁿ ≥ 0.0625, so it can never reject at 0.05); ``hedges_g`` (see :func:`hedges_g_paired`,
    :func:`hedges_g_independent`); ``seeds_needed`` per method for ``power`` at the observed effect
    (:func:`seeds_needed`; ``math.inf`` = more than 1000); ``tost_p`` Schuirmann's two one-sided tests that
    |Δ| < ``margin`` (statsmodels ``ttost_paired``/``ttost_ind``; margin in the metric's units: 0.005 = 0.5 pp of
    a fractional accuracy); ``verdict``: "better"/"worse" when Holm-adjusted p < alpha (direction by
    ``higher_is_better``), else "equivalent" when TOST p < alpha, else "inconclusive"; the reference row says
    "reference". ``note`` says in words why a number is missing. Missing numbers are ``None``, never NaN.
    Below ``min_seeds`` (default 3) on either side there are no intervals, tests, effect sizes or power, only
    means and Δ: at n = 2 the t quantile is 12.7 and Hedges' correction J(1) = 0, so those numbers mean nothing.
    """
    _check_alpha(alpha)
    _check_frame(df, metric)
    if not margin > 0:
        raise ConfigError(f"equivalence margin {margin} must be > 0 (in {metric}'s units, e.g. 0.005 = 0.5 pp)")
    cells = [c for c in ("dataset", "model") if c in df.columns]
    if cells and len(df[cells].drop_duplicates()) > 1:
        raise DataError(f"the frame mixes {len(df[cells].drop_duplicates())} (dataset, model) cells; compare one "
                        f"cell at a time (or use rank_across for a summary over cells)")
    methods = list(dict.fromkeys(df["method"]))
    if reference not in methods:
        raise DataError(f"reference method {reference!r} has no runs in the frame; pass reference= one of: "
                        f"{', '.join(methods)}")
    ref = _values(df, reference, metric)
    rows = []
    for method in [reference] + [m for m in methods if m != reference]:
        x = _values(df, method, metric)
        row = {"method": method, "n": len(x), "mean": float(x.mean()) if len(x) else None}
        row["ci_low"], row["ci_high"] = t_ci(x.to_numpy(), alpha, min_seeds)
        if method == reference:
            need = max(2, min_seeds)
            row.update({k: None for k in COLUMNS if k not in row}, verdict="reference",
                       note="" if len(x) >= need else f"{len(x)} seed(s): an interval needs at least {need}")
        else:
            row.update(_compare_one(x, ref, alpha, margin, power, min_seeds))
        rows.append(row)
    tested = [r for r in rows[1:] if r["p"] is not None]
    if tested:
        adjusted = multipletests([r["p"] for r in tested], alpha=alpha, method="holm")[1]
        for r, p in zip(tested, adjusted):
            r["p_holm"] = float(p)
    for r in rows[1:]:
        r.setdefault("p_holm", None)
        r["verdict"] = _verdict(r, alpha, margin, higher_is_better)
        # Planning at Holm's strictest step (alpha over the table's m tests): what these seeds can detect at all.
        r["mde_alpha"] = alpha / len(tested) if tested else None
        r["mde"] = (detectable_effect(r["spread"], r["n"], r["mde_alpha"], power, r["test"] == "paired t",
                                      r.get("n_ref")) if r.get("spread") is not None and tested else None)
    return _frame(rows, COLUMNS)


def _frame(rows: list[dict], columns: list[str]) -> pd.DataFrame:
    """Columns holding a None stay object dtype so pandas does not turn the None into NaN."""
    data = {}
    for c in columns:
        values = [r.get(c) for r in rows]
        data[c] = pd.Series(values, dtype=object) if any(v is None for v in values) else pd.Series(values)
    return pd.DataFrame(data)


# ---------------------------------------------------------------------------------------------------------------
# Across datasets (Demšar 2006 §3.2).

@dataclass
class Ranking:
    """The summary of :func:`rank_across`. ``ranks``: mean rank per method (1 = best), best first."""

    ranks: pd.Series
    per_cell: pd.DataFrame  # rank of each method (columns) in each (dataset, model) cell (rows)
    n_cells: int
    alpha: float
    friedman_stat: float | None = None
    friedman_p: float | None = None
    iman_davenport_f: float | None = None
    iman_davenport_p: float | None = None
    q_alpha: float | None = None
    cd: float | None = None
    dropped_cells: list = field(default_factory=list)
    dropped_methods: list = field(default_factory=list)
    note: str = ""

    def cliques(self) -> list[list[str]]:
        return cliques(self.ranks, self.cd) if self.cd is not None else []


def nemenyi_q(k: int, alpha: float = 0.05) -> float:
    """q_alpha of the Nemenyi test: the studentized range quantile with infinite df over √2 (Demšar 2006 §3.2.2)."""
    return float(sps.studentized_range.ppf(1 - alpha, k, np.inf) / math.sqrt(2))


def critical_difference(k: int, n: int, alpha: float = 0.05) -> float:
    """Nemenyi critical difference CD = q_alpha · sqrt(k(k + 1) / (6N)) for k methods over N cells (Demšar eq. 5)."""
    return nemenyi_q(k, alpha) * math.sqrt(k * (k + 1) / (6.0 * n))


def rank_across(df: pd.DataFrame, metric: str, higher_is_better: bool = True, alpha: float = 0.05,
                by=("dataset", "model"), methods=None) -> Ranking:
    """Mean ranks of the methods over (dataset, model) cells, Friedman test and Nemenyi CD (Demšar 2006 §3.2).

    Each cell's score of a method is its mean ``metric`` over seeds; within a cell the methods are ranked 1 = best
    (ties share the average rank). Friedman needs complete blocks, so when some method lacks a cell either that
    cell or that method must go: with ``methods`` given, cells missing any of them go; without, the larger of
    (all methods × the complete cells) and (the methods present everywhere × all cells) is kept, preferring one
    with ≥ 2 cells and ≥ 3 methods so the test can be made. What was left
    out is in ``dropped_cells``/``dropped_methods`` and ``note``. The Friedman statistic and p come from scipy's
    ``friedmanchisquare`` (with its tie correction); Iman & Davenport's F = (N − 1)χ² / (N(k − 1) − χ²) with
    (k − 1, (k − 1)(N − 1)) df is given too, as Demšar recommends it as less conservative. Two methods differ
    (Nemenyi, all pairs) when their mean ranks differ by at least CD (:func:`critical_difference`).
    """
    _check_alpha(alpha)
    by = list(by)
    _check_frame(df, metric, needed=("method", *by))
    scores = df.groupby(by + ["method"], sort=False)[metric].mean().unstack("method")
    present = list(dict.fromkeys(df["method"]))
    if methods is not None:
        unknown = [m for m in methods if m not in present]
        if unknown:
            raise DataError(f"method(s) {', '.join(unknown)} have no runs in the frame; choose from: "
                            f"{', '.join(present)}")
    else:
        everywhere = [m for m in present if scores[m].notna().all()]
        complete_cells = int(scores[present].notna().all(axis=1).sum())

        def value(n_cells, k):  # a choice that allows the Friedman test beats any that does not
            return (n_cells >= 2 and k >= 3, n_cells * k)

        keep_all = value(complete_cells, len(present)) >= value(len(scores), len(everywhere))
        methods = present if keep_all else everywhere
    dropped_methods = [m for m in present if m not in methods]
    scores = scores.reindex(columns=list(methods))
    complete = scores.notna().all(axis=1)
    dropped = [tuple(i) if isinstance(i, tuple) else (i,) for i in scores.index[~complete]]
    scores = scores[complete]
    n, k = len(scores), len(methods)
    signed = scores.to_numpy() if not higher_is_better else -scores.to_numpy()
    per_cell = pd.DataFrame(sps.rankdata(signed, axis=1), index=scores.index, columns=list(methods))
    mean_ranks = per_cell.mean().sort_values() if n else pd.Series(dtype=float)  # no cell: no ranks, not NaN
    result = Ranking(ranks=mean_ranks, per_cell=per_cell, n_cells=n, alpha=alpha,
                     dropped_cells=dropped, dropped_methods=dropped_methods)
    if dropped:
        result.note = f"{len(dropped)} cell(s) left out because some method has no value there"
    if dropped_methods:
        result.note = _join(result.note, f"left out for lack of values in some cell: {', '.join(dropped_methods)}")
    if k < 3 or n < 2:
        why = (f"{k} method(s): Friedman needs at least 3 (for 2 use compare per cell)" if k < 3
               else f"{n} complete cell(s): ranks over cells need at least 2")
        result.note = _join(result.note, why)
        return result
    result.friedman_stat, result.friedman_p = (float(v) for v in sps.friedmanchisquare(*per_cell.T.to_numpy()))
    chi2 = result.friedman_stat
    if n * (k - 1) - chi2 > 0:  # equal means the ranks agree perfectly in every cell: F is infinite
        result.iman_davenport_f = (n - 1) * chi2 / (n * (k - 1) - chi2)
        result.iman_davenport_p = float(sps.f.sf(result.iman_davenport_f, k - 1, (k - 1) * (n - 1)))
    else:
        result.iman_davenport_f, result.iman_davenport_p = math.inf, 0.0
    result.q_alpha = nemenyi_q(k, alpha)
    result.cd = critical_difference(k, n, alpha)
    return result


def cliques(ranks: pd.Series, cd: float) -> list[list[str]]:
    """Maximal runs of methods (in rank order) whose mean ranks lie within less than ``cd`` of each other: the
    groups Demšar's diagram joins with a bar (no pair inside is significantly different)."""
    order = ranks.sort_values()
    names, values = list(order.index), order.to_numpy()
    spans = []
    for i in range(len(values)):
        j = i
        while j + 1 < len(values) and values[j + 1] - values[i] < cd:
            j += 1
        if j > i and not (spans and spans[-1][1] >= j):  # not contained in the previous (longer-reaching) span
            spans.append((i, j))
    return [names[i:j + 1] for i, j in spans]


def plot_critical_difference(ranks, cd: float | None, path, title: str | None = None) -> Path:
    """Demšar's CD diagram (2006, Fig. 1) as a PNG: the rank axis (1 = best, left), each method's mean rank with its
    name on the nearer side, a bar of length CD, and thick lines joining methods not significantly different.

    ``ranks``: a Series method → mean rank, or the :class:`Ranking` itself. Uses a bare matplotlib ``Figure``
    (no pyplot state), so it is safe in worker threads and never opens a window.
    """
    from matplotlib.figure import Figure

    if isinstance(ranks, Ranking):
        cd = ranks.cd if cd is None else cd
        ranks = ranks.ranks
    order = ranks.sort_values()
    k = len(order)
    if k < 2:
        raise DataError("a critical-difference diagram needs at least 2 methods")
    groups = cliques(order, cd) if cd is not None else []
    half = math.ceil(k / 2)
    rows = max(half, k - half)
    axis_y = 0.8
    label_top = axis_y + 0.25 + 0.12 * len(groups)
    height = label_top + 0.3 * (rows - 1) + 0.2
    fig = Figure(figsize=(7.0, height))
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    ax.set_xlim(0, 1)
    ax.set_ylim(height, 0)  # y grows downwards, in inches, like Demšar's drawing
    ax.axis("off")
    lo, hi = 1, max(k, 2)
    x0, x1 = 0.22, 0.78

    def xpos(r):
        return x0 + (r - lo) / (hi - lo) * (x1 - x0)

    ax.plot([x0, x1], [axis_y, axis_y], color="black", lw=1)
    for r in range(lo, hi + 1):
        ax.plot([xpos(r)] * 2, [axis_y, axis_y - 0.08], color="black", lw=1)
        ax.text(xpos(r), axis_y - 0.12, str(r), ha="center", va="bottom", fontsize=10)
        if r < hi:
            ax.plot([xpos(r + 0.5)] * 2, [axis_y, axis_y - 0.04], color="black", lw=0.7)
    if cd is not None:
        ax.plot([xpos(lo), xpos(lo + cd)], [0.35, 0.35], color="black", lw=1.2)
        for r in (lo, lo + cd):
            ax.plot([xpos(r)] * 2, [0.3, 0.4], color="black", lw=1.2)
        ax.text(xpos(lo + cd / 2), 0.27, f"CD = {cd:.2f}", ha="center", va="bottom", fontsize=10)
    for i, (name, r) in enumerate(order.items()):
        left = i < half
        y = label_top + 0.3 * (i if left else k - 1 - i)
        end = 0.16 if left else 0.84
        ax.plot([xpos(r), xpos(r), end], [axis_y, y, y], color="black", lw=1)
        ax.text(end - 0.01 if left else end + 0.01, y, f"{name} ({r:.2f})", ha="right" if left else "left",
                va="center", fontsize=10)
    for g, members in enumerate(groups):
        y = axis_y + 0.15 + 0.12 * g
        ax.plot([xpos(order[members[0]]) - 0.008, xpos(order[members[-1]]) + 0.008], [y, y], color="black", lw=4,
                solid_capstyle="butt")
    if title:
        ax.text(0.99, 0.05, title, ha="right", va="top", fontsize=9, color="0.3")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight", pad_inches=0.1)  # "tight" keeps long method names whole
    return path
