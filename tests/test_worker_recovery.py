"""A worker killed mid-trial (issue 22, item 2), with real `regbench worker` processes on PostgreSQL and on a shared
SQLite file: a new worker started before the grace period works on around the dead trial, one started after it
joins; once the dead trial's heartbeat is older than the grace period (shortened to 3 s through the benchmark's stored
``heartbeat`` setting, which every worker applies) it is recorded FAIL with its reason and retried once with the same
params, resuming from its checkpoint, and the sweep completes with exact counts. Before issue 17/22 the worker that
found the stale trial crashed (UpdateFinishedTrialError) and the dead trial stayed FAIL without a reason."""
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from helpers import regbench_cli
from optuna.trial import TrialState
from sqlalchemy import text
from test_protocol import check_sweep, tune_study

GRACE = 3  # seconds without a heartbeat before a running trial counts as dead (default 30)
PLAN = ["--methods", "shade", "--trials", "2", "--seeds", "1", "--dataset", "digits", "--model", "mlp",
        "--epochs", "6", "--batch-size", "16", "--train-size", "300", "--quiet", "--pruner", "none", "--plan-only",
        "--no-tune-shared", "--untuned", "baseline"]
# A shade tuning trial running with its params drawn: the moment to kill its worker (polled with plain SQL, one
# connection, every 20 ms: a tuning trial here lasts about a second)
RUNNING_TUNING = text("SELECT t.number FROM trials t JOIN studies s ON s.study_id = t.study_id WHERE s.study_name "
                      "LIKE :pattern AND t.state = 'RUNNING' AND EXISTS (SELECT 1 FROM trial_params p WHERE "
                      "p.trial_id = t.trial_id)")


def _trials(storage: str, name: str) -> list:
    try:
        return optuna.load_study(study_name=name, storage=storage).get_trials()
    except KeyError:
        return []


@pytest.fixture(params=["postgresql", "sqlite"])
def storage_url(request, tmp_path):
    if request.param == "postgresql":
        return request.getfixturevalue("postgres_url")
    return f"sqlite:///{tmp_path / 'shared.db'}"


def test_a_killed_worker_s_trial_is_retried_once_after_the_grace_period(storage_url, tmp_path):
    name = f"kill-{uuid.uuid4().hex[:8]}"
    planned = regbench_cli("run", *PLAN, "--storage", storage_url, "--name", name, "--out", str(tmp_path / "out"),
                           cwd=tmp_path)
    assert planned.returncode == 0, planned.stderr
    root = optuna.load_study(study_name=name, storage=storage_url)
    root.set_user_attr("spec", {**root.user_attrs["spec"], "heartbeat": {"interval": 1, "grace": GRACE}})

    script = Path(sys.executable).parent / "regbench"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    argv = [str(script), "worker", "--storage", storage_url, "--name", name, "--quiet", "--checkpoint-dir",
            str(tmp_path / "ck"), "--checkpoint-every-seconds", "0"]

    def start():
        return subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    engine = sqlalchemy.create_engine(storage_url)
    doomed, deadline, number = start(), time.time() + 300, None
    with engine.connect() as db:
        while time.time() < deadline and number is None and doomed.poll() is None:
            time.sleep(0.02)
            number = db.execute(RUNNING_TUNING, {"pattern": f"{name}:shade:tune:%"}).scalar()
            db.rollback()  # a fresh snapshot each time
    doomed.send_signal(signal.SIGKILL)
    killed_at = time.time()
    _, stderr = doomed.communicate()
    engine.dispose()
    assert doomed.returncode == -signal.SIGKILL and number is not None, stderr

    before = start()  # before the grace period: the dead trial is still RUNNING, this worker works around it
    tune = tune_study(storage_url, name, "shade")
    victim = next(t for t in _trials(storage_url, tune) if t.number == number)
    assert victim.state == TrialState.RUNNING and victim.params
    time.sleep(max(0.0, killed_at + GRACE + 1 - time.time()))
    after = start()  # after it: may be the one that finds the dead trial
    for worker in (before, after):
        out, err = worker.communicate(timeout=600)
        assert worker.returncode == 0 and "Traceback" not in err, err
        assert "has no work left" in out

    check_sweep(storage_url, name, ["baseline", "shade"], 2, [0])
    trials = _trials(storage_url, tune)
    [dead] = [t for t in trials if t.number == victim.number]
    assert dead.state == TrialState.FAIL
    assert dead.user_attrs["fail_reason"].startswith("interrupted:") and "heartbeat" in dead.user_attrs["fail_reason"]
    [retry] = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert retry.state == TrialState.COMPLETE and retry.params == victim.params
    assert retry.user_attrs["config_key"] == dead.user_attrs.get("config_key", retry.user_attrs["config_key"])
    assert not [t for t in trials if t.state == TrialState.FAIL and not t.user_attrs.get("fail_reason")]

    status = regbench_cli("status", "--storage", storage_url, "--name", name, cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    # its retry has finished: nothing is left to resume, so nothing is counted as interrupted any more
    assert "0 failed" in status.stdout and "interrupted" not in status.stdout, status.stdout
