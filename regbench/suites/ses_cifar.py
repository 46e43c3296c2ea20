"""`ses-cifar`: SES paper (seed 000) §8, Tables 2, 3, 5 and 7 — ResNet-18 on CIFAR, baseline / SES / SN / SES+SN.

The paper's protocol (§8 preamble, §8.5): timm ``resnet18`` with the CIFAR stem (3×3 first conv, no max-pool; applied
by ``models.create_model`` for 32×32 inputs), SGD lr 0.1, momentum 0.9, weight decay 5e-4 for every arm, multistep
LR (here ×0.1 at 50 % and 75 % of training: the paper does not give its milestones), batch 256, 50 epochs (Tables 2,
3), SES on all 8 residual blocks + the average pool (9 hooks, layer rule ``stages+pool``) with λ = 0.01, β = 0.7.
Arms: baseline, SES, spectral norm (Table 5; defaults of methods/spectral_norm.py: every Conv/Linear, one power
iteration) and SES+SN. Nothing is tuned: the paper fixes every hyperparameter, so the protocol runs with 0 trials.

Every run goes through the harness's protocol (regbench/protocol.py and regbench/runner.py: one Optuna trial per run in ``OUT/ses-cifar-store``,
finals over seeds, read back from the store), exactly as ``regbench run`` builds it (run.run_command), with the
shift set of each dataset evaluated after training: official CIFAR-10-C / CIFAR-100-C when present, else the
``*_c_style`` set generated from the test split (the report says which). Full mode needs a CUDA GPU and the official
CIFAR files; ``--smoke`` runs the same pipeline on CPU on real CIFAR-10 images from the shared subset
(regbench/suites/cifar_subset.py), with ``cifar10_c_style`` cut to 5 corruptions × severities 1, 3, 5 (the paper's
Exp. 3 grid; its five corruption types are not named, so ours are chosen) and a few hundred images.

The helpers here (preflight, smoke data) are shared with ``shade-cifar``; both run their arms through
regbench/suites/store_arms.py.
"""
from __future__ import annotations

import shlex
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from regbench.errors import ConfigError, DataError
from regbench.stats import t_interval

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
from .store_arms import per_seed, run_benchmark, store_dir

NAME = "ses-cifar"
DESCRIPTION = "SES §8 Tables 2-3, 5, 7: ResNet-18 on CIFAR-10/100, baseline / SES / SN / SES+SN, clean + CIFAR-C"
MIN_SEEDS = 2
NEEDS_DATA = True  # run_suite passes data_dir and calls preflight() before anything is written
SEEDS, SMOKE_SEEDS = 3, 2  # the paper: 3 seeds (42, 123, 7); ours 0..N-1, paired across arms
DATASETS = ("cifar10", "cifar100")
SHIFT = {"cifar10": "cifar10_c", "cifar100": "cifar100_c"}
METHODS = {  # arm -> hparams fixed as the paper states them (Table 5 names)
    "baseline": {},
    "ses": {"lam": 0.01, "beta": 0.7, "layers": "stages+pool"},
    "spectral_norm": {},
    "ses+spectral_norm": {"ses.lam": 0.01, "ses.beta": 0.7, "ses.layers": "stages+pool"},
}
LABELS = {"baseline": "Baseline", "ses": "SES", "spectral_norm": "Spectral Norm", "ses+spectral_norm": "SES + SN"}
FULL = {"epochs": 50, "batch_size": 256, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
        "schedule": "multistep", "augment": "crop_flip"}
SMOKE = dict(FULL, epochs=1, batch_size=36)  # 36 ≥ the 30-dim erank target of the 128-wide pool (no cap warning)
SMOKE_TRAIN, SMOKE_TEST = 120, 20  # images written from the shared subset (train = 108 train + 12 val)
# The smoke ResNet-18 is timm's resnet18 (same blocks, stem, hooks) at a quarter of the width: full width costs
# ~2.3 s per 36-image step on this shared 2-core box (measured), a quarter ~0.4 s.
SMOKE_MODEL = {"channels": [16, 32, 64, 128]}
SMOKE_CORRUPTIONS = ("gaussian_noise", "defocus_blur", "fog", "brightness", "contrast")
SMOKE_SEVERITIES = (1, 3, 5)

# The paper's numbers (mean ± std over 3 seeds, or one seed where marked), in percent / pp / seconds.
PAPER = {
    ("cifar10", "baseline"): {"acc": "93.43 ± 0.10", "gap": "6.56 ± 0.12", "corr": "68.22 ± 0.60", "table": "2"},
    ("cifar10", "ses"): {"acc": "93.37 ± 0.23", "gap": "6.57 ± 0.21", "corr": "68.67 ± 0.26", "table": "2"},
    ("cifar100", "baseline"): {"acc": "74.31 ± 0.26", "gap": "25.60 ± 0.31", "corr": "45.97 ± 0.09", "table": "3"},
    ("cifar100", "ses"): {"acc": "74.78 ± 0.10", "gap": "25.27 ± 0.14", "corr": "46.62 ± 0.13", "table": "3"},
    ("cifar100", "spectral_norm"): {"acc": "74.55", "gap": "25.28", "corr": "45.89", "table": "5 (seed 42)"},
    ("cifar100", "ses+spectral_norm"): {"acc": "74.46", "gap": "25.37", "corr": "46.23", "table": "5 (seed 42)"},
}
PAPER_TIME = {"baseline": "28.9 s", "ses": "42.5 s (+47.1 %)"}  # Table 7, batch 256, one T4
PAPER_OVERHEAD = 0.471


# --- shared with shade-cifar: preflight, data, protocol --------------------------------------------------------------

def check_full_mode(suite: str, data_dir, datasets=("cifar10",), need_all: bool = False) -> list[str]:
    """The datasets of ``datasets`` whose official files are in ``data_dir``; raises ONE line when there is no CUDA GPU
    or no usable dataset (``need_all``: every one must be there). Reads nothing but file names, writes nothing."""
    import torch

    from regbench.datasets import catalog, cifar

    data_dir = resolve_data_dir(data_dir)
    present = [d for d in datasets if catalog.status(d, data_dir).state == "present"]
    missing = [d for d in datasets if d not in present]
    problems = []
    if not torch.cuda.is_available():
        problems.append("a CUDA GPU (torch.cuda.is_available() is False here)")
    if missing and (need_all or not present):
        gets = "; ".join(f"{d}: `regbench data prepare {d} --data-dir {data_dir}` or put "
                         f"{cifar.SPECS[d]['archive']} from {cifar.SPECS[d]['url']} there"
                         for d in missing)
        problems.append(f"the official {' and '.join(missing)} files in {data_dir} ({gets})")
    if problems:
        error = ConfigError if not torch.cuda.is_available() else DataError
        raise error(f"suite {suite} (full mode) needs {' and '.join(problems)}; pass --data-dir DIR for files kept "
                    f"elsewhere, or run `regbench suite {suite} --smoke` for the CPU smoke form")
    return present


def check_smoke_data(data_dir) -> str:
    """Where a smoke run's images come from: "files" (the user's CIFAR-10 in ``data_dir``) or "subset"
    ($REGBENCH_CIFAR10_SUBSET); neither: the one-line missing-data error. Looks at file names only, writes nothing."""
    from regbench.datasets import catalog, cifar

    from .cifar_subset import ENV, SUBSET

    data_dir = resolve_data_dir(data_dir)
    if catalog.status("cifar10", data_dir).state == "present":
        return "files"
    if SUBSET is not None:
        return "subset"
    spec = cifar.SPECS["cifar10"]
    raise DataError(f"missing CIFAR-10 in {data_dir}: download it with `regbench data prepare cifar10 --data-dir "
                    f"{data_dir}` (or put {spec['archive']} from {spec['url']} there), or pass --data-dir DIR "
                    f"where it is ({ENV} names a cifar10_subset.npz instead, for tests)")


@contextmanager
def smoke_data(n_train: int, n_test: int, data_dir=None):
    """A temporary data dir holding the first ``n_train``/``n_test`` class-balanced images of the user's CIFAR-10
    files in ``data_dir`` (read and md5-checked by the CIFAR reader) in the official layout, with the reader's md5
    table pointed at them for the duration; removed afterwards (smoke data is never cached). Without those files:
    the subset named by $REGBENCH_CIFAR10_SUBSET when set (tests), else the one-line missing-data error."""
    from .cifar_subset import official_arrays, official_md5s_for, write_cifar10_layout

    data_dir = resolve_data_dir(data_dir)
    arrays = official_arrays(data_dir) if check_smoke_data(data_dir) == "files" else None
    with tempfile.TemporaryDirectory(prefix="regbench-smoke-") as tmp:
        root = write_cifar10_layout(tmp, n_train=n_train, n_test=n_test, arrays=arrays)
        with official_md5s_for(root):
            yield Path(tmp)


def pick_shift(dataset: str, data_dir, smoke: bool) -> str:
    """Official CIFAR-C when its files are there (never in smoke form), else the set generated from the test split."""
    from regbench.datasets import catalog

    official = SHIFT[dataset]
    if not smoke and catalog.status(official, Path(data_dir)).state == "present":
        return official
    return f"{official}_style"


def best_test(frame, method: str) -> np.ndarray:
    """Best test accuracy over epochs per seed (the paper's "best test acc"; each epoch's test_acc is in history)."""
    rows = frame[frame.method == method].sort_values("seed")
    return np.array([max(h["test_acc"] for h in hist) for hist in rows.history])


def paired(a, b) -> tuple[float, float, float]:
    """Mean and 95 % t-interval of the per-seed differences a − b (same seeds: paired)."""
    return t_interval(np.asarray(a, dtype=float) - np.asarray(b, dtype=float))


def smoke_note(n_images: int, epochs: int) -> str:
    return f"not comparable (smoke run: {n_images} images, {epochs} epoch{'s' if epochs != 1 else ''})"


# --- the suite ---------------------------------------------------------------------------------------------------------

def preflight(smoke: bool = False, data_dir=None) -> None:
    if not smoke:
        check_full_mode(NAME, data_dir, DATASETS)
    else:
        check_smoke_data(data_dir)


def run(out_dir, seeds: int | None = None, smoke: bool = False, data_dir=None) -> dict:
    started = time.perf_counter()
    out_dir = Path(out_dir)
    n_seeds = seeds or (SMOKE_SEEDS if smoke else SEEDS)
    command = shlex.join(["regbench", "suite", NAME] + (["--seeds", str(seeds)] if seeds else [])
                         + (["--smoke"] if smoke else []))
    recipe = SMOKE if smoke else FULL
    results = {}
    if smoke:
        with smoke_data(SMOKE_TRAIN, SMOKE_TEST, data_dir) as tmp, torch_threads(1):
            datasets, shifts = ["cifar10"], {"cifar10": pick_shift("cifar10", tmp, True)}
            results["cifar10"] = _run_dataset(out_dir, "cifar10", recipe, n_seeds, tmp, "cpu", shifts["cifar10"],
                                              SMOKE_CORRUPTIONS, SMOKE_SEVERITIES, command, SMOKE_MODEL)
    else:
        data_dir = resolve_data_dir(data_dir)
        datasets = check_full_mode(NAME, data_dir, DATASETS)
        shifts = {d: pick_shift(d, data_dir, False) for d in datasets}
        for d in datasets:
            results[d] = _run_dataset(out_dir, d, recipe, n_seeds, data_dir, "cuda", shifts[d],
                                      None, None, command, {})
    rows = _rows(results)
    claims = _claims(results, smoke, recipe["epochs"])
    figure = _figure(out_dir, rows)
    res = {"report": None, "seeds": n_seeds, "smoke": smoke, "recipe": recipe, "datasets": datasets,
           "shifts": shifts, "rows": rows, "claims": claims, "figure": figure,
           "n_images": SMOKE_TRAIN + SMOKE_TEST if smoke else None}
    res["report"] = write_report(out_dir, NAME, _markdown(res, command, time.perf_counter() - started))
    return res


def _run_dataset(out_dir, dataset, recipe, n_seeds, data_dir, device, shift, corruptions, severities, command,
                 model_kwargs):
    return run_benchmark(store_dir(out_dir, NAME), f"{NAME}-{dataset}", dataset, "resnet18", METHODS, recipe,
                         list(range(n_seeds)), data_dir=data_dir, device=device, shift=shift, model_kwargs=model_kwargs,
                         corruptions=corruptions, severities=severities, command=command)


def _rows(results) -> list[dict]:
    """Per dataset × arm: the per-seed numbers the report prints (fractions; seconds per epoch)."""
    rows = []
    for dataset, frame in results.items():
        for method in METHODS:
            rows.append({"dataset": dataset, "method": method, "seeds": per_seed(frame, method, "seed").astype(int),
                         "clean": per_seed(frame, method, "test_acc"), "best": best_test(frame, method),
                         "shift": per_seed(frame, method, "shift_acc"), "gap": per_seed(frame, method, "gap"),
                         "seconds_per_epoch": per_seed(frame, method, "seconds_per_epoch")})
    return rows


def _get(rows, dataset, method):
    return next(r for r in rows if r["dataset"] == dataset and r["method"] == method)


def _claims(results, smoke: bool, epochs: int) -> list[dict]:
    """One entry per claim of the paper we can test: the measured paired difference and the verdict."""
    rows = _rows(results)
    n_images = SMOKE_TRAIN + SMOKE_TEST

    def diff(dataset, a, b, key, scale=100.0):
        m, lo, hi = paired(_get(rows, dataset, a)[key], _get(rows, dataset, b)[key])
        return m * scale, lo * scale, hi * scale

    def judge(ok: bool) -> str:
        return smoke_note(n_images, epochs) if smoke else (REPRODUCED if ok else NOT_REPRODUCED)

    def above(ci, sign=1):  # the interval excludes 0 on the paper's side
        return np.isfinite(ci[1]) and (ci[1] > 0 if sign > 0 else ci[2] < 0)

    claims = []
    for dataset in results:
        if dataset == "cifar10":
            d = diff(dataset, "ses", "baseline", "best")
            claims.append({"claim": "Table 2: on CIFAR-10 SES does not change clean accuracy (−0.06 pp, n.s.)",
                           "measured": d, "unit": "pp", "verdict": judge(not above(d) and not above(d, -1))})
            d = diff(dataset, "ses", "baseline", "shift")
            claims.append({"claim": "Table 2: SES improves CIFAR-10-C accuracy (+0.45 pp)", "measured": d,
                           "unit": "pp", "verdict": judge(above(d))})
        else:
            for key, text, sign in (("best", "clean accuracy (+0.47 pp)", 1), ("gap", "the gap (−0.33 pp)", -1),
                                    ("shift", "CIFAR-100-C accuracy (+0.65 pp)", 1)):
                d = diff(dataset, "ses", "baseline", key)
                claims.append({"claim": f"Table 3: on CIFAR-100 SES improves {text}", "measured": d, "unit": "pp",
                               "verdict": judge(above(d, sign))})
            d = diff(dataset, "ses", "spectral_norm", "shift")
            claims.append({"claim": "Table 5: SES beats spectral norm on CIFAR-100-C (+0.55 pp)", "measured": d,
                           "unit": "pp", "verdict": judge(above(d))})
            d = diff(dataset, "ses+spectral_norm", "ses", "best")
            claims.append({"claim": "Table 5: SES+SN does not improve over SES (−0.33 pp)", "measured": d,
                           "unit": "pp", "verdict": judge(not above(d))})
    first = next(iter(results))
    t_base, t_ses = _get(rows, first, "baseline")["seconds_per_epoch"], _get(rows, first, "ses")["seconds_per_epoch"]
    ratio = t_interval(t_ses / t_base - 1)
    overhead = tuple(100 * v for v in ratio)
    # Hardware differs (a T4 in the paper), so the claim is the size of the relative cost: within 2× of +47 %.
    claims.append({"claim": f"Table 7: SES costs about +47 % time per epoch (9 hooks, batch 256; {first})",
                   "measured": overhead, "unit": "%",
                   "verdict": judge(PAPER_OVERHEAD / 2 <= ratio[0] <= PAPER_OVERHEAD * 2)})
    return claims


def _fmt_pp(values, scale=100.0) -> str:
    return fmt_ci(values, 2, scale)


def _markdown(res, command, seconds) -> str:
    smoke, rec, rows = res["smoke"], res["recipe"], res["rows"]
    n = res["seeds"]
    mode = (f"**Smoke run** on CPU (one thread): {SMOKE_TRAIN} real CIFAR-10 training images (108 train / 12 val) and "
            f"{SMOKE_TEST} test images (the first class-balanced images of the CIFAR-10 files given, written into the "
            f"official `cifar-10-batches-py` layout), {rec['epochs']} epoch, batch {rec['batch_size']}; CIFAR-C = "
            f"`cifar10_c_style` generated from those {SMOKE_TEST} test images, evaluated on "
            f"{', '.join(SMOKE_CORRUPTIONS)} × severities 1, 3, 5; resnet18 at a quarter width (channels "
            f"{SMOKE_MODEL['channels']}: same blocks, stem and 9 hooks). CIFAR-100 is not run in smoke form (no offline "
            "images). These numbers test the pipeline only and are **not comparable** with the paper's."
            if smoke else
            f"Full run on CUDA: the official CIFAR files; shift sets {', '.join(f'{d}: `{s}`' for d, s in res['shifts'].items())} "
            "(all 15 benchmark corruptions × 5 severities; the paper's Exp. 3 used 5 unnamed types × severities 1, "
            "3, 5, so its corruption means are on a different grid).")
    lines = [f"# Suite `{NAME}` — SES paper §8 (Tables 2, 3, 5, 7)", "", provenance(command, seconds), "", mode, "",
             (f"Setup (paper §8): timm `resnet18` with the CIFAR stem, SGD lr {rec['lr']}, momentum {rec['momentum']},"
              f" weight decay {rec['weight_decay']} for every arm, multistep LR (×0.1 at 50 % and 75 % of the "
              f"steps; milestones not stated in the paper), batch {rec['batch_size']}, {rec['epochs']} epochs "
              f"(paper: 50), random crop + flip, {n} seeds (0…{n - 1}, paired; paper: 42, 123, 7). SES λ = 0.01, "
              "β = 0.7 on the 9 hooks `stages+pool`; spectral norm on every Conv/Linear, 1 power iteration; "
              "SES+SN = both. No tuning (the paper fixes every value). Each run is a trial of the harness's store "
              f"(`{NAME}-store/regbench.db`). Intervals: 95 % Student-t over seeds; accuracy = best test accuracy "
              "over epochs (the paper's \"best test acc\"), also final; gap = final train − final test accuracy."),
             "", "## Verdicts", ""]
    for c in res["claims"]:
        m, lo, hi = c["measured"]
        ci = f" [{lo:+.2f}, {hi:+.2f}]" if np.isfinite(lo) else ""
        word = c["verdict"]
        why = f"measured {m:+.2f}{ci} {c['unit']} (paired over {n} seeds)"
        lines.append(f"* {c['claim']}: " + (f"**{NOT_COMPARABLE}** — {word[len(NOT_COMPARABLE) + 1:]}; {why}"
                                            if word.startswith(NOT_COMPARABLE) else verdict(word, why)))
    lines += ["", "## Ours next to the paper's", "",
              "Clean / shift accuracy (%), gap (pp) and time per epoch (s): mean [95 % CI] over seeds.", ""]
    body = []
    for r in rows:
        p = PAPER.get((r["dataset"], r["method"]), {})
        body.append([r["dataset"], LABELS[r["method"]], p.get("table", "—"), p.get("acc", "—"), _fmt_pp(r["best"]),
                     _fmt_pp(r["clean"]), p.get("corr", "—"), _fmt_pp(r["shift"]), p.get("gap", "—"),
                     _fmt_pp(r["gap"]), PAPER_TIME.get(r["method"], "—"), fmt_ci(r["seconds_per_epoch"], 2)])
    lines.append(table(["dataset", "method", "paper table", "paper acc", "our best acc", "our final acc",
                        "paper corr. acc", "our shift acc", "paper gap", "our gap", "paper s/epoch (T4)",
                        "our s/epoch"], body))
    missing = [d for d in DATASETS if d not in res["datasets"]]
    if missing:
        lines += ["", f"Not run: {', '.join(missing)} ("
                  + ("smoke form: CIFAR-10 only" if smoke else "its official files are not in the data dir") + ")."]
    lines += ["", "Per seed:", "", table(
        ["dataset", "method", "seed", "best acc %", "final acc %", "shift acc %", "gap pp", "s/epoch"],
        [[r["dataset"], LABELS[r["method"]], s, f"{100 * b:.2f}", f"{100 * c:.2f}", f"{100 * h:.2f}",
          f"{100 * g:.2f}", f"{t:.2f}"]
         for r in rows for s, b, c, h, g, t in zip(r["seeds"], r["best"], r["clean"], r["shift"], r["gap"],
                                                   r["seconds_per_epoch"])]),
        "", f"![clean vs shift accuracy and time per epoch](figures/{res['figure'].name})", ""]
    return "\n".join(lines)


def _figure(out_dir, rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    width = 0.8 / len(datasets)
    x = np.arange(len(METHODS))
    for k, dataset in enumerate(datasets):
        sel = [_get(rows, dataset, m) for m in METHODS]
        for ax, key, scale in ((axes[0], "best", 100), (axes[1], "shift", 100), (axes[2], "seconds_per_epoch", 1)):
            stats = [t_interval(np.asarray(r[key]) * scale) for r in sel]
            mean = np.array([s[0] for s in stats])
            err = np.array([[s[0] - s[1], s[2] - s[0]] if np.isfinite(s[1]) else [0, 0] for s in stats]).T
            ax.bar(x + k * width, mean, width, yerr=err, capsize=3, label=dataset)
            for i, r in enumerate(sel):  # every seed, so two seeds are not mistaken for a distribution
                ax.scatter(np.full(len(r[key]), x[i] + k * width), np.asarray(r[key]) * scale, color="k", s=8,
                           zorder=3)
    for ax, title in zip(axes, ("best clean test accuracy (%)", "shift accuracy (%)", "seconds per epoch")):
        ax.set_xticks(x + width * (len(datasets) - 1) / 2, [LABELS[m] for m in METHODS], rotation=15)
        ax.set_title(title + ", mean ± 95 % CI")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(out_dir) / "figures" / f"{NAME}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
