"""Workers that start together on one local MLflow store (issue 22, item 3): each method gets ONE parent run, and
its write-once params are added without a UNIQUE-constraint failure, however the processes interleave. Real
processes on a real MLflow SQLite store."""
import subprocess
import sys
import time

FIRST_RUNS = """
import sys, time
from regbench.tracking import Tracker
uri, start_at = sys.argv[1], float(sys.argv[2])
tracker = Tracker(uri, "race")
time.sleep(max(0.0, start_at - time.time()))  # every process has its client: now all look for the parent at once
tracker.parent("ses", {"beta": 0.7, "lam": 0.01})
tracker.log_results("ses", {"test_acc": 0.5}, {"hparams.beta": 0.7, "epochs": 3})
"""


def test_workers_starting_together_share_one_parent_run(tmp_path):
    from mlflow import MlflowClient

    from regbench.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    Tracker(uri, "race")  # the schema exists already: this is the parent race, not the migration race
    start_at = str(time.time() + 12)  # after every process has imported MLflow and opened the store
    procs = [subprocess.Popen([sys.executable, "-c", FIRST_RUNS, uri, start_at], stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-800:]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("race").experiment_id
    parents = client.search_runs([experiment], filter_string="tags.`regbench.parent` = 'ses'")
    assert len(parents) == 1
    assert parents[0].data.params.get("hparams.beta") == "0.7"
