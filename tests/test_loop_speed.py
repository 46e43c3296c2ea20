"""The loop's speed rules that a CPU can check (issue 19, DESIGN.md §7): no host synchronization inside an epoch (the
loss sums are read once per epoch), and cuDNN's autotuner on for CUDA training only, restored afterwards."""
import sys
from pathlib import Path

import pytest
import torch
from regbench.datasets.mnist1d import MNIST1D
from torch.overrides import TorchFunctionMode

import regbench
from regbench import engine, registry
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
