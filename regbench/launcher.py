"""`regbench launch`: check the request, submit the workers (or reattach to those still queued), follow them with a
progress line, and decide the outcome from the store.

* Before anything is queued: the benchmark exists; with ``--slurm``, the partition exists and one of its nodes can run
  the request (regbench/slurm.py) and Slurm accepts it (``sbatch --test-only``); a storage URL only this machine
  reaches gets a warning, or a refusal when the partition has several nodes.
* A rerun reattaches to this benchmark's jobs still queued or running (same job name and comment) instead of
  submitting more.
* While waiting: runs done/planned from the store, jobs running and pending (with Slurm's reasons), time left; a live
  line on a terminal, a line every minute otherwise. Ctrl-C/SIGTERM cancels the jobs (or, with ``--leave-jobs``,
  leaves them and says how to reattach).
* The outcome is the store's: a complete benchmark gets its leaderboard and exit 0 whatever became of the jobs (each
  abnormal end is said in words); a benchmark with work left exits 1, saying what is left and how to resume.
"""
from __future__ import annotations

import hashlib
import re
import signal
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from regbench import commands, launch, slurm
from regbench.errors import ConfigError

POLL_SECONDS = 3.0
EXIT_WORK_LEFT = 1
DEFAULT_TIME_MIN = 24 * 60
SIGNAL_SECONDS = 90          # submitit's --signal=USR2@90: the warning before a job's time limit
SIGNAL_CHECK_SECONDS = 30    # slurmctld looks for jobs to warn this often
WORKER_START_SECONDS = 60    # a worker's start (Python, torch, the data) before it trains
SLURM_ONLY = ("gpus_per_job", "cpus_per_job", "mem", "time", "account", "qos", "constraint", "array_parallelism",
              "sbatch", "setup", "leave_jobs")


class _Stop(BaseException):  # not an Exception: no broad `except Exception` on the way may swallow it
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def launch_command(args, default_data_dir: str) -> int:
    from regbench.statefiles import check_existing_store
    from regbench.store import default_storage_url, open_storage

    name, deprecated = commands.benchmark_name(args, "launch")
    out = Path(args.out or Path("runs") / name)
    storage_url = args.storage or default_storage_url(out)
    # launch follows a planned benchmark: a store file that is missing, empty or foreign is refused, not created
    check_existing_store(storage_url, "--storage" if args.storage else f"{out}'s store")
    storage = open_storage(storage_url)
    bench = commands.load_benchmark(storage, name)  # fails in one line before any job starts
    if deprecated:
        print(deprecated, file=sys.stderr)
    if args.progress_seconds is not None and not args.progress_seconds > 0:
        raise ConfigError(f"--progress-seconds must be > 0, got {args.progress_seconds}")
    request, parallel = None, None
    if args.slurm:
        request, parallel, part = _slurm_request(args, bench)
        _check_storage_reach(storage_url, part)
    else:
        given = [f"--{k.replace('_', '-')}" for k in SLURM_ONLY if getattr(args, k, None) not in (None, [], False)]
        if given:
            raise ConfigError(f"{', '.join(given)} {'apply' if len(given) > 1 else 'applies'} only to Slurm jobs; add "
                              f"--slurm PARTITION, or drop {'them' if len(given) > 1 else 'it'}")
    tracking_uri = commands.tracking_uri_for(getattr(args, "tracking_uri", None), bench)
    if tracking_uri is None:
        print(commands.not_mirrored(storage_url, name), file=sys.stderr)
    if _left(storage, bench) == []:
        print(f"benchmark {name!r} is complete: nothing to run", flush=True)
        return _leaderboard(storage, name, out, tracking_uri)

    folder = out / "workers"
    device = "cpu" if request is not None and not request.gpus and bench.base.device == "auto" else None
    argv = launch.worker_argv(storage_url, name, str(Path(args.data_dir or default_data_dir).expanduser()),
                              tracking_uri, args.per_gpu, device)
    job_name, comment = f"rb-{name}", _comment(storage_url, name)
    with _Signals():
        try:
            tracker = _submit(args, request, parallel, argv, folder, job_name, comment, name)
        except _Stop as signalled:
            print(f"regbench: {'interrupted' if signalled.signum == signal.SIGINT else 'terminated'} before the "
                  f"workers were submitted; nothing is queued", file=sys.stderr)
            return 130 if signalled.signum == signal.SIGINT else 143
        try:
            _follow(tracker, storage, bench, args.progress_seconds)
        except _Stop as signalled:
            return _interrupted(tracker, signalled.signum, args)
    ends = tracker.abnormal_ends()
    left = _left(storage, bench)
    if not left:
        for job_id, words in ends:
            print(f"regbench: note: job {job_id} {words}; the benchmark is complete all the same (its trials were "
                  f"saved and run by the other workers)", file=sys.stderr)
        return _leaderboard(storage, name, out, tracking_uri)
    for job_id, words in ends:
        print(f"regbench: job {job_id}: {words}", file=sys.stderr)
    done, planned = _counts(storage, bench)
    print(f"regbench: benchmark {name!r} is not complete: {done}{f' of {planned}' if planned else ''} runs done; "
          f"left:", file=sys.stderr)
    for line in left:
        print(line, file=sys.stderr)
    print(f"regbench: the workers' logs are in {folder.resolve()}; resume with the same command (it reattaches to jobs "
          f"still queued or running, else submits new workers)", file=sys.stderr)
    return EXIT_WORK_LEFT


def _submit(args, request, parallel, argv, folder, job_name, comment, name):
    """Submit the workers (or, for Slurm, reattach to this benchmark's jobs still queued or running); the tracker
    that follows them."""
    if request is not None:
        ids = slurm.find_jobs(job_name, comment)
        if ids:
            print(f"reattached to {len(ids)} Slurm jobs of benchmark {name!r} still queued or running: "
                  f"{', '.join(ids)} (none submitted); logs in {folder.resolve()}", flush=True)
        else:
            jobs = launch.start_workers(argv, args.workers, folder, request, job_name, comment, parallel, args.setup)
            ids = [str(j.job_id) for j in jobs]
            launch.release(jobs)
            print(f"launched {len(ids)} workers (slurm {request.partition}): {', '.join(ids)}; logs in "
                  f"{folder.resolve()}", flush=True)
            line = launch.submitted_line(folder, ids[0])
            if line:
                print(f"submitted: {line}", flush=True)
        return _SlurmJobs(ids, folder)
    jobs = launch.start_workers(argv, args.workers, folder)
    print(f"launched {len(jobs)} workers (local): {', '.join(str(j.job_id) for j in jobs)}; logs in "
          f"{folder.resolve()}", flush=True)
    return _LocalJobs(jobs, folder)


# ---- the request ----------------------------------------------------------------------------------------------------

def _slurm_request(args, bench):
    problem = slurm.available()
    if problem:
        raise ConfigError(f"--slurm {args.slurm}: Slurm's commands are not installed here ({problem} missing); run "
                          f"launch on a machine that submits to the cluster, or drop --slurm for local workers")
    part = slurm.Partition.read(args.slurm)
    device = bench.base.device
    gpus = args.gpus_per_job
    if gpus is None:
        gpus = 1 if device.startswith("cuda") or (device == "auto" and part.max_gpus) else 0
    elif gpus < 0:
        raise ConfigError(f"--gpus-per-job must be 0 or more, got {gpus}")
    if gpus == 0 and device.startswith("cuda"):
        raise ConfigError(f"--gpus-per-job 0: benchmark {bench.name!r} trains on {device}; ask for a GPU "
                          f"(--gpus-per-job 1) or plan it with --device cpu")
    cpus = args.cpus_per_job if args.cpus_per_job is not None else args.per_gpu * max(gpus, 1)
    if cpus < 1:
        raise ConfigError(f"--cpus-per-job must be at least 1, got {cpus}")
    if args.time is not None and args.timeout_min is not None:
        raise ConfigError("--time and --timeout-min both set the time limit; give --time only")
    if args.time is not None:
        time_min = slurm.minutes(args.time)
    elif args.timeout_min is not None:
        time_min = args.timeout_min
    else:
        time_min = min(DEFAULT_TIME_MIN, part.max_time_min or DEFAULT_TIME_MIN)
    mem = slurm.megabytes(args.mem) if args.mem else part.default_memory_mb(cpus)
    extra = {}
    for item in args.sbatch:
        key, eq, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not key or any(c.isspace() for c in key):
            raise ConfigError(f"--sbatch {item!r} is not KEY=VALUE (e.g. --sbatch reservation=mine) or KEY (e.g. "
                              f"--sbatch exclusive)")
        extra[key] = value if eq else True
    warning = _signal_delay(extra.get("signal"))
    if time_min * 60 <= warning + SIGNAL_CHECK_SECONDS + WORKER_START_SECONDS:
        shortest = (warning + SIGNAL_CHECK_SECONDS + WORKER_START_SECONDS) // 60 + 1
        raise ConfigError(f"--time {slurm.hms(time_min)} leaves a job no time to work: Slurm warns it {warning} s "
                          f"before its limit (checking every {SIGNAL_CHECK_SECONDS} s), and it then saves and requeues "
                          f"itself; pass --time {shortest} or more (or a later warning, e.g. --sbatch signal=USR2@30)")
    request = slurm.Request(partition=part.name, cpus=cpus, gpus=gpus, mem_mb=mem, time_min=time_min,
                            account=args.account, qos=args.qos, constraint=args.constraint, extra=extra)
    slurm.check_request(part, request, slurm.gpu_partitions() if gpus and not part.max_gpus else None)
    parallel = args.array_parallelism or args.workers
    if parallel < 1:
        raise ConfigError(f"--array-parallelism must be at least 1, got {parallel}")
    slurm.test_only(request, args.workers, min(parallel, args.workers))
    return request, min(parallel, args.workers), part


def _signal_delay(value) -> int:
    """Seconds before the time limit that the job is warned: submitit's 90, or ``--sbatch signal=[B:]SIG@N``."""
    if value is None or value is True:
        return SIGNAL_SECONDS
    m = re.fullmatch(r"(?:[BR]+:)?\w+(?:@(\d+))?", str(value))
    if not m:
        raise ConfigError(f"--sbatch signal={value}: not a Slurm signal spec; use e.g. --sbatch signal=USR2@90")
    return int(m.group(1)) if m.group(1) else 60  # sbatch's default warning time


def _check_storage_reach(storage_url: str, part) -> None:
    """A store the jobs may not reach: a SQLite file (its locks do not hold across machines) or a loopback address.
    Refused when the partition has several nodes; one warning when it has one (fine if that node is this machine)."""
    from regbench.store import safe_url

    if storage_url.startswith("sqlite"):
        what = "a SQLite file, whose locking does not hold across machines"
    elif "://" in storage_url:
        host = (urlsplit(storage_url).hostname or "").lower()
        if not (host in ("", "localhost", "::1") or host.startswith("127.")):
            return
        what = f"a loopback address ({host or 'local socket'}), which reaches only the machine it runs on"
    else:
        return
    fix = "pass --storage postgresql://USER@HOST/DB of a PostgreSQL server the compute nodes reach"
    if part.total_nodes > 1:
        raise ConfigError(f"--storage {safe_url(storage_url)} is {what}; partition {part.name!r} runs jobs on "
                          f"{part.total_nodes} nodes, which cannot share it: {fix}")
    print(f"regbench: warning: --storage {safe_url(storage_url)} is {what}; the jobs of partition {part.name!r} run "
          f"on its only node {part.nodes[0].name if part.nodes else '?'}, which must be this machine (else {fix})",
          file=sys.stderr)


def _comment(storage_url: str, name: str) -> str:
    """The jobs' Slurm comment: which store and benchmark they work on (a rerun reattaches by it)."""
    from regbench.store import safe_url

    return f"regbench:{hashlib.sha256(f'{safe_url(storage_url)}|{name}'.encode()).hexdigest()[:12]}"


# ---- the jobs -------------------------------------------------------------------------------------------------------

class _SlurmJobs:
    def __init__(self, ids: list[str], folder: Path):
        self.ids, self.folder = ids, folder
        self.states: dict[str, slurm.JobState] = {}
        self._ended_before: set[str] = set()

    def poll(self) -> bool:
        """Refresh; True while any job is queued or running. A job is taken as ended once two polls in a row say so:
        a job requeueing itself passes through states that read as ended for a moment."""
        self.states = slurm.job_states(self.ids)
        ended = {i for i, s in self.states.items() if not s.active}
        settled = ended & self._ended_before
        self._ended_before = ended
        return len(settled) < len(self.ids)

    def summary(self) -> str:
        running = sum(s.state in ("RUNNING", "COMPLETING") for s in self.states.values())
        reasons: dict[str, int] = {}
        for s in self.states.values():
            if s.active and s.state not in ("RUNNING", "COMPLETING"):
                why = s.reason or ("queued" if s.state == "PENDING" else s.state.lower())
                if why == "BeginTime" and s.start:
                    why = f"requeued, starts {s.start[-8:]}"
                reasons[why] = reasons.get(why, 0) + 1
        pending = sum(reasons.values())
        text = f"{running} job{'s' if running != 1 else ''} running"
        if pending:
            text += f", {pending} pending (" + ", ".join(f"{k}" + (f" ×{v}" if v > 1 else "")
                                                      for k, v in reasons.items()) + ")"
        return text

    def err_log(self, job_id: str) -> Path:
        return self.folder / f"{job_id}_0_log.err"

    def abnormal_ends(self) -> list[tuple[str, str]]:
        if not self.states:
            self.poll()
        out = []
        for job_id in self.ids:
            words = slurm.describe_end(self.states[job_id], self.err_log(job_id))
            if words:
                out.append((job_id, words))
        return out

    def cancel(self) -> None:
        slurm.cancel(self.ids)


class _LocalJobs:
    def __init__(self, jobs: list, folder: Path):
        self.jobs, self.folder = jobs, folder

    def poll(self) -> bool:
        return not all(j.done() for j in self.jobs)

    def summary(self) -> str:
        running = sum(not j.done() for j in self.jobs)
        return f"{running} worker{'s' if running != 1 else ''} running"

    def abnormal_ends(self) -> list[tuple[str, str]]:
        out = []
        for job in self.jobs:
            try:
                exc = job.exception()
            except Exception as e:  # noqa: BLE001 - submitit could not read the job's outcome
                exc = e
            if exc is not None:
                lines = [x for x in str(exc).strip().splitlines() if x.strip()]
                err = slurm.first_error_line(self.folder / f"{job.job_id}_0_log.err")
                out.append((str(job.job_id), err or (lines[-1] if lines else type(exc).__name__)))
        launch.release(self.jobs)
        return out

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancel(check=False)


class _Signals:
    """While launch follows its jobs, Ctrl-C and SIGTERM end the wait (``_Stop``) so that the jobs can be cancelled
    or left, instead of unwinding through the CLI's generic handler."""

    def __enter__(self):
        self.previous = {}

        def handler(signum, _frame):
            raise _Stop(signum)

        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, handler)
        return self

    def __exit__(self, *exc):
        for sig, old in self.previous.items():
            signal.signal(sig, old)
        return False


def _interrupted(tracker, signum: int, args) -> int:
    what = "interrupted" if signum == signal.SIGINT else "terminated (SIGTERM)"
    code = 130 if signum == signal.SIGINT else 143
    if isinstance(tracker, _SlurmJobs):
        active = [i for i, s in slurm.job_states(tracker.ids).items() if s.active]
        if args.leave_jobs:
            print(f"regbench: {what}; Slurm jobs {', '.join(active) or 'none'} are left queued or running; rerun the "
                  f"same command to follow them again (it reattaches), or stop them with: scancel "
                  f"{' '.join(active)}", file=sys.stderr)
            return code
        tracker.cancel()
        print(f"regbench: {what}; cancelled Slurm jobs {', '.join(active) or '(none still queued or running)'}: their "
              f"running trials are saved and queued to resume; rerun the same command to resume", file=sys.stderr)
        return code
    tracker.cancel()
    print(f"regbench: {what}; stopped the local workers (their running trials are saved and queued to resume); rerun "
          f"the same command to resume", file=sys.stderr)
    return code


# ---- waiting --------------------------------------------------------------------------------------------------------

def _counts(storage, bench) -> tuple[int, int | None]:
    from regbench import status

    return status.run_counts(storage, bench)


def _follow(tracker, storage, bench, every: float | None) -> None:
    """Until every job has ended: a progress line (live on a terminal, else every ``every`` seconds, 60 by default)."""
    live = every is None and sys.stderr.isatty()
    every = every or 60.0
    started = time.monotonic()
    first, _ = _counts(storage, bench)
    last_print = None
    while True:
        alive = tracker.poll()
        done, planned = _counts(storage, bench)
        line = _progress_line(done, planned, first, time.monotonic() - started, tracker.summary())
        now = time.monotonic()
        if live:
            sys.stderr.write("\r\033[K" + line)
            sys.stderr.flush()
        elif last_print is None or now - last_print >= every or not alive:
            print(line, file=sys.stderr, flush=True)
            last_print = now
        if not alive:
            if live:
                sys.stderr.write("\n")
            return
        time.sleep(POLL_SECONDS if every >= POLL_SECONDS else max(0.5, every))


def _progress_line(done: int, planned: int | None, first: int, elapsed: float, jobs: str) -> str:
    runs = f"{done}/{planned}" if planned else f"{done}"
    left = ""
    if planned and done >= planned:
        left = "; all runs done" + (", workers finishing" if "0 job" not in jobs and "0 worker" not in jobs else "")
    elif planned and done > first:
        seconds = elapsed / (done - first) * (planned - done)
        left = f"; ~{_duration(seconds)} left"
    elif planned:
        left = "; time left: after the first run ends"
    return f"launch: [{runs} runs] {jobs}{left}"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


# ---- the outcome ----------------------------------------------------------------------------------------------------

def _left(storage, bench) -> list[str]:
    """What the benchmark still needs, one line per method that is not finished ([] when complete): a method is
    finished when every seed of its selected configuration is done (or diverged) and its tuning has nothing left."""
    import optuna
    from optuna.trial import TrialState

    from regbench import record, status
    from regbench.store import trials_of

    done, planned = _counts(storage, bench)
    root = optuna.load_study(study_name=record.spec_study_name(bench.name), storage=storage)
    unfinished = []
    for method in bench.methods:
        selected = root.user_attrs.get(record.selection_attr(method, bench.ident(method)))
        if bench.tunes(method) and selected is None:
            unfinished.append(method)
            continue
        group = selected["group_key"] if selected else bench.final_configs(
            method, bench.default_hparams(method), {})[0].group_key()
        finals = [t for t in trials_of(storage, record.final_study_name(bench.name, method))
                  if record.group_key(t) == group and record.seed(t) in bench.seeds]
        ended = {record.seed(t) for t in finals if t.state == TrialState.COMPLETE or record.diverged(t)}
        if set(bench.seeds) - ended:
            unfinished.append(method)
    if not unfinished and (planned is None or done >= planned):
        return []
    lines = status.progress(storage, bench)
    return [x for x in lines if x.strip().split(":")[0] in unfinished] or lines


def _leaderboard(storage, name: str, out: Path, tracking_uri: str | None) -> int:
    out.mkdir(parents=True, exist_ok=True)
    path = commands.write_report(storage, name, out, tracking_uri)
    print(path.read_text())
    print(f"Leaderboard: {path.resolve()}")
    return 0
