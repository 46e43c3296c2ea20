"""Interrupts (issue 10, item 2): Ctrl-C / SIGTERM stop a run after its current optimizer step, save a mid-epoch
checkpoint, leave the trial resumable (a queued copy, not a failed run) and exit 130/143 with one line; the rerun
continues from that step and ends bit-for-bit like an uninterrupted run (CPU)."""
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from device_guard import assert_same_history
from helpers import with_ctrl_c
from optuna.trial import TrialState
from test_checkpoint import cfg, mnist1d, no_timing, scramble_global_rngs  # noqa: F401 - mnist1d is a fixture

from regbench import cli, engine, registry, stopping


def stopping_at(method, step: int, exception=KeyboardInterrupt):
    """The real method, plus what a signal handler does: ask the loop to stop once step ``step`` has run."""
    after_step = method.after_step

    def after_step_then_stop(ctx):
        after_step(ctx)
        if ctx.step == step:
            assert stopping.request_stop(exception)
            assert not stopping.request_stop(exception)  # a second signal is not queued: the CLI raises it at once
    method.after_step = after_step_then_stop
    return method


@pytest.mark.parametrize("method", ["baseline", "shade", "dropout", "ses"])
def test_stop_after_a_step_mid_epoch_then_resume_is_bit_for_bit(tmp_path, mnist1d, method, test_device, bit_exact):
    # on $REGBENCH_TEST_DEVICE; bit for bit on the CPU, within tolerances on CUDA (device_guard.assert_same_history)
    config = cfg(method, epochs=3, device=test_device)
    whole = engine.train(config, mnist1d, registry.build_method(method, config.hparams))
    steps_per_epoch = 400 // 64
    stop_at = steps_per_epoch + 2  # the third step of the second epoch: mid-epoch, after one finished epoch
    path = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):
        engine.train(config, mnist1d, stopping_at(registry.build_method(method, config.hparams), stop_at),
                     checkpoint=path, checkpoint_seconds=3600)  # no epoch checkpoint: only the stop saves
    saved = torch.load(path, weights_only=True, map_location="cpu")
    assert saved["step"] == stop_at + 1 and saved["epoch"] == 1 and saved["partial_epoch"]["batch"] == 3
    scramble_global_rngs()
    resumed = engine.train(config, mnist1d, registry.build_method(method, config.hparams), checkpoint=path)
    assert resumed.resumed_from_step == stop_at + 1 and resumed.resumed_from_epoch == 1
    assert_same_history([no_timing(r) for r in resumed.history], [no_timing(r) for r in whole.history], bit_exact)
    assert not path.exists()  # finished: its checkpoint is gone


def test_a_stop_request_outside_training_is_refused(mnist1d):
    assert not stopping.request_stop(KeyboardInterrupt)  # nothing trains: the CLI's handler raises at once
    config = cfg("baseline", epochs=1)
    engine.train(config, mnist1d, registry.build_method("baseline", config.hparams))
    assert not stopping.request_stop(KeyboardInterrupt)  # the loop is over: nothing is left pending


def test_a_stop_after_the_last_step_check_is_raised_when_training_ends(mnist1d):
    """A signal that lands during the final epoch's evaluation (after the loop's last step check) still stops."""
    config = cfg("baseline", epochs=2)

    def stop_in_last_epoch(epoch, _row):
        if epoch == config.epochs:
            assert stopping.request_stop(KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        engine.train(config, mnist1d, registry.build_method("baseline", config.hparams), on_epoch=stop_in_last_epoch)
    assert not stopping.stop_requested() and not stopping.request_stop(KeyboardInterrupt)


def test_inside_a_trial_a_late_stop_lets_the_run_finish_and_stops_when_the_trial_ends(mnist1d):
    """Held by an outer region (a trial), the same late stop lets training return its result; the outer region
    raises it once it ends, and a second signal meanwhile is not deferred (the CLI raises it at once)."""
    config = cfg("baseline", epochs=2)
    results = []

    def stop_in_last_epoch(epoch, _row):
        if epoch == config.epochs:
            assert stopping.request_stop(KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt), stopping.stoppable():
        results.append(engine.train(config, mnist1d, registry.build_method("baseline", config.hparams),
                                    on_epoch=stop_in_last_epoch))
        assert stopping.stop_requested() and not stopping.request_stop(KeyboardInterrupt)
    assert len(results) == 1 and len(results[0].history) == config.epochs
    assert not stopping.stop_requested()


def test_a_sigterm_while_a_trial_is_recorded_lets_the_record_finish_then_stops(tmp_path, data_dir):
    """A real SIGTERM through the CLI's handler, landing in a trial's bookkeeping (here the caller's per-trial hook,
    which mirrors to MLflow in the CLI): the hook completes, the trial is COMPLETE, and the runner stops before the
    next seed. Raised where it landed, it would cut the hook short (or, inside Optuna's tell, leave the trial RUNNING)."""
    from regbench.datasets.digits import Digits

    from regbench import protocol, record, runner
    from regbench.config import RunConfig
    from regbench.store import open_storage

    splits = Digits().load(data_dir, train_size=200)
    base = RunConfig(method="baseline", dataset="digits", model="mlp", epochs=1, batch_size=64, train_size=200,
                     split_hash=splits.split_hash, device="cpu", data_dir=str(data_dir))
    bench = protocol.Benchmark(name="late-stop", base=base, fixed={"baseline": {}}, seeds=[0, 1],
                            protocol=protocol.TuningRules(trials=0))
    url = f"sqlite:///{tmp_path / 'store.db'}"
    recorded = []

    def on_trial(outcome):
        os.kill(os.getpid(), signal.SIGTERM)
        recorded.append(outcome.trial.number)  # reached only if the signal waited for the trial to end

    previous = signal.getsignal(signal.SIGTERM)
    cli._stop_on_sigterm()
    try:
        with pytest.raises(cli.Terminated):
            runner.Runner(open_storage(url), bench, splits, on_trial=on_trial).run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    finals = optuna.load_study(study_name=record.final_study_name("late-stop", "baseline"), storage=url).get_trials()
    assert [t.state for t in finals] == [TrialState.COMPLETE, TrialState.WAITING]  # seed 1 queued, never started
    assert recorded == [finals[0].number]


def _reported_epochs(db: Path) -> int:
    """Epochs reported by the running trial, read through a read-only connection (no schema races with the run)."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        row = con.execute("SELECT COUNT(*) FROM trial_intermediate_values v JOIN trials t USING (trial_id) "
                          "WHERE t.state = 'RUNNING'").fetchone()
    return row[0]


# SIGTERM takes the same path (cli.Terminated is a KeyboardInterrupt); its end-to-end test is in test_protocol.py.
@pytest.mark.parametrize("sig, code, line", [
    (signal.SIGINT, 130, "regbench: interrupted; rerun the same command to resume where it stopped"),
])
def test_signal_mid_run_leaves_a_resumable_trial_and_the_rerun_matches_an_uninterrupted_run(
        tmp_path, data_dir, sig, code, line):
    common = ["run", "--methods", "baseline", "--dataset", "digits", "--model", "mlp", "--epochs", "8",
              "--batch-size", "8", "--seeds", "1", "--quiet", "--data-dir", str(data_dir),
              "--checkpoint-every-seconds", "3600"]  # no epoch checkpoint: what resumes is the one the stop saved
    script = Path(sys.executable).parent / "regbench"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    out = tmp_path / "stopped"
    proc = subprocess.Popen([str(script), *common, "--out", str(out)], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=with_ctrl_c)  # noqa: PLW1509 - one signal() call before exec
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if _reported_epochs(out / "regbench.db") >= 2:
                break
        except sqlite3.Error:  # not created yet
            pass
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before the signal; make its epochs longer"
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert stderr.strip().splitlines()[-1] == line and "Traceback" not in stderr
    assert cli.STOPPING[sig == signal.SIGTERM].strip() in stderr.splitlines()  # the deferred stop was acknowledged

    storage = f"sqlite:///{out / 'regbench.db'}"
    study = optuna.load_study(study_name="digits-mlp:baseline:final", storage=storage)
    [stopped] = study.get_trials(states=(TrialState.FAIL,))
    assert stopped.user_attrs["fail_reason"].startswith("interrupted: stopped by a signal (Ctrl-C, SIGTERM, or a scheduler's time-limit warning) after epoch ")
    [queued] = study.get_trials(states=(TrialState.WAITING,))
    assert queued.user_attrs["resumes_trial"] == stopped.number
    [saved] = (out / "checkpoints").glob("*.pt")
    state = torch.load(saved, weights_only=True)
    assert "partial_epoch" in state and state["epoch"] >= 2  # stopped inside an epoch, after its current step

    status = subprocess.run([str(script), "status", str(out)], env=env, capture_output=True, text=True, check=False)
    assert "0 failed, 1 interrupted (resumable, not failed)" in status.stdout, status.stdout

    again = subprocess.run([str(script), *common, "--out", str(out)], env=env, cwd=tmp_path, capture_output=True,
                           text=True, check=False)
    assert again.returncode == 0, again.stderr
    [done] = study.get_trials(states=(TrialState.COMPLETE,))
    assert done.number == queued.number and done.user_attrs["resumed_from_step"] == state["step"]
    # Each attempt's budget counts the epochs it trained itself: together, the run's 8 epochs (plus the one the stop
    # cut short), never the stopped attempt's epochs twice; the tuning count still sees the whole run.
    from regbench import record
    stopped = study.get_trials(states=(TrialState.FAIL,))[0]
    resumed_from = done.user_attrs["resumed_from_epoch"]
    assert done.user_attrs["budget"]["epochs"] == 8 - resumed_from
    assert record.spent([stopped, done])["epochs"] in (8, 8 + 1)
    assert record.committed([done], planned_epochs=8)[1] == 8
    whole = subprocess.run([str(script), *common, "--out", str(tmp_path / "whole")], env=env, cwd=tmp_path,
                           capture_output=True, text=True, check=False)
    assert whole.returncode == 0, whole.stderr
    [ref] = optuna.load_study(study_name="digits-mlp:baseline:final",
                              storage=f"sqlite:///{tmp_path / 'whole' / 'regbench.db'}").get_trials()
    assert [no_timing(r) for r in done.user_attrs["history"]] == [no_timing(r) for r in ref.user_attrs["history"]]
