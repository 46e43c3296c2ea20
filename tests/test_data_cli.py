"""`regbench data list|verify|prepare` through the real CLI on a tmp data dir.

Official files are tiny files of the official formats written here (CIFAR pickles, CIFAR-C .npy, MNIST IDX); the
readers' md5 tables are pointed at them (the same override the reader tests use). Downloads are real HTTP: a local
server serves good or corrupt bytes, and a closed local port plays the unreachable host.
"""
import contextlib
import functools
import gzip
import hashlib
import http.server
import json
import socket
import struct
import tarfile
import threading

import numpy as np
import pytest
from helpers import snapshot
from regbench.datasets import catalog, cifar, cifar_c
from regbench.datasets import mnist_m as M
from test_cifar import SUBSET, tiny_images, write_cifar10

from regbench.cli import main


def run_cli(*args, capsys):
    code = main(["data", *args])
    out, err = capsys.readouterr()
    return code, out, err


def md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def tiny_cifar10(tmp_path, monkeypatch):
    """cifar-10-batches-py/ with 5 x 20 train + 20 test random images; the md5 table points at these files."""
    data = tmp_path / "data"
    xs = [tiny_images(20, i) for i in range(5)]
    ys = [np.tile(np.arange(10), 2) for _ in range(5)]
    md5s = write_cifar10(data, xs, ys, tiny_images(20, 99), np.tile(np.arange(10), 2))
    monkeypatch.setitem(cifar.SPECS["cifar10"], "md5s", md5s)
    return data, md5s


def write_official_cifar_c(root, x_test, y_test):
    """CIFAR-10-C/ as on Zenodo: 19 `<corruption>.npy` (5 severity blocks of the test images) + labels.npy, no sidecar.

    Block s of each corruption is the test set with a per-corruption, per-severity pixel offset, so blocks differ."""
    root.mkdir(parents=True)
    for k, c in enumerate(cifar_c.CORRUPTIONS):
        blocks = [((x_test.astype(np.int64) + 7 * k + 13 * s) % 256).astype(np.uint8) for s in range(5)]
        np.save(root / f"{c}.npy", np.concatenate(blocks))
    np.save(root / "labels.npy", np.tile(y_test.astype(np.uint8), 5))
    return {p.stem: md5(p) for p in root.glob("*.npy")}


def test_list_names_every_missing_file_with_size_md5_url_and_destination(tmp_path, capsys):
    code, out, _ = run_cli("list", "--data-dir", str(tmp_path), capsys=capsys)
    assert code == 0
    lines = out.splitlines()
    row = {line.split()[0]: line.split()[2] for line in lines[1:] if not line.startswith(" ")}
    assert set(row) == set(catalog.NAMES)
    assert row["digits"] == row["mnist5k"] == row["mnist1d"] == "present"
    assert all(row[n] == "missing" for n in ("cifar10", "cifar100", "cifar10_c", "cifar100_c", "mnist", "mnist_m",
                                              "cifar10_c_style", "digits_c_style", "mnist_m_style"))
    get = [line.strip() for line in lines if line.startswith("    get ")]
    assert (f"get cifar-10-python.tar.gz (170,498,071 B, md5 c58f30108f718f92721af3b95e74349a) from "
            f"https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz -> put it at {tmp_path}/cifar-10-python.tar.gz"
            in get)
    assert any(g.startswith("get CIFAR-10-C.tar (2,918,471,680 B, md5 56bf5dcef84df0e2308c6dcbcbbd8499) from "
                            "https://zenodo.org/records/2535967/") and g.endswith(f"{tmp_path}/CIFAR-10-C.tar")
               for g in get)
    mnist = [g for g in get if "/MNIST/raw/" in g]
    assert len(mnist) == 4 and any("t10k-labels-idx1-ubyte.gz (4,542 B, md5 ec29112dd5afa0611ce80d1b7f02629c)" in g
                                   for g in mnist)
    assert list(tmp_path.iterdir()) == []  # listing writes nothing


def test_verify_md5_pass_and_exact_bad_file(tiny_cifar10, capsys):
    data, md5s = tiny_cifar10
    code, out, _ = run_cli("list", "cifar10", "--data-dir", str(data), capsys=capsys)
    assert code == 0 and out.splitlines()[1].split()[:3] == ["cifar10", "official", "present"]
    code, out, err = run_cli("verify", "cifar10", "--data-dir", str(data), capsys=capsys)
    assert (code, out, err) == (0, "cifar10: OK (7 files)\n", "")
    bad = data / "cifar-10-batches-py" / "data_batch_3"
    raw = bytearray(bad.read_bytes())
    raw[-50] ^= 0xFF
    bad.write_bytes(bytes(raw))
    code, out, err = run_cli("verify", "--data-dir", str(data), capsys=capsys)  # every set: one line each
    assert code == 2
    lines = out.splitlines()
    assert len(lines) == len(catalog.NAMES)
    assert lines[catalog.NAMES.index("cifar10")] == f"cifar10: BAD {bad} has md5 {md5(bad)}, expected {md5s[bad.name]}"
    assert "digits: OK" in out and "cifar100: missing" in out
    assert len(err.strip().splitlines()) == 1 and "corrupt files in cifar10" in err
    # a partial folder is listed as such, with the archive that replaces it
    (data / "cifar-10-batches-py" / "data_batch_2").unlink()
    code, out, _ = run_cli("list", "cifar10", "--data-dir", str(data), capsys=capsys)
    assert out.splitlines()[1].split()[2] == "partial" and "lacks cifar-10-batches-py/data_batch_2" in out
    assert "get cifar-10-python.tar.gz" in out


def test_verify_official_cifar_c_layout(tmp_path, monkeypatch, capsys):
    x, y = tiny_images(10, 3), np.arange(10)
    md5s = write_official_cifar_c(tmp_path / "CIFAR-10-C", x, y)
    monkeypatch.setitem(cifar_c.MD5, "cifar10", md5s)
    code, out, _ = run_cli("verify", "cifar10_c", "--data-dir", str(tmp_path), capsys=capsys)
    assert (code, out) == (0, "cifar10_c: OK (20 files)\n")
    fog = tmp_path / "CIFAR-10-C" / "fog.npy"
    fog.write_bytes(fog.read_bytes()[:-10])  # truncated
    code, out, _ = run_cli("verify", "cifar10_c", "--data-dir", str(tmp_path), capsys=capsys)
    assert code == 2 and out == f"cifar10_c: BAD {fog} has md5 {md5(fog)}, expected {md5s['fog']}\n"


# --- prepare: downloads -------------------------------------------------------------------------

@pytest.fixture
def http_dir(tmp_path):
    """A real HTTP server on 127.0.0.1 serving the files of a folder; yields (folder, base URL)."""
    folder = tmp_path / "served"
    folder.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def closed_port_url(name):
    with contextlib.closing(socket.socket()) as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{name}"


def test_prepare_unreachable_host_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    data.mkdir()
    url = closed_port_url("cifar-10-python.tar.gz")
    monkeypatch.setitem(cifar.SPECS["cifar10"], "url", url)
    code, _, err = run_cli("prepare", "cifar10", "--data-dir", str(data), capsys=capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"regbench: error: cannot download {url} (")
    assert f"put it at {data}/cifar-10-python.tar.gz (md5 c58f30108f718f92721af3b95e74349a" in lines[0]
    assert list(data.iterdir()) == []


def test_prepare_downloads_checks_md5_renames_and_extracts(tiny_cifar10, http_dir, monkeypatch, capsys):
    src, _ = tiny_cifar10
    served, base = http_dir
    with tarfile.open(served / "cifar-10-python.tar.gz", "w:gz") as t:
        t.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    good_md5 = md5(served / "cifar-10-python.tar.gz")
    monkeypatch.setitem(cifar.SPECS["cifar10"], "url", f"{base}/cifar-10-python.tar.gz")
    data = src.parent / "fresh"
    # wrong md5 for the served bytes: nothing is saved
    monkeypatch.setitem(cifar.SPECS["cifar10"], "archive_md5", "0" * 32)
    code, _, err = run_cli("prepare", "cifar10", "--data-dir", str(data), capsys=capsys)
    assert code == 2 and f"has md5 {good_md5}, expected {'0' * 32}; nothing was saved" in err
    assert list(data.iterdir()) == []
    # the right md5: downloaded, renamed into place, extracted, verified
    monkeypatch.setitem(cifar.SPECS["cifar10"], "archive_md5", good_md5)
    code, out, err = run_cli("prepare", "cifar10", "--data-dir", str(data), capsys=capsys)
    assert code == 0, err
    assert "cifar10: present and verified (8 files)" in out  # 7 extracted files + the archive
    assert sorted(p.name for p in data.iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]
    assert snapshot(data / "cifar-10-batches-py") == snapshot(src / "cifar-10-batches-py")
    code, out, _ = run_cli("verify", "cifar10", "--data-dir", str(data), capsys=capsys)
    assert (code, out) == (0, "cifar10: OK (8 files)\n")


def _idx(arr, magic) -> bytes:
    header = struct.pack(">ii", magic, arr.shape[0]) + b"".join(struct.pack(">i", d) for d in arr.shape[1:])
    return gzip.compress(header + arr.astype(np.uint8).tobytes(), mtime=0)


def test_failed_download_never_touches_the_existing_cache(tmp_path, http_dir, monkeypatch, capsys):
    served, base = http_dir
    rng = np.random.default_rng(0)
    files = {"train-images-idx3-ubyte.gz": _idx(rng.integers(0, 256, (20, 28, 28)), 2051),
             "train-labels-idx1-ubyte.gz": _idx(np.arange(20) % 10, 2049),
             "t10k-images-idx3-ubyte.gz": _idx(rng.integers(0, 256, (10, 28, 28)), 2051),
             "t10k-labels-idx1-ubyte.gz": _idx(np.arange(10), 2049)}
    monkeypatch.setattr(M, "MNIST_FILES", {n: hashlib.md5(b).hexdigest() for n, b in files.items()})
    monkeypatch.setattr(M, "MNIST_URL", f"{base}/")
    data = tmp_path / "data"
    raw = data / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in list(files)[:3]:
        (raw / name).write_bytes(files[name])
    code, out, _ = run_cli("list", "mnist", "--data-dir", str(data), capsys=capsys)
    assert "partial" in out.splitlines()[1] and out.count("    get ") == 1 and "t10k-labels-idx1-ubyte.gz" in out
    before = snapshot(data)
    (served / "t10k-labels-idx1-ubyte.gz").write_bytes(files["t10k-labels-idx1-ubyte.gz"][:-5])  # a short file
    code, _, err = run_cli("prepare", "mnist", "--data-dir", str(data), capsys=capsys)
    assert code == 2 and "t10k-labels-idx1-ubyte.gz has md5" in err and "nothing was saved" in err
    assert snapshot(data) == before and not list(data.rglob(".*"))  # no temp or partial file left anywhere
    (served / "t10k-labels-idx1-ubyte.gz").write_bytes(files["t10k-labels-idx1-ubyte.gz"])
    code, out, err = run_cli("prepare", "mnist", "--data-dir", str(data), capsys=capsys)
    assert code == 0, err
    assert "mnist: present and verified (4 files)" in out
    assert {k: v for k, v in snapshot(data).items() if k in before} == before  # the cached files were kept as they were
    assert M.load_mnist(data)["y_test"].tolist() == list(range(10))  # the real reader accepts the downloaded set


# --- prepare: generated sets ----------------------------------------------------------------------

@pytest.mark.skipif(not SUBSET.exists(), reason="shared cifar10_subset not present")
def test_prepare_cifar10_c_style_generates_verifies_and_refuses_corruption(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    code, _, err = run_cli("prepare", "cifar10_c_style", "--data-dir", str(data), capsys=capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "cifar10_c_style is generated from the cifar10 test set, which is not usable: missing" in err
    with np.load(SUBSET) as d:
        x, y, x_te, y_te = d["x_train"], d["y_train"], d["x_test"][:24], d["y_test"][:24]
    md5s = write_cifar10(data, [x[i * 10:(i + 1) * 10] for i in range(5)], [y[i * 10:(i + 1) * 10] for i in range(5)],
                         x_te, y_te)
    monkeypatch.setitem(cifar.SPECS["cifar10"], "md5s", md5s)
    code, out, err = run_cli("prepare", "cifar10_c_style", "--data-dir", str(data), capsys=capsys)
    assert code == 0, err
    assert out.startswith("cifar10_c_style: 24 cifar10-test images x 19 corruptions x 5 severities in ")
    sets = [p for p in (data / "cifar10_c_style").iterdir()]
    assert len(sets) == 1 and not sets[0].name.startswith(".")
    side = json.loads((sets[0] / "regbench_sidecar.json").read_text())
    assert side["name"] == "cifar10-test-C-style" and side["base_count"] == 24
    assert side["md5"] == {p.stem: md5(p) for p in sets[0].glob("*.npy")} and len(side["md5"]) == 20
    got = cifar_c.load_cifar_c(sets[0], ["fog"], [5])  # the official-layout reader reads it, md5-checked
    assert got.x[0].shape == (24, 32, 32, 3) and got.labels[0].tolist() == y_te.tolist()
    code, out, _ = run_cli("prepare", "cifar10_c_style", "--data-dir", str(data), capsys=capsys)
    assert code == 0 and "already generated" in out
    code, out, _ = run_cli("verify", "cifar10_c_style", "--data-dir", str(data), capsys=capsys)
    assert (code, out) == (0, "cifar10_c_style: OK (20 files)\n")
    snow = sets[0] / "snow.npy"
    raw = bytearray(snow.read_bytes())
    raw[-1] ^= 1
    snow.write_bytes(bytes(raw))
    code, out, _ = run_cli("verify", "cifar10_c_style", "--data-dir", str(data), capsys=capsys)
    assert code == 2 and out == f"cifar10_c_style: BAD {snow} has md5 {md5(snow)}, expected {side['md5']['snow']}\n"


def test_interrupted_generation_is_partial(tmp_path, capsys):
    (tmp_path / "digits_c_style" / ".abc.123.deadbeef.staging").mkdir(parents=True)
    code, out, _ = run_cli("list", "digits_c_style", "--data-dir", str(tmp_path), capsys=capsys)
    assert code == 0 and out.splitlines()[1].split()[2] == "partial" and "interrupted generation left" in out


BAD = {
    "unknown set": (["list", "cifar11"], "unknown data set 'cifar11'; choose one of: mnist1d, digits"),
    "unknown set verify": (["verify", "imagenet"], "unknown data set 'imagenet'"),
    "unknown set prepare": (["prepare", "cifar10-c"], "unknown data set 'cifar10-c'"),
    "prepare needs a name": (["prepare"], "the following arguments are required: name"),
    "no subcommand": ([], "the following arguments are required: data_command"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_data_input_is_one_line_exit_2(case, tmp_path, capsys):
    args, expected = BAD[case]
    try:
        code = main(["data", *args, *(["--data-dir", str(tmp_path)] if args else [])])
    except SystemExit as e:  # argparse's own errors exit through the parser
        code = e.code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("regbench: error: ") and expected in lines[0], err
    assert list(tmp_path.iterdir()) == []


def test_prepare_archive_placed_by_hand_is_extracted(tmp_path, monkeypatch, capsys):
    """The user copies CIFAR-10-C.tar into the data dir; prepare checks its md5 and unpacks it (no download)."""
    src = tmp_path / "src"
    md5s = write_official_cifar_c(src / "CIFAR-10-C", tiny_images(5, 1), np.arange(5))
    data = tmp_path / "data"
    data.mkdir()
    with tarfile.open(data / "CIFAR-10-C.tar", "w") as t:
        t.add(src / "CIFAR-10-C", arcname="CIFAR-10-C")
    monkeypatch.setitem(cifar_c.MD5, "cifar10", md5s)
    name, _, size, _ = cifar_c.ARCHIVES["cifar10"]
    monkeypatch.setitem(cifar_c.ARCHIVES, "cifar10", (name, md5(data / name), size, closed_port_url(name)))
    code, out, _ = run_cli("list", "cifar10_c", "--data-dir", str(data), capsys=capsys)
    assert "present" in out and "extracted on first use" in out
    code, out, err = run_cli("prepare", "cifar10_c", "--data-dir", str(data), capsys=capsys)
    assert code == 0, err
    assert "present and verified (21 files)" in out  # 19 corruptions + labels + the tar
    assert snapshot(data / "CIFAR-10-C") == snapshot(src / "CIFAR-10-C")
