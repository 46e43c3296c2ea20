"""Total training throughput of K seeds trained at once (``engine.train_group``) vs K × one seed trained alone
(issue 9, item 4c), per backend, for the 1-D CNN (cnn1d on mnist1d), the small CNN (cnn on 32×32×3 images) and
resnet18 (CIFAR stem), measured in one run.

Every number is a real training run: ``engine.train`` for one seed alone, ``engine.train_group`` for K seeds
(baseline method: both backends can run it). Throughput = training images / training wall time, from the runs'
per-epoch ``seconds`` (the training loop only, evaluation excluded), the first epoch left out as warm-up (cuDNN
autotuning, allocator growth). ``ratio`` = images/s of the K parallel seeds ÷ images/s of one seed alone: what K
seeds at once gain over training them one after the other (the issue's target: ≥ 5 for 8 seeds of the small CNN
on a GPU).

    python benchmarks/seeds_per_gpu.py                       # sizes for this device (small ones on the CPU)
    python benchmarks/seeds_per_gpu.py --setups cnn --ks 1,8 --backends vmap --epochs 4

The 32×32×3 setups use the real CIFAR-10 images of the cifar10_subset.npz named by $REGBENCH_CIFAR10_SUBSET
(described in regbench/suites/cifar_subset.py; the repository ships no copy) when it is set to a file, else fixed
random tensors of that shape (throughput does not depend on the pixels).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from regbench.datasets.base import Splits

from regbench import engine, registry
from regbench.config import RunConfig
from regbench.suites import cifar_subset

CIFAR_SUBSET = cifar_subset.SUBSET  # None unless $REGBENCH_CIFAR10_SUBSET names one

# (train images, batch, K values) per setup; the CPU sizes finish in a few minutes on two cores.
SIZES = {
    "cuda": {"cnn1d": (3000, 128, (1, 2, 4, 8)), "cnn": (10000, 256, (1, 2, 4, 8)),
             "resnet18": (5120, 512, (1, 2, 4, 8))},
    "cpu": {"cnn1d": (1024, 128, (1, 2, 4, 8)), "cnn": (256, 64, (1, 2, 4, 8)), "resnet18": (32, 16, (1, 2))},
}
MODELS = {"cnn1d": "cnn1d", "cnn": "cnn", "resnet18": "resnet18"}


def image_splits(n: int, source_n: int = 512) -> tuple[Splits, str]:
    """n training images of shape (3, 32, 32), normalized; tiny val/test (evaluation is not timed)."""
    if CIFAR_SUBSET is not None and CIFAR_SUBSET.is_file():
        with np.load(CIFAR_SUBSET) as z:
            x = torch.tensor(z["x_train"]).permute(0, 3, 1, 2).float() / 255.0
            y = torch.tensor(z["y_train"]).long()
        source = "cifar10_subset"
    else:
        g = torch.Generator().manual_seed(0)
        x, y = torch.rand(source_n, 3, 32, 32, generator=g), torch.randint(0, 10, (source_n,), generator=g)
        source = "fixed random tensors"
    x = (x - x.mean(dim=(0, 2, 3), keepdim=True)) / x.std(dim=(0, 2, 3), keepdim=True)
    reps = -(-n // len(x))  # repeat the images when n exceeds them: speed does not depend on which images
    xt, yt = x.repeat(reps, 1, 1, 1)[:n].contiguous(), y.repeat(reps)[:n].contiguous()
    return Splits(name="bench32", x_train=xt, y_train=yt, x_val=x[:256], y_val=y[:256], x_test=x[:256],
                  y_test=y[:256], num_classes=10, input_shape=(3, 32, 32), indices={}, split_hash="bench"), source


def splits_for(setup: str, n: int, data_dir: Path) -> tuple[Splits, str]:
    if setup == "cnn1d":
        s = registry.dataset("mnist1d").load(data_dir)
        reps = -(-n // len(s.x_train))
        return dataclasses.replace(s, x_train=s.x_train.repeat(reps, 1, 1)[:n].contiguous(),
                                   y_train=s.y_train.repeat(reps)[:n].contiguous(),
                                   x_val=s.x_val[:256], y_val=s.y_val[:256], x_test=s.x_test[:256],
                                   y_test=s.y_test[:256]), "mnist1d"
    return image_splits(n)


def train_seconds(history, skip: int) -> float:
    return sum(row["seconds"] for row in history[skip:])


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setups", default="cnn1d,cnn,resnet18")
    p.add_argument("--backends", default="vmap,streams")
    p.add_argument("--ks", help="comma-separated K values (default: per setup, see SIZES)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run; the first is warm-up (default 3)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = str(engine.resolve_device(args.device))
    sizes = SIZES["cuda" if device.startswith("cuda") else "cpu"]
    skip = 1 if args.epochs > 1 else 0
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; baseline method; {args.epochs} epochs per run, "
          f"{skip} warm-up epoch left out; images/s of training (evaluation excluded)")
    data_dir = Path(tempfile.mkdtemp())
    started = time.perf_counter()
    print(f"{'setup':9} {'backend':8} {'K':>2} {'images/s':>10} {'ratio vs K x alone':>19}  (train n, batch)")
    for setup in args.setups.split(","):
        n, batch, ks = sizes[setup]
        if args.ks:
            ks = tuple(int(k) for k in args.ks.split(","))
        splits, source = splits_for(setup, n, data_dir)
        steps = n // min(batch, n)
        base = RunConfig(method="baseline", dataset=splits.name, model=MODELS[setup], epochs=args.epochs,
                         batch_size=batch, optimizer="sgd", lr=0.05, schedule="cosine", seed=0, hparams={},
                         device=device, eval_test=False)
        images = steps * batch * (args.epochs - skip)
        sync(device)
        alone = engine.train(base, splits, registry.build_method("baseline"))
        ips_alone = images / train_seconds(alone.history, skip)
        print(f"{setup:9} {'alone':8} {1:>2} {ips_alone:>10.0f} {1.0:>19.2f}  ({n}, {batch}; {source})", flush=True)
        for backend in args.backends.split(","):
            for k in ks:
                configs = [base.replace(seed=s) for s in range(k)]
                sync(device)
                results = engine.train_group(configs, splits, lambda c: registry.build_method("baseline"),
                                             backend=backend)
                wall = train_seconds(results[0].history, skip) * k  # a seed's seconds are its share (wall / K)
                ips = k * images / wall
                print(f"{setup:9} {backend:8} {k:>2} {ips:>10.0f} {ips / ips_alone:>19.2f}", flush=True)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    print(f"total benchmark time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
