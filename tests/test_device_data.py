"""Device-resident training data and the fast step (issue 9, items 1-2), on CPU tensors: the same code as on a GPU.

The uint8 copy must give exactly (torch.equal, and bit for bit) the batches of the plain float path for one seed,
with and without crop_flip, so a run's metrics do not change; the CUDA-only parts (autocast, GradScaler, fused
optimizers, channels-last) must stay off on the CPU; ``--compile`` must run, keep the run key, and fail in one line
where no C++ compiler exists.
"""
import dataclasses
import os
import subprocess
import sys
import warnings
from pathlib import Path

import optuna
import pytest
import torch
from regbench.datasets.base import AUGMENTS
from regbench.datasets.cifar import CIFAR10
from regbench.datasets.mnist1d import MNIST1D
from regbench.datasets.mnist_m import MNISTMStyle

from regbench import engine, models, registry
from regbench.config import RunConfig
from regbench.device_data import DeviceData, pixel_table
from regbench.suites.cifar_subset import SUBSET, layout_md5s, write_cifar10_layout

needs_subset = pytest.mark.skipif(not SUBSET.exists(), reason="shared cifar10_subset not present")


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    """300 real CIFAR-10 training images (+100 test) in the official pickle layout."""
    return write_cifar10_layout(tmp_path_factory.mktemp("cifar"), n_train=300, n_test=100)


@pytest.fixture(scope="module")
def cifar(cifar_root):
    return {a: CIFAR10(md5s=layout_md5s(cifar_root)).load(cifar_root, augment=a) for a in AUGMENTS}


@pytest.fixture(scope="module")
def mnist_m(tmp_path_factory):
    return MNISTMStyle().load(tmp_path_factory.mktemp("mm"), train_size=300, augment="crop_flip")


def plain_batches(splits, seed: int, batch: int, steps: int):
    """The engine's batch loop before issue 9, verbatim: float split on the device, index, then train_augment."""
    x_train, y_train = splits.x_train, splits.y_train
    order = torch.Generator().manual_seed(seed)
    augment = torch.Generator().manual_seed(seed + 1)
    perm = torch.randperm(len(x_train), generator=order)
    out = []
    for b in range(steps):
        idx = perm[b * batch:(b + 1) * batch]
        xb = x_train[idx]
        if splits.train_augment is not None:
            xb = splits.train_augment(xb, augment)
        out.append((xb, y_train[idx]))
    return out


def device_batches(data: DeviceData, seed: int, batch: int, steps: int):
    order = torch.Generator().manual_seed(seed)
    augment = torch.Generator().manual_seed(seed + 1)
    perm = torch.randperm(data.n, generator=order)
    return [data.batch(perm[b * batch:(b + 1) * batch], augment) for b in range(steps)]


@needs_subset
@pytest.mark.parametrize("augment", AUGMENTS)
@pytest.mark.parametrize("resident", [True, False])
def test_uint8_batches_equal_the_plain_float_batches(cifar, augment, resident):
    splits = cifar[augment]
    data = DeviceData(splits, "cpu", resident=resident)
    assert data.dtype == torch.uint8 and data.resident is resident
    for seed in (0, 7):
        got, want = device_batches(data, seed, 64, 4), plain_batches(splits, seed, 64, 4)
        for (xb, yb), (xw, yw) in zip(got, want):
            assert torch.equal(xb, xw) and torch.equal(yb, yw)
            assert torch.equal(xb.view(torch.int32), xw.view(torch.int32))  # bit for bit, not just ==
    if augment == "crop_flip":  # the comparison can fail: another seed's augmentation differs
        other = device_batches(data, 1, 64, 1)[0][0]
        assert not torch.equal(other, plain_batches(splits, 0, 64, 1)[0][0])


@needs_subset
def test_uint8_copy_is_a_quarter_of_float32_and_holds_the_raw_pixels(cifar, cifar_root):
    splits = cifar["none"]
    assert splits.x_train_u8.dtype == torch.uint8 and splits.pixel_scale == 1.0
    assert splits.x_train_u8.nbytes * 4 == splits.x_train.nbytes
    data = DeviceData(splits, "cpu")
    assert data.x.nbytes * 4 == DeviceData(splits, "cpu", raw=False).x.nbytes
    # the raw rows are the file's pixels: the split's first image, read straight from the batch files
    from regbench.datasets.cifar import load_arrays
    x_tr, *_ = load_arrays(cifar_root, "cifar10", layout_md5s(cifar_root))
    assert torch.equal(splits.x_train_u8[0], torch.as_tensor(x_tr[splits.indices["train"][0]]))


@needs_subset
def test_mnist_m_pixels_scaled_by_255_normalize_bit_for_bit(mnist_m):
    assert mnist_m.x_train_u8.dtype == torch.uint8 and mnist_m.pixel_scale == 255.0
    assert mnist_m.x_train_u8.nbytes * 4 == mnist_m.x_train.nbytes
    data = DeviceData(mnist_m, "cpu")
    whole = data.normalize(data.x)
    assert torch.equal(whole.view(torch.int32), mnist_m.x_train.view(torch.int32))
    for (xb, yb), (xw, yw) in zip(device_batches(data, 3, 50, 3), plain_batches(mnist_m, 3, 50, 3)):
        assert torch.equal(xb, xw) and torch.equal(yb, yw)


def test_every_pixel_value_of_the_table_is_the_float_path():
    """All 256 values × 3 channels through build_splits' arithmetic (float32, /255 in numpy, sub_, div_)."""
    import numpy as np
    mean = torch.tensor([0.41, 0.5, 0.277]).reshape(1, 3, 1, 1)
    std = torch.tensor([0.2, 0.31, 0.19]).reshape(1, 3, 1, 1)
    pixels = np.ascontiguousarray(np.broadcast_to(np.arange(256, dtype=np.uint8), (1, 3, 256))).reshape(1, 3, 16, 16)
    for scale in (1.0, 255.0):
        floats = torch.as_tensor(np.ascontiguousarray(pixels, dtype=np.float32))
        if scale != 1:
            floats = torch.as_tensor(np.ascontiguousarray(pixels, dtype=np.float32) / np.float32(scale))
        want = floats.sub_(mean).div_(std)
        table = pixel_table(mean, std, scale)
        got = torch.take(table, torch.as_tensor(pixels).long() + torch.arange(3).reshape(1, 3, 1, 1) * 256)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_float_datasets_stay_float32_on_the_device(tmp_path):
    splits = MNIST1D().load(tmp_path, train_size=200)
    assert splits.x_train_u8 is None
    data = DeviceData(splits, "cpu")
    assert data.dtype == torch.float32
    for (xb, yb), (xw, yw) in zip(device_batches(data, 0, 32, 3), plain_batches(splits, 0, 32, 3)):
        assert torch.equal(xb, xw) and torch.equal(yb, yw)


@needs_subset
def test_pixels_that_do_not_reproduce_the_split_fall_back_to_float(cifar):
    splits = cifar["none"]
    wrong = dataclasses.replace(splits, x_train_u8=splits.x_train_u8.flip(0).contiguous())
    with pytest.warns(UserWarning, match="do not reproduce"):
        data = DeviceData(wrong, "cpu")
    assert data.dtype == torch.float32


@needs_subset
def test_a_run_on_the_uint8_path_has_the_metrics_of_the_plain_path(cifar, method="ses"):
    """Two epochs (a second permutation), crop_flip, SES reading captured activations: every metric equal."""
    splits = cifar["crop_flip"]
    config = RunConfig(method=method, dataset="cifar10", model="cnn", epochs=2, batch_size=50, seed=5,
                       hparams=registry.method_class(method).resolve({}), device="cpu", augment="crop_flip",
                       optimizer="sgd", lr=0.05, schedule="cosine")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SES's unreachable-target notice at batch 50
        fast = engine.train(config, splits, registry.build_method(method))
        plain = engine.train(config, dataclasses.replace(splits, x_train_u8=None), registry.build_method(method))
    drop = ("seconds", "seconds_per_epoch")
    assert {k: v for k, v in fast.metrics.items() if k not in drop} == \
           {k: v for k, v in plain.metrics.items() if k not in drop}
    assert [h["train_loss"] for h in fast.history] == [h["train_loss"] for h in plain.history]


def test_no_cuda_branch_is_taken_on_the_cpu():
    cpu = torch.device("cpu")
    assert engine.fast_step(cpu, (3, 32, 32)) == engine.FastStep()  # no autocast, no scaler, no channels-last
    assert not engine.FastStep().autocast and engine.FastStep().scaler is None
    model = models.create_model("cnn", 10, (3, 32, 32))
    config = RunConfig(method="baseline", dataset="x", model="cnn", optimizer="sgd")
    for name in ("sgd", "adamw"):
        optimizer = engine.build_optimizer(config.replace(optimizer=name), model, {})
        assert not optimizer.defaults.get("fused")
    assert next(model.parameters()).is_contiguous()  # not channels-last


def test_fp16_gradscaler_and_channels_last_step_runs_on_cpu():
    """The fp16 + GradScaler branch of train_step (GPUs without bf16) and channels-last batches, exercised on the
    CPU's own autocast and scaler: the step trains and the scaler keeps its state."""
    torch.manual_seed(0)
    model = models.create_model("cnn", 10, (3, 16, 16)).to(memory_format=torch.channels_last)
    capture = engine.ActivationCapture(model)
    method = registry.build_method("ses")
    method.attach(model, engine.ModelContext(model, capture, 10, (3, 16, 16)))
    capture.wanted = set(capture.keys())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    x = torch.randn(32, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (32,))
    before = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(3):
            task, reg = engine.train_step(model, method, capture, optimizer, x, y, step=step, autocast=True,
                                          dtype=torch.float16, scaler=scaler)
    assert torch.isfinite(task) and torch.isfinite(reg) and reg > 0
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert scaler.state_dict()["scale"] > 0


def test_compile_runs_keeps_the_key_and_matches_eager(tmp_path):
    splits = MNIST1D().load(tmp_path, train_size=200)
    config = RunConfig(method="baseline", dataset="mnist1d", model="mlp", epochs=1, batch_size=50, seed=0,
                       device="cpu")
    compiled = config.replace(compile=True)
    assert compiled.key() == config.key()
    eager = engine.train(config, splits, registry.build_method("baseline"))
    fast = engine.train(compiled, splits, registry.build_method("baseline"))
    assert fast.metrics["train_loss"] == pytest.approx(eager.metrics["train_loss"], rel=1e-4)
    assert fast.metrics["val_nll"] == pytest.approx(eager.metrics["val_nll"], rel=1e-4)


def test_cli_compile_reaches_the_stored_config_without_changing_the_key(tmp_path):
    from regbench.cli import main
    from regbench.record import SPEC as SPEC_ATTR
    out = tmp_path / "out"
    code = main(["run", "--methods", "ses", "--epochs", "1", "--seeds", "1", "--quiet", "--compile", "--device", "cpu",
                 "--out", str(out), "--data-dir", str(tmp_path / "data"), "--plan-only"])
    assert code == 0
    study = optuna.load_study(study_name="mnist1d-cnn1d", storage=f"sqlite:///{out / 'regbench.db'}")
    base = RunConfig.from_json(study.user_attrs[SPEC_ATTR]["base"])
    assert base.compile is True
    assert base.key() == base.replace(compile=False).key()


def test_compile_without_a_cxx_compiler_is_one_line(tmp_path):
    script = Path(sys.executable).parent / "regbench"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "regbench.cli"]
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler")}
    env.pop("TORCH_INDUCTOR_INSTALL_GXX", None)
    out = tmp_path / "out"
    proc = subprocess.run([*cmd, "run", "--methods", "ses", "--compile", "--device", "cpu", "--out", str(out),
                           "--data-dir", str(tmp_path / "data")], check=False, capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--compile" in lines[0] and "C++ compiler" in lines[0]
    assert not out.exists()
