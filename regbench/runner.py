"""A worker's loop: claim this benchmark's trials from the store, train them, record them (docs/architecture.md).

Work is claimed through the storage, so any number of processes (``regbench run``, ``regbench worker``) can share one
benchmark. Equal budget and "each run once" are enforced when a trial is claimed, not when it is planned, because two
workers can plan the same thing at the same moment: a tuning trial whose lower-numbered siblings already spent the
budget, a tuning trial whose configuration another trial of its study already holds, or a final run whose config
another trial already holds, ends at once as FAIL with a ``record.SKIPPED`` reason and is counted nowhere, and the
sampler is asked again. Each worker seeds its sampler from the benchmark's seed and its own identity, so concurrent
workers do not propose the same start-up points (``regbench run`` alone uses the benchmark's seed: reproducible).
A dead worker's trial goes stale (heartbeat) and is retried once with the same params; a diverged run (NaN/inf loss)
is FAIL with its reason, counts against the budget and is not retried.
"""
from __future__ import annotations

import hashlib
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState

from regbench import dashboard, faults, optuna_private, record, registry, stopping
from regbench.config import RunConfig
from regbench.errors import RegbenchError
from regbench.protocol import TUNE_SEED, Benchmark, budget_left, final_params, record_final, suggest
from regbench.provenance import environment
from regbench.store import retry_callback

POLL_SECONDS = 2.0              # how often a worker with nothing to claim looks again
STOPPED = "stopped by a signal (Ctrl-C, SIGTERM, or a scheduler's time-limit warning)"
REASK = 3                       # duplicate proposals in a row from the sampler before a distinct random point is queued
DISTINCT_DRAWS = 200            # random draws looking for an untaken configuration; none found = the space is exhausted


class _Skip(Exception):
    """Ends a claimed trial that must not train (its fail_reason says why)."""




def worker_identity() -> str:
    """This process among the benchmark's workers: host and pid (recorded in each trial's ``env.worker``)."""
    import os
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


def worker_sampler_seed(base: int, worker: str | None) -> int:
    """The sampler seed of one process: the benchmark's own seed for ``regbench run`` (``worker`` None), so a run is
    reproducible; for a worker, a seed derived from it and the worker's identity, so workers that start together
    draw different start-up points instead of the same ones."""
    if worker is None:
        return base
    return int.from_bytes(hashlib.sha256(f"{base}:{worker}".encode()).digest()[:4], "big")


def _sampler(bench: Benchmark, seed: int) -> optuna.samplers.BaseSampler:
    # constant_liar: trials that other workers are running count as poor results, so TPE looks elsewhere meanwhile
    # (one worker alone draws what an in-memory study with the same seed draws)
    startup = bench.protocol.startup_trials
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True,
                                      **({} if startup is None else {"n_startup_trials": startup}))


def _pruner(bench: Benchmark) -> optuna.pruners.BasePruner:
    epochs = bench.base.epochs
    if bench.protocol.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs)
    if bench.protocol.pruner == "median":
        # The first few trials and the first third of training are never pruned: one-cycle and cosine schedules
        # rank configurations unreliably early on.
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=max(1, epochs // 3))
    return optuna.pruners.NopPruner()




def mark_resumable(study: optuna.Study, trial) -> None:
    """A trial stopped by Ctrl-C/SIGTERM is not a failed run: queue a copy with the same params (Optuna hands an
    enqueued trial's fixed params back from ``suggest``) and user attrs, hence the same config key and mid-run
    checkpoint, and say so in the stopped trial's reason (Optuna itself records it FAIL: it has no "paused" state).
    Unlike Optuna's stale-trial retry there is no cap: a long run may be stopped and resumed any number of times.
    A tuning trial stopped before it had a configuration has nothing to resume; TPE simply samples anew."""
    budget = record.attempt_budget(trial)
    epochs = budget.get("epochs", 0) + budget.get("resumed_from_epoch", 0)  # the epoch it reached, not what it trained
    if not record.has_config(trial):
        record.write_failure(trial, record.INTERRUPTED, f"{STOPPED} before it started")
        return
    attrs = {k: v for k, v in trial.user_attrs.items() if k not in record.ATTEMPT_ATTRS}
    params = dict(trial.params)  # a final run's are its fixed configuration (final_params), or none yet
    before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))}
    study.enqueue_trial(params, user_attrs={**attrs, record.RESUMES_TRIAL: trial.number})
    queued = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)) if t.number not in before]
    record.write_failure(trial, record.INTERRUPTED,
                         f"{STOPPED} after epoch {epochs}; queued to resume as trial {max(queued) if queued else '?'}")



def duplicate_of(trials, number: int, key: str) -> int | None:
    """The number of another trial that holds ``trial``'s config key, if any. The claimant writes its key first and
    then looks, so of two trials racing for one key at least one sees the other; a running trial is yielded to
    whatever its number (both may yield, then the sampler is simply asked again), so no key is ever trained twice."""
    for other in trials:
        if other.number != number and record.config_key(other) == key and record.holds_configuration(other):
            return other.number
    return None



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
            trial_id = optuna_private.trial_id(t)
            storage.set_trial_user_attr(trial_id, record.FAIL_REASON, f"{record.INTERRUPTED} {record.DIED}")
            storage.set_trial_state_values(trial_id, TrialState.FAIL)
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
                 parallel_seeds: int = 1, worker: str | None = None, watch=None):
        self.storage, self.bench, self.splits = storage, bench, splits
        # a regbench.progress.Progress (or None): told when a run starts, ends an epoch and ends
        self.watch = watch
        # None: `regbench run` (the benchmark's sampler seed); else this worker's identity (its own derived seed)
        self.worker = worker
        self.seed = worker_sampler_seed(bench.protocol.sampler_seed, worker)
        self._duplicates: dict[str, int] = {}  # method -> duplicate proposals in a row from its sampler
        self.parallel_seeds = parallel_seeds  # final seeds of one config trained at once (engine.train_group)
        self.progress, self.on_trial, self.wait = progress, on_trial or (lambda _o: None), wait
        # Mid-run checkpoints (regbench/checkpoint.py), one file per config key: a killed trial's retry has the same
        # config, hence the same file, and resumes from it. None = off.
        self.checkpoint_dir, self.checkpoint_seconds = checkpoint_dir, checkpoint_seconds
        self.keep_checkpoints = keep_checkpoints
        self._studies: dict[str, optuna.Study] = {}

    # studies are created lazily and cached; load_if_exists makes concurrent creation safe
    # a tuning or final study is labelled for optuna-dashboard (metric name, what it is, a note) when first opened
    def _study(self, name: str, direction: str = "maximize", tuning: bool = False,
               method: str | None = None) -> optuna.Study:
        if name not in self._studies:
            kwargs = {"sampler": _sampler(self.bench, self.seed), "pruner": _pruner(self.bench)} if tuning else {}
            study = optuna.create_study(study_name=name, storage=self.storage, direction=direction,
                                        load_if_exists=True, **kwargs)
            if method is not None:
                dashboard.label(study, self.bench, "tune" if tuning else "final", method)
            self._studies[name] = study
        return self._studies[name]

    def tune_study(self, method: str) -> optuna.Study:
        return self._study(self.bench.tune_study_name(method), self.bench.protocol.direction, tuning=True,
                           method=method)

    def final_study(self, method: str) -> optuna.Study:
        # the tuning objective's direction, so the dashboard's "best" seed is the best by that objective
        return self._study(record.final_study_name(self.bench.name, method), self.bench.protocol.direction,
                           method=method)

    def run(self) -> None:
        """Work method by method (tuning, then its finals); when nothing is claimable but others are still running,
        wait for them (a worker) or return (``wait=False``)."""
        pending = list(self.bench.methods)
        while pending:
            self._check_plan()
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

    def _check_plan(self) -> None:
        """Stop before claiming anything once `regbench run --supersede` replaced the plan this process loaded: the
        old plan's runs must not be trained (a worker that stops here may be started again to join the new plan)."""
        from regbench.store import load_spec

        stored = int((load_spec(self.storage, self.bench.name) or {}).get(record.PLAN, 0))
        if stored != self.bench.plan:
            raise RegbenchError(f"benchmark {self.bench.name!r} was superseded by plan {stored} (regbench run "
                                f"--supersede) while this process ran plan {self.bench.plan}; it stops without "
                                f"training the old plan's runs: start the worker again to join plan {stored}")

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
        keys = {c.key() for c in configs}
        if waiting:
            self._run_one(final, self._final_objective(final, keys), "final", method)
            return "ran"
        if any(record.config_key(t) in keys for t in final.get_trials(deepcopy=False,
                                                                                  states=(TrialState.RUNNING,))):
            return "wait"
        return "done"

    def _tuning_open(self, tune: optuna.Study, trials) -> bool:
        """Budget left, and the search space not found exhausted."""
        return budget_left(self.bench.protocol, record.committed(trials, self.bench.base.epochs)) and \
            record.EXHAUSTED not in tune.user_attrs

    def _queue_distinct(self, tune: optuna.Study, method: str, trials) -> None:
        """The sampler keeps proposing configurations other trials hold (TPE converged, or a small discrete space):
        queue a random configuration no trial holds instead (the study's next trial claims it, with its key already
        written), or record that the search space has none left, which ends the method's tuning."""
        taken = {record.config_key(t) for t in trials if record.holds_configuration(t)}
        draws = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=self.seed + len(trials)))
        for _ in range(DISTINCT_DRAWS):
            probe = draws.ask()
            try:
                cfg = self._tune_config(method, probe)
            except RegbenchError:  # an invalid corner of the space: the sampler would have skipped it too
                continue
            if cfg.key() not in taken:
                tune.enqueue_trial(probe.params, user_attrs={
                    **record.claimed_attrs(cfg, "tune"),
                    record.PROPOSED_BY: f"random: the sampler proposed taken configurations {REASK} times in a row"})
                return
        tune.set_user_attr(record.EXHAUSTED, len(taken))

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
                cfg = record.config(best)
                info = {"hparams": cfg.hparams, "shared": {k: getattr(cfg, k) for k in ("lr", "weight_decay")
                                                           if bench.protocol.tune_shared},
                        "tune_trial": best.number, "value": best.value}
            else:
                info["note"] = "no tuning trial completed; the defaults were run"
        configs = bench.final_configs(method, info["hparams"], info["shared"])
        info["group_key"] = configs[0].group_key()
        root = self._study(record.spec_study_name(bench.name))
        attr = record.selection_attr(method, bench.ident(method))
        if root.user_attrs.get(attr) != info:
            root.set_user_attr(attr, info)
        return configs

    def _run_one(self, study: optuna.Study, objective, kind: str, method: str) -> None:
        from regbench import engine

        ran: list[int] = []

        def wrapped(trial):
            ran.append(optuna_private.trial_id(trial))
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
        with stopping.stoppable():
            try:
                study.optimize(wrapped, n_trials=1, catch=(engine.Diverged, _Skip))
            except KeyboardInterrupt:
                # The interrupted trial (FAIL "interrupted: …", its resuming copy queued) still reaches the caller's
                # line and MLflow mirror before the process stops.
                if ran and self.storage.get_trial(ran[0]).state != TrialState.RUNNING:
                    self.on_trial(Outcome(study, self.storage.get_trial(ran[0]), kind, method))
                raise
            if self.watch is not None:
                self.watch.run_ended()
            if ran:
                if kind == "tune":  # the importance panel's caveat counts the completed trials
                    dashboard.update_importance(study)
                self.on_trial(Outcome(study, self.storage.get_trial(ran[0]), kind, method))

    def _tune_objective(self, study: optuna.Study, method: str):
        bench = self.bench

        def objective(trial):
            spent = record.committed(study.get_trials(deepcopy=False), bench.base.epochs, below=trial.number)
            if not budget_left(bench.protocol, spent):
                record.write_failure(trial, record.SKIPPED, "the tuning budget was already spent by other trials")
                raise _Skip()
            cfg = self._tune_config(method, trial)
            record.write_attrs(trial, record.claimed_attrs(cfg, "tune"))
            # Written first, then checked: two workers racing for one configuration cannot both train it.
            other = duplicate_of(study.get_trials(deepcopy=False), trial.number, cfg.key())
            if other is not None:
                self._duplicates[method] = self._duplicates.get(method, 0) + 1
                record.write_failure(trial, record.SKIPPED, f"trial {other} holds the same configuration; the sampler "
                                                            f"is asked again")
                raise _Skip()
            self._duplicates[method] = 0
            return self._train(trial, cfg, prune=True)
        return objective

    def _final_objective(self, study: optuna.Study, keys: set[str] | None = None):
        def objective(trial):
            if not record.has_config(trial):  # another worker claimed the last queued run first
                record.write_failure(trial, record.SKIPPED, "no queued run left to claim")
                raise _Skip()
            key = record.config_key(trial)
            if keys is not None and key not in keys:  # queued for another selection or seed list: not this plan's
                record.write_failure(trial, record.SKIPPED, "not a run of the benchmark's current plan")
                raise _Skip()
            for other in study.get_trials(deepcopy=False):
                if other.number == trial.number or record.config_key(other) != key:
                    continue
                if other.state == TrialState.COMPLETE or (
                        other.number < trial.number and other.state in (TrialState.RUNNING, TrialState.WAITING)):
                    record.write_failure(trial, record.SKIPPED, f"duplicate of trial {other.number}")
                    raise _Skip()
            cfg = record.config(trial)
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
            key = record.config_key(t)
            if t.state != TrialState.WAITING or not record.has_config(t) or key == cfg.key() or any(
                    o.number != t.number and record.config_key(o) == key and (
                        o.state in (TrialState.COMPLETE, TrialState.RUNNING)
                        or (o.state == TrialState.WAITING and o.number < t.number)) for o in trials):
                continue
            other = record.config(t)
            if other.replace(seed=cfg.seed) != cfg or resume_point(other) != point:
                continue
            if optuna_private.claim_waiting(study, t):  # False: another worker took it meanwhile
                claimed.append((optuna.trial.Trial(study, optuna_private.trial_id(t)), other))
        return claimed

    def _train_group(self, study: optuna.Study, leader, cfg: RunConfig) -> float:
        """Train the leader with its claimed siblings in one process (engine.train_group), then record each run
        through ``_train`` exactly as if it had trained alone (same user attrs, reports, fail reasons). Siblings get
        heartbeats while they train, so a dead process leaves them stale and retried like any trial."""
        import contextlib

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
                    beats.enter_context(optuna_private.heartbeat_thread(study, t))
                configs = [cfg] + [c for _, c in siblings]
                paths = (None if self.checkpoint_dir is None
                         else [checkpoint.path_for(self.checkpoint_dir, c.key()) for c in configs])
                if self.watch is not None:
                    self.watch.run_started(f"{cfg.method} seeds {','.join(str(c.seed) for c in configs)}",
                                           width=len(configs))

                def on_epoch(k, epoch, row):
                    epochs_done[k] = epoch
                    if k == 0 and self.watch is not None:
                        self.watch.epoch_ended(epoch)
                results = engine.train_group(configs, self.splits,
                                             lambda c: registry.build_method(c.method, c.hparams),
                                             progress=self.progress, checkpoints=paths,
                                             checkpoint_seconds=self.checkpoint_seconds,
                                             keep_checkpoint=self.keep_checkpoints,
                                             on_epoch=on_epoch)
        except KeyboardInterrupt:  # the leader is marked resumable by _run_one
            for t, epochs in zip([leader, *others], epochs_done):  # what mark_resumable reports as trained
                record.write_budget(t, epochs, time.time() - started)
            for t in others:
                mark_resumable(study, t)
                study.tell(t, state=TrialState.FAIL)
            raise
        except BaseException as exc:
            for t in [leader, *others]:
                record.write_failure(t, record.ERROR, f"{type(exc).__name__}: {exc}")
            for t in others:
                study.tell(t, state=TrialState.FAIL)
            raise
        share = (time.time() - started) / len(results)  # each run's share of the group's wall time
        for (t, c), result in zip(siblings, results[1:]):
            try:
                study.tell(t, self._record(t, c, result, started, share))
            except engine.Diverged:  # fail_reason set by _train, as for a run trained alone
                study.tell(t, state=TrialState.FAIL)
            self.on_trial(Outcome(study, self.storage.get_trial(optuna_private.trial_id(t)), "final", c.method))
        return self._record(leader, cfg, results[0], started, share)

    def _record(self, trial, cfg: RunConfig, result, started: float, share: float) -> float:
        """A run trained in a group, recorded as if it had trained alone: its epochs reported to the trial, its result
        (or divergence) recorded, its budget charged its share of the group's wall time."""
        self._begin(trial, cfg)
        report = _EpochReport(trial, self.bench.protocol.objective, prune=False,
                              resumed_from=getattr(result, "resumed_from_epoch", 0))
        for row in getattr(result, "history", []):
            report(int(row["epoch"]), row)
        if isinstance(result, BaseException):
            self._failed(trial, result, report, share)
            raise result
        return self._finished(trial, result, started, report, share, cfg.epochs)

    def _train(self, trial, cfg: RunConfig, prune: bool) -> float:
        from regbench import checkpoint, engine

        self._begin(trial, cfg)
        method = registry.build_method(cfg.method, cfg.hparams)
        started = time.time()
        ckpt = None if self.checkpoint_dir is None else checkpoint.path_for(self.checkpoint_dir, cfg.key())
        point = checkpoint.resume_point(ckpt) if ckpt is not None else None  # the restored epochs are reported again
        report = _EpochReport(trial, self.bench.protocol.objective, prune, resumed_from=point[0] if point else 0)
        if self.watch is not None:
            self.watch.run_started(f"{cfg.method} tuning trial {trial.number}" if prune else
                                   f"{cfg.method} seed {cfg.seed}")

        def on_epoch(epoch, row):
            if self.watch is not None:
                self.watch.epoch_ended(epoch)
            report(epoch, row)
        try:
            result = engine.train(cfg, self.splits, method, on_epoch=on_epoch, progress=self.progress,
                                  checkpoint=ckpt, checkpoint_seconds=self.checkpoint_seconds,
                                  keep_checkpoint=self.keep_checkpoints)
        except optuna.TrialPruned:
            record.write_budget(trial, report.trained, time.time() - started, report.resumed_from)
            if not self.keep_checkpoints:  # a pruned trial is never retried: nothing will resume from it
                checkpoint.remove(ckpt)
            raise
        except BaseException as exc:
            self._failed(trial, exc, report, time.time() - started)
            raise
        report.resumed_from = result.resumed_from_epoch  # what the loop actually restored
        return self._finished(trial, result, started, report, time.time() - started, cfg.epochs)

    def _begin(self, trial, cfg: RunConfig) -> None:
        from regbench import engine

        device = str(engine.resolve_device(cfg.device))
        trial.set_user_attr(record.ENV, {**environment(device), "worker": self.worker or f"run:{worker_identity()}"})
        trial.set_user_attr(record.SPLIT_HASH, self.splits.split_hash)
        dashboard.note_trial(trial, self.bench, trial.user_attrs.get(record.KIND, "final"), cfg)

    def _failed(self, trial, exc: BaseException, report: _EpochReport, seconds: float) -> None:
        """What an attempt that ended early trained, and why it ended (an interrupted one is marked resumable by
        ``_run_one``)."""
        from regbench import engine

        record.write_budget(trial, report.trained, seconds, report.resumed_from)
        if isinstance(exc, engine.Diverged):
            record.write_failure(trial, record.DIVERGED, str(exc))
        elif not isinstance(exc, KeyboardInterrupt):
            record.write_failure(trial, record.ERROR, f"{type(exc).__name__}: {exc}")

    def _finished(self, trial, result, started: float, report: _EpochReport, seconds: float, planned: int) -> float:
        from regbench.statefiles import history_problem

        record.write_budget(trial, report.trained, seconds, report.resumed_from)
        why = history_problem(result.history, planned)
        if why:  # never COMPLETE without every planned epoch (the trial fails: Optuna records the error)
            raise RuntimeError(f"run {record.config_dict(trial).get('method', '?')} not recorded as complete: {why}")
        record.write_result(trial, result, started)
        return result.metrics[self.bench.protocol.objective]


class _EpochReport:
    """The ``on_epoch`` of a trial's training: each epoch's objective goes to Optuna's pruner, which may stop it."""

    def __init__(self, trial, objective: str, prune: bool, resumed_from: int = 0):
        self.trial, self.objective, self.prune, self.epochs = trial, objective, prune, 0
        self.resumed_from = resumed_from  # epochs restored from a checkpoint: reported again, not trained again

    @property
    def trained(self) -> int:
        """Epochs this attempt trained itself."""
        return max(self.epochs - self.resumed_from, 0)

    def __call__(self, epoch: int, row: dict) -> None:
        self.epochs = epoch
        faults.point("epoch")
        self.trial.report(row[self.objective], epoch)
        if self.prune and self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {epoch} ({self.objective} {row[self.objective]:.4f})")


def enqueue_missing(study: optuna.Study, configs: list[RunConfig]) -> int:
    """Queue each config that is not done, queued, running or diverged; returns how many are waiting to be run."""
    by_key: dict[str, list] = {}
    for t in study.get_trials(deepcopy=False):
        by_key.setdefault(record.config_key(t), []).append(t)
    waiting = 0
    for cfg in configs:
        states = {t.state for t in by_key.get(cfg.key(), [])}
        if TrialState.WAITING in states:
            waiting += 1
        if states & {TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING}:
            continue
        # A diverged run is deterministic: retrying it would diverge again and waste the budget.
        if any(record.diverged(t) for t in by_key.get(cfg.key(), [])):
            continue
        study.enqueue_trial({name: value for name, (value, _) in final_params(cfg).items()},
                            user_attrs=record.claimed_attrs(cfg, "final"))
        waiting += 1
    return waiting

