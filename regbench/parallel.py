"""Many seeds of one configuration in one process (issue 9, item 3: ``--parallel-seeds K``).

Small models leave a big GPU idle, so ``train_seeds`` trains K RunConfigs that differ ONLY in their seed at once,
and each seed's result equals ``engine.train`` of that config alone up to floating-point reassociation: the same
initial weights (each model is built right after ``engine.seed_everything(seed)``, as in ``engine.train``), the same
batch order and augmentation draws (each seed keeps its own batch-order and augmentation generators, seeded as
``engine.train`` seeds them) and the same per-epoch metrics (``engine.evaluate_epoch`` on each seed's own model).
``tests/test_parallel_seeds.py`` checks this against ``engine.train`` for both backends.

Two backends:

* ``vmap``: one functional model over the K stacked parameter sets (``torch.func.stack_module_state`` +
  ``functional_call`` + ``vmap``), BatchNorm running statistics stacked too, per-seed batches stacked to (K, B, …),
  and ONE optimizer over the stacked tensors. SGD (momentum, weight decay) and AdamW update every element from
  that element's own gradient and state, and the step count and learning rate are shared, so one optimizer over
  stacked tensors is K separate optimizers. The task loss, the method's ``loss`` and ``after_step`` run per seed
  on that seed's logits (on that seed's own Method instance, global RNG swapped in) outside the vmap. Eligible
  (``_Seed._vmap_blocker`` finds nothing) only when, after ``attach``, the method captures no activations, registered no
  hook or parametrization on the model, holds no module or parameter of it (its loss could read weights the vmap
  does not differentiate), asks for no model options (timm's functional ``drop_rate``), and the model has no
  dropout / drop-path / drop-block with a nonzero rate: per-seed random draws inside a vmap cannot reproduce the
  seed-alone stream (the vmap runs with ``randomness="error"`` as a safety net). In practice: baseline,
  weight_decay, label_smoothing, confidence_penalty on models without dropout.
* ``streams``: K independent model / optimizer / Method copies stepped in lockstep through ``engine.train_step``,
  each seed's step issued on its own CUDA stream on a GPU (plain interleaving on the CPU), each seed's global RNG
  state (python, numpy, torch CPU and CUDA) swapped in around its steps, so dropout draws equal the seed-alone
  run. Works for every method (SES, SHADE, dropout, …).

Both use the engine's device pieces: one resident train split (``DeviceData``) for all seeds, ``fast_step``'s
autocast dtype and channels-last layout, ``build_optimizer`` (fused on CUDA); ``config.compile`` compiles each
seed's forward in the streams backend and is ignored by the vmap one.

Numerics (CPU, measured by the tests): streams is bit-for-bit ``engine.train``. vmap batches the convolutions
(grouped convs) and so sums in another order: ~1e-7 per step, 2e-6 on the history of a 2-epoch cnn1d run. On a
BatchNorm net trained with AdamW that rounding is amplified as any rounding change is (a different GPU kernel
does the same): 1e-2 on the 2-epoch metrics of the small CNN on digits, 2e-4 on the weights after 40 SGD steps.
Same init, batches and draws, so statistically the same run, not the same bits; use backend="streams" for bits.

``backend="auto"`` takes vmap when eligible, else streams. Timings: a seed's ``seconds`` (per epoch and per run) is
its share of the group's wall time (wall / K), what the run cost on the device.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import random
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from regbench import checkpoint as _checkpoint
from regbench import engine, models
from regbench.config import RunConfig
from regbench.device_data import DeviceData
from regbench.errors import ConfigError
from regbench.methods.base import Method, StepContext

BACKENDS = ("auto", "vmap", "streams")


# ---- one seed's run state -----------------------------------------------------------------------------------------

def _rng_get(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def _rng_set(state: tuple, device: torch.device) -> None:
    py, npy, cpu, cuda = state
    random.setstate(py)
    np.random.set_state(npy)
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def _hooks(model: nn.Module) -> int:
    """Forward/backward hooks and parametrizations on the model's modules (what an attach may add)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(getattr(m, "_backward_pre_hooks", {})) + bool(getattr(m, "parametrizations", None))
               for m in model.modules())


def _holds_model_parts(obj, depth: int = 0) -> bool:
    """Whether a Method instance keeps a module or parameter of the model (in attributes, lists, dicts)."""
    if isinstance(obj, (nn.Module, nn.Parameter)):
        return True
    if depth > 3:
        return False
    if isinstance(obj, dict):
        return any(_holds_model_parts(v, depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple, set)):
        return any(_holds_model_parts(v, depth + 1) for v in obj)
    if depth == 0:
        return any(_holds_model_parts(v, depth + 1) for v in vars(obj).values())
    return False


_STOCHASTIC = (nn.modules.dropout._DropoutNd,)


def _stochastic_layers(model: nn.Module) -> list[str]:
    """Modules that draw random numbers in training: torch dropouts and timm's DropPath / DropBlock."""
    found = []
    for name, m in model.named_modules():
        rate = getattr(m, "p", None) if isinstance(m, _STOCHASTIC) else getattr(m, "drop_prob", None)
        if rate:
            found.append(name or type(m).__name__)
    return found


class _Seed:
    """Everything one seed's run holds, built in the order ``engine.train`` builds it."""

    def __init__(self, config: RunConfig, splits, method: Method, device: torch.device, total_steps: int):
        self.config, self.method = config, method
        self.fast = engine.fast_step(device, splits.input_shape)  # its own GradScaler where fp16 needs one
        self.batch_order = engine.seed_everything(config.seed)
        self.model = models.create_model(config.model, splits.num_classes, splits.input_shape,
                                         **{**config.model_kwargs, **method.model_options()})
        self.model.to(device)
        if self.fast.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.capture = engine.ActivationCapture(self.model)
        method.attach(self.model, engine.ModelContext(self.model, self.capture, splits.num_classes,
                                                      splits.input_shape))
        train_keys = set(self.capture.keys())
        self.blocker = self._vmap_blocker(train_keys)
        self.diag_layers = models.select_layers(self.model, models.default_layer_rule(self.model))
        self.diag_keys = self.capture.request(self.diag_layers, where="output")
        self.capture.wanted = train_keys
        self.optimizer = engine.build_optimizer(config, self.model, method.optimizer_options())
        self.scheduler = engine.make_scheduler(config, self.optimizer, total_steps)
        self.forward = torch.compile(self.model) if config.compile else self.model  # as engine.train
        # As engine.train: augmentation draws from its own generator, seeded apart from the batch order.
        augment_seed = int(np.random.SeedSequence([config.seed, 0xA5]).generate_state(1)[0])
        self.augment = torch.Generator(device=device).manual_seed(augment_seed)
        self.rng = _rng_get(device)  # this seed's global RNG after setup, swapped in around its steps
        self.history: list[dict] = []
        self.resumed_from = (0, 0)  # (epoch, step) restored from a checkpoint
        self.partial: dict | None = None  # the stopped epoch's order, next batch and sums (a mid-epoch checkpoint)
        self.failed: engine.Diverged | None = None
        self.perm = self.sum_task = self.sum_reg = None

    def restore(self, state: dict, device: torch.device) -> None:
        """Load an ``engine.train`` checkpoint of this seed's run, in the order engine.train loads it."""
        self.model.load_state_dict(state["model"])
        _checkpoint.load_optimizer(self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        _checkpoint.restore_generator(self.batch_order, state["generators"]["batch_order"], state)
        _checkpoint.restore_generator(self.augment, state["generators"]["augment"], state)
        self.method.load_state_dict(state["method"])
        with self.own_rng(device):  # the saved global RNG becomes this seed's
            _checkpoint.set_rng_state(state["rng"])
        if self.fast.scaler is not None and state.get("scaler"):
            self.fast.scaler.load_state_dict(state["scaler"])
        self.history = list(state["history"])
        self.partial = state.get("partial_epoch")

    def _vmap_blocker(self, train_keys) -> str | None:
        name = self.config.method
        if train_keys:
            return f"method {name!r} captures activations"
        if _hooks(self.model):
            return f"method {name!r} adds hooks or parametrizations to the model"
        if _holds_model_parts(self.method):
            return f"method {name!r} keeps modules or parameters of the model"
        if self.method.model_options():
            return f"method {name!r} changes how the model is built (e.g. timm drop_rate)"
        drops = sorted(k for k, v in self.config.model_kwargs.items() if k.startswith("drop") and v)
        if drops:
            return f"the model is built with random layers ({', '.join(drops)})"
        layers = _stochastic_layers(self.model)
        if layers:
            return f"the model has random layers ({', '.join(layers[:3])})"
        if self.fast.scaler is not None:  # one scaler would skip every seed's step when one seed overflows
            return "fp16 with a GradScaler (a GPU without bf16)"
        return None

    def batch(self, data: DeviceData, b: int, size: int):
        """Training batch ``b`` of this seed's epoch, drawn as engine.train draws it (its order, its augmentation)."""
        return data.batch(self.perm[b * size:(b + 1) * size], self.augment)

    @contextmanager
    def own_rng(self, device):
        _rng_set(self.rng, device)
        try:
            yield
        finally:
            self.rng = _rng_get(device)


# ---- the public entry point ----------------------------------------------------------------------------------------

def _first_blocker(seeds: Sequence[_Seed]) -> str | None:
    """Why the vmap backend cannot train these seeds (None = it can)."""
    return next((s.blocker for s in seeds if s.blocker), None)


def train_seeds(configs: Sequence[RunConfig], splits, method_factory: Callable[[RunConfig], Method],
                backend: str = "auto", on_epoch: Callable[[int, int, dict], None] | None = None,
                progress: bool = False, checkpoints: Sequence[Path] | None = None,
                checkpoint_seconds: float = 60.0, keep_checkpoint: bool = False,
                ) -> list[engine.RunResult | engine.Diverged]:
    """Train ``configs`` (equal but for their seeds) together; one result per config, in order.

    ``method_factory(config)`` builds each seed's own Method instance. A seed whose loss becomes NaN/inf gets an
    ``engine.Diverged`` in its slot (its ``history`` attribute holds the epochs before) and the others go on.
    ``on_epoch(index, epoch, row)`` is called per seed and epoch, as ``engine.train``'s ``on_epoch``.

    ``checkpoints`` (one path per config): at the end of an epoch, once ``checkpoint_seconds`` have passed since the
    last save, every live seed's state is saved there in ``engine.train``'s checkpoint format, so a group killed
    mid-run loses at most that much work per seed. A group whose checkpoints exist resumes from them: every seed's
    checkpoint must be of the same point (epoch, step; regbench/study.py groups only such runs). A Ctrl-C/SIGTERM
    (``engine.request_stop``) stops the group after its current lockstep step and saves every seed mid-epoch, as
    ``engine.train`` does for one run. A checkpoint can equally be resumed by ``engine.train``
    alone: streams checkpoints resume bit-for-bit either way; vmap ones hold each seed's slice of the stacked weights
    and optimizer state. Removed when the group ends unless ``keep_checkpoint``; a diverged seed's is removed at
    once (a rerun would diverge again)."""
    configs = list(configs)
    if not configs:
        raise ConfigError("train_seeds needs at least one config")
    if backend not in BACKENDS:
        raise ConfigError(f"unknown parallel backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    ref = dataclasses.replace(configs[0], seed=0)
    for c in configs[1:]:
        if dataclasses.replace(c, seed=0) != ref:
            raise ConfigError("parallel seeds must share one configuration and differ only in their seed")
    if len({c.seed for c in configs}) != len(configs):
        raise ConfigError(f"parallel seeds must be distinct, got {[c.seed for c in configs]}")
    if checkpoints is not None and len(checkpoints) != len(configs):
        raise ConfigError(f"train_seeds got {len(checkpoints)} checkpoint paths for {len(configs)} configs")

    config = configs[0]
    device = engine.resolve_device(config.device)
    if config.compile:
        engine.check_compile(config.device)
    n = len(splits.y_train)
    size = min(config.batch_size, n)
    steps_per_epoch = n // size  # drop_last, as engine.train
    seeds = [_Seed(c, splits, method_factory(c), device, steps_per_epoch * c.epochs) for c in configs]
    try:
        if checkpoints is not None:
            _resume(seeds, checkpoints, device)
        if backend == "auto":
            backend = "streams" if _first_blocker(seeds) else "vmap"
        if backend == "vmap" and _first_blocker(seeds):
            raise ConfigError(f"the vmap backend cannot train this run: {_first_blocker(seeds)}; use backend "
                              f"'streams' (or 'auto')")
        saver = _GroupCheckpoints(seeds, checkpoints, checkpoint_seconds, keep_checkpoint, device)
        loop = _Loop(seeds, splits, device, size, steps_per_epoch, on_epoch, saver)
        started = time.perf_counter()
        with engine.stoppable():
            (loop.run_vmap if backend == "vmap" else loop.run_streams)(progress)
        seconds = (time.perf_counter() - started) / len(seeds)
        saver.finish()
    finally:
        for s in seeds:
            s.method.detach(s.model)
            s.capture.remove()
    return [s.failed if s.failed is not None else _result(s, seconds) for s in seeds]


def _result(seed: _Seed, seconds: float) -> engine.RunResult:
    final = dict(seed.history[-1])
    final.update(seed.shift_metrics)
    final["seconds_per_epoch"] = sum(h["seconds"] for h in seed.history) / len(seed.history)
    epoch, step = seed.resumed_from
    return engine.RunResult(metrics=final, history=seed.history, seconds=seconds,
                            diagnostic_layers=[name for name, _ in seed.diag_layers], resumed_from_epoch=epoch,
                            resumed_from_step=step)


def _resume(seeds: Sequence[_Seed], paths: Sequence[Path], device: torch.device) -> None:
    """Restore every seed from its checkpoint; all must be at one point (epoch, step), or none has one."""
    states = [_checkpoint.load(path, s.config.key(), device) for s, path in zip(seeds, paths)]
    points = {None if st is None else (int(st["epoch"]), int(st["step"])) for st in states}
    if points == {None}:
        return
    if len(points) > 1:
        raise ConfigError(f"parallel seeds resume together only from checkpoints of one point (epoch, step); got "
                          f"{sorted(str(p) for p in points)}; train them apart (--parallel-seeds 1)")
    for s, state in zip(seeds, states):
        s.restore(state, device)
        s.resumed_from = (int(state["epoch"]), int(state["step"]))


# ---- the lockstep loops ------------------------------------------------------------------------------------------

class _Loop:
    def __init__(self, seeds, splits, device, size, steps_per_epoch, on_epoch, saver: _GroupCheckpoints):
        self.seeds, self.splits, self.device = seeds, splits, device
        self.size, self.steps_per_epoch, self.on_epoch = size, steps_per_epoch, on_epoch
        self.saver = saver
        # One resident copy of the train split serves every seed (regbench/device_data.py).
        self.data = DeviceData(splits, device, channels_last=seeds[0].fast.channels_last)
        self.fast = seeds[0].fast
        self.erank_x = splits.x_val[:engine.ERANK_BATCH]
        self.epochs = seeds[0].config.epochs

    def _live(self):
        return [s for s in self.seeds if s.failed is None]

    def _epochs(self, progress: bool):
        """The epochs left to train, after reporting the restored ones again (as engine.train does: a retried trial
        is a new Optuna trial, and its pruner and budget must see the whole curve)."""
        start = self.seeds[0].resumed_from[0]
        if self.on_epoch is not None:
            for k, s in enumerate(self.seeds):
                for row in s.history:
                    self.on_epoch(k, int(row["epoch"]), row)
        epochs = range(start, self.epochs)
        if progress:
            from tqdm.auto import tqdm
            c = self.seeds[0].config
            epochs = tqdm(epochs, desc=f"{c.method} seeds {','.join(str(s.config.seed) for s in self.seeds)}",
                          leave=False, unit="ep", initial=start, total=self.epochs)
        return epochs

    def _start_epoch(self, seed: _Seed) -> int:
        """Fresh order and sums for the epoch (or the stopped epoch's, restored); returns its first batch index."""
        seed.model.train()
        if seed.partial is not None:  # resume the epoch a stop interrupted: same order, next batch, same sums
            part, seed.partial = seed.partial, None
            seed.perm = part["perm"].to(self.device)
            seed.sum_task, seed.sum_reg = part["sum_task"].to(self.device), part["sum_reg"].to(self.device)
            return int(part["batch"])
        seed.sum_task = torch.zeros((), device=self.device)
        seed.sum_reg = torch.zeros((), device=self.device)
        seed.perm = torch.randperm(self.data.n, generator=seed.batch_order, device="cpu").to(self.device)
        return 0

    def _stop(self, epoch: int, next_batch: int, step: int, optimizer_state, scheduler) -> None:
        """Ctrl-C/SIGTERM after a lockstep step: save every live seed mid-epoch, then raise what the signal asked."""
        self.saver.save(epoch, step, optimizer_state, scheduler, partial=lambda s: {
            "perm": s.perm.cpu(), "batch": next_batch, "sum_task": s.sum_task.cpu(), "sum_reg": s.sum_reg.cpu()})
        raise engine.take_stop()()

    def _end_epoch(self, seed: _Seed, epoch: int, seconds: float, lr: float) -> None:
        """The per-epoch bookkeeping of engine.train for one seed: divergence check, evaluation, history row."""
        steps = max(self.steps_per_epoch, 1)
        task_mean, reg_mean = float(seed.sum_task) / steps, float(seed.sum_reg) / steps
        if not (math.isfinite(task_mean) and math.isfinite(reg_mean)):
            seed.failed = engine.Diverged(
                f"non-finite loss in epoch {epoch + 1} (task {task_mean}, regularizer {reg_mean})")
            seed.failed.history = list(seed.history)
            self.saver.drop(seed)
            return
        with seed.own_rng(self.device):
            row = engine.evaluate_epoch(seed.model, self.splits, seed.config, seed.capture, seed.diag_keys, self.erank_x)
        row.update(epoch=epoch + 1, train_loss=task_mean, reg_loss=reg_mean, seconds=seconds, lr=lr)
        row.update(seed.method.diagnostics())
        seed.history.append(row)
        if self.on_epoch is not None:
            self.on_epoch(self.seeds.index(seed), epoch + 1, row)

    def _finish(self) -> None:
        # A shift set is built from the test split: only runs that evaluate test read it (as engine.train).
        for s in self.seeds:
            s.shift_metrics = {}
            if s.failed is None and getattr(self.splits, "shift", None) is not None and s.config.eval_test:
                s.shift_metrics = engine.evaluate_shift(s.model, self.splits.shift)

    # -- streams: K independent copies in lockstep ------------------------------------------------------------------
    def run_streams(self, progress: bool) -> None:
        cuda = self.device.type == "cuda"
        streams = {id(s): torch.cuda.Stream(self.device) for s in self.seeds} if cuda else {}
        step = self.seeds[0].resumed_from[1]
        for epoch in self._epochs(progress):
            live = self._live()
            if not live:
                break
            starts = [self._start_epoch(s) for s in live]
            first = starts[0]  # lockstep: every seed stopped (and resumes) at the same batch
            main = torch.cuda.current_stream(self.device) if cuda else None
            for s in live:  # each stream sees the batches' permutation and the fresh accumulators
                if cuda:
                    streams[id(s)].wait_stream(main)
            t0 = time.perf_counter()
            for b in range(first, self.steps_per_epoch):
                for s in live:
                    with s.own_rng(self.device), (torch.cuda.stream(streams[id(s)]) if cuda else nullcontext()):
                        xb, yb = s.batch(self.data, b, self.size)
                        task, reg = engine.train_step(s.forward, s.method, s.capture, s.optimizer, xb, yb,
                                                      step=step, epoch=epoch, autocast=s.fast.autocast,
                                                      dtype=s.fast.dtype, scaler=s.fast.scaler)
                        s.scheduler.step()
                        s.sum_task += task
                        s.sum_reg += reg
                step += 1
                if engine.stop_requested():
                    for s in live:
                        if cuda:
                            main.wait_stream(streams[id(s)])
                    self._stop(epoch, b + 1, step, lambda s: s.optimizer, lambda s: s.scheduler)
            for s in live:
                if cuda:
                    main.wait_stream(streams[id(s)])
            seconds = (time.perf_counter() - t0) / len(live)
            for s in live:
                self._end_epoch(s, epoch, seconds, float(s.optimizer.param_groups[0]["lr"]))
            self.saver.maybe_save(epoch + 1, self.epochs, step, lambda s: s.optimizer, lambda s: s.scheduler)
        self._finish()

    # -- vmap: one functional model over stacked parameters ----------------------------------------------------------
    def run_vmap(self, progress: bool) -> None:
        from torch.func import functional_call, stack_module_state, vmap

        seeds = self.seeds
        template = seeds[0].model
        params, buffers = stack_module_state([s.model for s in seeds])
        # Seed 0's optimizer and scheduler, pointed at the stacked tensors: built by engine.build_optimizer with the
        # method's options and parameter groups, never stepped yet, so its state is still empty.
        optimizer, scheduler = seeds[0].optimizer, seeds[0].scheduler
        name_of = {id(p): name for name, p in template.named_parameters()}
        # Restored from a checkpoint (a step count, not an epoch: a stop inside the first epoch saved one too)
        restored = [s.optimizer.state_dict() for s in seeds] if seeds[0].resumed_from[1] else None
        for group in optimizer.param_groups:
            group["params"] = [params[name_of[id(p)]] for p in group["params"]]
        if restored:  # each seed's restored optimizer state, stacked along the seed axis as its parameters are
            optimizer.load_state_dict(_stack_states(restored))

        def forward(p, b, x):
            return functional_call(template, (p, b), (x,))

        batched = vmap(forward, randomness="error")
        # The method's hooks run per seed under that seed's RNG; a method that overrides neither (baseline, weight
        # decay) costs no per-seed Python call and no RNG swap per step.
        hooked = [type(s.method).loss is not Method.loss or type(s.method).after_step is not Method.after_step
                  for s in seeds]
        step = self.seeds[0].resumed_from[1]
        for epoch in self._epochs(progress):
            if not self._live():
                break
            starts = [self._start_epoch(s) for s in seeds]  # diverged seeds still ride along (their slices
            first = starts[0]                                # cannot touch the others)
            template.train()
            t0 = time.perf_counter()
            for b in range(first, self.steps_per_epoch):
                xs, ys = zip(*(s.batch(self.data, b, self.size) for s in seeds))
                with torch.autocast(device_type=self.device.type, dtype=self.fast.dtype, enabled=self.fast.autocast):
                    logits = batched(params, buffers, torch.stack(xs))
                    tasks = [F.cross_entropy(logits[k].float(), ys[k]) for k in range(len(seeds))]
                total, ctxs = 0, []
                for k, s in enumerate(seeds):
                    ctx = StepContext(inputs=xs[k], targets=ys[k], logits=logits[k], task_loss=tasks[k],
                                      activations={}, step=step, epoch=epoch)
                    reg = None
                    if hooked[k]:
                        with s.own_rng(self.device):
                            reg = s.method.loss(ctx)
                    total = total + tasks[k] + (0 if reg is None else reg)
                    s.sum_task += tasks[k].detach()
                    if reg is not None:
                        s.sum_reg += reg.detach()
                    ctxs.append(ctx)
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
                for k, (s, ctx) in enumerate(zip(seeds, ctxs)):
                    if hooked[k]:
                        with s.own_rng(self.device):
                            s.method.after_step(ctx)
                scheduler.step()
                step += 1
                if engine.stop_requested():
                    _unstack(seeds, params, buffers)
                    self._stop(epoch, b + 1, step, functools.partial(_seed_slice, optimizer.state_dict(), seeds),
                               lambda s: scheduler)
            live = self._live()
            seconds = (time.perf_counter() - t0) / len(live)
            _unstack(seeds, params, buffers)  # each seed's model gets its slice back for engine.evaluate_epoch
            for s in live:
                self._end_epoch(s, epoch, seconds, float(optimizer.param_groups[0]["lr"]))
            if self.saver.due(epoch + 1, self.epochs):  # the stacked state is gathered only when a save is due
                self.saver.maybe_save(epoch + 1, self.epochs, step,
                                      functools.partial(_seed_slice, optimizer.state_dict(), seeds),
                                      lambda s: scheduler)
        self._finish()


# ---- mid-run checkpoints of a group --------------------------------------------------------------------------------

class _GroupCheckpoints:
    """Per-seed checkpoints in ``engine.train``'s format, saved together at epoch ends (see ``train_seeds``)."""

    def __init__(self, seeds, paths, every_seconds: float, keep: bool, device: torch.device):
        self.seeds, self.every_seconds, self.keep, self.device = seeds, every_seconds, keep, device
        self.paths = dict(zip(map(id, seeds), paths)) if paths is not None else {}
        self.last_save = time.perf_counter()

    def due(self, epochs_done: int, epochs: int) -> bool:
        """engine.train's rule: the last epoch only when keeping, any other once the interval has passed."""
        if not self.paths:
            return False
        if epochs_done == epochs:
            return self.keep
        return time.perf_counter() - self.last_save >= self.every_seconds

    def maybe_save(self, epochs_done: int, epochs: int, step: int, optimizer_state, scheduler) -> None:
        if self.due(epochs_done, epochs):
            self.save(epochs_done, step, optimizer_state, scheduler)

    def save(self, epochs_done: int, step: int, optimizer_state, scheduler, partial=None) -> None:
        """Save every live seed; ``optimizer_state(seed)`` is its optimizer (or its state dict), ``scheduler(seed)``
        the scheduler whose clock it follows, ``partial(seed)`` its stopped epoch's state (a stop mid-epoch)."""
        for s in self.seeds if self.paths else ():
            if s.failed is not None:
                continue
            opt = optimizer_state(s)
            with s.own_rng(self.device):  # its RNG exactly as engine.train would hold it at this point
                rng = _checkpoint.rng_state()
            _checkpoint.save(self.paths[id(s)], {
                **({"partial_epoch": partial(s)} if partial is not None else {}),
                **({"scaler": s.fast.scaler.state_dict()} if s.fast.scaler is not None else {}),
                "config_key": s.config.key(), "device_type": self.device.type, "epoch": epochs_done, "step": step,
                "history": s.history, "model": s.model.state_dict(),
                "optimizer": opt if isinstance(opt, dict) else opt.state_dict(),
                "scheduler": scheduler(s).state_dict(), "method": s.method.state_dict(), "rng": rng,
                "generators": {"batch_order": s.batch_order.get_state(), "augment": s.augment.get_state()}})
        self.last_save = time.perf_counter()

    def drop(self, seed: _Seed) -> None:
        if not self.keep:
            _checkpoint.remove(self.paths.get(id(seed)))

    def finish(self) -> None:
        """The group ended (finished or diverged): nothing will resume from its checkpoints, unless kept."""
        if not self.keep:
            for path in self.paths.values():
                _checkpoint.remove(path)


def _seed_slice(stacked: dict, seeds: Sequence[_Seed], seed: _Seed) -> dict:
    """``seed``'s optimizer state dict cut from the state of one optimizer over the K stacked parameter sets of
    ``seeds``: every per-element state tensor (momentum, Adam moments) has the stacked parameter's leading K axis,
    the step counts are shared. The parameter groups are seed 0's, built by engine.build_optimizer as every seed's."""
    k = seeds.index(seed)

    def cut(value):
        if torch.is_tensor(value) and value.dim() > 0:
            return value[k].clone()
        return value

    return {"state": {index: {name: cut(v) for name, v in state.items()}
                      for index, state in stacked["state"].items()},
            "param_groups": stacked["param_groups"]}


def _stack_states(per_seed: Sequence[dict]) -> dict:
    """The inverse of ``_seed_slice``: one optimizer state dict over the stacked parameters from the K seeds' own."""
    first = per_seed[0]

    def stack(index, name):
        values = [sd["state"][index][name] for sd in per_seed]
        if torch.is_tensor(values[0]) and values[0].dim() > 0:
            return torch.stack(values)
        return values[0]  # step counts: equal across seeds (same config, same epoch)

    return {"state": {index: {name: stack(index, name) for name in state} for index, state in first["state"].items()},
            "param_groups": first["param_groups"]}


def _unstack(seeds: Sequence[_Seed], params: dict, buffers: dict) -> None:
    """Copy each seed's slice of the stacked weights and buffers back into its own model."""
    with torch.no_grad():
        for k, s in enumerate(seeds):
            for name, p in s.model.named_parameters():
                p.copy_(params[name][k])
            for name, buf in s.model.named_buffers():
                buf.copy_(buffers[name][k])
