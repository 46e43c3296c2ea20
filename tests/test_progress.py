"""A progress bar on a terminal; none with --quiet or when stderr is not a terminal."""
import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path


def run_on_terminal(args: list[str], cwd) -> str:
    """Run the real console script with stderr on a pseudo-terminal; return what the terminal showed."""
    main_fd, child_fd = pty.openpty()
    # A fresh pty is 0×0; tqdm fits its bar to the width, so give it a real terminal's size.
    fcntl.ioctl(child_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "regbench"), *args], stdout=subprocess.DEVNULL,
                            stderr=child_fd, env=env, cwd=cwd)
    os.close(child_fd)
    chunks = []
    while True:
        try:
            data = os.read(main_fd, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=300) == 0
    os.close(main_fd)
    return b"".join(chunks).decode(errors="replace")


def test_progress_bar_on_a_terminal_and_not_with_quiet(tmp_path, data_dir):
    common = ["run", "--methods", "ses", "--epochs", "2", "--seeds", "1", "--data-dir", str(data_dir)]
    shown = run_on_terminal([*common, "--out", str(tmp_path / "a")], tmp_path)
    assert "ses seed 0:" in shown and "2/2" in shown and "ep/s" in shown  # tqdm's epoch bar
    quiet = run_on_terminal([*common, "--out", str(tmp_path / "b"), "--quiet"], tmp_path)
    assert "ep/s" not in quiet and "seed 0" not in quiet


def test_no_progress_bar_when_stderr_is_not_a_terminal(tmp_path, data_dir):
    proc = subprocess.run([str(Path(sys.executable).parent / "regbench"), "run", "--methods", "ses", "--epochs", "2",
                           "--seeds", "1", "--out", str(tmp_path / "c"), "--data-dir", str(data_dir)],
                          capture_output=True, text=True)
    assert proc.returncode == 0
    assert "ep/s" not in proc.stderr and "[2/2] ses seed 0: test" in proc.stderr  # one line per run, no bar
