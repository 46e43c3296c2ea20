"""K seeds' weights stacked into one functional model: the vmap backend of ``engine.train_group``
(one loop, so this module holds only what is particular to stacking — the loop is engine.py's).

One functional model over the K stacked parameter sets (``torch.func.stack_module_state`` + ``functional_call`` +
``vmap``), BatchNorm running statistics stacked too, per-seed batches stacked to (K, B, …), and ONE optimizer over
the stacked tensors. SGD (momentum, weight decay) and AdamW update every element from that element's own gradient
and state, and the step count and learning rate are shared, so one optimizer over stacked tensors is K separate
optimizers. The task loss, the method's ``loss`` and ``after_step`` run per seed on that seed's logits (on that
seed's own Method instance, its global RNG swapped in) outside the vmap.

Eligible (``vmap_blocker`` finds nothing) only when, after ``attach``, the method captures no activations, registered
no hook or parametrization on the model, holds no module or parameter of it (its loss could read weights the vmap
does not differentiate), asks for no model options (timm's functional ``drop_rate``), and the model has no dropout /
drop-path / drop-block with a nonzero rate: per-seed random draws inside a vmap cannot reproduce the seed-alone
stream (the vmap runs with ``randomness="error"`` as a safety net). In practice: baseline, weight_decay,
label_smoothing, confidence_penalty on models without dropout.

Numerics (CPU): vmap batches the convolutions (grouped convs) and so sums in another order than one seed alone:
~1e-7 per step, 2e-6 on the history of a 2-epoch cnn1d run, more on BatchNorm nets trained with AdamW (1e-2 on the
2-epoch metrics of the small CNN on digits). Same init, batches and draws: statistically the same run, not the same
bits; the lockstep backend is bit-for-bit.

This module never imports the engine (the engine imports it): the runs it steps are the engine's, used through their
attributes (``model``, ``method``, ``optimizer``, ``sum_task``/``sum_reg``, ``own_rng``).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from regbench.methods.base import Method, StepContext

_STOCHASTIC = (nn.modules.dropout._DropoutNd,)


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


def _stochastic_layers(model: nn.Module) -> list[str]:
    """Modules that draw random numbers in training: torch dropouts and timm's DropPath / DropBlock."""
    found = []
    for name, m in model.named_modules():
        rate = getattr(m, "p", None) if isinstance(m, _STOCHASTIC) else getattr(m, "drop_prob", None)
        if rate:
            found.append(name or type(m).__name__)
    return found


def vmap_blocker(config, method: Method, model: nn.Module, train_keys, scaler) -> str | None:
    """Why one seed's run (its method attached to ``model``) cannot be stacked with others; None when it can."""
    name = config.method
    if train_keys:
        return f"method {name!r} captures activations"
    if _hooks(model):
        return f"method {name!r} adds hooks or parametrizations to the model"
    if _holds_model_parts(method):
        return f"method {name!r} keeps modules or parameters of the model"
    if method.model_options():
        return f"method {name!r} changes how the model is built (e.g. timm drop_rate)"
    drops = sorted(k for k, v in config.model_kwargs.items() if k.startswith("drop") and v)
    if drops:
        return f"the model is built with random layers ({', '.join(drops)})"
    layers = _stochastic_layers(model)
    if layers:
        return f"the model has random layers ({', '.join(layers[:3])})"
    if scaler is not None:  # one scaler would skip every seed's step when one seed overflows
        return "fp16 with a GradScaler (a GPU without bf16)"
    return None


class StackedStep:
    """The K runs' models as one vmapped functional model, stepped by run 0's optimizer and scheduler pointed at the
    stacked tensors (built by ``engine.build_optimizer`` with the method's options and parameter groups, never
    stepped before, so its state is empty unless restored). Every run is stepped, diverged ones too: their slices
    cannot touch the others'."""

    def __init__(self, runs: Sequence, fast, resumed: bool):
        from torch.func import functional_call, stack_module_state, vmap

        self.runs, self.fast = list(runs), fast
        template = self.runs[0].model
        self.params, self.buffers = stack_module_state([r.model for r in self.runs])
        self.optimizer, self.scheduler = self.runs[0].optimizer, self.runs[0].scheduler
        restored = [r.optimizer.state_dict() for r in self.runs] if resumed else None
        name_of = {id(p): name for name, p in template.named_parameters()}
        for group in self.optimizer.param_groups:
            group["params"] = [self.params[name_of[id(p)]] for p in group["params"]]
        if restored:  # each run's restored optimizer state, stacked along the seed axis as its parameters are
            self.optimizer.load_state_dict(stack_states(restored))

        def forward(p, b, x):
            return functional_call(template, (p, b), (x,))

        self.batched = vmap(forward, randomness="error")
        # A method that overrides neither loss nor after_step (baseline, weight decay) costs no per-seed Python call
        # and no RNG swap per step.
        self.hooked = [type(r.method).loss is not Method.loss or type(r.method).after_step is not Method.after_step
                       for r in self.runs]
        self._state = None  # the stacked optimizer state dict, gathered once per save

    def stepped(self, live: Sequence) -> list:
        return self.runs

    def step(self, draw, step: int, epoch: int, stepped: Sequence) -> None:
        """One optimizer step of every run on its own batch (``draw(run)``: the run's next training batch);
        ``stepped`` is what ``stepped`` returned (every run), as for the engine's lockstep stepper."""
        xs, ys = zip(*(draw(run) for run in self.runs))
        device = xs[0].device
        with torch.autocast(device_type=device.type, dtype=self.fast.dtype, enabled=self.fast.autocast):
            logits = self.batched(self.params, self.buffers, torch.stack(xs))
            tasks = [F.cross_entropy(logits[k].float(), ys[k]) for k in range(len(self.runs))]
        total, ctxs = 0, []
        for k, run in enumerate(self.runs):
            ctx = StepContext(inputs=xs[k], targets=ys[k], logits=logits[k], task_loss=tasks[k], activations={},
                              step=step, epoch=epoch)
            reg = None
            if self.hooked[k]:
                with run.own_rng():
                    reg = run.method.loss(ctx)
            total = total + tasks[k] + (0 if reg is None else reg)
            run.sum_task += tasks[k].detach()
            if reg is not None:
                run.sum_reg += reg.detach()
            ctxs.append(ctx)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        for k, (run, ctx) in enumerate(zip(self.runs, ctxs)):
            if self.hooked[k]:
                with run.own_rng():
                    run.method.after_step(ctx)
        self.scheduler.step()

    def begin_epoch(self) -> None:
        """Nothing to order: one stream."""

    def sync(self) -> None:
        """Nothing to wait for: one stream."""

    def gather(self) -> None:
        """Copy each run's slice of the stacked weights and buffers back into its own model (for evaluation and
        checkpoints), and forget the last gathered optimizer state."""
        with torch.no_grad():
            for k, run in enumerate(self.runs):
                for name, p in run.model.named_parameters():
                    p.copy_(self.params[name][k])
                for name, buf in run.model.named_buffers():
                    buf.copy_(self.buffers[name][k])
        self._state = None

    def optimizer_state(self, run) -> dict:
        if self._state is None:
            self._state = self.optimizer.state_dict()
        return seed_slice(self._state, self.runs.index(run))

    def scheduler_of(self, run):
        return self.scheduler

    def lr(self, run) -> float:
        return float(self.optimizer.param_groups[0]["lr"])


def seed_slice(stacked: dict, k: int) -> dict:
    """Seed ``k``'s optimizer state dict cut from the state of one optimizer over K stacked parameter sets: every
    per-element state tensor (momentum, Adam moments) has the stacked parameter's leading K axis, the step counts are
    shared. The parameter groups are run 0's, built by engine.build_optimizer as every run's."""
    def cut(value):
        if torch.is_tensor(value) and value.dim() > 0:
            return value[k].clone()
        return value

    return {"state": {index: {name: cut(v) for name, v in state.items()} for index, state in stacked["state"].items()},
            "param_groups": stacked["param_groups"]}


def stack_states(per_seed: Sequence[dict]) -> dict:
    """The inverse of ``seed_slice``: one optimizer state dict over the stacked parameters from the K seeds' own."""
    first = per_seed[0]

    def stack(index, name):
        values = [sd["state"][index][name] for sd in per_seed]
        if torch.is_tensor(values[0]) and values[0].dim() > 0:
            return torch.stack(values)
        return values[0]  # step counts: equal across seeds (same config, same step)

    return {"state": {index: {name: stack(index, name) for name in state} for index, state in first["state"].items()},
            "param_groups": first["param_groups"]}
