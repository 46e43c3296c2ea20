"""`regbench run` end to end on the embedded default: store, MLflow mirror, leaderboard, resume, plugins."""
import contextlib
import io
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from helpers import TINY, regbench_cli
from regbench.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run_main(*args) -> tuple[int, str]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(list(args))
    return code, buf.getvalue()


def leaderboard_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in {"baseline", "ses", "shade", "toy_l2_logits"}:
            rows[cells[0]] = cells
    return rows


def test_leaderboard_has_a_row_per_method_with_baseline_first(tiny_run):
    out, stdout = tiny_run
    text = (out / "leaderboard.md").read_text()
    rows = leaderboard_rows(text)
    assert list(rows) == ["baseline", "ses", "shade"]
    for cells in rows.values():
        assert cells[1] == "2"                    # seeds
        assert "±" not in cells[2]                # 2 seeds: the mean alone, no interval (said in words below)
        assert float(cells[2].split("±")[0]) > 10  # learned something (chance = 10 %)
    assert rows["baseline"][3] == "—" and rows["ses"][3][0] in "+-"
    assert "Too few seeds for statistics: 2 seeds" in text
    assert text in stdout
    assert "mlflow ui --backend-store-uri sqlite:///" in stdout


def test_every_run_is_a_trial_with_config_metrics_and_provenance(tiny_run):
    out, _ = tiny_run
    storage = f"sqlite:///{out / 'regbench.db'}"
    for method in ("baseline", "ses", "shade"):
        study = optuna.load_study(study_name=f"mnist1d-cnn1d:{method}:final", storage=storage)
        trials = study.get_trials(states=(TrialState.COMPLETE,))
        assert sorted(t.user_attrs["seed"] for t in trials) == [0, 1]
        for t in trials:
            attrs = t.user_attrs
            assert len(attrs["config_key"]) == 64 and f'"method":"{method}"' in attrs["config"]
            assert len(attrs["history"]) == 2 and attrs["metrics"]["epoch"] == 2
            assert t.value == attrs["metrics"]["val_acc"]
            assert {"torch", "timm", "regbench", "device"} <= set(attrs["env"])
            assert attrs["timings"]["seconds"] > 0
            assert len(attrs["split_hash"]) == 64
    assert list((out / "splits").glob("mnist1d-*.json"))


def test_mlflow_mirror_has_parent_per_method_and_child_per_seed(tiny_run):
    out, _ = tiny_run
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mnist1d-cnn1d")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = {r.data.tags["regbench.parent"]: r for r in runs if "regbench.parent" in r.data.tags}
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert set(parents) == {"baseline", "ses", "shade"}
    assert len(children) == 6
    ses_child = next(r for r in children if r.data.tags["regbench.method"] == "ses")
    assert ses_child.data.tags["mlflow.parentRunId"] == parents["ses"].info.run_id
    assert ses_child.data.params["hparams.beta"] == "0.7"
    assert [m.step for m in client.get_metric_history(ses_child.info.run_id, "val_acc")] == [1, 2]
    assert any(k.startswith("erank/") for k in ses_child.data.metrics)
    artifacts = [a.path for a in client.list_artifacts(parents["ses"].info.run_id)]
    assert "leaderboard.md" in artifacts
    assert parents["ses"].data.params["hparams.lam"] == "0.01"
    # the UI shows real training time: a child spans its trial's timings
    study = optuna.load_study(study_name="mnist1d-cnn1d:ses:final", storage=f"sqlite:///{out / 'regbench.db'}")
    trial = next(t for t in study.trials if t.user_attrs.get("config_key") == ses_child.data.tags["regbench.config_key"])
    span = (ses_child.info.end_time - ses_child.info.start_time) / 1000
    assert span == pytest.approx(trial.user_attrs["timings"]["seconds"], abs=0.01)


def test_second_run_trains_nothing_and_prints_the_same_leaderboard(tiny_run, data_dir):
    out, first_stdout = tiny_run
    before = (out / "leaderboard.md").read_text()
    storage = f"sqlite:///{out / 'regbench.db'}"
    count = lambda: sum(len(s.get_trials()) for s in  # noqa: E731
                        (optuna.load_study(study_name=n, storage=storage) for n in optuna.get_all_study_names(storage)))
    trials_before = count()
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp_id = client.get_experiment_by_name("mnist1d-cnn1d").experiment_id
    mlflow_before = sorted((r.info.run_id, r.info.end_time) for r in client.search_runs([exp_id], max_results=100))
    code, stdout = run_main("run", "--methods", "ses,shade", "--out", str(out), "--data-dir", str(data_dir), *TINY)
    assert code == 0
    assert count() == trials_before
    assert sorted((r.info.run_id, r.info.end_time) for r in client.search_runs([exp_id], max_results=100)) \
        == mlflow_before
    assert (out / "leaderboard.md").read_text() == before
    assert before in stdout


def test_numbers_change_when_the_seeds_change(tiny_run, data_dir, tmp_path):
    out, _ = tiny_run
    other = tmp_path / "other-seeds"
    code, _ = run_main("run", "--methods", "ses,shade", "--out", str(other), "--data-dir", str(data_dir),
                       "--epochs", "2", "--seeds", "5,6", "--quiet")
    assert code == 0
    a = leaderboard_rows((out / "leaderboard.md").read_text())
    b = leaderboard_rows((other / "leaderboard.md").read_text())
    assert all(a[m][2:] != b[m][2:] for m in a), (a, b)  # 2 seeds: means only, so compare the whole row


def test_report_regenerates_the_leaderboard_from_the_store(tiny_run, tmp_path):
    out, _ = tiny_run
    expected = (out / "leaderboard.md").read_text()
    (out / "leaderboard.md").unlink()
    code, stdout = run_main("report", str(out))
    assert code == 0 and (out / "leaderboard.md").read_text() == expected


def test_list_methods_shows_hparams_and_search_spaces():
    code, stdout = run_main("list", "methods")
    assert code == 0
    assert "ses:" in stdout and "beta ∈ [0.3, 0.9]" in stdout and "lam ∈ [0.001, 0.1] log" in stdout
    assert "shade:" in stdout and "momentum=0.8" in stdout and "baseline:" in stdout
    assert run_main("list", "datasets")[1].count("default model") >= 2
    assert "stages+pool" in run_main("list", "models")[1]


def test_third_party_method_is_discovered_through_entry_points(tmp_path, data_dir):
    """A tiny package installed (pip, into its own folder) registers a method; regbench lists and runs it."""
    target, source = tmp_path / "site", tmp_path / "plugin-src"
    shutil.copytree(ROOT / "tests" / "plugins" / "regbench_toy_method", source)  # builds leave the tree clean
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                          "--target", str(target), str(source)],
                         capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr
    env = {"PYTHONPATH": str(target)}
    listed = regbench_cli("list", "methods", env_extra=env, cwd=tmp_path)
    assert listed.returncode == 0 and "toy_l2_logits: third-party test plugin" in listed.stdout
    assert "toy_l2_logits" not in run_main("list", "methods")[1]  # not installed in this process
    ran = regbench_cli("run", "--methods", "toy_l2_logits", "--epochs", "1", "--seeds", "1", "--quiet",
                       "--out", str(tmp_path / "out"), "--data-dir", str(data_dir), env_extra=env, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert set(leaderboard_rows(ran.stdout)) == {"baseline", "toy_l2_logits"}


def test_a_closed_pipe_stops_quietly_not_as_a_bug(tmp_path):
    """`regbench list methods | head -1`: the reader closes the pipe; regbench stops without a crash report (it used
    to print 'internal error ... BrokenPipeError' and exit 70). The read end is closed before regbench writes, so the
    write always meets a closed pipe."""
    script = Path(sys.executable).parent / "regbench"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "regbench.cli"]
    child = subprocess.Popen([*cmd, "list", "methods"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    child.stdout.close()  # the reader goes away at once
    err = child.stderr.read().decode()
    assert child.wait(timeout=120) == 141 and "internal error" not in err and not err.strip(), err
