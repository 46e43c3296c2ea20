"""Wall time of one dataset's table of the `ses-cifar` recipe, through the product's own training path (issue 19, item 4).

The table: timm ResNet-18 with the CIFAR stem, the four arms of ``regbench.suites.ses_cifar`` (baseline, SES,
spectral norm, SES+SN, with that suite's hyperparameters: λ 0.01, β 0.7 on the 9 hooks `stages+pool`), × 3 seeds ×
50 epochs × 50,000 training images per epoch (batch 256, drop_last: 195 steps, 9,750 per run), SGD 0.1 / momentum 0.9
/ wd 5e-4, multistep LR, crop+flip: the suite's ``FULL`` recipe, unchanged but for ``--epochs``.

Data: the real CIFAR-10 images of the ``cifar10_subset.npz`` named by $REGBENCH_CIFAR10_SUBSET (described in
regbench/suites/cifar_subset.py; the repository ships no copy), written into the official layout and read by regbench's CIFAR-10
reader (normalization, uint8 pixels for the device-resident split, crop+flip), then each split tiled by repetition:
train to ``--images-per-epoch``, validation and test to a tenth and a fifth of it (CIFAR-10's 5,000 / 10,000 next to
50,000), so each epoch's evaluation (train, val and test accuracy, ECE, erank probes) costs what it costs on CIFAR-10.
Speed does not depend on which images repeat. The CIFAR-C evaluation after training is not part of the table timed.

Each arm is one benchmark of the harness's protocol (an Optuna store in a temporary folder, 0 tuning trials, one final
trial per seed), run by ``commands.work`` as ``regbench suite ses-cifar`` / ``regbench run`` run it, with
``--parallel-seeds`` passed through to the protocol (seeds of an arm trained as one group). So the time is what a
user gets: model building, device data, the training loop (bf16 autocast, channels-last and fused SGD on CUDA, chosen
by the engine), per-epoch evaluation and the store's writes.

Printed: per arm the wall time, images/s over that wall time (evaluation and store included) and images/s of the
training loop alone (the runs' per-epoch ``seconds``); the wall time of the whole table next to the issue's target
(≤ 10 min on one H200) and its estimate (85 min); and, for a shortened table, the full table's time projected from
the measured per-arm rates.

    python benchmarks/paper_table.py --device cuda                              # the full table (one H200: the issue)
    python benchmarks/paper_table.py --device cuda --parallel-seeds 3
    python benchmarks/paper_table.py --device cpu --epochs 1 --seeds 1 --images-per-epoch 512   # a shortened check
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from regbench import commands, engine, protocol, report
from regbench.config import RunConfig
from regbench.datasets.cifar import CIFAR10
from regbench.store import OutputLock, default_storage_url, load_spec, open_storage
from regbench.suites import ses_cifar
from regbench.suites.cifar_subset import ENV, layout_md5s, write_cifar10_layout

FULL_IMAGES, FULL_SEEDS = 50_000, 3
TARGET_MIN, ESTIMATE_MIN = 10, 85  # issue 19: target on one H200; its estimate from today's step costs
ESTIMATE_NOTE = "9,750 steps per run at 10.0 / 54 / 24.5 / 68 ms for baseline / SES / SN / SES+SN"


def tile(x: torch.Tensor, n: int) -> torch.Tensor:
    """The rows of ``x`` repeated in order until there are ``n``."""
    reps = -(-n // len(x))
    return x.repeat(reps, *([1] * (x.dim() - 1)))[:n].contiguous()


def table_splits(subset: Path, root: Path, images: int):
    """The subset read through regbench's CIFAR-10 reader, each split tiled to the table's size (see the docstring)."""
    splits = CIFAR10(md5s=layout_md5s(write_cifar10_layout(root, subset=subset))).load(root)
    n_val, n_test = max(1, images // 10), max(1, images // 5)
    return dataclasses.replace(
        splits, x_train=tile(splits.x_train, images), y_train=tile(splits.y_train, images),
        x_train_u8=None if splits.x_train_u8 is None else tile(splits.x_train_u8, images),
        x_val=tile(splits.x_val, n_val), y_val=tile(splits.y_val, n_val),
        x_test=tile(splits.x_test, n_test), y_test=tile(splits.y_test, n_test))


def run_arm(out: Path, arm: str, base: RunConfig, seeds: list[int], splits, parallel_seeds: int):
    """One arm as a benchmark of the protocol in its own store; returns (wall seconds, its final runs' frame)."""
    bench = protocol.Benchmark(name=f"paper-table-{arm.replace('+', '-')}", base=base,
                            fixed={arm: dict(ses_cifar.METHODS[arm])}, seeds=seeds,
                            protocol=protocol.TuningRules(trials=0), command="benchmarks/paper_table.py")
    protocol.check_search_spaces(bench)
    if out.exists() and any(out.iterdir()):  # the protocol would resume a store's finished runs: nothing timed
        sys.exit(f"{out} is not empty (a store there would be resumed, not timed); give an empty --out")
    out.mkdir(parents=True, exist_ok=True)
    with OutputLock(out):
        storage = open_storage(default_storage_url(out))
        protocol.save_spec(storage, bench)
        sync(base.device)
        started = time.perf_counter()
        commands.work(storage, bench, splits, None, parallel_seeds=parallel_seeds)
        sync(base.device)
        wall = time.perf_counter() - started
        frame = report.runs_frame(storage, bench.name, load_spec(storage, bench.name))
    if len(frame) != len(seeds):
        sys.exit(f"arm {arm}: {len(frame)} of {len(seeds)} runs finished (a failed run is in {out}); no timing")
    return wall, frame


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--epochs", type=int, default=ses_cifar.FULL["epochs"], help="epochs per run (default 50)")
    p.add_argument("--seeds", type=int, default=FULL_SEEDS, help="seeds per arm (default 3)")
    p.add_argument("--images-per-epoch", type=int, default=FULL_IMAGES, help="training images per epoch "
                   "(default 50,000; validation and test get a tenth and a fifth of it)")
    p.add_argument("--arms", default=",".join(ses_cifar.METHODS), help="comma-separated arms of ses-cifar "
                   f"(default all: {','.join(ses_cifar.METHODS)})")
    p.add_argument("--parallel-seeds", type=int, default=1, help="seeds of an arm trained together (as `regbench "
                   "run --parallel-seeds`; default 1)")
    p.add_argument("--model-kwargs", default="", help="timm options for resnet18, e.g. channels=16,32,64,128 (a "
                   "narrower net for quick checks; default: none, the paper's net)")
    p.add_argument("--train-acc-sample", type=int, default=None, metavar="N",
                   help="train accuracy on a fixed sample of N training images (as `regbench run "
                        "--train-acc-sample`; default: the whole split, as the paper's gap)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--out", help="folder for the stores (default: a temporary one, removed after)")
    args = p.parse_args(argv)
    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ses_cifar.METHODS]
    if unknown or not arms:
        p.error(f"unknown arm(s) {unknown}; choose from {', '.join(ses_cifar.METHODS)}")
    for name in ("epochs", "seeds", "images_per_epoch", "parallel_seeds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.parallel_seeds > args.seeds:
        p.error(f"--parallel-seeds {args.parallel_seeds} is more than --seeds {args.seeds}")
    if not os.environ.get(ENV):
        p.error(f"no CIFAR-10 subset named: set {ENV} to a cifar10_subset.npz")
    subset = Path(os.environ[ENV])
    if not subset.is_file():
        p.error(f"no CIFAR-10 subset at {subset}; set {ENV} to a cifar10_subset.npz")
    if args.threads:
        torch.set_num_threads(args.threads)
    model_kwargs = {}
    if args.model_kwargs:
        key, _, value = args.model_kwargs.partition("=")
        model_kwargs[key] = [int(v) for v in value.split(",")]
    device = str(engine.resolve_device(args.device))
    recipe = dict(ses_cifar.FULL, epochs=args.epochs)
    augment = recipe.pop("augment")
    cuda = device.startswith("cuda")
    where = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} torch threads"
    fast = engine.fast_step(torch.device(device), (3, 32, 32))
    print(f"`{shlex.join(['benchmarks/paper_table.py'] + list(sys.argv[1:] if argv is None else argv))}`")
    print(f"torch {torch.__version__}, {where}; ses-cifar recipe (suite {ses_cifar.NAME}): resnet18 CIFAR stem"
          f"{f' {model_kwargs}' if model_kwargs else ''}, {', '.join(f'{k} {v}' for k, v in recipe.items())}, "
          f"augment {augment}; engine: "
          + (f"{str(fast.dtype).removeprefix('torch.')} autocast" if fast.autocast else "float32")
          + (", channels_last" if fast.channels_last else ""))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="regbench-paper-table-") as tmp:
        out = Path(args.out) if args.out else Path(tmp)
        splits = table_splits(subset, Path(tmp) / "data", args.images_per_epoch)
        if splits.augment != augment:
            sys.exit(f"the CIFAR-10 reader gave augment {splits.augment!r}, the recipe asks for {augment!r}")
        base = RunConfig(method="baseline", dataset="cifar10", model="resnet18", model_kwargs=model_kwargs,
                         augment=splits.augment, split_hash=splits.split_hash, device=device,
                         train_acc_sample=args.train_acc_sample, **recipe)
        batch = min(base.batch_size, len(splits.x_train))
        trained = (len(splits.x_train) // batch) * batch * args.epochs  # per run (drop_last)
        print(f"data: {subset.name} tiled to {len(splits.x_train)} train / {len(splits.x_val)} val / "
              f"{len(splits.x_test)} test images; {len(splits.x_train) // batch} steps per epoch; {len(arms)} arm(s) × "
              f"{args.seeds} seed(s) × {args.epochs} epoch(s), parallel seeds {args.parallel_seeds}", flush=True)
        rows = []
        for arm in arms:
            wall, frame = run_arm(out / arm, arm, base, list(range(args.seeds)), splits, args.parallel_seeds)
            train_s = sum(row["seconds"] for hist in frame.history for row in hist)
            rows.append((arm, wall, args.seeds * trained / wall, args.seeds * trained / train_s))
        total = time.perf_counter() - started
    print(f"\n{'arm':<20}{'wall s':>10}{'img/s (all)':>14}{'img/s (train loop)':>20}")
    for arm, wall, rate, train_rate in rows:
        print(f"{arm:<20}{wall:>10.1f}{rate:>14.1f}{train_rate:>20.1f}")
    print(f"\nwhole table: {total:.1f} s = {total / 60:.2f} min wall ({len(arms)} arm(s), data preparation included)"
          f"\nissue 19: target ≤ {TARGET_MIN} min on one H200; estimate before it {ESTIMATE_MIN} min ({ESTIMATE_NOTE})")
    full = FULL_SEEDS * ses_cifar.FULL["epochs"] * (FULL_IMAGES // ses_cifar.FULL["batch_size"]) \
        * ses_cifar.FULL["batch_size"]
    if (args.epochs, args.seeds, args.images_per_epoch, len(arms)) != (ses_cifar.FULL["epochs"], FULL_SEEDS,
                                                                       FULL_IMAGES, len(ses_cifar.METHODS)):
        projected = sum(full / rate for _arm, _wall, rate, _train in rows) / 60
        print(f"shortened table: the full one ({len(ses_cifar.METHODS)} arms × {FULL_SEEDS} seeds × "
              f"{ses_cifar.FULL['epochs']} epochs × {FULL_IMAGES:,} images) projected from these per-arm rates"
              f"{'' if len(arms) == len(ses_cifar.METHODS) else ' (arms run here only)'}: {projected:.1f} min "
              f"(warm-up and model width as measured here)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
