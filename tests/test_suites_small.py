"""Paper suites `ses-beta-sweep` and `shade-lowdata` (issue 8): their --smoke forms through the real CLI, real training
on real (tiny) data; the reports must carry the verdicts and the very numbers the runs returned."""
from collections import Counter
from pathlib import Path

import numpy as np
import optuna
import pytest

from regbench import suites
from regbench.cli import main
from regbench.suites import ses_beta_sweep, shade_lowdata
from regbench.suites.common import fmt_ci
from regbench.suites.store_arms import store_dir as suite_store


@pytest.fixture
def recorded(monkeypatch):
    """Keep what ``run_suite`` returned when the CLI called it (a pass-through recorder: the suite runs for real)."""
    results = []
    original = suites.run_suite

    def record(*args, **kwargs):
        results.append(original(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(suites, "run_suite", record)
    return results


def test_ses_beta_sweep_smoke(tmp_path, data_dir, recorded, capsys):
    assert main(["suite", "ses-beta-sweep", "--smoke", "--out", str(tmp_path), "--data-dir", str(data_dir)]) == 0
    assert "ses-beta-sweep: wrote" in capsys.readouterr().out
    res = recorded[0]
    text = (tmp_path / "ses-beta-sweep.md").read_text()
    assert res["report"] == tmp_path / "ses-beta-sweep.md"
    for claim in ("**P6-spectrum**", "**P6-gap**", "**Exp. 2-early**", "**Exp. 2-level**"):
        assert claim in text
    assert "**not comparable**" in text and "Smoke form" in text
    for key, word in (("spectrum_reproduced", "P6-spectrum"), ("gap_reproduced", "P6-gap"),
                      ("early_reproduced", "Exp. 2-early")):
        line = next(ln for ln in text.splitlines() if f"**{word}**" in ln)
        assert ("**reproduced**" if res[key] else "**not reproduced**") in line
    sp = res["spectrum"]
    for k in res["layers"]:
        assert f"`{k}` L = {sp[k]['L']:.0f}, p = {sp[k]['p']:.2g}" in text
        for b in (None, *ses_beta_sweep.BETAS):
            assert fmt_ci(res["erank"][b][k]) in text
    assert f"one-sided p = {res['gap']['p']:.3g}" in text
    for b in (None, *ses_beta_sweep.BETAS):
        assert fmt_ci(res["gap_values"][b], 2, 100) in text
    # The reproduced quantity: β sets the spectrum. On the three deeper layers (d^β spans 2.8…79 there) the mean
    # erank/d rises strictly with β and Page's trend test is significant even after 3 epochs; β = 0.9 spreads the
    # hidden layer far beyond the baseline.
    assert res["layers"] == ["block1.act", "block2.act", "block3.act", "act_fc"]
    for k in ("block2.act", "block3.act", "act_fc"):
        ratio = np.array([res["erank"][b][k].mean() / res["width"][k] for b in ses_beta_sweep.BETAS])
        assert np.all(np.diff(ratio) > 0), (k, ratio)
        assert sp[k]["p"] < 0.01 and sp[k]["rho"] > 0.5
    assert res["erank"][0.9]["act_fc"].min() > 2 * res["erank"][None]["act_fc"].max()
    assert res["figure"].stat().st_size > 10_000 and res["figure"].read_bytes()[:4] == b"\x89PNG"


def test_shade_lowdata_smoke(tmp_path, data_dir, recorded):
    assert main(["suite", "shade-lowdata", "--smoke", "--out", str(tmp_path), "--data-dir", str(data_dir)]) == 0
    res = recorded[0]
    text = res["report"].read_text()
    assert res["dataset"] == "mnist_m_style" and "`mnist_m_style` — the official MNIST-M files were not" in text
    line = next(ln for ln in text.splitlines() if "**Fig. 2a**" in ln)
    assert ("**reproduced**" if res["reproduced"] else "**not reproduced**") in line
    assert [r["n"] for r in res["rows"]] == list(shade_lowdata.SMOKE_SIZES)
    for r, t in zip(res["rows"], res["tuning"]):
        assert len(r["baseline"]) == len(r["shade"]) == shade_lowdata.SMOKE_SEEDS
        assert np.allclose(r["delta"], 100 * (r["shade"] - r["baseline"]))  # paired by seed
        assert f"Δ = {r['delta_mean']:+.1f} pp [{r['delta_lo']:+.1f}, {r['delta_hi']:+.1f}]" in line
        assert fmt_ci(r["delta"], 1) in text and fmt_ci(r["shade"], 1, 100) in text and f"{r['weight']:.2e}" in text
        # Tuning read validation only: equal trials per size, none evaluated on test, the pick is the best val.
        assert len(t["trials"]) == shade_lowdata.SMOKE_TRIALS
        assert all(not tr["eval_test"] and not any(m.startswith("test_") for m in tr["metrics"])
                   for tr in t["trials"])
        best = max(t["trials"], key=lambda tr: tr["val_acc"])
        assert r["weight"] == t["weight"] == best["weight"]
        low, high = shade_lowdata.WEIGHT_RANGE
        assert all(low <= tr["weight"] <= high for tr in t["trials"])
    assert res["figure"].stat().st_size > 10_000 and res["figure"].read_bytes()[:4] == b"\x89PNG"
    _resumes_without_retraining(tmp_path, data_dir, recorded)


def _resumes_without_retraining(out, data_dir, recorded):
    """shade-lowdata runs each train size as a benchmark in a store of its own: the same command again trains
    nothing (same trials, same numbers); a third seed trains only its 2 × 2 new final runs, no tuning trial."""
    args = ["suite", "shade-lowdata", "--smoke", "--out", str(out), "--data-dir", str(data_dir), "--quiet"]
    stores = [suite_store(out, shade_lowdata.NAME, shade_lowdata.benchmark_name(n, True))
              for n in shade_lowdata.SMOKE_SIZES]
    first = [_trials(s) for s in stores]
    for counts in first:  # the spec's study, one tuning study (SMOKE_TRIALS runs), 2 seeds per arm, all complete
        assert sorted(sum(c.values()) for c in counts.values()) == [0, 2, 2, shade_lowdata.SMOKE_TRIALS]
        assert all(set(c) <= {"COMPLETE"} for c in counts.values())
    report = (out / "shade-lowdata.md").read_text()
    assert main(args) == 0
    assert [_trials(s) for s in stores] == first
    for r0, r1 in zip(recorded[0]["rows"], recorded[1]["rows"]):
        assert np.array_equal(r0["baseline"], r1["baseline"]) and np.array_equal(r0["shade"], r1["shade"])
        assert r0["weight"] == r1["weight"]
    assert (out / "shade-lowdata.md").read_text().split("\n")[4:] == report.split("\n")[4:]  # past the timing
    assert main([*args, "--seeds", "3"]) == 0
    for before, store in zip(first, stores):
        after = _trials(store)
        added = {name: sum(after[name].values()) - sum(before.get(name, {}).values()) for name in after}
        assert sorted(added.values()) == [0, 0, 1, 1]  # one new seed per arm; tuning and the spec untouched
    for r0, r3 in zip(recorded[0]["rows"], recorded[2]["rows"]):
        assert np.array_equal(r3["baseline"][:2], r0["baseline"]) and len(r3["shade"]) == 3


def _trials(store: Path) -> dict:
    """Study name -> (trials by state) in one benchmark's store, read with Optuna itself."""
    storage = f"sqlite:///{store / 'regbench.db'}"
    return {s.study_name: Counter(t.state.name for t in optuna.load_study(study_name=s.study_name,
                                                                          storage=storage).trials)
            for s in optuna.get_all_study_summaries(storage)}


def _trials(store: Path) -> dict:
    """Study name -> (trials by state) in one benchmark's store, read with Optuna itself."""
    storage = f"sqlite:///{store / 'regbench.db'}"
    return {s.study_name: Counter(t.state.name for t in optuna.load_study(study_name=s.study_name,
                                                                          storage=storage).trials)
            for s in optuna.get_all_study_summaries(storage)}


@pytest.mark.parametrize("n", shade_lowdata.SIZES)
def test_shade_schedule_uses_every_sample_and_enough_steps(n):
    batch, epochs = shade_lowdata.schedule(n)
    steps = n // batch
    assert steps >= 5 and 10 <= batch <= 32
    assert n - steps * batch < batch and (n != 50 or steps * batch == 50)  # drop_last loses < one batch
    assert steps * epochs >= 100 and shade_lowdata.MIN_EPOCHS <= epochs <= shade_lowdata.MAX_EPOCHS


def test_official_mnist_m_is_preferred_when_present(tmp_path):
    assert shade_lowdata.dataset_name(tmp_path) == "mnist_m_style"
    (tmp_path / "mnist_m").mkdir()
    (tmp_path / "mnist_m" / "mnist_m.tar.gz").write_bytes(b"placed by the user")
    assert shade_lowdata.dataset_name(tmp_path) == "mnist_m"


def test_too_few_seeds_is_one_line_exit_2(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["suite", "ses-beta-sweep", "--seeds", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--seeds 2 is too few" in err and "\n" not in err and not out.exists()
