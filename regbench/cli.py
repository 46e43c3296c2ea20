"""Command line: argument parsing and error reporting only; the work happens in study/engine/report.

Every user mistake is a RegbenchError, caught once in ``main``: one line on stderr, exit status 2, and nothing in
an existing output dir is touched because all validation happens before the first write.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from regbench.errors import RegbenchError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own usage errors: one line, exit 2
        self.exit(EXIT_USAGE, f"regbench: error: {message} (see `{self.prog} --help`)\n")


def _default_data_dir() -> str:
    return os.environ.get("REGBENCH_DATA") or str(Path.home() / ".cache" / "regbench")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="regbench", description="Benchmark entropy-based and classic regularizers with honest error bars.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="tune-free v1: run each method over seeds, mirror to MLflow, write a leaderboard",
                         description="Train every method (plus baseline) over the same seeds on the same split, store "
                                     "each run as an Optuna trial, mirror it to MLflow and write leaderboard.md. "
                                     "Rerunning the same command resumes and trains only what is missing.")
    run.add_argument("--methods", required=True, help="comma-separated method names, e.g. ses,shade "
                                                      "(baseline is always added); see `regbench list methods`")
    run.add_argument("--dataset", default="mnist1d", help="dataset name (default: mnist1d, embedded and offline)")
    run.add_argument("--model", help="model name: mlp, cnn, cnn1d or any timm model (default: the dataset's)")
    run.add_argument("--epochs", type=int, help="training epochs (default: the dataset's recipe)")
    run.add_argument("--seeds", default="3", help="number of seeds N (seeds 0..N-1) or a list like 0,1,7 (default 3)")
    run.add_argument("--batch-size", type=int, help="batch size (default: the dataset's recipe)")
    run.add_argument("--lr", type=float, help="peak learning rate (default: the dataset's recipe)")
    run.add_argument("--optimizer", choices=["sgd", "adamw"], help="optimizer (default: the dataset's recipe)")
    run.add_argument("--schedule", choices=["constant", "cosine", "multistep", "onecycle"],
                     help="learning-rate schedule (default: the dataset's recipe)")
    run.add_argument("--weight-decay", type=float, default=0.0,
                     help="weight decay shared by every method (default 0: baseline means no regularizer)")
    run.add_argument("--shift", help="evaluate every final run on a shift set, e.g. digits_c_style "
                                     "(15+4 CIFAR-C-style corruptions × 5 severities of the test split)")
    run.add_argument("--train-size", type=int, help="train on a stratified subset of this many samples")
    run.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:1, …")
    run.add_argument("--name", help="benchmark name (default: DATASET-MODEL)")
    run.add_argument("--out", help="output dir (default: runs/<benchmark name>)")
    run.add_argument("--storage", help="Optuna storage URL (default: sqlite:///OUT/regbench.db); "
                                       "postgresql://… or journal:PATH.log for many workers")
    run.add_argument("--data-dir", default=None, help="dataset cache (default: $REGBENCH_DATA or ~/.cache/regbench)")
    run.add_argument("--set", dest="sets", action="append", default=[], metavar="METHOD.HPARAM=VALUE",
                     help="override a method hparam, e.g. --set ses.beta=0.6 (repeatable)")
    run.add_argument("--quiet", action="store_true", help="no progress bars or per-run lines")

    ls = sub.add_parser("list", help="list methods (with hparams and search spaces), datasets or models")
    ls.add_argument("what", choices=["methods", "datasets", "models"])

    rep = sub.add_parser("report", help="regenerate OUT/leaderboard.md from the store")
    rep.add_argument("out", help="the output dir of a previous `regbench run`")
    rep.add_argument("--storage", help="storage URL (default: sqlite:///OUT/regbench.db)")
    rep.add_argument("--name", help="benchmark name (default: the only one in the store)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    from regbench import commands

    try:
        if args.command == "run":
            return commands.run_command(args, _default_data_dir(), shlex.join(["regbench", *argv]))
        if args.command == "list":
            return commands.list_command(args.what)
        return commands.report_command(args)
    except RegbenchError as exc:
        print(f"regbench: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("regbench: interrupted; rerun the same command to resume where it stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
