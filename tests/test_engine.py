"""The one training loop: exact CPU repeatability, shared capture, methods leave the model as it was."""
import pytest
import torch

from regbench import engine, models, registry
from regbench.config import RunConfig
from regbench.datasets.digits import Digits
from regbench.datasets.mnist1d import MNIST1D


@pytest.fixture(scope="module")
def mnist1d(tmp_path_factory):
    return MNIST1D().load(tmp_path_factory.mktemp("data"), train_size=400)


def cfg(method="baseline", seed=0, **kw):
    base = dict(method=method, dataset="mnist1d", model="cnn1d", epochs=2, batch_size=64, seed=seed,
                hparams=registry.method_class(method).resolve({}), train_size=400, device="cpu")
    base.update(kw)
    return RunConfig(**base)


@pytest.mark.parametrize("method", ["baseline", "ses", "shade"])
def test_seeded_cpu_run_repeats_bit_for_bit(mnist1d, method):
    a = engine.train(cfg(method), mnist1d, registry.build_method(method))
    b = engine.train(cfg(method), mnist1d, registry.build_method(method))
    strip = lambda h: [{k: v for k, v in row.items() if k != "seconds"} for row in h]  # noqa: E731
    assert strip(a.history) == strip(b.history)
    c = engine.train(cfg(method, seed=1), mnist1d, registry.build_method(method))
    assert strip(c.history) != strip(a.history)


def test_history_has_every_per_epoch_metric(mnist1d):
    result = engine.train(cfg("ses", epochs=3), mnist1d, registry.build_method("ses"))
    assert [row["epoch"] for row in result.history] == [1, 2, 3]
    row = result.history[-1]
    for key in ("train_loss", "reg_loss", "train_acc", "val_acc", "test_acc", "gap", "seconds", "lr"):
        assert key in row
    assert row["reg_loss"] > 0
    assert row["gap"] == pytest.approx(row["train_acc"] - row["test_acc"])
    eranks = [row[f"erank/{name}"] for name in result.diagnostic_layers]
    assert len(eranks) == 4 and all(1.0 <= e <= 128 for e in eranks)
    assert any(key.startswith("ses_entropy/") for key in row)


def test_tuning_runs_never_touch_test_data(mnist1d):
    result = engine.train(cfg(eval_test=False), mnist1d, registry.build_method("baseline"))
    assert "test_acc" not in result.metrics
    assert result.metrics["gap"] == pytest.approx(result.metrics["train_acc"] - result.metrics["val_acc"])


def test_training_learns_something(mnist1d):
    result = engine.train(cfg(epochs=8), mnist1d, registry.build_method("baseline"))
    assert result.metrics["val_acc"] > 0.3  # chance is 0.1


def test_diverging_run_raises_diverged(mnist1d):
    with pytest.raises(engine.Diverged):
        engine.train(cfg(lr=1e12, optimizer="sgd", schedule="constant"), mnist1d, registry.build_method("baseline"))


def test_input_capture_sees_pre_activations_of_inplace_relus():
    """timm's ReLUs are inplace; SHADE's pre-activation capture must still see negative values
    (docs/methods.md §2.4)."""
    # zero_init_last=False: timm zero-initialises each block's last BN, which makes act2's input ≥ 0 at init.
    model = models.create_model("resnet18", 10, (3, 32, 32), zero_init_last=False)
    cap = engine.ActivationCapture(model)
    layers = models.select_layers(model, "all-relu")
    keys = cap.request(layers, where="input")
    cap.active = True
    model(torch.randn(4, 3, 32, 32))
    assert len(keys) == 17 and all((cap.store[k] < 0).any() for k in keys)
    cap.remove()
    assert all(m.inplace for _, m in layers)


@pytest.mark.parametrize("method", ["baseline", "ses", "shade"])
def test_attach_and_detach_leave_the_model_as_it_was(method):
    splits = Digits().load(None, train_size=100)
    torch.manual_seed(0)
    model = models.create_model("cnn", 10, splits.input_shape).eval()
    x = splits.x_val[:8]
    before_keys, before_out = list(model.state_dict()), model(x)
    cap = engine.ActivationCapture(model)
    m = registry.build_method(method)
    m.attach(model, engine.ModelContext(model, cap, 10, splits.input_shape))
    m.detach(model)
    cap.remove()
    assert list(model.state_dict()) == before_keys
    assert torch.equal(model(x), before_out)
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in model.modules())


def test_model_options_reach_the_model_constructor(mnist1d):
    """A method can change the model at build time (as timm's drop_rate will for dropout)."""
    from regbench.methods.base import Method

    class NarrowConvs(Method):
        name = "narrow"

        def model_options(self):
            return {"channels": 4}

    result = engine.train(cfg(epochs=1), mnist1d, NarrowConvs())
    conv_eranks = [v for k, v in result.metrics.items() if k.startswith("erank/block")]
    assert len(conv_eranks) == 3 and max(conv_eranks) <= 4.0 + 1e-6  # erank ≤ channels
