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

from regbench.arguments import default_data_dir
from regbench.arguments import (CACHE_DIR, INPUT_DIR, OUTPUT_DIR, STORAGE_URL, STORE_URL, TRACKING_URI,
                                KindMixin, check_arguments)
from regbench.errors import EXIT_BUG, RegbenchError, report_bug  # noqa: F401 (EXIT_BUG: for callers and tests)

EXIT_USAGE = 2


class _Parser(KindMixin, argparse.ArgumentParser):
    """argparse with one-line usage errors; ``add_argument(..., kind=KIND)`` declares a path/URL argument's kind
    (regbench/arguments.py), checked before any command starts."""

    def error(self, message):  # argparse's own usage errors: one line, exit 2
        self.exit(EXIT_USAGE, f"regbench: error: {message} (see `{self.prog} --help`)\n")


_default_data_dir = default_data_dir  # the name the commands below were written against


class _Version(argparse.Action):
    """``--version``: the package version and the git commit of the checkout it runs from (an editable install), asked
    of git only when the flag is given, so no other command pays for it."""

    def __call__(self, parser, namespace, values, option_string=None):
        from regbench import __version__
        from regbench.provenance import git_commit

        commit = git_commit()
        print(f"regbench {__version__}" + (f" (git commit {commit})" if commit else ""))  # stdout, as argparse's
        parser.exit(0)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="regbench", description="Benchmark entropy-based and classic regularizers with honest error bars.")
    p.add_argument("--version", action=_Version, nargs=0,
                   help="show regbench's version and, when it runs from a git checkout, the commit; then exit")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="tune each method, rerun the best over seeds, mirror to MLflow, write a leaderboard",
                         description="Tune every method (plus baseline) under the same budget on the validation "
                                     "split (--trials), rerun each one's best configuration over the same seeds, "
                                     "store each run as an Optuna trial, mirror it to MLflow and write "
                                     "leaderboard.md. Rerunning the same command resumes and trains only what is "
                                     "missing.")
    run.add_argument("--methods", required=True, help="comma-separated method names, e.g. ses,shade "
                                                      "(baseline is always added); see `regbench list methods`")
    run.add_argument("--dataset", default="mnist1d", help="dataset name (default: mnist1d, embedded and offline)")
    run.add_argument("--model", help="model name: mlp, cnn, cnn1d or any timm model (default: the dataset's)")
    run.add_argument("--epochs", type=int, help="training epochs (default: the dataset's recipe)")
    run.add_argument("--seeds", default="3", metavar="N|LIST",
                     help="a count N runs seeds 0..N-1 (default 3); a list has commas: 0,1,7, and a trailing comma "
                          "makes one seed a list: --seeds 7, runs seed 7 alone (--seeds 0 is a count of none)")
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
    run.add_argument("--train-per-class", type=int, metavar="K",
                     help="train on a stratified subset of K samples per class (instead of --train-size)")
    run.add_argument("--train-acc-sample", type=int, metavar="N",
                     help="measure train accuracy each epoch on a fixed sample of N training images (the same for "
                          "every method and seed) instead of the whole split: saves a second pass over the training "
                          "data per epoch; the leaderboard says so (default: the whole split)")
    run.add_argument("--augment", choices=["none", "crop_flip"],
                     help="training augmentation: crop_flip = random crop of the 4-px black-padded image + "
                          "horizontal flip (default: the dataset's; crop_flip for cifar10/cifar100, else none)")
    run.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:1, …")
    run.add_argument("--compile", action="store_true",
                     help="torch.compile the training forward (faster on a GPU after a warm-up; same results up to "
                          "floating-point rounding, same run key)")
    run.add_argument("--name", help="benchmark name (default: DATASET-MODEL)")
    run.add_argument("--out", kind=OUTPUT_DIR, help="output dir (default: runs/<benchmark name>)")
    run.add_argument("--storage", kind=STORAGE_URL, help="Optuna storage URL (default: sqlite:///OUT/regbench.db); "
                                       "postgresql://… or journal:PATH.log for many workers")
    run.add_argument("--data-dir", default=None, help="dataset cache (default: $REGBENCH_DATA or ~/.cache/regbench)",
                     kind=CACHE_DIR)
    run.add_argument("--tracking-uri", help="MLflow tracking URI to mirror runs to (default: $MLFLOW_TRACKING_URI, "
                                            "else OUT/mlflow.db); recorded with the benchmark for its workers",
                                            kind=TRACKING_URI)
    run.add_argument("--set", dest="sets", action="append", default=[], metavar="METHOD.HPARAM=VALUE",
                     help="override a method hparam, e.g. --set ses.beta=0.6 (repeatable)")
    run.add_argument("--quiet", action="store_true", help="no progress bars or per-run lines")
    run.add_argument("--parallel-seeds", type=int, default=1, metavar="K",
                     help="train up to K final seeds of one configuration at once in this process (on CUDA: vmap "
                          "over stacked weights when the method allows, else K lockstep copies on K CUDA streams; on "
                          "the CPU: lockstep, one seed after another per step); each seed's result equals it "
                          "trained alone (default 1)")
    _checkpoint_arguments(run, "OUT/checkpoints")
    tune = run.add_argument_group("tuning (Optuna, on the validation split; test is never read while tuning)")
    tune.add_argument("--trials", type=int, default=0,
                      help="tuning trials per method over its search space, TPE seeded; the best on validation is "
                           "rerun over --seeds (default 0: each method's defaults, no tuning)")
    tune.add_argument("--budget-epochs", type=int, metavar="E",
                      help="tune each method until E training epochs are spent (equal budget in epochs; with "
                           "--trials, whichever ends first)")
    tune.add_argument("--pruner", choices=["median", "hyperband", "none"], default="median",
                      help="stop poor tuning trials early on their per-epoch validation score (default median)")
    tune.add_argument("--objective", choices=["val_acc", "val_nll"], default="val_acc",
                      help="what tuning optimizes (default val_acc, maximized; val_nll is minimized)")
    tune.add_argument("--tune-shared", action=argparse.BooleanOptionalAction, default=None,
                      help="tune the shared lr and weight decay with each arm's own hparams, for every arm including "
                           "baseline (the default whenever --trials or --budget-epochs tunes: the same budget for "
                           "every arm, DomainBed's protocol); --no-tune-shared keeps them at the recipe's, and then "
                           "an arm with no hparams of its own (baseline) must be named by --untuned")
    tune.add_argument("--untuned", metavar="METHODS",
                      help="comma-separated arms that run their defaults while the others are tuned, on purpose "
                           "(an unequal budget; the leaderboard says per arm what it got)")
    tune.add_argument("--supersede", action="store_true",
                      help="replace the stored plan of --name when this command changes its protocol (recipe, data "
                           "split, a method's --set or space, tuning rules, fewer seeds/methods/trials): its queued "
                           "runs are cancelled, never trained; its finished runs stay in the store, counted nowhere")
    tune.add_argument("--oracle", action="store_true",
                      help="also evaluate tuning trials on test and add an ORACLE table (selected on test: "
                           "optimistic, for reference only)")
    tune.add_argument("--plan-only", action="store_true",
                      help="store the benchmark's plan and exit; workers (`regbench worker`/`launch`) run it")

    ls = sub.add_parser("list", help="list methods (with hparams and search spaces), datasets or models")
    ls.add_argument("what", choices=["methods", "datasets", "models"])

    st = sub.add_parser("status", help="per method: tuning and final runs done, running, failed, pruned, remaining")
    st.add_argument("out", nargs="?", kind=INPUT_DIR, help="the output dir of a `regbench run` (or give --storage)")
    st.add_argument("--storage", kind=STORE_URL, help="storage URL (default: sqlite:///OUT/regbench.db)")
    st.add_argument("--name", help="benchmark name (default: the only one in the store)")

    sy = sub.add_parser("sync-mlflow", help="mirror to MLflow every run of a benchmark that it lacks (e.g. after "
                                             "the server was down)")
    sy.add_argument("out", nargs="?", kind=INPUT_DIR, help="the output dir of a `regbench run` (or give --storage)")
    sy.add_argument("--storage", kind=STORE_URL, help="storage URL (default: sqlite:///OUT/regbench.db)")
    sy.add_argument("--name", help="benchmark name (default: the only one in the store)")
    sy.add_argument("--tracking-uri", help="MLflow tracking URI to mirror to (default: $MLFLOW_TRACKING_URI, else the "
                                           "one the benchmark's run recorded, else OUT/mlflow.db)", kind=TRACKING_URI)

    wk = sub.add_parser("worker", help="join a benchmark in a shared storage and run its trials until none is left",
                        description="Claim and run trials of a planned benchmark (`regbench run ... --plan-only`, "
                                    "or one being run) from any machine; workers coordinate through the storage.")
    wk.add_argument("--storage", required=True, help="postgresql://USER@HOST/DB, sqlite:///PATH.db or journal:PATH.log",
                    kind=STORE_URL)
    wk.add_argument("--name", help="the benchmark's name (as planned by `regbench run --name NAME`)")
    wk.add_argument("--benchmark", help=argparse.SUPPRESS)  # deprecated spelling of --name
    wk.add_argument("--tracking-uri", help="MLflow tracking URI to mirror runs to (default: $MLFLOW_TRACKING_URI, "
                                           "else the one the benchmark's run recorded)", kind=TRACKING_URI)
    wk.add_argument("--data-dir", default=None, help="dataset cache (default: $REGBENCH_DATA or ~/.cache/regbench)",
                    kind=CACHE_DIR)
    wk.add_argument("--device", help="override the planned device (auto, cpu, cuda, cuda:N)")
    wk.add_argument("--quiet", action="store_true", help="no progress bars or per-run lines")
    wk.add_argument("--per-gpu", type=int, default=1, metavar="N",
                    help="run N worker processes on each visible GPU (N on the CPU without one); default 1")
    wk.add_argument("--checkpoint-dir", kind=OUTPUT_DIR, help="where this worker's mid-run checkpoints go (default: "
                    "regbench-checkpoints next to the --data-dir); local to this machine")
    _checkpoint_arguments(wk, "--checkpoint-dir")

    from regbench.launch import add_parser as add_launch_parser
    add_launch_parser(sub)

    rep = sub.add_parser("report", help="regenerate OUT/leaderboard.md and OUT/figures/ from the store; with "
                                        "several OUTs and --summary, rank the methods across them")
    rep.add_argument("out", nargs="*", help="the output dir of a previous `regbench run` (several with --summary); "
                                            "the leaderboard is written there (default with --storage: runs/NAME, "
                                            "relative to the current dir)", kind=OUTPUT_DIR)
    rep.add_argument("--storage", kind=STORE_URL, help="storage URL (default: sqlite:///OUT/regbench.db; one OUT only)")
    rep.add_argument("--name", help="benchmark name (default: the only one in the store)")
    rep.add_argument("--tracking-uri", help="MLflow tracking URI to attach the leaderboard to (default: "
                                            "$MLFLOW_TRACKING_URI, else the one the benchmark's run recorded)",
                                            kind=TRACKING_URI)
    rep.add_argument("--margin", type=float, default=0.5, metavar="PP",
                     help="equivalence margin in percentage points for the TOST verdict (default 0.5)")
    rep.add_argument("--summary", metavar="DIR", help="also rank methods across the OUTs' benchmarks (Friedman, "
                                                      "Nemenyi CD diagram) into DIR/summary.md", kind=OUTPUT_DIR)
    rep.add_argument("--latex", action="store_true", help="also write the tables as booktabs LaTeX with the same "
                                                          "numbers and notes: OUT/leaderboard.tex (and "
                                                          "DIR/summary.tex with --summary)")
    exp = sub.add_parser("export", help="write the tidy table of final runs to OUT/results.csv or .parquet")
    exp.add_argument("out", kind=OUTPUT_DIR, help="the output dir of a previous `regbench run`")
    exp.add_argument("--format", choices=["csv", "parquet"], default="csv", help="csv (default) or parquet "
                                                                                 "(needs pyarrow)")
    exp.add_argument("--storage", kind=STORE_URL, help="storage URL (default: sqlite:///OUT/regbench.db)")
    exp.add_argument("--name", help="benchmark name (default: the only one in the store)")
    from regbench.data_commands import add_parser as add_data_parser
    add_data_parser(sub)
    from regbench.suites import add_parser as add_suite_parser
    add_suite_parser(sub)
    from regbench.localpg import add_parser as add_postgres_parser
    add_postgres_parser(sub)
    from regbench.ui import add_parser as add_ui_parser
    add_ui_parser(sub)
    return p


def _checkpoint_arguments(parser, where: str) -> None:
    parser.add_argument("--checkpoint-every-seconds", type=float, default=60.0, metavar="S",
                        help=f"save a running run's checkpoint to {where} at the end of an epoch once S seconds have "
                             f"passed since the last save (default 60; 0 = every epoch); a killed run resumes from it")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep the checkpoints of finished runs (default: removed when a run finishes)")


def _one_line_warnings() -> None:
    """A warning reaches a CLI user as one line, "regbench: warning: …", without Python's source line."""
    import warnings

    warnings.formatwarning = lambda message, category, *_args, **_kwargs: f"regbench: warning: {message}\n"
    import logging

    # MLflow logs a whole traceback for a database error it then raises (a full disk under mlflow.db); regbench
    # reports that error itself, in one line (regbench/oserrors.py, tracking's one warning).
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    _stop_on_sigterm()
    _one_line_warnings()
    import time

    started = time.time() - 1  # files left empty since then by a write the system refused are removed (exit 74)

    try:
        check_arguments(parser, args)  # every path/URL argument (regbench/arguments.py), before any work or import
        from regbench import commands

        if args.command == "run":
            if args.compile:  # no C++ compiler / no Triton: one line before any work
                from regbench.engine import check_compile
                check_compile(args.device)
            from regbench import run

            return run.run_command(args, _default_data_dir(), shlex.join(["regbench", *argv]))
        if args.command == "list":
            return commands.list_command(args.what)
        if args.command == "data":
            from regbench.data_commands import data_command
            return data_command(args, _default_data_dir())
        if args.command == "status":
            return commands.status_command(args)
        if args.command == "sync-mlflow":
            return commands.sync_mlflow_command(args)
        if args.command == "worker":
            return commands.worker_command(args, _default_data_dir(), argv)
        if args.command == "launch":
            from regbench.launcher import launch_command
            return launch_command(args, _default_data_dir())
        if args.command == "suite":
            from regbench.suites import suite_command
            return suite_command(args)
        if args.command == "export":
            return commands.export_command(args)
        if args.command == "postgres":
            from regbench.localpg import postgres_command
            return postgres_command(args)
        if args.command == "ui":
            from regbench.ui import ui_command
            return ui_command(args)
        return commands.report_command(args)
    except RegbenchError as exc:
        print(f"regbench: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Terminated:
        print("regbench: terminated (SIGTERM); rerun the same command to resume where it stopped", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("regbench: interrupted; rerun the same command to resume where it stopped", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`regbench list methods | head`): stop quietly, as Unix tools do
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes at exit
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by the closed pipe
    except Exception as exc:  # the last line of defence: not a user error but a bug; one line, traceback to a file
        from regbench import oserrors

        failure = oserrors.translate(exc, _store_hint(args))
        if failure is not None:  # the machine (a full disk, a read-only mount, ...), not a bug: one line, exit 74
            oserrors.clean(_output_dirs(args), started)
            print(f"regbench: error: {failure}", file=sys.stderr)
            return oserrors.EXIT_IOERR
        return report_bug(exc, _output_dirs(args))


def _store_hint(args) -> str | None:
    """The place a database error without a path happened in: the store the command opened."""
    storage = getattr(args, "storage", None)
    if storage:
        from regbench.store import safe_url

        return f"store {safe_url(storage)}"
    out = _output_dirs(args)
    return f"store in {out[0]}" if out else None


def _output_dirs(args) -> list:
    """Where a crash report may go, best first: the command's output dir(s), if it has any."""
    out = getattr(args, "out", None)
    return [str(o) for o in (out if isinstance(out, list) else [out]) if o]


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler pre-empting the job) unwinds exactly like Ctrl-C: the running trial is recorded as
    interrupted (and rerun when the command is rerun) and the store stays consistent."""


# The acknowledgement of a deferred stop (a run may need its current step, or the trial's record, to finish first).
STOPPING = {False: "regbench: stopping once the current training step is saved (Ctrl-C again stops at once)\n",
            True: "regbench: SIGTERM received; stopping once the current training step is saved\n"}


def _stop_on_sigterm() -> None:
    """Ctrl-C and SIGTERM stop a training loop after its current optimizer step (it saves a mid-epoch checkpoint,
    regbench/stopping.py) and anything else at once; a second signal always stops at once."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        def handler(signum, _frame):
            exception = Terminated if signum == signal.SIGTERM else KeyboardInterrupt
            from regbench import stopping

            if stopping.request_stop(exception):
                # os.write, not print: the handler may run while the main thread is inside a print to stderr
                os.write(2, STOPPING[signum == signal.SIGTERM].encode())
                return
            raise exception()
        signal.signal(signal.SIGTERM, handler)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not when a caller (pytest) set its own
            signal.signal(signal.SIGINT, handler)


if __name__ == "__main__":
    sys.exit(main())
