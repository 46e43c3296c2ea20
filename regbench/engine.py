"""ONE training/evaluation loop for every method (docs/architecture.md, "The house" to "The Method contract").

The engine knows the Method interface and nothing else about methods: it builds the model, lets each method
attach, captures the activations the methods asked for once per step (one hook per layer, shared), adds their
losses to the task loss, and records per-epoch metrics. It never imports Optuna, MLflow or reports; callers pass
an ``on_epoch`` callback.
"""
from __future__ import annotations

import contextlib
import functools
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
from regbench import models, stacked
from regbench.config import RunConfig
from regbench.device_data import DeviceData
from regbench.errors import ConfigError
from regbench.methods.base import Method, StepContext
from regbench.evaluation import evaluate_epoch, evaluate_shift
from regbench.metrics import test_prediction_spread
from regbench.stopping import stop_requested, stoppable, take_stop

ERANK_BATCH = 512  # fixed held-out batch for the effective-rank diagnostic (docs/methods.md §5.1)


class Diverged(RuntimeError):
    """The loss became NaN or inf; the run is recorded as failed with this reason."""


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
                    # An inplace activation would overwrite the captured pre-activation (docs/methods.md §2.4).
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

    def __init__(self, model, capture: ActivationCapture, num_classes: int, input_shape, seed: int = 0):
        self.model, self._capture = model, capture
        self.num_classes, self.input_shape, self.seed = num_classes, tuple(input_shape), seed

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
    """How ``train_step`` runs on a device. On CUDA: autocast in bf16 (fp16 with a GradScaler
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


@contextlib.contextmanager
def cudnn_autotune(device: torch.device):
    """cuDNN's autotuner on while a group trains on CUDA: every training batch has one shape (drop_last,
    one model), so the fastest convolution algorithms are measured once and reused for every step. The flag is
    process-wide, so it is restored afterwards; on the CPU nothing is touched."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


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

    The group of one (``train_group``): the same loop as K seeds trained together. With ``checkpoint`` (a file path,
    see regbench/checkpoint.py) the run resumes from that file when it holds this run's state, and saves it at the
    end of every ``checkpoint_every``-th epoch once ``checkpoint_seconds`` have passed since the last save (0 = every
    such epoch), so short runs never pay for it. The file is removed when the run finishes or diverges (a rerun would
    diverge again), unless ``keep_checkpoint``; an exception from ``on_epoch`` or an interrupt leaves it for the
    retry. A NaN/inf loss raises ``Diverged``."""
    [result] = train_group([config], splits, lambda _config: method,
                           on_epoch=None if on_epoch is None else lambda _k, epoch, row: on_epoch(epoch, row),
                           progress=progress, checkpoints=None if checkpoint is None else [checkpoint],
                           checkpoint_every=checkpoint_every, checkpoint_seconds=checkpoint_seconds,
                           keep_checkpoint=keep_checkpoint)
    if isinstance(result, Diverged):
        raise result
    return result


BACKENDS = ("auto", "vmap", "streams")


def train_group(configs, splits, method_factory: Callable[[RunConfig], Method], backend: str = "auto",
                on_epoch: Callable[[int, int, dict], None] | None = None, progress: bool = False,
                checkpoints=None, checkpoint_every: int = 1, checkpoint_seconds: float = 60.0,
                keep_checkpoint: bool = False) -> list[RunResult | Diverged]:
    """Train K ≥ 1 runs of one configuration (``configs`` differ only in their seed) together, in ONE loop; one
    result per config, in order (``--parallel-seeds K``; a single run is K = 1).

    Each run is built exactly as it would be alone (``_Run``) and keeps its own batch order, augmentation draws,
    global RNG streams (swapped in around its steps when K > 1), method instance (``method_factory(config)``) and
    checkpoint file (``checkpoints``, one path per config, in the format of a run alone, so either resumes the
    other's). Backends: ``streams`` steps the K runs one after the other at each step (each on its own CUDA stream
    on a GPU, plain interleaving on the CPU) and is bit-for-bit each run alone on the CPU; ``vmap`` stacks their
    weights into one functional model (regbench/stacked.py: faster for small nets, equal up to float reassociation,
    only for methods without hooks); ``auto`` takes vmap for K > 1 eligible runs on CUDA, else streams.

    A run whose loss becomes NaN/inf gets a ``Diverged`` in its slot (its ``history`` attribute holds the epochs
    before) and the others go on. ``on_epoch(index, epoch, row)`` is called per run and epoch, after that epoch's
    checkpoints are saved; the restored epochs of a resumed group are reported again first (a retried trial is a new
    Optuna trial: its pruner and budget must see the whole curve). A group resumes only when every run's checkpoint
    is of one point (epoch, step), or none has one. A Ctrl-C/SIGTERM (``request_stop``) stops the group after its
    current step and saves every live run mid-epoch. A run's ``seconds`` (per epoch and per run) is its share of the
    group's wall time (wall / K)."""
    configs = list(configs)
    _check_group(configs, backend, checkpoints)
    config = configs[0]
    device = resolve_device(config.device)
    if config.compile:
        check_compile(config.device)
    fast = fast_step(device, splits.input_shape)
    # The train split lives on the device (uint8 pixels where the dataset has them), once for every run; batches
    # are gathered, normalized and augmented there (regbench/device_data.py), equal to the float split's rows.
    data = DeviceData(splits, device, channels_last=fast.channels_last)
    batch = min(config.batch_size, data.n)
    steps_per_epoch = data.n // batch  # drop_last: a short last batch skews batch statistics (SES pitfall P6)
    runs: list[_Run] = []
    try:
        for c in configs:  # a run alone owns the global RNG streams; runs of a group swap theirs in (_Run.own_rng)
            runs.append(_Run(c, splits, method_factory(c), device, steps_per_epoch * c.epochs,
                             swap_rng=len(configs) > 1))
        started = time.perf_counter()
        start_epoch, start_step = _resume(runs, checkpoints, device)
        stepper = _stepper(runs, backend, device, resumed=start_step > 0)
        saver = _GroupCheckpoints(runs, checkpoints, checkpoint_every, checkpoint_seconds, keep_checkpoint, device)
        loop = _Loop(runs, splits, data, batch, steps_per_epoch, stepper, saver, on_epoch, device)
        with stoppable(), cudnn_autotune(device):
            loop.run(start_epoch, start_step, progress)
        seconds = (time.perf_counter() - started) / len(runs)
        saver.finish()
    finally:
        for r in runs:
            r.method.detach(r.model)
            r.capture.remove()
    return [r.failed if r.failed is not None else r.result(seconds, start_epoch, start_step) for r in runs]


def _check_group(configs: list[RunConfig], backend: str, checkpoints) -> None:
    """One-line ConfigErrors for a group that cannot be trained together."""
    import dataclasses

    if not configs:
        raise ConfigError("train_group needs at least one config")
    if backend not in BACKENDS:
        raise ConfigError(f"unknown parallel backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    ref = dataclasses.replace(configs[0], seed=0)
    if any(dataclasses.replace(c, seed=0) != ref for c in configs[1:]):
        raise ConfigError("parallel seeds must share one configuration and differ only in their seed")
    if len({c.seed for c in configs}) != len(configs):
        raise ConfigError(f"parallel seeds must be distinct, got {[c.seed for c in configs]}")
    if checkpoints is not None and len(checkpoints) != len(configs):
        raise ConfigError(f"train_group got {len(checkpoints)} checkpoint paths for {len(configs)} configs")


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


_NO_SWAP = contextlib.nullcontext()  # reusable: a run alone swaps nothing


class _Run:
    """Everything one seed's run holds, built in the order a run alone has always been built (seed, model, attach,
    capture, optimizer, scheduler, augmentation generator), so that its weights and draws are the run's own."""

    def __init__(self, config: RunConfig, splits, method: Method, device: torch.device, total_steps: int,
                 swap_rng: bool):
        self.config, self.method, self.device = config, method, device
        self.fast = fast_step(device, splits.input_shape)  # its own GradScaler where fp16 needs one
        self.batch_order = seed_everything(config.seed)
        self.model = models.create_model(config.model, splits.num_classes, splits.input_shape,
                                         **{**config.model_kwargs, **method.model_options()})
        self.model.to(device)
        if self.fast.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.capture = ActivationCapture(self.model)
        method.attach(self.model, ModelContext(self.model, self.capture, splits.num_classes, splits.input_shape,
                                               seed=config.seed))
        self.train_keys = set(self.capture.keys())
        # Whether vmap can stack this run, judged on what the method attached (before the diagnostic hooks below)
        self.vmap_blocker = stacked.vmap_blocker(config, method, self.model, self.train_keys, self.fast.scaler)
        self.diag_layers = models.select_layers(self.model, models.default_layer_rule(self.model))
        self.diag_keys = self.capture.request(self.diag_layers, where="output")
        self.capture.wanted = self.train_keys
        self.optimizer = build_optimizer(config, self.model, method.optimizer_options())
        # The compiled forward shares the module's parameters and hooks; state_dict, eval and detach use the module.
        self.forward = torch.compile(self.model) if config.compile else self.model
        self.scheduler = make_scheduler(config, self.optimizer, total_steps)
        # Augmentation draws from its own generator, on the batches' device, seeded from the run seed: two runs with
        # one seed see identical batches, and the batch-order stream is the same with or without augmentation.
        # SeedSequence derives a seed distinct from the batch-order generator's (one integer on two generators =
        # correlated draws).
        augment_seed = int(np.random.SeedSequence([config.seed, 0xA5]).generate_state(1)[0])
        self.augment = torch.Generator(device=device).manual_seed(augment_seed)
        # A run of a group owns the global RNG streams only around its own work (dropout masks, SES's probes): its
        # state after setup is kept here and swapped in. A run alone owns them: no swap, no cost.
        self.rng = _rng_get(device) if swap_rng else None
        self.history: list[dict[str, float]] = []
        self.partial: dict | None = None  # the stopped epoch's order, next batch and sums (a mid-epoch checkpoint)
        self.failed: Diverged | None = None
        self.perm = self.sum_task = self.sum_reg = None
        self.shift_metrics: dict[str, float] = {}

    @property
    def generators(self) -> dict[str, torch.Generator]:
        return {"batch_order": self.batch_order, "augment": self.augment}

    def own_rng(self):
        """This run's global RNG streams in place while the block runs (nothing for a run alone: no cost per step)."""
        return _NO_SWAP if self.rng is None else self._swapped_rng()

    @contextlib.contextmanager
    def _swapped_rng(self):
        _rng_set(self.rng, self.device)
        try:
            yield
        finally:
            self.rng = _rng_get(self.device)

    def restore(self, state: dict) -> None:
        """Load this run's checkpoint (model, optimizer, schedule, generators, method, global RNG, history)."""
        self.model.load_state_dict(state["model"])
        _checkpoint.load_optimizer(self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for name, gen in self.generators.items():
            _checkpoint.restore_generator(gen, state["generators"][name], state)
        self.method.load_state_dict(state["method"])
        with self.own_rng():  # the saved global RNG becomes this run's
            _checkpoint.set_rng_state(state["rng"])
        if self.fast.scaler is not None and state.get("scaler"):  # a CPU or bf16 run saved none
            self.fast.scaler.load_state_dict(state["scaler"])
        self.history = list(state["history"])
        self.partial = state.get("partial_epoch")

    def start_epoch(self, n: int) -> int:
        """Training mode, and a fresh order and sums for the epoch (or the stopped epoch's, restored); returns its
        first batch index."""
        self.model.train()
        if self.partial is not None:  # resume the epoch a stop interrupted: same order, next batch, same sums
            part, self.partial = self.partial, None
            self.perm = part["perm"].to(self.device)
            self.sum_task, self.sum_reg = part["sum_task"].to(self.device), part["sum_reg"].to(self.device)
            return int(part["batch"])
        self.sum_task = torch.zeros((), device=self.device)
        self.sum_reg = torch.zeros((), device=self.device)
        self.perm = torch.randperm(n, generator=self.batch_order, device="cpu").to(self.device)  # order = seed's
        return 0

    def partial_epoch(self, next_batch: int) -> dict:
        """What a stop mid-epoch saves to resume this epoch: its order, next batch and loss sums."""
        return {"perm": self.perm.cpu(), "batch": next_batch, "sum_task": self.sum_task.cpu(),
                "sum_reg": self.sum_reg.cpu()}

    def result(self, seconds: float, start_epoch: int, start_step: int) -> RunResult:
        final = dict(self.history[-1])
        final.update(self.shift_metrics)
        final["seconds_per_epoch"] = sum(h["seconds"] for h in self.history) / len(self.history)
        return RunResult(metrics=final, history=self.history, seconds=seconds,
                         diagnostic_layers=[name for name, _ in self.diag_layers], resumed_from_epoch=start_epoch,
                         resumed_from_step=start_step)


def _resume(runs: list[_Run], paths, device: torch.device) -> tuple[int, int]:
    """Restore every run from its checkpoint; all must be at one point (epoch, step), or none has one. Returns that
    point ((0, 0): trained from scratch)."""
    if paths is None:
        return 0, 0
    states = [_checkpoint.load(path, r.config.key(), device, epochs=r.config.epochs) for r, path in zip(runs, paths)]
    points = {None if st is None else (int(st["epoch"]), int(st["step"])) for st in states}
    if points == {None}:
        return 0, 0
    if len(points) > 1:
        raise ConfigError(f"parallel seeds resume together only from checkpoints of one point (epoch, step); got "
                          f"{sorted(str(p) for p in points)}; train them apart (--parallel-seeds 1)")
    for r, state in zip(runs, states):
        r.restore(state)
    [point] = points
    return point


class _Lockstep:
    """The runs stepped one after the other at each step through ``train_step``, each on its own CUDA stream when
    there are several on a GPU (one run alone: the current stream, nothing swapped)."""

    def __init__(self, runs: list[_Run], device: torch.device):
        self.cuda = device.type == "cuda" and len(runs) > 1
        self.streams = {id(r): torch.cuda.Stream(device) for r in runs} if self.cuda else {}
        self.main = torch.cuda.current_stream(device) if self.cuda else None

    def stepped(self, live: list[_Run]) -> list[_Run]:
        return live

    def begin_epoch(self) -> None:
        if self.cuda:  # each stream sees the epoch's permutation and fresh accumulators made on the main stream
            for stream in self.streams.values():
                stream.wait_stream(self.main)

    def step(self, draw, step: int, epoch: int, live: list[_Run]) -> None:
        for r in live:
            with r.own_rng(), (torch.cuda.stream(self.streams[id(r)]) if self.cuda else _NO_SWAP):
                xb, yb = draw(r)
                task, reg = train_step(r.forward, r.method, r.capture, r.optimizer, xb, yb, step=step, epoch=epoch,
                                       autocast=r.fast.autocast, dtype=r.fast.dtype, scaler=r.fast.scaler)
                r.scheduler.step()
                r.sum_task += task
                r.sum_reg += reg

    def sync(self) -> None:
        if self.cuda:
            for stream in self.streams.values():
                self.main.wait_stream(stream)

    def gather(self) -> None:
        """Nothing to gather: every run's weights are in its own model."""

    def optimizer_state(self, run: _Run) -> dict:
        return run.optimizer.state_dict()

    def scheduler_of(self, run: _Run):
        return run.scheduler

    def lr(self, run: _Run) -> float:
        return float(run.optimizer.param_groups[0]["lr"])


def _stepper(runs: list[_Run], backend: str, device: torch.device, resumed: bool):
    """The backend that steps the group: vmap over stacked weights when asked or (auto) when K > 1 runs on CUDA can
    all be stacked, else lockstep."""
    blocker = next((r.vmap_blocker for r in runs if r.vmap_blocker), None)
    if backend == "vmap" and blocker:
        raise ConfigError(f"the vmap backend cannot train this run: {blocker}; use backend 'streams' (or 'auto')")
    # auto: vmap on CUDA only. On the CPU the stacked step measured slower than the runs one after the other
    # (benchmarks/seeds_per_gpu.py, 1 thread: cnn1d K=4 0.96x, small CNN K=4 0.70x; lockstep 1.00x and 1.02x),
    # and lockstep is bit-for-bit each run alone there.
    if backend == "vmap" or (backend == "auto" and len(runs) > 1 and blocker is None and device.type == "cuda"):
        return stacked.StackedStep(runs, runs[0].fast, resumed)
    return _Lockstep(runs, device)


class _GroupCheckpoints:
    """Every live run's checkpoint, in one format whatever the group (a run resumes alone or in a group alike)."""

    def __init__(self, runs: list[_Run], paths, every: int, every_seconds: float, keep: bool, device: torch.device):
        self.runs, self.every, self.every_seconds, self.keep, self.device = runs, every, every_seconds, keep, device
        self.paths = dict(zip(map(id, runs), paths)) if paths is not None else {}
        self.last_save = time.perf_counter()

    def due(self, epochs_done: int, epochs: int) -> bool:
        """At the end of every ``every``-th epoch: the last one only when keeping, any other once the interval has
        passed (so short runs never pay for it)."""
        if not self.paths or epochs_done % max(self.every, 1):
            return False
        if epochs_done == epochs:
            return self.keep
        return time.perf_counter() - self.last_save >= self.every_seconds

    def save(self, stepper, epochs_done: int, step: int, next_batch: int | None = None) -> None:
        """Save every live run; ``next_batch`` is given for a stop mid-epoch (its order, position and sums saved)."""
        for r in self.runs if self.paths else ():
            if r.failed is not None:
                continue
            with r.own_rng():  # its global RNG exactly as the run alone would hold it at this point
                rng = _checkpoint.rng_state()
            _checkpoint.save(self.paths[id(r)], {
                **({"partial_epoch": r.partial_epoch(next_batch)} if next_batch is not None else {}),
                **({"scaler": r.fast.scaler.state_dict()} if r.fast.scaler is not None else {}),
                "config_key": r.config.key(), "device_type": self.device.type, "epoch": epochs_done, "step": step,
                "history": r.history, "model": r.model.state_dict(), "optimizer": stepper.optimizer_state(r),
                "scheduler": stepper.scheduler_of(r).state_dict(), "method": r.method.state_dict(), "rng": rng,
                "generators": {name: gen.get_state() for name, gen in r.generators.items()}})
        self.last_save = time.perf_counter()

    def drop(self, run: _Run) -> None:
        """A diverged run's checkpoint goes at once (a rerun would diverge again), unless kept."""
        if not self.keep:
            _checkpoint.remove(self.paths.get(id(run)))

    def finish(self) -> None:
        """The group ended: nothing will resume from its checkpoints, unless kept."""
        if not self.keep:
            for path in self.paths.values():
                _checkpoint.remove(path)


class _Loop:
    """THE epoch / step / evaluation / checkpoint / stop loop, for a group of K ≥ 1 runs and either stepper."""

    def __init__(self, runs, splits, data: DeviceData, batch: int, steps_per_epoch: int, stepper, saver,
                 on_epoch, device: torch.device):
        self.runs, self.splits, self.data, self.batch = runs, splits, data, batch
        self.steps_per_epoch, self.stepper, self.saver, self.on_epoch = steps_per_epoch, stepper, saver, on_epoch
        self.device = device
        self.epochs = runs[0].config.epochs
        self.erank_x = splits.x_val[:ERANK_BATCH]

    def live(self) -> list[_Run]:
        return [r for r in self.runs if r.failed is None]

    def draw(self, run: _Run, b: int):
        """Training batch ``b`` of the run's epoch: its order, its augmentation draws (the split's train_augment:
        training batches only, never val/test/erank/shift)."""
        return self.data.batch(run.perm[b * self.batch:(b + 1) * self.batch], run.augment)

    def _epochs(self, start: int, progress: bool):
        if not progress:
            return range(start, self.epochs)
        from tqdm.auto import tqdm
        c = self.runs[0].config
        seeds = f"seed {c.seed}" if len(self.runs) == 1 else f"seeds {','.join(str(r.config.seed) for r in self.runs)}"
        return tqdm(range(start, self.epochs), desc=f"{c.method} {seeds}", leave=False, unit="ep", initial=start,
                    total=self.epochs)

    def run(self, start_epoch: int, step: int, progress: bool) -> None:
        epochs = self._epochs(start_epoch, progress)
        if self.on_epoch is not None:  # the restored epochs are reported again (see train_group)
            for k, r in enumerate(self.runs):
                for row in r.history:
                    self.on_epoch(k, int(row["epoch"]), row)
        for epoch in epochs:
            live = self.live()
            if not live:
                break
            stepped = self.stepper.stepped(live)
            first = [r.start_epoch(self.data.n) for r in stepped][0]  # lockstep: all stopped at one batch
            self.stepper.begin_epoch()
            t0 = time.perf_counter()
            for b in range(first, self.steps_per_epoch):
                self.stepper.step(functools.partial(self.draw, b=b), step, epoch, stepped)
                step += 1
                if stop_requested():  # Ctrl-C/SIGTERM: this step is done; save it and stop
                    self.stepper.sync()
                    self.stepper.gather()
                    self.saver.save(self.stepper, epoch, step, next_batch=b + 1)
                    raise take_stop()()
            self.stepper.sync()
            seconds = (time.perf_counter() - t0) / len(live)
            self.stepper.gather()
            rows = [(k, r, self._end_epoch(r, epoch, seconds)) for k, r in enumerate(self.runs) if r in live]
            # Saved before on_epoch: a prune or an interrupt there must not lose the epoch just trained.
            if self.saver.due(epoch + 1, self.epochs):
                self.saver.save(self.stepper, epoch + 1, step)
            done = [(k, row) for k, r, row in rows if row is not None]
            if progress and done:
                epochs.set_postfix(val=f"{done[0][1]['val_acc']:.3f}", loss=f"{done[0][1]['train_loss']:.3f}")
            for k, row in done:
                if self.on_epoch is not None:
                    self.on_epoch(k, epoch + 1, row)
        # A shift set is built from the test split: a tuning run (eval_test off) must not read it either.
        for r in self.live():
            if getattr(self.splits, "shift", None) is not None and r.config.eval_test:
                r.shift_metrics = evaluate_shift(r.model, self.splits.shift)
            if r.config.eval_test:  # how the test predictions spread over classes: one class = a collapsed run
                r.shift_metrics.update(test_prediction_spread(r.model, self.splits))

    def _end_epoch(self, run: _Run, epoch: int, seconds: float) -> dict | None:
        """A run's epoch end: its divergence check (one host sync per epoch), evaluation and history row; None (and
        ``run.failed``) when its loss is not finite."""
        steps = max(self.steps_per_epoch, 1)
        task_mean, reg_mean = float(run.sum_task) / steps, float(run.sum_reg) / steps
        if not (math.isfinite(task_mean) and math.isfinite(reg_mean)):
            run.failed = Diverged(f"non-finite loss in epoch {epoch + 1} (task {task_mean}, regularizer {reg_mean})")
            run.failed.history = list(run.history)
            self.saver.drop(run)
            return None
        with run.own_rng():
            row = evaluate_epoch(run.model, self.splits, run.config, run.capture, run.diag_keys, self.erank_x,
                                 self.data)
        row.update(epoch=epoch + 1, train_loss=task_mean, reg_loss=reg_mean, seconds=seconds,
                   lr=self.stepper.lr(run))
        row.update(run.method.diagnostics())
        run.history.append(row)
        return row
