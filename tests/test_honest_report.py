"""Honest comparisons in the report: the summary keeps unlike protocols apart, collapsed runs are named, the power
column states its inputs, and the figures and LaTeX tables carry the table's numbers.

Real tiny runs (digits, MLP, one or two epochs, three seeds) in real SQLite stores, reported through the CLI; the
fixture store of tests/fixtures/tiny (mnist1d, two real benchmarks) where a fixed store is enough.
"""
import json
import re
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import snapshot
from scipy import stats as sps
from statsmodels.stats.power import TTestPower

from regbench.cli import main

FIXTURE = Path(__file__).parent / "fixtures" / "tiny" / "regbench.db"
DIGITS = ["--dataset", "digits", "--model", "mlp", "--methods", "dropout", "--quiet"]


def _run(out: Path, *extra: str) -> Path:
    assert main(["run", *DIGITS, "--out", str(out), *extra]) == 0
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three real benchmarks on digits/mlp: two that differ only in epochs (1 vs 2), and one whose every run
    collapses (lr 3 with a constant schedule: each seed predicts one class for ≥ 99 % of the test images)."""
    root = tmp_path_factory.mktemp("honest")
    return {"e1": _run(root / "e1", "--epochs", "1", "--seeds", "2"),
            "e2": _run(root / "e2", "--epochs", "2", "--seeds", "2"),
            "collapse": _run(root / "collapse", "--epochs", "1", "--seeds", "1,2,3", "--lr", "3",
                             "--schedule", "constant")}


@pytest.fixture
def store(tmp_path):
    out = tmp_path / "tiny"
    out.mkdir()
    shutil.copy(FIXTURE, out / "regbench.db")
    return out


def cells(text: str, method: str) -> dict[str, str]:
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| method |"))
    row = next(line for line in lines if line.startswith(f"| {method} |"))
    keys = [c.strip() for c in header.strip("|").split("|")]
    return dict(zip(keys, (c.strip() for c in row.strip("|").split("|")), strict=True))


def stored_metrics(out: Path, benchmark: str) -> dict[str, list[dict]]:
    with sqlite3.connect(out / "regbench.db") as db:
        rows = db.execute("select s.study_name, a.value_json from studies s join trials t using(study_id) "
                          "join trial_user_attributes a using(trial_id) where a.key='metrics' and t.state='COMPLETE' "
                          "and s.study_name like ?", (f"{benchmark}:%:final",)).fetchall()
    out_: dict[str, list[dict]] = {}
    for study, value in rows:
        out_.setdefault(study.split(":")[1], []).append(json.loads(value))
    return out_


# --- 3: the summary never averages unlike protocols -------------------------------------------------------------

def test_summary_keeps_benchmarks_of_different_epochs_in_separate_cells_and_says_why(runs, tmp_path):
    """Two digits/mlp benchmarks at 1 and 2 epochs: the old summary keyed cells by dataset × model × train size and
    averaged both into one cell without a word."""
    folder = tmp_path / "summary"
    assert main(["report", str(runs["e1"]), str(runs["e2"]), "--summary", str(folder)]) == 0
    text = (folder / "summary.md").read_text()
    lines = text.splitlines()
    assert [line.split(" | ")[4] for line in lines if line.startswith(("| C1 |", "| C2 |"))] == ["full", "full"]
    assert "2 benchmark cell(s)" in text
    assert "Kept apart on digits/mlp: cells C1, C2 differ in epochs: 1 (C1) vs 2 (C2)" in text
    # The mean ranks are those of two cells, each ranked on its own benchmark's seed means.
    ranks = []
    for out in (runs["e1"], runs["e2"]):
        means = pd.Series({m: np.mean([r["test_acc"] for r in rs]) for m, rs in stored_metrics(out, "digits-mlp")
                          .items()})
        ranks.append(pd.Series(sps.rankdata(-means.to_numpy()), index=means.index))
    for method in ("baseline", "dropout"):
        row = next(line for line in text.splitlines() if line.startswith(f"| {method} |"))
        assert row.split("|")[2].strip() == f"{(ranks[0][method] + ranks[1][method]) / 2:.2f}"


def test_summary_over_benchmarks_with_nothing_in_common_is_one_line_and_writes_nothing(runs, store, tmp_path, capsys):
    """digits (baseline, dropout) and the fixture's mnist1d benchmarks (baseline, ses, shade) share one method: no
    two methods can be ranked in more than one cell."""
    before = {p: snapshot(p) for p in (runs["e1"], store)}
    code = main(["report", str(runs["e1"]), str(store), "--summary", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "nothing in common" in err[0] and "digits-mlp (digits/mlp: baseline, " \
        "dropout)" in err[0] and "--methods" in err[0]
    assert not (tmp_path / "s").exists() and {p: snapshot(p) for p in before} == before


# --- 4: collapsed runs are named ------------------------------------------------------------------------------------

def test_every_run_records_how_its_test_predictions_spread_over_classes(runs):
    for metrics in [m for ms in stored_metrics(runs["e1"], "digits-mlp").values() for m in ms]:
        assert metrics["num_classes"] == 10 and metrics["test_count"] == sum(metrics["test_reliability"]["count"])
        assert 1 <= metrics["test_pred_classes"] <= 10 and 0 < metrics["test_majority_frac"] <= 1


def test_a_collapsed_benchmark_reads_collapsed_not_inconclusive_and_warns_of_its_baseline(runs):
    out = runs["collapse"]
    for rs in stored_metrics(out, "digits-mlp").values():  # the case: every run predicts (almost) one class
        assert all(r["test_majority_frac"] >= 0.99 or r["test_acc"] < 0.13 for r in rs)
    assert main(["report", str(out)]) == 0
    text = (out / "leaderboard.md").read_text()
    assert cells(text, "dropout")["verdict"] == "collapsed"  # was "inconclusive"
    assert "⚠ 3/3 collapsed" in cells(text, "baseline")["test acc %"]
    assert "the reference `baseline` collapsed in every run" in text and "no comparison with it is meaningful" in text
    assert text.count("\n- dropout seed ") == 3 and "Collapsed runs:" in text


def test_mlflow_descriptions_say_collapsed_as_the_leaderboard_does(runs):
    """The parent runs' Description carries the leaderboard's verdict word for word: a method all of whose runs
    collapsed reads "collapsed", and the collapsed reference says that no comparison against it means anything."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{runs['collapse'] / 'mlflow.db'}")
    [experiment] = [e for e in client.search_experiments() if e.name == "digits-mlp"]
    notes = {r.data.tags["regbench.parent"]: r.data.tags.get("mlflow.note.content", "")
             for r in client.search_runs([experiment.experiment_id], "tags.`regbench.parent` != ''")}
    assert notes["dropout"].startswith("collapsed"), notes["dropout"]
    assert notes["baseline"].startswith("collapsed in every run"), notes["baseline"]


def test_the_per_seed_figure_of_a_collapse_draws_chance_from_zero_and_marks_each_run(runs):
    from regbench import degenerate, figures, report, stats
    from regbench.store import load_spec, open_storage

    storage = open_storage(f"sqlite:///{runs['collapse'] / 'regbench.db'}")
    df = report.runs_frame(storage, "digits-mlp", load_spec(storage, "digits-mlp"))
    df["degenerate"] = degenerate.flags(df)
    summary = stats.compare(df, "test_acc")[["method", "mean", "ci_low", "ci_high"]]
    fig = figures.seed_points_figure(df[["method", "seed"]].assign(value=df.test_acc,
                                                                   degenerate=df.degenerate.astype(bool)),
                                     summary, chance=degenerate.chance_level(df))
    ax = fig.axes[0]
    assert ax.get_ylim()[0] == 0 and ax.get_ylim()[1] >= 20  # not zoomed to 9.8–10.6 %
    assert any(list(line.get_ydata()) == [10.0, 10.0] and line.get_linestyle() == "--" for line in ax.lines)
    crosses = [c for c in ax.collections if c.get_label() == "collapsed run"]
    assert len(crosses) == 1 and len(crosses[0].get_offsets()) == 6


def test_old_stores_without_the_prediction_spread_fall_back_to_the_binomial_test_against_chance(runs):
    from regbench import degenerate

    metrics = stored_metrics(runs["collapse"], "digits-mlp")["baseline"]
    for m in metrics:
        old = {k: v for k, v in m.items() if k not in ("test_pred_classes", "test_majority_frac", "test_count",
                                                       "num_classes")}
        n = sum(old["test_reliability"]["count"])
        p = sps.binomtest(round(old["test_acc"] * n), n, 0.1, alternative="greater").pvalue
        assert bool(degenerate.assess(old, "digits")) == (p >= 0.05)
    learned = stored_metrics(runs["e2"], "digits-mlp")["baseline"][0]
    assert learned["test_acc"] > 0.3 and degenerate.assess(learned, "digits") == ""


# --- 5: power, honestly ---------------------------------------------------------------------------------------------

def test_power_column_is_the_detectable_effect_at_holms_strictest_alpha(store):
    """The old column extrapolated 'seeds for 80 % power' from a Δ estimated on 3 pairs at unadjusted α (404 seeds
    for shade, > 1000 for ses in the fixture). Now: the smallest Δ these seeds detect, at α/m, no effect assumed."""
    assert main(["report", str(store), "--name", "tiny-400"]) == 0
    text = (store / "leaderboard.md").read_text()
    column = "detectable Δ (pp), 80 % power, α = 0.025"
    assert column in text and "seeds for 80 % power" not in text and "α = 0.05/2 = 0.025" in text
    with sqlite3.connect(store / "regbench.db") as db:
        rows = db.execute("select s.study_name, a.value_json, b.value_json from studies s join trials t "
                          "using(study_id) join trial_user_attributes a using(trial_id) join trial_user_attributes b "
                          "using(trial_id) where a.key='metrics' and b.key='config' and t.state='COMPLETE' and "
                          "s.study_name like 'tiny-400:%:final'").fetchall()
    acc = {}
    for study, metrics, config in rows:
        acc.setdefault(study.split(":")[1], {})[json.loads(json.loads(config))["seed"]] = json.loads(metrics)["test_acc"]
    d_min = TTestPower().solve_power(effect_size=None, nobs=3, alpha=0.025, power=0.8)
    for method in ("ses", "shade"):
        diff = np.array([acc[method][s] - acc["baseline"][s] for s in sorted(acc["baseline"])])
        assert cells(text, method)[column] == f"{d_min * diff.std(ddof=1) * 100:.2f}"


# --- 6: figures and tables a paper can use ------------------------------------------------------------------------

def test_paired_differences_come_first_and_every_listed_figure_is_drawn_or_named_as_skipped(store):
    assert main(["report", str(store), "--name", "tiny-400"]) == 0
    text = (store / "leaderboard.md").read_text()
    embedded = re.findall(r"\]\(figures/([a-z_]+\.png)\)", text)
    assert embedded[0] == "paired_differences.png"
    assert (store / "figures" / "paired_differences.png").read_bytes()[:4] == b"\x89PNG"
    readme = " ".join((Path(__file__).parents[1] / "README.md").read_text().split())
    from regbench.report_figures import FIGURES

    for name in FIGURES:
        assert name in embedded or re.search(rf"^- `{re.escape(name)}` \(.+\): \S", text, re.MULTILINE), name
        assert FIGURES[name] in readme  # the README lists what the leaderboard can hold, in these words
    assert "- `corruptions.png` (corruption heatmap): no shift set was evaluated" in text


def test_paired_figure_labels_and_reliability_titles_carry_the_tables_numbers(store):
    from regbench import degenerate, figures, report, stats
    from regbench.report_figures import _reliability_bins, paired_frame, paired_rows
    from regbench.store import load_spec, open_storage

    assert main(["report", str(store), "--name", "tiny-400"]) == 0
    text = (store / "leaderboard.md").read_text()
    storage = open_storage(f"sqlite:///{store / 'regbench.db'}")
    df = report.runs_frame(storage, "tiny-400", load_spec(storage, "tiny-400"))
    df["degenerate"] = degenerate.flags(df)
    fig = figures.reliability_figure(_reliability_bins(df), {m: df.ece[df.method == m].mean() for m in set(df.method)})
    for ax in fig.axes:
        if ax.get_visible() and ax.get_title():
            method, ece = re.fullmatch(r"(\S+) \(mean ECE ([0-9.]+) %\)", ax.get_title()).groups()
            assert cells(text, method)["ECE %"].split(" ± ")[0] == ece  # was the pooled ECE (another number)
    rows = paired_rows(stats.compare(df, "test_acc").set_index("method"), "baseline")
    fig = figures.paired_differences_figure(paired_frame(df, "baseline"), rows, 0.5)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()][::-1]  # drawn top to bottom
    assert labels == [f"{m}  {cells(text, m)['Δ test vs baseline (pp) [95 % CI]']}" for m in ("ses", "shade")]


def test_erank_figure_with_13_methods_has_no_bands_and_no_two_alike_lines():
    """reports/mnist1d-cnn1d-all: thirteen bootstrap bands overlapped into one grey band and every line was solid."""
    from matplotlib.collections import PolyCollection
    from matplotlib.colors import to_rgb

    from regbench.figures import erank_figure

    methods = ["baseline", "ses", "shade", "spectral_norm", "dropout", "weight_decay", "dln_entropy",
               "confidence_penalty", "label_smoothing", "decov", "vicreg_reg", "ses+spectral_norm", "shade+dropout"]
    history = pd.DataFrame([{"method": m, "seed": s, "epoch": e, "layer": layer, "erank": 2.0 + e + i / 10 + s}
                            for i, m in enumerate(methods) for s in (0, 1) for e in (1, 2, 3)
                            for layer in ("block1.act", "pool")])
    fig = erank_figure(history, pd.DataFrame(columns=["method", "layer", "target"]))
    ax = fig.axes[0]
    assert not [c for c in ax.collections if isinstance(c, PolyCollection)]
    lines = [ln for ln in ax.lines if len(ln.get_xdata()) == 3]
    assert len(lines) == 13
    assert len({tuple(np.round(to_rgb(ln.get_color()), 3)) for ln in lines}) == 13  # colours
    assert len({ln.get_marker() for ln in lines}) == 13  # and markers
    assert len({str(ln._dash_pattern) for ln in lines}) >= 8  # and dash patterns (matplotlib keeps them there)


def test_latex_tables_hold_the_markdowns_numbers_and_notes(store, tmp_path):
    from regbench import latex

    summary = tmp_path / "summary"
    assert main(["report", str(store), "--summary", str(summary), "--latex"]) == 0
    assert main(["report", str(store), "--name", "tiny-400", "--latex"]) == 0
    md, tex = (store / "leaderboard.md").read_text(), (store / "leaderboard.tex").read_text()
    for text in (tex, (summary / "summary.tex").read_text()):
        assert "\\toprule" in text and "\\midrule" in text and "\\bottomrule" in text
        depth = 0
        for c in re.sub(r"\\[{}]", "", text):  # braces balance once the escaped ones are left out
            depth += {"{": 1, "}": -1}.get(c, 0)
            assert depth >= 0
        assert depth == 0
    head, rows, _ = latex.tables(md)[0]
    for row in rows:
        line = " & ".join(latex.escape(c) for c in row) + r" \\"
        assert line in tex  # every cell of every row, in order
        assert len(line.split(" & ")) == len(head)
    assert latex.escape("19.17 ± 1.25") == r"19.17 $\pm$ 1.25" and latex.escape("\\*\\*\\* p < 0.001") == \
        r"*** p $<$ 0.001"
    legend = next(line for line in md.splitlines() if line.startswith("Mean ± half-width"))
    assert latex.escape(legend) in tex
    smd = (summary / "summary.md").read_text()
    for line in smd.splitlines():
        if line.startswith(("| baseline |", "| ses |", "| shade |", "| C1 |", "| C2 |")):
            assert " & ".join(latex.escape(c) for c in latex._cells(line)) + r" \\" in (summary / "summary.tex").read_text()


def test_latex_tables_compile_with_booktabs(store, tmp_path):
    """The fragments compile in a plain article with booktabs and graphicx (pdflatex; TeX Live's
    texlive-latex-recommended). Without pdflatex the structural test above still runs."""
    import subprocess

    if shutil.which("pdflatex") is None:
        pytest.skip("pdflatex not installed (apt-get install texlive-latex-recommended)")
    assert main(["report", str(store), "--name", "tiny-400", "--latex"]) == 0
    doc = tmp_path / "doc.tex"
    doc.write_text("\\documentclass{article}\\usepackage[T1]{fontenc}\\usepackage[utf8]{inputenc}"
                   "\\usepackage{booktabs,graphicx}\\begin{document}\\input{" + str(store / "leaderboard.tex") +
                   "}\\end{document}\n")
    done = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:]
    assert (tmp_path / "doc.pdf").stat().st_size > 1000
