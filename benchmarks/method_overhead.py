"""Step-time overhead of every registered method over `baseline`, measured in one run through the real engine.

Each method trains the same model on the same data for a few epochs; the engine's own per-epoch timer covers only
the training steps (not evaluation). Methods are interleaved over rounds so machine drift hits all of them alike,
and the median seconds/epoch is reported with its ratio to baseline's.

    python benchmarks/method_overhead.py                          # mnist1d + cnn1d (the default benchmark)
    python benchmarks/method_overhead.py --dataset digits --model resnet18 --train-size 256 --batch-size 64
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from regbench import engine, registry
from regbench.config import GENERIC_RECIPE, RECIPES, RunConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="mnist1d")
    p.add_argument("--model")
    p.add_argument("--methods", default=",".join(registry.method_names()))
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--train-size", type=int)
    p.add_argument("--device", default="auto")
    p.add_argument("--data-dir", default=str(Path(tempfile.gettempdir()) / "regbench-bench-data"))
    args = p.parse_args()

    ds = registry.dataset(args.dataset)
    splits = ds.load(Path(args.data_dir), train_size=args.train_size)
    recipe = {**GENERIC_RECIPE, **RECIPES.get(args.dataset, {}), "epochs": args.epochs}
    if args.batch_size:
        recipe["batch_size"] = args.batch_size
    methods = ["baseline"] + [m for m in args.methods.split(",") if m and m != "baseline"]
    times: dict[str, list[float]] = {m: [] for m in methods}
    for round_ in range(args.rounds):
        for m in methods:
            cfg = RunConfig(method=m, dataset=args.dataset, model=args.model or ds.default_model, seed=round_,
                            hparams=registry.method_class(m).resolve({}), device=args.device, eval_test=False,
                            train_size=args.train_size, **recipe)
            result = engine.train(cfg, splits, registry.build_method(m))
            times[m] += [row["seconds"] for row in result.history[1:] or result.history]  # skip warm-up epoch
    device = engine.resolve_device(args.device)
    print(f"dataset {args.dataset}, model {args.model or ds.default_model}, batch {recipe['batch_size']}, "
          f"{len(splits.y_train)} train samples, device {device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds × {args.epochs} epochs")
    base = statistics.median(times["baseline"])
    print(f"{'method':<16}{'s/epoch (median)':>18}{'overhead vs baseline':>24}")
    for m in methods:
        med = statistics.median(times[m])
        print(f"{m:<16}{med:>18.4f}{(med / base - 1) * 100:>+23.1f}%")


if __name__ == "__main__":
    main()
