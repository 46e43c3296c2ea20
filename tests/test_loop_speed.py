"""The loop's speed rules that a CPU can check (docs/architecture.md, "On a GPU"): no host synchronization inside an
epoch (the loss sums are read once per epoch), and cuDNN's autotuner on for CUDA training only, restored afterwards."""
import sys
from pathlib import Path

import pytest
import torch
from regbench.datasets.mnist1d import MNIST1D
from torch.overrides import TorchFunctionMode

import regbench
from regbench import engine, evaluation, registry
from regbench.config import RunConfig

# Tensor → host reads: each waits for the device to finish everything queued before it (a sync on CUDA).
HOST_READS = {"item", "__float__", "__int__", "__bool__", "__index__", "tolist", "cpu", "numpy"}
# The loop's per-step code: training batch, step, optimizer, scheduler, sums (engine.py, stacked.py, device_data.py).
STEP_CODE = {("engine.py", "train_step"), ("engine.py", "step"), ("engine.py", "draw"), ("stacked.py", "step"),
             ("device_data.py", "batch"), ("device_data.py", "normalize")}
ROOT = str(Path(regbench.__file__).resolve().parent)


class HostReads(TorchFunctionMode):
    """Records every tensor→host read made by a line of regbench's own code (file name, function, read). Reads inside
    torch are not ours to judge (the CPU optimizers' step counters are host tensors by design; the fused CUDA
    optimizers read none)."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str, str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            frame = sys._getframe(1)
            if frame.f_code.co_filename.startswith(ROOT):
                self.seen.append((Path(frame.f_code.co_filename).name, frame.f_code.co_name, name))
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def mnist1d(tmp_path_factory):
    return MNIST1D().load(tmp_path_factory.mktemp("data"), train_size=256)


def cfg(seed=0):
    return RunConfig(method="baseline", dataset="mnist1d", model="cnn1d", epochs=2, batch_size=64, seed=seed,
                     hparams={}, train_size=256, device="cpu")


@pytest.mark.parametrize("seeds,backend", [((0,), "streams"), ((0, 1), "streams"), ((0, 1), "vmap")])
def test_no_host_read_inside_an_epoch(mnist1d, seeds, backend):
    configs = [cfg(s) for s in seeds]
    with HostReads() as reads:
        engine.train_group(configs, mnist1d, lambda c: registry.build_method("baseline"), backend=backend)
    in_steps = [r for r in reads.seen if r[:2] in STEP_CODE]
    assert not in_steps, f"host reads inside the training steps: {sorted(set(in_steps))}"
    # ... and the detector sees the reads that are meant to be there: the two loss sums, once per run and epoch
    per_epoch = [r for r in reads.seen if r[:2] == ("engine.py", "_end_epoch")]
    assert len(per_epoch) == 2 * len(seeds) * 2 and {r[2] for r in per_epoch} == {"__float__"}


def test_cudnn_autotune_only_on_cuda_and_restored():
    before = torch.backends.cudnn.benchmark
    with engine.cudnn_autotune(torch.device("cpu")):
        assert torch.backends.cudnn.benchmark == before
    torch.backends.cudnn.benchmark = False
    try:
        # setting the flag needs no GPU, so the CUDA branch runs here too
        with pytest.raises(RuntimeError, match="stop"), engine.cudnn_autotune(torch.device("cuda")):
            assert torch.backends.cudnn.benchmark is True
            raise RuntimeError("stop")  # restored on the way out of an exception too
        assert torch.backends.cudnn.benchmark is False
    finally:
        torch.backends.cudnn.benchmark = before


def test_train_accuracy_reads_the_resident_split_with_the_host_copys_logits(tmp_path, mnist1d):
    # Evaluation predicts the train split from the group's device-resident copy (no host→device copy per epoch):
    # uint8 CIFAR pixels through DeviceData's table and a float split as they are, chunked smaller than the split,
    # give exactly the logits of the host float copy.
    from regbench.datasets.cifar import CIFAR10

    from regbench import models
    from regbench.device_data import DeviceData
    from regbench.metrics import predict
    from regbench.suites.cifar_subset import layout_md5s, write_cifar10_layout

    root = write_cifar10_layout(tmp_path / "cifar", n_train=300, n_test=100)
    cifar = CIFAR10(md5s=layout_md5s(root)).load(root)
    for splits, model_name in ((cifar, "cnn"), (mnist1d, "cnn1d")):
        torch.manual_seed(0)
        model = models.create_model(model_name, splits.num_classes, splits.input_shape).eval()
        data = DeviceData(splits, "cpu")
        assert data.resident and (data.table is not None) == (splits is cifar)  # the uint8 path is exercised
        for chunk in (128, 1024):  # the host copy, as metrics.predict reads it, in the same chunks
            want = predict(model, splits.x_train, batch_size=chunk)
            assert torch.equal(evaluation.predict_train(model, splits, data, batch_size=chunk), want)
