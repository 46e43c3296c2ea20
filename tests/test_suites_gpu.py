"""GPU-scale paper suites (issue 8): `ses-cifar` and `shade-cifar` in their --smoke form end to end through the real
CLI (real CIFAR-10 images of the shared subset, real training, the harness's store), the report checked against the
store, and full mode refusing in one line, before any write, when the GPU or the CIFAR files are missing."""
import numpy as np
import pytest
import torch
from regbench.datasets.cifar import CIFAR10

from regbench.cli import main
from regbench.suites import cifar_subset, ses_cifar, shade_cifar
from regbench.suites.common import fmt_ci

pytestmark = pytest.mark.skipif(not cifar_subset.SUBSET.exists(), reason="shared cifar10_subset not present")


def test_write_cifar10_layout_holds_the_subset_pixels_class_balanced(tmp_path):
    root = cifar_subset.write_cifar10_layout(tmp_path, n_train=200, n_test=50)
    md5s = cifar_subset.layout_md5s(root)
    assert sorted(md5s) == ["batches.meta", *cifar_subset.TRAIN_FILES, "test_batch"]
    raw = (root / "cifar-10-batches-py" / "data_batch_1").read_bytes()
    assert b"numpy.core.multiarray\n_reconstruct" in raw and b"BINUNICODE" not in raw  # cPickle's opcodes
    from regbench.datasets.cifar import load_arrays

    x_tr, y_tr, x_te, y_te = load_arrays(root, "cifar10", md5s)  # the real reader, md5-checked
    assert x_tr.shape == (200, 3, 32, 32) and x_te.shape == (50, 3, 32, 32)
    assert np.bincount(y_te).tolist() == [5] * 10 and np.bincount(y_tr, minlength=10).min() >= 19
    with np.load(cifar_subset.SUBSET) as d:
        train = {bytes(img): int(label) for img, label in zip(d["x_train"], d["y_train"])}
        np.testing.assert_array_equal(x_te.transpose(0, 2, 3, 1), d["x_test"][np.sort(
            cifar_subset._balanced_prefix(d["y_test"], 50))])
    for img, label in zip(x_tr.transpose(0, 2, 3, 1), y_tr):  # every training image is a subset image, same label
        assert train[bytes(np.ascontiguousarray(img))] == label
    with cifar_subset.official_md5s_for(root):
        splits = CIFAR10().load(root)  # the registry's instance, official table pointed at these files
    assert len(splits.y_test) == 50
    with pytest.raises(Exception, match="md5"):
        CIFAR10().load(root)  # restored: the official md5s refuse these files again


def _store_frame(out, suite, benchmark):
    from regbench import report
    from regbench.store import default_storage_url, load_spec, open_storage

    storage = open_storage(default_storage_url(out / f"{suite}-store"))
    return report.runs_frame(storage, benchmark, load_spec(storage, benchmark))


def _row(text, *cells):
    """The report's table line that starts with these cells."""
    start = "| " + " | ".join(cells) + " |"
    lines = [line for line in text.splitlines() if line.startswith(start)]
    assert len(lines) == 1, (start, lines)
    return lines[0]


def test_ses_cifar_smoke_via_cli(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["suite", "ses-cifar", "--smoke", "--out", str(out)]) == 0, capsys.readouterr().err
    text = (out / "ses-cifar.md").read_text()
    frame = _store_frame(out, "ses-cifar", "ses-cifar-cifar10")
    assert sorted(frame.method) == sorted([m for m in ses_cifar.METHODS for _ in range(2)])
    assert (frame.shift_acc > 0).all() and (frame.seconds_per_epoch > 0).all()
    for method, label in ses_cifar.LABELS.items():
        runs = frame[frame.method == method].sort_values("seed")
        best = [max(h["test_acc"] for h in hist) for hist in runs.history]
        row = _row(text, "cifar10", label, ses_cifar.PAPER.get(("cifar10", method), {}).get("table", "—"))
        for value in (fmt_ci(best, 2, 100), fmt_ci(runs.test_acc, 2, 100), fmt_ci(runs.shift_acc, 2, 100),
                      fmt_ci(runs.seconds_per_epoch, 2)):
            assert f"| {value} |" in row, (value, row)
    assert "SES" in text and "93.43 ± 0.10" in text and "28.9 s" in text  # the paper's Table 2 / Table 7 numbers
    assert text.count("**not comparable** — (smoke run: 140 images, 1 epoch)") == 3
    figure = out / "figures" / "ses-cifar.png"
    assert figure.read_bytes()[:4] == b"\x89PNG" and figure.stat().st_size > 10_000


def test_shade_cifar_smoke_via_cli(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["suite", "shade-cifar", "--smoke", "--out", str(out)]) == 0, capsys.readouterr().err
    text = (out / "shade-cifar.md").read_text()
    for arch in shade_cifar.ARCHS:
        frame = _store_frame(out, "shade-cifar", f"shade-cifar-{arch.lower()}")
        assert len(frame) == len(shade_cifar.METHODS) * 2
        for method, label in shade_cifar.LABELS.items():
            runs = frame[frame.method == method].sort_values("seed")
            row = _row(text, arch, label, f"{shade_cifar.PAPER[arch][method]:.2f}")
            for value in (fmt_ci(runs.test_acc, 2, 100), fmt_ci(runs.shift_acc, 2, 100),
                          fmt_ci(runs.seconds_per_epoch, 2)):
                assert f"| {value} |" in row, (value, row)
        # tuned methods were selected by the protocol: their tuning study holds the one smoke trial each
        tuned = frame[frame.method == "shade"].iloc[0].config["hparams"]
        assert tuned["weight"] != 1e-3  # not the default: TPE's first draw
    assert text.count("**not comparable** — (smoke run: 140 images, 1 epoch)") == 12
    figure = out / "figures" / "shade-cifar.png"
    assert figure.read_bytes()[:4] == b"\x89PNG" and figure.stat().st_size > 10_000


@pytest.mark.parametrize("suite", ["ses-cifar", "shade-cifar"])
@pytest.mark.parametrize("with_files", [False, True])
def test_full_mode_without_gpu_or_files_is_one_line_exit_2(tmp_path, capsys, suite, with_files):
    data = tmp_path / "data"
    data.mkdir()
    if with_files:
        cifar_subset.write_cifar10_layout(data, n_train=20, n_test=10)  # files in place: only the GPU can be lacking
    if with_files and torch.cuda.is_available():
        pytest.skip("a GPU and CIFAR files are both here: full mode would run")
    out = tmp_path / "out"
    assert main(["suite", suite, "--out", str(out), "--data-dir", str(data)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"suite {suite} (full mode) needs" in err and "--smoke" in err
    assert ("CUDA GPU" in err) == (not torch.cuda.is_available())
    assert ("cifar-10-python.tar.gz" in err) == (not with_files)
    assert not out.exists()  # nothing written
