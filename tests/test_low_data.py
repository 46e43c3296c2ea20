"""Low-data splits (issue 5 item 5): K per class, stratified, nested, seeded; val/test held out before the subset
is drawn (for every dataset); the split's hash is saved with the run and keyed in its config."""
import contextlib
import io
import itertools
import json

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState
from regbench.datasets.base import stratified_subset, stratified_subset_per_class
from regbench.datasets.cifar import CIFAR10
from regbench.datasets.digits import Digits
from regbench.datasets.mnist1d import MNIST1D
from regbench.datasets.mnist_m import MNISTMStyle
from test_augment import write_cifar10_subset

from regbench.cli import main
from regbench.config import RunConfig
from regbench.errors import ConfigError, DataError


def train_labels(splits) -> np.ndarray:
    return np.bincount(splits.y_train.numpy(), minlength=splits.num_classes)


@pytest.fixture(scope="module")
def digits():
    return Digits().load(None)


@pytest.mark.parametrize("which", ["digits", "mnist1d", "mnist_m_style", "cifar10"])
def test_every_dataset_holds_out_val_and_test_before_the_subset(which, tmp_path):
    if which == "cifar10":
        ds = CIFAR10(md5s=write_cifar10_subset(tmp_path))
    else:
        ds = {"digits": Digits, "mnist1d": MNIST1D, "mnist_m_style": MNISTMStyle}[which]()
    full = ds.load(tmp_path)
    smallest = int(train_labels(full).min())
    k = min(4, smallest)
    for sub in (ds.load(tmp_path, train_per_class=k), ds.load(tmp_path, train_size=3 * full.num_classes)):
        assert sub.indices["val"] == full.indices["val"] and sub.indices["test"] == full.indices["test"]
        assert set(sub.indices["train"]) < set(full.indices["train"])
    assert (train_labels(ds.load(tmp_path, train_per_class=k)) == k).all()


def test_per_class_subsets_are_stratified_nested_and_seeded(digits):
    subs = {k: Digits().load(None, train_per_class=k) for k in (1, 3, 10, 40)}
    for k, s in subs.items():
        assert (train_labels(s) == k).all() and len(s.indices["train"]) == 10 * k
        assert s.x_train.shape[0] == 10 * k
    trains = [set(subs[k].indices["train"]) for k in (1, 3, 10, 40)]
    assert all(a < b for a, b in itertools.pairwise(trains))  # 1 ⊂ 3 ⊂ 10 ⊂ 40 per class, for one seed
    again = Digits().load(None, train_per_class=10)
    assert again.indices == subs[10].indices and again.split_hash == subs[10].split_hash
    other = Digits().load(None, split_seed=1, train_per_class=10)
    assert other.indices["train"] != subs[10].indices["train"]
    assert len({s.split_hash for s in subs.values()} | {digits.split_hash}) == 5


def test_per_class_uses_the_same_order_as_train_size_on_balanced_classes():
    labels = np.repeat(np.arange(5), 30)
    pool = np.arange(0, 300, 2)  # any index set: labels are looked up by index
    labels_full = np.zeros(300, dtype=np.int64)
    labels_full[pool] = labels
    for k in (1, 7, 30):
        assert stratified_subset_per_class(pool, labels_full, k, seed=4) == \
            stratified_subset(pool, labels_full, 5 * k, 5, seed=4)


@pytest.mark.parametrize("bad", [0, -2, 10_000])
def test_bad_per_class_is_one_line_naming_the_bounds(bad):
    with pytest.raises(DataError) as e:
        Digits().load(None, train_per_class=bad)
    msg = str(e.value)
    assert "\n" not in msg and "train_per_class must be between 1 and 97" in msg and str(bad) in msg


def test_train_size_and_per_class_are_exclusive():
    with pytest.raises(ConfigError, match="not both"):
        Digits().load(None, train_size=100, train_per_class=5)
    with pytest.raises(ConfigError, match="not both"):
        RunConfig(method="baseline", dataset="digits", model="cnn", train_size=100, train_per_class=5)
    with pytest.raises(ConfigError, match="--train-per-class must be at least 1, got 0"):
        RunConfig(method="baseline", dataset="digits", model="cnn", train_per_class=0)


def run_cli(out, data_dir, *extra) -> int:
    with contextlib.redirect_stdout(io.StringIO()):
        return main(["run", "--methods", "baseline", "--dataset", "digits", "--epochs", "1", "--seeds", "1",
                     "--out", str(out), "--data-dir", str(data_dir), "--quiet", *extra])


def trials(out) -> list:
    study = optuna.load_study(study_name="digits-cnn:baseline:final", storage=f"sqlite:///{out / 'regbench.db'}")
    return study.get_trials(states=(TrialState.COMPLETE,))


def test_cli_saves_the_split_and_keys_its_hash(tmp_path):
    out5, out6 = tmp_path / "k5", tmp_path / "k6"
    assert run_cli(out5, tmp_path, "--train-per-class", "5") == 0
    [split_file] = (out5 / "splits").glob("digits-*.json")
    doc = json.loads(split_file.read_text())
    assert len(doc["indices"]["train"]) == 50 and split_file.name == f"digits-{doc['split_hash'][:12]}.json"
    [t] = trials(out5)
    cfg = RunConfig.from_json(t.user_attrs["config"])
    assert (cfg.train_per_class, cfg.split_hash, cfg.augment) == (5, doc["split_hash"], None)
    assert t.user_attrs["config_key"] == cfg.key() and cfg.keyed()["split_hash"] == doc["split_hash"]
    assert run_cli(out5, tmp_path, "--train-per-class", "5") == 0  # the same command resumes: nothing retrained
    assert [x.number for x in trials(out5)] == [t.number]
    assert run_cli(out6, tmp_path, "--train-per-class", "6", "--augment", "crop_flip") == 0
    [t6] = trials(out6)
    cfg6 = RunConfig.from_json(t6.user_attrs["config"])
    assert (cfg6.train_per_class, cfg6.augment) == (6, "crop_flip") and cfg6.split_hash != cfg.split_hash
    assert t6.user_attrs["config_key"] != t.user_attrs["config_key"]
