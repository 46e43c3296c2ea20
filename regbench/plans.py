"""A benchmark's name binds its protocol (docs/architecture.md): what `regbench run` does when the name is taken.

The stored spec (recipe and data split, methods with their fixed hparams and search spaces, tuning rules, seeds) is
the benchmark's identity. A rerun may extend it (more seeds, methods, trials or tuning epochs) and says so; a rerun
that changes it is refused before any work, naming each change and the two ways on: another ``--name``, or
``--supersede``, which makes the new spec the benchmark's next plan. Superseding never trains the old plan's queued
runs (each is failed with a ``record.SUPERSEDED`` reason, so no worker claims it), tunes in studies of its own (the
plan number is part of ``Benchmark.ident``), keeps the old plan's finished runs in the store where no table, budget,
status line, export or MLflow parent counts them, and records what it replaced in the spec.

Also the tuning rules of the command line: fair tuning by default (every arm, baseline included, tunes the shared lr
and weight decay with its own hparams under one budget), opted out of explicitly.
"""
from __future__ import annotations

import datetime as dt
import sys

import optuna
from optuna.trial import TrialState

from regbench import optuna_private, record
from regbench.errors import ConfigError
from regbench.protocol import Benchmark, TuningRules, plan_changes


def tuning_rules(args, methods: list[str]) -> TuningRules:
    """The command line's tuning rules. Shared tuning is on whenever anything is tuned unless ``--no-tune-shared``;
    ``--untuned M`` leaves arm M at its defaults on purpose."""
    tunes = bool(args.trials) or args.budget_epochs is not None
    flag = getattr(args, "tune_shared", None)
    untuned = [m.strip() for m in (getattr(args, "untuned", None) or "").split(",") if m.strip()]
    unknown = [m for m in untuned if m not in methods]
    if unknown:
        raise ConfigError(f"--untuned {','.join(unknown)}: not in --methods ({', '.join(methods)}); name arms of "
                          f"this benchmark")
    if not tunes:  # nothing is tuned: every arm runs its defaults already
        untuned = []
    return TuningRules(trials=args.trials, budget_epochs=args.budget_epochs, pruner=args.pruner,
                       objective=args.objective, tune_shared=tunes if flag is None else bool(flag),
                       oracle=args.oracle, untuned=tuple(dict.fromkeys(untuned)))


def check_fair(bench: Benchmark) -> None:
    """``--trials``/``--budget-epochs`` with shared tuning off leave an arm without hparams of its own (baseline)
    nothing to tune: it would run its defaults against tuned arms and Δ would partly measure tuning. Refused, unless
    that arm is named by ``--untuned`` (then the leaderboard says so)."""
    rules = bench.protocol
    if not rules.tunes or rules.tune_shared:
        return
    bare = [m for m in bench.methods if m not in rules.untuned and not bench.tunes(m)]
    if bare:
        budget = f"--trials {rules.trials}" if rules.trials else f"--budget-epochs {rules.budget_epochs}"
        raise ConfigError(f"{budget} with --no-tune-shared leaves {', '.join(bare)} nothing to tune (no hparams of "
                          f"its own), so it would run its defaults against tuned arms and Δ would partly measure "
                          f"tuning; drop --no-tune-shared (the default: every arm, baseline included, also tunes lr "
                          f"and weight decay under the same budget), or add --untuned {','.join(bare)} to compare "
                          f"against its defaults on purpose")


def stored_spec(storage, out, name: str) -> dict | None:
    """The spec stored under ``name``, read before anything is written: from ``storage`` when the command opened one,
    else from OUT's own store when it exists (never created here)."""
    from regbench.store import STORE_FILE, default_storage_url, load_spec, open_storage

    if storage is None:
        if not (out / STORE_FILE).is_file():
            return None
        storage = open_storage(default_storage_url(out))
    return load_spec(storage, name)


def check_rerun(previous: dict | None, bench: Benchmark, supersede: bool) -> tuple[list[str], list[str]]:
    """(changes, extensions) of ``bench`` against the stored spec; refuses a change without ``--supersede``."""
    if not previous or "base" not in previous:
        return [], []
    changes, extensions = plan_changes(previous, bench.spec())
    if changes and not supersede:
        raise ConfigError(
            f"benchmark {bench.name!r} already holds another protocol ({'; '.join(changes)}) and a name binds its "
            f"protocol, so its runs are not mixed; give this one a new --name, or add --supersede to replace the "
            f"stored plan (its queued runs are cancelled, never trained; its finished runs stay in the store, "
            f"counted by no table, budget or MLflow parent)")
    return changes, extensions


def adopt(previous: dict | None, bench: Benchmark, changes: list[str], extensions: list[str],
          supersede: bool) -> bool:
    """Give ``bench`` its plan number and history from the stored spec; True when it supersedes that plan."""
    if not previous or "base" not in previous:
        if supersede:
            print(f"regbench: note: --supersede: benchmark {bench.name!r} has no stored plan yet; nothing to "
                  f"supersede", file=sys.stderr)
        return False
    old_plan = int(previous.get(record.PLAN, 0))
    history = list(previous.get(record.SUPERSEDED_PLANS, []))
    if history:
        bench.extra[record.SUPERSEDED_PLANS] = history
    if not changes:
        bench.plan = old_plan
        if extensions:
            print(f"regbench: extending benchmark {bench.name!r} (same protocol): {'; '.join(extensions)}; the runs "
                  f"already in the store are kept and only the missing ones are trained", file=sys.stderr)
        elif supersede:
            print(f"regbench: note: --supersede: benchmark {bench.name!r} already holds this protocol; nothing to "
                  f"supersede, its runs are kept", file=sys.stderr)
        return False
    bench.plan = old_plan + 1
    bench.extra[record.SUPERSEDED_PLANS] = history + [{
        "plan": old_plan, "command": previous.get("command", ""), "changes": changes,
        "superseded_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}]
    return True


def _old_studies(storage, previous: dict) -> list[str]:
    """Every study of the old plan: each method's finals and the tuning study its spec names."""
    names = [record.final_study_name(previous["benchmark"], m) for m in previous["methods"]]
    names += [info["tune_study"] for info in previous["methods"].values() if info.get("tune_study")]
    existing = set(optuna.get_all_study_names(storage))
    return [n for n in dict.fromkeys(names) if n in existing]


def supersede(storage, previous: dict, bench: Benchmark, owned: bool) -> str:
    """Cancel the old plan's queued runs (and, in a store this process owns, the running ones a dead process left):
    each becomes FAIL with a ``superseded:`` reason, so no worker claims it. Finished runs stay as they are; the
    readers count only the current plan's (its tuning studies and selected finals). Returns the line that says what
    was superseded; the counts are also recorded in the spec's history."""
    reason = (f"{record.SUPERSEDED} plan {previous.get(record.PLAN, 0)} of benchmark {bench.name!r} was replaced by "
              f"plan {bench.plan} (regbench run --supersede); never trained")
    cancelled = kept = 0
    live = 0
    new_groups = {m: bench.final_configs(m, bench.default_hparams(m), {})[0].group_key()
                  for m in bench.methods if not bench.tunes(m)}
    reused = 0
    for name in _old_studies(storage, previous):
        study = optuna.load_study(study_name=name, storage=storage)
        for t in study.get_trials(deepcopy=False):
            if t.state == TrialState.WAITING or (owned and t.state == TrialState.RUNNING):
                trial_id = optuna_private.trial_id(t)
                try:
                    storage.set_trial_user_attr(trial_id, record.FAIL_REASON, reason[:500])
                    storage.set_trial_state_values(trial_id, TrialState.FAIL)
                    cancelled += 1
                except optuna.exceptions.UpdateFinishedTrialError:
                    pass  # finished meanwhile by a worker of the old plan: one more kept run
            elif t.state == TrialState.RUNNING:
                live += 1
            elif not (record.skipped(t) or record.superseded(t)):
                run = record.RunRecord.of(t)
                if run.kind == "final" and run.complete and run.seed in bench.seeds and run.group is not None \
                        and new_groups.get(run.method) == run.group:
                    reused += 1
                else:
                    kept += 1
    entry = bench.extra[record.SUPERSEDED_PLANS][-1]
    entry.update({"cancelled": cancelled, "kept_excluded": kept, "reused": reused})
    line = (f"regbench: superseded plan {entry['plan']} of benchmark {bench.name!r} ({'; '.join(entry['changes'])}): "
            f"{cancelled} queued run{'s' if cancelled != 1 else ''} cancelled (never trained), {kept} finished "
            f"run{'s' if kept != 1 else ''} kept in the store but excluded from every table, budget, status line, "
            f"export and MLflow parent")
    if reused:
        line += (f"; {reused} finished run{'s' if reused != 1 else ''} with exactly the new plan's configuration "
                 f"count{'s' if reused == 1 else ''} for it")
    if live:
        line += (f"; {live} run{'s' if live != 1 else ''} of the old plan still running in other workers finish "
                 f"there and count for nothing")
    return line


def history_lines(bench: Benchmark) -> list[str]:
    """What `regbench status` says of the plans this one superseded (none for a benchmark never superseded)."""
    def runs(n) -> str:
        return f"{n} run{'' if n == 1 else 's'}"

    lines = []
    for entry in bench.extra.get(record.SUPERSEDED_PLANS, []):
        lines.append(f"  plan {entry.get('plan', 0)} superseded {entry.get('superseded_at', '')} "
                     f"({'; '.join(entry.get('changes', []))}): {runs(entry.get('cancelled', 0))} queued then "
                     f"cancelled, {runs(entry.get('kept_excluded', 0))} finished but kept out of every count")
    return lines


def retire_mlflow(tracking_uri: str | None, bench: Benchmark, warn) -> None:
    """Take the superseded plans' runs out of the benchmark's MLflow experiment now (tracking.Tracker.use_plan);
    if MLflow cannot be reached, the next mirror of the benchmark (a run, a worker, sync-mlflow) does it."""
    if not tracking_uri or not bench.plan:
        return
    from regbench import tracking

    tracker = tracking.SafeTracker(tracking_uri, bench.name, warn)
    tracker.use_plan(bench.plan)
    tracker.close()
