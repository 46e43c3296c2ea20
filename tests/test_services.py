"""The real services: Optuna's store on PostgreSQL, and MLflow behind a real `mlflow server` on 127.0.0.1."""
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from helpers import regbench_cli

POSTGRES = os.environ.get("REGBENCH_TEST_POSTGRES_URL")


def test_postgresql_store_runs_and_resumes(tmp_path, data_dir, postgres_url):
    name = f"pg-{uuid.uuid4().hex[:8]}"
    args = ["run", "--methods", "ses", "--epochs", "1", "--seeds", "2", "--quiet", "--storage", POSTGRES,
            "--name", name, "--out", str(tmp_path / "out"), "--data-dir", str(data_dir)]
    first = regbench_cli(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    study = optuna.load_study(study_name=f"{name}:ses:final", storage=POSTGRES)
    assert sorted(t.user_attrs["seed"] for t in study.get_trials(states=(TrialState.COMPLETE,))) == [0, 1]
    again = regbench_cli(*args, cwd=tmp_path)
    assert again.returncode == 0 and len(study.get_trials()) == 2
    assert again.stdout.split("Leaderboard:")[0] == first.stdout.split("Leaderboard:")[0]
    assert not (tmp_path / "out" / "regbench.db").exists()  # the store of record is PostgreSQL


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
                             "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("mlflow server did not answer /health within 120 s")
    yield uri
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def test_runs_are_mirrored_to_a_real_mlflow_server(mlflow_server, tmp_path, data_dir):
    ran = regbench_cli("run", "--methods", "shade", "--epochs", "2", "--seeds", "2", "--quiet", "--name", "srv",
                       "--out", str(tmp_path / "out"), "--data-dir", str(data_dir),
                       env_extra={"MLFLOW_TRACKING_URI": mlflow_server}, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert f"mlflow ui --backend-store-uri {mlflow_server}" in ran.stdout
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("srv")
    runs = client.search_runs([exp.experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert sorted(r.data.tags["regbench.method"] for r in children) == ["baseline", "baseline", "shade", "shade"]
    shade = next(r for r in children if r.data.tags["regbench.method"] == "shade")
    assert [m.step for m in client.get_metric_history(shade.info.run_id, "shade_omega")] == [1, 2]
    parent = client.get_run(shade.data.tags["mlflow.parentRunId"])
    assert "leaderboard.md" in [a.path for a in client.list_artifacts(parent.info.run_id)]
    assert not (tmp_path / "out" / "mlflow.db").exists()


def test_mlflow_down_warns_once_keeps_training_then_sync_mirrors_everything(mlflow_server, tmp_path, data_dir):
    dead = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    out = tmp_path / "out"
    ran = regbench_cli("run", "--methods", "shade", "--epochs", "1", "--seeds", "2", "--quiet", "--name", "down",
                       "--out", str(out), "--data-dir", str(data_dir), env_extra={"MLFLOW_TRACKING_URI": dead},
                       cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    warnings = [line for line in ran.stderr.splitlines() if "MLflow at" in line]
    assert len(warnings) >= 1 and "sync-mlflow" in warnings[0] and "Traceback" not in ran.stderr
    assert "| shade | 2 |" in ran.stdout  # trained and reported from the store
    synced = regbench_cli("sync-mlflow", str(out), env_extra={"MLFLOW_TRACKING_URI": mlflow_server}, cwd=tmp_path)
    assert synced.returncode == 0, synced.stderr
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("down").experiment_id])
    seeds = sorted(r.data.tags["regbench.seed"] for r in runs if r.data.tags.get("regbench.kind") == "final")
    assert seeds == ["0", "0", "1", "1"]  # baseline and shade, seeds 0 and 1
    again = regbench_cli("sync-mlflow", str(out), env_extra={"MLFLOW_TRACKING_URI": mlflow_server}, cwd=tmp_path)
    assert again.returncode == 0 and "0 runs mirrored" in again.stdout  # nothing twice
    still_dead = regbench_cli("sync-mlflow", str(out), env_extra={"MLFLOW_TRACKING_URI": dead}, cwd=tmp_path)
    assert still_dead.returncode == 2 and "unreachable" in still_dead.stderr
