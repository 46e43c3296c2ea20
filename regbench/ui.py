"""`regbench ui OUT`: the MLflow UI (and optuna-dashboard, when installed) for one run folder, on 127.0.0.1 and free
ports, with the links that open the right views; Ctrl-C stops both.

The MLflow link opens the benchmark's experiment in the "Model training" workflow (``workflowType=machine_learning``;
MLflow 3.17+ otherwise lands on its GenAI pages) and its saved view ``regbench`` (``viewStateShareKey``, written by
regbench/glance.py): one row per method with its test accuracy, interval, Δ, Holm p and verdict, and the chart view
with the comparison figure first. Both servers run in their own process group, so a Ctrl-C reaches regbench only,
and regbench stops them (SIGTERM, then SIGKILL after a grace period) before it exits.
"""
from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from regbench.errors import ConfigError, RegbenchError

HOST = "127.0.0.1"
START_TIMEOUT_S = 180.0  # a cold MLflow server on a loaded 2-core box took ~20 s; a slow disk more
STOP_GRACE_S = 10.0


def add_parser(sub) -> None:
    from regbench.arguments import INPUT_DIR

    ui = sub.add_parser("ui", help="open a run folder in the MLflow UI (and optuna-dashboard when installed) on "
                                   "127.0.0.1 and print the links; Ctrl-C stops them",
                        description="Start the MLflow UI on OUT/mlflow.db (and optuna-dashboard on OUT's store when "
                                    "optuna-dashboard is installed), bound to 127.0.0.1 on free ports, print the "
                                    "links that open the benchmark's runs table and charts, and stop both on Ctrl-C.")
    ui.add_argument("out", kind=INPUT_DIR, help="the output dir of a `regbench run`")
    ui.add_argument("--port", type=int, default=0, help="the MLflow UI's port (default: a free one)")
    ui.add_argument("--dashboard-port", type=int, default=0, help="optuna-dashboard's port (default: a free one)")
    ui.add_argument("--no-dashboard", action="store_true", help="start the MLflow UI only")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _port(value: int, option: str) -> int:
    if value == 0:
        return free_port()
    if not 1 <= value <= 65535:
        raise ConfigError(f"{option} {value} is not a port (1-65535); pass a free port or leave it out for a free one")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, value))
        except OSError:
            raise ConfigError(f"{option} {value}: the port is in use on {HOST}; pass another or leave it out for a "
                              f"free one") from None
    return value


def mlflow_links(uri: str, base: str) -> list[tuple[str, str]]:
    """(what, URL) per experiment of the store: its runs table and its chart view, in the saved view when the
    experiment has one."""
    from mlflow import MlflowClient

    from regbench import glance

    links = []
    for exp in MlflowClient(uri).search_experiments():
        query = "workflowType=machine_learning"
        if glance.VIEW_TAG in exp.tags:
            query += f"&viewStateShareKey={glance.VIEW_KEY}"
        page = f"{base}/#/experiments/{exp.experiment_id}/runs?{query}"
        links += [(f"MLflow, {exp.name}: runs table (one row per method)", page),
                  (f"MLflow, {exp.name}: charts (comparison figure first)", f"{page}&compareRunsMode=CHART")]
    return links


def _store_url(out: Path) -> str | None:
    """The Optuna store OUT's runs are in: OUT/regbench.db, else the shared store OUT/store.json names."""
    if (out / "regbench.db").is_file():
        return f"sqlite:///{(out / 'regbench.db').resolve()}"
    from regbench.statefiles import POINTER_FILE, read_pointer

    if (out / POINTER_FILE).is_file():
        url, _ = read_pointer(out)
        return None if "***" in url else url  # a password is not kept: the dashboard could not open it
    return None


# MLflow 3.x's server starts a job runner and a dozen Huey consumers (GenAI judges, periodic tasks) by default: ten
# processes a browsing session never uses, on a 2-core box that is also training.
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_SERVER_JOB_ENABLE_PERIODIC_TASKS": "false"}


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when regbench ui dies, even by SIGKILL (Linux's PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the Ctrl-C path still stops the servers
        pass


def _start(argv: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    with open(log, "wb") as sink:
        return subprocess.Popen(argv, cwd=cwd, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **SERVER_ENV},
                                preexec_fn=_die_with_parent,  # noqa: PLW1509 - one prctl() call before exec
                                start_new_session=True)  # its own group: the terminal's Ctrl-C reaches us only


def _answers(url: str) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _wait(servers: list[tuple[str, subprocess.Popen, str, Path]]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    pending = list(servers)
    while pending:
        for item in list(pending):
            name, proc, probe, log = item
            if proc.poll() is not None:
                tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
                raise RegbenchError(f"{name} exited with status {proc.returncode} before it answered ({tail[0][:200]}"
                                    f"); its log: {log}")
            if _answers(probe):
                pending.remove(item)
        if pending and time.monotonic() > deadline:
            raise RegbenchError(f"{pending[0][0]} did not answer {pending[0][2]} within {START_TIMEOUT_S:.0f} s; its "
                                f"log: {pending[0][3]}")
        time.sleep(0.3)


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM to each server's process group, then SIGKILL to what is left after the grace period."""
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + STOP_GRACE_S
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        try:  # the group's other members (server workers) too, also when the leader is gone
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()


def ui_command(args) -> int:
    out = Path(args.out)
    db = out / "mlflow.db"
    if not db.is_file():
        raise ConfigError(f"{out} has no MLflow store ({db.name}): its runs were not mirrored there (or to an MLflow "
                          f"server named by MLFLOW_TRACKING_URI); make one with `regbench sync-mlflow {out} "
                          f"--tracking-uri sqlite:///{db.resolve()}`")
    if importlib.util.find_spec("mlflow") is None:
        raise ConfigError("regbench ui needs MLflow: pip install mlflow")
    uri = f"sqlite:///{db.resolve()}"
    mlflow_port = _port(args.port, "--port")
    store = None if args.no_dashboard or importlib.util.find_spec("optuna_dashboard") is None else _store_url(out)
    dash_port = _port(args.dashboard_port, "--dashboard-port") if store else None
    import tempfile

    logs = Path(tempfile.mkdtemp(prefix="regbench-ui-"))
    artifacts = (out / "mlartifacts").resolve().as_uri()
    servers = [("MLflow UI", [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", HOST,
                              "--port", str(mlflow_port), "--workers", "1", "--artifacts-destination", artifacts],
                f"http://{HOST}:{mlflow_port}/health", logs / "mlflow.log")]
    if store:
        servers.append(("optuna-dashboard", [sys.executable, "-c", "from optuna_dashboard._cli import main; main()",
                                             store, "--host", HOST, "--port", str(dash_port), "--quiet"],
                        f"http://{HOST}:{dash_port}/api/studies", logs / "optuna-dashboard.log"))
    procs = []
    try:
        started = []
        for name, argv, probe, log in servers:
            proc = _start(argv, out, log)
            procs.append(proc)
            started.append((name, proc, probe, log))
        print(f"regbench ui: starting {' and '.join(n for n, *_ in servers)} on {HOST} (logs in {logs}) ...",
              file=sys.stderr, flush=True)
        _wait(started)
        lines = [f"{what}: {url}" for what, url in mlflow_links(uri, f"http://{HOST}:{mlflow_port}")]
        if store:
            lines.append(f"optuna-dashboard (every study of the store): http://{HOST}:{dash_port}/dashboard")
        elif not args.no_dashboard:
            lines.append("optuna-dashboard: not installed (pip install optuna-dashboard), or OUT names no store it can "
                         "open")
        print("\n".join(lines), flush=True)
        print("regbench ui: Ctrl-C stops " + ("both" if store else "it"), file=sys.stderr, flush=True)
        while all(proc.poll() is None for proc in procs):
            time.sleep(0.5)
        name, proc, _, log = next(item for item in started if item[1].poll() is not None)
        raise RegbenchError(f"{name} stopped by itself (status {proc.returncode}); its log: {log}")
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the normal way to stop
        _stop(procs)
        print("regbench ui: stopped", file=sys.stderr, flush=True)
        return 0
    finally:
        _stop(procs)
