"""ONE training/evaluation loop for every method (DESIGN.md §1-3).

The engine knows the Method interface and nothing else about methods: it builds the model, lets each method
attach, captures the activations the methods asked for once per step (one hook per layer, shared), adds their
losses to the task loss, and records per-epoch metrics. It never imports Optuna, MLflow or reports; callers pass
an ``on_epoch`` callback.
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from regbench import checkpoint as _checkpoint
from regbench import models
from regbench.config import RunConfig
from regbench.device_data import DeviceData
from regbench.errors import ConfigError
from regbench.methods.base import Method, StepContext
from regbench.metrics import (
    accuracy,
    as_matrix,
    calibration,
    effective_rank,
    generalization_gap,
    predict,
)

ERANK_BATCH = 512  # fixed held-out batch for the effective-rank diagnostic (methods.md §5.1)


class Diverged(RuntimeError):
    """The loss became NaN or inf; the run is recorded as failed with this reason."""


class _StopRequest:
    """A Ctrl-C/SIGTERM that arrived inside a stoppable region (a trial, its training loop): the code there stops at
    its next safe point (the loop: after its current optimizer step, with a mid-epoch checkpoint) by raising
    ``exception`` (issue 10, item 2). Set from the CLI's signal handlers."""

    depth = 0                                   # nested stoppable regions now running
    exception: type[BaseException] | None = None


def request_stop(exception: type[BaseException]) -> bool:
    """Ask the running stoppable region to stop at its next safe point by raising ``exception``. Returns False when
    none runs or a stop is already pending (a second Ctrl-C), so the caller raises at once instead."""
    if _StopRequest.depth == 0 or _StopRequest.exception is not None:
        return False
    _StopRequest.exception = exception
    return True


def stop_requested() -> bool:
    """Whether a Ctrl-C/SIGTERM asked the running loop to stop; loops check it after each optimizer step."""
    return _StopRequest.exception is not None


def take_stop() -> type[BaseException] | None:
    """The exception the pending stop asked for (clearing it): the loop raises it once its checkpoint is saved."""
    exception, _StopRequest.exception = _StopRequest.exception, None
    return exception


@contextlib.contextmanager
def stoppable():
    """A region where a Ctrl-C/SIGTERM waits for a safe point instead of raising wherever it lands (half-way through
    a storage write, say). Regions nest: a trial holds its training loop, which checks ``stop_requested`` after each
    step. A stop still pending when the outermost region ends normally (it landed after the loop's last check: the
    final evaluation, Optuna recording the trial) is raised there, once that work is done; one pending when a region
    is left by an exception is dropped with it, as that exception already unwinds the command."""
    if _StopRequest.depth == 0:
        _StopRequest.exception = None
    _StopRequest.depth += 1
    try:
        yield
    except BaseException:
        _StopRequest.depth -= 1
        if _StopRequest.depth == 0:
            _StopRequest.exception = None
        raise
    _StopRequest.depth -= 1
    if _StopRequest.depth == 0 and _StopRequest.exception is not None:
        raise take_stop()()


@dataclass
class RunResult:
    metrics: dict[str, float]               # final epoch's metrics
    history: list[dict[str, float]]         # one dict per epoch
    seconds: float
    diagnostic_layers: list[str] = field(default_factory=list)
    resumed_from_epoch: int = 0             # epochs restored from a mid-run checkpoint (0 = trained from scratch)
    resumed_from_step: int = 0              # optimizer steps restored (a stop mid-epoch saves after its last step)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> torch.Generator:
    """Seeds python, numpy and torch; returns the generator that orders the batches."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


class ActivationCapture:
    """One forward hook (or pre-hook) per layer however many methods ask; stores tensors only while active."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.active = False
        self.wanted: set[str] | None = None  # None = every hooked layer
        self.store: dict[str, torch.Tensor] = {}
        self._handles: dict[str, object] = {}
        self._inplace_restore: list[nn.Module] = []

    def request(self, layers, where: str = "output") -> list[str]:
        if where not in ("output", "input"):
            raise ValueError(f"capture where={where!r}; use 'output' or 'input'")
        keys = []
        for name, module in layers:
            key = name if where == "output" else f"{name}<input"
            if key not in self._handles:
                if where == "input" and getattr(module, "inplace", False):
                    # An inplace activation would overwrite the captured pre-activation (methods.md §2.4).
                    module.inplace = False
                    self._inplace_restore.append(module)
                self._handles[key] = (module.register_forward_hook(self._out_hook(key)) if where == "output"
                                      else module.register_forward_pre_hook(self._in_hook(key)))
            keys.append(key)
        return keys

    def _out_hook(self, key):
        def hook(_module, _inputs, output):
            if self.active and (self.wanted is None or key in self.wanted):
                self.store[key] = output[0] if isinstance(output, (tuple, list)) else output
        return hook

    def _in_hook(self, key):
        def hook(_module, inputs):
            if self.active and (self.wanted is None or key in self.wanted):
                self.store[key] = inputs[0]
        return hook

    def keys(self) -> list[str]:
        return list(self._handles)

    def clear(self):
        self.store = {}

    def remove(self):
        for handle in self._handles.values():
            handle.remove()
        for module in self._inplace_restore:
            module.inplace = True
        self._handles, self._inplace_restore, self.store = {}, [], {}


class ModelContext:
    """What ``Method.attach`` sees (methods/base.py: AttachContext)."""

    def __init__(self, model, capture: ActivationCapture, num_classes: int, input_shape):
        self.model, self._capture = model, capture
        self.num_classes, self.input_shape = num_classes, tuple(input_shape)

    def select_layers(self, rule: str):
        return models.select_layers(self.model, models.default_layer_rule(self.model) if rule == "auto" else rule)

    def capture(self, layers, where: str = "output"):
        return self._capture.request(layers, where)


def build_optimizer(config: RunConfig, model: nn.Module, options: dict) -> torch.optim.Optimizer:
    weight_decay = options.get("weight_decay", config.weight_decay)
    params = options["param_groups"](model) if "param_groups" in options else model.parameters()
    # CUDA: the fused kernels (one launch for every parameter; with a GradScaler they check for inf on the device,
    # no host sync). The CPU keeps torch's default implementation, so CPU runs stay bit-for-bit what they were.
    fused = {"fused": True} if all(p.is_cuda and p.is_floating_point() for p in model.parameters()) else {}
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=weight_decay, **fused)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=weight_decay, **fused)


@dataclass
class FastStep:
    """How ``train_step`` runs on a device (issue 9, item 2). On CUDA: autocast in bf16 (fp16 with a GradScaler
    where the GPU has no native bf16, before Ampere) and channels-last 4-D inputs and weights (cuDNN's fastest conv
    layout under autocast). On the CPU none of it, so CPU runs stay bit-for-bit what they were."""

    autocast: bool = False
    dtype: torch.dtype = torch.bfloat16
    scaler: torch.amp.GradScaler | None = None
    channels_last: bool = False


def fast_step(device: torch.device, input_shape) -> FastStep:
    if device.type != "cuda":
        return FastStep()
    bf16 = torch.cuda.get_device_capability(device) >= (8, 0)  # is_bf16_supported() also counts slow emulation
    return FastStep(autocast=True, dtype=torch.bfloat16 if bf16 else torch.float16,
                    scaler=None if bf16 else torch.amp.GradScaler("cuda"), channels_last=len(input_shape) == 3)


def check_compile(device: str) -> None:
    """One-line ConfigError when ``--compile`` cannot work here: torch.compile's inductor needs Triton for CUDA code
    and a C++ compiler for CPU code. Called at the CLI edge and by ``train``, before any work."""
    if resolve_device(device).type == "cuda":
        from torch.utils._triton import has_triton
        if not has_triton():
            raise ConfigError("--compile on CUDA needs Triton, which is not installed (pip install triton); "
                              "install it or drop --compile")
        return
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
        get_cpp_compiler()
    except (ImportError, RuntimeError, OSError) as exc:  # torch's InvalidCxxCompiler is a RuntimeError
        raise ConfigError(f"--compile on the CPU needs a C++ compiler (g++ or clang++, or set CXX); none works here "
                          f"({type(exc).__name__}); install one or drop --compile") from None


def make_scheduler(config: RunConfig, optimizer, total_steps: int):
    """Stepped once per optimizer step, so every schedule sees the same clock."""
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=max(total_steps, 1))
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
    if config.schedule == "multistep":  # milestones at 50 % and 75 % of training, ×0.1 each
        milestones = [int(total_steps * 0.5), int(total_steps * 0.75)]
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def train_step(model: nn.Module, method: Method, capture: ActivationCapture, optimizer: torch.optim.Optimizer,
               xb: torch.Tensor, yb: torch.Tensor, step: int = 0, epoch: int = 0, autocast: bool = False,
               dtype: torch.dtype = torch.bfloat16, scaler: torch.amp.GradScaler | None = None):
    """One optimizer step: forward (capturing what the method asked for), task + regularizer loss, backward, step,
    the method's after-step update. Returns detached (task loss, regularizer loss) tensors: no host sync here.

    ``autocast`` runs the forward in ``dtype``; the method's loss runs after it, outside autocast (SES's batched
    eigensolves stay in float32). ``scaler`` (fp16 only) scales the loss and skips steps with inf gradients.
    ``model`` may be a ``torch.compile`` wrapper of the module the method is attached to."""
    capture.active = method.wants_activations(step)
    with torch.autocast(device_type=xb.device.type, dtype=dtype, enabled=autocast):
        logits = model(xb)
        task = F.cross_entropy(logits.float(), yb)
    capture.active = False
    ctx = StepContext(inputs=xb, targets=yb, logits=logits, task_loss=task, activations=capture.store,
                      step=step, epoch=epoch)
    reg = method.loss(ctx)
    if reg is None:
        reg = torch.zeros((), device=xb.device)
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        (task + reg).backward()
        optimizer.step()
    else:
        scaler.scale(task + reg).backward()
        scaler.step(optimizer)
        scaler.update()
    method.after_step(ctx)
    capture.clear()
    return task.detach(), reg.detach()


def train(config: RunConfig, splits, method: Method, on_epoch: Callable[[int, dict], None] | None = None,
          progress: bool = False, checkpoint: Path | None = None, checkpoint_every: int = 1,
          checkpoint_seconds: float = 60.0, keep_checkpoint: bool = False) -> RunResult:
    """Train ``config`` on ``splits`` with ``method`` attached; returns final metrics and per-epoch history.

    With ``checkpoint`` (a file path, see regbench/checkpoint.py) the run resumes from that file when it holds this
    run's state, and saves it at the end of every ``checkpoint_every``-th epoch once ``checkpoint_seconds`` have
    passed since the last save (0 = every such epoch), so short runs never pay for it. The file is removed when the
    run finishes or diverges (a rerun would diverge again), unless ``keep_checkpoint``; an exception from
    ``on_epoch`` or an interrupt leaves it for the retry."""
    device = resolve_device(config.device)
    if config.compile:
        check_compile(config.device)
    fast = fast_step(device, splits.input_shape)
    generator = seed_everything(config.seed)
    model = models.create_model(config.model, splits.num_classes, splits.input_shape,
                                **{**config.model_kwargs, **method.model_options()})
    model.to(device)
    if fast.channels_last:
        model.to(memory_format=torch.channels_last)
    capture = ActivationCapture(model)
    method.attach(model, ModelContext(model, capture, splits.num_classes, splits.input_shape))
    train_keys = set(capture.keys())
    diag_layers = models.select_layers(model, models.default_layer_rule(model))
    diag_keys = capture.request(diag_layers, where="output")
    capture.wanted = train_keys
    optimizer = build_optimizer(config, model, method.optimizer_options())
    # The compiled forward shares the module's parameters and hooks; state_dict, eval and detach use the module.
    forward = torch.compile(model) if config.compile else model

    # The train split lives on the device (uint8 pixels where the dataset has them); batches are gathered,
    # normalized and augmented there (regbench/device_data.py), equal to the float split's rows for one seed.
    data = DeviceData(splits, device, channels_last=fast.channels_last)
    n = data.n
    batch = min(config.batch_size, n)
    steps_per_epoch = n // batch  # drop_last: a short last batch skews batch statistics (SES pitfall P6)
    scheduler = make_scheduler(config, optimizer, steps_per_epoch * config.epochs)
    erank_x = splits.x_val[:ERANK_BATCH]

    # Augmentation draws from its own generator, on the batches' device, seeded from the run seed: two runs with one
    # seed see identical batches, and the batch-order stream is the same with or without augmentation. SeedSequence
    # derives a seed distinct from the batch-order generator's (one integer on two generators = correlated draws).
    augment_seed = int(np.random.SeedSequence([config.seed, 0xA5]).generate_state(1)[0])
    augment_generator = torch.Generator(device=device).manual_seed(augment_seed)

    history: list[dict[str, float]] = []
    started, step, start_epoch, partial, resumed_step = time.perf_counter(), 0, 0, None, 0
    generators = {"batch_order": generator, "augment": augment_generator}
    if checkpoint is not None:
        state = _checkpoint.load(checkpoint, config.key(), device)
        if state is not None:
            model.load_state_dict(state["model"])
            _checkpoint.load_optimizer(optimizer, state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            for name, gen in generators.items():
                _checkpoint.restore_generator(gen, state["generators"][name], state)
            method.load_state_dict(state["method"])
            _checkpoint.set_rng_state(state["rng"])
            if fast.scaler is not None and state.get("scaler"):  # a CPU or bf16 run saved none
                fast.scaler.load_state_dict(state["scaler"])
            history, step, start_epoch = list(state["history"]), int(state["step"]), int(state["epoch"])
            partial = state.get("partial_epoch")  # stopped mid-epoch: that epoch's order, position and sums
            resumed_step = step
    last_save = time.perf_counter()

    def save_checkpoint(epoch_done: int, partial_epoch: dict | None = None) -> None:
        _checkpoint.save(checkpoint, {
            **({"partial_epoch": partial_epoch} if partial_epoch is not None else {}),
            **({"scaler": fast.scaler.state_dict()} if fast.scaler is not None else {}),
            "config_key": config.key(), "device_type": device.type, "epoch": epoch_done, "step": step,
            "history": history, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "method": method.state_dict(), "rng": _checkpoint.rng_state(),
            "generators": {name: gen.get_state() for name, gen in generators.items()}})

    epochs = range(start_epoch, config.epochs)
    if progress:
        from tqdm.auto import tqdm
        epochs = tqdm(epochs, desc=f"{config.method} seed {config.seed}", leave=False, unit="ep",
                      initial=start_epoch, total=config.epochs)
    with stoppable():
        try:
            # The restored epochs are reported again: a retried trial is a new Optuna trial with no intermediate values,
            # and its pruner (and the epoch budget the caller counts) must see the whole curve, not just its tail.
            for row in history:
                if on_epoch is not None:
                    on_epoch(int(row["epoch"]), row)
            for epoch in epochs:
                model.train()
                t0 = time.perf_counter()
                sum_task = torch.zeros((), device=device)
                sum_reg = torch.zeros((), device=device)
                first = 0
                if partial is not None:  # resume the epoch a stop interrupted: same order, next batch, same sums
                    perm, first = partial["perm"].to(device), int(partial["batch"])
                    sum_task, sum_reg = partial["sum_task"].to(device), partial["sum_reg"].to(device)
                    partial = None
                else:
                    perm = torch.randperm(n, generator=generator, device="cpu").to(device)  # CPU generator: order = seed's
                for b in range(first, steps_per_epoch):
                    # augmented with the split's train_augment: training batches only, never val/test/erank/shift
                    xb, yb = data.batch(perm[b * batch:(b + 1) * batch], augment_generator)
                    task, reg = train_step(forward, method, capture, optimizer, xb, yb, step=step, epoch=epoch,
                                           autocast=fast.autocast, dtype=fast.dtype, scaler=fast.scaler)
                    scheduler.step()
                    sum_task += task
                    sum_reg += reg
                    step += 1
                    if stop_requested():  # Ctrl-C/SIGTERM: this step is done; save it and stop
                        if checkpoint is not None:
                            save_checkpoint(epoch, {"perm": perm.cpu(), "batch": b + 1, "sum_task": sum_task.cpu(),
                                                    "sum_reg": sum_reg.cpu()})
                        raise take_stop()()
                train_seconds = time.perf_counter() - t0
                task_mean = float(sum_task) / max(steps_per_epoch, 1)  # one host sync per epoch
                reg_mean = float(sum_reg) / max(steps_per_epoch, 1)
                if not (math.isfinite(task_mean) and math.isfinite(reg_mean)):
                    raise Diverged(f"non-finite loss in epoch {epoch + 1} (task {task_mean}, regularizer {reg_mean})")
                row = evaluate_epoch(model, splits, config, capture, diag_keys, erank_x)
                row.update(epoch=epoch + 1, train_loss=task_mean, reg_loss=reg_mean, seconds=train_seconds,
                           lr=float(optimizer.param_groups[0]["lr"]))
                row.update(method.diagnostics())
                history.append(row)
                # Saved before on_epoch: a prune or an interrupt there must not lose the epoch just trained.
                last = epoch + 1 == config.epochs
                due = time.perf_counter() - last_save >= checkpoint_seconds
                if checkpoint is not None and (epoch + 1) % max(checkpoint_every, 1) == 0 and (
                        (keep_checkpoint and last) or (not last and due)):
                    save_checkpoint(epoch + 1)
                    last_save = time.perf_counter()
                if progress:
                    epochs.set_postfix(val=f"{row['val_acc']:.3f}", loss=f"{task_mean:.3f}")
                if on_epoch is not None:
                    on_epoch(epoch + 1, row)
            # A shift set is built from the test split: a tuning run (eval_test off) must not read it either.
            shifted = getattr(splits, "shift", None) is not None and config.eval_test
            shift_metrics = evaluate_shift(model, splits.shift) if shifted else {}
        except Diverged:
            if not keep_checkpoint:
                _checkpoint.remove(checkpoint)
            raise
        finally:
            method.detach(model)
            capture.remove()
    if not keep_checkpoint:
        _checkpoint.remove(checkpoint)
    seconds = time.perf_counter() - started
    final = dict(history[-1])
    final.update(shift_metrics)
    final["seconds_per_epoch"] = sum(h["seconds"] for h in history) / len(history)
    return RunResult(metrics=final, history=history, seconds=seconds,
                     diagnostic_layers=[name for name, _ in diag_layers], resumed_from_epoch=start_epoch,
                     resumed_from_step=resumed_step)


def evaluate_shift(model, shift) -> dict[str, float]:
    """Accuracy of the final model on every (corruption, severity) block of a shift set, in eval mode, plus the mean
    over the benchmark corruptions × severities and, separately, over the extra ones (CIFAR-C convention)."""
    model.eval()
    out, bench, extra = {}, [], []
    for i, (corruption, severity) in enumerate(shift.blocks):
        x, y = shift.block(i)  # one block normalized at a time: the whole set never sits in memory as float32
        acc = accuracy(predict(model, x), y)
        # The key says which family a block belongs to, so reports need no list of corruption names.
        family = "shift" if corruption in shift.benchmark else "shift_extra"
        out[f"{family}/{corruption}/{severity}"] = acc
        (bench if family == "shift" else extra).append(acc)
    if bench:
        out["shift_acc"] = sum(bench) / len(bench)
    if extra:
        out["shift_extra_acc"] = sum(extra) / len(extra)
    return out


def evaluate_epoch(model, splits, config, capture, diag_keys, erank_x) -> dict[str, float]:
    """One epoch's history row: train/val(/test) accuracy and val NLL in eval mode, plus the diagnostics (erank of the
    captured layers on ``erank_x``). Shared with ``parallel``, whose seeds must report exactly what ``train`` would."""
    model.eval()
    val_logits = predict(model, splits.x_val)
    row = {"train_acc": accuracy(predict(model, splits.x_train), splits.y_train),
           "val_acc": accuracy(val_logits, splits.y_val),
           "val_nll": float(F.cross_entropy(val_logits.float(), splits.y_val.to(val_logits.device)))}
    if config.eval_test:
        test_logits = predict(model, splits.x_test)
        row["test_acc"] = accuracy(test_logits, splits.y_test)
        row.update({f"test_{k}": v for k, v in calibration(test_logits, splits.y_test).items()})
    row["gap"] = generalization_gap(row["train_acc"], row.get("test_acc", row["val_acc"]))
    # Effective rank (eq. 4) of every diagnostic layer on a fixed held-out batch, eval mode, GAP for conv maps.
    train_wanted, capture.wanted = capture.wanted, set(diag_keys)
    capture.active = True
    with torch.no_grad():
        predict(model, erank_x, batch_size=len(erank_x))
    capture.active = False
    for key in diag_keys:
        h = as_matrix(capture.store[key]).float()
        row[f"erank/{key}"] = effective_rank(h)
        row[f"width/{key}"] = h.shape[1]  # d of the layer: SES's target erank is d^β (eq. 5), drawn in the report
    capture.clear()
    capture.wanted = train_wanted
    return row
