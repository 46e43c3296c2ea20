"""Conformance suite (in the spirit of DomainBed's test_models): every registered method, and the papers' composites,
on every model family, through the engine's real training step on tiny real data (scikit-learn digits).

attach → 3 training steps → finite loss and gradients → eval → detach leaves the model's state_dict keys and its
forward output exactly as they were, and the method changed training (its parameters differ from baseline's after
the same 3 steps from the same initialisation). A new method registered through the entry point gets all of this for
free, because the method list comes from the registry.
"""
import warnings

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from regbench import engine, models, registry
from regbench.config import RunConfig

COMPOSITES = ["ses+spectral_norm", "shade+dropout"]
METHODS = registry.method_names() + COMPOSITES
# resnet18 sees 16×16 RGB (the CIFAR stem applies up to 32×32) to keep 13 methods × 3 CPU steps affordable in CI.
MODELS = {"mlp": (1, 8, 8), "cnn": (1, 8, 8), "cnn1d": (64,), "resnet18": (3, 16, 16)}
BATCH, STEPS = 16, 3


def digits_as(shape) -> tuple[torch.Tensor, torch.Tensor]:
    """Real 8×8 digit images, reshaped (or upsampled to RGB for resnet18), standardised."""
    d = load_digits()
    x = torch.tensor(d.images[: BATCH * (STEPS + 1)], dtype=torch.float32) / 16.0
    x = (x - x.mean()) / x.std()
    y = torch.tensor(d.target[: BATCH * (STEPS + 1)])
    if shape == (64,):
        return x.reshape(len(x), 64), y
    if len(shape) == 3 and shape[0] == 3:
        return F.interpolate(x[:, None], size=shape[1:], mode="bilinear").repeat(1, 3, 1, 1), y
    return x[:, None], y


def train_three_steps(method_name: str, model_name: str):
    """Returns (state_dict keys before attach, after detach, eval output before/after detach, final state, losses)."""
    shape = MODELS[model_name]
    x, y = digits_as(shape)
    torch.manual_seed(0)
    method = registry.build_method(method_name)
    model = models.create_model(model_name, 10, shape, **method.model_options())
    keys_before = list(model.state_dict().keys())
    capture = engine.ActivationCapture(model)
    method.attach(model, engine.ModelContext(model, capture, 10, shape))
    capture.wanted = set(capture.keys())
    config = RunConfig(method=method_name, dataset="digits", model=model_name, optimizer="sgd", lr=0.05)
    optimizer = engine.build_optimizer(config, model, method.optimizer_options())
    model.train()
    losses = []
    torch.manual_seed(1)  # same dropout masks / probes for every method
    for step in range(STEPS):
        xb, yb = x[step * BATCH:(step + 1) * BATCH], y[step * BATCH:(step + 1) * BATCH]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. SES's "target unreachable at batch 16" notice
            task, reg = engine.train_step(model, method, capture, optimizer, xb, yb, step=step)
        losses.append((float(task), float(reg)))
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads, "no parameter received a gradient"
        assert all(torch.isfinite(g).all() for g in grads), f"non-finite gradient at step {step}"
    model.eval()
    x_eval = x[STEPS * BATCH:]
    with torch.no_grad():
        out_attached = model(x_eval)
    method.detach(model)
    capture.remove()
    with torch.no_grad():
        out_detached = model(x_eval)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return keys_before, list(model.state_dict().keys()), out_attached, out_detached, state, losses


_BASELINE: dict = {}


def baseline_state(model_name):
    if model_name not in _BASELINE:
        _BASELINE[model_name] = train_three_steps("baseline", model_name)[4]
    return _BASELINE[model_name]


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("method_name", METHODS)
def test_method_conforms(method_name, model_name):
    keys_before, keys_after, out_attached, out_detached, state, losses = train_three_steps(method_name, model_name)
    assert all(torch.isfinite(torch.tensor(pair)).all() for pair in losses), losses
    assert keys_after == keys_before, "detach did not restore the state_dict keys"
    assert torch.isfinite(out_attached).all()
    assert torch.equal(out_attached, out_detached), "detach changed what the trained model computes"
    if method_name != "baseline":
        base = baseline_state(model_name)
        assert any(not torch.equal(state[k], base[k]) for k in base), f"{method_name} changed nothing in training"


def test_every_registered_method_is_in_the_suite():
    assert {"baseline", "ses", "shade", "spectral_norm", "dropout", "weight_decay", "dln_entropy",
            "label_smoothing", "confidence_penalty", "decov", "vicreg_reg"} <= set(METHODS)
