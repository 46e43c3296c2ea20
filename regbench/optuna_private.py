"""Every use of Optuna's private API, behind one small adapter.

The protocol needs four things Optuna does not expose publicly: a trial's storage id, claiming a queued trial for a
group of seeds (WAITING -> RUNNING through the storage, which refuses a trial another worker took), a heartbeat
thread for trials this process trains without ``study.optimize``, and, for stale-trial recovery, the ids of trials
that have a stored heartbeat and Optuna's own stale-trial query. ``tests/test_optuna_private.py`` pins the Optuna
versions this was checked against: an upgrade fails that test first, not the protocol silently.
"""
from __future__ import annotations

import optuna
import optuna.storages._heartbeat as _heartbeat
from optuna.trial import TrialState

CHECKED_VERSIONS = ("5.1.",)  # prefixes of the Optuna versions whose private API below was read and tested

BaseHeartbeat = _heartbeat.BaseHeartbeat


def trial_id(trial) -> int:
    """The storage's id of a trial (a FrozenTrial, or a live Trial)."""
    return trial._trial_id


def storage_of(study: optuna.Study):
    return study._storage


def claim_waiting(study: optuna.Study, trial) -> bool:
    """Claim a queued trial: True when this process moved it WAITING -> RUNNING, False when another one had."""
    return storage_of(study).set_trial_state_values(trial_id(trial), TrialState.RUNNING)


def heartbeat_thread(study: optuna.Study, trial):
    """A context manager beating for ``trial`` while this process trains it outside ``study.optimize``."""
    return _heartbeat.get_heartbeat_thread(trial_id(trial), storage_of(study))


def rdb_trials_with_heartbeat(storage: optuna.storages.RDBStorage, study_id: int) -> set[int]:
    """Ids of the study's trials that have a heartbeat row in an RDB storage."""
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    with _create_scoped_session(storage.scoped_session) as session:
        return {tid for (tid,) in session.query(models.TrialHeartbeatModel.trial_id)
                .join(models.TrialModel).filter(models.TrialModel.study_id == study_id)}


def rdb_heartbeat_ages(storage: optuna.storages.RDBStorage, trial_ids: list[int]) -> dict[int, float]:
    """Seconds since each trial's stored heartbeat, on the database's own clock (as Optuna's stale-trial query
    measures it); trials without a heartbeat row are absent."""
    import sqlalchemy
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    with _create_scoped_session(storage.scoped_session) as session:
        now = session.execute(sqlalchemy.func.now()).scalar().replace(tzinfo=None)
        rows = session.query(models.TrialHeartbeatModel.trial_id, models.TrialHeartbeatModel.heartbeat).filter(
            models.TrialHeartbeatModel.trial_id.in_(trial_ids)).all()
    return {tid: (now - beat.replace(tzinfo=None)).total_seconds() for tid, beat in rows}


def rdb_stale_trial_ids(storage: optuna.storages.RDBStorage, study_id: int) -> list[int]:
    """Optuna's own answer: RUNNING trials whose heartbeat is older than the grace period."""
    return optuna.storages.RDBStorage._get_stale_trial_ids(storage, study_id)


# The hook Optuna's ``fail_stale_trials`` calls on a storage; regbench's storages override it (regbench/store.py).
STALE_TRIALS_HOOK = "_get_stale_trial_ids"
