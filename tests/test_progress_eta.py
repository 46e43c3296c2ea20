"""The benchmark's progress line and time left: real runs of the console script in a plain pipe and on a real
pseudo-terminal, `regbench status` on the store they leave, and the once-a-minute line (at a short interval) of the
real Progress object on a real store with its real clock and thread."""
import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from test_progress import run_on_terminal

from regbench import protocol, status
from regbench.config import RunConfig
from regbench.progress import Progress
from regbench.store import open_storage

REGBENCH = str(Path(sys.executable).parent / "regbench")
LEFT = re.compile(r"\[0/1 runs\] · baseline seed 0 epoch (\d+)/30 · ([\d.]+) s/epoch · about (\d+(?:\.\d+)?) "
                  r"(s|min|h) left")


def _env():
    return {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}


def test_a_30_epoch_run_in_a_pipe_says_the_time_left_within_its_first_minute_and_status_too(tmp_path, data_dir):
    out = tmp_path / "out"
    started = time.monotonic()
    proc = subprocess.Popen([REGBENCH, "run", "--methods", "baseline", "--dataset", "digits", "--model", "mlp",
                             "--epochs", "30", "--seeds", "1", "--train-size", "200", "--out", str(out),
                             "--data-dir", str(data_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=_env())
    seen, first = [], None
    try:
        for line in proc.stderr:  # a pipe: no terminal, no tqdm bar
            seen.append((time.monotonic() - started, line.rstrip()))
            match = LEFT.search(line)
            if match and int(match.group(1)) >= 2:
                first = next(t for t, text in seen if text.startswith("[0/1 runs]"))
                break
    finally:
        proc.send_signal(signal.SIGTERM)  # enough seen: the run is stopped (resumable), not finished
        proc.communicate(timeout=120)
    assert first is not None, seen
    assert first < 60, seen  # the first line, well within the first minute
    assert seen[[t for t, _ in seen].index(first)][1].endswith("time left: measuring the first epoch")
    assert "ep/s" not in "\n".join(text for _, text in seen)

    shown = subprocess.run([REGBENCH, "status", str(out)], capture_output=True, text=True, env=_env(), check=False)
    assert shown.returncode == 0, shown.stderr
    line = shown.stdout.splitlines()[-1]
    match = re.fullmatch(r"time left: about \d+(\.\d+)? (s|min|h) \(30 epochs left at ([\d.]+) s/epoch, measured "
                         r"over 1 run\)", line)
    assert match and float(match.group(3)) > 0, shown.stdout


def test_on_a_terminal_one_live_line_above_the_epoch_bar_and_nothing_with_quiet(tmp_path, data_dir):
    common = ["run", "--methods", "baseline", "--dataset", "digits", "--model", "mlp", "--epochs", "3", "--seeds",
              "1", "--train-size", "200", "--data-dir", str(data_dir)]
    shown = run_on_terminal([*common, "--out", str(tmp_path / "a")], tmp_path)
    assert "[0/1 runs] · baseline seed 0 epoch 2/3 · " in shown and " left" in shown, shown
    assert "ep/s" in shown  # the run's own tqdm bar, under it
    assert "\n[0/1 runs]" not in shown.replace("\r\n", "\n")  # redrawn in place, not printed line after line
    quiet = run_on_terminal([*common, "--out", str(tmp_path / "b"), "--quiet"], tmp_path)
    assert "runs]" not in quiet and " left" not in quiet


def test_without_a_terminal_a_line_each_interval_while_an_epoch_runs(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'regbench.db'}")
    bench = protocol.Benchmark(name="eta", base=RunConfig(method="baseline", dataset="digits", model="mlp", epochs=4),
                               fixed={"baseline": {}}, seeds=[0, 1])
    protocol.save_spec(storage, bench)
    stream = io.StringIO()
    line = Progress(storage, bench, stream=stream, tty=False, interval=0.3)
    try:
        line.run_started("baseline seed 0")
        time.sleep(1.2)  # a long first epoch: the interval's lines say it is running
        ticks = [t for t in stream.getvalue().splitlines() if "running for" in t]
        assert len(ticks) >= 2, stream.getvalue()
        line.epoch_ended(1)
        time.sleep(0.05)
        line.epoch_ended(2)
    finally:
        line.close()
    last = stream.getvalue().splitlines()[-1]
    rate = float(re.search(r"([\d.]+) s/epoch", last).group(1))
    assert 0.5 < rate < 5, last  # (1.2 s + 0.05 s) / 2 epochs, give or take a loaded machine
    # 8 planned epochs (2 seeds × 4), 2 of them done: 6 × the measured rate
    assert status.work_left(storage, bench) == (8, 0)
    assert abs(line.time_left() - 6 * line.seconds_per_epoch()) < 1e-9 and last.startswith("[0/2 runs] · baseline seed 0 epoch 2/4")
