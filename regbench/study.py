"""The protocol (DESIGN.md §4): every training run is one Optuna trial in the store.

Final seed runs are trials of the ``<benchmark>:<method>:final`` study, enqueued with their seed as the fixed param
and the whole RunConfig (plus its key) as user attributes. A run whose key already has a COMPLETE or WAITING trial
is not enqueued again, so rerunning the same command trains nothing new; ``study.ask()`` claims the waiting trials,
which is what lets several workers share one storage later. The benchmark's spec (what the last command asked for)
is kept on the ``<benchmark>`` study so reports are made from the store alone.
"""
from __future__ import annotations

import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import optuna
from optuna.trial import TrialState

import regbench
from regbench import registry
from regbench.config import RunConfig
from regbench.store import SPEC_ATTR

optuna.logging.set_verbosity(optuna.logging.WARNING)

@dataclass
class Plan:
    """What one ``regbench run`` asked for: a config per (method, seed), all sharing dataset, split and recipe."""

    benchmark: str
    command: str
    configs: dict[str, list[RunConfig]]          # method -> one config per seed
    seeds: list[int]
    extra: dict = field(default_factory=dict)

    def spec(self) -> dict:
        first = next(iter(self.configs.values()))[0]
        return {
            "benchmark": self.benchmark, "command": self.command, "seeds": self.seeds,
            "dataset": first.dataset, "model": first.model, "epochs": first.epochs, "shift": first.shift,
            "methods": {m: {"group_key": cs[0].group_key(), "hparams": cs[0].hparams} for m, cs in self.configs.items()},
            **self.extra,
        }


def environment(device: str) -> dict:
    """Provenance recorded with every run (benchopt-style): versions, device, git commit."""
    import timm
    import torch

    env = {"regbench": regbench.__version__, "torch": torch.__version__, "timm": timm.__version__,
           "optuna": optuna.__version__, "python": sys.version.split()[0], "platform": platform.platform(),
           "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        env["device_name"] = torch.cuda.get_device_name()
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(regbench.__file__).parent, capture_output=True,
                             text=True, timeout=5)
        if out.returncode == 0:
            env["git_commit"] = out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return env


def _fail(study: optuna.Study, trial_id: int, reason: str) -> None:
    study._storage.set_trial_user_attr(trial_id, "fail_reason", reason)
    study._storage.set_trial_state_values(trial_id, TrialState.FAIL)


def enqueue_missing(study: optuna.Study, configs: list[RunConfig], owns_storage: bool) -> dict[str, int]:
    """Enqueue each config not already done or waiting. Returns counts for the user."""
    by_key: dict[str, list] = {}
    for t in study.get_trials(deepcopy=False):
        by_key.setdefault(t.user_attrs.get("config_key"), []).append(t)
    counts = {"done": 0, "queued": 0, "failed": 0}
    for cfg in configs:
        trials = by_key.get(cfg.key(), [])
        states = [t.state for t in trials]
        if TrialState.COMPLETE in states:
            counts["done"] += 1
            continue
        if TrialState.WAITING in states:
            counts["queued"] += 1
            continue
        if owns_storage:  # we hold the output-dir lock, so a RUNNING trial here belongs to a dead process
            for t in trials:
                if t.state == TrialState.RUNNING:
                    _fail(study, t._trial_id, "interrupted")
        # A diverged run is deterministic: retrying it would diverge again and waste the budget.
        if any(t.state == TrialState.FAIL and str(t.user_attrs.get("fail_reason", "")).startswith("diverged")
               for t in trials):
            counts["failed"] += 1
            continue
        study.enqueue_trial({"seed": cfg.seed}, user_attrs={
            "config": cfg.to_json(), "config_key": cfg.key(), "group_key": cfg.group_key(), "method": cfg.method})
        counts["queued"] += 1
    return counts


def drain(study: optuna.Study, run_one: Callable[[optuna.trial.Trial, RunConfig], dict | None]) -> int:
    """Claim and run waiting trials until none is left; returns how many this process ran."""
    ran = 0
    while study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        trial = study.ask()
        if "config" not in trial.user_attrs:  # another worker took the last waiting trial first
            trial.set_user_attr("fail_reason", "no work left (lost the race for a queued run)")
            study.tell(trial, state=TrialState.FAIL)
            break
        cfg = RunConfig.from_json(trial.user_attrs["config"])
        trial.suggest_int("seed", 0, 2**31 - 1)  # records the enqueued seed as the trial's param
        run_one(trial, cfg)
        ran += 1
    return ran


def run_trial(study: optuna.Study, trial: optuna.trial.Trial, cfg: RunConfig, splits, progress: bool = False):
    """Train one config as one trial; a diverged run is FAIL with its reason, an interrupted one FAIL 'interrupted'."""
    from regbench import engine

    device = str(engine.resolve_device(cfg.device))
    trial.set_user_attr("env", environment(device))
    trial.set_user_attr("split_hash", splits.split_hash)
    method = registry.build_method(cfg.method, cfg.hparams)
    started = time.time()
    try:
        result = engine.train(cfg, splits, method, on_epoch=lambda e, row: trial.report(row["val_acc"], e),
                              progress=progress)
    except engine.Diverged as exc:
        trial.set_user_attr("fail_reason", f"diverged: {exc}")
        study.tell(trial, state=TrialState.FAIL)
        return None
    except BaseException:
        trial.set_user_attr("fail_reason", "interrupted")
        study.tell(trial, state=TrialState.FAIL)
        raise
    trial.set_user_attr("metrics", result.metrics)
    trial.set_user_attr("history", result.history)
    trial.set_user_attr("diagnostic_layers", result.diagnostic_layers)
    trial.set_user_attr("timings", {"seconds": result.seconds, "started": started,
                                    "seconds_per_epoch": result.metrics["seconds_per_epoch"]})
    study.tell(trial, result.metrics["val_acc"])
    return result


def save_spec(storage, plan: Plan) -> None:
    study = optuna.create_study(study_name=plan.benchmark, storage=storage, load_if_exists=True)
    study.set_user_attr(SPEC_ATTR, plan.spec())
