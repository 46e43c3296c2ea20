"""`shade-cifar`: SHADE paper (seed 002, Blot et al., ICIP 2018) §3.1, Table 1 — CIFAR-10 test accuracy of an MLP, an
AlexNet-like net and a ResNet with no regularizer, weight decay, dropout, SHADE and SHADE + dropout.

The paper "cross-validated the regularization parameters ... for each method" (§3.1); here every method is tuned by
the harness's protocol under the same budget (regbench/protocol.py: TPE over the method's declared search space,
``TRIALS`` trials each, selected on the validation split, then rerun over seeds; baseline has nothing to tune), one
benchmark per architecture in ``OUT/shade-cifar-store``, finals read back from the store. Shift accuracy on
CIFAR-10-C (official when present, else ``cifar10_c_style``) is reported as an extra column: the paper has none.

Architectures (§3.1, "following [6]" = Zhang et al. 2017): the built-in ``mlp`` with three hidden layers of 512
(Zhang et al.'s "MLP 3×512"); ``shade_alexnet``, defined here after Zhang et al.'s small AlexNet as the paper
describes it (3 conv + 2 fully connected layers: conv 5×5 → ReLU → max-pool ×3, then FC 384 → FC 192 → classifier;
no batch norm, no local response normalization); timm ``resnet18`` with the CIFAR stem (the paper's ResNet "from
[20]" is not specified further). Not stated by the paper, so chosen here and printed in the report: momentum SGD
0.9 (the paper: "momentum SGD, same protocol as [6]") with lr 0.05, cosine schedule, batch 128, 60 epochs, random
crop + flip of the 32×32 image padded by 4 (the paper crops 28×28 and center-crops at test).
"""
from __future__ import annotations

import shlex
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import timm
from torch import nn

from .common import (
    NOT_COMPARABLE,
    NOT_REPRODUCED,
    REPRODUCED,
    fmt_ci,
    provenance,
    resolve_data_dir,
    table,
    torch_threads,
    verdict,
    write_report,
)
from .ses_cifar import (
    SMOKE_CORRUPTIONS,
    SMOKE_SEVERITIES,
    check_full_mode,
    check_smoke_data,
    paired,
    pick_shift,
    smoke_data,
    smoke_note,
)
from .store_arms import per_seed, run_benchmark, store_dir

NAME = "shade-cifar"
DESCRIPTION = "SHADE Table 1: MLP / AlexNet-like / ResNet-18 on CIFAR-10; none, wd, dropout, SHADE, SHADE+D, tuned"
MIN_SEEDS = 2
NEEDS_DATA = True
SEEDS, SMOKE_SEEDS = 3, 2
TRIALS, SMOKE_TRIALS = 10, 1
METHODS = ("baseline", "weight_decay", "dropout", "shade", "shade+dropout")
LABELS = {"baseline": "No regul.", "weight_decay": "Weight decay", "dropout": "Dropout", "shade": "SHADE",
          "shade+dropout": "SHADE+D"}
ARCHS = {  # label -> (model, model options, smoke model options)
    "MLP": ("mlp", {"widths": [512, 512, 512]}, {"widths": [512, 512, 512]}),
    "AlexNet": ("shade_alexnet", {}, {}),
    "ResNet": ("resnet18", {}, {"channels": [16, 32, 64, 128]}),  # smoke: a quarter width (see ses_cifar.py)
}
FULL = {"epochs": 60, "batch_size": 128, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0,
        "schedule": "cosine", "augment": "crop_flip"}
SMOKE = dict(FULL, epochs=1, batch_size=36)
SMOKE_TRAIN, SMOKE_TEST = 120, 20
# SHADE Table 1 (CIFAR-10 test accuracy, %): architecture -> method -> accuracy (one number each, no seeds given).
PAPER = {
    "MLP": {"baseline": 62.38, "weight_decay": 62.69, "dropout": 65.37, "shade": 66.05, "shade+dropout": 66.12},
    "AlexNet": {"baseline": 83.25, "weight_decay": 83.54, "dropout": 85.95, "shade": 85.45, "shade+dropout": 86.71},
    "ResNet": {"baseline": 89.84, "weight_decay": 91.71, "dropout": 89.94, "shade": 92.15, "shade+dropout": 92.03},
}
PAPER_INCEPTION = {"baseline": 90.97, "weight_decay": 91.87, "dropout": 91.11, "shade": 93.28, "shade+dropout": 92.51}
SAME = 0.3  # a paper difference below this many pp is read as "no difference", not as a direction


class ShadeAlexNet(nn.Module):
    """Zhang et al. (2017)'s small AlexNet as SHADE §3.1 names it: three 5×5/3×3 conv + ReLU + max-pool stages, then two
    fully connected ReLU layers (384, 192) and the classifier. Every ReLU is its own module (SHADE hooks them)."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.0, **_):
        super().__init__()
        c = (64, 64, 128)
        self.features = nn.Sequential(OrderedDict(
            c1=nn.Conv2d(in_chans, c[0], 5, padding=2), relu_c1=nn.ReLU(), pool1=nn.MaxPool2d(3, 2, padding=1),
            c2=nn.Conv2d(c[0], c[1], 5, padding=2), relu_c2=nn.ReLU(), pool2=nn.MaxPool2d(3, 2, padding=1),
            c3=nn.Conv2d(c[1], c[2], 3, padding=1), relu_c3=nn.ReLU(), pool3=nn.MaxPool2d(3, 2, padding=1)))
        self.fc = nn.Sequential(OrderedDict(flatten=nn.Flatten(), f1=nn.Linear(c[2] * 4 * 4, 384), relu_f1=nn.ReLU(),
                                            f2=nn.Linear(384, 192), relu_f2=nn.ReLU()))
        self.head = nn.Linear(192, num_classes)
        self.drop_rate = drop_rate
        # What rule "all" (engine diagnostics, SES) measures on a timm model: its feature_info modules.
        self.feature_info = [{"module": n} for n in ("features.relu_c1", "features.relu_c2", "features.relu_c3",
                                                     "fc.relu_f1", "fc.relu_f2")]

    def get_classifier(self):
        return self.head

    def forward(self, x):
        x = self.fc(self.features(x))
        return self.head(nn.functional.dropout(x, self.drop_rate, self.training) if self.drop_rate else x)


if not timm.is_model("shade_alexnet"):  # registered once, so `create_model("shade_alexnet")` and RunConfig find it
    @timm.models.register_model
    def shade_alexnet(pretrained: bool = False, **kwargs) -> ShadeAlexNet:
        """SHADE §3.1's AlexNet-like CIFAR net (see ShadeAlexNet); no pretrained weights exist."""
        return ShadeAlexNet(**kwargs)


def preflight(smoke: bool = False, data_dir=None) -> None:
    if not smoke:
        check_full_mode(NAME, data_dir, ("cifar10",), need_all=True)
    else:
        check_smoke_data(data_dir)


def run(out_dir, seeds: int | None = None, smoke: bool = False, data_dir=None) -> dict:
    started = time.perf_counter()
    out_dir = Path(out_dir)
    n_seeds = seeds or (SMOKE_SEEDS if smoke else SEEDS)
    trials = SMOKE_TRIALS if smoke else TRIALS
    command = shlex.join(["regbench", "suite", NAME] + (["--seeds", str(seeds)] if seeds else [])
                         + (["--smoke"] if smoke else []))
    recipe = SMOKE if smoke else FULL
    fixed = {m: {} for m in METHODS}
    frames = {}

    def run_all(data, device, shift, corruptions, severities):
        for arch, (model, options, smoke_options) in ARCHS.items():
            frames[arch] = run_benchmark(store_dir(out_dir, NAME), f"{NAME}-{arch.lower()}", "cifar10", model,
                                         fixed, recipe, list(range(n_seeds)), data_dir=data, device=device,
                                         trials=trials, model_kwargs=smoke_options if smoke else options,
                                         shift=shift, corruptions=corruptions, severities=severities,
                                         command=command)

    if smoke:
        with smoke_data(SMOKE_TRAIN, SMOKE_TEST, data_dir) as tmp, torch_threads(1):
            shift = pick_shift("cifar10", tmp, True)
            run_all(tmp, "cpu", shift, SMOKE_CORRUPTIONS, SMOKE_SEVERITIES)
    else:
        data_dir = resolve_data_dir(data_dir)
        check_full_mode(NAME, data_dir, ("cifar10",), need_all=True)
        shift = pick_shift("cifar10", data_dir, False)
        run_all(data_dir, "cuda", shift, None, None)
    rows = [{"arch": arch, "method": m, "seeds": per_seed(f, m, "seed").astype(int),
             "clean": per_seed(f, m, "test_acc"), "shift": per_seed(f, m, "shift_acc"), "gap": per_seed(f, m, "gap"),
             "seconds_per_epoch": per_seed(f, m, "seconds_per_epoch"),
             "hparams": f[f.method == m].iloc[0].config.get("hparams", {})}
            for arch, f in frames.items() for m in METHODS]
    claims = _claims(rows, smoke, recipe["epochs"])
    figure = _figure(out_dir, rows)
    res = {"report": None, "seeds": n_seeds, "trials": trials, "smoke": smoke, "recipe": recipe, "shift": shift,
           "rows": rows, "claims": claims, "figure": figure}
    res["report"] = write_report(out_dir, NAME, _markdown(res, command, time.perf_counter() - started))
    return res


def _get(rows, arch, method):
    return next(r for r in rows if r["arch"] == arch and r["method"] == method)


def _claims(rows, smoke: bool, epochs: int) -> list[dict]:
    """§3.1's claims, one per architecture: the paired difference of test accuracy (pp) over seeds and a verdict."""
    out = []
    checks = [("shade", "baseline", "SHADE improves over no regularization", ("MLP", "AlexNet", "ResNet")),
              ("shade", "weight_decay", "SHADE beats weight decay", ("MLP", "AlexNet", "ResNet")),
              ("shade", "dropout", "SHADE beats dropout except on AlexNet", ("MLP", "AlexNet", "ResNet")),
              ("shade+dropout", "shade", "SHADE+D helps on AlexNet and MLP, not on ResNet", ("MLP", "AlexNet",
                                                                                             "ResNet"))]
    for a, b, text, archs in checks:
        for arch in archs:
            want = PAPER[arch][a] - PAPER[arch][b]
            m, lo, hi = (100 * v for v in paired(_get(rows, arch, a)["clean"], _get(rows, arch, b)["clean"]))
            if abs(want) < SAME:  # the paper's difference is within noise: the claim is "no difference"
                ok = not (np.isfinite(lo) and (lo > 0 or hi < 0))
            else:
                ok = bool(np.isfinite(lo) and (lo > 0 if want > 0 else hi < 0))
            word = smoke_note(SMOKE_TRAIN + SMOKE_TEST, epochs) if smoke else (REPRODUCED if ok else NOT_REPRODUCED)
            out.append({"claim": f"{text} — {arch}: {LABELS[a]} − {LABELS[b]}", "paper": want, "measured": (m, lo, hi),
                        "verdict": word})
    return out


def _markdown(res, command, seconds) -> str:
    rec, n, smoke = res["recipe"], res["seeds"], res["smoke"]
    mode = (f"**Smoke run** on CPU (one thread): {SMOKE_TRAIN} real CIFAR-10 training images (108 train / 12 val) "
            f"and {SMOKE_TEST} test images (the first class-balanced images of the CIFAR-10 files given, written into "
            f"the official `cifar-10-batches-py` layout), {rec['epochs']} epoch, batch {rec['batch_size']}, "
            f"{res['trials']} tuning trial per method; ResNet-18 at a quarter width (channels 16…128); shift = "
            f"`cifar10_c_style` of those test images on {', '.join(SMOKE_CORRUPTIONS)} × severities 1, 3, 5. These "
            "numbers test the pipeline only and are **not comparable** with the paper's."
            if smoke else
            f"Full run on CUDA: the official CIFAR-10 files; shift set `{res['shift']}` (15 corruptions × 5 "
            "severities).")
    lines = [f"# Suite `{NAME}` — SHADE paper §3.1, Table 1 (CIFAR-10)", "", provenance(command, seconds), "", mode, "",
             (f"Setup: architectures MLP 3×512 (built-in `mlp`), AlexNet-like `shade_alexnet` (3 conv + 2 FC, defined "
              "in regbench/suites/shade_cifar.py after Zhang et al. 2017, as the paper describes it), ResNet-18 "
              f"(timm, CIFAR stem). Momentum SGD {rec['momentum']}, lr {rec['lr']}, {rec['schedule']} schedule, "
              f"batch {rec['batch_size']}, {rec['epochs']} epochs, crop + flip (the paper: 28×28 crops; its epochs "
              "and learning rate are not stated — chosen here). No regularizer but the method's own (weight decay 0 "
              f"elsewhere). Every method except the baseline tuned by the harness protocol under the same budget "
              f"({res['trials']} TPE trials each over its declared search space, selected on validation), then "
              f"{n} seeds (0…{n - 1}, paired). Intervals: 95 % Student-t over seeds. Accuracy = final test accuracy "
              "(the paper reports one number per cell). Store: `shade-cifar-store/regbench.db`."), "",
             "## Verdicts", ""]
    for c in res["claims"]:
        m, lo, hi = c["measured"]
        ci = f" [{lo:+.2f}, {hi:+.2f}]" if np.isfinite(lo) else ""
        why = f"paper {c['paper']:+.2f} pp, measured {m:+.2f}{ci} pp (paired over {n} seeds)"
        word = c["verdict"]
        lines.append(f"* {c['claim']}: " + (f"**{NOT_COMPARABLE}** — {word[len(NOT_COMPARABLE) + 1:]}; {why}"
                                            if word.startswith(NOT_COMPARABLE) else verdict(word, why)))
    lines += ["", "## Ours next to the paper's (Table 1)", "",
              ("Clean / shift accuracy (%) and time per epoch (s): mean [95 % CI] over seeds; the selected "
               "hyperparameters are those the tuning picked."), ""]
    body = [[r["arch"], LABELS[r["method"]], f"{PAPER[r['arch']][r['method']]:.2f}", fmt_ci(r["clean"], 2, 100),
             fmt_ci(r["shift"], 2, 100), fmt_ci(r["gap"], 2, 100), fmt_ci(r["seconds_per_epoch"], 2),
             _hp(r["hparams"])] for r in res["rows"]]
    lines.append(table(["architecture", "method", "paper acc", "our clean acc", "our shift acc (not in paper)",
                        "our gap pp", "our s/epoch", "selected hparams"], body))
    lines += ["", "Inception (paper: " + ", ".join(f"{LABELS[m]} {v:.2f}" for m, v in PAPER_INCEPTION.items())
              + ") is not run: the harness has no small Inception.", "", "Per seed:", "",
              table(["architecture", "method", "seed", "clean acc %", "shift acc %", "s/epoch"],
                    [[r["arch"], LABELS[r["method"]], s, f"{100 * c:.2f}", f"{100 * h:.2f}", f"{t:.2f}"]
                     for r in res["rows"] for s, c, h, t in zip(r["seeds"], r["clean"], r["shift"],
                                                               r["seconds_per_epoch"])]),
              "", f"![test accuracy per architecture and method](figures/{res['figure'].name})", ""]
    return "\n".join(lines)


def _hp(hparams: dict) -> str:
    keys = ("strength", "rate", "weight", "shade.weight", "dropout.rate")
    return ", ".join(f"{k}={hparams[k]:.3g}" for k in keys if k in hparams) or "—"


def _figure(out_dir, rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = list(ARCHS)
    fig, axes = plt.subplots(1, len(archs), figsize=(5 * len(archs), 4.2))
    x = np.arange(len(METHODS))
    for ax, arch in zip(axes, archs):
        sel = [_get(rows, arch, m) for m in METHODS]
        mean = [100 * np.mean(r["clean"]) for r in sel]
        ax.bar(x - 0.2, mean, 0.4, label="ours (mean)")
        for i, r in enumerate(sel):
            ax.scatter(np.full(len(r["clean"]), x[i] - 0.2), 100 * np.asarray(r["clean"]), color="k", s=8, zorder=3)
        ax.bar(x + 0.2, [PAPER[arch][m] for m in METHODS], 0.4, label="paper (Table 1)", color="lightgray")
        ax.set_xticks(x, [LABELS[m] for m in METHODS], rotation=20)
        ax.set(title=f"{arch}: CIFAR-10 test accuracy (%)", ylim=(0, 100))
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(out_dir) / "figures" / f"{NAME}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
