"""What a benchmark's store says about its progress: the per-method lines of ``regbench status`` and the
``[done/planned]`` count of every worker's progress lines."""
from __future__ import annotations

import optuna
from optuna.trial import TrialState

from regbench import record
from regbench.protocol import Benchmark
from regbench.store import trials_of as store_trials

def _counts(trials) -> dict[str, int]:
    counts = {"done": 0, "running": 0, "failed": 0, "pruned": 0, "queued": 0, "interrupted": 0}
    for t in trials:
        if record.skipped(t) or record.superseded(t):  # never trained
            continue
        if record.interrupted(t):  # its queued copy resumes it: shown apart, never as a failed run
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
            parts.append("nothing to tune")
        if bench.tunes(method):
            trials, exhausted = _tuning_trials(storage, bench, method)
            c = _counts(trials)
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
            parts.append(f"tuning {c['done']} done, {c['running']} running, {c['pruned']} pruned, {c['failed']} "
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
            c = _counts(trials)
            seeds_done = {record.seed(t) for t in trials if t.state == TrialState.COMPLETE}
            lost = {record.seed(t) for t in trials if record.diverged(t)}
            busy = {record.seed(t) for t in trials if t.state == TrialState.RUNNING}
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
