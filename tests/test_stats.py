"""regbench.stats against independent computations (scipy, hand formulas, published tables) on fixed arrays."""
import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from regbench import stats
from regbench.errors import ConfigError, DataError

BASE = np.array([0.801, 0.812, 0.795, 0.820, 0.808, 0.799])
GAIN = np.array([0.006, 0.011, 0.004, 0.013, 0.009, 0.002])  # distinct |d|: no ties, Wilcoxon is exact


def frame(runs: dict, seeds: dict | None = None) -> pd.DataFrame:
    """{method: values} → the tidy frame (one row per run); seeds default to 0..n-1 (paired)."""
    rows = []
    for method, values in runs.items():
        for seed, v in zip((seeds or {}).get(method, range(len(values))), values):
            rows.append({"method": method, "seed": seed, "test_acc": v})
    return pd.DataFrame(rows)


def row(table: pd.DataFrame, method: str) -> pd.Series:
    return table.set_index("method").loc[method]


def holm_by_hand(p):
    """Holm (1979): sort ascending, multiply the i-th smallest by (m − i + 1), make monotone, cap at 1."""
    order = np.argsort(p)
    m, adjusted, running = len(p), np.empty(len(p)), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted


def t_ci(values, alpha=0.05):
    n = len(values)
    half = sps.t.ppf(1 - alpha / 2, n - 1) * np.std(values, ddof=1) / math.sqrt(n)
    return np.mean(values) - half, np.mean(values) + half


def power_nct(d, n, alpha=0.05, paired=True):
    """Two-sided t-test power from the noncentral t directly."""
    dof, nc = (n - 1, d * math.sqrt(n)) if paired else (2 * n - 2, d * math.sqrt(n / 2))
    crit = sps.t.ppf(1 - alpha / 2, dof)
    return sps.nct.sf(crit, dof, nc) + sps.nct.cdf(-crit, dof, nc)


# --- compare: paired -----------------------------------------------------------------------------------------

def test_paired_t_intervals_and_effect_size_match_scipy_and_hand_formulas():
    ses = BASE + GAIN
    table = stats.compare(frame({"baseline": BASE, "ses": ses}), "test_acc")
    r = row(table, "ses")
    assert r.test == "paired t" and r.n == 6
    assert r.p == pytest.approx(sps.ttest_rel(ses, BASE).pvalue, rel=1e-9)
    assert r["mean"] == pytest.approx(ses.mean())
    assert (r.ci_low, r.ci_high) == pytest.approx(t_ci(ses))
    assert (row(table, "baseline").ci_low, row(table, "baseline").ci_high) == pytest.approx(t_ci(BASE))
    assert r.delta == pytest.approx(GAIN.mean())
    assert (r.delta_ci_low, r.delta_ci_high) == pytest.approx(t_ci(ses - BASE))
    # g_av: mean difference over the RMS of the two SDs, times J(n − 1) = 1 − 3/(4(n − 1) − 1).
    g = GAIN.mean() / math.sqrt((np.var(ses, ddof=1) + np.var(BASE, ddof=1)) / 2) * (1 - 3 / (4 * 5 - 1))
    assert r.hedges_g == pytest.approx(g)
    assert r.verdict == "better" and r.note == ""


def test_wilcoxon_matches_exact_enumeration_of_sign_flips():
    ses = BASE + GAIN * np.array([1, -1, 1, 1, -1, 1])
    d = ses - BASE
    ranks = sps.rankdata(np.abs(d))
    observed = min(ranks[d > 0].sum(), ranks[d < 0].sum())
    flips = [sum(r for r, s in zip(ranks, signs) if s) for signs in itertools.product([0, 1], repeat=len(d))]
    tail = np.mean([min(w, ranks.sum() - w) <= observed for w in flips])  # two-sided exact null
    r = row(stats.compare(frame({"baseline": BASE, "ses": ses}), "test_acc"), "ses")
    assert r.wilcoxon_p == pytest.approx(tail)
    assert r.wilcoxon_p == pytest.approx(sps.wilcoxon(ses, BASE).pvalue)


def test_holm_across_the_tables_methods():
    assert holm_by_hand(np.array([0.01, 0.04, 0.03, 0.2])) == pytest.approx([0.04, 0.09, 0.09, 0.2])
    runs = {"baseline": BASE, "a": BASE + GAIN, "b": BASE + GAIN[::-1] * 0.4 + [0, 0, 0, 0, 0, 0.002], "c": BASE - GAIN * 0.2 + 0.001,
            "d": BASE + np.array([0.003, -0.002, 0.001, 0.0, -0.001, 0.002])}
    table = stats.compare(frame(runs), "test_acc").set_index("method").drop("baseline")
    raw = np.array([sps.ttest_rel(runs[m], BASE).pvalue for m in table.index])
    assert table.p.to_numpy(float) == pytest.approx(raw)
    assert table.p_holm.to_numpy(float) == pytest.approx(holm_by_hand(raw))


def test_power_is_the_smallest_n_reaching_80_percent_by_noncentral_t():
    for d in (0.3, 0.8, 1.5, 4.0):
        for paired in (True, False):
            n = stats.seeds_needed(d, paired=paired)
            assert power_nct(d, n, paired=paired) >= 0.8
            assert n == 2 or power_nct(d, n - 1, paired=paired) < 0.8
    assert stats.seeds_needed(0.0) == math.inf and stats.seeds_needed(0.01) == math.inf  # > 1000 seeds
    ses = BASE + GAIN
    d_z = GAIN.mean() / GAIN.std(ddof=1)
    assert row(stats.compare(frame({"baseline": BASE, "ses": ses}), "test_acc"), "ses").seeds_needed == \
        stats.seeds_needed(d_z)


def test_tost_equals_two_one_sided_scipy_tests_and_gives_equivalent():
    same = BASE + np.array([0.001, -0.0015, 0.0005, -0.0005, 0.001, -0.001])
    d, margin = same - BASE, 0.005
    lower = sps.ttest_1samp(d, -margin, alternative="greater").pvalue
    upper = sps.ttest_1samp(d, margin, alternative="less").pvalue
    r = row(stats.compare(frame({"baseline": BASE, "same": same}), "test_acc", margin=margin), "same")
    assert r.tost_p == pytest.approx(max(lower, upper))
    assert r.p > 0.05 and r.verdict == "equivalent"
    # A margin too narrow for this spread: neither different nor shown equivalent.
    narrow = row(stats.compare(frame({"baseline": BASE, "same": same}), "test_acc", margin=0.0005), "same")
    assert narrow.verdict == "inconclusive"


def test_worse_and_lower_is_better():
    runs = {"baseline": BASE, "bad": BASE - GAIN}
    assert row(stats.compare(frame(runs), "test_acc"), "bad").verdict == "worse"
    # The same numbers read as an error rate: lower is better.
    assert row(stats.compare(frame(runs), "test_acc", higher_is_better=False), "bad").verdict == "better"


# --- compare: unpaired, degenerate and bad input ---------------------------------------------------------------

def test_unpaired_seeds_use_welch():
    other = np.array([0.815, 0.826, 0.809, 0.831])
    table = stats.compare(frame({"baseline": BASE, "ses": other}, seeds={"ses": [10, 11, 12, 13]}), "test_acc")
    r = row(table, "ses")
    assert r.test == "Welch t" and "unpaired" in r.note and r.wilcoxon_p is None
    assert r.p == pytest.approx(sps.ttest_ind(other, BASE, equal_var=False).pvalue, rel=1e-9)
    v1, v2, n1, n2 = np.var(other, ddof=1), np.var(BASE, ddof=1), len(other), len(BASE)
    se = math.sqrt(v1 / n1 + v2 / n2)
    dof = se ** 4 / ((v1 / n1) ** 2 / (n1 - 1) + (v2 / n2) ** 2 / (n2 - 1))  # Welch–Satterthwaite
    delta = other.mean() - BASE.mean()
    half = sps.t.ppf(0.975, dof) * se
    assert (r.delta_ci_low, r.delta_ci_high) == pytest.approx((delta - half, delta + half))
    pooled = math.sqrt(((n1 - 1) * v1 + (n2 - 1) * v2) / (n1 + n2 - 2))
    assert r.hedges_g == pytest.approx(delta / pooled * (1 - 3 / (4 * (n1 + n2 - 2) - 1)))
    assert r.seeds_needed == stats.seeds_needed(delta / pooled, paired=False)
    lower = sps.ttest_ind(other, BASE - 0.005, equal_var=False, alternative="greater").pvalue
    upper = sps.ttest_ind(other, BASE + 0.005, equal_var=False, alternative="less").pvalue
    assert r.tost_p == pytest.approx(max(lower, upper))
    # A partial overlap of seeds is not a pairing either.
    partial = frame({"baseline": BASE, "ses": other}, seeds={"ses": [0, 1, 2, 13]})
    assert row(stats.compare(partial, "test_acc"), "ses").test == "Welch t"


def test_fewer_than_three_seeds_says_so_in_words_and_shows_no_nan():
    table = stats.compare(frame({"baseline": BASE, "one": [0.83], "empty": [math.nan, math.nan]}), "test_acc")
    one = row(table, "one")
    assert one.n == 1 and one["mean"] == pytest.approx(0.83) and one.delta == pytest.approx(0.83 - BASE.mean())
    assert "at least 3 seeds" in one.note and one.verdict == "inconclusive"
    assert all(one[c] is None for c in ("ci_low", "p", "p_holm", "hedges_g", "seeds_needed", "tost_p"))
    assert row(table, "empty").n == 0 and "no recorded values" in row(table, "empty").note
    assert not any(isinstance(v, float) and math.isnan(v) for v in table.to_numpy().ravel())
    lone = stats.compare(frame({"baseline": [0.8], "ses": [0.81]}), "test_acc")
    assert "interval needs at least 3" in row(lone, "baseline").note and row(lone, "ses").p is None


def test_identical_differences_are_reported_not_divided_by_zero():
    # Differences equal up to float rounding (0.83 − 0.8 ≠ 0.81 − 0.78 in binary) count as equal.
    base = np.array([0.8, 0.78, 0.65])
    shifted = np.array([0.83, 0.81, 0.68])
    assert np.std(shifted - base) > 0
    r = row(stats.compare(frame({"baseline": base, "same": shifted}), "test_acc"), "same")
    assert r.p is None and r.delta_ci_low is None and "same amount" in r.note and r.verdict == "inconclusive"
    welch = stats.compare(frame({"baseline": [0.8, 0.8, 0.8], "flat": [0.81, 0.81, 0.81]}, seeds={"flat": [5, 6, 7]}),
                          "test_acc")
    assert row(welch, "flat").p is None and "either side" in row(welch, "flat").note


def test_bad_input_is_one_clear_error():
    df = frame({"baseline": BASE, "ses": BASE + GAIN})
    with pytest.raises(ConfigError, match="unknown metric 'acc'.*test_acc"):
        stats.compare(df, "acc")
    with pytest.raises(DataError, match="reference method 'erm'.*baseline, ses"):
        stats.compare(df, "test_acc", reference="erm")
    with pytest.raises(ConfigError, match="alpha=1.5"):
        stats.compare(df, "test_acc", alpha=1.5)
    with pytest.raises(ConfigError, match="margin"):
        stats.compare(df, "test_acc", margin=0)
    with pytest.raises(DataError, match="several runs with seed 0"):
        stats.compare(pd.concat([df, df.iloc[:1]]), "test_acc")
    two_cells = pd.concat([df.assign(dataset="a", model="m"), df.assign(dataset="b", model="m")])
    with pytest.raises(DataError, match="2 \\(dataset, model\\) cells"):
        stats.compare(two_cells, "test_acc")
    with pytest.raises(DataError, match="empty"):
        stats.compare(df.iloc[:0], "test_acc")


# --- across datasets ---------------------------------------------------------------------------------------------

SCORES = {  # (dataset, model) → method → per-seed accuracies; mean ranks by hand below
    ("mnist1d", "mlp"): {"baseline": [0.60, 0.62], "ses": [0.66, 0.64], "shade": [0.63, 0.63], "dropout": [0.61, 0.61]},
    ("digits", "mlp"): {"baseline": [0.90, 0.92], "ses": [0.95, 0.95], "shade": [0.94, 0.92], "dropout": [0.90, 0.90]},
    ("cifar10", "cnn"): {"baseline": [0.70, 0.70], "ses": [0.72, 0.74], "shade": [0.69, 0.69], "dropout": [0.71, 0.71]},
    ("cifar100", "cnn"): {"baseline": [0.40, 0.40], "ses": [0.44, 0.44], "shade": [0.42, 0.42], "dropout": [0.41, 0.39]},
    ("mnist_m", "cnn"): {"baseline": [0.50, 0.52], "ses": [0.55, 0.53], "shade": [0.51, 0.51], "dropout": [0.52, 0.54]},
}


def cells_frame(scores=SCORES) -> pd.DataFrame:
    rows = [{"dataset": ds, "model": model, "method": m, "seed": s, "test_acc": v}
            for (ds, model), methods in scores.items() for m, values in methods.items() for s, v in enumerate(values)]
    return pd.DataFrame(rows)


def test_mean_ranks_and_friedman_match_hand_formula_and_scipy():
    result = stats.rank_across(cells_frame(), "test_acc")
    # Seed means per cell, ranked by hand (1 = best; exact ties share the average rank), cells in SCORES order.
    by_hand = {"baseline": [3.5, 3, 3, 3.5, 3.5], "ses": [1, 1, 1, 1, 1], "shade": [2, 2, 4, 2, 3.5],
               "dropout": [3.5, 4, 2, 3.5, 2]}
    assert result.ranks.to_dict() == pytest.approx({m: np.mean(r) for m, r in by_hand.items()})
    assert result.ranks.index[0] == "ses" and result.n_cells == 5
    means = cells_frame().groupby(["dataset", "model", "method"]).test_acc.mean().unstack("method")
    expected = sps.friedmanchisquare(*[means[m] for m in ["baseline", "ses", "shade", "dropout"]])
    assert result.friedman_stat == pytest.approx(expected.statistic)
    assert result.friedman_p == pytest.approx(expected.pvalue)
    n, k, chi2 = 5, 4, result.friedman_stat
    f = (n - 1) * chi2 / (n * (k - 1) - chi2)  # Iman & Davenport (Demšar eq. 4)
    assert result.iman_davenport_f == pytest.approx(f)
    assert result.iman_davenport_p == pytest.approx(sps.f.sf(f, k - 1, (k - 1) * (n - 1)))


def test_friedman_without_ties_equals_demsar_equation_3():
    rng = np.random.default_rng(3)
    scores = {(f"d{i}", "mlp"): {m: [float(v)] for m, v in zip("abcde", rng.permutation(5) / 10)} for i in range(6)}
    result = stats.rank_across(cells_frame(scores), "test_acc")
    n, k, r = 6, 5, result.ranks.to_numpy()
    chi2 = 12 * n / (k * (k + 1)) * (np.sum(r ** 2) - k * (k + 1) ** 2 / 4)
    assert result.friedman_stat == pytest.approx(chi2)


def test_critical_difference_uses_demsar_table_5_q_values():
    # Demšar (2006) Table 5(a), alpha = 0.05: k = 2 … 10; Table 5(b), alpha = 0.10, k = 5.
    for k, q in {2: 1.960, 3: 2.343, 5: 2.728, 10: 3.164}.items():
        assert stats.nemenyi_q(k, 0.05) == pytest.approx(q, abs=1e-3)
    assert stats.nemenyi_q(5, 0.10) == pytest.approx(2.459, abs=1e-3)
    assert stats.critical_difference(5, 14) == pytest.approx(2.728 * math.sqrt(5 * 6 / (6 * 14)), abs=1e-3)
    result = stats.rank_across(cells_frame(), "test_acc")
    assert result.cd == pytest.approx(stats.nemenyi_q(4) * math.sqrt(4 * 5 / (6 * 5)))


def test_cliques_join_methods_closer_than_cd():
    ranks = pd.Series({"a": 1.0, "b": 1.8, "c": 2.5, "d": 3.9})
    assert stats.cliques(ranks, 1.6) == [["a", "b", "c"], ["c", "d"]]
    assert stats.cliques(ranks, 0.5) == []


def test_lower_is_better_incomplete_cells_and_too_few_methods():
    flipped = stats.rank_across(cells_frame(), "test_acc", higher_is_better=False)
    assert flipped.ranks.index[-1] == "ses"
    df = cells_frame()
    df = df[~((df.dataset == "digits") & (df.method == "shade"))]
    partial = stats.rank_across(df, "test_acc")
    assert partial.n_cells == 4 and partial.dropped_cells == [("digits", "mlp")] and "1 cell(s)" in partial.note
    assert partial.dropped_methods == []
    # shade missing in two of five cells: dropping shade keeps more (3 × 5 > 4 × 3) than dropping the cells.
    sparse = df[~((df.dataset == "cifar10") & (df.method == "shade"))]
    without = stats.rank_across(sparse, "test_acc")
    assert without.n_cells == 5 and without.dropped_methods == ["shade"] and "shade" in without.note
    # One cell with 24 methods (24 × 1 values) outweighs 3 common methods × 6 cells, but allows no test.
    extra = [f"m{i}" for i in range(20)]
    wide = pd.concat([df, pd.DataFrame([{"dataset": "new", "model": "mlp", "method": m, "seed": 0, "test_acc": 0.5}
                                        for m in ["baseline", "ses", "shade", "dropout", *extra]])])
    common = stats.rank_across(wide, "test_acc")
    assert common.dropped_methods == ["shade", *extra] and common.n_cells == 6 and common.cd is not None
    chosen = stats.rank_across(sparse, "test_acc", methods=["baseline", "ses", "shade"])
    assert chosen.n_cells == 3 and list(chosen.per_cell.columns) == ["baseline", "ses", "shade"]
    with pytest.raises(DataError, match="method\\(s\\) erm have no runs"):
        stats.rank_across(df, "test_acc", methods=["baseline", "erm"])
    two = stats.rank_across(df[df.method.isin(["baseline", "ses"])], "test_acc")
    assert two.friedman_p is None and two.cd is None and "at least 3" in two.note
    with pytest.raises(DataError, match="lacks column"):
        stats.rank_across(df.drop(columns="model"), "test_acc")


def test_cd_diagram_writes_a_png(tmp_path):
    from matplotlib.image import imread

    result = stats.rank_across(cells_frame(), "test_acc")
    path = stats.plot_critical_difference(result, None, tmp_path / "figs" / "cd.png", title="test_acc")
    image = imread(path)
    assert image.shape[1] > image.shape[0] > 100  # a wide diagram, drawn (not an empty canvas)
    assert (image[..., :3] < 0.5).mean() > 0.005


# --- small n (issue 20): below 3 seeds, words instead of intervals; undefined is None, never 0 -------------------

def test_two_seeds_give_means_and_delta_only_and_g_is_undefined_not_zero():
    base, ses = np.array([0.60, 0.70]), np.array([0.68, 0.81])  # Δ = +9.5 pp with spread: J(1) = 0 made g = 0
    assert stats.hedges_correction(1) is None and stats.hedges_correction(2) == pytest.approx(1 - 3 / 7)
    assert stats.hedges_g_paired(ses, base) is None
    r = row(stats.compare(frame({"baseline": base, "ses": ses}), "test_acc"), "ses")
    assert r.delta == pytest.approx(0.095) and r.n == 2
    assert all(r[c] is None for c in ("ci_low", "delta_ci_low", "p", "p_holm", "hedges_g", "seeds_needed", "tost_p"))
    assert "at least 3 seeds" in r.note and "12.7" in r.note


def test_three_seeds_have_intervals_tests_and_g():
    base, ses = np.array([0.60, 0.70, 0.65]), np.array([0.68, 0.81, 0.70])
    r = row(stats.compare(frame({"baseline": base, "ses": ses}), "test_acc"), "ses")
    assert (r.ci_low, r.ci_high) == pytest.approx(t_ci(ses)) and r.p is not None
    spread = math.sqrt((np.var(ses, ddof=1) + np.var(base, ddof=1)) / 2)
    assert r.hedges_g == pytest.approx((1 - 3 / 7) * (ses - base).mean() / spread)


def test_zero_spread_difference_note_carries_no_number_in_other_units():
    base = np.array([0.60, 0.70, 0.65])
    r = row(stats.compare(frame({"baseline": base, "same": base + 0.024}), "test_acc"), "same")
    assert r.p is None and r.delta == pytest.approx(0.024)
    assert "0.024" not in r.note and "same amount" in r.note  # the table shows Δ in pp; a fraction here misleads
    flat = stats.compare(frame({"baseline": [0.6, 0.6, 0.6], "flat": [0.62, 0.62, 0.62]}), "test_acc")
    assert row(flat, "flat").hedges_g is None and "Hedges' g undefined" in row(flat, "flat").note
