"""``spatial_factorization <stage> -c CONFIG``: run one pipeline stage.

The MLproject's entry points call this same function, so ``mlflow run . -e train``
and ``spatial_factorization train`` behave identically. Config keys can be
overridden with ``--set model.lengthscale=2`` or ``--model.lengthscale 2`` (the
form ``mlflow run -P model.lengthscale=2`` produces). Runs go to the experiment of the
config's ``name`` unless ``--experiment-name`` or ``MLFLOW_EXPERIMENT_NAME`` names another
(see :mod:`sf_mlflow.tracking.experiments`).

Commands that are not stages (no config, no MLflow run) come from
:data:`~sf_mlflow.stages.table.COMMANDS`: ``spatial_factorization export --run-id ID
-o results.h5ad`` writes an analyze run as an AnnData file.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from sf_mlflow.errors import ArtifactError, SfMlflowError
from sf_mlflow.stages.table import COMMANDS, STAGES

#: The exit code of an interrupted command (128 + SIGINT, whichever signal it was).
INTERRUPTED = 130


#: The epilog of each command's --help: what a newcomer types.
EXAMPLES = {
    "preprocess": "example:\n  spatial_factorization preprocess -c configs/quickstart.yaml",
    "train": "examples:\n"
             "  spatial_factorization train -c configs/quickstart.yaml\n"
             "  spatial_factorization train -c my.yaml --preprocess-run-id <ID> "
             "--set model.n_components=8\n"
             "  spatial_factorization train -c my.yaml --register-as my-model",
    "analyze": "example:\n  spatial_factorization analyze -c my.yaml --train-run-id <ID>",
    "figures": "example:\n  spatial_factorization figures -c my.yaml --analyze-run-ids <ID>,<ID>",
    "tune": "example:\n  spatial_factorization tune -c configs/quickstart_tune.yaml",
    "main": "examples:\n"
            "  spatial_factorization main -c configs/quickstart.yaml\n"
            "  spatial_factorization main -c my.yaml --force true\n\n"
            "one model: the config's model: block; several over one preprocess run: a\n"
            "models: list (pnmf, svgp, mggp, hybrid) or mapping name -> {model: ...,\n"
            "training: ...} overrides (see the README's Configuration)",
    "export": "examples:\n"
              "  spatial_factorization export --run-id <analyze run ID> -o results.h5ad\n"
              "  spatial_factorization export --run-id <ID> -o r.h5ad "
              "--tracking-uri sqlite:////path/to/mlflow.db\n"
              "  spatial_factorization export --run-id <ID> -o results.h5ad --force   "
              "# replace it",
    "sync": "example:\n"
            "  spatial_factorization sync outputs/train/<run id>.unsent",
    "show-config": "examples:\n"
                   "  spatial_factorization show-config\n"
                   "  spatial_factorization show-config -c my.yaml --set model.n_components=8",
}


def _build_parser() -> argparse.ArgumentParser:
    """One subcommand per row of :data:`~sf_mlflow.stages.table.STAGES`, then of ``COMMANDS``."""
    from sf_mlflow import __version__

    parser = argparse.ArgumentParser(
        prog="spatial_factorization",
        description="Fit spatial factor models and track each stage as an MLflow run.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Any config key can be overridden: --set training.max_iter=200 "
               "or --training.max_iter 200.\n"
               "Every key, its default and where a config's value came from:\n"
               "  spatial_factorization show-config -c CONFIG")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, stage in STAGES.items():
        p = sub.add_parser(name, help=stage.description, description=stage.description,
                           epilog=EXAMPLES.get(name),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("-c", "--config", required=True, help="YAML config file")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. model.n_components=5 (repeatable)")
        p.add_argument("--experiment-name", default=None, metavar="NAME",
                       help="MLflow experiment of the runs (default: MLFLOW_EXPERIMENT_NAME, "
                            "else the config's name)")
        for arg in (*stage.args, *stage.launch):
            p.add_argument(arg.flag, default=arg.default, type=arg.type, metavar=arg.metavar,
                           help=arg.help)
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.description, description=command.description,
                           epilog=EXAMPLES.get(name),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        for opt in command.options:
            if opt.positional:
                p.add_argument(opt.flags[0], nargs="+" if opt.repeat else None,
                               metavar=opt.metavar, help=opt.help)
                continue
            if opt.switch:
                p.add_argument(*opt.flags, dest=opt.keyword, action="store_true", help=opt.help)
                continue
            p.add_argument(*opt.flags, dest=opt.keyword, required=opt.required,
                           default=[] if opt.repeat else opt.default,
                           action="append" if opt.repeat else "store",
                           metavar=opt.metavar, help=opt.help)
    return parser


#: The launch option of ``train`` (see :func:`_relaunch_under_torchrun`).
NPROC = "--nproc-per-node"


def _relaunch_under_torchrun(argv: list[str], nproc: int) -> int:
    """Replace this process by ``torchrun --standalone --nproc-per-node nproc`` running the
    same command with ``training.distributed=true`` (this machine only; for several machines
    start torchrun yourself). ``mlflow run . -e train -P nproc_per_node=K`` comes here, and
    the ``MLFLOW_RUN_ID`` it set reaches rank 0, which alone makes and logs the run.

    Exec, not a child process: signals from a terminal or ``mlflow run`` reach torchrun,
    which passes them to every rank.
    """
    import os
    from pathlib import Path

    if os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("LOCAL_RANK"):
        print(f"error: {NPROC} {nproc} was given to a process that torchrun already started; "
              f"leave {NPROC} out under torchrun (its own --nproc-per-node sets the processes)",
              file=sys.stderr)
        return 2
    rest, i = [], 0
    while i < len(argv):          # drop our option, in either spelling
        if argv[i] == NPROC:
            i += 2
            continue
        if not argv[i].startswith(NPROC + "="):
            rest.append(argv[i])
        i += 1
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "sf_mlflow.cli", *rest,
           "--set", "training.distributed=true"]
    # the ranks import this package from where this process did (also an uninstalled checkout)
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [root, *filter(None, [os.environ.get("PYTHONPATH")])])}
    print(f"[train] starting {nproc} processes: torchrun --standalone --nproc-per-node "
          f"{nproc} -m sf_mlflow.cli {' '.join(rest)} --set training.distributed=true",
          flush=True)
    os.execve(sys.executable, cmd, env)
    return 0  # not reached


def _dotted_overrides(extra: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """Turn ``["--model.lengthscale", "2", "--a.b=3"]`` into ``["model.lengthscale=2", "a.b=3"]``."""
    out, i = [], 0
    while i < len(extra):
        tok = extra[i]
        key = tok[2:] if tok.startswith("--") else None
        if not key or "." not in key.split("=", 1)[0]:
            parser.error(f"unrecognized argument {tok!r} (config overrides look like "
                         "--set model.lengthscale=2 or --model.lengthscale 2)")
        if "=" in key:
            out.append(key)
            i += 1
        elif i + 1 < len(extra):
            out.append(f"{key}={extra[i + 1]}")
            i += 2
        else:
            parser.error(f"override {tok!r} has no value")
    return out


def _command(command, args: argparse.Namespace, extra: list[str],
             parser: argparse.ArgumentParser) -> int:
    """Run a command of :data:`~sf_mlflow.stages.table.COMMANDS` (no config, no run)."""
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        command.load()(**command.kwargs(args))
    except Exception as err:
        return _report(err)
    return 0


def _report(err: Exception) -> int:
    """Print ``err`` as one ``error:`` line and return exit status 2, or re-raise it.

    User mistakes (:class:`SfMlflowError`) and the failures of the store and the disk a
    user can act on (locked or read-only store, full disk: see
    :func:`sf_mlflow.tracking.store.explain_failure`) get one line; anything else is a bug
    and keeps its traceback.
    """
    if isinstance(err, ArtifactError):
        from sf_mlflow.tracking.lineage import explain_artifact_error

        message = explain_artifact_error(err)
    elif isinstance(err, SfMlflowError):
        message = str(err)
    else:
        from sf_mlflow.tracking.store import explain_failure

        message = explain_failure(err)
        if message is None:
            raise err
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    if int(getattr(args, "nproc_per_node", 1)) > 1:
        return _relaunch_under_torchrun(argv, int(args.nproc_per_node))
    if args.stage in COMMANDS:
        return _command(COMMANDS[args.stage], args, extra, parser)
    overrides = list(args.set) + _dotted_overrides(extra, parser)
    try:
        from sf_mlflow.config import load_config
        from sf_mlflow.tracking import select_experiment

        select_experiment(args.experiment_name)
        config = load_config(args.config, overrides)
        stage = STAGES[args.stage]
        stage.load()(config, **stage.kwargs(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED
    except Exception as err:
        # User mistakes and store or disk failures get one readable line, not a traceback.
        return _report(err)
    return 0


def console(argv: Sequence[str] | None = None) -> None:
    """The console script and the entry points: :func:`main`, then exit with its code.

    After an interrupt the process ends at once (``os._exit(130)``, output flushed; every run
    has been ended KILLED by then). An interrupt can strand a library's thread-pool worker:
    raised between the worker's ``Thread.start()`` and its registration for shutdown
    (``concurrent.futures.thread``), it leaves a non-daemon thread waiting on its queue for
    ever, and the interpreter's shutdown joins it for ever (seen: ``main`` printed
    "interrupted" after a SIGTERM during analyze and never exited).
    """
    code = main(argv)
    if code == INTERRUPTED:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    console()
