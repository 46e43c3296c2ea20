"""docs/architecture.md, "Data flows one way", enforced: reports never import training code; the engine never imports a
specific method; methods never import Optuna, MLflow, the store or the reports."""
import subprocess
import sys

import pytest


def modules_after_import(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


def test_report_needs_neither_torch_nor_training_code():
    loaded = modules_after_import("regbench.report")
    assert not {"torch", "regbench.engine", "regbench.protocol", "regbench.runner", "regbench.models", "mlflow"} & loaded


def test_engine_knows_only_the_method_interface():
    loaded = modules_after_import("regbench.engine")
    assert "regbench.methods.base" in loaded
    assert not {m for m in loaded if m.startswith("regbench.methods.") and m != "regbench.methods.base"}
    assert not {"optuna", "mlflow", "regbench.protocol", "regbench.runner", "regbench.report"} & loaded


@pytest.mark.parametrize("method", ["baseline", "ses", "shade"])
def test_methods_know_nothing_of_the_protocol(method):
    loaded = modules_after_import(f"regbench.methods.{method}")
    assert not {"optuna", "mlflow", "regbench.protocol", "regbench.runner", "regbench.store", "regbench.report",
                "regbench.engine"} & loaded
