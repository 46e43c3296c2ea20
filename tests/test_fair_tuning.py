"""Fair tuning is the default: with --trials every arm, baseline included, tunes the shared lr and weight decay with
its own hparams under one budget (DomainBed's protocol), and the leaderboard header states what each arm spent,
counted from the store. Opting out is explicit (--no-tune-shared, --untuned) and the header then says per arm what
it got; --trials with shared tuning off and an arm with nothing of its own is refused. Real tiny runs (digits + mlp),
real SQLite stores."""
import contextlib
import io
import json

import optuna
import pytest

from regbench.cli import main

TINY = ["--methods", "shade", "--dataset", "digits", "--model", "mlp", "--epochs", "1", "--seeds", "2", "--trials",
        "2", "--pruner", "none", "--quiet"]


def run_main(*args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def tuning_trials(storage: str, bench: str, method: str) -> list:
    names = [n for n in optuna.get_all_study_names(storage) if n.startswith(f"{bench}:{method}:tune:")]
    return [t for n in names for t in optuna.load_study(study_name=n, storage=storage).get_trials()]


def header(stdout: str) -> str:
    return stdout.split("\n| method |")[0]


def test_baseline_is_tuned_over_lr_and_weight_decay_by_default_and_the_header_says_so(tmp_path):
    out = tmp_path / "fair"
    code, stdout, err = run_main("run", *TINY, "--out", str(out))
    assert code == 0, err
    storage = f"sqlite:///{out / 'regbench.db'}"
    for method in ("baseline", "shade"):
        tune = tuning_trials(storage, "digits-mlp", method)
        assert len(tune) == 2 and all(t.state.name == "COMPLETE" for t in tune), method
        assert {"shared.lr", "shared.weight_decay"} <= set(tune[0].params)
        for t in tune:  # the sampled lr / weight decay are what the trial trained with
            cfg = json.loads(t.user_attrs["config"])
            assert cfg["lr"] == t.params["shared.lr"] and cfg["weight_decay"] == t.params["shared.weight_decay"]
    # baseline's finals run its selected lr / weight decay
    root = optuna.load_study(study_name="digits-mlp", storage=storage)
    [chosen] = [v for k, v in root.user_attrs.items() if k.startswith("selected:baseline:")]
    assert set(chosen["shared"]) == {"lr", "weight_decay"}
    finals = optuna.load_study(study_name="digits-mlp:baseline:final", storage=storage).get_trials()
    assert {json.loads(t.user_attrs["config"])["lr"] for t in finals} == {chosen["shared"]["lr"]}
    head = header(stdout)
    assert "- tuning (fair): a budget of 2 trials per arm, baseline included, over each arm's own hparams plus the " \
           "shared lr and weight decay" in head
    assert "every arm ended 2 tuning trials and trained 2 tuning epochs; baseline 2 trials / 2 epochs; shade 2 " \
           "trials / 2 epochs" in head
    row = next(line for line in stdout.splitlines() if line.startswith("| baseline |"))
    assert "lr=" in row and "weight_decay=" in row and "(2 tuning trials)" in row and "nothing to tune" not in row


def test_opting_out_says_per_arm_what_it_got(tmp_path):
    out = tmp_path / "unfair"
    code, stdout, err = run_main("run", *TINY, "--no-tune-shared", "--untuned", "baseline", "--out", str(out))
    assert code == 0, err
    storage = f"sqlite:///{out / 'regbench.db'}"
    assert tuning_trials(storage, "digits-mlp", "baseline") == []
    shade = tuning_trials(storage, "digits-mlp", "shade")
    assert len(shade) == 2 and set(shade[0].params) == {"weight"}  # its own hparam only
    head = header(stdout)
    assert "every arm ended" not in head and "the arms' tuning budgets differ" in head
    assert "- tuning NOT the same for every arm (the shared lr and weight decay were not tuned (`--no-tune-shared`); " \
           "baseline ran untuned (`--untuned`))" in head
    assert "  - baseline: its defaults, not tuned (`--untuned`)" in head
    assert "  - shade: 2 trials over weight (lr and weight decay fixed at the recipe's)" in head
    assert "baseline 0 trials (its defaults: `--untuned`); shade 2 trials / 2 epochs" in head
    row = next(line for line in stdout.splitlines() if line.startswith("| baseline |"))
    assert "(untuned: `--untuned`)" in row


@pytest.mark.parametrize("extra, expected", [
    (["--no-tune-shared"], "--trials 2 with --no-tune-shared leaves baseline nothing to tune (no hparams of its own)"),
    (["--no-tune-shared", "--budget-epochs", "3", "--trials", "0"], "--budget-epochs 3 with --no-tune-shared leaves "
                                                                    "baseline nothing to tune"),
    (["--no-tune-shared", "--set", "shade.weight=0.01", "--untuned", "baseline"], "leaves shade nothing to tune"),
    (["--untuned", "ses"], "--untuned ses: not in --methods (baseline, shade)"),
])
def test_an_unequal_budget_not_asked_for_is_refused_and_nothing_is_written(extra, expected, tmp_path):
    out = tmp_path / "out"
    code, _, err = run_main("run", *TINY, *extra, "--out", str(out))
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
    if "--no-tune-shared" in extra and "nothing to tune" in expected:
        assert "drop --no-tune-shared" in err and "--untuned" in err
