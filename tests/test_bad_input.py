"""Bad input: one line on stderr naming the problem and the valid choices, exit 2, no traceback, and nothing in
an existing output dir changed."""
import pytest
import torch

from helpers import regbench_cli, snapshot
from regbench.cli import main

BAD = {
    "unknown method": (["--methods", "ses,nope"], "unknown method 'nope'; choose one of: baseline"),
    "no method": (["--methods", ","], "names no method"),
    "unknown dataset": (["--methods", "ses", "--dataset", "imagenet-9k"], "unknown dataset 'imagenet-9k'"),
    "unknown model": (["--methods", "ses", "--model", "resnet81"], "unknown model 'resnet81'"),
    "set without =": (["--methods", "ses", "--set", "ses.beta"], "malformed --set 'ses.beta'"),
    "set without method": (["--methods", "ses", "--set", "beta=0.5"], "malformed --set"),
    "set for absent method": (["--methods", "ses", "--set", "shade.weight=1"], "not in --methods"),
    "set unknown hparam": (["--methods", "ses", "--set", "ses.gamma=1"], "has no hparam 'gamma'"),
    "set non-number": (["--methods", "ses", "--set", "ses.beta=high"], "ses.beta='high' is not a valid float"),
    "beta above 1": (["--methods", "ses", "--set", "ses.beta=1.5"], "ses.beta=1.5 is outside (0, 1)"),
    "beta at 0": (["--methods", "ses", "--set", "ses.beta=0"], "ses.beta=0.0 is outside (0, 1)"),
    "negative lambda": (["--methods", "ses", "--set", "ses.lam=-0.01"], "ses.lam=-0.01 is outside [0, inf)"),
    "negative shade weight": (["--methods", "shade", "--set", "shade.weight=-1"], "shade.weight=-1.0 is outside"),
    "storage scheme": (["--methods", "ses", "--storage", "bogus://nowhere"], "unknown storage scheme 'bogus'"),
    "storage folder": (["--methods", "ses", "--storage", "sqlite:////no/such/dir/x.db"], "does not exist"),
    "storage not a url": (["--methods", "ses", "--storage", "just words"], "not a URL"),
    "seeds": (["--methods", "ses", "--seeds", "three"], "--seeds 'three'"),
    "epochs": (["--methods", "ses", "--epochs", "0"], "--epochs 0 is outside 1..100000"),
    "train size": (["--methods", "ses", "--train-size", "5"], "train_size must be between 10"),
    "benchmark name": (["--methods", "ses", "--name", "a:b"], "benchmark name 'a:b'"),
    "unknown layer rule": (["--methods", "ses", "--set", "ses.layers=everything"], "layer rule 'everything': unknown"),
    "rule selects nothing": (["--methods", "shade", "--set", "shade.layers=name:nothing*"],
                             "method 'shade' on model 'cnn1d': layer rule 'name:nothing*': selects no layer"),
    "last:K beyond the model": (["--methods", "ses", "--set", "ses.layers=last:9"], "has only 4 feature layers"),
    "composite twice": (["--methods", "ses+ses"], "composite 'ses+ses' names method 'ses' twice"),
    "composite with baseline": (["--methods", "baseline+shade"], "includes 'baseline'"),
    "composite unknown part": (["--methods", "ses+nope"], "unknown method 'nope'"),
    "composite set needs namespace": (["--methods", "ses+shade", "--set", "ses.beta=0.5"],
                                      "write --set ses+shade.ses.beta=0.5"),
    "dln beta at 0": (["--methods", "dln_entropy", "--set", "dln_entropy.beta=0"], "dln_entropy.beta=0.0 is outside (0, inf)"),
    "dln depth 1": (["--methods", "dln_entropy", "--set", "dln_entropy.depth=1"], "dln_entropy.depth=1 is outside [2, 64]"),
    "confidence beta": (["--methods", "confidence_penalty", "--set", "confidence_penalty.beta=-1"],
                        "confidence_penalty.beta=-1.0 is outside [0, inf)"),
    "dropout rate 1": (["--methods", "dropout", "--set", "dropout.rate=1"], "dropout.rate=1.0 is outside [0, 1)"),
    "dropout timm on a built-in": (["--methods", "dropout", "--set", "dropout.placement=timm"],
                                   "method 'dropout' on model 'cnn1d': model 'cnn1d' has no option(s)"),
    "smoothing eps": (["--methods", "label_smoothing", "--set", "label_smoothing.eps=1.5"], "eps=1.5 is outside [0, 1]"),
    "decov weight": (["--methods", "decov", "--set", "decov.weight=-1"], "decov.weight=-1.0 is outside [0, inf)"),
    "vicreg weight": (["--methods", "vicreg_reg", "--set", "vicreg_reg.var_weight=-1"], "var_weight=-1.0 is outside"),
    "sn iterations": (["--methods", "spectral_norm", "--set", "spectral_norm.n_power_iterations=0"],
                      "spectral_norm.n_power_iterations=0 is outside [1, inf)"),
    "wd strength": (["--methods", "weight_decay", "--set", "weight_decay.strength=-1"], "strength=-1.0 is outside"),
    "ses every 0": (["--methods", "ses", "--set", "ses.every=0"], "ses.every=0 is outside [1, inf)"),
    "ses eigen path": (["--methods", "ses", "--set", "ses.eigen_path=magic"], "is not one of: exact, lowrank"),
    "cifar10 files missing": (["--methods", "ses", "--dataset", "cifar10"], "cifar-10-batches-py"),
    "cifar100 files missing": (["--methods", "ses", "--dataset", "cifar100"], "cifar-100-python"),
    "unknown shift set": (["--methods", "ses", "--shift", "imagenet_c"], "unknown shift set 'imagenet_c'"),
    "shift set of another dataset": (["--methods", "ses", "--shift", "digits_c_style"],
                                     "shift set 'digits_c_style' is built from dataset 'digits', not 'mnist1d'"),
    "mnist_m archive missing": (["--methods", "shade", "--dataset", "mnist_m"], "MNIST-M is missing: put the official"),
    "cifar10_c on mnist1d": (["--methods", "ses", "--shift", "cifar10_c"],
                             "shift set 'cifar10_c' is built from dataset 'cifar10', not 'mnist1d'; pass --dataset cifar10"),
    "cifar100 style set on cifar10": (["--methods", "ses", "--dataset", "cifar10", "--model", "cnn", "--shift",
                                       "cifar100_c_style"],
                                      "shift set 'cifar100_c_style' is built from dataset 'cifar100', not 'cifar10'"),
    "composite part range": (["--methods", "ses+shade", "--set", "ses+shade.ses.beta=2"],
                             "ses.beta=2.0 is outside (0, 1)"),
    "crop_flip on 1-D signals": (["--methods", "ses", "--augment", "crop_flip"],
                                 "--augment crop_flip needs image inputs (C, H, W), but dataset 'mnist1d'"),
    "train size and per class": (["--methods", "ses", "--train-size", "300", "--train-per-class", "5"],
                                 "give --train-size or --train-per-class, not both"),
    "train per class 0": (["--methods", "ses", "--train-per-class", "0"], "--train-per-class 0 is outside 1.."),
    "train per class too many": (["--methods", "ses", "--train-per-class", "10000"],
                                 "train_per_class must be between 1 and"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2_and_leaves_the_output_dir_alone(case, tiny_run, data_dir, capsys):
    args, expected = BAD[case]
    out, _ = tiny_run
    before = snapshot(out)
    code = main(["run", *args, "--out", str(out), "--data-dir", str(data_dir), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("regbench: error: "), err
    assert expected in lines[0]
    assert snapshot(out) == before


def test_storage_password_is_never_printed(tiny_run, capsys):
    out, _ = tiny_run
    url = "postgresql://alice:s3cret-pw@127.0.0.1:1/nodb"  # nothing listens on port 1
    assert main(["run", "--methods", "ses", "--storage", url, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "postgresql://alice:***@127.0.0.1:1/nodb" in err and "s3cret" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for CUDA on a machine without it")
def test_cuda_without_a_gpu(tiny_run, capsys):
    out, _ = tiny_run
    assert main(["run", "--methods", "ses", "--device", "cuda", "--out", str(out)]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_output_dir_that_is_a_file(tmp_path, capsys):
    blocker = tmp_path / "taken"
    blocker.write_text("keep me")
    assert main(["run", "--methods", "ses", "--out", str(blocker)]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    assert blocker.read_text() == "keep me"


@pytest.mark.parametrize("args,expected", [
    (["run", "--methods", "ses", "--set", "ses.beta=2"], "ses.beta=2.0 is outside (0, 1)"),
    (["run"], "the following arguments are required: --methods"),
])
def test_real_console_script_prints_no_traceback(args, expected, tmp_path):
    proc = regbench_cli(*args, "--out", str(tmp_path / "o"), cwd=tmp_path) if args != ["run"] else \
        regbench_cli(*args, cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and expected in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
