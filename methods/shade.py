"""SHADE: SHAnnon DEcay (seed 002_d317e923430bbd5c.txt, Blot, Robert, Thome, Cord, ICIP 2018).

Sec. 2.3: for each unit i of each layer l, with pre-ReLU value y and a Bernoulli latent Z ("pattern present"),

    p(Z=1 | y) = 1 − exp(−ReLU(y)),   p(Z=0 | y) = exp(−ReLU(y))
    Ω_SHADE   = Σ_l Σ_i (1/K) Σ_k Σ_z p(Z_{l,i}=z | y_k) · (y_k − μ_{z,l,i})²      (the eq. 4-5 estimate)
    L         = L_task + weight · Ω_SHADE                                          (eq. 1, the paper's β)

and Algorithm 1 keeps per-unit moving averages, updated after each batch with momentum λ = 0.8:

    line 4:  p_z ← λ p_z + (1−λ)(1/K) Σ_k p(z | y_k)
    line 5:  μ_z ← λ μ_z + (1−λ)(1/K) Σ_k [p(z | y_k) / p_z] y_k     (p_z: the value just updated in line 4)

Choices (../shared/reference/methods.md §2.3-2.4): μ_z are constants in the loss (the paper: they "have no influence
on the entropy"); p(z|y) keeps its gradient unless ``detach_posterior``; mean over samples, sum over units and layers;
a convolutional unit is a channel whose spatial positions are extra samples (the paper's "half as many parameters as
batch normalization"); the averages are updated after backward, in training only. SHADE uses no labels.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import Method, StepContext, check_range


def units_as_columns(y: Tensor) -> Tensor:
    """[K, units]: channels are units, batch and spatial positions are samples."""
    if y.dim() == 2:
        return y
    return y.transpose(1, -1).reshape(-1, y.shape[1])


def posterior_one(y: Tensor) -> Tensor:
    """p(Z=1 | y) = 1 − exp(−ReLU(y)) (Sec. 2.3)."""
    return 1.0 - torch.exp(-torch.relu(y))


def shade_penalty(y: Tensor, mu0: Tensor, mu1: Tensor, detach_posterior: bool = False) -> Tensor:
    """Ω for one layer: Σ_units mean_samples Σ_z p(z|y)(y − μ_z)², y already [K, units]."""
    p1 = posterior_one(y)
    if detach_posterior:
        p1 = p1.detach()
    per_sample = (1.0 - p1) * (y - mu0) ** 2 + p1 * (y - mu1) ** 2
    return per_sample.mean(dim=0).sum()


@torch.no_grad()
def update_moving_averages(y: Tensor, state: dict[str, Tensor], momentum: float) -> None:
    """Algorithm 1, lines 4-5, in place, for y [K, units]."""
    p1 = posterior_one(y)
    for z, pz in ((0, 1.0 - p1), (1, p1)):
        p_key, mu_key = f"p{z}", f"mu{z}"
        state[p_key].mul_(momentum).add_((1 - momentum) * pz.mean(dim=0))
        state[mu_key].mul_(momentum).add_((1 - momentum) * (pz * y).mean(dim=0) / state[p_key])


def initial_state(units: int, device, dtype=torch.float32) -> dict[str, Tensor]:
    """Algorithm 1, line 1: μ0 = −1, μ1 = 1, p0 = p1 = 0.5."""
    full = lambda v: torch.full((units,), v, device=device, dtype=dtype)  # noqa: E731
    return {"p0": full(0.5), "p1": full(0.5), "mu0": full(-1.0), "mu1": full(1.0)}


class SHADE(Method):
    name = "shade"
    description = "SHAnnon DEcay: conditional-variance bound on each unit's pre-ReLU entropy"
    paper = "Blot et al. ICIP 2018, seed 002, Sec. 2.3 and Algorithm 1"
    defaults = {"weight": 1e-3, "momentum": 0.8, "layers": "all-relu", "detach_posterior": False}

    @classmethod
    def validate(cls, hp):
        check_range("shade", "weight", hp["weight"], 0)
        check_range("shade", "momentum", hp["momentum"], 0, 1, high_open=True)

    @classmethod
    def search_space(cls, trial):
        # The paper cross-validates the weight without giving a grid; a wide log range (methods.md §2.5).
        return {"weight": trial.suggest_float("weight", 1e-5, 1e-1, log=True)}

    def attach(self, model, ctx):
        # Pre-ReLU values: the *input* of each ReLU (the engine turns off inplace on captured ReLUs).
        self.keys = ctx.capture(ctx.select_layers(self.hparams["layers"]), where="input")
        self.state: dict[str, dict[str, Tensor]] = {}
        self._last_penalty = 0.0

    def _state_for(self, key: str, y: Tensor) -> dict[str, Tensor]:
        if key not in self.state:
            self.state[key] = initial_state(y.shape[1], y.device)
        return self.state[key]

    def loss(self, step: StepContext):
        total = None
        for key in self.keys:
            y = units_as_columns(step.activations[key]).float()
            s = self._state_for(key, y)
            term = shade_penalty(y, s["mu0"], s["mu1"], self.hparams["detach_posterior"])
            total = term if total is None else total + term
        self._omega = None if total is None else total.detach()
        return None if total is None else self.hparams["weight"] * total

    def after_step(self, step: StepContext):
        for key in self.keys:
            y = units_as_columns(step.activations[key].detach()).float()
            update_moving_averages(y, self._state_for(key, y), self.hparams["momentum"])
        if getattr(self, "_omega", None) is not None:
            self._last_penalty = self._omega  # a tensor: read back once per epoch, no per-step host sync

    def diagnostics(self):
        return {"shade_omega": float(self._last_penalty)}

    def state_dict(self):
        return {k: {n: t.clone() for n, t in s.items()} for k, s in self.state.items()}

    def load_state_dict(self, state):
        self.state = {k: {n: t.clone() for n, t in s.items()} for k, s in state.items()}
