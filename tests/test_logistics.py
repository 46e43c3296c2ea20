"""Paper logistics and startup: `regbench --version` names the git commit, `--seeds` says count vs list, CITATION.cff
is valid CFF 1.2.0 with the package's version, and the commands people wait for (`--help`, `status`, `export`) do
not import the training or statistics stack (benchmarks/startup.py measures their time)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from regbench import __version__
from regbench.cli import main

ROOT = Path(__file__).resolve().parents[1]
REGBENCH = str(Path(sys.executable).parent / "regbench")
HEAVY = ("torch", "mlflow", "scipy", "statsmodels", "seaborn", "matplotlib", "timm", "sklearn")


def _env(**extra):
    return {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, **extra}


def test_version_names_the_git_commit_of_the_checkout_and_only_the_version_without_git():
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()
    shown = subprocess.run([REGBENCH, "--version"], capture_output=True, text=True, env=_env(), check=False)
    assert shown.returncode == 0 and shown.stdout == f"regbench {__version__} (git commit {commit})\n"
    no_git = subprocess.run([REGBENCH, "--version"], capture_output=True, text=True,
                            env=_env(PATH="/nonexistent"), check=False)  # no git to ask: the version alone
    assert no_git.returncode == 0 and no_git.stdout == f"regbench {__version__}\n", no_git.stderr


def test_seeds_zero_is_refused_as_a_count_with_the_way_to_ask_for_seed_zero(tmp_path, capsys):
    common = ["run", "--methods", "ses", "--dataset", "digits", "--model", "mlp", "--epochs", "1", "--plan-only"]
    assert main([*common, "--seeds", "0", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "read as a count" in err and "--seeds 0," in err, err
    assert not (tmp_path / "a").exists()
    assert main([*common, "--seeds", "-2", "--out", str(tmp_path / "b")]) == 2
    assert "count cannot be negative" in capsys.readouterr().err
    assert main([*common, "--seeds", "3,-1", "--out", str(tmp_path / "b")]) == 2
    assert "is a list of seeds (it has a comma)" in capsys.readouterr().err

    assert main([*common, "--seeds", "0,", "--out", str(tmp_path / "c")]) == 0  # a list of one seed: seed 0
    from regbench.store import load_spec, open_storage
    assert load_spec(open_storage(f"sqlite:///{tmp_path / 'c' / 'regbench.db'}"), "digits-mlp")["seeds"] == [0]
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert "trailing comma" in re.sub(r"\s+", " ", capsys.readouterr().out)


def test_citation_file_is_cff_1_2_0_with_the_package_version():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0"
    for key in ("message", "title", "authors"):  # what CFF 1.2.0 requires
        assert cff.get(key), key
    assert all(a.get("name") or a.get("family-names") for a in cff["authors"])
    assert str(cff["version"]) == __version__ and cff["license"] == "Apache-2.0"
    assert cff.get("type", "software") in ("software", "dataset") and "regbench --version" in cff["message"]
    allowed = {"abstract", "authors", "cff-version", "commit", "contact", "date-released", "doi", "identifiers",
               "keywords", "license", "license-url", "message", "preferred-citation", "references", "repository",
               "repository-artifact", "repository-code", "title", "type", "url", "version"}
    assert set(cff) <= allowed, set(cff) - allowed  # the schema allows no other top-level key


def _heavy(args: list[str]) -> set[str]:
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "regbench.cli", *args], capture_output=True,
                          text=True, env=_env(), check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in proc.stderr.splitlines()
             if line.startswith("import time:") and "|" in line}
    return names & {*HEAVY, "pandas"}


def test_help_status_and_export_import_no_training_or_statistics_stack(tmp_path):
    out = tmp_path / "out"
    assert main(["run", "--methods", "ses,shade", "--dataset", "digits", "--model", "mlp", "--epochs", "1",
                 "--seeds", "2", "--trials", "2", "--out", str(out), "--plan-only"]) == 0
    assert _heavy(["--help"]) == set()
    assert _heavy(["status", str(out)]) == set()
    assert _heavy(["export", str(out)]) <= {"pandas"}
