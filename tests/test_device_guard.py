"""Issue 16, item 2: the CUDA path's bug class (a tensor made with no device that later meets the run's tensors, as
ECE's bins did) is caught on the CPU. Every registered method, both composites, the metrics, a checkpoint stop and
resume mid-epoch, --parallel-seeds with both backends and a shift set train under ``ExplicitDevice``
(tests/device_guard.py: why this rule, and why library code cannot trip it); any factory call of regbench's own code
that names no device fails the test with its file and line."""
import dataclasses

import pytest
import torch
from device_guard import ExplicitDevice
from regbench.datasets import shift as shift_sets
from regbench.datasets.digits import Digits

from regbench import engine, metrics, registry
from regbench.config import RunConfig

COMPOSITES = ["ses+spectral_norm", "shade+dropout"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory, test_device):
    data_dir = tmp_path_factory.mktemp("digits")
    with ExplicitDevice() as guard:  # loading and the shift set's generation are guarded too
        splits = Digits().load(data_dir, train_size=96)
        shift = shift_sets.load("digits_c_style", data_dir, splits, corruptions_subset=["fog"], severities=[5])
    assert not guard.violations, guard.report()
    return dataclasses.replace(splits, shift=shift)


def cfg(method, seed=0, model="cnn", epochs=1, device="cpu", **kw):
    return RunConfig(method=method, dataset="digits", model=model, epochs=epochs, batch_size=32, seed=seed,
                     hparams=registry.method_class(method).resolve(kw.pop("hparams", {})), train_size=96,
                     device=device, eval_test=True, **kw)


def every_method() -> list[str]:
    return sorted(registry.method_names()) + COMPOSITES


def test_the_guard_sees_an_implicit_device_factory_in_regbench_code():
    """The guard itself can fail: ECE built as before the fix (bins with no device) is reported with its line."""
    import regbench.metrics as m

    source = "def bins(index):\n    return torch.zeros(3, dtype=torch.float64).index_add_(0, index, index.double())\n"
    scope = {"torch": torch}
    exec(compile(source, m.__file__, "exec"), scope)  # compiled as if it were a line of regbench/metrics.py
    with ExplicitDevice() as guard:
        scope["bins"](torch.tensor([0, 2], device="cpu"))
        torch.zeros(3)  # this test file is not regbench code: ignored
    assert len(guard.violations) == 1 and "metrics.py:2 torch.zeros" in guard.violations[0]


def test_every_method_trains_evaluates_and_resumes_with_explicit_devices(digits, test_device, tmp_path):
    guard = ExplicitDevice()
    with guard:
        for method in every_method():
            config = cfg(method, device=test_device)
            result = engine.train(config, digits, registry.build_method(method, config.hparams))
            assert "shift_acc" in result.metrics and "test_ece" in result.metrics, method
        # SES's other eigenvalue paths build their probes and polynomial tables with tensors of their own
        for path in ("lowrank", "hutchinson"):
            config = cfg("ses", device=test_device, epochs=1, hparams={"eigen_path": path})
            engine.train(config, digits, registry.build_method("ses", config.hparams))
        logits = torch.randn(50, 10, device=test_device)
        metrics.calibration(logits, torch.randint(0, 10, (50,), device=test_device))
    assert guard.checked > 0
    assert not guard.violations, guard.report()


def test_a_stop_mid_epoch_and_its_resume_and_parallel_seeds_use_explicit_devices(digits, test_device, tmp_path):
    from test_interrupts import stopping_at

    guard = ExplicitDevice()
    with guard:
        config = cfg("shade", device=test_device, epochs=2)
        path = tmp_path / "run.pt"
        with pytest.raises(KeyboardInterrupt):
            engine.train(config, digits, stopping_at(registry.build_method("shade", config.hparams), 4),
                         checkpoint=path, checkpoint_seconds=3600)
        resumed = engine.train(config, digits, registry.build_method("shade", config.hparams), checkpoint=path)
        assert resumed.resumed_from_step == 5  # 3 steps per epoch: stopped mid-epoch 2
        for method, backend in (("baseline", "vmap"), ("ses", "streams")):
            configs = [cfg(method, seed=s, device=test_device) for s in (0, 1)]
            out = engine.train_group(configs, digits, lambda c: registry.build_method(c.method, c.hparams),
                                     backend=backend, checkpoints=[tmp_path / f"{method}{s}.pt" for s in (0, 1)],
                                     checkpoint_seconds=0)
            assert all(isinstance(r, engine.RunResult) for r in out), (method, backend)
    assert not guard.violations, guard.report()


@pytest.mark.parametrize("args,message", [
    (["--device", f"cuda:{torch.cuda.device_count() if torch.cuda.is_available() else 0}"], "--device cuda:"),
    (["--device", "cuda:x"], "is not one of: auto, cpu, cuda, cuda:N"),
    (["--seeds", "2", "--parallel-seeds", "3"], "--parallel-seeds 3 is more than the 2 seed(s) queued"),
])
def test_a_device_or_group_that_cannot_be_had_is_one_line_exit_2_nothing_written(tmp_path, capsys, args, message):
    from regbench.cli import main

    out = tmp_path / "out"
    assert main(["run", "--methods", "ses", "--out", str(out), "--quiet", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and not out.exists()
