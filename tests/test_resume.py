"""Resume: a run killed mid-training (SIGKILL, no cleanup) is finished by rerunning the same command."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
from helpers import trial_states
from optuna.trial import TrialState


def states(storage: str, study: str) -> list[TrialState]:
    return [TrialState[state] for state in trial_states(Path(storage.removeprefix("sqlite:///")), study)]


def test_killed_run_resumes_without_redoing_finished_runs(tmp_path, data_dir):
    out = tmp_path / "out"
    storage = f"sqlite:///{out / 'regbench.db'}"
    args = [str(Path(sys.executable).parent / "regbench"), "run", "--methods", "ses", "--epochs", "3", "--seeds", "2",
            "--quiet", "--out", str(out), "--data-dir", str(data_dir)]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    deadline = time.time() + 120
    # Kill once baseline is done and ses is mid-training.
    while time.time() < deadline and TrialState.RUNNING not in states(storage, "mnist1d-cnn1d:ses:final"):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert states(storage, "mnist1d-cnn1d:baseline:final") == [TrialState.COMPLETE] * 2
    assert TrialState.RUNNING in states(storage, "mnist1d-cnn1d:ses:final")
    assert (out / ".regbench.pid").exists()  # left behind by the killed process; the kernel freed its lock

    again = subprocess.run(args, env=env, capture_output=True, text=True, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert states(storage, "mnist1d-cnn1d:baseline:final") == [TrialState.COMPLETE] * 2  # not redone
    ses = optuna.load_study(study_name="mnist1d-cnn1d:ses:final", storage=storage).get_trials()
    done = [t for t in ses if t.state == TrialState.COMPLETE]
    killed = [t for t in ses if t.state == TrialState.FAIL]
    assert sorted(t.user_attrs["seed"] for t in done) == [0, 1]
    assert len(killed) == 1 and killed[0].user_attrs["fail_reason"].startswith("interrupted")
    assert "| ses | 2 |" in again.stdout
    assert not (out / ".regbench.pid").exists()


def test_a_second_writer_on_the_same_output_dir_is_refused(tmp_path, data_dir):
    from regbench.store import OutputLock

    out = tmp_path / "out"
    out.mkdir()
    with OutputLock(out):
        proc = subprocess.run([str(Path(sys.executable).parent / "regbench"), "run", "--methods", "ses", "--quiet",
                               "--out", str(out), "--data-dir", str(data_dir)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert f"is in use by regbench pid {os.getpid()}" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [".regbench.lock"]  # the refused run wrote nothing


def test_more_seeds_later_trains_only_the_new_ones(tmp_path, data_dir):
    from regbench.cli import main

    out = tmp_path / "out"
    common = ["run", "--methods", "shade", "--epochs", "1", "--quiet", "--out", str(out), "--data-dir", str(data_dir)]
    assert main([*common, "--seeds", "1"]) == 0
    storage = f"sqlite:///{out / 'regbench.db'}"
    first = optuna.load_study(study_name="mnist1d-cnn1d:shade:final", storage=storage).get_trials()
    assert main([*common, "--seeds", "2"]) == 0
    trials = optuna.load_study(study_name="mnist1d-cnn1d:shade:final", storage=storage).get_trials()
    assert len(trials) == 2 and trials[0].datetime_complete == first[0].datetime_complete
    assert "| shade | 2 |" in (out / "leaderboard.md").read_text()
    # Back to one seed changes the protocol the name binds: refused, unless the new plan supersedes the old one (its
    # seed-0 runs have exactly the new plan's configuration and count for it; seed 1's are left out).
    assert main([*common, "--seeds", "1"]) == 2
    assert "| shade | 2 |" in (out / "leaderboard.md").read_text()
    assert main([*common, "--seeds", "1", "--supersede"]) == 0
    assert "| shade | 1 |" in (out / "leaderboard.md").read_text()
    assert len(optuna.load_study(study_name="mnist1d-cnn1d:shade:final", storage=storage).get_trials()) == 2


def test_a_diverging_run_is_recorded_failed_and_the_sweep_goes_on(tmp_path, data_dir, capsys):
    from regbench.cli import main

    out = tmp_path / "out"
    args = ["run", "--methods", "ses", "--epochs", "1", "--seeds", "1", "--optimizer", "sgd", "--schedule",
            "constant", "--lr", "1e4", "--out", str(out), "--data-dir", str(data_dir)]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "baseline seed 0: FAILED (diverged: non-finite loss in epoch 1" in err and "ses seed 0: FAILED" in err
    storage = f"sqlite:///{out / 'regbench.db'}"
    trials = optuna.load_study(study_name="mnist1d-cnn1d:ses:final", storage=storage).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL]
    assert trials[0].user_attrs["fail_reason"].startswith("diverged")
    assert "| ses | 0 | no finished runs |" in (out / "leaderboard.md").read_text()
    assert main(args) == 0  # deterministic divergence: not retried
    assert len(optuna.load_study(study_name="mnist1d-cnn1d:ses:final", storage=storage).get_trials()) == 1
