"""What a researcher sees outside the leaderboard (issue 20): the CLI's version and citations, SES's default inside
its search space, and the Optuna view of a benchmark (its record study labelled, final seeds not tunable). Real
Optuna storages (SQLite files); nothing trains."""
import json
import shutil
import warnings
from pathlib import Path

import optuna
import pytest

from regbench import protocol, registry, runner
from regbench.cli import main
from regbench.store import load_spec, open_storage

FIXTURE = Path(__file__).parent / "fixtures" / "tiny" / "regbench.db"


def test_version_prints_the_package_version(capsys):
    from regbench import __version__

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip().startswith(f"regbench {__version__}")


def test_list_methods_cites_papers_not_seed_file_numbers(capsys):
    assert main(["list", "methods"]) == 0
    out = capsys.readouterr().out
    assert "seed 00" not in out
    for name in ("ses", "shade", "dln_entropy"):
        line = next(line for line in out.splitlines() if line.startswith(f"{name}:"))
        assert any(str(year) in line for year in range(2014, 2027)), line
    assert '"Spectral Entropy Shaping (SES)"' in out and "arXiv 2512.06137" in out and "ICIP" in out


def test_ses_defaults_lie_inside_its_search_space():
    cls = registry.method_class("ses")
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    cls.search_space(trial)
    for name, dist in trial.distributions.items():
        default = cls.defaults[name]
        assert dist._contains(dist.to_internal_repr(default)), (name, default, dist)


def _dashboard_get(app, path: str):
    """GET one optuna-dashboard API path through its real WSGI app: (status code, JSON body)."""
    from wsgiref.util import setup_testing_defaults

    env = {"PATH_INFO": path, "REQUEST_METHOD": "GET"}
    setup_testing_defaults(env)
    status = []
    body = b"".join(app(env, lambda code, headers, exc_info=None: status.append(code)))
    return int(status[0].split()[0]), json.loads(body)


def test_final_runs_show_no_seed_param_in_optuna_dashboard_and_the_studies_are_labelled(tmp_path):
    """What optuna-dashboard computes for a final study (its importance panel, its trial table), asked through its
    own WSGI app on a store written by the protocol's functions. Before issue 20's fix the panel read "seed 1.00":
    the seed was the only param, and Optuna normalizes all-zero importances to equal shares."""
    import optuna_dashboard  # a dev dependency: this check must run wherever the tests run, CI included
    from regbench.config import RunConfig

    shutil.copy(FIXTURE, tmp_path / "regbench.db")
    storage = open_storage(f"sqlite:///{tmp_path / 'regbench.db'}")
    spec = load_spec(storage, "tiny-400")
    protocol.save_spec(storage, protocol.Benchmark.from_spec(spec))
    record = optuna.load_study(study_name="tiny-400", storage=storage)
    assert "holds no trials by design" in record.user_attrs["about"] and not record.trials
    assert load_spec(storage, "tiny-400")["seeds"] == spec["seeds"]  # an old store stays readable

    hparams = {"ses": registry.method_class("ses").resolve({}), "baseline": {}}
    for method in ("ses", "baseline"):  # baseline: no hparams at all (no param left crashed the dashboard's panel)
        finals = optuna.create_study(study_name=f"x:{method}:final", storage=storage, direction="maximize")
        configs = [RunConfig(method=method, dataset="digits", model="mlp", hparams=hparams[method], seed=s)
                   for s in (0, 1, 2)]
        assert runner.enqueue_missing(finals, configs) == 3

        def objective(trial):  # as Runner's final objective records a claimed run, then a seed-dependent score
            cfg = RunConfig.from_json(trial.user_attrs["config"])
            protocol.record_final(trial, cfg)
            return 0.5 + cfg.seed / 10

        finals.optimize(objective, n_trials=3)
        assert sorted(t.user_attrs["seed"] for t in finals.trials) == [0, 1, 2]
        assert "not a param" in finals.user_attrs["about"]

    app = optuna_dashboard.wsgi(storage)
    code, listing = _dashboard_get(app, "/api/studies")
    ids = {s["study_name"]: s["study_id"] for s in listing["study_summaries"]}
    for method in ("ses", "baseline"):
        code, body = _dashboard_get(app, f"/api/studies/{ids[f'x:{method}:final']}/param_importances")
        assert code == 200, body
        (shown,) = body["param_importances"]  # one objective
        names = {row["name"] for row in shown}
        assert "seed" not in names and names == {"method", *hparams[method]}, names
        assert len({row["importance"] for row in shown}) == 1  # equal shares: nothing varies, nothing ranked
        code, detail = _dashboard_get(app, f"/api/studies/{ids[f'x:{method}:final']}")
        assert code == 200
        for t in detail["trials"]:  # the trial table: the configuration as params, the seed as a user attribute
            assert "seed" not in {p["name"] for p in t["params"]}
            assert {a["key"]: a["value"] for a in t["user_attrs"]}["seed"] in ("0", "1", "2", 0, 1, 2)


def test_cli_prints_a_warning_as_one_line_without_its_source(monkeypatch):
    from regbench import cli

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # restored after the test
    cli._one_line_warnings()
    text = warnings.formatwarning(UserWarning("ses.beta=0.9 targets …"), UserWarning, "/x/ses.py", 171,
                                  "warnings.warn(...)")
    assert text == "regbench: warning: ses.beta=0.9 targets …\n"
