"""``--train-acc-sample N`` (issue 19): train accuracy on a fixed sample of N training images instead of a second full
pass over the train split each epoch. The sample depends on the split seed only (paired across methods and seeds), the
whole-split default is unchanged bit for bit, and the choice is keyed (a run that measured on a sample is not the run
that measured on everything)."""
import pytest
import torch
from helpers import regbench_cli
from regbench.datasets.mnist1d import MNIST1D

from regbench import engine, evaluation, registry
from regbench.config import RunConfig
from regbench.errors import ConfigError
from regbench.metrics import accuracy, predict
from regbench.suites.common import keep_model


@pytest.fixture(scope="module")
def mnist1d(tmp_path_factory):
    return MNIST1D().load(tmp_path_factory.mktemp("data"), train_size=256)


def config(**kw) -> RunConfig:
    return RunConfig(**{"method": "baseline", "dataset": "mnist1d", "model": "cnn1d", "epochs": 2, "batch_size": 64,
                        **kw})


def test_the_sample_is_fixed_by_the_split_seed_alone():
    rows = evaluation.train_rows(config(train_acc_sample=40, seed=0), 256)
    assert len(rows) == 40 and torch.equal(rows, rows.sort().values) and len(set(rows.tolist())) == 40
    for other in (config(train_acc_sample=40, seed=7), config(train_acc_sample=40, seed=0, method="ses")):
        assert torch.equal(evaluation.train_rows(other, 256), rows)  # same images for every seed and method
    assert not torch.equal(evaluation.train_rows(config(train_acc_sample=40, split_seed=1), 256), rows)
    assert evaluation.train_rows(config(), 256) is None
    assert evaluation.train_rows(config(train_acc_sample=256), 256) is None  # a sample as large as the split is the split


def test_a_sampled_run_measures_train_accuracy_on_its_sample_and_trains_the_same(mnist1d):
    method = keep_model(registry.build_method("baseline"))
    sampled = engine.train(config(train_acc_sample=50), mnist1d, method)
    whole = engine.train(config(), mnist1d, registry.build_method("baseline"))
    rows = evaluation.train_rows(config(train_acc_sample=50), len(mnist1d.y_train))
    method.model.eval()
    with torch.no_grad():
        want = accuracy(predict(method.model, mnist1d.x_train[rows]), mnist1d.y_train[rows])
    assert sampled.history[-1]["train_acc"] == want
    assert all(round(h["train_acc"] * 50, 6).is_integer() for h in sampled.history)
    # training itself is untouched: the held-out numbers are the whole-split run's, bit for bit
    assert [h["val_acc"] for h in sampled.history] == [h["val_acc"] for h in whole.history]
    assert sampled.metrics["test_acc"] == whole.metrics["test_acc"]


def test_the_choice_is_keyed_only_when_set_and_validated():
    assert "train_acc_sample" not in config().keyed()  # old stores' keys stay valid
    assert config(train_acc_sample=100).key() != config().key()
    with pytest.raises(ConfigError, match="--train-acc-sample"):
        config(train_acc_sample=0)


def test_cli_refuses_a_sample_below_one_in_one_line(tmp_path):
    done = regbench_cli("run", "--methods", "baseline", "--train-acc-sample", "0", "--out", str(tmp_path / "o"),
                        cwd=tmp_path)
    assert done.returncode == 2 and "--train-acc-sample" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_the_leaderboard_names_a_sampled_train_accuracy(tmp_path, data_dir):
    out = tmp_path / "out"
    done = regbench_cli("run", "--methods", "baseline", "--dataset", "digits", "--model", "mlp", "--epochs", "1",
                        "--seeds", "1", "--train-acc-sample", "64", "--quiet", "--out", str(out),
                        "--data-dir", str(data_dir), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    board = (out / "leaderboard.md").read_text()
    assert "fixed sample of 64 training images (`--train-acc-sample 64`" in board


def test_a_whole_split_leaderboard_has_no_sample_line(tiny_run):
    out, _ = tiny_run
    assert "--train-acc-sample" not in (out / "leaderboard.md").read_text()
