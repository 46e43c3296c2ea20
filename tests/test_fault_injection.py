"""A killed process resumes exactly (issue 17): stale trials are failed with their reason and retried once, by one of
any number of processes that find them, on every storage; and a run killed at a named point of its progress
(regbench/faults.py) is finished by reruns with every final run once and the tuning budget exact.

These are the representative points; benchmarks/fault_sweep.py searches every point × store × grace period.
Real training (digits + mlp, 1 epoch), real SQLite/PostgreSQL/journal stores, real subprocesses killed with SIGKILL."""
import contextlib
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

from regbench import store
from regbench.record import HEARTBEAT as BEAT_ATTR
from regbench.record import INTERRUPTED
from regbench.store import open_storage


# ---- the stale-trial recovery itself, on real storages -----------------------------------------------------------

def _url(kind: str, tmp_path: Path, postgres) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'shared.db'}"
    if kind == "journal":
        return f"journal:{tmp_path / 'shared.log'}"
    return postgres


def _age_heartbeat(storage, trial_id: int, beat: bool = True) -> None:
    """Make a RUNNING trial look dead: its last heartbeat an hour old (or, ``beat=False``, none ever stored: killed
    between its claim and its first beat), written straight into the real storage."""
    if isinstance(storage, store.JournalStore):
        assert beat, "the journal logs no way to remove a beat"
        storage.set_trial_system_attr(trial_id, BEAT_ATTR, time.time() - 3600)
        return
    with storage.engine.begin() as con:
        if beat:
            con.execute(sqlalchemy.text("UPDATE trial_heartbeats SET heartbeat = heartbeat - INTERVAL '1 hour' "
                                        "WHERE trial_id = :t" if storage.engine.name == "postgresql" else
                                        "UPDATE trial_heartbeats SET heartbeat = datetime(heartbeat, '-1 hour') "
                                        "WHERE trial_id = :t"), {"t": trial_id})
        else:
            con.execute(sqlalchemy.text("DELETE FROM trial_heartbeats WHERE trial_id = :t"), {"t": trial_id})


def _dead_trial(url: str, name: str, beat: bool = True):
    """A study with one trial claimed by a process that then died: RUNNING, params and config key written."""
    storage = open_storage(url)
    study = optuna.create_study(study_name=name, storage=storage)
    study.enqueue_trial({"seed": 3}, user_attrs={"config_key": "k3", "kind": "final"})
    trial = study.ask()
    trial.suggest_int("seed", 0, 10)
    trial.set_user_attr("env", {"worker": "dead"})
    storage.record_heartbeat(trial._trial_id)
    _age_heartbeat(storage, trial._trial_id, beat)
    return trial.number


@pytest.mark.parametrize("kind, beat", [("sqlite", True), ("sqlite", False), ("journal", True),
                                        ("postgresql", True), ("postgresql", False)])
def test_a_stale_trial_is_failed_with_its_reason_and_retried_once_by_one_of_two_workers(kind, beat, tmp_path,
                                                                                          request):
    url = _url(kind, tmp_path, request.getfixturevalue("postgres_url") if kind == "postgresql" else None)
    name = f"stale-{uuid.uuid4().hex[:8]}"
    number = _dead_trial(url, name, beat)
    # Two workers find the same stale trial at the same moment (Optuna's own check at the start of each optimize).
    storages = [open_storage(url) for _ in range(2)]
    studies = [optuna.load_study(study_name=name, storage=storage) for storage in storages]
    if not beat:  # a trial without any heartbeat is stale once a worker has seen it so for the grace period
        for storage, study in zip(storages, studies):
            storage.grace_period = 1
            optuna.storages.fail_stale_trials(study)
        assert optuna.load_study(study_name=name, storage=url).get_trials()[0].state == TrialState.RUNNING
        time.sleep(1.2)
    barrier, errors = threading.Barrier(2), []

    def worker(study):
        barrier.wait()
        try:
            optuna.storages.fail_stale_trials(study)
        except Exception as exc:  # noqa: BLE001 - the failure under test (UpdateFinishedTrialError) is reported
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in studies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    trials = optuna.load_study(study_name=name, storage=open_storage(url)).get_trials()
    [dead] = [t for t in trials if t.number == number]
    assert dead.state == TrialState.FAIL
    assert dead.user_attrs["fail_reason"].startswith(INTERRUPTED) and "no heartbeat" in dead.user_attrs["fail_reason"]
    [copy] = [t for t in trials if t.number != number]  # exactly one retry
    assert copy.state == TrialState.WAITING and copy.system_attrs["failed_trial"] == number
    assert copy.system_attrs["fixed_params"] == {"seed": 3} and copy.user_attrs == {"config_key": "k3",
                                                                                    "kind": "final"}
    assert BEAT_ATTR not in copy.system_attrs


def test_a_retry_that_dies_too_is_a_failure_with_its_reason_and_not_retried_again(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    _dead_trial(url, "twice")
    storage = open_storage(url)
    study = optuna.load_study(study_name="twice", storage=storage)
    optuna.storages.fail_stale_trials(study)
    retry = study.ask()  # the queued copy, claimed; its process dies as well
    storage.record_heartbeat(retry._trial_id)
    _age_heartbeat(storage, retry._trial_id)
    optuna.storages.fail_stale_trials(study)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL]
    assert trials[1].user_attrs["fail_reason"].startswith("error: no heartbeat") and "retry of trial 0" in \
        trials[1].user_attrs["fail_reason"]


def test_a_retry_lost_with_the_process_that_failed_the_stale_trial_is_queued_by_the_next_one(tmp_path):
    """The recovering process itself is killed after it failed the stale trial and before it queued the copy
    (REGBENCH_FAULT_AT=recover:1): the next process queues the one retry."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    number = _dead_trial(url, "lost")
    code = ("import optuna, regbench.store as s; st = s.open_storage(%r); "
            "optuna.storages.fail_stale_trials(optuna.load_study(study_name='lost', storage=st))" % url)
    env = {**os.environ, "REGBENCH_FAULT_AT": "recover:1"}
    assert subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path).returncode == -signal.SIGKILL
    storage = open_storage(url)
    study = optuna.load_study(study_name="lost", storage=storage)
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL]  # failed, with its reason, no retry
    optuna.storages.fail_stale_trials(study)
    assert len(study.get_trials()) == 1  # too soon: the failing process may still be queueing the copy
    with storage.engine.begin() as con:
        con.execute(sqlalchemy.text("UPDATE trials SET datetime_complete = '2000-01-01 00:00:00'"))
    for _ in range(2):
        optuna.storages.fail_stale_trials(study)
    [dead, copy] = study.get_trials()
    assert dead.user_attrs["fail_reason"].startswith(INTERRUPTED)
    assert copy.state == TrialState.WAITING and copy.system_attrs["retry_history"] == [number]
    assert copy.params == dead.params and "fail_reason" not in copy.user_attrs


# ---- killed runs, resumed by reruns --------------------------------------------------------------------------------

SMALL = ["run", "--methods", "ses", "--trials", "2", "--seeds", "2", "--dataset", "digits", "--model", "mlp",
         "--epochs", "1", "--pruner", "none", "--quiet", "--no-tune-shared", "--untuned",
         "baseline"]  # 2 tuning + 2 ses finals + 2 baseline finals


def regbench(args, cwd: Path, fault: str | None = None, background: bool = False):
    script = Path(sys.executable).parent / "regbench"
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "REGBENCH_FAULT_AT")}
    env["OMP_NUM_THREADS"] = "1"
    if fault:
        env["REGBENCH_FAULT_AT"] = fault
    if background:
        return subprocess.Popen([str(script), *args], env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    return subprocess.run([str(script), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


def age_all_heartbeats(url: str) -> None:
    """The heartbeat grace period has elapsed for every trial of the store (the killed process's above all)."""
    storage = open_storage(url)
    if isinstance(storage, store.JournalStore):
        for name in optuna.get_all_study_names(storage):
            study_id = storage.get_study_id_from_name(name)
            for t in storage.get_all_trials(study_id, states=(TrialState.RUNNING,)):
                storage.set_trial_system_attr(t._trial_id, BEAT_ATTR, time.time() - 3600)
        return
    with storage.engine.connect() as con:
        running = [t for (t,) in con.execute(sqlalchemy.text("SELECT trial_id FROM trials WHERE state = 'RUNNING'"))]
    for trial_id in running:
        _age_heartbeat(storage, trial_id, beat=True)


def check_exact(url: str, bench: str, n_trials: int = 2, seeds=(0, 1)) -> None:
    """Every final run once, the tuning budget exact, each killed trial failed with its reason and retried at most
    once with the same params, nothing left running or queued."""
    storage = open_storage(url)  # a journal:PATH is not an SQLAlchemy URL
    names = optuna.get_all_study_names(storage)
    [tune_name] = [n for n in names if n.startswith(f"{bench}:ses:tune:")]
    tune = optuna.load_study(study_name=tune_name, storage=storage).get_trials()
    reasons = [(t.number, t.state.name, t.user_attrs.get("fail_reason")) for t in tune]
    trained = [t for t in tune if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(trained) == n_trials, reasons
    for t in tune:
        assert t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL), reasons
        reason = str(t.user_attrs.get("fail_reason", ""))
        if t.state == TrialState.FAIL:
            assert reason.startswith((INTERRUPTED, "skipped:")), reasons
        if reason.startswith(INTERRUPTED) and t.params:
            retries = [r for r in tune if r.system_attrs.get("failed_trial") == t.number
                       or r.user_attrs.get("resumes_trial") == t.number]
            assert len(retries) == 1 and retries[0].params == t.params, reasons
    for method in ("baseline", "ses"):
        finals = optuna.load_study(study_name=f"{bench}:{method}:final", storage=storage).get_trials()
        done = [t for t in finals if t.state == TrialState.COMPLETE]
        assert sorted(t.user_attrs["seed"] for t in done) == list(seeds), [(t.number, t.state) for t in finals]
        assert not [t for t in finals if t.state in (TrialState.RUNNING, TrialState.WAITING)]
        for t in finals:
            if t.state == TrialState.FAIL:
                assert str(t.user_attrs.get("fail_reason", "")).startswith((INTERRUPTED, "skipped:")), \
                    [(t.number, t.state, t.user_attrs.get("fail_reason")) for t in finals]


def kill_then_finish(tmp_path: Path, fault: str, storage: str | None, grace_elapsed: bool, name: str) -> Path:
    """Run the small sweep with the fault armed (it must die by SIGKILL), then rerun it unarmed until it exits 0 (at
    most twice more); returns the output dir."""
    out = tmp_path / "out"
    args = [*SMALL, "--out", str(out), "--name", name, *(["--storage", storage] if storage else [])]
    first = regbench(args, tmp_path, fault)
    assert first.returncode == -signal.SIGKILL, f"{fault}: the sweep ended before the fault ({first.stderr[-2000:]})"
    url = storage or f"sqlite:///{out / 'regbench.db'}"
    if grace_elapsed:
        age_all_heartbeats(url)
    again = regbench(args, tmp_path)
    assert again.returncode == 0, f"{fault}: {again.stderr[-3000:]}"
    assert "Traceback" not in again.stderr
    check_exact(url, name)
    status = regbench(["status", "--storage", url, "--name", name], tmp_path)
    assert status.returncode == 0 and re.findall(r"(\d+) failed", status.stdout), status.stderr
    assert set(re.findall(r"(\d+) failed", status.stdout)) == {"0"}, status.stdout  # interrupted is not failed
    return out


def test_rerun_after_kill_on_a_given_sqlite_store_once_the_grace_period_passed(tmp_path):
    """The issue's reproduction: `run --storage sqlite:///…` killed while a trial runs (polled, not slept), its
    heartbeat then older than the grace period; the rerun crashed in the stale-trial callback (exit 1,
    UpdateFinishedTrialError) and the killed trial stayed FAIL without a reason or a retry."""
    db = tmp_path / "given" / "bench.db"
    db.parent.mkdir()
    url = f"sqlite:///{db}"
    args = [*SMALL, "--epochs", "3", "--out", str(tmp_path / "out"), "--storage", url]
    proc = regbench(args, tmp_path, background=True)
    deadline, running = time.time() + 300, []
    while time.time() < deadline and not running and proc.poll() is None:
        time.sleep(0.1)
        with contextlib.suppress(sqlite3.Error):  # read-only: the run may be creating the schema
            with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as con:
                running = con.execute("SELECT t.trial_id FROM trials t JOIN trial_heartbeats h USING (trial_id) "
                                      "JOIN trial_params p USING (trial_id) WHERE t.state = 'RUNNING'").fetchall()
    proc.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate()
    assert proc.returncode == -signal.SIGKILL and running, stderr
    age_all_heartbeats(url)
    again = regbench(args, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    check_exact(url, "digits-mlp")
    killed = [t for n in optuna.get_all_study_names(url) for t in optuna.load_study(study_name=n, storage=url)
              .get_trials() if t._trial_id == running[0][0]]
    assert killed and killed[0].user_attrs["fail_reason"].startswith(INTERRUPTED), killed


@pytest.mark.parametrize("fault, where, grace_elapsed", [
    ("final:3", "default", False),   # the default store in --out: the output-dir lock tells the rerun it is dead
    ("mirror:5", "postgresql", True),  # halfway through mirroring a final run to MLflow, on PostgreSQL
])  # (a given SQLite store, killed inside tuning: the test above; every point x store: benchmarks/fault_sweep.py)
def test_a_sweep_killed_at_a_point_of_its_progress_is_finished_exactly_by_a_rerun(fault, where, grace_elapsed,
                                                                                  tmp_path, request):
    storage = {"default": None, "sqlite": f"sqlite:///{tmp_path / 'given.db'}",
               "postgresql": request.getfixturevalue("postgres_url") if where == "postgresql" else None}[where]
    kill_then_finish(tmp_path, fault, storage, grace_elapsed, f"fault-{uuid.uuid4().hex[:8]}")
