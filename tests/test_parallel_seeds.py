"""--parallel-seeds (issue 9, item 3): K seeds trained at once equal the K seeds trained alone by engine.train."""
import contextlib
import io
import json
import re

import optuna
import pytest
import torch
from regbench.datasets.digits import Digits
from regbench.datasets.mnist1d import MNIST1D

from regbench import engine, registry, stopping
from regbench.cli import main
from regbench.config import RunConfig
from regbench.errors import ConfigError

SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def mnist1d(tmp_path_factory):
    return MNIST1D().load(tmp_path_factory.mktemp("data"), train_size=400)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return Digits().load(tmp_path_factory.mktemp("digits"), train_size=320)


def cfg(method="baseline", seed=0, hparams=None, **kw):
    base = {"method": method, "dataset": "mnist1d", "model": "cnn1d", "epochs": 2, "batch_size": 64, "seed": seed,
            "hparams": registry.method_class(method).resolve(hparams or {}), "train_size": 400, "device": "cpu"}
    base.update(kw)
    return RunConfig(**base)


def build(c):
    return registry.build_method(c.method, c.hparams)


def flat(row, prefix=""):
    """Numeric leaves of a history row (test_reliability is a dict of bins), timings left out."""
    out = {}
    for key, value in row.items():
        if key == "seconds":
            continue
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}/"))
        elif isinstance(value, (list, tuple)):
            out.update({f"{prefix}{key}/{i}": v for i, v in enumerate(value)})
        else:
            out[prefix + key] = value
    return out


def compare(sequential, together, atol):
    assert len(sequential) == len(together)
    for alone, par in zip(sequential, together):
        assert isinstance(par, engine.RunResult)
        assert len(alone.history) == len(par.history)
        for a, b in zip(alone.history, par.history):
            a, b = flat(a), flat(b)
            assert a.keys() == b.keys()
            for key in a:
                assert b[key] == pytest.approx(a[key], abs=atol, rel=atol), key  # sums of many (ECE bins): rel
        assert par.diagnostic_layers == alone.diagnostic_layers
        assert set(par.metrics) == set(alone.metrics)


def run_both(splits, configs, backend):
    alone = [engine.train(c, splits, build(c)) for c in configs]
    together = engine.train_group(configs, splits, build, backend=backend)
    return alone, together


@pytest.mark.parametrize("method,optimizer", [("baseline", "adamw"), ("baseline", "sgd"), ("weight_decay", "sgd"),
                                              ("confidence_penalty", "adamw")])
def test_vmap_equals_sequential_runs(mnist1d, method, optimizer):
    # One optimizer over the stacked weights is K optimizers (elementwise updates); weight_decay's param groups and
    # the confidence penalty's per-seed state go through too. Float reassociation in the batched convs: atol 1e-5.
    configs = [cfg(method, seed=s, optimizer=optimizer, lr=3e-3 if optimizer == "adamw" else 0.05) for s in SEEDS]
    compare(*run_both(mnist1d, configs, "vmap"), atol=1e-5)


@pytest.mark.parametrize("method", ["baseline", "ses", "shade", "dropout"])
def test_streams_equal_sequential_runs_bit_for_bit(mnist1d, method):
    # K copies in lockstep with each seed's global RNG swapped in: SES/SHADE state and dropout masks as alone.
    compare(*run_both(mnist1d, [cfg(method, seed=s) for s in SEEDS], "streams"), atol=0)


def test_auto_equals_sequential_with_dropout_on_an_mlp(digits):
    configs = [cfg("dropout", seed=s, dataset="digits", model="mlp", train_size=320, hparams={"rate": 0.5})
               for s in SEEDS]
    compare(*run_both(digits, configs, "auto"), atol=0)


def test_vmap_stacks_batchnorm_statistics(digits):
    # The small CNN has BatchNorm: its running statistics are stacked and updated per seed; eval-mode metrics use
    # them. AdamW amplifies the batched convs' reassociation on BN nets, so a short SGD run at a looser tolerance.
    configs = [cfg(seed=s, dataset="digits", model="cnn", train_size=320, epochs=1, optimizer="sgd", lr=0.01,
                   schedule="constant") for s in SEEDS]
    compare(*run_both(digits, configs, "vmap"), atol=1e-4)


@pytest.mark.parametrize("method,reason", [("shade", "captures activations"), ("dropout", "hooks"),
                                           ("spectral_norm", "parametrizations")])
def test_vmap_refuses_methods_it_cannot_reproduce(mnist1d, method, reason):
    with pytest.raises(ConfigError, match=reason):
        engine.train_group([cfg(method, seed=s) for s in (0, 1)], mnist1d, build, backend="vmap")


def test_configs_must_differ_only_in_seed(mnist1d):
    with pytest.raises(ConfigError, match="differ only in their seed"):
        engine.train_group([cfg(seed=0), cfg(seed=1, lr=1e-2)], mnist1d, build)
    with pytest.raises(ConfigError, match="distinct"):
        engine.train_group([cfg(seed=0), cfg(seed=0)], mnist1d, build)


@pytest.mark.parametrize("backend", ["vmap", "streams"])
def test_a_diverging_seed_gets_diverged_in_its_slot(mnist1d, backend):
    configs = [cfg(seed=s, lr=1e12, optimizer="sgd", schedule="constant") for s in (0, 1)]
    results = engine.train_group(configs, mnist1d, build, backend=backend)
    assert all(isinstance(r, engine.Diverged) for r in results)
    with pytest.raises(engine.Diverged) as alone:
        engine.train(configs[0], mnist1d, build(configs[0]))
    assert str(results[0]) == str(alone.value)


def _run(out, data_dir, *extra):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["run", "--methods", "shade", "--seeds", "3", "--epochs", "2", "--quiet", "--out", str(out),
                     "--data-dir", str(data_dir), *extra])
    assert code == 0
    storage = f"sqlite:///{out / 'regbench.db'}"
    finals = {}
    for summary in optuna.get_all_study_summaries(storage):
        if summary.study_name.endswith(":final"):
            for t in optuna.load_study(study_name=summary.study_name, storage=storage).get_trials():
                finals.setdefault((t.user_attrs["method"], t.user_attrs["config_key"]), []).append(t)
    return finals, (out / "leaderboard.md").read_text()


def test_cli_parallel_seeds_gives_the_same_leaderboard_and_runs_each_final_once(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    torch.set_num_threads(1)  # a shared 2-core box: threads fighting over cores only slow both runs
    data = tmp_path / "data"
    alone, board_alone = _run(tmp_path / "alone", data)
    together, board_together = _run(tmp_path / "together", data, "--parallel-seeds", "3")
    assert together.keys() == alone.keys() and len(together) == 6  # baseline + shade, 3 seeds each
    for key, trials in together.items():
        assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE]  # trained once, nothing skipped
        ref = alone[key][0]
        got = trials[0]
        assert set(got.user_attrs) == set(ref.user_attrs)  # the stored schema is unchanged
        assert got.params == ref.params
        a, b = flat(ref.user_attrs["metrics"]), flat(got.user_attrs["metrics"])
        for k in a:
            if "seconds" not in k:
                assert b[k] == pytest.approx(a[k], abs=1e-5), k
        assert json.loads(got.user_attrs["config"]) == json.loads(ref.user_attrs["config"])
    # The three seeds of each method really trained as one group (one start time), and not without the flag.
    for method in ("baseline", "shade"):
        starts = {t[0].user_attrs["timings"]["started"] for (m, _), t in together.items() if m == method}
        assert len(starts) == 1
        starts = {t[0].user_attrs["timings"]["started"] for (m, _), t in alone.items() if m == method}
        assert len(starts) == 3

    def table(board):  # the leaderboard's first table without its timing cells (s/epoch, minutes spent)
        lines = board.splitlines()
        start = next(i for i, line in enumerate(lines) if "s/epoch" in line)
        head = [c.strip() for c in lines[start].strip("|").split("|")]
        rows = []
        for line in lines[start + 2:start + 4]:
            cells = [c.strip() for c in line.strip("|").split("|")]
            cells[head.index("s/epoch")] = ""
            cells[-1] = cells[-1].split(";")[0]  # hparams; the budget spent holds minutes
            rows.append(cells)
        return rows
    assert [row[0] for row in table(board_alone)] == ["baseline", "shade"]
    assert table(board_together) == table(board_alone)


def test_cli_rejects_parallel_seeds_below_one(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["run", "--methods", "baseline", "--parallel-seeds", "0", "--out", str(out), "--quiet"])
    assert code == 2
    assert "--parallel-seeds 0 is outside 1..10000" in capsys.readouterr().err
    assert not out.exists()


def test_sigkill_during_a_parallel_group_leaves_every_seed_recoverable(tmp_path):
    # A process killed while it trains a leader and its claimed siblings leaves them all RUNNING, each with its own
    # mid-run checkpoint; rerunning the command (it holds the output dir, so those trials are provably dead) retries
    # each, the retries regroup and resume from their checkpoints, and every final ends COMPLETE exactly once.
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from helpers import regbench_cli, trial_states

    out, data = tmp_path / "out", tmp_path / "data"
    args = ["run", "--methods", "baseline", "--seeds", "3", "--epochs", "12", "--quiet", "--parallel-seeds", "3",
            "--train-size", "800", "--checkpoint-every-seconds", "0", "--out", str(out), "--data-dir", str(data)]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "regbench"), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    storage = f"sqlite:///{out / 'regbench.db'}"
    running, saved, deadline = 0, [], time.time() + 300
    while (running < 3 or len(saved) < 3) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
        running = trial_states(out / "regbench.db", "mnist1d-cnn1d:baseline:final").count("RUNNING")
        saved = [p for p in (out / "checkpoints").glob("*.pt") if torch.load(p, weights_only=True)["epoch"] >= 2]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert running == 3, "the leader and its two siblings were never RUNNING together"
    assert len(saved) == 3, "the group never had a checkpoint of epoch 2 for each seed"
    done = regbench_cli(*args)
    assert done.returncode == 0, done.stderr
    trials = optuna.load_study(study_name="mnist1d-cnn1d:baseline:final", storage=storage).get_trials()
    complete = [t.user_attrs["config_key"] for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == len(set(complete)) == 3
    finals = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert all(t.user_attrs.get("resumed_from_epoch", 0) >= 2 for t in finals), "a retry trained from scratch"
    # ... and together: a group's runs share its start time (each seed alone would have its own)
    assert len({t.user_attrs["timings"]["started"] for t in finals}) == 1, "the retries did not regroup"
    killed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(killed) == 3 and all(t.user_attrs["fail_reason"].startswith("interrupted:") for t in killed)
    assert not [t for t in trials if t.state in (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)]


# ---- mid-run checkpoints of a group (issue 10, item 1, for --parallel-seeds) -----------------------------------------

class _Killed(Exception):
    """Stands for a kill right after epoch 2's checkpoints were written (as for a run alone, a group saves an epoch
    before it reports it: a prune or an interrupt in ``on_epoch`` must not lose the epoch just trained)."""


def _killed_group(splits, configs, backend, tmp_path):
    paths = [tmp_path / f"{c.key()}.pt" for c in configs]
    reported = []

    def kill_after_epoch_2(index, epoch, row):
        reported.append((index, epoch))
        if epoch == 2:
            raise _Killed

    with pytest.raises(_Killed):
        engine.train_group(configs, splits, build, backend=backend, on_epoch=kill_after_epoch_2, checkpoints=paths,
                           checkpoint_seconds=0)
    assert reported == [(k, 1) for k in range(len(configs))] + [(0, 2)]  # raised at seed 0's report of epoch 2
    assert [torch.load(p, weights_only=True)["epoch"] for p in paths] == [2] * len(configs)  # every seed's epoch 2
    return paths


@pytest.mark.parametrize("method", ["shade", "dropout"])
def test_a_killed_streams_group_resumes_each_seed_alone_bit_for_bit(mnist1d, method, tmp_path):
    # SHADE's moving averages and dropout's RNG stream must come back exactly: each seed's checkpoint is the one
    # engine.train would have written at that epoch end.
    configs = [cfg(method, seed=s, epochs=4) for s in (0, 1)]
    paths = _killed_group(mnist1d, configs, "streams", tmp_path)
    for c, path in zip(configs, paths):
        assert torch.load(path, weights_only=True)["epoch"] == 2
        resumed = engine.train(c, mnist1d, build(c), checkpoint=path)
        alone = engine.train(c, mnist1d, build(c))
        assert resumed.resumed_from_epoch == 2
        assert [flat(r) for r in resumed.history] == [flat(r) for r in alone.history]
        assert not path.exists()  # removed when the resumed run finished


def test_a_killed_vmap_group_resumes_each_seed_alone_from_its_slice(mnist1d, tmp_path):
    # One AdamW over the stacked weights: each checkpoint holds that seed's slice of the weights and of the Adam
    # moments, so the seed resumed alone continues the group's run: its epochs 3-4 equal the uninterrupted group's
    # up to the batched convs' reassociation (measured 2e-7 on the losses, 1e-4 on the 4-decimal reliability sums; a
    # wrong slice or step count moves the losses by ~1e-1).
    configs = [cfg(seed=s, epochs=4, optimizer="adamw", lr=3e-3) for s in (0, 1, 2)]
    group = engine.train_group(configs, mnist1d, build, backend="vmap")
    paths = _killed_group(mnist1d, configs, "vmap", tmp_path)
    resumed = []
    for c, path in zip(configs, paths):
        state = torch.load(path, weights_only=True)
        assert state["epoch"] == 2 and all(v["exp_avg"].dim() >= 1 for v in state["optimizer"]["state"].values())
        resumed.append(engine.train(c, mnist1d, build(c), checkpoint=path))
        assert resumed[-1].resumed_from_epoch == 2
    compare(group, resumed, atol=2e-4)


def test_group_checkpoints_are_removed_at_the_end_unless_kept(mnist1d, tmp_path):
    configs = [cfg(seed=s) for s in (0, 1)]
    paths = [tmp_path / f"{c.key()}.pt" for c in configs]
    engine.train_group(configs, mnist1d, build, backend="streams", checkpoints=paths, checkpoint_seconds=0)
    assert not any(p.exists() for p in paths)
    engine.train_group(configs, mnist1d, build, backend="vmap", checkpoints=paths, checkpoint_seconds=0,
                       keep_checkpoint=True)
    assert [torch.load(p, weights_only=True)["epoch"] for p in paths] == [2, 2]


@pytest.mark.parametrize("backend,method", [("streams", "shade"), ("vmap", "baseline")])
def test_a_killed_group_resumes_together_where_it_stopped(mnist1d, backend, method, tmp_path):
    # The retries of a killed group regroup (regbench/runner.py claims siblings at the leader's resume point) and
    # continue from their epoch-2 checkpoints: same histories as the uninterrupted group, bit for bit.
    configs = [cfg(method, seed=s, epochs=4, optimizer="adamw", lr=3e-3) for s in (0, 1, 2)]
    group = engine.train_group(configs, mnist1d, build, backend=backend)
    paths = _killed_group(mnist1d, configs, backend, tmp_path)
    seen = []
    resumed = engine.train_group(configs, mnist1d, build, backend=backend, checkpoints=paths,
                                 on_epoch=lambda k, epoch, row: seen.append((k, epoch)))
    assert [r.resumed_from_epoch for r in resumed] == [2, 2, 2]
    assert sorted(seen) == [(k, e) for k in range(3) for e in range(1, 5)]  # restored epochs reported again
    compare(group, resumed, atol=0)
    assert not any(p.exists() for p in paths)


def test_a_group_refuses_checkpoints_of_different_points(mnist1d, tmp_path):
    configs = [cfg(seed=s, epochs=3) for s in (0, 1)]
    paths = _killed_group(mnist1d, configs, "streams", tmp_path)
    paths[1].unlink()  # seed 1 would start over while seed 0 resumes at epoch 2
    with pytest.raises(ConfigError, match="one point"):
        engine.train_group(configs, mnist1d, build, backend="streams", checkpoints=paths)


def test_resume_point_of_a_checkpoint(mnist1d, tmp_path):
    from regbench import checkpoint

    configs = [cfg(seed=s, epochs=3) for s in (0, 1)]
    paths = _killed_group(mnist1d, configs, "streams", tmp_path)
    assert checkpoint.resume_point(paths[0]) == (2, 2 * (400 // 64), "cpu")
    assert checkpoint.resume_point(tmp_path / "none.pt") is None
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert checkpoint.resume_point(tmp_path / "junk.pt") is None
    state = torch.load(paths[0], weights_only=True)
    checkpoint.save(paths[0], {**state, "format": checkpoint.FORMAT + 1})
    assert checkpoint.resume_point(paths[0]) is None  # another format: load ignores it, the run starts over


@pytest.mark.parametrize("backend,method", [("streams", "shade"), ("vmap", "confidence_penalty")])
@pytest.mark.parametrize("epoch", [0, 1])  # epoch 0: a stop before any epoch ended still restores Adam's moments
def test_ctrl_c_stops_a_group_after_its_step_and_it_resumes_bit_for_bit(mnist1d, backend, method, epoch, tmp_path):
    # What the CLI's signal handler does (stopping.request_stop), during the third step of an epoch: the group finishes
    # that lockstep step, saves every seed mid-epoch and raises; resumed together, it ends as if never stopped.
    from test_interrupts import stopping_at

    configs = [cfg(method, seed=s, epochs=3, optimizer="adamw", lr=3e-3) for s in (0, 1)]
    group = engine.train_group(configs, mnist1d, build, backend=backend)
    stop_at = epoch * (400 // 64) + 2
    paths = [tmp_path / f"{c.key()}.pt" for c in configs]
    with pytest.raises(KeyboardInterrupt):
        engine.train_group(configs, mnist1d, lambda c: stopping_at(build(c), stop_at) if c.seed == 0 else build(c),
                           backend=backend, checkpoints=paths, checkpoint_seconds=3600)
    for path in paths:
        saved = torch.load(path, weights_only=True)
        assert (saved["epoch"], saved["step"], saved["partial_epoch"]["batch"]) == (epoch, stop_at + 1, 3)
    assert not stopping.request_stop(KeyboardInterrupt)  # the loop is over: nothing is left pending
    resumed = engine.train_group(configs, mnist1d, build, backend=backend, checkpoints=paths)
    assert [r.resumed_from_step for r in resumed] == [stop_at + 1] * 2
    compare(group, resumed, atol=0)


def test_sigint_to_a_parallel_group_run_then_rerun_resumes_the_group_from_the_step(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from helpers import regbench_cli, with_ctrl_c

    out = tmp_path / "out"
    args = ["run", "--methods", "baseline", "--seeds", "3", "--epochs", "40", "--quiet", "--parallel-seeds", "3",
            "--train-size", "800", "--checkpoint-every-seconds", "0", "--out", str(out),
            "--data-dir", str(tmp_path / "data")]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "regbench"), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=with_ctrl_c)  # noqa: PLW1509 - one signal() call before exec
    # Signalled once the group is provably in its training loop: all 3 seeds have an epoch checkpoint. (A signal
    # before the loop stops at once, with nothing to save; CI once got there with a fixed sleep.)
    deadline, ready = time.time() + 300, False
    while time.time() < deadline and proc.poll() is None and not ready:
        time.sleep(0.1)
        ready = len(list((out / "checkpoints").glob("*.pt"))) == 3
    assert ready, "the group never saved its epoch checkpoints"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    saved = [torch.load(p, weights_only=True) for p in (out / "checkpoints").glob("*.pt")]
    assert len(saved) == 3 and all("partial_epoch" in s for s in saved)  # saved at the step the stop came in
    assert len({s["step"] for s in saved}) == 1
    again = regbench_cli(*args)
    assert again.returncode == 0, again.stderr
    trials = optuna.load_study(study_name="mnist1d-cnn1d:baseline:final",
                               storage=f"sqlite:///{out / 'regbench.db'}").get_trials()
    finals = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(finals) == 3 and {t.user_attrs["resumed_from_step"] for t in finals} == {saved[0]["step"]}
    assert len({t.user_attrs["timings"]["started"] for t in finals}) == 1  # resumed as one group
    stopped = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(stopped) == 3 and all(t.user_attrs["budget"]["epochs"] == saved[0]["epoch"] for t in stopped)


class _NanFromEpoch(registry.method_class("baseline")):
    """Baseline whose loss turns NaN from ``epoch`` on: one seed of a group diverging while the others do not."""

    def __init__(self, epoch: int):
        super().__init__({})
        self.from_epoch = epoch

    def loss(self, ctx):
        if ctx.epoch >= self.from_epoch:
            return ctx.logits.float().sum() * float("nan")
        return None


@pytest.mark.parametrize("backend,atol", [("streams", 0), ("vmap", 1e-5)])
def test_one_diverging_seed_leaves_the_others_as_they_would_be_alone(mnist1d, backend, atol, tmp_path):
    # Seed 1 diverges in epoch 2: its slot holds Diverged (with epoch 1 in its history) and its checkpoint is gone at
    # once; seed 0 trains on, equal to seed 0 alone, its checkpoint kept to the end.
    configs = [cfg(seed=s, epochs=3) for s in (0, 1)]
    paths = [tmp_path / f"{c.seed}.pt" for c in configs]
    seen = []

    def on_epoch(index, epoch, _row):
        seen.append((index, epoch))
        if epoch == 2:  # seed 1 diverged in this epoch: its file is removed, seed 0's was just saved
            assert paths[0].exists() and not paths[1].exists()

    results = engine.train_group(configs, mnist1d, lambda c: _NanFromEpoch(1 if c.seed == 1 else 99),
                                 backend=backend, checkpoints=paths, checkpoint_seconds=0, keep_checkpoint=False,
                                 on_epoch=on_epoch)
    assert isinstance(results[1], engine.Diverged) and "non-finite loss in epoch 2" in str(results[1])
    assert [row["epoch"] for row in results[1].history] == [1]
    assert seen == [(0, 1), (1, 1), (0, 2), (0, 3)]
    compare([engine.train(configs[0], mnist1d, build(configs[0]))], results[:1], atol=atol)
    assert not any(p.exists() for p in paths)


def test_a_single_run_is_the_group_of_one(mnist1d, tmp_path):
    # engine.train is train_group of one config: same history, same checkpoint file, the same Diverged raised.
    config = cfg("shade", epochs=2)
    alone = engine.train(config, mnist1d, build(config), checkpoint=tmp_path / "a.pt", checkpoint_seconds=0,
                         keep_checkpoint=True)
    [group] = engine.train_group([config], mnist1d, build, checkpoints=[tmp_path / "g.pt"], checkpoint_seconds=0,
                                 keep_checkpoint=True)
    assert [flat(r) for r in group.history] == [flat(r) for r in alone.history]
    a, g = (torch.load(tmp_path / name, weights_only=True) for name in ("a.pt", "g.pt"))
    for part in ("model", "optimizer", "method", "generators", "step", "epoch"):
        assert repr(a[part]) == repr(g[part]), part
    bad = cfg(lr=1e12, optimizer="sgd", schedule="constant")
    [diverged] = engine.train_group([bad], mnist1d, build)
    with pytest.raises(engine.Diverged, match=re.escape(str(diverged))):
        engine.train(bad, mnist1d, build(bad))


@pytest.mark.parametrize("backend", ["streams", "vmap"])
def test_a_group_resumes_checkpoints_written_on_another_device_type(mnist1d, backend, tmp_path):
    # Each seed's epoch-2 checkpoint rewritten as a CUDA group would have written it (device type, a CUDA
    # generator's 16-byte state, fused AdamW): the group resumes from it as a run alone does (checkpoint.moved,
    # load_optimizer, restore_generator), with the warning, and on this CPU ends as the uninterrupted group.
    from regbench import checkpoint

    configs = [cfg(seed=s, epochs=3, optimizer="adamw", lr=3e-3) for s in (0, 1)]
    group = engine.train_group(configs, mnist1d, build, backend=backend)
    paths = _killed_group(mnist1d, configs, backend, tmp_path)
    for path in paths:
        state = torch.load(path, weights_only=True)
        state["device_type"] = "cuda"
        state["generators"]["augment"] = torch.zeros(16, dtype=torch.uint8)
        for group_ in state["optimizer"]["param_groups"]:
            group_["fused"] = True
        checkpoint.save(path, {k: v for k, v in state.items() if k != "format"})
    with pytest.warns(UserWarning, match="saved on cuda, on cpu from epoch 2"):
        resumed = engine.train_group(configs, mnist1d, build, backend=backend, checkpoints=paths)
    assert [r.resumed_from_epoch for r in resumed] == [2, 2]
    compare(group, resumed, atol=0)
