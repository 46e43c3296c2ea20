"""Fingerprints of the training loop's results on the CPU, to prove a refactor of the loop changes no bit.

``cases()`` trains a few tiny runs through the public entry points — single runs (plain, SHADE's state, dropout's
RNG, SES, augmented batches), a stop mid-epoch and its resume, K = 2 groups of seeds (vmap and lockstep backends),
and a group stopped and resumed — and returns, per case, the sha256 of each run's history (timings left out) and of
its final weights, optimizer and method state (the kept last-epoch checkpoint). ``tests/golden/loop_cpu.json`` holds
these for the loop before issue 19's merge of ``parallel.py`` into ``engine.train``; tests/test_loop_golden.py
compares. Float results depend on the CPU (its model and SIMD width), the torch build and the numeric libraries that
make the data (numpy, scipy, scikit-learn), so the file holds one record per platform, each recorded from the loop
before the change under test, and the test compares on the record whose platform matches, or skips.

    .venv/bin/python tests/loop_golden.py --write     # re-record (only when a change of results is intended)
"""
from __future__ import annotations

import hashlib
import io
import json
import sys
from pathlib import Path

import torch

GOLDEN = Path(__file__).resolve().parent / "golden" / "loop_cpu.json"
TIMING = ("seconds", "seconds_per_epoch")


def platform() -> dict:
    from importlib.metadata import version

    model = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")), "unknown")
    return {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability(), "cpu_model": model,
            **{name: version(name) for name in ("numpy", "scipy", "scikit-learn")}}


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def records() -> list[dict]:
    """The recorded platforms, each ``{"platform": …, "cases": …}``."""
    return json.loads(GOLDEN.read_text())["records"]


def matching_record() -> dict | None:
    here = platform()
    return next((r for r in records() if r["platform"] == here), None)


def _digest(obj) -> str:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return hashlib.sha256(buf.getvalue()).hexdigest()[:16]


def _history_digest(history) -> str:
    rows = [{k: v for k, v in sorted(row.items()) if k not in TIMING} for row in history]
    return hashlib.sha256(json.dumps(rows, sort_keys=True, default=repr).encode()).hexdigest()[:16]


def _state_digests(path: Path) -> dict:
    state = torch.load(path, weights_only=True)
    return {part: _digest(state[part]) for part in ("model", "optimizer", "method")} | {"step": int(state["step"])}


def _fingerprint(result, path: Path) -> dict:
    out = {"history": _history_digest(result.history), "epochs": len(result.history),
           "resumed_from_step": result.resumed_from_step}
    if path.exists():
        out |= _state_digests(path)
        path.unlink()
    return out


def _group(configs, splits, backend, **kw):
    """K seeds trained together by whichever entry point this checkout has."""
    from regbench import engine, registry

    def build(c):
        return registry.build_method(c.method, c.hparams)
    if hasattr(engine, "train_group"):
        return engine.train_group(configs, splits, build, backend=backend, **kw)
    from regbench import parallel
    return parallel.train_seeds(configs, splits, build, backend=backend, **kw)


def cases(tmp: Path) -> dict:
    from regbench.datasets.digits import Digits
    from regbench.datasets.mnist1d import MNIST1D
    from test_interrupts import stopping_at

    from regbench import engine, registry
    from regbench.config import RunConfig

    torch.set_num_threads(1)
    mnist1d = MNIST1D().load(tmp / "data", train_size=400)
    digits = Digits().load(tmp / "digits", train_size=300, augment="crop_flip")

    def cfg(method="baseline", seed=3, **kw):
        base = {"method": method, "dataset": "mnist1d", "model": "cnn1d", "epochs": 2, "batch_size": 64,
                "seed": seed, "hparams": registry.method_class(method).resolve({}), "train_size": 400,
                "device": "cpu"}
        return RunConfig(**{**base, **kw})

    def single(config, splits, method=None, **kw):
        path = tmp / f"{config.key()}.pt"
        result = engine.train(config, splits, method or registry.build_method(config.method, config.hparams),
                              checkpoint=path, checkpoint_seconds=0, keep_checkpoint=True, **kw)
        return _fingerprint(result, path)

    out = {}
    for method in ("baseline", "shade", "dropout", "ses"):
        out[f"single/{method}"] = single(cfg(method), mnist1d)
    out["single/sgd-onecycle"] = single(cfg(optimizer="sgd", lr=0.05, schedule="onecycle"), mnist1d)
    out["single/digits-augment-cnn"] = single(
        cfg(dataset="digits", model="cnn", train_size=300, augment="crop_flip"), digits)

    # a stop after step 8 (mid-epoch 2), then the resume from the checkpoint it saved
    config = cfg("shade", epochs=3)
    path = tmp / "stopped.pt"
    try:
        engine.train(config, mnist1d, stopping_at(registry.build_method("shade", config.hparams), 8),
                     checkpoint=path, checkpoint_seconds=3600)
    except KeyboardInterrupt:
        pass
    out["stop/saved"] = _state_digests(path)
    resumed = engine.train(config, mnist1d, registry.build_method("shade", config.hparams), checkpoint=path,
                           keep_checkpoint=True, checkpoint_seconds=0)
    out["stop/resumed"] = _fingerprint(resumed, path)

    for backend, method, opt in (("vmap", "baseline", "adamw"), ("vmap", "confidence_penalty", "sgd"),
                                 ("streams", "shade", "adamw"), ("streams", "dropout", "adamw")):
        configs = [cfg(method, seed=s, optimizer=opt, lr=3e-3 if opt == "adamw" else 0.05) for s in (0, 1)]
        paths = [tmp / f"g{c.seed}.pt" for c in configs]
        results = _group(configs, mnist1d, backend, checkpoints=paths, checkpoint_seconds=0, keep_checkpoint=True)
        for c, r, p in zip(configs, results, paths):
            out[f"group/{backend}/{method}/seed{c.seed}"] = _fingerprint(r, p)
    return out


def main(argv) -> int:
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    with tempfile.TemporaryDirectory() as tmp:
        got = {"platform": platform(), "cases": cases(Path(tmp))}
    if "--write" in argv:  # replaces this platform's record, keeps the others
        kept = [r for r in records() if r["platform"] != platform()] if GOLDEN.exists() else []
        data = {"records": [*kept, {"platform": platform(), "cases": got["cases"]}]}
        GOLDEN.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        print(f"wrote {GOLDEN}")
    else:
        print(json.dumps(got, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
