"""Training images/s of regbench's loop vs a standard timm-style loop: same device, model, batch, one process.

Issue 9, item 4a (target on a GPU: regbench ≥ 3× at resnet18 with the CIFAR stem, batch 512). Both loops train the
same architecture (``regbench.models.create_model``, a fresh copy each) on the same real CIFAR-10 images: the shared
``cifar10_subset`` written into the official pickle layout in a temporary folder (regbench/suites/cifar_subset.py).

* regbench: the engine's own pieces, as ``engine.train`` uses them — the train split held on the device as uint8
  (``DeviceData``), batches gathered, normalized, crop+flipped and (CUDA) made channels-last there, ``engine.fast_step``
  (bf16 autocast on CUDA, fp16 + GradScaler where bf16 is missing), the fused SGD of ``engine.build_optimizer``,
  ``engine.train_step`` with the baseline method, the scheduler step and the on-device loss sums of the loop.
* timm-style: ``torchvision.datasets.CIFAR10`` + RandomCrop(32, padding=4) + RandomHorizontalFlip + ToTensor +
  Normalize, a ``DataLoader`` (shuffle, ``--workers`` processes, persistent, pin_memory on CUDA, drop_last), the
  batch copied with non_blocking, AMP as timm's train.py does it by default (fp16 autocast + GradScaler) on CUDA,
  torch's default SGD. Its dataset is the subset tiled to 50,000 images so its epochs (and the loader's restart
  at each) come as often as on CIFAR-10.

The loops run in alternating blocks of ``--block`` steps after a warm-up of each (excluded), so machine drift hits
both; a block's rate is images / wall seconds with the device synchronized at its ends. Printed: the median and best
block of each and the ratio of medians. The DataLoader's workers keep prefetching while regbench's block runs
(up to ``prefetch_factor × workers`` batches are ready when its own block starts), which favours the timm-style loop.

    python benchmarks/throughput.py                                  # CPU: batch 64, resnet18, 24 steps each
    python benchmarks/throughput.py --device cuda                    # GPU: batch 512, 200 steps each
    python benchmarks/throughput.py --device cpu --model cnn --batch 128 --steps 60
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from regbench.datasets.cifar import CIFAR10
from regbench.methods.base import Method

from regbench import engine, models
from regbench.config import RunConfig
from regbench.device_data import DeviceData
from regbench.suites.cifar_subset import layout_md5s, write_cifar10_layout

SHAPE = (3, 32, 32)
CIFAR10_TRAIN = 50_000


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class RegbenchLoop:
    """engine.train's inner loop (regbench/engine.py) over device-resident batches, stepped ``steps`` at a time."""

    def __init__(self, root: Path, model_name: str, batch: int, device: torch.device, compile_: bool):
        self.splits = CIFAR10(md5s=layout_md5s(root)).load(root)  # crop_flip, CIFAR's default
        self.fast = engine.fast_step(device, SHAPE)
        torch.manual_seed(0)
        self.model = models.create_model(model_name, 10, SHAPE).to(device)
        if self.fast.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.method = Method()
        self.capture = engine.ActivationCapture(self.model)
        self.method.attach(self.model, engine.ModelContext(self.model, self.capture, 10, SHAPE))
        config = RunConfig(method="baseline", dataset="cifar10", model=model_name, optimizer="sgd", lr=0.05,
                           momentum=0.9, weight_decay=5e-4, schedule="cosine", batch_size=batch)
        self.optimizer = engine.build_optimizer(config, self.model, {})
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=10**6)
        self.forward = torch.compile(self.model) if compile_ else self.model
        self.data = DeviceData(self.splits, device, channels_last=self.fast.channels_last)
        self.device, self.batch = device, batch
        self.order = torch.Generator().manual_seed(0)
        self.augment = torch.Generator(device=device).manual_seed(1)
        self.steps_per_epoch = self.data.n // batch
        self.b, self.perm = self.steps_per_epoch, None
        self.sum_task = torch.zeros((), device=device)
        self.step = 0

    def run(self, steps: int) -> None:
        self.model.train()
        for _ in range(steps):
            if self.b == self.steps_per_epoch:  # a new epoch: a new order, as engine.train draws it
                self.perm, self.b = torch.randperm(self.data.n, generator=self.order).to(self.device), 0
            xb, yb = self.data.batch(self.perm[self.b * self.batch:(self.b + 1) * self.batch], self.augment)
            task, _reg = engine.train_step(self.forward, self.method, self.capture, self.optimizer, xb, yb,
                                           step=self.step, autocast=self.fast.autocast, dtype=self.fast.dtype,
                                           scaler=self.fast.scaler)
            self.scheduler.step()
            self.sum_task += task
            self.b += 1
            self.step += 1

    def describe(self) -> str:
        amp = f"{str(self.fast.dtype).removeprefix('torch.')} autocast" if self.fast.autocast else "float32"
        return (f"{self.data.n} images resident as {str(self.data.dtype).removeprefix('torch.')} on "
                f"{self.device.type}; {amp}{' + GradScaler' if self.fast.scaler else ''}"
                f"{', channels_last' if self.fast.channels_last else ''}"
                f"{', fused SGD' if self.optimizer.defaults.get('fused') else ''}"
                f"{', torch.compile' if self.forward is not self.model else ''}")


class TimmStyleLoop:
    """The usual loop: torchvision CIFAR10 + transforms + DataLoader workers + AMP (timm train.py's defaults)."""

    def __init__(self, root: Path, model_name: str, batch: int, device: torch.device, workers: int, mean, std):
        import torchvision
        from torchvision import transforms

        md5s = layout_md5s(root)

        class SubsetCIFAR10(torchvision.datasets.CIFAR10):  # the subset's files, checked against their own md5s
            train_list: ClassVar = [[f"data_batch_{i}", md5s[f"data_batch_{i}"]] for i in range(1, 6)]
            test_list: ClassVar = [["test_batch", md5s["test_batch"]]]
            meta: ClassVar = {**torchvision.datasets.CIFAR10.meta, "md5": md5s["batches.meta"]}

        transform = transforms.Compose([
            transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
            transforms.Normalize(mean, std)])
        dataset = SubsetCIFAR10(str(root), train=True, transform=transform)
        tiles = -(-CIFAR10_TRAIN // len(dataset.data))
        dataset.data = np.concatenate([dataset.data] * tiles)[:CIFAR10_TRAIN]
        dataset.targets = (list(dataset.targets) * tiles)[:CIFAR10_TRAIN]
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch, shuffle=True, num_workers=workers, pin_memory=device.type == "cuda",
            drop_last=True, persistent_workers=True, generator=torch.Generator().manual_seed(0))
        self.batches = iter(self.loader)
        torch.manual_seed(0)
        self.model = models.create_model(model_name, 10, SHAPE).to(device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        self.amp = device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if self.amp else None
        self.device, self.workers, self.n = device, workers, len(dataset.data)

    def next_batch(self):
        try:
            return next(self.batches)
        except StopIteration:  # epoch end: the loader reshuffles (its workers persist)
            self.batches = iter(self.loader)
            return next(self.batches)

    def run(self, steps: int) -> None:
        self.model.train()
        for _ in range(steps):
            x, y = self.next_batch()
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with torch.autocast(device_type=self.device.type, dtype=torch.float16, enabled=self.amp):
                loss = F.cross_entropy(self.model(x), y)
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is None:
                loss.backward()
                self.optimizer.step()
            else:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()

    def describe(self) -> str:
        return (f"{self.n} images (subset tiled) through {self.workers} DataLoader workers"
                f"{', pinned' if self.device.type == 'cuda' else ''}; "
                f"{'float16 autocast + GradScaler' if self.amp else 'float32'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--batch", type=int, help="batch size (default 512 on CUDA, 64 on the CPU)")
    p.add_argument("--steps", type=int, help="timed steps per loop (default 200 on CUDA, 24 on the CPU)")
    p.add_argument("--block", type=int, help="steps per alternating block (default 50 on CUDA, 8 on the CPU)")
    p.add_argument("--warmup", type=int, help="untimed steps per loop first (default 20 on CUDA, 4 on the CPU)")
    p.add_argument("--model", default="resnet18", help="any regbench model for 3x32x32 inputs (default resnet18, "
                                                       "CIFAR stem)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="DataLoader workers of the timm-style loop (default min(8, CPU count))")
    p.add_argument("--compile", action="store_true", help="torch.compile regbench's forward (as `regbench run "
                                                          "--compile`); its compilation happens in the warm-up")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = p.parse_args()
    device = engine.resolve_device(args.device)
    cuda = device.type == "cuda"
    batch = args.batch or (512 if cuda else 64)
    steps = args.steps or (200 if cuda else 24)
    block = min(args.block or (50 if cuda else 8), steps)
    warmup = args.warmup if args.warmup is not None else (20 if cuda else 4)
    if args.workers < 1:
        p.error("--workers must be at least 1 (the timm-style loop is the DataLoader-with-workers one)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile:
        engine.check_compile(str(device))
    if cuda:
        torch.backends.cudnn.benchmark = True  # both loops; timm's train.py sets it too
    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} torch threads"
    print(f"torch {torch.__version__}, {name}; model {args.model}, batch {batch}, {steps} timed steps per loop in "
          f"blocks of {block} after {warmup} warm-up steps")
    with tempfile.TemporaryDirectory(prefix="regbench-throughput-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. the scheduler's order notice when GradScaler skips a first step
        root = write_cifar10_layout(tmp)
        ours = RegbenchLoop(root, args.model, batch, device, args.compile)
        mean = (ours.splits.mean.reshape(-1) / 255).tolist()
        std = (ours.splits.std.reshape(-1) / 255).tolist()
        theirs = TimmStyleLoop(root, args.model, batch, device, args.workers, mean, std)
        print(f"  regbench  : {ours.describe()}")
        print(f"  timm-style: {theirs.describe()}")
        loops = {"regbench": ours, "timm-style": theirs}
        for loop in loops.values():
            loop.run(warmup)
            sync(device)
        rates: dict[str, list[float]] = {k: [] for k in loops}
        done = 0
        while done < steps:
            n = min(block, steps - done)
            for label, loop in loops.items():
                sync(device)
                t0 = time.perf_counter()
                loop.run(n)
                sync(device)
                rates[label].append(n * batch / (time.perf_counter() - t0))
            done += n
        float(ours.sum_task)  # the loop's one read of its loss sums (per epoch in engine.train)
    print(f"\n  {'loop':<12}{'median img/s':>14}{'best img/s':>14}   blocks")
    for label, r in rates.items():
        print(f"  {label:<12}{statistics.median(r):>14.1f}{max(r):>14.1f}   {len(r)}")
    ratio = statistics.median(rates["regbench"]) / statistics.median(rates["timm-style"])
    per_block = [a / b for a, b in zip(rates["regbench"], rates["timm-style"])]
    print(f"\n  regbench / timm-style: {ratio:.2f}x (ratio of medians; per block {min(per_block):.2f}x"
          f"…{max(per_block):.2f}x)")


if __name__ == "__main__":
    main()
