"""Composition (`ses+spectral_norm`, `shade+dropout`): sum of the parts' losses, namespaced hparams and search space,
conflicts refused, and a real CLI run of both papers' composites."""
import json
import sqlite3

import optuna
import pytest
import torch

from helpers import regbench_cli
from regbench import engine, models, registry
from regbench.errors import ConfigError, HparamError
from regbench.methods.base import Method, StepContext
from regbench.methods.composite import compose


def step_on(model, capture, x, y):
    capture.active = True
    logits = model(x)
    capture.active = False
    return StepContext(inputs=x, targets=y, logits=logits, task_loss=torch.nn.functional.cross_entropy(logits, y),
                       activations=dict(capture.store))


def test_composite_loss_is_the_sum_of_its_parts_on_the_same_activations():
    torch.manual_seed(0)
    x, y = torch.randn(32, 40), torch.randint(0, 10, (32,))
    setups = {"composite": [("ses+shade", {"ses.beta": 0.5})], "side by side": [("ses", {"beta": 0.5}), ("shade", {})]}
    losses = {}
    for label, spec in setups.items():
        torch.manual_seed(1)  # identical model weights for both setups
        model = models.create_model("mlp", 10, (40,))
        capture = engine.ActivationCapture(model)
        methods = [registry.build_method(name, hp) for name, hp in spec]
        for m in methods:
            m.attach(model, engine.ModelContext(model, capture, 10, (40,)))
        ctx = step_on(model, capture, x, y)
        losses[label] = sum(m.loss(ctx) for m in methods)
        parts = methods if label == "side by side" else methods[0].members
        assert len(parts) == 2 and all(p.loss(ctx).item() > 0 for p in parts)
    torch.testing.assert_close(losses["composite"], losses["side by side"])


def test_hparams_are_namespaced_and_typed_by_part():
    cls = registry.method_class("ses+shade")
    assert {"ses.beta", "ses.lam", "shade.weight", "shade.momentum"} <= set(cls.defaults)
    m = cls({"ses.beta": "0.4", "shade.weight": "0.01"})
    assert m.members[0].hparams["beta"] == 0.4 and m.members[1].hparams["weight"] == 0.01
    with pytest.raises(HparamError, match=r"ses.beta=1.5 is outside \(0, 1\)"):
        cls({"ses.beta": "1.5"})
    with pytest.raises(HparamError, match="has no hparam 'beta'"):
        cls({"beta": "0.5"})


def test_search_space_is_namespaced_in_one_study():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    space = registry.method_class("ses+shade").search_space(trial)
    assert set(space) == set(trial.params) and {"ses.beta", "ses.lam", "shade.weight"} <= set(space)
    registry.method_class("ses+shade")(space)  # a sampled point is a valid configuration


@pytest.mark.parametrize("name,message", [
    ("ses+ses", "names method 'ses' twice"),
    ("baseline+ses", "includes 'baseline'"),
])
def test_bad_composites_are_refused(name, message):
    with pytest.raises(ConfigError, match=message):
        registry.method_class(name)


def test_parts_that_set_the_same_option_differently_conflict():
    class WD1(Method):
        name = "wd_a"

        def optimizer_options(self):
            return {"weight_decay": 1e-4}

    class WD2(WD1):
        name = "wd_b"

        def optimizer_options(self):
            return {"weight_decay": 1e-2}

    with pytest.raises(ConfigError, match="wd_a and wd_b both set the optimizer option 'weight_decay'"):
        compose([WD1, WD2])({}).optimizer_options()


@pytest.mark.slow
def test_cli_runs_the_papers_composites(tmp_path, data_dir):
    out = tmp_path / "out"
    proc = regbench_cli("run", "--methods", "ses+spectral_norm,shade+dropout", "--dataset", "digits",
                        "--set", "ses+spectral_norm.ses.beta=0.5", "--epochs", "1", "--seeds", "1", "--quiet",
                        "--out", str(out), "--data-dir", str(data_dir))
    assert proc.returncode == 0, proc.stderr
    board = (out / "leaderboard.md").read_text()
    assert "ses+spectral_norm" in board and "shade+dropout" in board
    with sqlite3.connect(out / "regbench.db") as db:
        configs = [json.loads(json.loads(v)) for (v,) in db.execute(
            "select value_json from trial_user_attributes where key='config'")]
    by_method = {c["method"]: c["hparams"] for c in configs}
    assert by_method["ses+spectral_norm"]["ses.beta"] == 0.5
    assert "dropout.rate" in by_method["shade+dropout"]
