"""A third-party method: penalise the squared norm of the logits (a stand-in for any external regularizer)."""
from regbench.methods.base import Method, check_range


class ToyL2Logits(Method):
    name = "toy_l2_logits"
    description = "third-party test plugin: weight * mean squared logit"
    defaults = {"weight": 1e-3}

    @classmethod
    def validate(cls, hp):
        check_range("toy_l2_logits", "weight", hp["weight"], 0)

    @classmethod
    def search_space(cls, trial):
        return {"weight": trial.suggest_float("weight", 1e-5, 1e-1, log=True)}

    def loss(self, step):
        return self.hparams["weight"] * step.logits.float().pow(2).mean()
