"""The run record: what one training run is in the store, defined once.

Every training run is one Optuna trial (docs/architecture.md, "The store is the record"). This module is the only
place that names the studies of a benchmark, the user attributes of a trial or a study, and the reason prefixes of a
failed trial; writers (the protocol, workers) and readers (status, report, export, the MLflow mirror, suites) go
through it. It imports neither torch nor training code, so reports can use it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from optuna.trial import TrialState

from regbench.config import RunConfig

# ---- study names ----------------------------------------------------------------------------------------------------


def spec_study_name(benchmark: str) -> str:
    """The benchmark's own study: it holds no trials, only the spec and each method's selection."""
    return benchmark


def tune_study_name(benchmark: str, method: str, ident: str) -> str:
    return f"{benchmark}:{method}:tune:{ident}"


def final_study_name(benchmark: str, method: str) -> str:
    return f"{benchmark}:{method}:final"


def selection_attr(method: str, ident: str) -> str:
    """The benchmark study's attribute naming the configuration a method's finals run."""
    return f"{SELECTED_PREFIX}{method}:{ident}"


# ---- attribute names ------------------------------------------------------------------------------------------------
# Trial user attributes (one run). Values are JSON-serialisable; CONFIG is the RunConfig's canonical JSON string.
CONFIG = "config"                  # RunConfig.to_json()
CONFIG_KEY = "config_key"          # sha256 of CONFIG: which runs are the same run
GROUP_KEY = "group_key"            # key of the configuration without its seed: a method's finals share it
SEED = "seed"                      # a final run's training seed (not an Optuna param: see docs/architecture.md)
METRICS = "metrics"                # final metrics, fractions (test_acc, val_acc, gap, test_ece, …)
HISTORY = "history"                # one dict per epoch
DIAGNOSTIC_LAYERS = "diagnostic_layers"
TIMINGS = "timings"                # {"seconds": run time, "started": epoch seconds, …}
BUDGET = "budget"                  # {"epochs": trained, "seconds": wall} of this attempt
ENV = "env"                        # provenance: versions, device, git commit, worker
SPLIT_HASH = "split_hash"
FAIL_REASON = "fail_reason"        # why a FAIL trial failed; starts with one of the reason prefixes below
RESUMED_FROM_EPOCH = "resumed_from_epoch"
RESUMED_FROM_STEP = "resumed_from_step"
RESUMES_TRIAL = "resumes_trial"    # the interrupted trial this queued copy resumes
KIND = "kind"                      # "tune" | "final"
METHOD = "method"
PROPOSED_BY = "proposed_by"        # a tuning trial queued by regbench instead of its sampler, and why
# Attributes of one attempt, not of the run: a retried or resumed copy starts without them.
ATTEMPT_ATTRS = (FAIL_REASON, BUDGET, ENV, SPLIT_HASH, RESUMED_FROM_EPOCH, RESUMED_FROM_STEP, RESUMES_TRIAL)

# Study user attributes.
ABOUT = "about"                    # what the study is, first in optuna-dashboard's list
SPEC = "spec"                      # the benchmark study: the protocol the benchmark's name binds
SELECTED_PREFIX = "selected:"      # the benchmark study: selected:<method>:<ident> -> selection
EXHAUSTED = "exhausted"            # a tuning study: how many distinct configurations its space held

# Trial system attributes (kept out of the user's view).
HEARTBEAT = "regbench:heartbeat"   # the journal store's heartbeat, seconds since the epoch
RETRY_HISTORY = "retry_history"    # Optuna's retry callback: the trial numbers this one retries
FAILED_TRIAL = "failed_trial"      # Optuna's retry callback: the trial this one retries

# ---- outcomes -------------------------------------------------------------------------------------------------------
SKIPPED = "skipped:"          # never trained: budget reached, duplicate configuration, no queued run left
DIVERGED = "diverged:"        # NaN/inf loss; counts against the budget, never retried
INTERRUPTED = "interrupted:"  # stopped mid-run; a queued copy resumes it
ERROR = "error:"              # an exception in training
STALE = "no heartbeat"        # in the reason of a trial whose process died (found stale by another process)
DIED = "its process died"     # in the reason of every trial failed because its process died

# ---- protocol identity: a benchmark's name binds its protocol -------------------------------------------------
SUPERSEDED = "superseded:"    # a queued run of a plan that `regbench run --supersede` replaced: never trained
PLAN = "plan"                 # the spec: which plan of the benchmark's name this is (absent = 0, the first)
SUPERSEDED_PLANS = "superseded"  # the spec: one entry per plan the current one replaced (what was cancelled, kept)

# ---- dashboard: what each study is, as optuna-dashboard lists it (regbench/dashboard.py) -----------------------------
IMPORTANCE = "importance"          # a study: how far the dashboard's importance panel can be trusted here, and why
STUDY_BENCHMARK = "benchmark"      # a tuning or final study: the benchmark it belongs to
STUDY_METHOD = "method"            # a tuning or final study: the method it runs
STUDY_PHASE = "phase"              # a tuning or final study: "tune" | "final"
STUDY_RECIPE = "recipe"            # a tuning or final study: one line of the shared recipe, tuning rules and seeds
NOTE_WRITTEN = "regbench:note"     # a study's system attribute: a digest of the dashboard note regbench wrote last


def fail_reason(trial) -> str:
    return str(trial.user_attrs.get(FAIL_REASON, ""))


def _failed_with(trial, prefix: str) -> bool:
    return trial.state == TrialState.FAIL and fail_reason(trial).startswith(prefix)


def skipped(trial) -> bool:
    return _failed_with(trial, SKIPPED)


def diverged(trial) -> bool:
    return _failed_with(trial, DIVERGED)


def superseded(trial) -> bool:
    """A queued run cancelled because its plan was superseded: it never trained and counts nowhere."""
    return _failed_with(trial, SUPERSEDED)


def interrupted(trial) -> bool:
    """Stopped by a signal or a dead process, with a queued copy that resumes it: not a failure of the run."""
    return _failed_with(trial, INTERRUPTED)


def holds_configuration(trial) -> bool:
    """Whether a trial holds its configuration in its study: done, pruned, diverged, running or queued (the trials that
    count against a tuning budget). Skipped and interrupted ones do not: an interrupted one's retry does."""
    return not (trial.state == TrialState.FAIL and not diverged(trial))


def config_key(trial) -> str | None:
    return trial.user_attrs.get(CONFIG_KEY)


def group_key(trial) -> str | None:
    return trial.user_attrs.get(GROUP_KEY)


def has_config(trial) -> bool:
    return CONFIG in trial.user_attrs


def config_dict(trial) -> dict:
    """The run's configuration as a plain dict ({} for a trial claimed before it had one)."""
    text = trial.user_attrs.get(CONFIG)
    return json.loads(text) if text else {}


def config(trial) -> RunConfig:
    return RunConfig.from_json(trial.user_attrs[CONFIG])


def seed(trial) -> int | None:
    """A run's training seed: its own attribute, else its config's (stores written before the attribute existed)."""
    if SEED in trial.user_attrs:
        return int(trial.user_attrs[SEED])
    cfg = config_dict(trial)
    return int(cfg["seed"]) if "seed" in cfg else None


# ---- budget ---------------------------------------------------------------------------------------------------------


def attempt_budget(trial) -> dict:
    """Epochs and seconds this attempt trained ({} for one that never started); stores written before budgets were
    recorded count their history."""
    budget = trial.user_attrs.get(BUDGET)
    if budget is None and METRICS in trial.user_attrs:
        budget = {"epochs": len(trial.user_attrs.get(HISTORY, [])),
                  "seconds": trial.user_attrs.get(TIMINGS, {}).get("seconds", 0.0)}
    return budget or {}


def spent(trials) -> dict:
    """What these trials cost, for a report: trials, epochs and seconds actually trained. Queued, running and skipped
    trials cost nothing yet; interrupted attempts count what they trained (their resumed copy counts the rest)."""
    out = {"trials": 0, "epochs": 0, "seconds": 0.0}
    for t in trials:
        if t.state in (TrialState.WAITING, TrialState.RUNNING) or skipped(t) or superseded(t):
            continue
        budget = attempt_budget(t)
        out["trials"] += 1
        out["epochs"] += int(budget.get("epochs", 0))
        out["seconds"] += float(budget.get("seconds", 0.0))
    return out


def committed(trials, planned_epochs: int, below: int | None = None) -> tuple[int, int]:
    """What a tuning study has spent or promised, for the claim that decides whether another trial may start:
    (trials, epochs) over finished, pruned, diverged, running and queued trials (a running or queued one counts its
    planned epochs; a resumed one its whole run); skipped and interrupted ones do not (an interrupted trial's retry
    or resuming copy counts instead). ``below``
    counts only trials numbered lower than it: a claimant yields to its elders."""
    n = epochs = 0
    for t in trials:
        if below is not None and t.number >= below:
            continue
        if not holds_configuration(t):
            continue
        n += 1
        budget = t.user_attrs.get(BUDGET, {})
        epochs += int(budget.get("epochs", planned_epochs)) + int(budget.get("resumed_from_epoch", 0))
    return n, epochs


# ---- the typed record -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunRecord:
    """One run as the store holds it, read from a trial."""

    number: int
    state: str                      # Optuna's state name: COMPLETE, FAIL, PRUNED, RUNNING, WAITING
    config: dict                    # RunConfig fields (``run_config()`` for the typed object)
    key: str | None
    group: str | None
    method: str | None
    seed: int | None
    kind: str = "final"             # "tune" | "final"
    metrics: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    layers: list = field(default_factory=list)
    budget: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)
    reason: str = ""
    started: Any = None
    finished: Any = None

    @classmethod
    def of(cls, trial) -> RunRecord:
        attrs = trial.user_attrs
        cfg = config_dict(trial)
        return cls(number=trial.number, state=trial.state.name, config=cfg, key=attrs.get(CONFIG_KEY),
                   group=attrs.get(GROUP_KEY), method=cfg.get("method"), seed=seed(trial),
                   kind=attrs.get(KIND, "final"),
                   metrics=dict(attrs.get(METRICS, {})), history=list(attrs.get(HISTORY, [])),
                   layers=list(attrs.get(DIAGNOSTIC_LAYERS, [])), budget=attempt_budget(trial),
                   timings=dict(attrs.get(TIMINGS, {})), env=dict(attrs.get(ENV, {})), reason=fail_reason(trial),
                   started=trial.datetime_start, finished=trial.datetime_complete)

    @property
    def complete(self) -> bool:
        return self.state == "COMPLETE"

    def run_config(self) -> RunConfig:
        return RunConfig.from_json(json.dumps(self.config))


# ---- writers --------------------------------------------------------------------------------------------------------


def claimed_attrs(cfg: RunConfig, kind: str) -> dict:
    """What a run records as soon as it has a configuration (a claimed tuning trial, a queued final run)."""
    attrs = {CONFIG: cfg.to_json(), CONFIG_KEY: cfg.key(), KIND: kind, METHOD: cfg.method}
    if kind == "final":
        attrs.update({GROUP_KEY: cfg.group_key(), SEED: cfg.seed})
    return attrs


def write_attrs(trial, attrs: dict) -> None:
    for name, value in attrs.items():
        trial.set_user_attr(name, value)


def write_failure(trial, prefix: str, text: str) -> None:
    """The reason a trial is about to end as FAIL: one of the prefixes above, then what happened."""
    trial.set_user_attr(FAIL_REASON, f"{prefix} {text}"[:500])


def write_budget(trial, epochs: int, seconds: float, resumed_from: int = 0) -> None:
    """What this attempt trained: ``epochs`` counts only the epochs it trained itself; a run resumed from a mid-run
    checkpoint also records the epoch it resumed from (the epochs before were trained, and counted, by the attempt it
    resumes)."""
    budget = {"epochs": int(epochs), "seconds": float(seconds)}
    if resumed_from:
        budget["resumed_from_epoch"] = int(resumed_from)
    trial.set_user_attr(BUDGET, budget)


def write_result(trial, result, started: float, seconds: float | None = None) -> None:
    """A finished run: final metrics, per-epoch history, the layers its diagnostics name, and timings. ``seconds``
    overrides the run's own wall time (a run trained in a group is charged its share)."""
    if result.resumed_from_step:
        trial.set_user_attr(RESUMED_FROM_EPOCH, result.resumed_from_epoch)
        trial.set_user_attr(RESUMED_FROM_STEP, result.resumed_from_step)
    trial.set_user_attr(METRICS, result.metrics)
    trial.set_user_attr(HISTORY, result.history)
    trial.set_user_attr(DIAGNOSTIC_LAYERS, result.diagnostic_layers)
    trial.set_user_attr(TIMINGS, {"seconds": result.seconds, "started": started,
                                  "seconds_per_epoch": result.metrics["seconds_per_epoch"]})
