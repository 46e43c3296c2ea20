"""benchmarks/paper_table.py (issue 19, item 4) run shortened on the CPU end to end, as a user runs it, so the script
that times a paper's table cannot rot: a narrow resnet18, 64 images, one epoch, two arms (the plain loop and the
hooked, parametrized SES+SN), two seeds trained as one group (--parallel-seeds 2). Speed is not checked here."""
import os
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "paper_table.py"


def test_paper_table_runs_shortened_on_cpu(tmp_path):
    args = ["--device", "cpu", "--epochs", "1", "--seeds", "2", "--parallel-seeds", "2", "--images-per-epoch", "64",
            "--arms", "baseline,ses+spectral_norm", "--model-kwargs", "channels=8,16,32,64", "--threads", "1",
            "--out", str(tmp_path)]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "64 train / 6 val / 12 test images; 1 steps per epoch" in out
    for arm in ("baseline", "ses+spectral_norm"):
        row = re.search(rf"^{re.escape(arm)}\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", out, re.M)
        assert row, f"no timing row for {arm}:\n{out}"
        wall, rate, train_rate = map(float, row.groups())
        assert wall > 0 and 0 < rate <= train_rate  # the wall time holds the training loop and the evaluation
        assert len(list((tmp_path / arm).glob("*.db"))) == 1  # each arm went through the protocol's store
    assert re.search(r"^whole table: [\d.]+ s = [\d.]+ min wall", out, re.M)
    assert "target ≤ 10 min on one H200; estimate before it 85 min" in out
    assert "projected from these per-arm rates (arms run here only)" in out
    # every seed of every arm trained (the protocol's one line per finished run)
    assert sorted(re.findall(r"\] (\S+) seed (\d): test", done.stderr)) == [
        ("baseline", "0"), ("baseline", "1"), ("ses+spectral_norm", "0"), ("ses+spectral_norm", "1")]
