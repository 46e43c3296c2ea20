"""Built-in datasets on their real data: shapes, paired (seed-stable) splits, offline mnist1d.

mnist1d is generated once per module (about 1 s) into a shared temp data_dir; digits loads in
well under a second. No mocks: the only stand-in is a socket guard proving nothing goes online.
"""

import json
import random
import socket

import numpy as np
import pytest
import torch

from regbench.datasets.base import stratified_split
from regbench.datasets.digits import Digits
from regbench.datasets.mnist1d import CACHE_NAME, MNIST1D, generate
from regbench.errors import DataError

SIZES = {"mnist1d": (3000, 1000, 1000, 5000), "digits": (997, 300, 500, 1797)}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module", params=["mnist1d", "digits"])
def ds(request):
    return {"mnist1d": MNIST1D, "digits": Digits}[request.param]()


@pytest.fixture(scope="module")
def splits(ds, data_dir):
    return ds.load(data_dir)


def _labels_by_pool_index(s):
    """Map pool index -> label, from the splits themselves."""
    out = {}
    for k in ("train", "val", "test"):
        out.update(zip(s.indices[k], getattr(s, f"y_{k}").tolist()))
    return out


def test_shapes_dtypes_and_metadata(ds, splits):
    n_train, n_val, n_test, _ = SIZES[ds.name]
    assert splits.name == ds.name and splits.num_classes == ds.num_classes == 10
    assert splits.input_shape == ds.input_shape == {"mnist1d": (1, 40), "digits": (3, 32, 32)}[ds.name]
    assert ds.default_model == {"mnist1d": "cnn1d", "digits": "cnn"}[ds.name]
    for k, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        x, y = getattr(splits, f"x_{k}"), getattr(splits, f"y_{k}")
        assert x.shape == (n, *ds.input_shape) and x.dtype == torch.float32
        assert y.shape == (n,) and y.dtype == torch.int64
        assert set(y.unique().tolist()) == set(range(10))
        assert torch.isfinite(x).all()


def test_splits_disjoint_cover_pool_and_stratified(ds, splits):
    pool = SIZES[ds.name][3]
    parts = [set(splits.indices[k]) for k in ("train", "val", "test")]
    assert sum(map(len, parts)) == pool and set().union(*parts) == set(range(pool))
    # mnist1d's test set is the generator's own (fixed, not drawn by us): check only what we draw,
    # against the class proportions of the pool it was drawn from.
    drawn = ("train", "val") if ds.name == "mnist1d" else ("train", "val", "test")
    labels = _labels_by_pool_index(splits)
    source = [labels[i] for k in drawn for i in splits.indices[k]]
    overall = np.bincount(source, minlength=10) / len(source)
    for k in drawn:
        frac = np.bincount(getattr(splits, f"y_{k}").numpy(), minlength=10) / len(splits.indices[k])
        assert np.abs(frac - overall).max() < 0.01, (k, frac, overall)


def test_train_statistics_normalized(splits):
    x = splits.x_train
    dims = [0] + list(range(2, x.ndim))
    assert x.mean(dim=dims).abs().max() < 1e-4
    assert (x.std(dim=dims) - 1).abs().max() < 1e-4


def test_split_seed_determines_split(ds, data_dir, splits):
    again = ds.load(data_dir, split_seed=0)
    assert again.indices == splits.indices and again.split_hash == splits.split_hash
    assert torch.equal(again.x_train, splits.x_train)
    other = ds.load(data_dir, split_seed=1)
    assert other.split_hash != splits.split_hash
    if ds.name == "mnist1d":  # the generator's own test set is fixed; only val/train move
        assert other.indices["test"] == splits.indices["test"] == list(range(4000, 5000))


def test_split_hash_is_canonical_json_and_saved(splits, tmp_path):
    import hashlib

    blob = json.dumps(splits.indices, sort_keys=True, separators=(",", ":")).encode()
    assert splits.split_hash == hashlib.sha256(blob).hexdigest()
    path = tmp_path / "split.json"
    splits.save_indices(path)
    doc = json.loads(path.read_text())
    assert doc == {"dataset": splits.name, "split_hash": splits.split_hash, "indices": splits.indices}
    assert [p.name for p in tmp_path.iterdir()] == ["split.json"]  # no temp file left behind


def test_train_size_is_stratified_nested_subset(ds, data_dir, splits):
    small, big = ds.load(data_dir, train_size=100), ds.load(data_dir, train_size=300)
    full = set(splits.indices["train"])
    assert set(small.indices["train"]) <= set(big.indices["train"]) <= full
    assert len(small.indices["train"]) == 100 and len(big.indices["train"]) == 300
    counts = np.bincount(small.y_train.numpy(), minlength=10)
    assert counts.min() >= 9 and counts.max() <= 11, counts
    assert small.indices["val"] == splits.indices["val"] and small.indices["test"] == splits.indices["test"]
    assert small.split_hash != splits.split_hash
    assert ds.load(data_dir, train_size=100).indices == small.indices
    every = ds.load(data_dir, train_size=len(full))
    assert every.indices == splits.indices


@pytest.mark.parametrize("bad", [9, 0, 100_000])
def test_bad_train_size_raises_data_error(bad):
    with pytest.raises(DataError, match="train_size must be between 10 .* and 997"):
        Digits().load(None, train_size=bad)


def test_mnist1d_offline_cached_and_rng_neutral(tmp_path, monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("mnist1d loading tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    np.random.seed(123)
    random.seed(123)
    np_before, py_before = np.random.get_state(), random.getstate()

    s = MNIST1D().load(tmp_path)

    np_after = np.random.get_state()
    assert np_after[0] == np_before[0] and np.array_equal(np_after[1], np_before[1])
    assert np_after[2:] == np_before[2:] and random.getstate() == py_before
    cache = tmp_path / "mnist1d" / CACHE_NAME
    assert cache.is_file() and sorted(p.name for p in cache.parent.iterdir()) == [CACHE_NAME]

    fresh = generate()
    with np.load(cache) as f:
        for k in ("x", "y", "x_test", "y_test"):
            assert np.array_equal(f[k], fresh[k]), k
    assert fresh["x"].shape == (4000, 40) and fresh["x_test"].shape == (1000, 40)
    assert np.bincount(fresh["y"]).min() > 350  # the canonical set is nearly balanced

    cache.write_bytes(b"not an npz")  # a corrupt cache is regenerated, not trusted
    assert MNIST1D().load(tmp_path).split_hash == s.split_hash


def test_stratified_split_helper():
    labels = np.repeat(np.arange(4), 25)
    a = stratified_split(labels, n_val=20, n_test=20, seed=3)
    assert a == stratified_split(labels, n_val=20, n_test=20, seed=3)
    assert [len(a[k]) for k in ("train", "val", "test")] == [60, 20, 20]
    assert all(np.bincount(labels[a[k]]).tolist() == [5] * 4 for k in ("val", "test"))
    b = stratified_split(labels, n_val=20, seed=3, test_indices=range(80, 100))
    assert b["test"] == list(range(80, 100)) and len(b["val"]) == 20
    with pytest.raises(ValueError):
        stratified_split(labels, n_val=20)
