"""regbench/optuna_private.py is the only module that reaches into Optuna's private API. This pins the versions it was
read against and checks that every private name it uses still exists with the shape it relies on, so an Optuna
upgrade fails here, in one place, instead of breaking claims, heartbeats or stale-trial recovery silently."""
import inspect

import optuna
from optuna.trial import TrialState

from regbench import optuna_private
from regbench.store import open_storage


def test_optuna_is_a_version_the_adapter_was_checked_against():
    assert optuna.__version__.startswith(optuna_private.CHECKED_VERSIONS), (
        f"Optuna {optuna.__version__} is not among {optuna_private.CHECKED_VERSIONS}: read regbench/optuna_private.py "
        f"against it, rerun this file, then add the version")


def test_every_private_name_the_adapter_uses_exists():
    from optuna.storages import _heartbeat
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    assert callable(_heartbeat.get_heartbeat_thread) and inspect.isclass(_heartbeat.BaseHeartbeat)
    assert hasattr(models, "TrialHeartbeatModel") and hasattr(models, "TrialModel") and callable(_create_scoped_session)
    assert callable(getattr(optuna.storages.RDBStorage, optuna_private.STALE_TRIALS_HOOK))


def test_claim_heartbeat_and_stale_query_work_on_a_real_store(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'store.db'}")
    study = optuna.create_study(study_name="s", storage=storage)
    study.enqueue_trial({})
    study.enqueue_trial({})
    first, second = study.get_trials(deepcopy=False)
    assert optuna_private.trial_id(first) == first._trial_id
    assert optuna_private.claim_waiting(study, first) is True
    assert storage.get_trial(optuna_private.trial_id(first)).state == TrialState.RUNNING
    assert optuna_private.claim_waiting(study, first) is False  # taken: the storage refuses a second claim
    with optuna_private.heartbeat_thread(study, first):
        pass
    study_id = storage.get_study_id_from_name("s")
    assert optuna_private.trial_id(first) in optuna_private.rdb_trials_with_heartbeat(storage, study_id)
    assert optuna_private.trial_id(second) not in optuna_private.rdb_trials_with_heartbeat(storage, study_id)
    assert optuna_private.rdb_stale_trial_ids(storage, study_id) == []  # it just beat
