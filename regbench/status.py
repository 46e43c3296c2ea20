"""What a benchmark's store says about its progress: the per-method lines of ``regbench status`` and the
``[done/planned]`` count of every worker's progress lines."""
from __future__ import annotations

import optuna
from optuna.trial import TrialState

from regbench import liveness, optuna_private, record
from regbench.protocol import Benchmark
from regbench.store import trials_of as store_trials

def _counts(trials, dead_ids=()) -> dict[str, int]:
    counts = {"done": 0, "running": 0, "failed": 0, "pruned": 0, "queued": 0, "interrupted": 0, "dead": 0}
    # an interrupted run whose resuming copy has since ended is finished work, not something left to resume
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED) or record.diverged(t)]
    ended = {record.config_key(t) for t in finished} - {None}
    ended_copies = {t.system_attrs.get(record.FAILED_TRIAL) for t in finished} | {
        t.user_attrs.get(record.RESUMES_TRIAL) for t in finished}
    for t in trials:
        if record.skipped(t) or record.superseded(t):  # never trained
            continue
        if record.interrupted(t):  # its queued copy resumes it: shown apart, never as a failed run
            if record.config_key(t) not in ended and t.number not in ended_copies:
                counts["interrupted"] += 1
            continue
        if t.state == TrialState.RUNNING and optuna_private.trial_id(t) in dead_ids:  # its worker stopped beating
            counts["dead"] += 1
            continue
        key = {TrialState.COMPLETE: "done", TrialState.RUNNING: "running", TrialState.FAIL: "failed",
               TrialState.PRUNED: "pruned", TrialState.WAITING: "queued"}[t.state]
        counts[key] += 1
    return counts


def _resumable(counts: dict[str, int]) -> str:
    n = counts["interrupted"]
    return f", {n} interrupted (resumable, not failed)" if n else ""


def _running(counts: dict[str, int], ages: dict) -> str:
    """"N running", and the runs whose worker is dead (no heartbeat for longer than the grace period)."""
    text = f"{counts['running']} running"
    if counts["dead"]:
        text += (f", {counts['dead']} on a dead worker (no heartbeat for {max(ages.values()):.0f} s; the next `regbench "
                 f"run` or worker resumes it)")
    return text


def _tuning_trials(storage, bench: Benchmark, method: str) -> tuple[list, int | None]:
    """A method's tuning trials and, when its search space ran out, how many distinct configurations it holds."""
    try:
        tune = optuna.load_study(study_name=bench.tune_study_name(method), storage=storage)
    except KeyError:
        return [], None
    return tune.get_trials(deepcopy=False), tune.user_attrs.get(record.EXHAUSTED)


def progress(storage, bench: Benchmark) -> list[str]:
    """One line per method: tuning and final runs done, running, failed, pruned, remaining (for `regbench status`).
    An interrupted trial (Ctrl-C, SIGTERM, a dead worker) is not a failure: its resuming copy is queued or running,
    and the line says how many were interrupted only when some were."""
    lines = []
    root = optuna.load_study(study_name=record.spec_study_name(bench.name), storage=storage)
    for method in bench.methods:
        parts = []
        if bench.protocol.tunes and not bench.tunes(method):
            parts.append("untuned on purpose (--untuned): runs its defaults" if method in bench.protocol.untuned
                         else "nothing to tune")
        if bench.tunes(method):
            trials, exhausted = _tuning_trials(storage, bench, method)
            ages = liveness.dead(storage, bench, trials)
            c = _counts(trials, ages)
            n, epochs = record.committed(trials, bench.base.epochs)
            p = bench.protocol
            left = []
            if p.trials:
                left.append(f"{max(p.trials - n, 0)} trials")
            if p.budget_epochs:
                left.append(f"{max(p.budget_epochs - epochs, 0)} epochs")
            note = ""
            if exhausted is not None:
                left, note = ["0 trials"], f" (its search space holds only {exhausted} distinct configurations)"
            parts.append(f"tuning {c['done']} done, {_running(c, ages)}, {c['pruned']} pruned, {c['failed']} "
                         f"failed{_resumable(c)}, {' / '.join(left)} remaining{note}")
        selected = root.user_attrs.get(record.selection_attr(method, bench.ident(method)))
        if bench.tunes(method) and selected is None:
            parts.append(f"finals: {len(bench.seeds)} seeds wait for tuning")
        else:
            group = selected["group_key"] if selected else bench.final_configs(
                method, bench.default_hparams(method), {})[0].group_key()
            try:
                trials = optuna.load_study(study_name=record.final_study_name(bench.name, method),
                                           storage=storage).get_trials(deepcopy=False)
            except KeyError:
                trials = []
            trials = [t for t in trials if record.group_key(t) == group and record.seed(t) in bench.seeds]
            ages = liveness.dead(storage, bench, trials)
            c = _counts(trials, ages)
            seeds_done = {record.seed(t) for t in trials if t.state == TrialState.COMPLETE}
            lost = {record.seed(t) for t in trials if record.diverged(t)}
            busy = {record.seed(t) for t in trials if t.state == TrialState.RUNNING}
            remaining = len(set(bench.seeds) - seeds_done - lost - busy)
            parts.append(f"finals {len(seeds_done)} done, {_running(c, ages)}, {c['failed']} failed"
                         f"{_resumable(c)}, {remaining} remaining")
        lines.append(f"  {method}: " + "; ".join(parts))
    return lines


def run_counts(storage, bench: Benchmark) -> tuple[int, int | None]:
    """(runs done, runs planned) for the whole benchmark, whichever process ran them: tuning trials that count against
    the budget and have ended, plus final seeds done or diverged. Planned is None when tuning is budgeted in epochs
    (the number of trials is not known in advance). For the ``[done/planned]`` of every worker's progress lines."""
    done, planned = 0, 0 if not bench.protocol.budget_epochs else None
    root = optuna.load_study(study_name=record.spec_study_name(bench.name), storage=storage)
    for method in bench.methods:
        if bench.tunes(method):
            trials, exhausted = _tuning_trials(storage, bench, method)
            ended = sum(record.holds_configuration(t) and t.state not in (TrialState.RUNNING, TrialState.WAITING)
                        for t in trials)
            if planned is not None:
                budget = bench.protocol.trials if exhausted is None else min(bench.protocol.trials, exhausted)
                planned += budget
                ended = min(ended, budget)
            done += ended
        if planned is not None:
            planned += len(bench.seeds)
        selected = root.user_attrs.get(record.selection_attr(method, bench.ident(method)))
        if selected is None:
            continue
        finals = [t for t in store_trials(storage, record.final_study_name(bench.name, method))
                  if record.group_key(t) == selected["group_key"] and record.seed(t) in bench.seeds]
        done += len({record.seed(t) for t in finals if t.state == TrialState.COMPLETE or record.diverged(t)})
    return done, planned


def work_left(storage, bench: Benchmark) -> tuple[int, int]:
    """(training epochs left, runs in progress) for the whole benchmark, whichever process trains them: each method's
    tuning trials not yet ended (its trial budget less the ended ones, or its epoch budget less the epochs spent,
    whichever is smaller) times the recipe's epochs, plus its final seeds not done. A running run counts in full (how
    far it is is known only to its process); a pruned tuning trial will stop early, so this is an upper bound."""
    epochs, running = bench.base.epochs, 0
    left = 0
    root = optuna.load_study(study_name=record.spec_study_name(bench.name), storage=storage)
    for method in bench.methods:
        if bench.tunes(method):
            trials, exhausted = _tuning_trials(storage, bench, method)
            ended = [t for t in trials if record.holds_configuration(t)
                     and t.state not in (TrialState.RUNNING, TrialState.WAITING)]
            running += sum(t.state == TrialState.RUNNING for t in trials)
            p = bench.protocol
            options = []
            if p.trials:
                options.append(max(min(p.trials, exhausted or p.trials) - len(ended), 0) * epochs)
            if p.budget_epochs:
                options.append(max(p.budget_epochs - sum(int(record.attempt_budget(t).get("epochs", 0))
                                                         for t in ended), 0))
            left += min(options) if options else 0
        selected = root.user_attrs.get(record.selection_attr(method, bench.ident(method)))
        done = set()
        if selected is not None:
            finals = [t for t in store_trials(storage, record.final_study_name(bench.name, method))
                      if record.group_key(t) == selected["group_key"] and record.seed(t) in bench.seeds]
            done = {record.seed(t) for t in finals if t.state == TrialState.COMPLETE or record.diverged(t)}
            running += sum(t.state == TrialState.RUNNING for t in finals)
        left += (len(bench.seeds) - len(done)) * epochs
    return left, running


def seconds_per_epoch(storage, bench: Benchmark) -> tuple[float, int] | None:
    """(measured wall seconds per training epoch, runs measured) over the benchmark's runs that trained at least one
    epoch (tuning and final, whole or not), or None before any did."""
    seconds, epochs, runs = 0.0, 0, 0
    names = [record.final_study_name(bench.name, m) for m in bench.methods]
    names += [bench.tune_study_name(m) for m in bench.methods if bench.tunes(m)]
    for name in names:
        for t in store_trials(storage, name):
            budget = record.attempt_budget(t)
            if int(budget.get("epochs", 0)) > 0 and float(budget.get("seconds", 0.0)) > 0:
                seconds, epochs, runs = seconds + float(budget["seconds"]), epochs + int(budget["epochs"]), runs + 1
    return (seconds / epochs, runs) if epochs else None


def duration(seconds: float) -> str:
    """A time left as people say it: 45 s, 12 min, 3.5 h, 2.1 days."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def time_left(storage, bench: Benchmark) -> str:
    """The `regbench status` line on time: epochs left, measured seconds per epoch, and the estimate (divided among the
    runs in progress, one per worker)."""
    left, running = work_left(storage, bench)
    if left == 0:
        return "time left: none (every planned run has ended)"
    rate = seconds_per_epoch(storage, bench)
    if rate is None:
        return f"time left: unknown yet ({left} epochs left; no run has trained an epoch to time)"
    per_epoch, runs = rate
    notes = [f"{left} epochs left at {per_epoch:.2f} s/epoch, measured over {runs} run{'s' if runs != 1 else ''}"]
    if running > 1:
        notes.append(f"shared among {running} runs in progress")
    if bench.protocol.tunes and bench.protocol.pruner != "none":
        notes.append("an upper bound while tuning trials can be pruned")
    return f"time left: about {duration(left * per_epoch / max(running, 1))} ({'; '.join(notes)})"
