"""One check of the CUDA path on any GPU machine (issue 16, item 4); run through benchmarks/gpu_check.sh.

Parts, each a subprocess timed and judged on its own, then ONE summary table (pass/fail, seconds, headline):

1. tests   — the device-switched tests with REGBENCH_TEST_DEVICE=<device> (tolerances where CUDA promises no bits).
2. cli     — `regbench run` end to end: every registered method and both composites, --trials 2, a shift set,
             --parallel-seeds 2, to a leaderboard.
3. sigint  — a run stopped by SIGINT mid-epoch (exit 130, a resumable trial) and the rerun that resumes it
             (resumed_from_step > 0 in the store).
4. to-cpu  — a checkpoint written on the device by a stopped run, then the same command with --device cpu: it must
             resume from the stopped step (resumed_from_step > 0; not bit-for-bit, as the warning says: the device's
             random streams restart) and finish with a leaderboard.
5-9. the speed benchmarks at GPU settings, shortened: throughput.py, seeds_per_gpu.py, ses_overhead.py,
             paper_table.py (one epoch of each of the table's 12 runs, projected to the full table by the script),
             method_overhead.py; each row shows its headline.

``--device cpu`` runs every part on the CPU with smaller sizes (to check this script on a machine without a GPU);
on such a machine the default (cuda) stops with one line, exit 2, before anything runs.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
COMPOSITES = "ses+spectral_norm,shade+dropout"
# the tests that take their device from REGBENCH_TEST_DEVICE (tests/conftest.py: test_device)
TEST_FILES = ("tests/test_device_guard.py", "tests/test_calibration.py", "tests/test_interrupts.py",
              "tests/test_shade_triton.py", "tests/test_ses_exact_spectra.py")


def fail(message: str) -> None:
    print(f"gpu_check: {message}", file=sys.stderr)
    sys.exit(2)


def check_device(device: str) -> None:
    import torch

    if device == "cpu":
        return
    if not torch.cuda.is_available():
        fail("no CUDA device here (torch.cuda.is_available() is False); run it on a GPU node, or pass --device cpu "
             "to exercise the script on the CPU")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        fail(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


class Check:
    def __init__(self, args):
        self.args, self.rows = args, []
        self.work = Path(args.work or tempfile.mkdtemp(prefix="regbench-gpu-check-"))
        self.env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        self.env["PYTHONUNBUFFERED"] = "1"
        self.log = self.work / "log"
        self.log.mkdir(parents=True, exist_ok=True)

    def regbench(self) -> list[str]:
        return [sys.executable, "-m", "regbench.cli"]

    def part(self, name: str, fn) -> None:
        started = time.perf_counter()
        try:
            ok, headline = fn()
        except Exception as exc:  # noqa: BLE001 - a part that crashes is a failed part, the others still run
            ok, headline = False, f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:90] if str(exc).strip() else ''}"
        seconds = time.perf_counter() - started
        self.rows.append((name, ok, seconds, headline))
        print(f"[{'PASS' if ok else 'FAIL'}] {name} ({seconds:.0f} s) {headline}", flush=True)

    def sh(self, name: str, cmd: list[str], timeout: float, env=None, cwd=None) -> subprocess.CompletedProcess:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or self.env,
                              cwd=cwd or self.work)
        (self.log / f"{name}.log").write_text(f"$ {' '.join(cmd)}\nexit {done.returncode}\n{done.stdout}\n{done.stderr}")
        return done

    # ---- parts -----------------------------------------------------------------------------------------------
    def tests(self):
        files = self.args.test_files.split(",")
        env = {**self.env, "REGBENCH_TEST_DEVICE": self.args.device}
        # the checkout's addopts ask for pytest-xdist, which an offline GPU node may not have: replaced here
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-o", "addopts=", "--import-mode=importlib",
               "-p", "no:cacheprovider", "-m", "not slow", "--rootdir", str(ROOT), *files]
        done = self.sh("tests", cmd, self.args.part_timeout, env=env, cwd=ROOT)
        tail = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
        return done.returncode == 0, tail[:100]

    def run_args(self, out: Path, *extra: str) -> list[str]:
        return [*self.regbench(), "run", "--out", str(out), "--data-dir", str(self.work / "data"), "--quiet", *extra]

    def cli(self):
        from regbench import registry

        def small(gpu, cpu):
            return cpu if self.args.device == "cpu" else gpu

        methods = ",".join([m for m in registry.method_names() if m != "baseline"] + COMPOSITES.split(","))
        out = self.work / "cli"
        done = self.sh("cli", self.run_args(out, "--methods", methods, "--dataset", "digits", "--model", "cnn",
                                            "--trials", small("2", "1"), "--epochs", small("2", "1"), "--seeds", "2",
                                            "--parallel-seeds", "2",
                                            "--shift", "digits_c_style", "--train-size", "300", "--device",
                                            self.args.device), self.args.part_timeout)
        board = out / "leaderboard.md"
        ok = done.returncode == 0 and board.is_file()
        rows = sum(1 for line in board.read_text().splitlines() if line.startswith("| ")) if board.is_file() else 0
        return ok, f"exit {done.returncode}, {len(methods.split(',')) + 1} methods, leaderboard {rows} table rows"

    def _stopped_run(self, name: str, device: str, epochs: int):
        """Start a run, SIGINT it once its first epoch is reported (inside the next one), return (command, exit
        status, out dir)."""
        out = self.work / name
        args = self.run_args(out, "--methods", "shade", "--dataset", "digits", "--model", "cnn",
                             "--epochs", str(epochs), "--seeds", "1", "--train-size", "900", "--batch-size", "8",
                             "--device", device)
        log = open(self.log / f"{name}-stopped.log", "w")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.work,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.time() + self.args.part_timeout / 2
        while time.time() < deadline and proc.poll() is None and reported_epochs(out / "regbench.db") < 1:
            time.sleep(0.2)
        time.sleep(0.3)  # inside the next epoch: a mid-epoch stop
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=120)
        log.close()
        return args, code, out

    def sigint(self):
        args, code, out = self._stopped_run("sigint", self.args.device, 4 if self.args.device == "cpu" else 40)
        if code != 130:
            return False, f"stopped run exited {code}, expected 130"
        done = self.sh("sigint-resume", args, self.args.part_timeout)
        step = resumed_step(out / "regbench.db")
        return done.returncode == 0 and step > 0, f"exit 130, rerun exit {done.returncode}, resumed at step {step}"

    def to_cpu(self):
        args, code, out = self._stopped_run("to-cpu", self.args.device, 3 if self.args.device == "cpu" else 12)
        if code != 130:
            return False, f"stopped run exited {code}, expected 130"
        ckpts = list((out / "checkpoints").glob("*.pt")) if (out / "checkpoints").exists() else []
        cpu_args = [a if a != self.args.device else "cpu" for a in args]
        done = self.sh("to-cpu-resume", cpu_args, self.args.part_timeout)
        step = resumed_step(out / "regbench.db")
        how = "started over" if step <= 0 else f"resumed at step {step}"
        ok = done.returncode == 0 and (out / "leaderboard.md").is_file() and bool(ckpts) and step > 0
        return ok, f"{len(ckpts)} checkpoint(s) from {self.args.device}; cpu rerun exit {done.returncode}, {how}"

    def bench(self, name: str, cmd: list[str], headline) -> tuple[bool, str]:
        done = self.sh(name, [sys.executable, str(HERE / cmd[0]), *cmd[1:]], self.args.part_timeout, cwd=ROOT)
        if done.returncode != 0:
            return False, f"exit {done.returncode}: {(done.stderr.strip().splitlines() or [''])[-1][:90]}"
        return True, headline(done.stdout)

    def benchmarks(self):
        gpu, dev = self.args.device != "cpu", self.args.device
        subset = os.environ.get("REGBENCH_CIFAR10_SUBSET")
        if subset:
            self.part("throughput.py", lambda: self.bench(
                "throughput", ["throughput.py", "--device", dev, "--steps", "100" if gpu else "8", "--block",
                               "25" if gpu else "4", "--warmup", "10" if gpu else "2", "--workers", "4",
                               *([] if gpu else ["--model", "cnn", "--batch", "64"])], throughput_headline))
        else:
            self.rows.append(("throughput.py", None, 0.0, "skipped: set REGBENCH_CIFAR10_SUBSET to cifar10_subset.npz"))
        self.part("seeds_per_gpu.py", lambda: self.bench(
            "seeds_per_gpu", ["seeds_per_gpu.py", "--device", dev, "--setups", "cnn", "--ks", "4" if gpu else "2",
                              "--epochs", "2"], seeds_headline))
        self.part("ses_overhead.py", lambda: self.bench(
            "ses_overhead", ["ses_overhead.py", "--configs", "resnet18" if gpu else "cnn1d", "--steps",
                             "20" if gpu else "10", "--variants", "exact,lowrank", *([] if gpu else ["--no-cuda"]),
                             "--data-dir", str(self.work / "data")], ses_headline))
        if subset:  # one epoch of the full table's size per run, projected to 50 epochs by the script itself
            self.part("paper_table.py", lambda: self.bench(
                "paper_table", ["paper_table.py", "--device", dev, "--epochs", "1",
                                *(["--images-per-epoch", "50000"] if gpu else
                                  ["--images-per-epoch", "128", "--seeds", "1", "--arms", "baseline,ses",
                                   "--model-kwargs", "channels=8,16,32,64"])], paper_headline))
        else:
            self.rows.append(("paper_table.py", None, 0.0, "skipped: set REGBENCH_CIFAR10_SUBSET to cifar10_subset.npz"))
        self.part("method_overhead.py", lambda: self.bench(
            "method_overhead", ["method_overhead.py", "--device", dev, "--setups", "resnet18" if gpu else "cnn1d",
                                "--rounds", "2", "--steps", "4", "--methods", "baseline,ses,shade,spectral_norm",
                                "--data-dir", str(self.work / "data")], method_headline))

    def table(self, total: float) -> str:
        lines = [f"{'part':<20}{'result':<8}{'seconds':>8}  headline", "-" * 100]
        for name, ok, seconds, headline in self.rows:
            verdict = "skip" if ok is None else ("PASS" if ok else "FAIL")
            lines.append(f"{name:<20}{verdict:<8}{seconds:>8.0f}  {headline}")
        lines.append(f"total wall time {total:.0f} s; logs in {self.log}")
        return "\n".join(lines)


def reported_epochs(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            return con.execute("SELECT COUNT(*) FROM trial_intermediate_values").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def resumed_step(db: Path) -> int:
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            rows = con.execute("SELECT value_json FROM trial_user_attributes WHERE key = 'resumed_from_step'").fetchall()
        finally:
            con.close()
    except sqlite3.Error:
        return 0
    return max((int(float(v)) for (v,) in rows), default=0)


def throughput_headline(out: str) -> str:
    m = re.search(r"regbench / timm-style: ([\d.]+)x", out)
    return f"regbench / timm-style loop {m.group(1)}x" if m else "no ratio printed"


def paper_headline(out: str) -> str:
    whole = re.search(r"whole table: ([\d.]+) s", out)
    projected = re.search(r"projected from these per-arm rates.*?: ([\d.]+) min", out)
    if not whole:
        return "no wall time printed"
    return f"ran {float(whole.group(1)):.0f} s" + (f"; full table projected {projected.group(1)} min (target ≤ 10)"
                                                    if projected else "")


def seeds_headline(out: str) -> str:
    rows = re.findall(r"^(\S+)\s+(vmap|streams)\s+(\d+)\s+(\d+)\s+([\d.]+)", out, re.M)
    return "; ".join(f"{s} {b} K={k}: {r}x vs alone" for s, b, k, _ips, r in rows) or "no ratio printed"


def ses_headline(out: str) -> str:
    block = out.split("overhead vs baseline", 1)[-1].splitlines()
    header = next((line.split()[1:] for line in block if line.strip().startswith("config")), [])
    rows = [line.split() for line in block if "%" in line]
    if not header or not rows:
        return "no overhead printed"
    row = rows[-1]
    values = row[-len(header):]
    return f"{' '.join(row[:-len(header)])}: " + ", ".join(f"{h} {v}" for h, v in zip(header, values) if v != "-")


def method_headline(out: str) -> str:
    rows = re.findall(r"^(\S+)\s+([\d.]+)\s+([+-][\d.]+%)", out, re.M)
    return ", ".join(f"{m} {o}" for m, _ms, o in rows if m != "baseline") or "no overhead printed"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu to try the script without a GPU")
    p.add_argument("--work", help="working folder (default: a new temporary folder, kept for its logs)")
    p.add_argument("--parts", default="tests,cli,sigint,to-cpu,benchmarks")
    p.add_argument("--test-files", default=",".join(TEST_FILES), help="the device-switched test files to run")
    p.add_argument("--part-timeout", type=float, default=420.0, help="seconds one part may take (default 420)")
    args = p.parse_args()
    check_device(args.device)
    started = time.perf_counter()
    check = Check(args)
    parts = args.parts.split(",")
    for name, fn in (("tests", check.tests), ("cli", check.cli), ("sigint", check.sigint), ("to-cpu", check.to_cpu)):
        if name in parts:
            check.part(name, fn)
    if "benchmarks" in parts:
        check.benchmarks()
    total = time.perf_counter() - started
    print("\n" + check.table(total))
    return 0 if all(ok is not False for _n, ok, _s, _h in check.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
