"""Composition of methods: ``ses+spectral_norm`` (SES paper, Exp. 8 / Table 5) or ``shade+dropout`` (SHADE paper,
Table 1, "SHADE+D").

A composite is a Method like any other: its loss is the sum of its parts' losses, its hooks are the union of theirs
(one shared activation capture), and its hparams are the parts' hparams namespaced by part (``ses.beta``,
``dropout.rate``), so ``--set ses+dropout.ses.beta=0.6`` and an Optuna study over the composite (parameters
``ses.beta``, ``dropout.rate``, …) never mix up SES's β with another method's β. Composites are not registered:
``regbench.registry`` builds one from any ``a+b`` name whose parts are registered methods.
"""
from __future__ import annotations

from typing import Any

from regbench.errors import ConfigError, HparamError

from .base import Method, StepContext

SEPARATOR = "+"


class _Namespaced:
    """Forwards ``trial.suggest_*(name, …)`` as ``suggest_*("part.name", …)``: one study, no clashing names."""

    def __init__(self, trial, prefix: str):
        self._trial, self._prefix = trial, prefix

    def __getattr__(self, attr):
        target = getattr(self._trial, attr)
        if not attr.startswith("suggest_"):
            return target
        return lambda name, *args, **kwargs: target(f"{self._prefix}.{name}", *args, **kwargs)


def _merge(kind: str, composite: str, options: list[tuple[str, dict]]) -> dict:
    merged: dict[str, Any] = {}
    owner: dict[str, str] = {}
    for part, opts in options:
        for key, value in opts.items():
            if key in merged and merged[key] != value:
                raise ConfigError(f"{composite}: {owner[key]} and {part} both set the {kind} option {key!r}; "
                                  f"compose methods that change different things")
            merged[key], owner[key] = value, part
    return merged


class Composite(Method):
    """The sum of ``parts`` (set by ``compose``)."""

    parts: tuple[type[Method], ...] = ()

    @classmethod
    def split(cls, hparams: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """{"ses.beta": 0.6} → {"ses": {"beta": 0.6}}."""
        out: dict[str, dict[str, Any]] = {part.name: {} for part in cls.parts}
        for key, value in hparams.items():
            part, _, name = key.partition(".")
            out[part][name] = value
        return out

    @classmethod
    def validate(cls, hp):
        for part, sub in zip(cls.parts, cls.split(hp).values()):
            part.resolve(sub)  # the part's own typing and range checks, with its own one-line messages

    @classmethod
    def search_space(cls, trial):
        space = {}
        for part in cls.parts:
            space.update({f"{part.name}.{k}": v for k, v in part.search_space(_Namespaced(trial, part.name)).items()})
        return space

    def __init__(self, hparams=None):
        super().__init__(hparams)
        self.members = [part(sub) for part, sub in zip(self.parts, self.split(self.hparams).values())]

    def model_options(self):
        return _merge("model", self.name, [(m.name, m.model_options()) for m in self.members])

    def attach(self, model, ctx):
        for m in self.members:
            m.attach(model, ctx)

    def optimizer_options(self):
        return _merge("optimizer", self.name, [(m.name, m.optimizer_options()) for m in self.members])

    def wants_activations(self, step: int) -> bool:
        return any(m.wants_activations(step) for m in self.members)

    def loss(self, step: StepContext):
        terms = [t for t in (m.loss(step) for m in self.members) if t is not None]
        return sum(terms[1:], terms[0]) if terms else None

    def after_step(self, step: StepContext):
        for m in self.members:
            m.after_step(step)

    def diagnostics(self):
        out: dict[str, float] = {}
        for m in self.members:
            for key, value in m.diagnostics().items():
                out[key if key not in out else f"{m.name}.{key}"] = value
        return out

    def detach(self, model):
        for m in reversed(self.members):  # undo in reverse order, as nested context managers would
            m.detach(model)

    def state_dict(self):
        return {m.name: m.state_dict() for m in self.members}

    def load_state_dict(self, state):
        for m in self.members:
            m.load_state_dict(state.get(m.name, {}))


def compose(parts: list[type[Method]]) -> type[Composite]:
    """A Composite class for these parts, in the given order (hooks attach in that order)."""
    names = [p.name for p in parts]
    name = SEPARATOR.join(names)
    if len(parts) < 2:
        raise ConfigError(f"composite {name!r} needs at least two methods joined by '+', e.g. ses+spectral_norm")
    for n in names:
        if names.count(n) > 1:
            raise ConfigError(f"composite {name!r} names method {n!r} twice; name each method once")
    if "baseline" in names:
        raise ConfigError(f"composite {name!r} includes 'baseline', which adds nothing; drop it "
                          f"(baseline is always run on its own)")
    for p in parts:
        if issubclass(p, Composite):
            raise HparamError(f"composite {name!r}: {p.name!r} is itself a composite")
    return type(f"Composite_{'_'.join(names)}", (Composite,), {
        "name": name,
        "parts": tuple(parts),
        "description": " + ".join(p.name for p in parts) + ": the sum of their losses (hparams namespaced by part)",
        "paper": "; ".join(p.paper for p in parts if p.paper),
        "defaults": {f"{p.name}.{k}": v for p in parts for k, v in p.defaults.items()},
    })
