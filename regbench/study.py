"""The protocol (DESIGN.md §4): tune every method under one budget, select on validation, rerun the winner over seeds.

Every training run is one Optuna trial in the store:

* ``<benchmark>`` holds the spec (what the last command asked for) and, per method, the selected configuration.
* ``<benchmark>:<method>:tune:<ident>`` is the method's tuning study: TPE (seeded) over the method's declared search
  space (plus the shared lr and weight decay with ``tune_shared``), objective = a validation metric, per-epoch reports
  for the pruner. Test data is never read here (``eval_test`` is off unless an oracle table was asked for). ``ident``
  hashes everything the tuning depends on, so changing a setting starts a new study instead of mixing results.
* ``<benchmark>:<method>:final`` holds the final seed runs, enqueued with their seed as a fixed param and the whole
  RunConfig as user attributes; seeds are shared across methods so comparisons are paired.

Work is claimed through the storage, so any number of processes (``regbench run``, ``regbench worker``) can share one
benchmark. Equal budget and "each run once" are enforced when a trial is claimed, not when it is planned, because two
workers can plan the same thing at the same moment: a tuning trial whose lower-numbered siblings already spent the
budget, a tuning trial whose configuration another trial of its study already holds (done, pruned, diverged, running
or queued), or a final run whose config another trial already holds, ends at once as FAIL with a ``skipped:`` reason
and is counted nowhere, and the sampler is asked again. So ``--trials N`` buys N distinct configurations however many
workers share the study; each worker seeds its sampler from the benchmark's seed and its own identity, so concurrent
workers do not propose the same start-up points (``regbench run`` alone uses the benchmark's seed: reproducible).
A dead worker's trial goes stale (heartbeat) and is retried once with the same params (Optuna's retry callback); a diverged run (NaN/inf loss) is FAIL with its reason, counts against the budget and is not retried.
"""
from __future__ import annotations

import hashlib
import json
import math
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import optuna
from optuna.trial import TrialState

import regbench
from regbench import faults, registry
from regbench.config import RunConfig
from regbench.errors import ConfigError, RegbenchError
from regbench.store import INTERRUPTED, SPEC_ATTR, final_study_name, retry_callback
from regbench.store import trials_of as store_trials

optuna.logging.set_verbosity(optuna.logging.ERROR)  # we print our own one line per trial

TUNE_SEED = 10_000              # training seed of every tuning trial: distinct from the final seeds 0..N-1
OBJECTIVES = {"val_acc": "maximize", "val_nll": "minimize"}
PRUNERS = ("none", "median", "hyperband")
SHARED_PREFIX = "shared."       # shared training hparams in a tuning trial's params: shared.lr, shared.weight_decay
SKIPPED = "skipped:"            # fail_reason prefix of trials that never trained (budget reached, duplicate, no work)
DIVERGED = "diverged:"
POLL_SECONDS = 2.0              # how often a worker with nothing to claim looks again
REASK = 3                       # duplicate proposals in a row from the sampler before a distinct random point is queued
DISTINCT_DRAWS = 200            # random draws looking for an untaken configuration; none found = the space is exhausted
EXHAUSTED_ATTR = "exhausted"    # tuning study attr: how many distinct configurations its search space held


class _Skip(Exception):
    """Ends a claimed trial that must not train (its fail_reason says why)."""


@dataclass(frozen=True)
class Protocol:
    trials: int = 0                     # tuning trials per method; 0 with no epoch budget = defaults only
    budget_epochs: int | None = None    # or: tune until this many training epochs are spent per method
    pruner: str = "median"
    objective: str = "val_acc"
    tune_shared: bool = False           # also tune lr and weight decay, for every method including baseline
    oracle: bool = False                # also evaluate tuning trials on test, for an oracle table labelled as such
    sampler_seed: int = 0

    def __post_init__(self):
        if self.trials < 0:
            raise ConfigError(f"--trials must be >= 0 (0 = defaults only), got {self.trials}")
        if self.budget_epochs is not None and self.budget_epochs < 1:
            raise ConfigError(f"--budget-epochs must be at least 1, got {self.budget_epochs}")
        if self.pruner not in PRUNERS:
            raise ConfigError(f"unknown pruner {self.pruner!r}; choose one of: {', '.join(PRUNERS)}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"unknown objective {self.objective!r}; choose one of: {', '.join(OBJECTIVES)}")

    @property
    def tunes(self) -> bool:
        return self.trials > 0 or self.budget_epochs is not None

    @property
    def direction(self) -> str:
        return OBJECTIVES[self.objective]


@dataclass
class Benchmark:
    """What one ``regbench run`` asked for; stored as the spec so workers and reports need nothing else."""

    name: str
    base: RunConfig                         # the shared recipe, dataset and split (method/hparams/seed are set per run)
    fixed: dict[str, dict]                  # method -> hparams fixed by --set (typed), never tuned
    seeds: list[int]
    protocol: Protocol = field(default_factory=Protocol)
    command: str = ""
    extra: dict = field(default_factory=dict)
    _space_cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def methods(self) -> list[str]:
        return list(self.fixed)

    def ident(self, method: str) -> str:
        """Hash of everything a method's tuning depends on (not the seeds, not the trial count: those may grow)."""
        keyed = self.base.replace(method=method, hparams={}, seed=0).keyed()
        proto = {k: v for k, v in asdict(self.protocol).items() if k not in ("trials", "budget_epochs", "oracle")}
        blob = json.dumps({"run": keyed, "fixed": self.fixed[method], "protocol": proto}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def tunes(self, method: str) -> bool:
        """Tuning a method with nothing to search (baseline without --tune-shared) would repeat one run: skip it."""
        if not self.protocol.tunes:
            return False
        if method not in self._space_cache:
            self._space_cache[method] = space_keys(self, method)
        return bool(self._space_cache[method])

    def tune_study_name(self, method: str) -> str:
        return f"{self.name}:{method}:tune:{self.ident(method)}"

    def default_hparams(self, method: str) -> dict:
        return registry.method_class(method).resolve(self.fixed[method])

    def final_configs(self, method: str, hparams: dict, shared: dict) -> list[RunConfig]:
        return [self.base.replace(method=method, hparams=hparams, seed=s, eval_test=True, **shared)
                for s in self.seeds]

    def spec(self) -> dict:
        return {
            "benchmark": self.name, "command": self.command, "seeds": self.seeds, "base": self.base.to_json(),
            "protocol": asdict(self.protocol), "dataset": self.base.dataset, "model": self.base.model,
            "epochs": self.base.epochs, "shift": self.base.shift,
            "methods": {m: {"fixed": self.fixed[m], "ident": self.ident(m), "hparams": self.default_hparams(m),
                            "tune_study": self.tune_study_name(m) if self.tunes(m) else None,
                            "space": space_keys(self, m)}
                        for m in self.methods},
            **self.extra,
        }

    @classmethod
    def from_spec(cls, spec: dict) -> Benchmark:
        return cls(name=spec["benchmark"], base=RunConfig.from_json(spec["base"]),
                   fixed={m: info["fixed"] for m, info in spec["methods"].items()}, seeds=list(spec["seeds"]),
                   protocol=Protocol(**spec["protocol"]), command=spec.get("command", ""),
                   extra={k: spec[k] for k in ("split_hash", "storage", "tracking_uri", "heartbeat") if k in spec})


# ---- search spaces ------------------------------------------------------------------------------------------------

class _FixedTrial:
    """A trial seen through --set: a fixed hparam returns its value without being suggested, so the sampler only
    searches what is free (a value outside the declared range or choices is still allowed, as the user asked)."""

    def __init__(self, trial, fixed: dict):
        self._trial, self._fixed = trial, fixed

    def _suggest(self, kind, name, *args, **kwargs):
        if name in self._fixed:
            return self._fixed[name]
        return getattr(self._trial, kind)(name, *args, **kwargs)

    def suggest_float(self, name, *a, **k):
        return self._suggest("suggest_float", name, *a, **k)

    def suggest_int(self, name, *a, **k):
        return self._suggest("suggest_int", name, *a, **k)

    def suggest_categorical(self, name, *a, **k):
        return self._suggest("suggest_categorical", name, *a, **k)


def suggest(bench: Benchmark, method: str, trial) -> tuple[dict, dict]:
    """(method hparams, shared recipe changes) for one tuning trial; raises HparamError on an invalid value."""
    cls = registry.method_class(method)
    sampled = cls.search_space(_FixedTrial(trial, bench.fixed[method]))
    hparams = cls.resolve({**sampled, **bench.fixed[method]})
    shared = {}
    if bench.protocol.tune_shared:
        lr = bench.base.lr
        shared["lr"] = trial.suggest_float(f"{SHARED_PREFIX}lr", lr / 10, lr * 10, log=True)
        shared["weight_decay"] = trial.suggest_float(f"{SHARED_PREFIX}weight_decay", 1e-6, 1e-2, log=True)
    return hparams, shared


def space_keys(bench: Benchmark, method: str) -> list[str]:
    """The params a tuning trial of ``method`` searches (the method's space minus --set names, plus shared ones)."""
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    suggest(bench, method, trial)
    return list(trial.distributions)


def check_search_spaces(bench: Benchmark, check: Callable[[str, dict], None] | None = None, draws: int = 16) -> None:
    """Sample each space a few times in memory before anything is written, so a space that yields an invalid hparam
    (with these --set values), or one the model rejects (``check``: a dry-run attach), fails in one line instead of
    mid-sweep."""
    if not bench.protocol.tunes:
        return
    for method in bench.methods:
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        seen = set()
        for _ in range(draws):
            trial = study.ask()
            try:
                hparams, _ = suggest(bench, method, trial)
                key = json.dumps(hparams, sort_keys=True, default=str)
                if check is not None and key not in seen:
                    seen.add(key)
                    check(method, hparams)
            except RegbenchError as exc:
                raise ConfigError(f"the search space of {method!r} yields an invalid hparam ({exc}); fix the "
                                  f"method's search_space or fix that hparam with --set") from None
            study.tell(trial, 0.0)


def worker_identity() -> str:
    """This process among the benchmark's workers: host and pid (recorded in each trial's ``env.worker``)."""
    import os
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


def sampler_seed(base: int, worker: str | None) -> int:
    """The sampler seed of one process: the benchmark's own seed for ``regbench run`` (``worker`` None), so a run is
    reproducible; for a worker, a seed derived from it and the worker's identity, so workers that start together
    draw different start-up points instead of the same ones."""
    if worker is None:
        return base
    return int.from_bytes(hashlib.sha256(f"{base}:{worker}".encode()).digest()[:4], "big")


def _sampler(bench: Benchmark, seed: int) -> optuna.samplers.BaseSampler:
    # constant_liar: trials that other workers are running count as poor results, so TPE looks elsewhere meanwhile
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


def _pruner(bench: Benchmark) -> optuna.pruners.BasePruner:
    epochs = bench.base.epochs
    if bench.protocol.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs)
    if bench.protocol.pruner == "median":
        # The first few trials and the first third of training are never pruned: one-cycle and cosine schedules
        # rank configurations unreliably early on.
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=max(1, epochs // 3))
    return optuna.pruners.NopPruner()


# ---- the store ----------------------------------------------------------------------------------------------------

def environment(device: str) -> dict:
    """Provenance recorded with every run (benchopt-style): versions, device, git commit."""
    # timm's version from its metadata: ``import timm`` alone costs ~2 s (torchvision), for runs that never use it
    from importlib.metadata import version

    import torch

    env = {"regbench": regbench.__version__, "torch": torch.__version__, "timm": version("timm"),
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


SPEC_LABEL = ("regbench benchmark record, not a study: it holds no trials by design, only the benchmark's spec and "
              "each method's selected configuration. The runs are in the studies NAME:METHOD:tune:… (tuning) and "
              "NAME:METHOD:final (one trial per seed of the selected configuration).")
FINAL_LABEL = ("regbench final runs: one trial per seed of the configuration selected on validation. Every param "
               "here is that configuration, fixed (a range of one value); the seed is the user attribute 'seed', not "
               "a param. Only the seed varies, so there is no importance to read (equal bars are the dashboard's "
               "default when none can be computed) and no 'best' trial to pick: compare methods in the leaderboard "
               "or the MLflow parent runs.")


def save_spec(storage, bench: Benchmark) -> None:
    """The benchmark's record: a study named after the benchmark holding the spec as a user attribute (the name every
    store since the first uses, so old stores stay readable), labelled ``about`` so Optuna's dashboard does not show
    it as an empty study to be read."""
    study = optuna.create_study(study_name=bench.name, storage=storage, load_if_exists=True)
    if study.user_attrs.get("about") != SPEC_LABEL:  # first, so a dashboard lists it above the long spec
        study.set_user_attr("about", SPEC_LABEL)
    study.set_user_attr(SPEC_ATTR, bench.spec())


def final_params(cfg: RunConfig) -> dict[str, tuple]:
    """A final run's Optuna params, name -> (value, distribution): the method and the selected configuration's
    hparams, each a range of one value, and never the seed (the user attribute ``seed``).

    Why not the seed (issue 20): optuna-dashboard's importance panel plots every param. The seed as a 0…2³¹ range
    read "seed 1.00"; as a one-value range it still did, because Optuna normalizes all-zero importances to equal
    shares (0/0 -> 1/n) and the seed was the only param; and with no param at all the dashboard fails
    (1/len of an empty search space: "internal server error"). So the params are what the runs share, the
    configuration, shown once per trial in the dashboard's table; the panel's equal bars over them say nothing
    varies, and the study's ``about`` attribute says so. Which runs are the same is decided by the config key,
    not by params, so nothing else reads them."""
    params = {"method": (cfg.method, optuna.distributions.CategoricalDistribution((cfg.method,)))}
    for name, value in cfg.hparams.items():
        if isinstance(value, int) and not isinstance(value, bool):
            dist = optuna.distributions.IntDistribution(value, value)
        elif isinstance(value, float) and math.isfinite(value):
            dist = optuna.distributions.FloatDistribution(value, value)
        else:
            if not (value is None or isinstance(value, (bool, str))):  # a list, a dict, a non-finite float
                value = json.dumps(value, sort_keys=True)
            dist = optuna.distributions.CategoricalDistribution((value,))
        params[name] = (value, dist)
    return params


def record_final(trial, cfg: RunConfig) -> None:
    """Record a claimed final run's params (``final_params``) and its seed as a user attribute (queued by stores
    written before the attribute existed: their config has it), and label the final study."""
    for name, (value, dist) in final_params(cfg).items():
        if isinstance(dist, optuna.distributions.IntDistribution):
            trial.suggest_int(name, value, value)
        elif isinstance(dist, optuna.distributions.FloatDistribution):
            trial.suggest_float(name, value, value)
        else:
            trial.suggest_categorical(name, [value])
    if trial.user_attrs.get("seed") != cfg.seed:
        trial.set_user_attr("seed", cfg.seed)
    if trial.study.user_attrs.get("about") != FINAL_LABEL:
        trial.study.set_user_attr("about", FINAL_LABEL)


def selection_attr(method: str, ident: str) -> str:
    return f"selected:{method}:{ident}"


def skipped(trial) -> bool:
    return trial.state == TrialState.FAIL and str(trial.user_attrs.get("fail_reason", "")).startswith(SKIPPED)


def diverged(trial) -> bool:
    return trial.state == TrialState.FAIL and str(trial.user_attrs.get("fail_reason", "")).startswith(DIVERGED)


def interrupted(trial) -> bool:
    """Stopped by a signal or a dead process, with a queued copy that resumes it: not a failure of the run."""
    return trial.state == TrialState.FAIL and str(trial.user_attrs.get("fail_reason", "")).startswith(INTERRUPTED)


# Attributes of one attempt, not of the run: a resumed copy starts without them.
_ATTEMPT_ATTRS = ("fail_reason", "budget", "env", "split_hash", "resumed_from_epoch", "resumed_from_step",
                  "resumes_trial")


def mark_resumable(study: optuna.Study, trial) -> None:
    """A trial stopped by Ctrl-C/SIGTERM is not a failed run: queue a copy with the same params (Optuna hands an
    enqueued trial's fixed params back from ``suggest``) and user attrs, hence the same config key and mid-run
    checkpoint, and say so in the stopped trial's reason (Optuna itself records it FAIL: it has no "paused" state).
    Unlike Optuna's stale-trial retry there is no cap: a long run may be stopped and resumed any number of times.
    A tuning trial stopped before it had a configuration has nothing to resume; TPE simply samples anew."""
    epochs = trial.user_attrs.get("budget", {}).get("epochs", 0)
    if "config" not in trial.user_attrs:
        trial.set_user_attr("fail_reason", f"{INTERRUPTED} stopped by the user before it started")
        return
    attrs = {k: v for k, v in trial.user_attrs.items() if k not in _ATTEMPT_ATTRS}
    params = dict(trial.params)  # a final run's are its fixed configuration (final_params), or none yet
    before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))}
    study.enqueue_trial(params, user_attrs={**attrs, "resumes_trial": trial.number})
    queued = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)) if t.number not in before]
    trial.set_user_attr("fail_reason", f"{INTERRUPTED} stopped by the user after epoch {epochs}; queued to resume "
                                       f"as trial {max(queued) if queued else '?'}")


def tuning_spent(trials, planned_epochs: int, below: int | None = None) -> tuple[int, int]:
    """(trials, epochs) a tuning study has spent or committed: finished, pruned, diverged, running and queued trials
    count; skipped and interrupted ones do not (an interrupted trial is retried, and the retry counts)."""
    n = epochs = 0
    for t in trials:
        if below is not None and t.number >= below:
            continue
        if t.state == TrialState.FAIL and not diverged(t):
            continue
        n += 1
        epochs += int(t.user_attrs.get("budget", {}).get("epochs", planned_epochs))
    return n, epochs


def holds_configuration(trial) -> bool:
    """Whether a trial holds its configuration in its tuning study: done, pruned, diverged, running or queued (the
    trials that count against the budget). Skipped and interrupted ones do not: an interrupted one's retry does."""
    return not (trial.state == TrialState.FAIL and not diverged(trial))


def duplicate_of(trials, number: int, key: str) -> int | None:
    """The number of another trial that holds ``trial``'s config key, if any. The claimant writes its key first and
    then looks, so of two trials racing for one key at least one sees the other; a running trial is yielded to
    whatever its number (both may yield, then the sampler is simply asked again), so no key is ever trained twice."""
    for other in trials:
        if other.number != number and other.user_attrs.get("config_key") == key and holds_configuration(other):
            return other.number
    return None


def budget_left(protocol: Protocol, spent: tuple[int, int]) -> bool:
    n, epochs = spent
    if protocol.trials and n >= protocol.trials:
        return False
    return protocol.budget_epochs is None or epochs < protocol.budget_epochs


def fail_dead_trials(storage, study_names) -> int:
    """Fail every RUNNING trial of these studies as interrupted and queue its retry. Only for a caller that knows no
    other process is working (the output-dir lock of a local store); shared storages rely on the heartbeat."""
    callback, n = retry_callback(), 0
    for name in study_names:
        try:
            study = optuna.load_study(study_name=name, storage=storage)
        except KeyError:
            continue
        for t in study.get_trials(deepcopy=True, states=(TrialState.RUNNING,)):
            storage.set_trial_user_attr(t._trial_id, "fail_reason", f"{INTERRUPTED} its process died")
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            faults.point("recover")  # test hook: killed here, the next run queues the lost retry (store.py)
            callback(study, t)  # the retry copies the trial as it was before it failed (no fail_reason)
            n += 1
    return n


def _fail_stale(study) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optuna.storages.fail_stale_trials(study)


# ---- running ------------------------------------------------------------------------------------------------------

@dataclass
class Outcome:
    """What happened to one claimed trial, for the caller's progress line and its MLflow mirror."""

    study: optuna.Study
    trial: optuna.trial.FrozenTrial
    kind: str            # "tune" | "final"
    method: str


class Runner:
    """Claims and runs this benchmark's trials from the storage until none is left (one process's share)."""

    def __init__(self, storage, bench: Benchmark, splits, progress: bool = False,
                 on_trial: Callable[[Outcome], None] | None = None, wait: bool = True,
                 checkpoint_dir: Path | None = None, checkpoint_seconds: float = 60.0, keep_checkpoints: bool = False,
                 parallel_seeds: int = 1, worker: str | None = None):
        self.storage, self.bench, self.splits = storage, bench, splits
        # None: `regbench run` (the benchmark's sampler seed); else this worker's identity (its own derived seed)
        self.worker = worker
        self.seed = sampler_seed(bench.protocol.sampler_seed, worker)
        self._duplicates: dict[str, int] = {}  # method -> duplicate proposals in a row from its sampler
        self.parallel_seeds = parallel_seeds  # final seeds of one config trained at once (engine.train_group)
        self.progress, self.on_trial, self.wait = progress, on_trial or (lambda _o: None), wait
        # Mid-run checkpoints (regbench/checkpoint.py), one file per config key: a killed trial's retry has the same
        # config, hence the same file, and resumes from it. None = off.
        self.checkpoint_dir, self.checkpoint_seconds = checkpoint_dir, checkpoint_seconds
        self.keep_checkpoints = keep_checkpoints
        self._studies: dict[str, optuna.Study] = {}

    # studies are created lazily and cached; load_if_exists makes concurrent creation safe
    def _study(self, name: str, direction: str = "maximize", tuning: bool = False) -> optuna.Study:
        if name not in self._studies:
            kwargs = {"sampler": _sampler(self.bench, self.seed), "pruner": _pruner(self.bench)} if tuning else {}
            self._studies[name] = optuna.create_study(study_name=name, storage=self.storage, direction=direction,
                                                      load_if_exists=True, **kwargs)
        return self._studies[name]

    def tune_study(self, method: str) -> optuna.Study:
        return self._study(self.bench.tune_study_name(method), self.bench.protocol.direction, tuning=True)

    def final_study(self, method: str) -> optuna.Study:
        return self._study(final_study_name(self.bench.name, method))

    def run(self) -> None:
        """Work method by method (tuning, then its finals); when nothing is claimable but others are still running,
        wait for them (a worker) or return (``wait=False``)."""
        pending = list(self.bench.methods)
        while pending:
            progressed = False
            for method in list(pending):
                state = self.step(method)
                if state == "done":
                    pending.remove(method)
                elif state == "ran":
                    progressed = True
                    break
            if pending and not progressed:
                if not self.wait:
                    return
                time.sleep(POLL_SECONDS)

    def step(self, method: str) -> str:
        """Run at most one trial of ``method``: "ran", "wait" (others hold its remaining work) or "done"."""
        if self.bench.tunes(method):
            tune = self.tune_study(method)
            _fail_stale(tune)
            trials = tune.get_trials(deepcopy=False)
            if self._duplicates.get(method, 0) >= REASK and self._tuning_open(tune, trials):
                self._duplicates[method] = 0
                self._queue_distinct(tune, method, trials)
                trials = tune.get_trials(deepcopy=False)
            if self._tuning_open(tune, trials) or any(t.state == TrialState.WAITING for t in trials):
                self._run_one(tune, self._tune_objective(tune, method), "tune", method)
                return "ran"
            if any(t.state == TrialState.RUNNING for t in trials):
                return "wait"
        final = self.final_study(method)
        _fail_stale(final)
        configs = self.select(method)
        waiting = enqueue_missing(final, configs)
        if waiting:
            self._run_one(final, self._final_objective(final), "final", method)
            return "ran"
        keys = {c.key() for c in configs}
        if any(t.user_attrs.get("config_key") in keys for t in final.get_trials(deepcopy=False,
                                                                                  states=(TrialState.RUNNING,))):
            return "wait"
        return "done"

    def _tuning_open(self, tune: optuna.Study, trials) -> bool:
        """Budget left, and the search space not found exhausted."""
        return budget_left(self.bench.protocol, tuning_spent(trials, self.bench.base.epochs)) and \
            EXHAUSTED_ATTR not in tune.user_attrs

    def _queue_distinct(self, tune: optuna.Study, method: str, trials) -> None:
        """The sampler keeps proposing configurations other trials hold (TPE converged, or a small discrete space):
        queue a random configuration no trial holds instead (the study's next trial claims it, with its key already
        written), or record that the search space has none left, which ends the method's tuning."""
        taken = {t.user_attrs.get("config_key") for t in trials if holds_configuration(t)}
        draws = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=self.seed + len(trials)))
        for _ in range(DISTINCT_DRAWS):
            probe = draws.ask()
            try:
                cfg = self._tune_config(method, probe)
            except RegbenchError:  # an invalid corner of the space: the sampler would have skipped it too
                continue
            if cfg.key() not in taken:
                tune.enqueue_trial(probe.params, user_attrs={
                    "config": cfg.to_json(), "config_key": cfg.key(), "kind": "tune", "method": method,
                    "proposed_by": f"random: the sampler proposed taken configurations {REASK} times in a row"})
                return
        tune.set_user_attr(EXHAUSTED_ATTR, len(taken))

    def _tune_config(self, method: str, trial) -> RunConfig:
        hparams, shared = suggest(self.bench, method, trial)
        return self.bench.base.replace(method=method, hparams=hparams, seed=TUNE_SEED,
                                       eval_test=self.bench.protocol.oracle, **shared)

    def select(self, method: str) -> list[RunConfig]:
        """The final configs of the method's selected configuration: its best tuning trial on validation (defaults
        when nothing was tuned or no tuning trial completed), recorded on the benchmark study for the reports."""
        bench = self.bench
        info = {"hparams": bench.default_hparams(method), "shared": {}, "tune_trial": None, "value": None}
        if bench.tunes(method):
            tune = self.tune_study(method)
            done = tune.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if done:
                best = tune.best_trial
                cfg = RunConfig.from_json(best.user_attrs["config"])
                info = {"hparams": cfg.hparams, "shared": {k: getattr(cfg, k) for k in ("lr", "weight_decay")
                                                           if bench.protocol.tune_shared},
                        "tune_trial": best.number, "value": best.value}
            else:
                info["note"] = "no tuning trial completed; the defaults were run"
        configs = bench.final_configs(method, info["hparams"], info["shared"])
        info["group_key"] = configs[0].group_key()
        root = self._study(bench.name)
        attr = selection_attr(method, bench.ident(method))
        if root.user_attrs.get(attr) != info:
            root.set_user_attr(attr, info)
        return configs

    def _run_one(self, study: optuna.Study, objective, kind: str, method: str) -> None:
        from regbench import engine

        ran: list[int] = []

        def wrapped(trial):
            ran.append(trial._trial_id)
            faults.point(kind)
            try:
                return objective(trial)
            except KeyboardInterrupt:  # Ctrl-C or SIGTERM (cli.Terminated), wherever in the trial it landed
                mark_resumable(study, trial)
                raise

        # A signal that lands anywhere in the trial waits for a safe point: the training loop's next step (the trial
        # is then marked resumable) or, when it lands after the loop's last check, the end of this block (the trial
        # is recorded and mirrored first). Raised wherever it landed, it could leave the trial RUNNING in the store
        # (inside Optuna's ask or tell) or its MLflow mirror half-written.
        with engine.stoppable():
            try:
                study.optimize(wrapped, n_trials=1, catch=(engine.Diverged, _Skip))
            except KeyboardInterrupt:
                # The interrupted trial (FAIL "interrupted: …", its resuming copy queued) still reaches the caller's
                # line and MLflow mirror before the process stops.
                if ran and self.storage.get_trial(ran[0]).state != TrialState.RUNNING:
                    self.on_trial(Outcome(study, self.storage.get_trial(ran[0]), kind, method))
                raise
            if ran:
                self.on_trial(Outcome(study, self.storage.get_trial(ran[0]), kind, method))

    def _tune_objective(self, study: optuna.Study, method: str):
        bench = self.bench

        def objective(trial):
            spent = tuning_spent(study.get_trials(deepcopy=False), bench.base.epochs, below=trial.number)
            if not budget_left(bench.protocol, spent):
                trial.set_user_attr("fail_reason", f"{SKIPPED} the tuning budget was already spent by other trials")
                raise _Skip()
            cfg = self._tune_config(method, trial)
            for key, value in (("config", cfg.to_json()), ("config_key", cfg.key()), ("kind", "tune"),
                               ("method", method)):
                trial.set_user_attr(key, value)
            # Written first, then checked: two workers racing for one configuration cannot both train it.
            other = duplicate_of(study.get_trials(deepcopy=False), trial.number, cfg.key())
            if other is not None:
                self._duplicates[method] = self._duplicates.get(method, 0) + 1
                trial.set_user_attr("fail_reason", f"{SKIPPED} trial {other} holds the same configuration; the "
                                                   f"sampler is asked again")
                raise _Skip()
            self._duplicates[method] = 0
            return self._train(trial, cfg, prune=True)
        return objective

    def _final_objective(self, study: optuna.Study):
        def objective(trial):
            if "config" not in trial.user_attrs:  # another worker claimed the last queued run first
                trial.set_user_attr("fail_reason", f"{SKIPPED} no queued run left to claim")
                raise _Skip()
            key = trial.user_attrs["config_key"]
            for other in study.get_trials(deepcopy=False):
                if other.number == trial.number or other.user_attrs.get("config_key") != key:
                    continue
                if other.state == TrialState.COMPLETE or (
                        other.number < trial.number and other.state in (TrialState.RUNNING, TrialState.WAITING)):
                    trial.set_user_attr("fail_reason", f"{SKIPPED} duplicate of trial {other.number}")
                    raise _Skip()
            cfg = RunConfig.from_json(trial.user_attrs["config"])
            record_final(trial, cfg)
            if self.parallel_seeds > 1:
                return self._train_group(study, trial, cfg)
            return self._train(trial, cfg, prune=False)
        return objective

    # -- --parallel-seeds K: the claimed final (the leader) claims up to K-1 queued siblings of its config group
    def _claim_siblings(self, study: optuna.Study, leader, cfg: RunConfig) -> list:
        """Queued final trials of ``cfg``'s group (other seeds), each claimed WAITING -> RUNNING through the storage,
        which refuses a trial another worker claimed first. Skipped: duplicates (the normal claim skips them), configs
        that differ in more than the seed, and runs whose mid-run checkpoint is not at the leader's point (a group
        resumes together only from one step)."""
        from regbench import checkpoint

        def resume_point(c):
            if self.checkpoint_dir is None:
                return None
            return checkpoint.resume_point(checkpoint.path_for(self.checkpoint_dir, c.key()))

        point = resume_point(cfg)
        trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
        claimed = []
        for t in trials:
            if len(claimed) >= self.parallel_seeds - 1:
                break
            key = t.user_attrs.get("config_key")
            if t.state != TrialState.WAITING or "config" not in t.user_attrs or key == cfg.key() or any(
                    o.number != t.number and o.user_attrs.get("config_key") == key and (
                        o.state in (TrialState.COMPLETE, TrialState.RUNNING)
                        or (o.state == TrialState.WAITING and o.number < t.number)) for o in trials):
                continue
            other = RunConfig.from_json(t.user_attrs["config"])
            if other.replace(seed=cfg.seed) != cfg or resume_point(other) != point:
                continue
            if study._storage.set_trial_state_values(t._trial_id, TrialState.RUNNING):  # False: taken meanwhile
                claimed.append((optuna.trial.Trial(study, t._trial_id), other))
        return claimed

    def _train_group(self, study: optuna.Study, leader, cfg: RunConfig) -> float:
        """Train the leader with its claimed siblings in one process (engine.train_group), then record each run
        through ``_train`` exactly as if it had trained alone (same user attrs, reports, fail reasons). Siblings get
        heartbeats while they train, so a dead process leaves them stale and retried like any trial."""
        import contextlib

        from optuna.storages._heartbeat import get_heartbeat_thread

        from regbench import checkpoint, engine

        siblings = self._claim_siblings(study, leader, cfg)
        if not siblings:
            return self._train(leader, cfg, prune=False)
        others = [t for t, _ in siblings]
        for t, c in siblings:
            record_final(t, c)
        started, epochs_done = time.time(), [0] * (1 + len(others))
        try:
            with contextlib.ExitStack() as beats:
                for t in others:
                    beats.enter_context(get_heartbeat_thread(t._trial_id, study._storage))
                configs = [cfg] + [c for _, c in siblings]
                paths = (None if self.checkpoint_dir is None
                         else [checkpoint.path_for(self.checkpoint_dir, c.key()) for c in configs])
                results = engine.train_group(configs, self.splits,
                                             lambda c: registry.build_method(c.method, c.hparams),
                                             progress=self.progress, checkpoints=paths,
                                             checkpoint_seconds=self.checkpoint_seconds,
                                             keep_checkpoint=self.keep_checkpoints,
                                             on_epoch=lambda k, epoch, row: epochs_done.__setitem__(k, epoch))
        except KeyboardInterrupt:  # the leader is marked resumable by _run_one
            for t, epochs in zip([leader, *others], epochs_done):  # what mark_resumable reports as trained
                t.set_user_attr("budget", {"epochs": epochs, "seconds": time.time() - started})
            for t in others:
                mark_resumable(study, t)
                study.tell(t, state=TrialState.FAIL)
            raise
        except BaseException as exc:
            for t in [leader, *others]:
                t.set_user_attr("fail_reason", f"error: {type(exc).__name__}: {exc}"[:500])
            for t in others:
                study.tell(t, state=TrialState.FAIL)
            raise
        share = (time.time() - started) / len(results)  # each run's share of the group's wall time
        for (t, c), result in zip(siblings, results[1:]):
            try:
                study.tell(t, self._record(t, c, result, started, share))
            except engine.Diverged:  # fail_reason set by _train, as for a run trained alone
                study.tell(t, state=TrialState.FAIL)
            self.on_trial(Outcome(study, self.storage.get_trial(t._trial_id), "final", c.method))
        return self._record(leader, cfg, results[0], started, share)

    def _record(self, trial, cfg: RunConfig, result, started: float, share: float) -> float:
        """``_train`` on a run trained in a group: its epochs are replayed to the trial, its result (or Diverged) is
        what ``engine.train`` would have returned (or raised); the budget and timings count the run's share."""
        def replay(_cfg, _splits, _method, on_epoch=None, **_kwargs):
            for row in getattr(result, "history", []):
                on_epoch(int(row["epoch"]), row)
            if isinstance(result, BaseException):
                raise result
            return result

        try:
            return self._train(trial, cfg, prune=False, trainer=replay)
        finally:
            trial.set_user_attr("budget", {**trial.user_attrs.get("budget", {}), "seconds": share})
            if "timings" in trial.user_attrs:
                trial.set_user_attr("timings", {**trial.user_attrs["timings"], "started": started})

    def _train(self, trial, cfg: RunConfig, prune: bool, trainer: Callable | None = None) -> float:
        from regbench import engine

        objective = self.bench.protocol.objective
        device = str(engine.resolve_device(cfg.device))
        trial.set_user_attr("env", {**environment(device), "worker": self.worker or f"run:{worker_identity()}"})
        trial.set_user_attr("split_hash", self.splits.split_hash)
        epochs_done = [0]

        def on_epoch(epoch, row):
            epochs_done[0] = epoch
            faults.point("epoch")
            trial.report(row[objective], epoch)
            if prune and trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {epoch} ({objective} {row[objective]:.4f})")

        method = registry.build_method(cfg.method, cfg.hparams)
        started = time.time()

        def spend():
            trial.set_user_attr("budget", {"epochs": epochs_done[0], "seconds": time.time() - started})

        from regbench import checkpoint

        ckpt = None if self.checkpoint_dir is None else checkpoint.path_for(self.checkpoint_dir, cfg.key())
        try:
            result = (trainer or engine.train)(cfg, self.splits, method, on_epoch=on_epoch, progress=self.progress,
                                  checkpoint=ckpt, checkpoint_seconds=self.checkpoint_seconds,
                                  keep_checkpoint=self.keep_checkpoints)
        except optuna.TrialPruned:
            spend()
            if not self.keep_checkpoints:  # a pruned trial is never retried: nothing will resume from it
                checkpoint.remove(ckpt)
            raise
        except engine.Diverged as exc:
            spend()
            trial.set_user_attr("fail_reason", f"{DIVERGED} {exc}")
            raise
        except KeyboardInterrupt:  # marked resumable by _run_one
            spend()
            raise
        except BaseException as exc:
            spend()
            trial.set_user_attr("fail_reason", f"error: {type(exc).__name__}: {exc}"[:500])
            raise
        spend()
        if result.resumed_from_step:
            trial.set_user_attr("resumed_from_epoch", result.resumed_from_epoch)
            trial.set_user_attr("resumed_from_step", result.resumed_from_step)
        trial.set_user_attr("metrics", result.metrics)
        trial.set_user_attr("history", result.history)
        trial.set_user_attr("diagnostic_layers", result.diagnostic_layers)
        trial.set_user_attr("timings", {"seconds": result.seconds, "started": started,
                                        "seconds_per_epoch": result.metrics["seconds_per_epoch"]})
        return result.metrics[objective]


def enqueue_missing(study: optuna.Study, configs: list[RunConfig]) -> int:
    """Queue each config that is not done, queued, running or diverged; returns how many are waiting to be run."""
    by_key: dict[str, list] = {}
    for t in study.get_trials(deepcopy=False):
        by_key.setdefault(t.user_attrs.get("config_key"), []).append(t)
    waiting = 0
    for cfg in configs:
        states = {t.state for t in by_key.get(cfg.key(), [])}
        if TrialState.WAITING in states:
            waiting += 1
        if states & {TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING}:
            continue
        # A diverged run is deterministic: retrying it would diverge again and waste the budget.
        if any(diverged(t) for t in by_key.get(cfg.key(), [])):
            continue
        study.enqueue_trial({name: value for name, (value, _) in final_params(cfg).items()}, user_attrs={
            "config": cfg.to_json(), "config_key": cfg.key(), "group_key": cfg.group_key(), "method": cfg.method,
            "kind": "final", "seed": cfg.seed})
        waiting += 1
    return waiting


def study_names(bench: Benchmark) -> list[str]:
    names = [final_study_name(bench.name, m) for m in bench.methods]
    names += [bench.tune_study_name(m) for m in bench.methods if bench.tunes(m)]
    return names


def _seed(trial) -> int | None:
    return json.loads(trial.user_attrs["config"])["seed"] if "config" in trial.user_attrs else None


def _counts(trials) -> dict[str, int]:
    counts = {"done": 0, "running": 0, "failed": 0, "pruned": 0, "queued": 0, "interrupted": 0}
    for t in trials:
        if skipped(t):
            continue
        if interrupted(t):  # its queued copy resumes it: shown apart, never as a failed run
            counts["interrupted"] += 1
            continue
        key = {TrialState.COMPLETE: "done", TrialState.RUNNING: "running", TrialState.FAIL: "failed",
               TrialState.PRUNED: "pruned", TrialState.WAITING: "queued"}[t.state]
        counts[key] += 1
    return counts


def _resumable(counts: dict[str, int]) -> str:
    n = counts["interrupted"]
    return f", {n} interrupted (resumable, not failed)" if n else ""


def _tuning_trials(storage, bench: Benchmark, method: str) -> tuple[list, int | None]:
    """A method's tuning trials and, when its search space ran out, how many distinct configurations it holds."""
    try:
        tune = optuna.load_study(study_name=bench.tune_study_name(method), storage=storage)
    except KeyError:
        return [], None
    return tune.get_trials(deepcopy=False), tune.user_attrs.get(EXHAUSTED_ATTR)


def progress(storage, bench: Benchmark) -> list[str]:
    """One line per method: tuning and final runs done, running, failed, pruned, remaining (for `regbench status`).
    An interrupted trial (Ctrl-C, SIGTERM, a dead worker) is not a failure: its resuming copy is queued or running,
    and the line says how many were interrupted only when some were."""
    lines = []
    root = optuna.load_study(study_name=bench.name, storage=storage)
    for method in bench.methods:
        parts = []
        if bench.protocol.tunes and not bench.tunes(method):
            parts.append("nothing to tune")
        if bench.tunes(method):
            trials, exhausted = _tuning_trials(storage, bench, method)
            c = _counts(trials)
            n, epochs = tuning_spent(trials, bench.base.epochs)
            p = bench.protocol
            left = []
            if p.trials:
                left.append(f"{max(p.trials - n, 0)} trials")
            if p.budget_epochs:
                left.append(f"{max(p.budget_epochs - epochs, 0)} epochs")
            note = ""
            if exhausted is not None:
                left, note = ["0 trials"], f" (its search space holds only {exhausted} distinct configurations)"
            parts.append(f"tuning {c['done']} done, {c['running']} running, {c['pruned']} pruned, {c['failed']} "
                         f"failed{_resumable(c)}, {' / '.join(left)} remaining{note}")
        selected = root.user_attrs.get(selection_attr(method, bench.ident(method)))
        if bench.tunes(method) and selected is None:
            parts.append(f"finals: {len(bench.seeds)} seeds wait for tuning")
        else:
            group = selected["group_key"] if selected else bench.final_configs(
                method, bench.default_hparams(method), {})[0].group_key()
            try:
                trials = optuna.load_study(study_name=final_study_name(bench.name, method),
                                           storage=storage).get_trials(deepcopy=False)
            except KeyError:
                trials = []
            trials = [t for t in trials if t.user_attrs.get("group_key") == group and _seed(t) in bench.seeds]
            c = _counts(trials)
            seeds_done = {_seed(t) for t in trials if t.state == TrialState.COMPLETE}
            lost = {_seed(t) for t in trials if diverged(t)}
            busy = {_seed(t) for t in trials if t.state == TrialState.RUNNING}
            remaining = len(set(bench.seeds) - seeds_done - lost - busy)
            parts.append(f"finals {len(seeds_done)} done, {c['running']} running, {c['failed']} failed"
                         f"{_resumable(c)}, {remaining} remaining")
        lines.append(f"  {method}: " + "; ".join(parts))
    return lines


def run_counts(storage, bench: Benchmark) -> tuple[int, int | None]:
    """(runs done, runs planned) for the whole benchmark, whichever process ran them: tuning trials that count against
    the budget and have ended, plus final seeds done or diverged. Planned is None when tuning is budgeted in epochs
    (the number of trials is not known in advance). For the ``[done/planned]`` of every worker's progress lines."""
    done, planned = 0, 0 if not bench.protocol.budget_epochs else None
    root = optuna.load_study(study_name=bench.name, storage=storage)
    for method in bench.methods:
        if bench.tunes(method):
            trials, exhausted = _tuning_trials(storage, bench, method)
            ended = sum(holds_configuration(t) and t.state not in (TrialState.RUNNING, TrialState.WAITING)
                        for t in trials)
            if planned is not None:
                budget = bench.protocol.trials if exhausted is None else min(bench.protocol.trials, exhausted)
                planned += budget
                ended = min(ended, budget)
            done += ended
        if planned is not None:
            planned += len(bench.seeds)
        selected = root.user_attrs.get(selection_attr(method, bench.ident(method)))
        if selected is None:
            continue
        finals = [t for t in store_trials(storage, final_study_name(bench.name, method))
                  if t.user_attrs.get("group_key") == selected["group_key"] and _seed(t) in bench.seeds]
        done += len({_seed(t) for t in finals if t.state == TrialState.COMPLETE or diverged(t)})
    return done, planned
