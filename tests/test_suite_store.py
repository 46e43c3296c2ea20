"""Paper suites on one road: a suite that can be a benchmark runs its arms through the store and protocol
(regbench/suites/store_arms.py); one that cannot says why in one line (``NOT_A_BENCHMARK``), printed when it runs.
The resume of a store-backed suite is tested on real runs in tests/test_suites_small.py."""
import ast
import importlib.util

import optuna
import pytest

from regbench import protocol
from regbench.cli import main
from regbench.config import RunConfig
from regbench.suites import SUITES, suite_module


def _source(name: str) -> str:
    spec = importlib.util.find_spec(f"regbench.suites.{SUITES[name]}")
    return open(spec.origin, encoding="utf-8").read()


@pytest.mark.parametrize("name", list(SUITES))
def test_every_suite_runs_through_the_store_or_says_why_not(name):
    tree = ast.parse(_source(name))
    imported = {a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and node.module == "store_arms" and node.level == 1 for a in node.names}
    called_train = any(isinstance(n, ast.Attribute) and n.attr == "train" and getattr(n.value, "id", "") == "engine"
                       for n in ast.walk(tree))
    why = getattr(suite_module(name), "NOT_A_BENCHMARK", None)
    if why is None:
        assert imported & {"run_benchmark", "run_many"} and not called_train, name
    else:
        assert isinstance(why, str) and why.strip() and "\n" not in why and not imported, name


def test_a_suite_that_is_not_a_benchmark_says_why_when_it_starts(tmp_path, capsys):
    """The line comes first, before the suite's own checks (here the run then stops at once: too few seeds)."""
    from regbench.suites import ses_rings

    out_dir = tmp_path / "out"
    assert main(["suite", "ses-rings", "--seeds", "1", "--out", str(out_dir)]) == 2
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"ses-rings: not a benchmark: {ses_rings.NOT_A_BENCHMARK}"] and "too few" in err
    assert main(["suite", "ses-beta-sweep", "--seeds", "1", "--out", str(out_dir)]) == 2
    assert capsys.readouterr().out == "" and not out_dir.exists()


def _bench(rules: protocol.TuningRules) -> protocol.Benchmark:
    base = RunConfig(method="baseline", dataset="digits", model="mlp", epochs=1)
    return protocol.Benchmark(name="b", base=base, fixed={"shade": {}}, seeds=[0], protocol=rules)


def test_tuning_rules_move_a_searched_range_and_keep_its_scale():
    moved = _bench(protocol.TuningRules(trials=3, ranges={"shade": {"weight": (1e-4, 1e-1)}}))
    trial = optuna.create_study().ask()
    hparams, _ = protocol.suggest(moved, "shade", trial)
    dist = trial.distributions["weight"]
    assert (dist.low, dist.high, dist.log) == (1e-4, 1e-1, True) and 1e-4 <= hparams["weight"] <= 1e-1
    declared = optuna.create_study().ask()
    protocol.suggest(_bench(protocol.TuningRules(trials=3)), "shade", declared)
    assert (declared.distributions["weight"].low, declared.distributions["weight"].high) == (1e-6, 1e-2)
    # what tuning depends on: a moved range or another start-up count is another tuning study
    plain = _bench(protocol.TuningRules(trials=3))
    assert len({plain.ident("shade"), moved.ident("shade"),
                _bench(protocol.TuningRules(trials=3, startup_trials=2)).ident("shade")}) == 3
    # a spec stored before these rules existed reads back as the same plan (old idents stay valid)
    assert "ranges" not in plain.spec()["protocol"] and "startup_trials" not in plain.spec()["protocol"]
    again = protocol.Benchmark.from_spec(moved.spec())
    assert again.protocol.ranges == {"shade": {"weight": [1e-4, 1e-1]}} and again.ident("shade") == moved.ident("shade")
    assert protocol.plan_changes(plain.spec(), moved.spec())[0]


def test_an_empty_searched_range_is_refused():
    with pytest.raises(protocol.ConfigError, match="is empty"):
        protocol.TuningRules(trials=1, ranges={"shade": {"weight": (0.1, 0.01)}})


def test_an_arm_through_the_store_trains_as_engine_train_does(tmp_path, data_dir):
    """The same config gives the same numbers through the store (runner, protocol) as through engine.train."""
    from regbench import engine, registry
    from regbench.suites import store_arms

    recipe = {"epochs": 2, "batch_size": 64, "optimizer": "adamw", "lr": 3e-3, "schedule": "onecycle"}
    hparams = {"beta": 0.5, "lam": 0.01}
    frame = store_arms.run_benchmark(tmp_path / "store", "arm", "digits", "mlp", {"ses": hparams}, recipe, [1],
                                     data_dir=data_dir, device="cpu", train_size=300)
    splits = registry.dataset("digits").load(data_dir, train_size=300)
    cfg = RunConfig(method="ses", dataset="digits", model="mlp", hparams=hparams, seed=1, device="cpu",
                    train_size=300, **recipe)
    direct = engine.train(cfg, splits, registry.build_method("ses", hparams))
    stored = frame.iloc[0]
    assert stored.test_acc == direct.metrics["test_acc"] and stored.val_acc == direct.metrics["val_acc"]
    assert [h["train_loss"] for h in stored.history] == [h["train_loss"] for h in direct.history]
    assert {k: v for k, v in stored.metrics.items() if k.startswith("erank/")} == \
        {k: v for k, v in direct.metrics.items() if k.startswith("erank/")}
