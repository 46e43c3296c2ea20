"""The suites' verdict code on degenerate inputs (issue 17): infinite and NaN values, zero variance, a seed identical
to another. Each verdict is a pure function of the numbers the runs produced; none may raise, and a number a verdict
cannot carry (a NaN, an undefined ratio) never yields "reproduced". Plus the suites end in a report, not a
traceback, at their default and at --seeds 2 (opt-in: REGBENCH_RUN_SUITES=1, ~25 min on 2 cores); the
--smoke forms run in CI (tests/test_suites.py, tests/test_suites_small.py)."""
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from regbench.cli import main
from regbench.suites import ses_beta_sweep, shade_lowdata
from regbench.stats import t_interval
from regbench.suites.common import NOT_COMPARABLE, NOT_REPRODUCED, REPRODUCED
from regbench.suites.ses_rings import condition_numbers, kappa_summary, p3_judgement, p4_judgement

WORDS = {REPRODUCED, NOT_REPRODUCED, NOT_COMPARABLE}
anything = st.floats(allow_nan=True, allow_infinity=True, width=64)
positive = st.floats(min_value=1e-3, max_value=1e6)


def seeds_of(elements, min_size=1, max_size=6):
    """Per-seed values, sometimes with one seed repeated (identical seeds: zero spread between them)."""
    return st.tuples(st.lists(elements, min_size=min_size, max_size=max_size), st.booleans()).map(
        lambda t: t[0] + t[0][:1] if t[1] else t[0])


@settings(max_examples=150, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(1, 20), st.integers(2, 3)), elements=anything))
def test_condition_numbers_are_at_least_one_or_infinite_never_nan(values):
    s = -np.sort(-np.abs(np.nan_to_num(values, nan=0.0)), axis=1)  # singular values: non-negative, descending
    s[np.isnan(values).any(axis=1), -1] = np.nan  # and some rows with a NaN (a diverged model)
    kappa = condition_numbers(s, shape=(3, 2))
    assert kappa.shape == (len(s),) and not np.isnan(kappa).any()
    assert np.all((kappa >= 1) | np.isinf(kappa))
    assert np.all(np.isinf(kappa[s[:, -1] == 0]))  # a singular Jacobian is counted as κ = ∞


@settings(max_examples=150, deadline=None)
@given(seeds_of(anything), seeds_of(anything))
def test_p4_judgement_never_raises_and_an_undefined_ratio_is_not_comparable(base, ses):
    n = min(len(base), len(ses))
    base, ses = np.array(base[:n]), np.array(ses[:n])
    out = p4_judgement(base, ses)
    assert out["word"] in WORDS
    defined = np.isfinite(base) & np.isfinite(ses) & (base > 0) & (ses > 0)
    if not defined.all() or n < 2:
        assert out["word"] == NOT_COMPARABLE and out["why"]
    else:
        # the ratio of two finite positive κ is defined even when it overflows a float (1e94 / 1e-215): its log is
        # finite, the geometric mean is a number (+inf past the float range, never NaN) and the seeds are comparable
        assert np.isfinite(out["log_geo_mean"]) and not np.isnan(out["geo_mean"]) and out["word"] != NOT_COMPARABLE


def test_p4_judgement_of_ratios_past_the_float_range():
    """Found by hypothesis: base / ses overflowed to inf for base = 1.18e94, ses = 6.55e-215 and the mean log-ratio
    was inf; in log space it is finite."""
    out = p4_judgement([1.0, 1.18e94], [1.0, 6.55e-215])
    assert np.isfinite(out["log_geo_mean"]) and out["log_geo_mean"] == pytest.approx((np.log(1.18e94) - np.log(6.55e-215)) / 2)
    assert out["word"] != NOT_COMPARABLE


@settings(max_examples=100, deadline=None)
@given(seeds_of(positive, min_size=2), st.floats(min_value=0.01, max_value=100))
def test_p4_judgement_on_identical_ratios_is_the_point_itself(ses, ratio):
    """Every seed shows the same drop (zero variance of the log-ratio): the interval is the point, and the verdict
    follows P4's threshold exactly."""
    ses = np.array(ses)
    out = p4_judgement(ses * ratio, ses)
    assert out["geo_mean"] == pytest.approx(ratio, rel=1e-6)
    if abs(ratio - 2.0) > 1e-6 and abs(ratio - 1.0) > 1e-6:
        assert out["word"] == (REPRODUCED if ratio > 2.0 else NOT_REPRODUCED)


def test_p4_judgement_is_not_flipped_by_singular_points():
    """The issue's case: one seed has a singular test point (κ = ∞), so its mean is ∞; the median is unmoved."""
    rng = np.random.default_rng(0)
    base = [rng.lognormal(np.log(50), 1, 300) for _ in range(5)]
    ses = [rng.lognormal(np.log(15), 0.5, 300) for _ in range(5)]
    ses[3][7] = np.inf
    summaries = [[kappa_summary(k) for k in arm] for arm in (base, ses)]
    assert summaries[1][3]["kappa_singular"] == 1 and np.isfinite(summaries[1][3]["kappa_mean"])
    out = p4_judgement([s["kappa_median"] for s in summaries[0]], [s["kappa_median"] for s in summaries[1]])
    assert out["word"] == REPRODUCED and 2 < out["geo_mean"] < 5


@settings(max_examples=100, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(0, 5), st.integers(1, 5)), elements=anything))
def test_p3_judgement_never_reproduces_on_a_value_outside_or_undefined(erank):
    ok, worst = p3_judgement(erank)
    if ok:
        assert erank.size and np.all(np.isfinite(erank)) and worst <= 0.05
    if erank.size and not np.all(np.isfinite(erank)):
        assert not ok and worst == np.inf


@settings(max_examples=100, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(1, 6), st.just(len(ses_beta_sweep.BETAS))), elements=anything),
       st.booleans(), st.booleans())
def test_beta_sweep_trend_never_raises(values, increasing, twin):
    if twin and len(values) > 1:
        values[1] = values[0]  # one seed identical to another
    out = ses_beta_sweep.trend(values, increasing)
    assert set(out) >= {"p", "rho", "monotone_means"}
    if not np.all(np.isfinite(values)) or values.shape[0] < 2:
        assert np.isnan(out["p"]) and not out["monotone_means"]  # nothing ranked, nothing claimed
    else:
        assert 0 <= out["p"] <= 1


@settings(max_examples=150, deadline=None)
@given(seeds_of(anything), seeds_of(anything))
def test_shade_paired_gain_never_raises_and_nan_is_never_consistent(baseline, shade):
    n = min(len(baseline), len(shade))
    out = shade_lowdata.paired_gain(baseline[:n], shade[:n])
    assert isinstance(out["consistent"], bool)
    delta = 100 * (np.array(shade[:n]) - np.array(baseline[:n]))
    if not np.all(np.isfinite(delta)) or n < 2:
        assert not out["consistent"]
    if out["consistent"]:
        assert out["delta_lo"] > 0


@settings(max_examples=100, deadline=None)
@given(seeds_of(anything))
def test_t_interval_never_raises(values):
    mean, low, high = t_interval(values)
    if np.isfinite(low) or np.isfinite(high):  # an interval only from finite values, and around its mean
        assert np.all(np.isfinite(values)) and len(values) >= 2 and low <= mean <= high
    if not np.all(np.isfinite(values)) or len(values) < 2:
        assert np.isnan(low) and np.isnan(high)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("REGBENCH_RUN_SUITES") != "1",
                    reason="full-size suites: minutes each (~25 min in all on 2 cores); opt in with REGBENCH_RUN_SUITES=1")
@pytest.mark.parametrize("name, seeds", [("ses-rings", None), ("ses-rings", 2), ("dln-equilibrium", None),
                                         ("dln-equilibrium", 2),
                                         ("shade-lowdata", 2), ("shade-lowdata", None), ("ses-beta-sweep", None),
                                         ("ses-beta-sweep", 3)])
def test_every_cpu_suite_at_its_default_ends_in_a_report(name, seeds, tmp_path, data_dir, capsys):
    args = ["suite", name, "--out", str(tmp_path), "--data-dir", str(data_dir), "--quiet"]
    assert main([*args, *(["--seeds", str(seeds)] if seeds else [])]) == 0
    text = (tmp_path / f"{name}.md").read_text()
    assert "**reproduced**" in text or "**not reproduced**" in text
