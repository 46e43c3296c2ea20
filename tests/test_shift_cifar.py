"""`--shift` on CIFAR: generated cifar10_c_style and official-layout cifar10_c, end to end through the real CLI, plus the
memory contract (uint8 memmapped blocks, normalized one at a time) and `build_splits` slicing before converting.

The CIFAR pool is real CIFAR-10 images from the shared subset written back into the official pickle layout; the
CIFAR-C folder is written here in the Zenodo layout. The readers' md5 tables are pointed at these files (the same
override the reader tests use); everything else is the product's code path: real training, store and leaderboard.
"""
import contextlib
import io
import json
import sqlite3

import numpy as np
import pytest
import torch
from regbench.datasets import cifar, cifar_c, shift
from regbench.datasets.base import build_splits
from regbench.datasets.cifar import CIFAR10
from test_cifar import SUBSET, write_cifar10
from test_data_cli import md5, write_official_cifar_c

from regbench.cli import main
from regbench.errors import DataError

pytestmark = pytest.mark.skipif(not SUBSET.exists(), reason="shared cifar10_subset not present")
N_TEST = 30


@pytest.fixture
def cifar_pool(tmp_path, monkeypatch):
    """cifar-10-batches-py/ with 5 x 60 real training images + N_TEST real test images; md5 table -> these files."""
    data = tmp_path / "data"
    with np.load(SUBSET) as d:
        x, y, b = d["x_train"], d["y_train"], d["train_batch"]
        x_te, y_te = d["x_test"][:N_TEST], d["y_test"][:N_TEST]
    xs = [x[b == i][:60] for i in range(1, 6)]
    ys = [y[b == i][:60] for i in range(1, 6)]
    md5s = write_cifar10(data, xs, ys, x_te, y_te)
    monkeypatch.setitem(cifar.SPECS["cifar10"], "md5s", md5s)
    return data, x_te, y_te


def run(data, out, shift_name):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["run", "--methods", "baseline", "--dataset", "cifar10", "--model", "cnn", "--shift", shift_name,
                     "--epochs", "1", "--train-size", "200", "--seeds", "1", "--quiet", "--out", str(out),
                     "--data-dir", str(data)])
    return code, buf.getvalue()


def stored_metrics(out):
    with sqlite3.connect(out / "regbench.db") as db:
        return [json.loads(v) for (v,) in db.execute("select value_json from trial_user_attributes where key='metrics'")]


def check_shift_metrics(m):
    bench = {k: v for k, v in m.items() if k.startswith("shift/")}
    extra = {k: v for k, v in m.items() if k.startswith("shift_extra/")}
    assert len(bench) == 15 * 5 and len(extra) == 4 * 5
    assert m["shift_acc"] == pytest.approx(sum(bench.values()) / 75)
    assert m["shift_extra_acc"] == pytest.approx(sum(extra.values()) / 20)
    assert all(v * N_TEST == pytest.approx(round(v * N_TEST)) for v in bench.values())  # accuracies over N_TEST images


def test_run_cifar10_with_generated_cifar10_c_style(cifar_pool, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data, _, _ = cifar_pool
    out = tmp_path / "out"
    code, _ = run(data, out, "cifar10_c_style")
    assert code == 0, capsys.readouterr().err
    board = (out / "leaderboard.md").read_text()
    assert "cifar10_c_style" in board and "corruption acc %" in board
    (m,) = stored_metrics(out)
    check_shift_metrics(m)
    sets = list((data / "cifar10_c_style").iterdir())  # cached in the official layout, under its own name
    assert len(sets) == 1
    side = json.loads((sets[0] / "regbench_sidecar.json").read_text())
    assert side["name"] == "cifar10-test-C-style" and side["base_count"] == N_TEST and len(side["md5"]) == 20


def test_run_cifar10_with_official_layout_cifar10_c(cifar_pool, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data, x_te, y_te = cifar_pool
    md5s = write_official_cifar_c(data / "CIFAR-10-C", x_te, y_te)
    monkeypatch.setitem(cifar_c.MD5, "cifar10", md5s)
    out = tmp_path / "out"
    code, _ = run(data, out, "cifar10_c")
    assert code == 0, capsys.readouterr().err
    (m,) = stored_metrics(out)
    check_shift_metrics(m)
    assert "cifar10_c" in (out / "leaderboard.md").read_text()
    # a corrupt file is refused in one line before anything new is written
    fog = data / "CIFAR-10-C" / "fog.npy"
    raw = bytearray(fog.read_bytes())
    raw[-3] ^= 0x10
    fog.write_bytes(bytes(raw))
    cifar_c._VERIFIED.clear()  # a new process would not remember the earlier check
    out2 = tmp_path / "out2"
    code, _ = run(data, out2, "cifar10_c")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"fog.npy has md5 {md5(fog)}, expected {md5s['fog']}" in err[0]
    assert not out2.exists()


def test_official_blocks_are_memmaps_normalized_like_the_clean_test_split(cifar_pool):
    data, x_te, y_te = cifar_pool
    root = data / "CIFAR-10-C"
    root.mkdir()
    for c in cifar_c.CORRUPTIONS:  # every block = the clean test images: the normalized block must equal x_test
        np.save(root / f"{c}.npy", np.tile(x_te, (5, 1, 1, 1)))
    np.save(root / "labels.npy", np.tile(y_te.astype(np.uint8), 5))
    splits = CIFAR10().load(data)
    md5s = {p.stem: md5(p) for p in root.glob("*.npy")}
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(cifar_c.MD5, "cifar10", md5s)
        s = shift.load("cifar10_c", data, splits)
        assert len(s.blocks) == 95 and len(s) == 95 * N_TEST
        assert all(isinstance(img, np.memmap) and img.dtype == np.uint8 for img in s.images)
        for i in (0, 50, 94):
            x, y = s.block(i)
            torch.testing.assert_close(x, splits.x_test, rtol=0, atol=1e-5)
            assert torch.equal(y, splits.y_test)
        # labels of another dataset's order are refused
        np.save(root / "labels.npy", np.tile(np.roll(y_te, 1).astype(np.uint8), 5))
        mp.setitem(cifar_c.MD5, "cifar10", {**md5s, "labels": md5(root / "labels.npy")})
        with pytest.raises(DataError, match=rf"labels that do not match the {N_TEST} test labels of cifar10"):
            shift.load("cifar10_c", data, splits)


def test_build_splits_slices_before_converting_and_matches_the_formula():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (50, 3, 4, 4), dtype=np.uint8)
    y = np.arange(50) % 5
    x_before = x.copy()
    idx = {"train": list(range(30)), "val": list(range(30, 40)), "test": list(range(40, 50))}
    s = build_splits("t", x, y, idx, 5, (3, 4, 4))
    xf = torch.as_tensor(x, dtype=torch.float32)
    mean = xf[:30].mean(dim=(0, 2, 3), keepdim=True)
    std = xf[:30].std(dim=(0, 2, 3), keepdim=True)
    for k, part in (("train", s.x_train), ("val", s.x_val), ("test", s.x_test)):
        ref = (xf[idx[k]] - mean) / std
        assert part.dtype == torch.float32 and torch.equal(part, ref)
    assert np.array_equal(x, x_before)  # the caller's pool is untouched
    t = torch.as_tensor(x, dtype=torch.float32)  # a float tensor pool is not modified in place
    before = t.clone()
    build_splits("t", t, y, idx, 5, (3, 4, 4))
    assert torch.equal(t, before)
