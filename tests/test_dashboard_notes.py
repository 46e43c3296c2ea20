"""What optuna-dashboard shows of a benchmark's studies, asked through the dashboard's own WSGI app (its REST API, the
one its pages read) on a real SQLite store whose studies were opened by regbench's Runner: metric names, what each
study is (user attributes, listed first, and a note), the importance panel's caveat, a final study's "best trial"
named for a seed. Trials are told cheap scores instead of training: the labels do not depend on how a value came."""
import json

import optuna
import pytest

from regbench import dashboard, protocol, record, runner
from regbench.config import RunConfig
from regbench.store import open_storage

optuna_dashboard = pytest.importorskip("optuna_dashboard")  # the [dev] extra: installed wherever the tests run


def _get(app, path: str, method: str = "GET", body: dict | None = None):
    from io import BytesIO
    from wsgiref.util import setup_testing_defaults

    data = json.dumps(body).encode() if body is not None else b""
    env = {"PATH_INFO": path, "REQUEST_METHOD": method, "CONTENT_TYPE": "application/json",
           "CONTENT_LENGTH": str(len(data)), "wsgi.input": BytesIO(data)}
    setup_testing_defaults(env)
    status = []
    out = b"".join(app(env, lambda code, headers, exc_info=None: status.append(code)))
    return int(status[0].split()[0]), json.loads(out) if out else None


def _bench(objective="val_acc") -> protocol.Benchmark:
    base = RunConfig(method="baseline", dataset="digits", model="mlp", epochs=3, train_size=200)
    return protocol.Benchmark(name="dash", base=base, fixed={"baseline": {}, "ses": {}}, seeds=[0, 1, 2],
                              protocol=protocol.TuningRules(trials=12, objective=objective), command="regbench run …")


def _store(tmp_path, bench):
    storage = open_storage(f"sqlite:///{tmp_path / 'regbench.db'}")
    protocol.save_spec(storage, bench)
    return storage, runner.Runner(storage, bench, splits=None)


def _ids(app) -> dict[str, int]:
    code, listing = _get(app, "/api/studies")
    assert code == 200
    return {s["study_name"]: s["study_id"] for s in listing["study_summaries"]}


def test_every_study_says_what_it_is_first_with_its_metric_name_and_a_note(tmp_path):
    bench = _bench()
    storage, run = _store(tmp_path, bench)
    tune, final = run.tune_study("ses"), run.final_study("ses")
    tune.optimize(lambda t: t.suggest_float("beta", 0.1, 1.0), n_trials=3)
    dashboard.update_importance(tune)
    app = optuna_dashboard.wsgi(storage)
    ids = _ids(app)

    code, detail = _get(app, f"/api/studies/{ids[tune.study_name]}")
    assert code == 200 and detail["objective_names"] == ["val_acc"]
    attrs = [(a["key"], a["value"]) for a in detail["user_attrs"]]
    assert [k for k, _ in attrs[:6]] == [record.ABOUT, record.IMPORTANCE, record.STUDY_BENCHMARK,
                                        record.STUDY_METHOD, record.STUDY_PHASE, record.STUDY_RECIPE]
    shown = dict(attrs)
    assert shown[record.STUDY_BENCHMARK] == "dash" and shown[record.STUDY_METHOD] == "ses"
    assert shown[record.STUDY_PHASE] == "tune"
    assert "digits (n=200); mlp; 3 epochs" in shown[record.STUDY_RECIPE] and "final seeds 0,1,2" in shown["recipe"]
    assert "Tuning of ses for benchmark dash" in shown[record.ABOUT]
    assert shown[record.IMPORTANCE].startswith("Not meaningful yet: 3 completed trial(s)")
    assert "## Tuning: ses · benchmark dash" in detail["note"]["body"]

    code, detail = _get(app, f"/api/studies/{ids[final.study_name]}")
    (name,) = detail["objective_names"]
    assert name.startswith("val_acc of one seed") and "luckiest seed" in name  # the History plot's axis
    shown = {a["key"]: a["value"] for a in detail["user_attrs"]}
    assert "'Best Trial' here is the luckiest seed, not a better configuration" in shown[record.ABOUT]
    assert shown[record.STUDY_PHASE] == "final" and "equal by construction" in shown[record.IMPORTANCE]
    assert "**Best Trial** is a seed, not a configuration" in detail["note"]["body"]
    assert detail["directions"] == ["maximize"]

    code, detail = _get(app, f"/api/studies/{ids['dash']}")  # the benchmark's own record
    assert [a["key"] for a in detail["user_attrs"]][:3] == [record.ABOUT, record.STUDY_BENCHMARK, record.STUDY_RECIPE]
    assert "## Benchmark dash" in detail["note"]["body"]


def test_importance_caveat_follows_the_completed_trials(tmp_path):
    bench = _bench()
    storage, run = _store(tmp_path, bench)
    tune = run.tune_study("ses")
    app = optuna_dashboard.wsgi(storage)
    for total, start in ((10, "Not meaningful yet: 10"), (12, "Unreliable: 12 completed trials, 2 in the top 10 %"),
                         (50, "50 completed trials (5 in the top 10 %")):
        tune.optimize(lambda t: t.suggest_float("beta", 0.1, 1.0), n_trials=total - len(tune.trials))
        dashboard.update_importance(tune)
        code, detail = _get(app, f"/api/studies/{_ids(app)[tune.study_name]}")
        assert {a["key"]: a["value"] for a in detail["user_attrs"]}[record.IMPORTANCE].startswith(start), total
        code, body = _get(app, f"/api/studies/{_ids(app)[tune.study_name]}/param_importances")
        assert code == 200 and body["param_importances"][0]  # the panel the caveat is about is drawn


def test_a_final_study_of_a_minimized_objective_picks_its_best_seed_by_that_objective(tmp_path):
    storage, run = _store(tmp_path, _bench("val_nll"))
    final = run.final_study("ses")
    app = optuna_dashboard.wsgi(storage)
    code, detail = _get(app, f"/api/studies/{_ids(app)[final.study_name]}")
    assert code == 200 and detail["directions"] == ["minimize"] and detail["objective_names"][0].startswith("val_nll of one seed")


def test_a_note_edited_in_the_dashboard_is_kept_and_labels_are_not_rewritten(tmp_path):
    bench = _bench()
    storage, run = _store(tmp_path, bench)
    tune = run.tune_study("ses")
    app = optuna_dashboard.wsgi(storage)
    sid = _ids(app)[tune.study_name]
    _, detail = _get(app, f"/api/studies/{sid}")
    version = detail["note"]["version"]
    code, _ = _get(app, f"/api/studies/{sid}/note", "PUT", {"version": version + 1, "body": "my own note"})
    assert code in (200, 204)
    runner.Runner(storage, bench, splits=None).tune_study("ses")  # another process opens the study
    assert optuna_dashboard.get_note(optuna.load_study(study_name=tune.study_name, storage=storage)) == "my own note"


def test_each_trained_run_has_a_note_on_its_trial_page_saying_what_it_is(tmp_path, data_dir):
    """A real tiny run through the Runner (1 epoch): the dashboard's trial pages read each run's note."""
    from regbench import registry

    splits = registry.dataset("digits").load(data_dir, split_seed=0, train_size=120)
    base = RunConfig(method="baseline", dataset="digits", model="mlp", epochs=1, train_size=120, device="cpu",
                     split_hash=splits.split_hash, data_dir=str(data_dir))
    bench = protocol.Benchmark(name="notes", base=base, fixed={"baseline": {}}, seeds=[0, 1],
                               protocol=protocol.TuningRules(trials=1, tune_shared=True))
    storage = open_storage(f"sqlite:///{tmp_path / 'regbench.db'}")
    protocol.save_spec(storage, bench)
    runner.Runner(storage, bench, splits).run()
    app = optuna_dashboard.wsgi(storage)
    ids = _ids(app)
    _, tune = _get(app, f"/api/studies/{ids[bench.tune_study_name('baseline')]}")
    (trial,) = tune["trials"]
    assert trial["note"]["body"].startswith("Tuning trial of baseline (benchmark notes)"), trial["note"]
    _, final = _get(app, f"/api/studies/{ids['notes:baseline:final']}")
    bodies = sorted(t["note"]["body"] for t in final["trials"])
    assert [b[:7] for b in bodies] == ["Seed 0 ", "Seed 1 "] and all("luckiest seed" in b for b in bodies), bodies
    assert "## Final runs: baseline" in final["note"]["body"]  # the study's own note is untouched by the trials'
