"""Mid-run checkpoints (issue 10, item 1): a run stopped after a saved epoch and resumed from its file ends bit-for-bit
where an uninterrupted run ends (CPU), its file is removed when it finishes, and a tampered file is refused unread."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from optuna.trial import TrialState
from regbench.datasets.digits import Digits
from regbench.datasets.mnist1d import MNIST1D

from regbench import checkpoint, engine, registry
from regbench.config import RunConfig
from regbench.errors import DataError

TIMING = ("seconds", "seconds_per_epoch")  # wall-clock: the only values allowed to differ between two runs


@pytest.fixture(scope="module")
def mnist1d(tmp_path_factory):
    return MNIST1D().load(tmp_path_factory.mktemp("data"), train_size=400)


@pytest.fixture(scope="module")
def digits_aug(tmp_path_factory):
    return Digits().load(tmp_path_factory.mktemp("digits"), train_size=300, augment="crop_flip")


def cfg(method="baseline", epochs=4, **kw):
    base = {"method": method, "dataset": "mnist1d", "model": "cnn1d", "epochs": epochs, "batch_size": 64, "seed": 3,
            "hparams": registry.method_class(method).resolve({}), "train_size": 400, "device": "cpu"}
    base.update(kw)
    return RunConfig(**base)


class Killed(Exception):
    """Stands in for a kill right after an epoch's checkpoint was written."""


def no_timing(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIMING}


def scramble_global_rngs():
    """What a fresh process would have: global RNGs anywhere but where the killed run left them."""
    random.seed(999)
    np.random.seed(999)
    torch.manual_seed(999)


def train_interrupted(config, splits, path: Path, stop_after: int):
    def on_epoch(epoch, _row):
        if epoch == stop_after:
            raise Killed()
    with pytest.raises(Killed):
        engine.train(config, splits, registry.build_method(config.method, config.hparams), on_epoch=on_epoch,
                     checkpoint=path, checkpoint_seconds=0)
    assert torch.load(path, weights_only=True)["epoch"] == stop_after  # left for the retry


@pytest.mark.parametrize("method,dataset", [("baseline", "mnist1d"), ("shade", "mnist1d"), ("ses", "mnist1d"),
                                            ("ses_lowrank", "mnist1d"), ("dropout", "mnist1d"),
                                            ("baseline", "digits_aug")])
def test_resumed_run_ends_bit_for_bit_like_an_uninterrupted_one(tmp_path, request, method, dataset):
    splits = request.getfixturevalue(dataset)
    extra = {} if dataset == "mnist1d" else {"dataset": "digits", "model": "cnn", "train_size": 300,
                                             "augment": "crop_flip"}
    if method == "ses_lowrank":  # SES's private generator (randomized range finder) must resume mid-stream too
        method = "ses"
        extra["hparams"] = registry.method_class("ses").resolve({"eigen_path": "lowrank", "rank": 4})
    config = cfg(method, **extra)
    # keep_checkpoint with a save at the last epoch: the kept file holds the final weights and optimizer state.
    whole = engine.train(config, splits, registry.build_method(method, config.hparams),
                         checkpoint=tmp_path / "whole.pt", checkpoint_seconds=0, keep_checkpoint=True)
    assert whole.resumed_from_epoch == 0

    path = tmp_path / "resumed.pt"
    train_interrupted(config, splits, path, stop_after=2)
    scramble_global_rngs()
    reported = []
    resumed = engine.train(config, splits, registry.build_method(method, config.hparams),
                           on_epoch=lambda e, _r: reported.append(e), checkpoint=path, checkpoint_seconds=0,
                           keep_checkpoint=True)
    assert resumed.resumed_from_epoch == 2
    assert reported == [1, 2, 3, 4]  # the restored epochs are reported to the (new) trial too
    assert no_timing(resumed.metrics) == no_timing(whole.metrics)
    assert [no_timing(r) for r in resumed.history] == [no_timing(r) for r in whole.history]
    a, b = torch.load(tmp_path / "whole.pt", weights_only=True), torch.load(path, weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["generators"][k], b["generators"][k]) for k in a["generators"])
    if method == "shade":  # the moving averages (buffers) went through the checkpoint and on identically
        assert {"p0", "p1", "mu0", "mu1"} <= set(a["method"])
        assert all(torch.equal(a["method"][k], b["method"][k]) for k in ("p0", "p1", "mu0", "mu1"))


def test_a_resume_without_the_method_state_would_differ(tmp_path, mnist1d):
    """The test above can fail: dropping SHADE's moving averages from the checkpoint changes the result."""
    config = cfg("shade")
    whole = engine.train(config, mnist1d, registry.build_method("shade", config.hparams))
    path = tmp_path / "run.pt"
    train_interrupted(config, mnist1d, path, stop_after=2)
    state = torch.load(path, weights_only=True)
    state["method"] = {}
    checkpoint.save(path, {k: v for k, v in state.items() if k != "format"})
    resumed = engine.train(config, mnist1d, registry.build_method("shade", config.hparams), checkpoint=path)
    assert no_timing(resumed.metrics) != no_timing(whole.metrics)


def test_cadence_and_cleanup(tmp_path, mnist1d):
    config = cfg(epochs=3)
    path = tmp_path / "run.pt"
    seen = []
    # Default cadence (60 s): a run of a few seconds never writes a checkpoint.
    engine.train(config, mnist1d, registry.build_method("baseline"), checkpoint=path,
                 on_epoch=lambda e, _r: seen.append(path.exists()))
    assert seen == [False, False, False] and not path.exists()
    # Every epoch but the last (nothing resumes from a finished run): epoch 2's file is still there at epoch 3, removed
    # when the run finishes.
    seen.clear()
    engine.train(config, mnist1d, registry.build_method("baseline"), checkpoint=path, checkpoint_seconds=0,
                 on_epoch=lambda e, _r: seen.append(path.exists() and torch.load(path, weights_only=True)["epoch"]))
    assert seen == [1, 2, 2] and not path.exists()
    # checkpoint_every=2: epoch 2 only
    seen.clear()
    engine.train(config, mnist1d, registry.build_method("baseline"), checkpoint=path, checkpoint_seconds=0,
                 checkpoint_every=2, on_epoch=lambda e, _r: seen.append(path.exists()))
    assert seen == [False, True, True] and not path.exists()


def test_a_diverged_run_removes_its_checkpoint(tmp_path, mnist1d):
    path = tmp_path / "run.pt"
    config = cfg(epochs=3, lr=1e12, optimizer="sgd", schedule="constant")
    with pytest.raises(engine.Diverged):
        engine.train(config, mnist1d, registry.build_method("baseline"), checkpoint=path, checkpoint_seconds=0)
    assert not path.exists()


def test_a_checkpoint_of_another_run_is_ignored(tmp_path, mnist1d):
    path = tmp_path / "run.pt"
    train_interrupted(cfg(), mnist1d, path, stop_after=2)
    other = cfg(seed=4)
    with pytest.warns(UserWarning, match="belongs to run"):
        result = engine.train(other, mnist1d, registry.build_method("baseline"), checkpoint=path)
    assert result.resumed_from_epoch == 0


def test_a_checkpoint_from_another_device_type_is_resumed_not_restarted(tmp_path, mnist1d):
    """A run stopped on CUDA and rerun with --device cpu (or back) goes on from its step (issue 16): its tensors are
    mapped to this device, the device-side generator restarts from its seed (a CUDA Philox state, 16 bytes, is no CPU
    state) and the optimizer keeps this device's kernel options (a CUDA run's AdamW is fused). Written here as the
    CUDA run would have written it; the streams this run uses are on the CPU, so it still ends like an uninterrupted run."""
    config = cfg(optimizer="adamw", lr=0.003)
    whole = engine.train(config, mnist1d, registry.build_method("baseline"))
    path = tmp_path / "run.pt"
    train_interrupted(config, mnist1d, path, stop_after=2)
    state = torch.load(path, weights_only=True)
    state["device_type"] = "cuda"
    state["generators"]["augment"] = torch.zeros(16, dtype=torch.uint8)  # what a CUDA generator's get_state gives
    for group in state["optimizer"]["param_groups"]:
        group["fused"] = True
    checkpoint.save(path, {k: v for k, v in state.items() if k != "format"})
    scramble_global_rngs()
    with pytest.warns(UserWarning, match="saved on cuda, on cpu from epoch 2"):
        resumed = engine.train(config, mnist1d, registry.build_method("baseline"), checkpoint=path)
    assert resumed.resumed_from_epoch == 2
    assert no_timing(resumed.metrics) == no_timing(whole.metrics)


def test_load_optimizer_keeps_this_devices_kernel_options():
    weight = torch.nn.Parameter(torch.ones(3, device="cpu"))
    cuda_like = torch.optim.AdamW([weight], lr=0.1).state_dict()
    cuda_like["param_groups"][0].update(fused=True, capturable=True)
    optimizer = torch.optim.AdamW([weight], lr=0.5)
    checkpoint.load_optimizer(optimizer, cuda_like)
    group = optimizer.param_groups[0]
    assert group["lr"] == 0.1 and not group["fused"] and not group["capturable"]


class _Payload:
    """A pickled object whose unpickling would create a folder: proves a refused checkpoint runs nothing."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_a_tampered_checkpoint_is_refused_unread(tmp_path, mnist1d):
    config = cfg()
    path = tmp_path / f"{config.key()}.pt"
    train_interrupted(config, mnist1d, path, stop_after=2)
    state = torch.load(path, weights_only=True)
    marker = tmp_path / "pwned"
    state["method"] = {"evil": _Payload(marker)}
    torch.save(state, path)
    with pytest.raises(DataError) as err:
        engine.train(config, mnist1d, registry.build_method("baseline"), checkpoint=path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "delete it" in message
    assert "holds a pickled object" in message and "mkdir" in message
    assert not marker.exists()
    for junk in (b"not a torch file", path.read_bytes()[:200]):  # not a pickle; a truncated archive
        path.write_bytes(junk)
        with pytest.raises(DataError, match="not a readable torch file") as err:
            checkpoint.load(path, config.key(), torch.device("cpu"))
        assert "\n" not in str(err.value)


def test_the_cli_reports_a_tampered_checkpoint_in_one_line(tmp_path, data_dir):
    out = tmp_path / "out"
    args = ["run", "--methods", "baseline", "--dataset", "digits", "--model", "mlp", "--epochs", "2", "--seeds", "1",
            "--quiet", "--out", str(out), "--data-dir", str(data_dir), "--keep-checkpoints"]
    first = _cli(*args)
    assert first.returncode == 0, first.stderr
    (kept,) = (out / "checkpoints").glob("*.pt")  # --keep-checkpoints: the finished run's file stays
    state = torch.load(kept, weights_only=True)
    state["history"] = [_Payload(tmp_path / "pwned")]
    torch.save(state, kept)
    # A new seed has another key; rerun the finished seed's config through a fresh output dir with the same file.
    fresh = tmp_path / "fresh"
    (fresh / "checkpoints").mkdir(parents=True)
    os.replace(kept, fresh / "checkpoints" / kept.name)
    again = _cli(*[a if a != str(out) else str(fresh) for a in args])
    assert again.returncode == 2
    lines = again.stderr.strip().splitlines()
    assert len(lines) == 1 and "holds a pickled object" in lines[0] and "Traceback" not in again.stderr
    assert not (tmp_path / "pwned").exists()


# ---- end to end: SIGKILL in the middle of an epoch, rerun ----------------------------------------------------------

def _cli(*args, background: bool = False, cwd=None):
    """The installed console script, as a user runs it; ``background``: started, not waited for."""
    script = Path(sys.executable).parent / "regbench"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    if background:
        return subprocess.Popen([str(script), *args], env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    return subprocess.run([str(script), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=600,
                          check=False)


def _final_trials(out: Path) -> list:
    storage = f"sqlite:///{out / 'regbench.db'}"
    return optuna.load_study(study_name="digits-mlp:baseline:final", storage=storage).get_trials()


def test_sigkill_mid_epoch_then_rerun_resumes_and_matches_an_uninterrupted_run(tmp_path, data_dir):
    # mlp on all of digits with batch 16: ~0.2-0.5 s an epoch on 2 CPU cores, long enough to be killed inside one.
    common = ["run", "--methods", "baseline", "--dataset", "digits", "--model", "mlp", "--epochs", "8",
              "--batch-size", "8", "--seeds", "1", "--quiet", "--data-dir", str(data_dir),
              "--checkpoint-every-seconds", "0"]
    out = tmp_path / "killed"
    ckdir = out / "checkpoints"
    proc = _cli(*common, "--out", str(out), background=True, cwd=tmp_path)
    deadline = time.time() + 300
    saved = []
    while time.time() < deadline and proc.poll() is None:
        saved = list(ckdir.glob("*.pt")) if ckdir.is_dir() else []
        if saved and torch.load(saved[0], weights_only=True)["epoch"] >= 2:
            time.sleep(0.1)  # into the next epoch: the kill lands mid-epoch, after a checkpoint
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; make its epochs longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    at_kill = torch.load(saved[0], weights_only=True)["epoch"]
    assert 2 <= at_kill < 8

    again = _cli(*common, "--out", str(out), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    trials = _final_trials(out)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    killed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(done) == 1 and len(killed) == 1
    assert done[0].user_attrs["resumed_from_epoch"] == at_kill  # resumed from the file the kill left, not from 0
    assert not list(ckdir.glob("*")), "a finished run's checkpoint must be removed"

    whole = _cli(*common, "--out", str(tmp_path / "whole"), cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr
    (ref,) = _final_trials(tmp_path / "whole")
    assert "resumed_from_epoch" not in ref.user_attrs
    assert ref.user_attrs["config_key"] == done[0].user_attrs["config_key"]
    assert no_timing(done[0].user_attrs["metrics"]) == no_timing(ref.user_attrs["metrics"])
    assert [no_timing(r) for r in done[0].user_attrs["history"]] == [no_timing(r) for r in ref.user_attrs["history"]]
