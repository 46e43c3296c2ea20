"""CIFAR-10/100 and CIFAR-10-C readers on tiny files of the official formats, written here.

The CIFAR pickles are written the way the official (Python 2) files were: protocol 2, every
string as a byte string (BINSTRING opcodes), numpy's `_reconstruct` named
`numpy.core.multiarray._reconstruct`. The real loaders read them with md5 tables passed in.
"""

import hashlib
import io
import json
import os
import pathlib
import pickle
import shutil
import tarfile
from typing import ClassVar

import numpy as np
import pytest
import torch
from regbench.datasets import cifar, cifar_c
from regbench.datasets.cifar import CIFAR10, CIFAR100, augment, load_arrays, read_batch
from regbench.datasets.cifar_c import CORRUPTIONS, load_cifar_c, write_cifar_c_layout

from regbench.errors import ConfigError, DataError
from regbench.suites import cifar_subset

SUBSET = cifar_subset.SUBSET  # $REGBENCH_CIFAR10_SUBSET, which tests/conftest.py always sets
_RECON = np.ndarray.__reduce__(np.zeros(1))[0]


class Py2Pickler(pickle._Pickler):
    """Protocol-2 pickler that writes str/bytes as Python 2 byte strings, like cPickle did."""

    def save_py2_str(self, obj):
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + len(raw).to_bytes(4, "little") + raw)
        self.memoize(obj)

    def save_global(self, obj, name=None):
        if obj is _RECON:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)

    dispatch: ClassVar[dict] = dict(pickle._Pickler.dispatch)
    dispatch[str] = save_py2_str
    dispatch[bytes] = save_py2_str


def py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def md5(path) -> str:
    return hashlib.md5(pathlib.Path(path).read_bytes()).hexdigest()


def planar(x_hwc):
    """uint8 (N, 32, 32, 3) -> official rows (N, 3072): 1024 R, 1024 G, 1024 B."""
    return np.ascontiguousarray(x_hwc.transpose(0, 3, 1, 2).reshape(len(x_hwc), 3072))


def write_cifar10(root, xs, ys, x_test, y_test):
    """Write a cifar-10-batches-py/ folder from five (x, y) pairs + test; returns its md5 map."""
    folder = pathlib.Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    parts = [(f"data_batch_{i + 1}", x, y) for i, (x, y) in enumerate(zip(xs, ys))] + [("test_batch", x_test, y_test)]
    for name, x, y in parts:
        doc = {"batch_label": name, "labels": [int(v) for v in y], "data": planar(x),
               "filenames": [f"img_{i}.png" for i in range(len(y))]}
        (folder / name).write_bytes(py2_pickle(doc))
    (folder / "batches.meta").write_bytes(py2_pickle({"label_names": [f"c{i}" for i in range(10)]}))
    return {p.name: md5(p) for p in folder.iterdir()}


def tiny_images(n, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


@pytest.fixture
def tiny10(tmp_path):
    """Five batches of 20 images (2 per class) + a 20-image test batch."""
    xs = [tiny_images(20, i) for i in range(5)]
    ys = [np.tile(np.arange(10), 2)[np.random.default_rng(10 + i).permutation(20)] for i in range(5)]
    x_te, y_te = tiny_images(20, 99), np.tile(np.arange(10), 2)
    md5s = write_cifar10(tmp_path, xs, ys, x_te, y_te)
    return tmp_path, md5s, np.concatenate(xs), np.concatenate(ys), x_te, y_te


def test_py2_pickle_reads_with_bytes_keys_and_official_global_name(tiny10):
    root, _, x, y, _, _ = tiny10
    raw = (root / "cifar-10-batches-py" / "data_batch_1").read_bytes()
    assert b"numpy.core.multiarray\n_reconstruct" in raw and b"BINUNICODE" not in raw
    xb, yb = read_batch(root / "cifar-10-batches-py" / "data_batch_1", "labels")
    assert xb.shape == (20, 3, 32, 32) and xb.dtype == np.uint8 and yb.dtype == np.int64
    np.testing.assert_array_equal(xb.transpose(0, 2, 3, 1), x[:20])  # planar rows -> the same pixels
    np.testing.assert_array_equal(yb, y[:20])


def test_cifar10_load_md5_pass_splits_and_pixels(tiny10):
    root, md5s, x, _y, x_te, y_te = tiny10
    ds = CIFAR10(md5s=md5s)
    assert (ds.name, ds.default_model, ds.input_shape, ds.num_classes) == ("cifar10", "resnet18", (3, 32, 32), 10)
    s = ds.load(root, split_seed=0)
    assert (len(s.y_train), len(s.y_val), len(s.y_test)) == (90, 10, 20)
    assert s.indices["test"] == list(range(100, 120))  # the official test batch, in file order
    assert sorted(s.indices["train"] + s.indices["val"]) == list(range(100))
    assert sorted(s.y_val.tolist()) == list(range(10))  # stratified: one per class
    np.testing.assert_array_equal(s.y_test.numpy(), y_te)
    # un-normalize with the train statistics: the test pixels are exactly the written ones
    xtr = torch.as_tensor(x[s.indices["train"]].transpose(0, 3, 1, 2), dtype=torch.float32)
    mean, std = xtr.mean(dim=(0, 2, 3), keepdim=True), xtr.std(dim=(0, 2, 3), keepdim=True)
    back = (s.x_test * std + mean).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(back, x_te)
    again, other = ds.load(root, split_seed=0), ds.load(root, split_seed=1)
    assert again.split_hash == s.split_hash != other.split_hash
    assert ds.train_augment is augment and CIFAR10(augmentation=False).train_augment is None


def test_cifar10_wrong_md5_is_one_line_and_nothing_used(tiny10):
    root, md5s, *_ = tiny10
    path = root / "cifar-10-batches-py" / "data_batch_3"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # one flipped pixel byte: still a valid pickle, but not the verified file
    path.write_bytes(bytes(data))
    with pytest.raises(DataError) as e:
        CIFAR10(md5s=md5s).load(root)
    msg = str(e.value)
    assert "\n" not in msg and "data_batch_3" in msg and md5s["data_batch_3"] in msg and "md5" in msg


def test_truncated_pickle_with_matching_md5_is_a_data_error(tiny10):
    root, md5s, *_ = tiny10
    path = root / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(path.read_bytes()[:5000])
    md5s = {**md5s, "test_batch": md5(path)}
    with pytest.raises(DataError, match=r"cannot read CIFAR file .*test_batch") as e:
        CIFAR10(md5s=md5s).load(root)
    assert "\n" not in str(e.value)


def test_unpickler_refuses_any_other_global(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"):
        (folder / name).write_bytes(pickle.dumps({"data": Evil()}, protocol=2))
    md5s = {p.name: md5(p) for p in folder.iterdir()}
    with pytest.raises(DataError, match="is not allowed in a CIFAR file"):
        load_arrays(tmp_path, "cifar10", md5s)
    assert not marker.exists()
    # a py3 protocol-2 pickle of bytes needs _codecs.encode: refused too (only numpy's 3 globals pass)
    with pytest.raises(pickle.UnpicklingError, match="_codecs"):
        cifar.RestrictedUnpickler(io.BytesIO(pickle.dumps(b"x", protocol=2)), encoding="bytes").load()


def test_missing_files_offline_one_line(tmp_path):
    with pytest.raises(DataError) as e:
        CIFAR10().load(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "cifar-10-python.tar.gz" in msg and "c58f30108f718f92721af3b95e74349a" in msg
    assert str(tmp_path) in msg and "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in msg
    (tmp_path / "cifar-100-python").mkdir()
    missing = r"missing data file .*cifar-100-python/train \(md5 16019d7e3df5f24257cddd939b257f8d\)"
    with pytest.raises(DataError, match=missing):
        CIFAR100().load(tmp_path)


def _tar(folder: pathlib.Path, archive: pathlib.Path, extra=None):
    with tarfile.open(archive, "w:gz") as t:
        t.add(folder, arcname=folder.name)
        if extra is not None:
            info = tarfile.TarInfo(extra)
            info.size = 3
            t.addfile(info, io.BytesIO(b"bad"))


def test_archive_extracted_after_md5_and_unsafe_paths_refused(tiny10, tmp_path_factory):
    root, md5s, _x, *_ = tiny10
    folder = root / "cifar-10-batches-py"
    good = tmp_path_factory.mktemp("a") / "cifar-10-python.tar.gz"
    _tar(folder, good)
    shutil.rmtree(folder)
    archive = root / "cifar-10-python.tar.gz"
    shutil.copy(good, archive)
    with pytest.raises(DataError, match="expected 0{32}"):  # wrong archive md5: nothing extracted
        CIFAR10(md5s=md5s, archive_md5="0" * 32).load(root)
    assert not folder.exists()
    s = CIFAR10(md5s=md5s, archive_md5=md5(archive)).load(root)
    assert folder.is_dir() and len(s.y_train) == 90
    assert not [p for p in root.iterdir() if p.name.startswith(".extract")]
    # an archive with a member escaping the target is refused, nothing is written outside
    evil_root = tmp_path_factory.mktemp("evil") / "data"
    evil_root.mkdir()
    evil = evil_root / "cifar-10-python.tar.gz"
    _tar(folder, evil, extra="cifar-10-batches-py/../../escaped.txt")
    with pytest.raises(DataError, match="would be written outside .*refusing to extract"):
        CIFAR10(md5s=md5s, archive_md5=md5(evil)).load(evil_root)
    assert not (evil_root.parent / "escaped.txt").exists() and not (evil_root / "cifar-10-batches-py").exists()
    with tarfile.open(evil, "w:gz") as t:  # a symlink member (could point anywhere): refused too
        t.add(folder, arcname=folder.name)
        link = tarfile.TarInfo("cifar-10-batches-py/link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        t.addfile(link)
    with pytest.raises(DataError, match="'cifar-10-batches-py/link' is not a plain file or folder"):
        CIFAR10(md5s=md5s, archive_md5=md5(evil)).load(evil_root)
    assert [p.name for p in evil_root.iterdir()] == ["cifar-10-python.tar.gz"]


def test_cifar100_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    x_tr, x_te = tiny_images(1000, 1), tiny_images(100, 2)
    y_tr, y_te = np.repeat(np.arange(100), 10), np.arange(100)
    for name, x, y in (("train", x_tr, y_tr), ("test", x_te, y_te)):
        doc = {"filenames": ["f"] * len(y), "batch_label": name, "fine_labels": [int(v) for v in y],
               "coarse_labels": [int(v) // 5 for v in y], "data": planar(x)}
        (folder / name).write_bytes(py2_pickle(doc))
    md5s = {p.name: md5(p) for p in folder.iterdir()}
    s = CIFAR100(md5s=md5s).load(tmp_path)
    assert s.num_classes == 100 and (len(s.y_train), len(s.y_val), len(s.y_test)) == (900, 100, 100)
    assert sorted(s.y_val.tolist()) == list(range(100))
    np.testing.assert_array_equal(s.y_test.numpy(), y_te)


@pytest.mark.skipif(not SUBSET.exists(), reason="shared cifar10_subset not present")
def test_real_cifar_images_round_trip(tmp_path):
    with np.load(SUBSET) as d:
        x, y, b = d["x_train"], d["y_train"], d["train_batch"]
        x_te, y_te = d["x_test"][:200], d["y_test"][:200]
    xs = [x[b == i][:60] for i in range(1, 6)]
    ys = [y[b == i][:60] for i in range(1, 6)]
    md5s = write_cifar10(tmp_path, xs, ys, x_te, y_te)
    x_tr, y_tr, xt, yt = load_arrays(tmp_path, "cifar10", md5s)
    np.testing.assert_array_equal(x_tr.transpose(0, 2, 3, 1), np.concatenate(xs))
    np.testing.assert_array_equal(xt.transpose(0, 2, 3, 1), x_te)
    assert y_tr.tolist()[:10] == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]  # data_batch_1's well-known first labels
    assert yt.tolist()[:10] == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]


# --- augmentation ----------------------------------------------------------------------------

def test_augment_is_crop_of_padded_image_with_exact_flip():
    x = torch.randn(64, 3, 32, 32)
    out = augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out, augment(x, torch.Generator().manual_seed(0)), rtol=0, atol=0)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    seen_offsets, flips = set(), []
    for i in range(len(x)):
        windows = {(dy, dx): padded[i, :, dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)}
        hits = [(dy, dx, f) for (dy, dx), w in windows.items() for f in (False, True)
                if torch.equal(out[i], w.flip(-1) if f else w)]
        assert len(hits) == 1, (i, hits)  # exactly one shifted window (maybe mirrored) matches
        seen_offsets.add(hits[0][:2])
        flips.append(hits[0][2])
    assert 10 < sum(flips) < 54 and len(seen_offsets) > 30  # both flip states, many offsets
    centre = augment(x, torch.Generator().manual_seed(0), pad=0)  # no padding: only flips remain
    assert all(torch.equal(c, xi) or torch.equal(c, xi.flip(-1)) for c, xi in zip(centre, x))


# --- CIFAR-C ---------------------------------------------------------------------------------

@pytest.fixture
def cifar_c_dir(tmp_path):
    labels = np.tile(np.arange(4, dtype=np.uint8), 5)  # 5 severity blocks of 4 images
    arrays = {c: tiny_images(20, k) for k, c in enumerate(("fog", "snow", "saturate"))}
    md5s = write_cifar_c_layout(tmp_path / "C", arrays, labels, sidecar={"source": "test", "seed": 0})
    return tmp_path / "C", arrays, labels, md5s


def test_cifar_c_layout_round_trip_memmapped_blocks(cifar_c_dir):
    root, arrays, labels, md5s = cifar_c_dir
    assert sorted(p.name for p in root.iterdir()) == sorted(
        ["fog.npy", "snow.npy", "saturate.npy", "labels.npy", cifar_c.SIDECAR])
    side = json.loads((root / cifar_c.SIDECAR).read_text())
    assert side["source"] == "test" and side["md5"] == md5s == {p.stem: md5(p) for p in root.glob("*.npy")}
    got = load_cifar_c(root, ["snow", "fog"], [2, 5])  # md5s come from the sidecar
    assert got.index == [("snow", 2), ("snow", 5), ("fog", 2), ("fog", 5)]
    for xb, yb, (c, s) in zip(got.x, got.labels, got.index):
        assert isinstance(xb, np.memmap) and not xb.flags.writeable
        np.testing.assert_array_equal(xb, arrays[c][(s - 1) * 4:s * 4])
        np.testing.assert_array_equal(yb, labels[(s - 1) * 4:s * 4])
        assert yb.dtype == np.int64
    with pytest.raises(DataError, match=r"md5 [0-9a-f]{32}, expected 0{32}"):
        load_cifar_c(root, ["fog"], [1], md5s={**md5s, "fog": "0" * 32})
    raw = bytearray((root / "fog.npy").read_bytes())
    raw[-1] ^= 1  # one pixel changed after writing: the sidecar's md5 catches it
    (root / "fog.npy").write_bytes(bytes(raw))
    with pytest.raises(DataError, match=f"fog.npy has md5 [0-9a-f]{{32}}, expected {md5s['fog']}"):
        load_cifar_c(root, ["fog"], [1])


def test_cifar_c_bad_choices_name_the_valid_ones(cifar_c_dir):
    root = cifar_c_dir[0]
    with pytest.raises(ConfigError, match="unknown CIFAR-C corruption 'fogg'; choose from: gaussian_noise") as e:
        load_cifar_c(root, ["fogg"])
    assert all(c in str(e.value) for c in CORRUPTIONS)
    for bad in (0, 6, 2.5, True):
        with pytest.raises(ConfigError, match="outside 1..5; choose from 1, 2, 3, 4, 5"):
            load_cifar_c(root, ["fog"], [bad])


def test_cifar_c_truncated_npy_and_missing_files(cifar_c_dir):
    root, _, _, md5s = cifar_c_dir
    path = root / "snow.npy"
    path.write_bytes(path.read_bytes()[:3000])  # header intact, rows cut short
    with pytest.raises(DataError, match=r"cannot read .*snow\.npy as a \.npy file .*truncated or corrupt") as e:
        load_cifar_c(root, ["snow"], md5s={**md5s, "snow": md5(path)})
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match=r"missing data file .*gaussian_noise\.npy"):
        load_cifar_c(root, ["gaussian_noise"], md5s={**md5s, "gaussian_noise": "0" * 32})
    # no sidecar: the official Zenodo table applies, and our tiny file is not the Zenodo file
    (root / cifar_c.SIDECAR).unlink()
    with pytest.raises(DataError, match="labels.npy has md5 .*expected c439b113295ed5254878798ffe28fd54") as e:
        load_cifar_c(root, ["fog"], [1], dataset="cifar10")
    assert "zenodo.org/records/2535967" in str(e.value)
    with pytest.raises(DataError, match=r"missing CIFAR-C folder .*CIFAR-100-C.*zenodo.org/records/3555552"):
        load_cifar_c(root.parent / "CIFAR-100-C", ["fog"], dataset="cifar100")


def test_cifar_c_writer_rejects_bad_arrays(tmp_path):
    labels = np.zeros(10, dtype=np.int64)
    with pytest.raises(DataError, match=r"expected uint8 \(10, 32, 32, 3\)"):
        write_cifar_c_layout(tmp_path, {"fog": np.zeros((10, 32, 32, 3), np.float32)}, labels)
    with pytest.raises(ConfigError, match="unknown CIFAR-C corruption 'rain'"):
        write_cifar_c_layout(tmp_path, {"rain": np.zeros((10, 32, 32, 3), np.uint8)}, labels)
    with pytest.raises(DataError, match="multiple of 5"):
        write_cifar_c_layout(tmp_path, {}, np.zeros(7, dtype=np.int64))
    assert list(tmp_path.iterdir()) == []


def test_cifar_c_severity_subset_set(tmp_path):
    labels = np.arange(6, dtype=np.int64) % 3  # 2 blocks (severities 4 and 2) of 3 images
    x = tiny_images(6, 5)
    write_cifar_c_layout(tmp_path, {"contrast": x}, labels, severities=(4, 2))
    got = load_cifar_c(tmp_path, ["contrast"], [2, 4])
    np.testing.assert_array_equal(got.x[0], x[3:])  # severity 2 is the second block
    np.testing.assert_array_equal(got.x[1], x[:3])
    with pytest.raises(ConfigError, match="severity 5 is not in the generated set .*it has 4, 2"):
        load_cifar_c(tmp_path, ["contrast"], [5])


def test_reads_sets_written_by_the_corruption_generator(tmp_path):
    corruptions = pytest.importorskip("regbench.datasets.corruptions")
    x, y = tiny_images(6, 7), np.arange(6) % 3
    corruptions.generate_style_set(x, y, tmp_path / "S", seed=0, corruptions=["contrast", "gaussian_noise"],
                                   severities=(1, 3))
    got = load_cifar_c(tmp_path / "S", ["gaussian_noise", "contrast"], [3])
    for xb, yb, (c, s) in zip(got.x, got.labels, got.index):
        ref_x, ref_y = corruptions.load_style_set(tmp_path / "S", c, s)
        np.testing.assert_array_equal(xb, ref_x)
        np.testing.assert_array_equal(yb, ref_y)
