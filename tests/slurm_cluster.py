"""A private single-node Slurm cluster on 127.0.0.1, started from Debian's packages (slurmctld, slurmd, slurm-client,
munge) without systemd, cgroups or an accounting daemon, for the tests of `regbench launch --slurm`.

Everything lives in one folder: munge's key, socket and logs, slurm.conf (and gres.conf with fake GPUs), the
controller's state and the node's spool, on private ports, so several clusters can run side by side and none touches
/etc/slurm. Commands reach a cluster through ``SLURM_CONF`` (``Cluster.env``).

As a script (used by .ci/run): ``python tests/slurm_cluster.py start DIR`` starts one (2 CPUs, no GPU, partition
``cpu``), prints its slurm.conf path and leaves it running; ``python tests/slurm_cluster.py stop DIR`` stops it.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PROGRAMS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol", "srun")
CRED_EXPIRE_S = 10  # how long Slurm holds a requeued job (see AuthInfo below)
SBIN = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")


def program(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for folder in SBIN:
        if os.access(Path(folder) / name, os.X_OK):
            return str(Path(folder) / name)
    return None


def missing_programs() -> list[str]:
    return [p for p in PROGRAMS if program(p) is None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """One controller, one node (this host, as NodeAddr 127.0.0.1) and the partitions given, as root.

    ``partitions``: name -> extra partition options (e.g. ``{"cpu": "MaxTime=30"}``); every partition holds the node.
    ``gpus``: fake GPUs on the node (GRES ``gpu``, character devices Slurm only hands out)."""

    def __init__(self, folder: Path, cpus: int = 2, memory_mb: int = 2000, gpus: int = 0,
                 partitions: dict[str, str] | None = None, extra: str = ""):
        """The default partitions: ``cpu`` (the default), ``short`` (MaxTime 30 minutes) and ``wide``, which also
        holds ``ghost``, a node declared for the future that never joins (a partition of two nodes)."""
        self.folder = Path(folder).resolve()
        self.cpus, self.memory_mb, self.gpus = cpus, memory_mb, gpus
        self.partitions = partitions or {"cpu": "", "short": "MaxTime=30", "wide": f"Nodes={self.host_name()},ghost"}
        self.extra = extra if partitions else (extra + "\nNodeName=ghost NodeAddr=127.0.0.2 CPUs=2 RealMemory=2000 "
                                                         "State=FUTURE")
        self.host = self.host_name()
        self.conf = self.folder / "slurm.conf"
        self._procs: list[subprocess.Popen] = []

    @staticmethod
    def host_name() -> str:
        return socket.gethostname().split(".")[0]

    @property
    def env(self) -> dict:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _write_config(self) -> None:
        f = self.folder
        for sub in ("state", "spool", "log", "munge"):
            (f / sub).mkdir(parents=True, exist_ok=True)
        gres = ""
        if self.gpus:
            (f / "dev").mkdir(exist_ok=True)
            for i in range(self.gpus):
                dev = f / "dev" / f"gpu{i}"
                if not dev.exists():
                    os.mknod(dev, 0o666 | 0o020000, os.makedev(1, 3))  # a character device, as /dev/null
            gres = f" Gres=gpu:{self.gpus}"
            last = self.gpus - 1
            (f / "gres.conf").write_text(f"NodeName={self.host} Name=gpu File={f / 'dev'}/gpu[0-{last}]\n"
                                         if last else f"NodeName={self.host} Name=gpu File={f / 'dev'}/gpu0\n")
        lines = [
            f"ClusterName=rb{os.getpid() % 100000}x{free_port()}",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            # cred_expire: a requeued job is held until its old credential expires (Slurm's default 120 s; a job
            # started sooner is killed, "Job credential revoked"); 10 s keeps the requeue tests short.
            f"AuthInfo=socket={f / 'munge' / 'munge.socket'},cred_expire={CRED_EXPIRE_S}",
            "SlurmUser=root", "SlurmdUser=root",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core_Memory",
            "ReturnToService=2", "SlurmdParameters=config_overrides",
            "MpiDefault=none", "SwitchType=switch/none", "LaunchParameters=use_interactive_step",
            "SchedulerType=sched/backfill", "SchedulerParameters=sched_interval=1,bf_interval=1",
            "MinJobAge=600", "KillWait=30", "InactiveLimit=0", "Waittime=0", "MessageTimeout=20",
            f"StateSaveLocation={f / 'state'}", f"SlurmdSpoolDir={f / 'spool'}",
            f"SlurmctldPidFile={f / 'slurmctld.pid'}", f"SlurmdPidFile={f / 'slurmd.pid'}",
            f"SlurmctldLogFile={f / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={f / 'log' / 'slurmd.log'}",
            "SlurmctldDebug=info", "SlurmdDebug=info",
            *(["GresTypes=gpu"] if self.gpus else []),
            self.extra,
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mb}{gres} State=UNKNOWN",
        ]
        for i, (name, options) in enumerate(self.partitions.items()):
            nodes = "" if "Nodes=" in options else f"Nodes={self.host} "
            lines.append(f"PartitionName={name} {nodes}{'Default=YES ' if i == 0 else ''}State=UP {options}".rstrip())
        self.conf.write_text("\n".join(x for x in lines if x) + "\n")

    def _spawn(self, argv: list[str], log: str) -> subprocess.Popen:
        out = open(self.folder / "log" / log, "ab")  # noqa: SIM115 - the daemon's own stdout, kept for its life
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self._procs.append(proc)
        with (self.folder / "pids").open("a") as pids:
            pids.write(f"{proc.pid}\n")
        return proc

    def start(self, timeout: float = 60.0) -> Cluster:
        missing = missing_programs()
        if missing:
            raise RuntimeError(f"Slurm/munge programs missing: {', '.join(missing)} (apt-get install slurmctld slurmd "
                               f"slurm-client munge)")
        self.folder.mkdir(parents=True, exist_ok=True)
        self._write_config()
        m = self.folder / "munge"
        key = m / "munge.key"
        if not key.exists():
            subprocess.run([program("mungekey"), "-c", "-k", str(key)], check=True, capture_output=True)
            key.chmod(0o600)
        self._spawn([program("munged"), "-F", "--force", f"--socket={m / 'munge.socket'}", f"--key-file={key}",
                     f"--pid-file={m / 'munged.pid'}", f"--log-file={m / 'munged.log'}",
                     f"--seed-file={m / 'munged.seed'}"], "munged.out")
        self._wait(lambda: (m / "munge.socket").exists(), timeout, "munged")
        self._spawn([program("slurmctld"), "-D", "-i", "-f", str(self.conf)], "slurmctld.out")
        self._wait(lambda: self.run("scontrol", "ping").returncode == 0 and "UP" in self.run("scontrol", "ping").stdout,
                   timeout, "slurmctld")
        self._spawn([program("slurmd"), "-D", "-f", str(self.conf)], "slurmd.out")

        def idle() -> bool:
            state = self.run("sinfo", "-h", "-N", "-o", "%T").stdout.strip()
            if "down" in state or "drain" in state:
                self.run("scontrol", "update", f"NodeName={self.host}", "State=RESUME")
            return state.startswith("idle")

        self._wait(idle, timeout, "slurmd (node idle)")
        return self

    def _wait(self, ready, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if ready():
                return
            dead = [p for p in self._procs if p.poll() is not None]
            if dead:
                break
            time.sleep(0.2)
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted((self.folder / "log").glob("*"))
                         if p.is_file())
        self.stop()
        raise RuntimeError(f"{what} did not come up in {self.folder}:\n{logs}")

    def run(self, *argv: str, check: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run([program(argv[0]) or argv[0], *argv[1:]], capture_output=True, text=True, env=self.env,
                              check=check, timeout=60)

    def jobs(self, name: str | None = None) -> list[str]:
        """The ids of every job (array task) the controller still lists (queued, running, or ended less than
        MinJobAge ago), or of those named ``name``."""
        lines = self.run("squeue", "-h", "-r", "-t", "all", "-o", "%i %j").stdout.split("\n")[:-1]
        return [x.split()[0] for x in lines if name is None or x.split()[1:] == [name]]

    def cancel_all(self) -> None:
        self.run("scancel", "--full", f"--partition={','.join(self.partitions)}")

    def stop(self) -> None:
        """Stop the daemons this object started (by their pids), or, for a cluster started by another process (the
        script's ``start``), the pids recorded in its folder."""
        pids = [p.pid for p in self._procs]
        if not pids and (self.folder / "pids").is_file():
            pids = [int(x) for x in (self.folder / "pids").read_text().split()]
        for pid in reversed(pids):  # slurmd, slurmctld, then munged
            try:
                os.killpg(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        end = time.monotonic() + 15
        for pid in reversed(pids):
            while time.monotonic() < end:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                proc = next((p for p in self._procs if p.pid == pid), None)
                if proc is not None and proc.poll() is not None:
                    break
                time.sleep(0.1)
            else:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for proc in self._procs:
            if proc.poll() is None:
                proc.wait(timeout=5)
        self._procs.clear()
        (self.folder / "pids").unlink(missing_ok=True)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print("usage: python tests/slurm_cluster.py start|stop DIR", file=sys.stderr)
        return 2
    cluster = Cluster(Path(argv[1]))
    if argv[0] == "start":
        cluster.start()
        print(cluster.conf)
    else:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
