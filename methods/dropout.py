"""Dropout (Srivastava, Hinton, Krizhevsky, Sutskever, Salakhutdinov, JMLR 15, 2014) and timm's drop-path.

In training, each unit of the dropped tensor is kept with probability q = 1 − rate and scaled by 1/q ("inverted"
dropout, so eval mode is the identity):

    r_j ~ Bernoulli(q),   ỹ = r ⊙ y / q                                     (Srivastava et al. 2014, Sec. 4)

The paper's p is the *retention* probability (our q) and it rescales the weights by p at test time instead of the
activations by 1/p in training; both give the same network in expectation.

Placement (docs/methods.md §4.1; SHADE (Blot et al., ICIP 2018) Table 1 "dropout" and "SHADE+D" do not say where,
docs/methods.md §2.5 [?/C]):

* ``placement="classifier"`` (default): dropout on the classifier's input, through a forward pre-hook on
  ``models.classifier_layer`` (rule ``classifier``). It works on the built-in nets and on timm models alike, is
  active only when the classifier is in training mode, and changes no module and no state_dict key. The hook is
  prepended, so a capture of the classifier's input (``ctx.capture(..., where="input")``) by a method composed with
  this one sees the dropped features, as it would with timm's own ``drop_rate``; outputs of earlier layers (SES's
  pooled-feature hook) are untouched.
* ``placement="timm"``: ``model_options()`` returns ``{"drop_rate": rate}`` (+ ``"drop_path_rate"`` when > 0) for
  ``timm.create_model``. On timm ResNets ``drop_rate`` is ``F.dropout`` on the pooled features just before ``fc``
  (the same place as above) and ``drop_path_rate`` is stochastic depth on the residual branches, rising linearly to
  ``drop_path_rate`` in the last block. Built-in nets take no such options: ``create_model`` rejects them with a
  ConfigError, and ``attach`` refuses a model that was built without them.

Batch normalization reduces dropout's benefit (SHADE Table 1: dropout helps the MLP and AlexNet only).
"""
from __future__ import annotations

import torch.nn.functional as F

from regbench.errors import HparamError

from .base import Method, check_range

PLACEMENTS = ("classifier", "timm")


class Dropout(Method):
    name = "dropout"
    description = "dropout on the classifier's input (or timm's drop_rate / drop_path_rate)"
    paper = "Srivastava et al. 2014 (JMLR); Blot et al. 2018 (SHADE, ICIP) Table 1"
    defaults = {"rate": 0.3, "placement": "classifier", "drop_path_rate": 0.0}

    @classmethod
    def validate(cls, hp):
        check_range("dropout", "rate", hp["rate"], 0, 1, high_open=True)
        check_range("dropout", "drop_path_rate", hp["drop_path_rate"], 0, 1, high_open=True)
        if hp["placement"] not in PLACEMENTS:
            raise HparamError(f"dropout.placement={hp['placement']!r} is not one of: {', '.join(PLACEMENTS)}")
        if hp["drop_path_rate"] > 0 and hp["placement"] != "timm":
            raise HparamError(f"dropout.drop_path_rate={hp['drop_path_rate']!r} needs placement='timm' "
                              f"(stochastic depth is a timm model option), not {hp['placement']!r}")

    @classmethod
    def search_space(cls, trial):
        # docs/methods.md §4.1 [C]: rate in [0, 0.5]. Placement is not searched: "timm" fails on the built-in nets, and
        # drop_path_rate exists only with it; set --set dropout.placement=timm to search rate with timm's dropout.
        return {"rate": trial.suggest_float("rate", 0.0, 0.5)}

    def model_options(self):
        if self.hparams["placement"] != "timm":
            return {}
        options = {"drop_rate": self.hparams["rate"]}
        if self.hparams["drop_path_rate"] > 0:  # only when asked: not every timm architecture takes it
            options["drop_path_rate"] = self.hparams["drop_path_rate"]
        return options

    def attach(self, model, ctx):
        self._handle = None
        if self.hparams["placement"] == "timm":
            family = getattr(model, "regbench_family", None)
            if family in ("mlp", "cnn", "cnn1d"):
                raise HparamError(f"dropout.placement='timm' needs a timm model, not the built-in {family!r}; "
                                  "use dropout.placement=classifier")
            built = getattr(model, "drop_rate", self.hparams["rate"])
            if float(built) != float(self.hparams["rate"]):
                raise HparamError(f"dropout.placement='timm': the model was built with drop_rate={built}, not "
                                  f"dropout.rate={self.hparams['rate']} (build it with Dropout.model_options())")
            return
        if self.hparams["rate"] == 0:
            return
        (_, classifier), = ctx.select_layers("classifier")
        p = float(self.hparams["rate"])

        def drop_input(module, args):
            if not module.training:
                return None
            return (F.dropout(args[0], p=p, training=True), *args[1:])

        self._handle = classifier.register_forward_pre_hook(drop_input, prepend=True)

    def detach(self, model):
        if getattr(self, "_handle", None) is not None:
            self._handle.remove()
        self._handle = None
