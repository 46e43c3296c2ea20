"""What each arm of a benchmark got from tuning, read from the store: the leaderboard header's tuning lines.

The header states the rule the benchmark was planned with, then what every arm actually spent (tuning trials ended,
epochs trained), counted from the store's trials of the current plan, so it can claim an equal budget only where the
counts are equal. Fair tuning (the default with ``--trials`` or ``--budget-epochs``) gives every arm, baseline
included, the same budget over its own hparams plus the shared lr and weight decay (DomainBed's protocol,
docs/architecture.md); ``--no-tune-shared`` and ``--untuned`` opt out, and the lines then say per arm what it got.
No torch, no training code: reports import it.
"""
from __future__ import annotations

from optuna.trial import TrialState

from regbench import record
from regbench.store import trials_of

SHARED_PREFIX = "shared."  # as protocol.SHARED_PREFIX: a tuning trial's shared lr / weight decay params


def tuning_spent(trials) -> dict:
    """Tuning trials that ended and hold a configuration (done, pruned, diverged or failed; an interrupted attempt
    is one trial with its resumed copy), and every epoch trained, interrupted attempts included."""
    ended = [t for t in trials if t.state not in (TrialState.WAITING, TrialState.RUNNING)
             and not record.skipped(t) and not record.interrupted(t)]
    return {"trials": len(ended), "pruned": sum(t.state == TrialState.PRUNED for t in ended),
            "epochs": record.spent(trials)["epochs"],
            "open": sum(t.state in (TrialState.WAITING, TrialState.RUNNING) for t in trials)}


def arms(storage, spec: dict) -> dict[str, dict]:
    """Per method: whether it was tuned, over which params (its own, the shared ones), and what it spent."""
    proto = spec.get("protocol") or {}
    untuned = set(proto.get("untuned") or ())
    out = {}
    for method, info in spec["methods"].items():
        space = list(info.get("space", info.get("hparams", {})))
        tuned = bool(info.get("tune_study"))
        spent = tuning_spent(trials_of(storage, info.get("tune_study"))) if tuned else {"trials": 0, "pruned": 0,
                                                                                           "epochs": 0, "open": 0}
        out[method] = {"tuned": tuned, "untuned_by_flag": method in untuned,
                       "own": [k for k in space if not k.startswith(SHARED_PREFIX)],
                       "shared": [k.removeprefix(SHARED_PREFIX) for k in space if k.startswith(SHARED_PREFIX)],
                       **spent}
    return out


def _budget_text(proto: dict) -> str:
    return " and ".join(x for x in (f"{proto['trials']} trials" if proto.get("trials") else "",
                                    f"{proto['budget_epochs']} tuning epochs" if proto.get("budget_epochs") else "")
                        if x)


def _spent_text(method: str, arm: dict) -> str:
    if not arm["tuned"]:
        why = "`--untuned`" if arm["untuned_by_flag"] else "nothing to tune"
        return f"{method} 0 trials (its defaults: {why})"
    pruned = f", {arm['pruned']} pruned" if arm["pruned"] else ""
    return f"{method} {arm['trials']} trials / {arm['epochs']} epochs{pruned}"


def tuning_lines(storage, spec: dict) -> list[str]:
    """The header's tuning lines: the rule as planned, then what each arm spent, counted from the store."""
    proto = spec.get("protocol") or {}
    if not (proto.get("trials") or proto.get("budget_epochs")):
        return ["- no tuning: every method ran with its defaults (and any `--set`)"]
    rule = (f"Optuna TPE (seed {proto.get('sampler_seed', 0)}, {proto.get('pruner', 'median')} pruner), objective "
            f"`{proto.get('objective', 'val_acc')}` on the validation split (test never read); the best trial was "
            f"rerun over the seeds below")
    per_arm = arms(storage, spec)
    budget = _budget_text(proto)
    fair = all(a["tuned"] and a["shared"] for a in per_arm.values())
    if fair:
        lines = [f"- tuning (fair): a budget of {budget} per arm, baseline included, over each arm's own "
                 f"hparams plus the shared lr and weight decay (DomainBed's protocol); {rule}"]
    else:
        why = [w for w, on in (("the shared lr and weight decay were not tuned (`--no-tune-shared`)",
                                not proto.get("tune_shared")),
                               (f"{', '.join(proto.get('untuned') or ())} ran untuned (`--untuned`)",
                                bool(proto.get("untuned")))) if on]
        lines = [f"- tuning NOT the same for every arm ({'; '.join(why)}): a budget of {budget} for each tuned arm; "
                 f"{rule}. Per arm:"]
        for method, arm in per_arm.items():
            if not arm["tuned"]:
                what = ("its defaults, not tuned (`--untuned`)" if arm["untuned_by_flag"]
                        else "its defaults, not tuned (no hparams of its own and the shared ones not tuned)")
            else:
                over = ", ".join(arm["own"] + arm["shared"]) or "nothing"
                fixed = "" if arm["shared"] else " (lr and weight decay fixed at the recipe's)"
                what = f"{budget} over {over}{fixed}"
            lines.append(f"  - {method}: {what}")
    spent = [a for a in per_arm.values() if a["tuned"]]
    counts = {a["trials"] for a in spent}
    said = "; ".join(_spent_text(m, a) for m, a in per_arm.items())
    if len(spent) == len(per_arm) and len(counts) == 1:
        equal = f"every arm ended {counts.pop()} tuning trials"
        epochs = {a["epochs"] for a in spent}
        equal += (f" and trained {epochs.pop()} tuning epochs" if len(epochs) == 1
                  else " (epochs differ: pruning stops poor trials early)")
    else:
        equal = "the arms' tuning budgets differ"
    so_far = " so far (tuning trials are still queued or running)" if any(a["open"] for a in spent) else ""
    lines.append(f"- tuning spent, counted from the store{so_far}: {equal}; {said}")
    return lines
