"""Time of one training step with and without SES, per eigen path, measured in one process on identical models and data.

Every variant trains its own copy of the same initial model on the same batch through the real
``regbench.engine.train_step`` (real ``ActivationCapture`` / ``ModelContext``). Variants are interleaved step by step,
so machine drift hits all of them alike. Timed steps are grouped in blocks of 5 consecutive steps (so an ``every=5``
variant pays its one SES step per block: its amortised cost); reported: the median over blocks of the mean step time
with its ratio to the baseline's, and the minimum block too (on a shared machine the fastest block is the one least
disturbed by other processes; ``--threads 1`` also helps, as a 2-thread OpenMP region stalls whenever one core is
taken).

Configurations (SES paper Sec. 8 / docs/methods.md §1.3): resnet18 with the CIFAR stem and the paper's 9 hooks
(``stages+pool``) on CPU with a small batch and on CUDA with batch 256 when a GPU is present; the small built-in
nets on CPU (cnn1d on mnist1d, cnn on digits, mlp on mnist1d, batch 128). Variants: ``naive`` = the per-layer loop
(one eigvalsh per layer, autograd through it; what SES did before), ``exact``, ``exact k=5`` (``every=5``),
``lowrank`` and ``hutchinson`` (paper Sec. 5.2) and, for conv nets, ``exact positions`` (conv_reduce=positions).
Afterwards it prints each path's |H − H_exact| on the trained model's real activations (float64 exact reference).

    python benchmarks/ses_overhead.py                  # everything (a few minutes on 2 CPU cores)
    python benchmarks/ses_overhead.py --configs cnn1d,mlp --steps 60
    python benchmarks/ses_overhead.py --configs cnn1d --profile    # where the exact SES step spends its time
"""
from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from regbench.methods.base import Method
from regbench.methods.ses import SES

from regbench import engine, models, registry
from regbench.spectral import as_matrix, eigh_backend, entropies, spectral_entropy


class NaiveSES(SES):
    """SES as it was: one covariance_eigenvalues + entropy per layer in a Python loop, autograd through eigvalsh."""

    def loss(self, step):
        beta, total = self.hparams["beta"], None
        for key in self.keys:
            h = as_matrix(step.activations[key], self.hparams["conv_reduce"])
            term = (spectral_entropy(h) - beta * math.log(h.shape[1])) ** 2
            total = term if total is None else total + term
        return self.hparams["lam"] * total


VARIANTS = {  # name -> (class, hparams); hparams["layers"] is filled per config
    "baseline": (Method, None),
    "naive": (NaiveSES, {}),
    "exact": (SES, {}),
    "exact k=5": (SES, {"every": 5}),
    "lowrank": (SES, {"eigen_path": "lowrank"}),
    "hutchinson": (SES, {"eigen_path": "hutchinson"}),
    "exact positions": (SES, {"conv_reduce": "positions"}),
}


def load_data(dataset: str, shape, n: int, data_dir: str):
    """n real samples (mnist1d / digits, as the benchmarks use them) reshaped to `shape`; random if unavailable."""
    try:
        splits = registry.dataset(dataset).load(Path(data_dir))
        x, y = splits.x_train[:n].float(), splits.y_train[:n]
        if tuple(shape) == (1, 8, 8):
            x = F.adaptive_avg_pool2d(x.mean(1, keepdim=True), 8)
        x = x.reshape(len(x), *shape)
        if len(x) == n:
            return x, y
    except (OSError, RuntimeError, ValueError) as e:  # offline without cached data: timing needs no real values
        print(f"  ({dataset} unavailable: {e}; random inputs)")
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g)


class Runner:
    """One variant: its model, capture, optimizer, and the train_step call, as engine.train sets them up on
    ``device`` (engine.fast_step: on CUDA bf16 autocast or fp16 + GradScaler, channels-last, fused SGD)."""

    def __init__(self, model_name, shape, layers, variant, device):
        cls, hp = VARIANTS[variant]
        self.method = cls() if hp is None else cls({**hp, "layers": layers})
        self.fast = engine.fast_step(device, shape)
        torch.manual_seed(0)
        self.model = models.create_model(model_name, 10, shape).to(device)
        if self.fast.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.capture = engine.ActivationCapture(self.model)
        self.method.attach(self.model, engine.ModelContext(self.model, self.capture, 10, shape))
        self.capture.wanted = set(self.capture.keys())
        fused = {"fused": True} if device.type == "cuda" else {}  # as engine.build_optimizer
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, **fused)
        self.device, self.step = device, 0

    def __call__(self, x, y):
        engine.train_step(self.model, self.method, self.capture, self.optimizer, x, y, step=self.step,
                          autocast=self.fast.autocast, dtype=self.fast.dtype, scaler=self.fast.scaler)
        self.step += 1


BLOCK = 5  # steps per timing block: one full cycle of the every=5 variant


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_config(label, model_name, shape, layers, batch, device, variants, steps, warmup, data_dir):
    dataset = "digits" if len(shape) == 3 else "mnist1d"
    x, y = load_data(dataset, shape, batch, data_dir)
    x, y = x.to(device), y.to(device)
    conv = model_name != "mlp"
    names = [v for v in variants if conv or v != "exact positions"]
    runners = {v: Runner(model_name, shape, layers, v, device) for v in names}
    if runners["baseline"].fast.channels_last:  # the batches engine.train feeds on CUDA (device_data.py)
        x = x.contiguous(memory_format=torch.channels_last)
    wall = {v: [] for v in names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SES's unreachable-target notice at small batches
        for i in range(warmup + steps):
            for v in names:
                sync(device)
                w0 = time.perf_counter()
                runners[v](x, y)
                sync(device)
                if i >= warmup:
                    wall[v].append(time.perf_counter() - w0)
    n_hooks = len(runners[names[1]].method.keys) if len(names) > 1 else 0
    fast = runners["baseline"].fast
    step_kind = (f"{str(fast.dtype).removeprefix('torch.')} autocast{' + GradScaler' if fast.scaler else ''}"
                 f"{', channels_last' if fast.channels_last else ''}, fused SGD" if fast.autocast else "float32")
    print(f"\n{label}: {model_name} {tuple(shape)}, batch {batch}, layers {layers!r} ({n_hooks} hooks), {device} "
          f"({step_kind}), "
          f"{steps} timed steps after {warmup} warm-up, ms per step (mean over blocks of {BLOCK})")
    print(f"  {'variant':<17}{'median':>10}{'overhead':>10}{'min':>10}{'overhead':>10}")
    blocks = {v: [statistics.fmean(t[i:i + BLOCK]) for i in range(0, len(t), BLOCK)] for v, t in wall.items()}
    base_med, base_min = statistics.median(blocks["baseline"]), min(blocks["baseline"])
    rows = {}
    for v in names:
        med, low = statistics.median(blocks[v]), min(blocks[v])
        rows[v] = med / base_med - 1
        print(f"  {v:<17}{med * 1e3:>10.2f}{(med / base_med - 1) * 100:>+9.1f}%{low * 1e3:>10.2f}"
              f"{(low / base_min - 1) * 100:>+9.1f}%")
    return runners, x, y, rows


def approximation_errors(runners, x):
    """|H_path − H_exact(float64)| per hooked layer on the trained exact-variant model's real activations."""
    r = runners["exact"]
    r.model.train()
    r.capture.active = True
    with torch.no_grad():
        r.model(x)
    r.capture.active = False
    mats = [as_matrix(r.capture.store[k], r.method.hparams["conv_reduce"]) for k in r.method.keys]
    r.capture.clear()
    with torch.no_grad():
        ref, valid = entropies([m.double() for m in mats])
        gen = torch.Generator(device=x.device).manual_seed(0)
        backend = eigh_backend(x.device)
        out = {f"exact ({backend}, default)": entropies([m.float() for m in mats])[0].double(),
               "exact fp32 Gram": entropies([m.float() for m in mats], wide=False)[0].double(),
               "exact fp64 Gram": entropies([m.float() for m in mats], wide=True)[0].double()}
        for path, kw in [("lowrank", {}), ("lowrank rank=64", {"rank": 64}), ("hutchinson", {}),
                         ("hutchinson 64x64", {"probes": 64, "degree": 64})]:
            out[path] = entropies(mats, path.split()[0], generator=gen, **kw)[0].double()
    dims = ", ".join(f"{m.shape[0]}x{m.shape[1]}" for m in mats)
    print(f"  |H − H_exact(fp64)| over {len(mats)} layers [{dims}], H_exact range "
          f"{ref[valid].min():.3f}…{ref[valid].max():.3f}:")
    for path, h in out.items():
        diff = (h - ref)[valid]
        print(f"    {path:<24} max {diff.abs().max():.2e}   mean {diff.abs().mean():.2e}   "
              f"(mean signed {diff.mean():+.2e})")


def profile_exact(runners, x, y, device):
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for name in ("baseline", "exact"):
        with profile(activities=acts) as prof:
            for _ in range(10):
                runners[name](x, y)
            sync(device)
        print(f"\n  profile, {name}, 10 steps:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


TARGETS = {"cnn1d cpu": "≤ 15 %", "resnet18 cuda": "≤ 5 %"}  # issue 18: exact SES overhead per step

CONFIGS = {  # name -> (model, input shape, layer rule, CPU batch)
    "resnet18": ("resnet18", (3, 32, 32), "stages+pool", 32),
    "cnn1d": ("cnn1d", (1, 40), "auto", 128),
    "cnn": ("cnn", (1, 8, 8), "auto", 128),
    "cnn32": ("cnn", (3, 32, 32), "auto", 128),
    "mlp": ("mlp", (1, 40), "auto", 128),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="cnn1d,cnn,cnn32,mlp,resnet18", help=f"from: {', '.join(CONFIGS)}")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--steps", type=int, default=40, help="timed steps per variant (resnet18 on CPU: a quarter)")
    p.add_argument("--warmup", type=int, default=BLOCK)
    p.add_argument("--resnet-cpu-batch", type=int, default=32)
    p.add_argument("--cuda-batch", type=int, default=256)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--no-cuda", action="store_true")
    p.add_argument("--profile", action="store_true", help="torch.profiler table of baseline and exact SES steps")
    p.add_argument("--data-dir", default=str(Path(tempfile.gettempdir()) / "regbench-bench-data"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = ["baseline"] + [v for v in args.variants.split(",") if v and v != "baseline"]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"CUDA: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    summary = []
    cpu = torch.device("cpu")
    for name in args.configs.split(","):
        model, shape, layers, batch = CONFIGS[name]
        if name == "resnet18":
            batch = args.resnet_cpu_batch
        steps = max(args.steps // 4, BLOCK) if name == "resnet18" else args.steps
        steps = -(-steps // BLOCK) * BLOCK
        runners, x, y, rows = time_config(name, model, shape, layers, batch, cpu, variants, steps, args.warmup,
                                          args.data_dir)
        summary.append((f"{name} cpu b{batch}", rows))
        if "exact" in runners:
            approximation_errors(runners, x)
            if args.profile:
                profile_exact(runners, x, y, cpu)
    if torch.cuda.is_available() and not args.no_cuda and "resnet18" in args.configs.split(","):
        model, shape, layers, _ = CONFIGS["resnet18"]
        gpu = torch.device("cuda")
        runners, x, _y, rows = time_config("resnet18 (paper config)", model, shape, layers, args.cuda_batch, gpu,
                                       variants, args.steps, args.warmup, args.data_dir)
        summary.append((f"resnet18 cuda b{args.cuda_batch}", rows))
        approximation_errors(runners, x)
    print(f"\noverhead vs baseline (wall clock, median over blocks of {BLOCK} steps); targets (issue 18): exact SES "
          "≤ 5 % on the GPU at the paper config (resnet18, B = 256, 9 hooks, bf16), ≤ 15 % on the CPU on cnn1d:")
    names = [v for v in variants if v != "baseline"]
    print(f"  {'config':<22}" + "".join(f"{v:>17}" for v in names) + f"{'exact target':>14}")
    for label, rows in summary:
        target = TARGETS.get(label.split(" b")[0], "")  # only the paper config (GPU) and cnn1d (CPU) have one
        print(f"  {label:<22}" + "".join(f"{rows[v] * 100:>+16.1f}%" if v in rows else f"{'-':>17}" for v in names)
              + f"{target:>14}")


if __name__ == "__main__":
    main()
