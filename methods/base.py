"""The Method plugin contract (docs/architecture.md, "The Method contract").

A method is one small class, found through the ``regbench.methods`` entry-point group. Its defaults and its
Optuna search space sit side by side (DomainBed's hparams next to the algorithm, Optuna's define-by-run space).
One instance serves one training run, so per-run state (SHADE's moving averages, SES's last entropies) lives on
the instance. A method never imports Optuna, MLflow, the store or the reports: ``search_space`` receives any
object with Optuna's ``suggest_*`` methods.

The engine drives a method in this order::

    m = Method(hparams)                 # resolve() merges defaults, coerces types, validate() checks ranges
    m.model_options()                   # constructor kwargs for the model, e.g. timm's {"drop_rate": 0.3}
    m.attach(model, ctx)                # hooks / parametrizations / module swaps; ctx selects and captures layers
    m.optimizer_options()               # e.g. {"weight_decay": 5e-4} or {"param_groups": fn(model) -> groups}
    for each step:  capture on if m.wants_activations(step); loss = task + m.loss(step)  → backward → optimizer.step() → m.after_step(step)
    m.diagnostics()                     # per epoch: scalars worth plotting
    m.detach(model)                     # leaves the model exactly as it was before attach
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import Tensor, nn

from regbench.errors import HparamError


@dataclass
class StepContext:
    """What the engine hands ``Method.loss`` and ``Method.after_step`` for one training step."""

    inputs: Tensor
    targets: Tensor
    logits: Tensor
    task_loss: Tensor
    activations: dict[str, Tensor] = field(default_factory=dict)  # capture key -> tensor, still in the graph
    step: int = 0
    epoch: int = 0


class AttachContext(Protocol):
    """What the engine offers ``Method.attach``: named layer rules and one shared activation capture."""

    num_classes: int
    input_shape: tuple[int, ...]
    seed: int                       # the run's training seed, for a method's own random draws

    def select_layers(self, rule: str) -> list[tuple[str, nn.Module]]:
        """Resolve a named rule (``all``, ``last:3``, ``all-relu``, ``auto`` = the model family's default)."""

    def capture(self, layers: list[tuple[str, nn.Module]], where: str = "output") -> list[str]:
        """Capture these layers' outputs (or inputs, ``where="input"``) on training steps; returns the keys under
        which ``StepContext.activations`` will hold them. A layer is hooked once however many methods ask."""


def _coerce(name: str, value: Any, default: Any) -> Any:
    """Turn a ``--set`` string into the type of the default (bool before int: bool is an int)."""
    if not isinstance(value, str) or isinstance(default, str) or default is None:
        return value
    try:
        if isinstance(default, bool):
            low = value.strip().lower()
            if low not in {"true", "false", "1", "0", "yes", "no"}:
                raise ValueError
            return low in {"true", "1", "yes"}
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
    except ValueError:
        raise HparamError(f"{name}={value!r} is not a valid {type(default).__name__}") from None
    return value


class Method:
    """Base class: the no-op regularizer. Subclasses override what they need."""

    name: str = ""
    description: str = ""
    paper: str = ""
    defaults: dict[str, Any] = {}

    def __init__(self, hparams: dict[str, Any] | None = None):
        self.hparams = self.resolve(hparams or {})

    # ---- hyperparameters -------------------------------------------------------------------------------------
    @classmethod
    def resolve(cls, overrides: dict[str, Any]) -> dict[str, Any]:
        """Defaults updated by overrides (typed like the defaults), then validated."""
        unknown = sorted(set(overrides) - set(cls.defaults))
        if unknown:
            valid = ", ".join(sorted(cls.defaults)) or "none"
            raise HparamError(f"method {cls.name!r} has no hparam {unknown[0]!r}; its hparams: {valid}")
        hp = dict(cls.defaults)
        for key, value in overrides.items():
            hp[key] = _coerce(f"{cls.name}.{key}", value, cls.defaults[key])
        cls.validate(hp)
        return hp

    @classmethod
    def validate(cls, hparams: dict[str, Any]) -> None:
        """Raise HparamError naming the hparam, its value and its valid range."""

    @classmethod
    def search_space(cls, trial) -> dict[str, Any]:
        """Suggest values with ``trial.suggest_*``; return {hparam: value}. Empty = nothing to tune."""
        return {}

    # ---- life cycle ------------------------------------------------------------------------------------------
    def model_options(self) -> dict[str, Any]:
        """Keyword arguments for the model's constructor (module changes made at build time, e.g. dropout)."""
        return {}

    def attach(self, model: nn.Module, ctx: AttachContext) -> None:
        """Hooks, parametrizations (e.g. spectral norm) or module swaps on the built model."""
        pass

    def optimizer_options(self) -> dict[str, Any]:
        return {}

    def wants_activations(self, step: int) -> bool:
        """Whether this step needs the captured activations. A method evaluated every k steps (SES §5.2) returns
        False on the others, and the engine then collects nothing on that step."""
        return True

    def loss(self, step: StepContext) -> Tensor | None:
        return None

    def after_step(self, step: StepContext) -> None:
        pass

    def diagnostics(self) -> dict[str, float]:
        return {}

    def detach(self, model: nn.Module) -> None:
        pass

    # ---- checkpointing of per-run state (SHADE's moving averages, …) -----------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def check_range(method: str, name: str, value: Any, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False) -> None:
    """Shared range check with a one-line message such as ``ses.beta=1.5 is outside (0, 1)``. A missing bound is an
    open infinite one: ``inf`` is outside ``[0, inf)``, and NaN is outside everything."""
    bad = (low is not None and (value < low or (low_open and value == low))) or (
        high is not None and (value > high or (high_open and value == high)))
    if bad or not math.isfinite(value):
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
        raise HparamError(f"{method}.{name}={value!r} is outside {interval}")

