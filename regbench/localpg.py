"""`regbench postgres start|url|stop`: a throwaway PostgreSQL cluster on this machine, for many workers on one box.

SQLite serializes every write and the journal file has no heartbeat, so several workers on one machine are best served
by PostgreSQL. This starts one the way ``.ci/run`` does: ``initdb`` into a folder of its own (default
``~/.cache/regbench/postgres``; as root ``/tmp/regbench-postgres-USER``, USER being who ran sudo, else root), listening
on 127.0.0.1 only, on a free port picked at the first start and kept in the folder, trust authentication (any local
user may connect: for a machine you control, not a shared login node), and creates database ``regbench``. The folder
records who created it: another user's folder is refused, so one user never reuses, nor stops, another's server.
``start``
prints the storage URL alone on stdout, so ``URL=$(regbench postgres start)`` works; ``stop`` stops it (``--remove``
also deletes the folder). Needs the server binaries (Debian/Ubuntu: ``apt-get install postgresql``). As root, the
cluster runs as the ``postgres`` user, as PostgreSQL requires.

A subcommand rather than a shell script: it ships with the package (a pip install has no ``scripts/`` folder), and
its mistakes are one line and exit 2 like every other command.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

from regbench.arguments import OUTPUT_DIR
from regbench.errors import ConfigError, RegbenchError

DATABASE = "regbench"
PORT_FILE = "port"
OWNER_FILE = "owner"  # who created the folder's cluster (a user name): nobody else may use or stop it


class PostgresError(RegbenchError):
    """The local cluster could not be started or stopped (its log says why)."""


def add_parser(sub) -> None:
    pg = sub.add_parser("postgres", help="start/stop a throwaway local PostgreSQL for many workers on this machine",
                        description="A throwaway PostgreSQL cluster on 127.0.0.1 (trust auth, private port) for "
                                    "`regbench worker`s on this machine; `start` prints the storage URL.")
    pg.add_argument("action", choices=["start", "url", "stop"],
                    help="start (create on first use) and print the URL; print the URL; stop")
    pg.add_argument("--dir", default=None, kind=OUTPUT_DIR,
                    help="the cluster's folder (default ~/.cache/regbench/postgres; as root "
                         "/tmp/regbench-postgres-USER)")
    pg.add_argument("--port", type=int, default=None, help="port on 127.0.0.1 (default: the one the folder's "
                                                           "cluster was started on, else a free one)")
    pg.add_argument("--remove", action="store_true", help="with stop: also delete the cluster's folder")


def postgres_command(args) -> int:
    folder = Path(args.dir or default_folder()).expanduser().resolve()
    cluster = LocalPostgres(folder, args.port)
    cluster.check_owner()
    if args.action == "start":
        cluster.start()
        print(cluster.url())
        print(f"regbench: PostgreSQL running in {folder} (log: {cluster.log}); stop it with `regbench postgres stop"
              f"{'' if args.dir is None else ' --dir ' + str(folder)}`", file=sys.stderr)
    elif args.action == "url":
        if not cluster.running():
            raise ConfigError(f"no PostgreSQL is running in {folder}; start it with `regbench postgres start`")
        print(cluster.url())
    else:
        stopped = cluster.stop()
        if args.remove and folder.exists():
            shutil.rmtree(folder)
        print(f"regbench: PostgreSQL in {folder} {'stopped' if stopped else 'was not running'}"
              f"{' and removed' if args.remove else ''}", file=sys.stderr)
    return 0


def user() -> str:
    """Who this is: the user who ran sudo (as root), else the login name of the effective user."""
    import pwd

    name = pwd.getpwuid(os.geteuid()).pw_name
    if os.geteuid() == 0 and os.environ.get("SUDO_USER", "root") not in ("", "root"):
        return os.environ["SUDO_USER"]
    return name


def default_folder() -> Path:
    """~/.cache/regbench/postgres; as root /tmp/regbench-postgres-USER (the postgres user cannot enter root's home,
    and a folder per user keeps two users' servers apart)."""
    if os.geteuid() == 0:
        import tempfile

        return Path(tempfile.gettempdir()) / f"regbench-postgres-{user()}"
    return Path.home() / ".cache" / "regbench" / "postgres"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_binaries() -> Path:
    """The folder holding initdb and pg_ctl: pg_config's bindir, Debian's /usr/lib/postgresql/<newest>/bin, or PATH."""
    candidates = []
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=False)
        candidates.append(out.stdout.strip())
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: [int(x) for x in Path(p).parent.name.split(
        ".") if x.isdigit()])
    candidates += reversed(versions)
    if shutil.which("initdb"):
        candidates.append(str(Path(shutil.which("initdb")).parent))
    for folder in candidates:
        if folder and (Path(folder) / "initdb").is_file() and (Path(folder) / "pg_ctl").is_file():
            return Path(folder)
    raise ConfigError("PostgreSQL's server programs (initdb, pg_ctl) are not installed; on Debian/Ubuntu: "
                      "apt-get install postgresql (or give --storage a PostgreSQL you already have)")


class LocalPostgres:
    def __init__(self, folder: Path, port: int | None = None):
        self.folder, self.data, self.log = folder, folder / "data", folder / "postgres.log"
        saved = folder / PORT_FILE
        self.explicit_port = port is not None  # --port: used as given, never swapped for a free one
        if port is None and os.path.lexists(saved):
            from regbench.statefiles import (
                read_port,  # schema-checked: a port number 1..65535, one line if not
            )

            port = read_port(saved)
        self.port = port or free_port()

    def check_owner(self) -> None:
        """A folder whose cluster another user created is theirs: refused, never reused nor stopped."""
        owner_file = self.folder / OWNER_FILE
        if not owner_file.is_file():
            return
        owner = owner_file.read_text().strip()
        if owner and owner != user():
            raise ConfigError(f"{self.folder} holds the PostgreSQL of user {owner!r}, not yours ({user()!r}); leave it "
                              f"alone and pass --dir of your own")

    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{DATABASE}"

    def _as_owner(self, argv: list[str]) -> list[str]:
        """PostgreSQL refuses to run as root: root runs it as the postgres user (as .ci/run does)."""
        if os.geteuid() != 0:
            return argv
        import pwd

        try:
            pwd.getpwnam("postgres")
        except KeyError:
            raise ConfigError("PostgreSQL cannot run as root and there is no 'postgres' user; run `regbench postgres "
                              "start` as an ordinary user") from None
        return ["runuser", "-u", "postgres", "--", *argv]

    def _run(self, argv: list[str], what: str) -> subprocess.CompletedProcess:
        done = subprocess.run(self._as_owner(argv), capture_output=True, text=True, check=False)
        if done.returncode != 0:
            reason = (done.stderr.strip() or done.stdout.strip()).splitlines()
            raise PostgresError(f"{what} failed: {reason[-1] if reason else f'exit {done.returncode}'} "
                                f"(see {self.log})")
        return done

    def running(self) -> bool:
        if not (self.data / "PG_VERSION").is_file():
            return False
        argv = self._as_owner([str(server_binaries() / "pg_ctl"), "-D", str(self.data), "status"])
        return subprocess.run(argv, capture_output=True, check=False).returncode == 0

    def _check_reachable_by_postgres(self) -> None:
        """As root the cluster runs as the postgres user, who must be able to pass through every folder above it."""
        import pwd
        import stat

        uid = pwd.getpwnam("postgres").pw_uid if self._as_owner(["x"]) != ["x"] else os.geteuid()
        for parent in [p for p in self.folder.parents if p.exists()]:
            mode = parent.stat()
            if not (mode.st_mode & stat.S_IXOTH or (mode.st_uid == uid and mode.st_mode & stat.S_IXUSR)):
                raise ConfigError(f"--dir {self.folder}: as root the cluster runs as the postgres user, who cannot "
                                  f"enter {parent}; pick a --dir under /tmp (the default for root)")

    def start(self) -> None:
        binaries = server_binaries()
        if self.running():
            return
        if os.geteuid() == 0:
            self._check_reachable_by_postgres()
        self.folder.mkdir(parents=True, exist_ok=True)
        from regbench.statefiles import atomic_write_text

        if not (self.folder / OWNER_FILE).is_file():
            atomic_write_text(self.folder / OWNER_FILE, user() + "\n")
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres")
        if not self._port_free(self.port):  # the saved port is taken now (another server): a free one instead
            if self.explicit_port:
                raise ConfigError(f"--port {self.port} is in use on 127.0.0.1; pass another --port or leave it out")
            self.port = free_port()
        if not (self.data / "PG_VERSION").is_file():
            self._run([str(binaries / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres"], "initdb")
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1"
        self._run([str(binaries / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-o", options, "start"],
                  f"starting PostgreSQL on port {self.port}")
        atomic_write_text(self.folder / PORT_FILE, str(self.port))
        created = subprocess.run(self._as_owner([str(binaries / "createdb"), "-h", "127.0.0.1", "-p", str(self.port),
                                                 "-U", "postgres", DATABASE]), capture_output=True, text=True,
                                 check=False)
        if created.returncode != 0 and "already exists" not in created.stderr:
            raise PostgresError(f"createdb {DATABASE} failed: {created.stderr.strip()[:200]}")

    @staticmethod
    def _port_free(port: int) -> bool:
        import socket

        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
        return True

    def stop(self) -> bool:
        if not self.running():
            return False
        self._run([str(server_binaries() / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"],
                  "stopping PostgreSQL")
        return True
