"""Weight decay: coupled L2 with SGD, decoupled with AdamW (Loshchilov & Hutter, ICLR 2019, "Decoupled Weight
Decay Regularization", Alg. 1 (SGD) and Alg. 2 (Adam/AdamW); docs/methods.md §4.2).

The method only hands the optimizer a strength λ and parameter groups; the engine's optimizer applies it:

* SGD (coupled L2, torch.optim.SGD):     g ← ∇L(θ) + λθ, then momentum b and θ ← θ − γ·b
* AdamW (decoupled, torch.optim.AdamW): θ ← θ(1 − γλ) − γ·m̂/(√v̂ + ε), with m̂, v̂ from ∇L only

For plain SGD both are the same up to λ' = λ/γ; for Adam they differ (coupled L2 is rescaled by 1/√v̂). torch's
AdamW multiplies λ by the learning rate γ (the paper multiplies it by the schedule factor η_t only), so its λ is
the paper's λ divided by the base learning rate.

``exclude_norm_bias=True`` (default, the issue's "timm convention"; timm's ``filter_bias_and_bn``) puts every
parameter with ndim ≤ 1 (norm weights and biases, BN's too) or a name ending in ``.bias``, plus the names in
``model.no_weight_decay()``, in a group with weight decay 0, via ``timm.optim.param_groups_weight_decay``.
``exclude_norm_bias=False`` decays every parameter, which is the SES paper's recipe (Sec. 8: plain SGD, 5e-4 on
everything; docs/methods.md §4.2 suggested that as the default, the issue asked for timm's).

λ default 5e-4 is the SES/CIFAR SGD recipe. With AdamW it is weak (AdamW's own default is 1e-2): the method cannot
see which optimizer the run uses, so one log range covers both, [1e-5, 1e-1]: [1e-5, 1e-3] is the SGD range and
[1e-3, 1e-1] the AdamW range of docs/methods.md §4.2.

Registering this method replaces the run's ``--weight-decay`` (config.weight_decay) for the parameters it groups.
"""
from __future__ import annotations

from regbench.errors import HparamError

from .base import Method, check_range


def weight_decay_groups(model, strength: float, exclude_norm_bias: bool = True) -> list[dict]:
    """Optimizer parameter groups: decayed with ``strength``, or 0 for norm/bias/no_weight_decay() parameters."""
    if not exclude_norm_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": strength}]
    # imported here: timm imports torchvision (~2 s), which a run of the built-in models never needs
    from timm.optim import param_groups_weight_decay

    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    groups = param_groups_weight_decay(model, weight_decay=strength, no_weight_decay_list=skip)
    # timm puts everything in the no-decay group when strength == 0; state the 0 explicitly either way
    for group in groups:
        group.setdefault("weight_decay", 0.0)
    return groups


class WeightDecay(Method):
    name = "weight_decay"
    description = "weight decay: coupled L2 with SGD, decoupled with AdamW; norm/bias params excluded by default"
    paper = "Loshchilov & Hutter 2019 (ICLR); Blot et al. 2018 (SHADE, ICIP) Table 1"
    defaults = {"strength": 5e-4, "exclude_norm_bias": True}

    @classmethod
    def validate(cls, hp):
        check_range("weight_decay", "strength", hp["strength"], 0)
        if not isinstance(hp["exclude_norm_bias"], bool):
            raise HparamError(f"weight_decay.exclude_norm_bias={hp['exclude_norm_bias']!r} is not a bool (true/false)")

    @classmethod
    def search_space(cls, trial):
        # One range for both optimizers (see the module docstring): SGD's [1e-5, 1e-3] and AdamW's [1e-3, 1e-1].
        return {"strength": trial.suggest_float("strength", 1e-5, 1e-1, log=True)}

    def optimizer_options(self):
        strength, exclude = float(self.hparams["strength"]), self.hparams["exclude_norm_bias"]
        return {"weight_decay": strength,
                "param_groups": lambda model: weight_decay_groups(model, strength, exclude)}
