"""What a researcher sees in MLflow without a click, asked of MLflow's own client after a real tiny run.

One real benchmark (digits / mlp, ses against baseline, 2 epochs × 3 seeds: 2 epochs so a series can be told from a
constant, 3 seeds so the verdict has an interval and a Holm p), mirrored to a real SQLite MLflow store; every
assertion reads it back through ``MlflowClient`` (search_runs, get_run, get_metric_history, list_artifacts, the runs'
dataset inputs, the experiment's tags) and compares with the store and the leaderboard.
"""
import base64
import contextlib
import hashlib
import io
import json
import os
import zlib
from pathlib import Path

import pytest
from mlflow import MlflowClient

from regbench.cli import main

NAME = "digits-mlp"


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("glance") / "out"
    saved = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            code = main(["run", "--methods", "ses", "--dataset", "digits", "--model", "mlp", "--epochs", "2",
                         "--seeds", "3", "--out", str(out), "--data-dir", str(data_dir), "--quiet"])
        assert code == 0
    finally:
        if saved is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name(NAME)
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = {r.data.tags["regbench.parent"]: r for r in runs if "regbench.parent" in r.data.tags}
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return out, client, exp, parents, children


def spec_of(out: Path) -> dict:
    from regbench.store import load_spec, open_storage

    return load_spec(open_storage(f"sqlite:///{out / 'regbench.db'}"), NAME)


def test_every_parent_says_which_benchmark_it_belongs_to(run):
    out, _, _, parents, _ = run
    spec = spec_of(out)
    assert set(parents) == {"baseline", "ses"}
    for parent in parents.values():
        tags = parent.data.tags
        assert (tags["benchmark"], tags["dataset"], tags["model"]) == (NAME, "digits", "mlp")
        assert tags["train_size"] == "full" and tags["epochs"] == "2" and tags["seeds"] == "0,1,2"
        assert tags["trials"] == "0" and tags["tune_shared"] == "False" and tags["protocol"].startswith("no tuning")
        base = json.loads(spec["base"])
        assert f"lr {base['lr']}" in tags["recipe"] and base["optimizer"] in tags["recipe"]
        assert tags["n_seeds"] == "3" and "n_seeds" not in parent.data.metrics  # a tag: no chart spent on it


def test_parent_description_is_the_leaderboards_verdict(run):
    """The Description (``mlflow.note.content``) repeats the leaderboard's row: Δ [95 % CI], Holm p, verdict."""
    from regbench import cells, glance, report, stats
    from regbench.store import open_storage

    out, _, _, parents, _ = run
    note = parents["ses"].data.tags["mlflow.note.content"]
    row = next(line for line in (out / "leaderboard.md").read_text().splitlines() if line.startswith("| ses |"))
    cols = [c.strip() for c in row.strip("|").split("|")]
    delta, p_holm, verdict = cols[3], cols[4], cols[7]  # "+0.67 [-1.68, +3.01]", "0.346", "inconclusive"
    assert "[" in delta and p_holm != "–"
    value, interval = delta.split(" ", 1)
    assert note.startswith(f"{verdict}: {value} pp vs baseline {interval}, Holm p = {p_holm}; test acc ")
    assert parents["baseline"].data.tags["mlflow.note.content"].startswith("the reference")
    # Below 3 seeds the same function says why there is no interval or test (the leaderboard's rule).
    df = report.runs_frame(open_storage(f"sqlite:///{out / 'regbench.db'}"), NAME, spec_of(out))
    two = df[df.seed < 2]
    table = stats.compare(two, "test_acc", reference="baseline").set_index("method")
    text = glance.note("ses", two[two.method == "ses"], table.loc["ses"], "baseline")
    assert f"{table.loc['ses'].delta * 100:+.2f} pp vs baseline (no interval or test: 2 seeds" in text
    assert "Holm" not in text and cells.mean_cell(two[two.method == "ses"].test_acc, 100) in text


def test_the_dataset_is_an_mlflow_dataset_input_on_every_run(run):
    out, client, _, parents, children = run
    split = spec_of(out)["split_hash"][:12]
    indices = json.loads((out / "splits" / f"digits-{split}.json").read_text())["indices"]
    for r in [*parents.values(), *children]:
        inputs = client.get_run(r.info.run_id).inputs.dataset_inputs
        assert [(d.dataset.name, d.dataset.digest) for d in inputs] == [("digits", split)]
        assert {t.key: t.value for t in inputs[0].tags}["mlflow.data.context"] == "train/val/test"
        assert json.loads(inputs[0].dataset.source) == {"uri": f"splits/digits-{split}.json"}  # relative to OUT
    profile = json.loads(client.get_run(parents["ses"].info.run_id).inputs.dataset_inputs[0].dataset.profile)
    assert profile["num_rows"] == sum(len(v) for v in indices.values())


def test_children_log_the_device_used_and_no_absolute_data_dir(run):
    _, _, _, _, children = run
    for child in children:
        params = child.data.params
        assert params["device"] == child.data.tags["env.device"] == "cpu" and params["device_requested"] == "auto"
        assert params["data_dir"] and not os.path.isabs(params["data_dir"])


def test_series_only_for_what_changes_and_the_headline_first(run):
    _, client, _, parents, children = run
    ses = next(r for r in children if r.data.tags["regbench.method"] == "ses")
    steps = {k: [m.step for m in client.get_metric_history(ses.info.run_id, k)] for k in ses.data.metrics}
    assert steps["val_acc"] == [1, 2] and steps["train_loss"] == [1, 2]  # curves: one point per epoch
    assert steps["test_acc"] == [2] and steps["test_ece"] == [2] and steps["test_brier"] == [2]  # final-only, once
    assert steps["gap"] == [2]
    assert not [k for k in steps if k.startswith("width/")] and "ses_eigh_cupy" not in steps
    assert ses.data.params["ses_eigh_cupy"] == "0" and all(ses.data.params[f"width/{k}"] == "256"
                                                           for k in ("act1", "act2"))
    assert any(k.startswith("erank/") and len(v) == 2 for k, v in steps.items())
    assert next(iter(ses.data.metrics)) == "test_acc"  # logged first: MLflow's default picks start from it
    for parent in parents.values():
        assert next(iter(client.get_run(parent.info.run_id).data.metrics)) == "test_acc"


def test_one_comparison_figure_per_experiment_where_the_ui_shows_it(run):
    from regbench import glance, report, stats
    from regbench.store import open_storage

    out, client, exp, parents, _ = run
    home = parents["baseline"].info.run_id
    images = [a.path for a in client.list_artifacts(home, "images") if a.path.endswith(".png")]  # + a webp thumbnail
    assert len(images) == 1 and images[0].startswith("images/comparison+step+0+")
    assert not client.list_artifacts(parents["ses"].info.run_id, "images")  # one per experiment, not per method
    for parent in parents.values():
        assert "comparison.png" in [a.path for a in client.list_artifacts(parent.info.run_id)]
    # The figure is the store's numbers: redrawn from them it is the same bytes as the one logged.
    df = report.runs_frame(open_storage(f"sqlite:///{out / 'regbench.db'}"), NAME, spec_of(out))
    from regbench import degenerate

    df["degenerate"] = degenerate.flags(df)
    table = stats.compare(df, "test_acc", reference="baseline", margin=0.005).set_index("method")
    png = glance.comparison_png(df, table, "baseline", 0.5)
    assert hashlib.sha256(png).hexdigest() == client.get_run(home).data.tags[glance.FIGURE_DIGEST_TAG]
    # The experiment: the headline is its primary metric, its description starts with the verdicts and embeds the
    # figure, and a saved view shows the headline columns and opens the chart view on the figure.
    tags = client.get_experiment(exp.experiment_id).tags
    assert tags["mlflow.experiment.primaryMetric.name"] == "test_acc"
    first = tags["mlflow.note.content"].splitlines()[0]
    assert first.startswith(f"**{NAME}**, test accuracy vs baseline: ses ") and "pp (" in first
    assert f"get-artifact?path=comparison.png&run_uuid={home}" in tags["mlflow.note.content"]
    view = json.loads(tags["mlflow.sharedViewState.regbench"])
    assert view["name"] == glance.VIEW_NAME and view["state"].startswith("deflate;")
    state = json.loads(zlib.decompress(base64.b64decode(view["state"].removeprefix("deflate;"))))
    assert state["selectedColumns"][:3] == ["metrics.`test_acc`", "metrics.`delta_test_acc`",
                                            "attributes.`Description`"]
    charts = state["compareRunCharts"]
    assert charts[0]["type"] == "IMAGE" and charts[0]["imageKeys"] == ["comparison"]
    assert [c["metricKey"] for c in charts[1:3]] == ["test_acc", "delta_test_acc"]


def test_a_second_mirror_writes_nothing(run):
    """Mirroring again from an unchanged store changes no tag, no artifact and no view."""
    from regbench import tracking
    from regbench.store import open_storage

    out, client, exp, parents, _ = run
    before = {m: client.get_run(r.info.run_id).data.tags for m, r in parents.items()}
    views = client.get_experiment(exp.experiment_id).tags
    tracker = tracking.Tracker(f"sqlite:///{out / 'mlflow.db'}", NAME)
    tracker.show(open_storage(f"sqlite:///{out / 'regbench.db'}"), NAME)
    assert {m: client.get_run(r.info.run_id).data.tags for m, r in parents.items()} == before
    assert client.get_experiment(exp.experiment_id).tags == views
    assert len([a for a in client.list_artifacts(parents["baseline"].info.run_id, "images")
                if a.path.endswith(".png")]) == 1
