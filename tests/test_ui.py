"""`regbench ui OUT` as a user runs it: a subprocess on a real run folder, its printed links fetched over HTTP from the
real MLflow and optuna-dashboard servers it started, then Ctrl-C, after which nothing listens any more."""
import contextlib
import io
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from helpers import regbench_cli, with_ctrl_c

from regbench.cli import main

NAME = "digits-mlp"


@pytest.fixture(scope="module")
def out(tmp_path_factory, data_dir) -> Path:
    out = tmp_path_factory.mktemp("ui") / "out"
    saved = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(["run", "--methods", "ses", "--dataset", "digits", "--model", "mlp", "--epochs", "1",
                         "--seeds", "2", "--out", str(out), "--data-dir", str(data_dir), "--quiet"]) == 0
    finally:
        if saved is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved
    return out


def fetch(url: str, body: dict | None = None) -> tuple[int, str, bytes]:
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.status, r.headers.get("Content-Type", ""), r.read()


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_ui_prints_links_that_answer_and_ctrl_c_stops_both(out):
    script = Path(sys.executable).parent / "regbench"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "regbench.cli"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen([*cmd, "ui", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, preexec_fn=with_ctrl_c)  # noqa: PLW1509 - one signal() call before exec
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        links = {}
        deadline = time.monotonic() + 240
        while len(links) < 3 and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                assert proc.poll() is None, proc.stderr.read()
                continue
            what, url = line.strip().rsplit(": ", 1)
            links[what] = url
        assert len(links) == 3, links
        table, charts, dashboard = links.values()
        # MLflow: the runs table link opens the model-training view of the experiment in the saved view.
        parsed = urllib.parse.urlsplit(table)
        assert parsed.hostname == "127.0.0.1" and urllib.parse.urlsplit(dashboard).hostname == "127.0.0.1"
        route, query = parsed.fragment.split("?")
        experiment = route.split("/")[2]
        assert route == f"/experiments/{experiment}/runs"
        assert urllib.parse.parse_qs(query) == {"workflowType": ["machine_learning"], "viewStateShareKey": ["regbench"]}
        assert charts == table + "&compareRunsMode=CHART"
        base = f"{parsed.scheme}://{parsed.netloc}"
        status, kind, page = fetch(base + "/")
        assert status == 200 and "text/html" in kind and b"<div id=\"root\"" in page
        _, _, body = fetch(f"{base}/ajax-api/2.0/mlflow/experiments/get?experiment_id={experiment}")
        exp = json.loads(body)["experiment"]
        assert exp["name"] == NAME and "mlflow.sharedViewState.regbench" in {t["key"] for t in exp["tags"]}
        _, _, body = fetch(f"{base}/ajax-api/2.0/mlflow/runs/search", {"experiment_ids": [experiment]})
        runs = json.loads(body)["runs"]
        assert len(runs) == 6  # 2 parents + 2 methods × 2 seeds
        parent = next(r for r in runs if {"key": "regbench.parent", "value": "baseline"} in r["data"]["tags"])
        status, kind, png = fetch(f"{base}/get-artifact?path=comparison.png&run_uuid={parent['info']['run_id']}")
        assert status == 200 and png.startswith(b"\x89PNG")  # the figure the experiment description embeds
        # optuna-dashboard on the run's own store
        status, _, _ = fetch(dashboard)
        assert status == 200
        dash = urllib.parse.urlsplit(dashboard)
        _, _, body = fetch(f"{dash.scheme}://{dash.netloc}/api/studies")
        assert f"{NAME}:ses:final" in {s["study_name"] for s in json.loads(body)["study_summaries"]}
        ports = [parsed.port, dash.port]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        assert "regbench ui: stopped" in proc.stderr.read()
        assert not any(listening(p) for p in ports)
    finally:
        if proc.poll() is None:  # a failed assertion: stop it the way a user would, so it stops its servers
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_ui_bad_input_is_one_line_and_exit_2(tmp_path):
    missing = regbench_cli("ui", str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    no_store = regbench_cli("ui", str(empty))
    folder = tmp_path / "folder"  # a store file is all the port check needs: it comes before any server starts
    folder.mkdir()
    (folder / "mlflow.db").write_bytes(b"")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = regbench_cli("ui", str(folder), "--port", str(busy.getsockname()[1]))
    for ran, words in ((missing, "does not exist"), (no_store, "mlflow.db"), (taken, "in use")):
        assert ran.returncode == 2, ran.stderr
        assert len(ran.stderr.strip().splitlines()) == 1 and ran.stderr.startswith("regbench: error: ")
        assert words in ran.stderr and ran.stdout == ""
    assert list(empty.iterdir()) == []  # nothing written
