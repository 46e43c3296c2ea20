"""What a researcher sees outside the leaderboard (issue 20): the CLI's version and citations, SES's default inside
its search space, and the Optuna view of a benchmark (its record study labelled, final seeds not tunable). Real
Optuna storages (SQLite files); nothing trains."""
import json
import shutil
import sqlite3
import warnings
from pathlib import Path

import optuna
import pytest

from regbench import registry, study
from regbench.cli import main
from regbench.store import load_spec, open_storage

FIXTURE = Path(__file__).parent / "fixtures" / "tiny" / "regbench.db"


def test_version_prints_the_package_version(capsys):
    from regbench import __version__

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"regbench {__version__}"


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


def test_final_seeds_are_fixed_params_and_the_studies_are_labelled(tmp_path):
    shutil.copy(FIXTURE, tmp_path / "regbench.db")
    storage = open_storage(f"sqlite:///{tmp_path / 'regbench.db'}")
    spec = load_spec(storage, "tiny-400")
    study.save_spec(storage, study.Benchmark.from_spec(spec))
    record = optuna.load_study(study_name="tiny-400", storage=storage)
    assert "holds no trials by design" in record.user_attrs["about"] and not record.trials
    assert load_spec(storage, "tiny-400")["seeds"] == spec["seeds"]  # an old store stays readable

    finals = optuna.create_study(study_name="x:ses:final", storage=storage, direction="maximize")
    for seed in (0, 1, 2):
        finals.enqueue_trial({"seed": seed}, user_attrs={"config": json.dumps({"seed": seed})})  # as the protocol

    def objective(trial):
        study.record_seed(trial, json.loads(trial.user_attrs["config"])["seed"])
        return 0.5 + trial.params["seed"] / 10

    finals.optimize(objective, n_trials=3)
    assert sorted(t.params["seed"] for t in finals.trials) == [0, 1, 2]
    assert all(t.distributions["seed"].single() for t in finals.trials)  # a range of one value: nothing to tune
    # No "seed importance 1.00": fANOVA sees no tunable param; PED-ANOVA (Optuna's default) gives the seed 0 before
    # normalizing (its 1.0 for a lone param is 0/0 normalized). The old 0…2³¹ range gave fANOVA {"seed": 1.0}.
    assert optuna.importance.get_param_importances(
        finals, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)) == {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "experimental argument normalize", "regimes with < 2 trials"
        assert optuna.importance.get_param_importances(finals, normalize=False) == {"seed": 0.0}
    assert "not a hyperparameter" in finals.user_attrs["about"]
    with sqlite3.connect(tmp_path / "regbench.db") as db:  # what optuna-dashboard reads: the seed's stored range
        ranges = {json.loads(d)["attributes"]["low"] == json.loads(d)["attributes"]["high"] for (d,) in db.execute(
            "select distribution_json from trial_params p join trials t using(trial_id) join studies s "
            "using(study_id) where s.study_name = 'x:ses:final'")}
    assert ranges == {True}


def test_cli_prints_a_warning_as_one_line_without_its_source(monkeypatch):
    from regbench import cli

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # restored after the test
    cli._one_line_warnings()
    text = warnings.formatwarning(UserWarning("ses.beta=0.9 targets …"), UserWarning, "/x/ses.py", 171,
                                  "warnings.warn(...)")
    assert text == "regbench: warning: ses.beta=0.9 targets …\n"
