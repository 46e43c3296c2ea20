"""What optuna-dashboard shows of a benchmark's studies, so that none of its panels can be misread.

The dashboard's first screen of a study shows the objective's name (the History plot's axis), the Hyperparameter
Importance panel, the Best Trial card and the study's user attributes, five rows at a time in the order they were
first written. So every study regbench creates is labelled before anything else is written to it:

* its metric name (``study.set_metric_names``): a tuning study's value is the tuning objective (``val_acc`` or
  ``val_nll``); a final study's value is that objective for one seed of the selected configuration, and its name says
  so, because the dashboard's "Best Trial" of a final study is the luckiest seed, not a better configuration;
* user attributes listed first: what the study is (``record.ABOUT``), how far its importance panel can be trusted
  (``record.IMPORTANCE``), then the benchmark, method, phase and recipe (``record.STUDY_*``);
* a study note (the dashboard's Note page) with the same in prose, and a note on each trained run's trial page
  (``note_trial``: a tuning configuration, or one seed of the selected configuration).

The importance panel cannot be switched off from the store. optuna-dashboard computes it with Optuna's PED-ANOVA
over the top 10 % of completed trials (``target_quantile=0.1``), and Optuna's own documentation asks for at least 5
trials in that top set, i.e. ``IMPORTANCE_RELIABLE`` = 50 completed trials; with 10 or fewer the top set is a single
trial and the bars say where that one trial lies (``IMPORTANCE_MEANINGLESS``). A tuning study's caveat counts its
completed trials and is rewritten after each of its trials; a final study's says its bars are equal by construction
(every param is fixed; only the seed varies, and it is not a param).

The note is written in the dashboard's own storage format (study system attributes ``dashboard:note_ver`` and
``dashboard:note_str:<i>``, chunks of 2045 characters), because optuna-dashboard is a development extra, not a
dependency; tests/test_dashboard_notes.py reads it back through the dashboard's own app. Nothing here imports torch.
"""
from __future__ import annotations

import hashlib
import math
import warnings

import optuna

from regbench import optuna_private, record

IMPORTANCE_RELIABLE = 50     # completed trials: 5 in PED-ANOVA's top 10 %, the minimum Optuna's documentation asks
IMPORTANCE_MEANINGLESS = 10  # completed trials: at or below, the top 10 % is one trial
NOTE_VERSION = "dashboard:note_ver"
NOTE_CHUNK = "dashboard:note_str:"
NOTE_CHUNK_LENGTH = 2045


def metric_name(objective: str, phase: str) -> str:
    """The name of a study's value as the dashboard shows it (the History plot's axis)."""
    if phase == "tune":
        return objective
    return f"{objective} of one seed (best = luckiest seed)"


def recipe_summary(bench) -> str:
    """One line: the shared recipe and data every run of the benchmark trains on."""
    b = bench.base
    data = b.dataset
    if b.train_per_class:
        data += f" ({b.train_per_class}/class)"
    elif b.train_size:
        data += f" (n={b.train_size})"
    parts = [data, b.model, f"{b.epochs} epochs", f"{b.optimizer} lr {b.lr:g} {b.schedule}", f"batch {b.batch_size}",
             f"wd {b.weight_decay:g}"]
    if b.augment and b.augment != "none":
        parts.append(f"augment {b.augment}")
    if b.shift:
        parts.append(f"shift {b.shift}")
    p = bench.protocol
    if p.tunes:
        budget = " / ".join(x for x in (f"{p.trials} trials" if p.trials else "",
                                        f"{p.budget_epochs} epochs" if p.budget_epochs else "") if x)
        parts.append(f"tuned on {p.objective}: {budget} per method, pruner {p.pruner}"
                     + (", lr and wd tuned too" if p.tune_shared else ""))
    else:
        parts.append("no tuning (defaults)")
    seeds = bench.seeds
    shown = ",".join(map(str, seeds)) if len(seeds) <= 8 else f"{seeds[0]}..{seeds[-1]} ({len(seeds)})"
    parts.append(f"final seeds {shown}")
    return "; ".join(parts)


def about(bench, phase: str, method: str) -> str:
    if phase == "tune":
        return (f"Tuning of {method} for benchmark {bench.name}: each trial is one configuration trained with the "
                f"tuning seed and scored on validation ({bench.protocol.objective}); the best one is rerun over the "
                f"final seeds in {record.final_study_name(bench.name, method)}. Test is never read here.")
    return (f"Final runs of {method} for benchmark {bench.name}: one trial per seed of the ONE configuration "
            f"selected on validation. 'Best Trial' here is the luckiest seed, not a better configuration: report the "
            f"mean and interval over seeds (leaderboard.md, MLflow parent runs).")


def importance_caveat(phase: str, completed: int) -> str:
    if phase != "tune":
        return ("Not meaningful: every param is the same in every trial (only the seed varies, and it is not a "
                "param), so the bars are equal by construction.")
    if completed <= IMPORTANCE_MEANINGLESS:
        return (f"Not meaningful yet: {completed} completed trial(s). The dashboard's PED-ANOVA ranks params by the "
                f"top 10 % of completed trials, here at most one trial. Reliable from {IMPORTANCE_RELIABLE}.")
    if completed < IMPORTANCE_RELIABLE:
        top = math.ceil(completed / 10)
        return (f"Unreliable: {completed} completed trials, {top} in the top 10 % that PED-ANOVA ranks params by; "
                f"Optuna asks for at least 5 there ({IMPORTANCE_RELIABLE} completed trials).")
    return (f"{completed} completed trials ({math.ceil(completed / 10)} in the top 10 % PED-ANOVA ranks params by): "
            f"enough for a rough ranking on this benchmark's tuning objective.")


def study_attrs(bench, phase: str, method: str, completed: int = 0) -> dict:
    """A study's user attributes, in the order the dashboard should list them."""
    return {record.ABOUT: about(bench, phase, method), record.IMPORTANCE: importance_caveat(phase, completed),
            record.STUDY_BENCHMARK: bench.name, record.STUDY_METHOD: method, record.STUDY_PHASE: phase,
            record.STUDY_RECIPE: recipe_summary(bench)}


def note(bench, phase: str, method: str) -> str:
    """The study's note (Markdown), shown on the dashboard's Note page."""
    lines = [f"## {'Tuning' if phase == 'tune' else 'Final runs'}: {method} · benchmark {bench.name}", "",
             about(bench, phase, method), "", f"**Recipe**: {recipe_summary(bench)}", ""]
    if phase == "tune":
        objective = f"**Objective**: {bench.protocol.objective} on the validation split ({bench.protocol.direction})."
        importance = (f"**Hyperparameter Importance**: computed by the dashboard (PED-ANOVA over the top 10 % of "
                      f"completed trials). It is not meaningful with {IMPORTANCE_MEANINGLESS} or fewer completed "
                      f"trials and unreliable below {IMPORTANCE_RELIABLE}; the user attribute `{record.IMPORTANCE}` "
                      f"says where this study stands.")
        lines += [objective, "", importance]
    else:
        best = ("**Best Trial** is a seed, not a configuration: every trial here runs the same configuration; the "
                "spread between them is seed noise, the quantity the leaderboard's intervals measure.")
        lines += [best, "", "**Hyperparameter Importance** is not meaningful here: the bars are equal by construction.",
                  "", f"The seed of each trial is its user attribute `{record.SEED}`."]
    return "\n".join(lines)


def label(study, bench, phase: str, method: str) -> None:
    """Label a study as above: writes only what differs, so every process may call it on every study it opens. On a
    study created before labels existed the attributes are appended (the dashboard lists them after older ones)."""
    names = [metric_name(bench.protocol.objective, phase)]
    if study.metric_names != names:
        with warnings.catch_warnings():  # "experimental" since Optuna 3.2, and what the dashboard reads
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(names)
    attrs = study.user_attrs
    wanted = study_attrs(bench, phase, method)
    for key, value in wanted.items():
        if key == record.IMPORTANCE and key in attrs and phase == "tune":
            continue  # kept up to date by update_importance as trials complete
        if attrs.get(key) != value:
            study.set_user_attr(key, value)
    save_note(study, note(bench, phase, method))


def update_importance(study, phase: str = "tune") -> None:
    """Rewrite a study's importance caveat for its count of completed trials (after each of its trials)."""
    from optuna.trial import TrialState

    completed = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    text = importance_caveat(phase, completed)
    if study.user_attrs.get(record.IMPORTANCE) != text:
        study.set_user_attr(record.IMPORTANCE, text)


def _keys(trial_id: int | None) -> tuple[str, str]:
    """(version key, chunk prefix) of the study's note (``trial_id`` None) or of one trial's, as the dashboard names
    them among the study's system attributes."""
    if trial_id is None:
        return NOTE_VERSION, NOTE_CHUNK
    return f"dashboard:{trial_id}:note_ver", f"dashboard:{trial_id}:note_str:"


def _note_attrs(system_attrs: dict, trial_id: int | None = None) -> tuple[int, str]:
    version_key, prefix = _keys(trial_id)
    version = int(system_attrs.get(version_key, 0))
    chunks = {k: v for k, v in system_attrs.items() if k.startswith(prefix)}
    return version, "".join(chunks.get(f"{prefix}{i}", "") for i in range(len(chunks)))


def _write_note(storage, study_id: int, trial_id: int | None, version: int, body: str, old_chunks: int) -> None:
    version_key, prefix = _keys(trial_id)
    chunks = [body[i:i + NOTE_CHUNK_LENGTH] for i in range(0, len(body), NOTE_CHUNK_LENGTH)] or [""]
    storage.set_study_system_attr(study_id, version_key, version)
    for i, chunk in enumerate(chunks):
        storage.set_study_system_attr(study_id, f"{prefix}{i}", chunk)
    for i in range(len(chunks), old_chunks):  # a shorter note: clear the old tail, as the dashboard's editor does
        storage.set_study_system_attr(study_id, f"{prefix}{i}", "")


def trial_note(bench, kind: str, cfg) -> str:
    """A run's note (the dashboard's trial page): what the trial is, so its value is read for what it is."""
    if kind == "tune":
        return (f"Tuning trial of {cfg.method} (benchmark {bench.name}): one configuration, trained with the tuning "
                f"seed {cfg.seed} and scored on validation ({bench.protocol.objective}); a pruned trial stopped "
                f"early on it. The best one is rerun over the final seeds.")
    return (f"Seed {cfg.seed} of {cfg.method}'s selected configuration (benchmark {bench.name}). Every trial of this "
            f"study runs the same configuration: this value is one draw of seed noise, and the best of them is the "
            f"luckiest seed, not a better configuration.")


def note_trial(trial, bench, kind: str, cfg) -> None:
    """Write a run's note when it has none (a note someone wrote is kept)."""
    storage = trial.storage
    study_id = storage.get_study_id_from_name(trial.study.study_name)
    trial_id = optuna_private.trial_id(trial)
    system = storage.get_study_system_attrs(study_id)
    version, current = _note_attrs(system, trial_id)
    if not current:
        _write_note(storage, study_id, trial_id, version + 1, trial_note(bench, kind, cfg), 0)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def save_note(study, body: str) -> None:
    """The study's note in optuna-dashboard's format, unless it already says ``body`` or someone edited the note regbench
    wrote last (``record.NOTE_WRITTEN`` keeps a digest of that text): an edit made in the dashboard is never overwritten."""
    storage = optuna_private.storage_of(study)
    study_id = storage.get_study_id_from_name(study.study_name)
    system = storage.get_study_system_attrs(study_id)
    version, current = _note_attrs(system)
    if current == body or (current and _digest(current) != system.get(record.NOTE_WRITTEN)):
        return
    storage.set_study_system_attr(study_id, record.NOTE_WRITTEN, _digest(body))
    _write_note(storage, study_id, None, version + 1, body, sum(k.startswith(NOTE_CHUNK) for k in system))
