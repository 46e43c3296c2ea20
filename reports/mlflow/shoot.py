"""Screenshots of `regbench ui` in headless Chromium, through chromedriver's W3C WebDriver HTTP API (no Selenium).

    python reports/mlflow/shoot.py RUN_FOLDER reports/mlflow

starts `regbench ui RUN_FOLDER --no-dashboard`, opens the two links it prints (runs table, charts) in a fresh
1600×1000 headless Chromium profile, waits until the page shows what it should, and saves runs.png, charts.png and
description.png (the experiment description expanded by one click, its only click). Stops everything at the end.
"""
from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Driver:
    def __init__(self, chromium="/usr/bin/chromium", chromedriver="/usr/bin/chromedriver"):
        self.port = free_port()
        self.proc = subprocess.Popen([chromedriver, f"--port={self.port}"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        for _ in range(100):
            try:
                self._call("GET", "/status")
                break
            except OSError:
                time.sleep(0.1)
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": chromium, "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                                         "--disable-background-networking", "--hide-scrollbars",
                                         "--window-size=1600,1000"]}}}}
        self.session = self._call("POST", "/session", caps)["sessionId"]

    def _call(self, method, path, body=None):
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return json.loads(r.read() or b"{}").get("value", {})
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"chromedriver {method} {path}: {exc.read()[:300]!r}") from None

    def s(self, method, path, body=None):
        return self._call(method, f"/session/{self.session}{path}", body)

    def js(self, script, *args):
        return self.s("POST", "/execute/sync", {"script": script, "args": list(args)})

    def wait_text(self, text, timeout=90):
        end = time.time() + timeout
        while time.time() < end:
            if text in (self.js("return document.body ? document.body.innerText : ''") or ""):
                return True
            time.sleep(0.5)
        raise TimeoutError(f"page never showed {text!r}")

    def shot(self, path):
        Path(path).write_bytes(base64.b64decode(self.s("GET", "/screenshot")))

    def quit(self):
        try:
            self.s("DELETE", "")
        finally:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait()


def main(run: str, folder: str) -> None:
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    ui = subprocess.Popen([sys.executable, "-m", "regbench.cli", "ui", run, "--no-dashboard"], stdout=subprocess.PIPE,
                          text=True, start_new_session=True)
    try:
        links = [line[line.index("http"):] for line in (ui.stdout.readline().strip() for _ in range(2))]
        driver = Driver()
        try:
            driver.s("POST", "/url", {"url": links[0]})
            driver.wait_text("test_acc")
            time.sleep(3)  # let the table settle (column widths, dataset chips)
            driver.shot(out / "runs.png")
            driver.s("POST", "/url", {"url": links[1]})
            driver.wait_text("At a glance")
            time.sleep(8)  # charts render lazily, images load after
            driver.shot(out / "charts.png")
            driver.s("POST", "/url", {"url": links[0]})
            driver.wait_text("test_acc")
            time.sleep(2)
            # the experiment description's one click: its expand arrow at the right of its first line
            driver.js("const bs=[...document.querySelectorAll('button')];"
                      "const i=bs.findIndex(b=>b.dataset.testid==='experiment-metadata-editor-edit-button');"
                      "if(i>=0) bs[i+1].click();")
            time.sleep(3)
            driver.shot(out / "description.png")
        finally:
            driver.quit()
    finally:
        os.killpg(ui.pid, signal.SIGINT)
        ui.wait(timeout=60)


if __name__ == "__main__":
    main(*sys.argv[1:3])
