"""Leaderboard, figures, export and cross-benchmark summary, regenerated from a real stored fixture.

tests/fixtures/tiny/regbench.db is the store of two real runs (written once, see tests/fixtures/README.md):
``regbench run --methods ses,shade --epochs 3 --seeds 3 --train-size 400 --name tiny-400 --out tiny`` and the same
with ``--train-size 200 --name tiny-200``. Nothing here trains: reports read the store only
(docs/architecture.md, "Data flows one way").
"""
import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from regbench.cli import main

FIXTURE = Path(__file__).parent / "fixtures" / "tiny" / "regbench.db"
GOLDEN = Path(__file__).parent / "golden" / "tiny-400.md"


@pytest.fixture
def store(tmp_path):
    out = tmp_path / "tiny"
    out.mkdir()
    shutil.copy(FIXTURE, out / "regbench.db")  # a copy: reports write next to the store
    return out


def test_acc(out: Path, benchmark: str = "tiny-400") -> dict[str, dict[int, float]]:
    """test_acc per method and seed read straight from the SQLite tables (independent of regbench.store)."""
    with sqlite3.connect(out / "regbench.db") as db:
        rows = db.execute(
            "select s.study_name, a.value_json, p.param_value from studies s join trials t using(study_id) "
            "join trial_user_attributes a using(trial_id) join trial_params p using(trial_id) "
            "where a.key='metrics' and p.param_name='seed' and t.state='COMPLETE' and s.study_name like ?",
            (f"{benchmark}:%:final",)).fetchall()
    acc: dict[str, dict[int, float]] = {}
    for study, metrics, seed in rows:
        acc.setdefault(study.split(":")[1], {})[int(seed)] = json.loads(metrics)["test_acc"]
    return acc


test_acc.__test__ = False  # a helper, not a test


def cells(text: str, method: str) -> dict[str, str]:
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| method |"))
    row = next(line for line in lines if line.startswith(f"| {method} |"))
    keys = [c.strip() for c in header.strip("|").split("|")]
    return dict(zip(keys, (c.strip() for c in row.strip("|").split("|")), strict=True))


def test_report_matches_the_golden_leaderboard(store, capsys):
    assert main(["report", str(store), "--name", "tiny-400"]) == 0
    text = (store / "leaderboard.md").read_text()
    assert text == GOLDEN.read_text()  # the store is fixed, so nothing in it is volatile
    assert text in capsys.readouterr().out
    for name in ("test_acc_seeds.png", "erank.png", "reliability.png", "learning_curve.png"):
        png = store / "figures" / name
        assert f"](figures/{name})" in text and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_statistics_in_the_table_match_an_independent_computation(store):
    assert main(["report", str(store), "--name", "tiny-400"]) == 0
    text = (store / "leaderboard.md").read_text()
    acc = test_acc(store)
    seeds = sorted(acc["baseline"])
    base = np.array([acc["baseline"][s] for s in seeds])
    raw = {}
    for method in ("ses", "shade"):
        diff = np.array([acc[method][s] for s in seeds]) - base
        raw[method] = sps.ttest_rel(np.array([acc[method][s] for s in seeds]), base).pvalue
        half = sps.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / np.sqrt(len(diff))
        row = cells(text, method)
        assert row["Δ test vs baseline (pp) [95 % CI]"] == (f"{diff.mean() * 100:+.2f} [{(diff.mean() - half) * 100:+.2f}, "
                                                             f"{(diff.mean() + half) * 100:+.2f}]")
        mine = np.array([acc[method][s] for s in seeds]) * 100
        mean_half = sps.t.ppf(0.975, 2) * mine.std(ddof=1) / np.sqrt(3)
        assert row["test acc %"] == f"{mine.mean():.2f} ± {mean_half:.2f}"
    # Holm over the two methods, by hand: the smaller p doubled, the larger one not below it.
    lo, hi = sorted(raw, key=raw.get)
    holm = {lo: min(1, 2 * raw[lo])}
    holm[hi] = min(1, max(holm[lo], raw[hi]))
    for method, p in holm.items():
        assert cells(text, method)["p (Holm)"] == ("< 0.001" if p < 0.001 else f"{p:.3f}")
    assert cells(text, "baseline")["verdict"] == "reference"
    assert "paired t-test" in text and "0.5 pp" in text


def test_margin_changes_the_equivalence_verdict(store):
    # With a margin far wider than any difference here, every non-significant method is "equivalent".
    assert main(["report", str(store), "--name", "tiny-400", "--margin", "50"]) == 0
    text = (store / "leaderboard.md").read_text()
    assert {cells(text, m)["verdict"] for m in ("ses", "shade")} <= {"equivalent", "better", "worse"}
    assert "|Δ| < 50 pp" in text


def test_bad_margin_and_missing_store_are_one_line_errors(store, tmp_path, capsys):
    before = sorted(p.name for p in store.iterdir())
    assert main(["report", str(store), "--name", "tiny-400", "--margin", "0"]) == 2
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--margin" in err[0] and "holds no store" in err[1]
    assert sorted(p.name for p in store.iterdir()) == before  # nothing written


def test_export_csv_has_one_row_per_final_run_with_hparams_and_metrics(store):
    assert main(["export", str(store), "--name", "tiny-400"]) == 0
    df = pd.read_csv(store / "results.csv")
    acc = test_acc(store)
    assert len(df) == 9 and set(df.method) == {"baseline", "ses", "shade"}
    assert {"dataset", "model", "method", "seed", "test_acc", "val_acc", "train_acc", "gap", "test_ece"} <= set(df)
    assert (df.dataset == "mnist1d").all() and (df.model == "cnn1d").all() and (df.train_size == 400).all()
    assert df.loc[df.method == "ses", "hp.beta"].eq(0.7).all() and df.loc[df.method == "shade", "hp.beta"].isna().all()
    for row in df.itertuples():
        assert row.test_acc == pytest.approx(acc[row.method][row.seed])  # fractions, as stored
    assert any(c.startswith("erank/") for c in df.columns)


def test_export_parquet_or_a_one_line_hint(store, capsys):
    code = main(["export", str(store), "--name", "tiny-400", "--format", "parquet"])
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        assert code == 2 and "pip install pyarrow" in capsys.readouterr().err
        assert not (store / "results.parquet").exists()
        return
    assert code == 0
    assert pd.read_parquet(store / "results.parquet").shape[0] == 9


def test_summary_ranks_methods_across_the_stores_benchmarks(store, tmp_path):
    summary = tmp_path / "summary"
    assert main(["report", str(store), "--summary", str(summary)]) == 0
    text = (summary / "summary.md").read_text()
    # Independent mean ranks: per benchmark, rank the seed means (1 = best), then average.
    ranks = []
    for bench in ("tiny-200", "tiny-400"):
        means = pd.Series({m: np.mean(list(v.values())) for m, v in test_acc(store, bench).items()})
        ranks.append(sps.rankdata(-means.to_numpy()))
        ranks[-1] = pd.Series(ranks[-1], index=means.index)
    mean_rank = (ranks[0] + ranks[1]) / 2
    for method, r in mean_rank.items():
        assert f"| {method} | {r:.2f} |" in text
    chi2 = sps.friedmanchisquare(*[[rk[m] for rk in ranks] for m in mean_rank.index]).statistic
    assert f"Friedman χ² = {chi2:.2f}" in text
    assert (summary / "figures" / "critical_difference.png").read_bytes()[:4] == b"\x89PNG"
    assert not (store / "leaderboard.md").exists()  # two benchmarks in one store: neither overwrites the other


def test_figures_module_needs_no_store_and_no_torch():
    import subprocess
    import sys

    code = "import sys, regbench.figures, regbench.report; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd="/")
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


def test_mlflow_mirror_compares_methods_on_parent_runs_and_stays_in_out(store, tmp_path, monkeypatch):
    """sync-mlflow + report on the stored benchmark: a real SQLite MLflow store under OUT (nothing trains)."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # artifacts must not land in the current directory
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{store / 'mlflow.db'}"
    assert main(["sync-mlflow", str(store), "--name", "tiny-400"]) == 0
    assert main(["report", str(store), "--name", "tiny-400", "--tracking-uri", uri]) == 0
    client = MlflowClient(uri)
    active = client.search_experiments(view_type=ViewType.ACTIVE_ONLY)
    assert [e.name for e in active] == ["tiny-400"]  # no stray "Default" experiment
    exp = active[0]
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # a model-training experiment
    assert not list(elsewhere.iterdir()) and (store / "mlartifacts").is_dir()
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = {r.data.tags["regbench.parent"]: r for r in runs if "regbench.parent" in r.data.tags}
    acc = test_acc(store)
    for method in ("baseline", "ses", "shade"):
        m = parents[method].data.metrics
        values = np.array(list(acc[method].values()))
        low, high = sps.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=sps.sem(values))
        assert m["test_acc"] == pytest.approx(values.mean()) and parents[method].data.tags["n_seeds"] == "3"
        assert (m["test_acc_ci_low"], m["test_acc_ci_high"]) == pytest.approx((low, high))
        assert "leaderboard.md" in [a.path for a in client.list_artifacts(parents[method].info.run_id)]
    assert parents["ses"].data.params["hparams.beta"] == "0.7" and "delta_test_acc" in parents["ses"].data.metrics
    child = next(r for r in runs if r.data.tags.get("regbench.method") == "ses" and "mlflow.parentRunId" in r.data.tags)
    assert not [k for k in child.data.metrics if k.startswith("final/")]  # each metric once
    with sqlite3.connect(store / "regbench.db") as db:
        configs = [json.loads(v) for (v,) in db.execute("select value_json from trial_user_attributes "
                                                         "where key='config'")]
    configured = {json.loads(c)["lr"] for c in configs}
    assert len(configured) == 1 and "lr" not in child.data.metrics  # the configured rate is the param, not a metric
    assert float(child.data.params["lr"]) == configured.pop()
    assert len(client.get_metric_history(child.info.run_id, "scheduled_lr")) == 3  # the schedule, one per epoch


# --- issue 20: small-n cells, figures that draw what they say, export a pandas user trusts --------------------

def test_cells_for_one_two_and_three_seeds_and_timings():
    from regbench.report import mean_cell, timing_cell

    assert mean_cell(pd.Series([0.692]), 100) == "69.20"
    assert mean_cell(pd.Series([0.60, 0.784]), 100) == "69.20"  # 2 seeds: no ± 45.74 from t = 12.7
    three = np.array([0.60, 0.784, 0.692]) * 100
    half = sps.t.ppf(0.975, 2) * three.std(ddof=1) / np.sqrt(3)
    assert mean_cell(pd.Series([0.60, 0.784, 0.692]), 100) == f"{three.mean():.2f} ± {half:.2f}"
    assert timing_cell(pd.Series([3.5, 0.2, 7.1])) == "3.500 (0.200–7.100)"  # median (range): never negative
    assert timing_cell(pd.Series([2.0])) == "2.000" and "±" not in timing_cell(pd.Series([0.1, 7.0]))


def test_two_seed_leaderboard_says_so_in_words_and_prints_dashes_with_reasons(store):
    import optuna

    storage = f"sqlite:///{store / 'regbench.db'}"
    bench = optuna.load_study(study_name="tiny-400", storage=storage)
    spec = bench.user_attrs["spec"]
    bench.set_user_attr("spec", {**spec, "seeds": [0, 1]})  # the same real runs, read as a 2-seed benchmark
    assert main(["report", str(store), "--name", "tiny-400"]) == 0
    text = (store / "leaderboard.md").read_text()
    assert "Too few seeds for statistics: 2 seeds" in text
    for method in ("baseline", "ses", "shade"):
        row = cells(text, method)
        assert row["seeds"] == "2" and "±" not in row["test acc %"] and "±" not in row["ECE %"]
        assert "±" not in row["s/epoch"] and "(" in row["s/epoch"]
    shade = cells(text, "shade")
    assert shade["Hedges' g"] == "–" and shade["p (Holm)"] == "–" and "[" not in shade["Δ test vs baseline (pp) [95 % CI]"]
    assert "- shade: 2 seed(s) here and 2 for the reference" in text and "Hedges' g is undefined" in text


def _run(method, hparams, history, metrics=None, layers=("block3.act", "pool")):
    return {"method": method, "seed": 0, "config": {"hparams": hparams}, "history": history,
            "layers": list(layers), "metrics": metrics or {}}


def test_ses_target_is_drawn_for_any_layer_rule_and_composites_never_for_another_methods_beta():
    from regbench.report_figures import _erank_history, erank_caption

    h = [{"epoch": 1, "erank/block3.act": 5.0, "width/block3.act": 128, "erank/pool": 5.0, "width/pool": 128,
          "ses_entropy/pool": 1.6}]
    df = pd.DataFrame([_run("ses", {"beta": 0.5, "layers": "pool"}, h),  # a tuned SES: layers never "auto"
                       _run("ses+spectral_norm", {"ses.beta": 0.6, "ses.layers": "all"}, h),
                       _run("confidence_penalty", {"beta": 0.1}, h)])  # its beta is no SES target
    _, targets = _erank_history(df)
    got = {(t.method, t.layer): t.target for t in targets.itertuples()}
    assert got == {("ses", "pool"): pytest.approx(128 ** 0.5), ("ses+spectral_norm", "pool"): pytest.approx(128 ** 0.6)}
    caption = erank_caption(df, targets, {"block3.act": ["block3.act"], "pool": ["pool"]})
    assert "of ses, ses+spectral_norm" in caption and "confidence_penalty" not in caption
    no_width = pd.DataFrame([_run("ses", {"beta": 0.7, "layers": "all"}, [{"epoch": 1, "erank/pool": 3.0}],
                                  layers=("pool",))])
    words = erank_caption(no_width, _erank_history(no_width)[1], {"pool": ["pool"]})
    assert "predates" not in words and "recorded no width" in words  # the reason read from the runs


def test_identical_layer_series_become_one_panel():
    from regbench.report_figures import merge_identical_layers

    rows = [{"method": m, "seed": s, "epoch": e, "layer": layer, "erank": 1.0 + e + s + (layer == "block2.act")}
            for m in ("baseline", "ses") for s in (0, 1) for e in (1, 2) for layer in ("block2.act", "block3.act",
                                                                                        "pool")]
    merged = merge_identical_layers(pd.DataFrame(rows))
    assert list(dict.fromkeys(merged.layer)) == ["block2.act", "block3.act = pool"]
    assert len(merged) == len(rows)


def test_accuracy_axis_stays_within_0_and_100_percent():
    from regbench.figures import percent_limits

    summary = pd.DataFrame({"method": ["a"], "mean": [0.97], "ci_low": [0.80], "ci_high": [1.14]})
    low, high = percent_limits(pd.Series([95.0, 99.0]), summary)
    assert 0 <= low < 80 and high == 100.0


def test_export_has_configured_lr_named_last_epoch_values_and_integer_columns(store):
    assert main(["export", str(store), "--name", "tiny-400"]) == 0
    df = pd.read_csv(store / "results.csv")
    with sqlite3.connect(store / "regbench.db") as db:
        configured = {json.loads(json.loads(v))["lr"] for (v,) in db.execute(
            "select value_json from trial_user_attributes where key='config'")}
    assert set(df.lr) == configured  # the configured peak rate, not the schedule's last value
    assert "last_epoch_lr" in df and (df.last_epoch_lr != df.lr).all() and "seconds" not in df
    assert {"last_epoch_seconds", "seconds_per_epoch", "epochs_trained"} <= set(df)
    text = (store / "results.csv").read_text()
    header = text.splitlines()[0].split(",")
    ses_row = next(line.split(",") for line in text.splitlines() if ",ses," in line)
    assert ses_row[header.index("hp.rank")] == "32" and ses_row[header.index("hp.scale_by_k")] == "False"
    from regbench.report import export_frame
    from regbench.store import open_storage

    frame = export_frame(open_storage(f"sqlite:///{store / 'regbench.db'}"), "tiny-400")
    assert str(frame["hp.rank"].dtype) == "Int64" and str(frame["seed"].dtype) == "Int64"


def test_an_interval_that_excludes_zero_beside_a_holm_ns_is_explained():
    """digits-cnn-shift (regenerated for issue 20) printed shade's Δ as -0.33 [-0.62, -0.05] beside p (Holm) 0.075,
    ns: the interval is per comparison, the p adjusted for the table's several. The legend must say which is which."""
    from regbench import stats
    from regbench.report import _legend

    rows = [{"method": m, "seed": s, "test_acc": v} for m, values in
            {"baseline": [0.90, 0.86, 0.93], "a": [0.897, 0.855, 0.9275], "b": [0.905, 0.862, 0.936]}.items()
            for s, v in enumerate(values)]
    table = stats.compare(pd.DataFrame(rows), "test_acc", reference="baseline")
    a = table.set_index("method").loc["a"]
    assert a.delta_ci_high < 0 and a.p_holm >= 0.05  # the case: the unadjusted interval excludes 0, Holm says ns
    legend = " ".join(_legend(table, 0.5, False))
    assert "not adjusted" in legend and "Holm-adjusted p is ≥ 0.05" in legend


def test_summary_says_when_no_ranking_could_be_significant(store, tmp_path):
    """Two benchmark cells and three methods (reports/summary): even identical rankings in both cells give the
    Friedman test χ² = N(k − 1) = 4, p = 0.135, so the summary must say the test cannot reject, not just print p."""
    assert main(["report", str(store), "--summary", str(tmp_path / "s")]) == 0
    text = (tmp_path / "s" / "summary.md").read_text()
    floor = sps.chi2.sf(2 * (3 - 1), 3 - 1)
    assert floor > 0.05 and f"N(k − 1) = 4, p = {floor:.3f}" in text and "no ranking can be significant" in text


def test_erank_figure_gives_each_of_13_methods_its_own_colour_and_keeps_the_legend_off_the_panels():
    """reports/mnist1d-cnn1d-all (13 methods): the default palette cycled after 10 colours, so ses and
    ses+spectral_norm (and the SES target line) were the same orange, and the legend covered the first panel."""
    from regbench.figures import erank_figure, method_palette

    methods = ["baseline", "ses", "shade", "spectral_norm", "dropout", "weight_decay", "dln_entropy",
               "confidence_penalty", "label_smoothing", "decov", "vicreg_reg", "ses+spectral_norm", "shade+dropout"]
    assert len({tuple(c) for c in method_palette(methods).values()}) == len(methods)
    history = pd.DataFrame([{"method": m, "seed": s, "epoch": e, "layer": layer, "erank": 2.0 + e + i / 10 + s}
                            for i, m in enumerate(methods) for s in (0, 1) for e in (1, 2)
                            for layer in ("block1.act", "pool")])
    fig = erank_figure(history, pd.DataFrame([{"method": "ses", "layer": "pool", "target": 5.0}]))
    assert all(ax.get_legend() is None for ax in fig.axes) and len(fig.legends) == 1
    assert [t.get_text() for t in fig.legends[0].get_texts()] == methods
