"""Spectral normalization (Miyato, Kataoka, Koyama, Yoshida, ICLR 2018; Yoshida & Miyato 2017, arXiv:1705.10941).

Each chosen weight W is replaced, on every forward pass, by

    W_SN = W / σ(W),   σ(W) ≈ uᵀ W_mat v                               (Miyato et al. 2018, Sec. 2.1, Alg. 1)

where W_mat is W reshaped to C_out × (C_in·k…) and u, v come from power iteration on W_mat (15 iterations when it is
registered, then ``n_power_iterations`` more on each training-mode forward; eval mode reuses the stored u, v). We
use torch's own ``torch.nn.utils.parametrizations.spectral_norm``, with one change of schedule: the power
iterations of all layers run once per training forward in a model pre-hook, batched per weight shape, and the
parametrizations then run in eval mode, so reading a weight never iterates again (same u, v and W_SN as torch's
training-mode forward after the same updates, tested; docs/methods.md §3.1): the raw
weight becomes ``<layer>.parametrizations.weight.original`` and u, v become buffers, so the state_dict keys change
while the method is attached. ``detach`` removes the parametrization with ``leave_parametrized=True`` after putting
the parametrization in eval mode (removal in training mode would run one more power iteration and change the
weights): the layer keeps W_SN as its plain ``weight`` (same Parameter object), so eval outputs are bit-identical
before and after detach and the keys are the original ones again.

The SES paper's Exp. 8 (Sec. 8.8, "Spectral Norm" and "SES+SN" on CIFAR-100) does not say which layers or how many
power iterations (docs/methods.md §7, question 3); our defaults [C] wrap every Conv and Linear (rule ``weights``) with
one iteration per step, and ``layers="hidden-weights"`` leaves the classifier free.

Caveats (docs/methods.md §3.1), worth recording next to any SN result:

* **BN invariance.** In a BN network a convolution followed by BatchNorm is invariant to the scale of its weight, so
  dividing by σ changes nothing in the forward pass there; SN then acts through the effective learning rate
  (gradients scale by 1/σ) and through layers without a following BN, chiefly the Linear classifier.
* **Reshaped norm ≠ operator norm.** σ of the C_out × (C_in·k_h·k_w) matrix is not the convolution's operator norm:
  for a 3×3 kernel the operator norm lies between σ and 3σ (measured ratios 1.5-2.4), so SN does not make a conv
  1-Lipschitz.
* Under SN the raw weight's scale is free (only its direction matters), so weight decay on it acts differently.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm

from regbench.errors import HparamError

from .base import Method, check_range

_WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class SpectralNorm(Method):
    name = "spectral_norm"
    description = "spectral normalization: each chosen Conv/Linear weight divided by its largest singular value"
    paper = "Miyato et al. 2018 (ICLR); Yoshida & Miyato 2017; Le Bone 2026 (SES) Exp. 8"
    defaults = {"layers": "weights", "n_power_iterations": 1}

    @classmethod
    def validate(cls, hp):
        if isinstance(hp["n_power_iterations"], bool) or not isinstance(hp["n_power_iterations"], int):
            raise HparamError(f"spectral_norm.n_power_iterations={hp['n_power_iterations']!r} is not an integer ≥ 1")
        check_range("spectral_norm", "n_power_iterations", hp["n_power_iterations"], 1)
        if not isinstance(hp["layers"], str) or not hp["layers"]:
            raise HparamError(f"spectral_norm.layers={hp['layers']!r} is not a layer rule (e.g. weights, "
                              "hidden-weights, linear, name:GLOB)")

    @classmethod
    def search_space(cls, trial):
        # docs/methods.md §3.1 [C]: iterations in {1, 2, 5}; with or without the classifier (both rules exist on every
        # model family, so any trial is valid on MLP, CNN, CNN1d and ResNet alike).
        return {
            "n_power_iterations": trial.suggest_categorical("n_power_iterations", [1, 2, 5]),
            "layers": trial.suggest_categorical("layers", ["weights", "hidden-weights"]),
        }

    def attach(self, model, ctx):
        rule = self.hparams["layers"]
        chosen = [(n, m) for n, m in ctx.select_layers(rule)
                  if isinstance(m, _WEIGHT_LAYERS) and isinstance(getattr(m, "weight", None), torch.Tensor)
                  and m.weight.ndim >= 2]
        if not chosen:
            raise HparamError(f"spectral_norm.layers={rule!r} selects no Conv or Linear layer on this model; "
                              "use weights, hidden-weights, linear or name:GLOB")
        for name, module in chosen:
            if parametrize.is_parametrized(module, "weight"):
                # removing ours would remove the other method's parametrization too (it is one list per tensor)
                raise HparamError(f"spectral_norm: layer {name!r} already has a parametrized weight "
                                  "(another method?); spectral_norm cannot share it")
        self.layers: list[tuple[str, nn.Module]] = []
        self._order: dict[nn.Module, list[str]] = {}
        for name, module in chosen:
            self._order[module] = list(module._parameters)  # removal re-registers weight last; we restore order
            spectral_norm(module, "weight", n_power_iterations=self.hparams["n_power_iterations"])
            self.layers.append((name, module))
        # The power iteration of every layer runs once per training forward, before it, batched over
        # layers of equal matrix shape; the parametrizations then run in eval mode (σ = uᵀWv and W/σ only).
        groups: dict[tuple, list] = {}
        for _, module in self.layers:
            sn = module.parametrizations.weight[0]
            shape = sn._reshape_weight_to_matrix(module.parametrizations.weight.original).shape
            groups.setdefault(tuple(shape), []).append((module, sn))
        self._groups = list(groups.values())
        self._hook = model.register_forward_pre_hook(self._before_forward)

    def _before_forward(self, model, _args):
        if model.training:
            self.power_iteration()

    @torch.no_grad()
    def power_iteration(self) -> None:
        """torch's ``_SpectralNorm._power_method`` (n_power_iterations steps of u ← Wv/‖Wv‖, v ← Wᵀu/‖Wᵀu‖, in place
        on the u, v buffers) for every layer, batched per matrix shape (one bmm per step per shape; a lone layer uses
        torch's own mv, bit for bit). Then every parametrization is put in eval mode for the forward that follows, so
        it does not iterate again: the same u, v and the same W_SN as torch's training-mode forward."""
        n = self.hparams["n_power_iterations"]
        for group in self._groups:
            sns = [sn for _, sn in group]
            mats = [sn._reshape_weight_to_matrix(m.parametrizations.weight.original) for m, sn in group]
            eps = sns[0].eps
            if len(group) == 1:
                sns[0]._power_method(mats[0], n)
            else:
                w = torch.stack(mats)
                u, v = torch.stack([sn._u for sn in sns]), torch.stack([sn._v for sn in sns])
                for _ in range(n):
                    u = F.normalize(torch.bmm(w, v.unsqueeze(-1)).squeeze(-1), dim=1, eps=eps)
                    v = F.normalize(torch.bmm(w.mT, u.unsqueeze(-1)).squeeze(-1), dim=1, eps=eps)
                torch._foreach_copy_([sn._u for sn in sns], list(u.unbind(0)))
                torch._foreach_copy_([sn._v for sn in sns], list(v.unbind(0)))
            for sn in sns:
                sn.training = False

    @torch.no_grad()
    def diagnostics(self):
        """σ estimates uᵀ W_mat v of the raw weights (what SN divides by), from the stored u, v: no extra work."""
        sigmas = []
        for _, module in getattr(self, "layers", []):
            sn = module.parametrizations.weight[0]
            w = sn._reshape_weight_to_matrix(module.parametrizations.weight.original)
            sigmas.append(float(torch.vdot(sn._u, torch.mv(w, sn._v))))
        if not sigmas:
            return {}
        return {"sn_sigma/mean": sum(sigmas) / len(sigmas), "sn_sigma/max": max(sigmas)}

    def detach(self, model):
        hook = getattr(self, "_hook", None)
        if hook is not None:
            hook.remove()
            self._hook = None
        for _, module in getattr(self, "layers", []):
            if not parametrize.is_parametrized(module, "weight"):
                continue
            # Eval mode for the removal only: in training mode it would run one more power iteration (§3.1).
            for p in module.parametrizations.weight:
                p.eval()
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            params = module._parameters  # reorder in place: state_dict keys come out in the original order
            for key in self._order.get(module, []):
                if key in params:
                    params[key] = params.pop(key)
        self.layers, self._order = [], {}
