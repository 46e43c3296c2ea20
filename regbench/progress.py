"""The benchmark's progress line: runs done of planned, the current run's epoch, and the time left estimated from
measured seconds per epoch.

On a terminal it is one live line (a tqdm line above the current run's epoch bar) that changes at each epoch. Without
a terminal (nohup, a log file, a Slurm job's output) the same line is printed when a run starts, at the end of each
epoch and, while an epoch takes longer than ``interval`` seconds (default one minute), once per interval, so a log
always shows life.
``--quiet`` prints none of it.

The counts and the epochs left come from the store (``regbench.status``), so every worker's line speaks for the whole
benchmark; the seconds per epoch are this process's own once it has timed an epoch (the machine as loaded now),
else the store's record of earlier runs. The runner calls ``run_started``, ``epoch_ended`` and ``run_ended``
(regbench/runner.py); nothing here imports torch.
"""
from __future__ import annotations

import sys
import threading
import time

from regbench import status

INTERVAL = 60.0      # seconds between lines without a terminal while an epoch runs
MIN_EPOCH = 0.002    # seconds: an epoch reported faster than this was restored from a checkpoint, not trained


class Progress:
    def __init__(self, storage, bench, stream=None, tty: bool | None = None, interval: float = INTERVAL):
        self.storage, self.bench = storage, bench
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval = interval
        self.label, self.epoch, self.width = "", 0, 1
        self.started = self.last = self.printed = time.monotonic()
        self.seconds, self.epochs = 0.0, 0.0   # this process's timed run-epochs
        self.done, self.planned, self.left, self.running = 0, None, 0, 0
        self.prior = None                      # (s/epoch, runs) from the store
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._bar = None
        self._refresh()
        if self.tty:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=0, bar_format="{desc}", file=self.stream, leave=False, position=0)
            self._bar.set_description_str(self.line())
        else:
            self._thread = threading.Thread(target=self._tick, name="regbench-progress", daemon=True)
            self._thread.start()

    # ---- what the runner reports ------------------------------------------------------------------------------

    def run_started(self, label: str, width: int = 1) -> None:
        """A run (or ``width`` runs trained together) starts training."""
        self._refresh()
        with self._lock:
            self.label, self.epoch, self.width = label, 0, width
            self.started = self.last = time.monotonic()
        self._show(force=True)

    def epoch_ended(self, epoch: int) -> None:
        now = time.monotonic()
        with self._lock:
            took = now - self.last
            if epoch == self.epoch + 1 and took > MIN_EPOCH:
                self.seconds += took
                self.epochs += self.width
            self.epoch, self.last = epoch, now
        self._show(force=True)

    def run_ended(self) -> None:
        with self._lock:
            self.label, self.epoch = "", 0

    def write(self, message: str) -> None:
        """A line of the caller's (a finished run), printed above the live line on a terminal."""
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        self._stop.set()
        if self._bar is not None:
            self._bar.close()

    # ---- the line ----------------------------------------------------------------------------------------------

    def seconds_per_epoch(self) -> float | None:
        if self.epochs:
            return self.seconds / self.epochs
        return self.prior[0] if self.prior else None

    def time_left(self) -> float | None:
        """Seconds left for the whole benchmark, or None before any epoch was timed."""
        rate = self.seconds_per_epoch()
        if rate is None:
            return None
        left = max(self.left - self.epoch * self.width, 0)
        return left * rate / max(self.running, 1)

    def line(self) -> str:
        with self._lock:
            runs = f"[{self.done}/{self.planned} runs]" if self.planned else f"[{self.done} runs done]"
            parts = [runs]
            if self.label:
                total = self.bench.base.epochs
                current = f"{self.label} epoch {self.epoch}/{total}"
                if not self.tty and time.monotonic() - self.last >= self.interval:
                    current += f" (epoch {self.epoch + 1} running for {time.monotonic() - self.last:.0f} s)"
                parts.append(current)
            rate, left = self.seconds_per_epoch(), self.time_left()
            if rate is None:
                parts.append("time left: measuring the first epoch")
            else:
                parts.append(f"{rate:.2f} s/epoch")
                parts.append(f"about {status.duration(left)} left" if self.left else "no epochs left")
        return " · ".join(parts)

    def _refresh(self) -> None:
        """Counts from the store (at the start and at each run's start: other workers move them too)."""
        done, planned = status.run_counts(self.storage, self.bench)
        left, running = status.work_left(self.storage, self.bench)
        prior = status.seconds_per_epoch(self.storage, self.bench) if not self.epochs else self.prior
        with self._lock:
            self.done, self.planned, self.left, self.running, self.prior = done, planned, left, running, prior

    def _show(self, force: bool) -> None:
        text = self.line()
        if self._bar is not None:
            self._bar.set_description_str(text)
            return
        with self._lock:
            now = time.monotonic()
            if not force and now - self.printed < self.interval:
                return
            self.printed = now
        print(text, file=self.stream, flush=True)

    def _tick(self) -> None:
        while not self._stop.wait(min(self.interval, 1.0)):
            if self.label:
                self._show(force=False)
