"""What `regbench launch --slurm` asks of a Slurm cluster, through its own commands only (sinfo, scontrol, squeue,
sbatch --test-only, scancel): no accounting daemon (``sacct``) is needed, which many small clusters lack.

* ``Partition.read(name)``: a partition's limits and its nodes' CPUs, memory and GPUs, so a request none of its nodes
  can satisfy is refused in one line before anything is queued (``check_request``).
* ``job_states(ids)``: each job's state, pending reason and, once it ended, its exit code, from ``squeue`` (and
  ``scontrol show job`` for a job that left the queue), the way launch follows its jobs.
* ``describe_end``: how a job ended, in words, with the first error line of its ``.err`` log.

Nothing here imports torch or the rest of regbench beyond its errors.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from regbench.errors import ConfigError, RegbenchError

COMMANDS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo")
ACTIVE = ("PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SUSPENDED", "COMPLETING",
          "CONFIGURING", "STAGE_OUT", "SIGNALING", "RESV_DEL_HOLD", "SPECIAL_EXIT", "PREEMPTED")
ENDED_WORDS = {"CANCELLED": "cancelled", "TIMEOUT": "timed out (time limit reached)", "OUT_OF_MEMORY": "out of memory",
               "NODE_FAIL": "its node failed", "PREEMPTED": "preempted", "BOOT_FAIL": "its node failed to boot",
               "DEADLINE": "reached its deadline", "REVOKED": "revoked"}
UNLIMITED = ("UNLIMITED", "INFINITE", "NONE", "")


class SlurmError(RegbenchError):
    """Slurm cannot be reached or refuses a request (one line, Slurm's own words)."""


def available() -> str | None:
    """None when Slurm's commands are on PATH, else which are missing."""
    missing = [c for c in COMMANDS if shutil.which(c) is None]
    return ", ".join(missing) or None


def _run(argv: list[str], check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        raise SlurmError(f"{argv[0]} is not installed here; run launch --slurm where Slurm's commands work (a "
                         f"cluster's login node), or drop --slurm to start local workers") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"`{' '.join(argv[:3])} …` did not answer within {timeout:.0f} s; is the Slurm controller "
                         f"up? (scontrol ping)") from None
    if check and done.returncode != 0:
        raise SlurmError(f"`{' '.join(argv)}` failed: {first_line(done.stderr or done.stdout)}")
    return done


def first_line(text: str) -> str:
    lines = [x.strip() for x in text.strip().splitlines() if x.strip()]
    return lines[0] if lines else "no output"


def fields(line: str) -> dict[str, str]:
    """``scontrol show … -o``'s one line as a dict (values containing spaces, such as OS=, keep their first word)."""
    return dict(re.findall(r"(?:^|\s)([A-Za-z][\w/:]*)=(\S*)", line))


# ---- time and memory ------------------------------------------------------------------------------------------------

def minutes(text: str, option: str = "--time") -> int:
    """Slurm's time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) as whole minutes, rounded up."""
    value = text.strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", value)
    if not m:
        raise ConfigError(f"{option} {text!r} is not a Slurm time; use minutes (90), H:MM:SS (1:30:00) or D-HH "
                          f"(1-12)")
    days, a, b, c = (int(g) if g is not None else None for g in m.groups())
    if days is not None:  # D-H, D-H:M, D-H:M:S
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:  # H:M:S
        seconds = a * 3600 + b * 60 + c
    elif b is not None:  # M:S
        seconds = a * 60 + b
    else:
        seconds = a * 60
    if seconds <= 0:
        raise ConfigError(f"{option} {text!r} is no time at all; give the job's time limit, e.g. 60 (minutes)")
    return -(-seconds // 60)


def hms(mins: int) -> str:
    d, rest = divmod(mins, 1440)
    return f"{d}-{rest // 60:02d}:{rest % 60:02d}:00" if d else f"{rest // 60}:{rest % 60:02d}:00"


def megabytes(text: str, option: str = "--mem") -> int:
    """Slurm's memory sizes (a number of MB, or with K/M/G/T) as whole MB."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)B?", text.strip().upper())
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"{option} {text!r} is not a memory size; use e.g. 4G or 500M")
    scale = {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024 * 1024}[m.group(2)]
    return max(1, int(float(m.group(1)) * scale))


# ---- partitions -----------------------------------------------------------------------------------------------------

@dataclass
class Node:
    name: str
    cpus: int
    memory_mb: int
    gpus: int
    state: str


@dataclass
class Partition:
    name: str
    max_time_min: int | None          # None: unlimited
    default_mem: bool                 # the partition or cluster sets a default memory per job (DefMemPer…)
    max_mem_mb: int | None            # MaxMemPerNode, None: unlimited
    total_nodes: int = 0              # nodes a job may land on (also those declared but not up)
    nodes: list[Node] = field(default_factory=list)   # the nodes scontrol shows

    @classmethod
    def read(cls, name: str) -> Partition:
        if not re.fullmatch(r"[\w.\-]+", name):
            raise ConfigError(f"--slurm {name!r} is not a partition name; list them with `sinfo -s`")
        done = _run(["scontrol", "show", "partition", name, "-o"], check=False)
        if done.returncode != 0 or not done.stdout.strip():
            reason = first_line(done.stderr or done.stdout)
            if "not found" not in reason.lower():
                raise SlurmError(f"cannot read Slurm partition {name!r}: {reason}; is the Slurm controller up? "
                                 f"(scontrol ping)")
            known = [p.rstrip("*") for p in _run(["sinfo", "-h", "-o", "%P"]).stdout.split()]
            raise ConfigError(f"--slurm {name}: no such Slurm partition (this cluster has: {', '.join(known) or 'none'}"
                              f"); pass one of those")
        info = fields(done.stdout)
        max_time = None if info.get("MaxTime", "UNLIMITED").upper() in UNLIMITED else minutes(info["MaxTime"])
        default_mem = any(info.get(k, "UNLIMITED").upper() not in UNLIMITED for k in ("DefMemPerCPU", "DefMemPerNode"))
        if not default_mem:
            config = _run(["scontrol", "show", "config"], check=False).stdout
            default_mem = any(re.search(rf"^{k}\s*=\s*(\d+)", config, re.MULTILINE) for k in ("DefMemPerCPU", "DefMemPerNode"))
        max_mem = info.get("MaxMemPerNode", "UNLIMITED")
        part = cls(name=name, max_time_min=max_time, default_mem=default_mem,
                   max_mem_mb=None if max_mem.upper() in UNLIMITED else int(max_mem),
                   total_nodes=int(info.get("TotalNodes", "0") or 0))
        for line in _run(["scontrol", "show", "node", "-o"]).stdout.splitlines():
            node = fields(line)
            if name not in node.get("Partitions", "").split(","):
                continue
            part.nodes.append(Node(name=node.get("NodeName", "?"), cpus=int(node.get("CPUTot", 0) or 0),
                                   memory_mb=int(node.get("RealMemory", 0) or 0), gpus=gpu_count(node.get("Gres", "")),
                                   state=node.get("State", "?")))
        part.total_nodes = max(part.total_nodes, len(part.nodes))
        return part

    @property
    def max_cpus(self) -> int:
        return max((n.cpus for n in self.nodes), default=0)

    @property
    def max_memory_mb(self) -> int:
        best = max((n.memory_mb for n in self.nodes), default=0)
        return min(best, self.max_mem_mb) if self.max_mem_mb else best

    @property
    def max_gpus(self) -> int:
        return max((n.gpus for n in self.nodes), default=0)

    def default_memory_mb(self, cpus: int) -> int | None:
        """--mem when the user gives none: nothing when the cluster sets a default per job; else a node's memory per
        CPU times the job's CPUs (so jobs packed by CPU also fit by memory), at most 4 GB. Without it, under
        CR_Core_Memory, each job would take a whole node's memory and N workers would run one after another."""
        if self.default_mem:
            return None
        fitting = [n for n in self.nodes if n.cpus >= cpus and n.memory_mb] or [n for n in self.nodes if n.memory_mb]
        if not fitting:
            return None
        node = max(fitting, key=lambda n: n.memory_mb)
        return max(1, min(4096, node.memory_mb * cpus // max(node.cpus, 1)))


def gpu_count(gres: str) -> int:
    """GPUs in a node's Gres field: ``gpu:2``, ``gpu:a100:4(S:0-1)``, ``gpu:1,mps:100`` -> 2, 4, 1."""
    total = 0
    for item in re.split(r",(?![^()]*\))", gres or ""):
        parts = re.sub(r"\(.*\)", "", item).split(":")
        if parts[0] == "gpu" and parts[-1].isdigit():
            total += int(parts[-1])
    return total


@dataclass
class Request:
    """What each job asks for (launch's resource options, defaults applied)."""

    partition: str
    cpus: int
    gpus: int
    mem_mb: int | None
    time_min: int
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    extra: dict = field(default_factory=dict)       # --sbatch KEY=VALUE

    def sbatch_flags(self) -> list[str]:
        flags = [f"--partition={self.partition}", f"--cpus-per-task={self.cpus}", f"--time={self.time_min}",
                 "--nodes=1"]
        flags += [f"--gpus-per-node={self.gpus}"] if self.gpus else []
        flags += [f"--mem={self.mem_mb}M"] if self.mem_mb else []
        flags += [f"--{k}={v}" for k, v in (("account", self.account), ("qos", self.qos),
                                             ("constraint", self.constraint)) if v]
        flags += [f"--{k}" if v is True else f"--{k}={v}" for k, v in self.extra.items()]
        return flags


def check_request(part: Partition, req: Request, gpu_partitions: list[str] | None = None) -> None:
    """One line and exit 2 for a request no node of the partition can satisfy (it would pend forever, or sbatch would
    refuse it after the first jobs were queued)."""
    p = part.name
    if not part.nodes:
        raise ConfigError(f"--slurm {p}: the partition has no nodes; pass another partition (sinfo -s)")
    if req.gpus and not part.max_gpus:
        others = f" (partitions with GPUs: {', '.join(gpu_partitions)})" if gpu_partitions else ""
        raise ConfigError(f"--gpus-per-job {req.gpus}: partition {p!r} has no GPUs (its nodes declare no gpu GRES); "
                          f"pass --gpus-per-job 0 or a GPU partition{others}")
    if req.gpus > part.max_gpus:
        raise ConfigError(f"--gpus-per-job {req.gpus}: no node of partition {p!r} has more than {part.max_gpus} GPUs; "
                          f"pass --gpus-per-job {part.max_gpus} or fewer")
    if req.cpus > part.max_cpus:
        raise ConfigError(f"--cpus-per-job {req.cpus}: no node of partition {p!r} has more than {part.max_cpus} "
                          f"CPUs; pass --cpus-per-job {part.max_cpus} or fewer")
    if req.mem_mb and part.max_memory_mb and req.mem_mb > part.max_memory_mb:
        raise ConfigError(f"--mem {req.mem_mb}M: no node of partition {p!r} offers more than {part.max_memory_mb} MB; "
                          f"pass --mem {part.max_memory_mb}M or less")
    if part.max_time_min is not None and req.time_min > part.max_time_min:
        raise ConfigError(f"--time {hms(req.time_min)} is above partition {p!r}'s MaxTime {hms(part.max_time_min)}; "
                          f"pass --time {part.max_time_min} (minutes) or less")


def gpu_partitions() -> list[str]:
    """Partitions with at least one GPU node (for the refusal's hint)."""
    out = []
    for line in _run(["sinfo", "-h", "-o", "%P %G"], check=False).stdout.splitlines():
        name, _, gres = line.partition(" ")
        if gpu_count(gres) and name.rstrip("*") not in out:
            out.append(name.rstrip("*"))
    return out


def test_only(req: Request, workers: int, parallel: int) -> None:
    """``sbatch --test-only`` with the request's flags: Slurm's own verdict (an unknown account, qos or constraint)
    before anything is queued."""
    argv = ["sbatch", "--test-only", f"--array=0-{workers - 1}%{parallel}", "--job-name=regbench-check",
            *req.sbatch_flags(), "--output=/dev/null", "--wrap=true"]
    done = _run(argv, check=False)
    if done.returncode != 0:
        raise ConfigError(f"Slurm refuses the jobs: {first_line(done.stderr or done.stdout)} (checked with "
                          f"`sbatch --test-only`; nothing was queued); fix the resource options")


# ---- jobs -----------------------------------------------------------------------------------------------------------

@dataclass
class JobState:
    job_id: str
    state: str              # PENDING, RUNNING, COMPLETED, CANCELLED, FAILED, TIMEOUT, ... or GONE (no longer listed)
    reason: str = ""
    exit_code: str = ""     # "N:S" once ended
    restarts: int = 0
    start: str = ""

    @property
    def active(self) -> bool:
        return self.state in ACTIVE


def job_states(ids: list[str]) -> dict[str, JobState]:
    """The state of each job (``ARRAY_TASK`` ids like 12_0, or plain ids), from squeue; ended jobs also from scontrol
    (their exit code). A job neither lists any more is GONE (ended more than MinJobAge ago)."""
    if not ids:
        return {}
    arrays = sorted({i.split("_")[0] for i in ids})
    done = _run(["squeue", "-h", "-r", "-t", "all", "-j", ",".join(arrays), "-o", "%i|%T|%r|%S"], check=False)
    states: dict[str, JobState] = {}
    for line in done.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) >= 4:
            states[parts[0]] = JobState(parts[0], parts[1], parts[2] if parts[2] != "None" else "", start=parts[3])
    for job_id in ids:
        st = states.get(job_id)
        if st is not None and st.active:
            continue
        shown = _run(["scontrol", "show", "job", "-o", job_id], check=False)
        info = next((fields(x) for x in shown.stdout.splitlines() if x.strip()), {})
        if shown.returncode != 0 or not info:
            states.setdefault(job_id, JobState(job_id, "GONE"))
            continue
        states[job_id] = JobState(job_id, info.get("JobState", "UNKNOWN"), info.get("Reason", "").replace("None", ""),
                                  info.get("ExitCode", ""), int(info.get("Restarts", "0") or 0),
                                  info.get("StartTime", ""))
    return {i: states.get(i, JobState(i, "GONE")) for i in ids}


def find_jobs(job_name: str, comment: str) -> list[str]:
    """This user's queued or running jobs (array tasks each) named ``job_name`` whose comment is ``comment``."""
    import getpass

    done = _run(["squeue", "-h", "-r", "-u", getpass.getuser(), "-n", job_name, "-o", "%i|%T|%k"], check=False)
    out = []
    for line in done.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3 and parts[1] in ACTIVE and parts[2] == comment:
            out.append(parts[0])
    return sorted(out, key=lambda j: [int(x) if x.isdigit() else 0 for x in j.split("_")])


def cancel(ids: list[str]) -> None:
    if ids:
        _run(["scancel", *ids], check=False)


def first_error_line(path: Path) -> str | None:
    """The first line of a job's log that says what went wrong (a Slurm step error, an exception, a regbench error),
    skipping submitit's own log lines and regbench's progress lines."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    wanted = re.compile(r"\berror\b|Error\b|Traceback|No such file|Killed|not found|denied", re.IGNORECASE)
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("submitit ", "[")):
            continue
        if wanted.search(line):
            return line[:300]
    return None


def describe_end(state: JobState, err_log: Path | None) -> str | None:
    """None for a job that ended well; else how it ended, in words, with its log's first error line."""
    code, _, sig = state.exit_code.partition(":")
    if state.state == "COMPLETED" and code in ("", "0") and sig in ("", "0"):
        return None
    if state.state == "GONE":
        words = "ended, no longer listed by Slurm (its state is unknown)"
    elif state.state == "FAILED":
        words = f"exit {code}" if code not in ("", "0") else f"killed by signal {sig}" if sig not in ("", "0") else \
            "failed"
    elif state.state == "COMPLETED":
        words = f"exit {code}" if code not in ("", "0") else f"killed by signal {sig}"
    else:
        words = ENDED_WORDS.get(state.state, state.state.lower())
    line = first_error_line(err_log) if err_log is not None else None
    return f"{words}: {line}" if line else words
