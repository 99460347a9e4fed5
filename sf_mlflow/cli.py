"""``spatial_factorization <stage> -c CONFIG``: run one pipeline stage.

The MLproject's entry points call this same function, so ``mlflow run . -e train``
and ``spatial_factorization train`` behave identically. Config keys can be
overridden with ``--set model.lengthscale=2`` or ``--model.lengthscale 2`` (the
form ``mlflow run -P model.lengthscale=2`` produces).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from sf_mlflow.errors import SfMlflowError


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spatial_factorization",
        description="Fit spatial factor models and track each stage as an MLflow run.",
        epilog="Any config key can be overridden: --set training.max_iter=200 "
               "or --training.max_iter 200.")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")

    def stage(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("-c", "--config", required=True, help="YAML config file")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. model.n_components=5 (repeatable)")
        return p

    stage("preprocess", "load, filter and split a data set; log it as a preprocess run")
    p = stage("train", "fit the model on a preprocess run's data; log it as a train run")
    p.add_argument("--preprocess-run-id", default="",
                   help="upstream preprocess run (default: newest matching FINISHED run)")
    p.add_argument("--resume-from", default="",
                   help="continue an interrupted (KILLED) train run from its checkpoint")
    p.add_argument("--register-as", default="", metavar="NAME",
                   help="also register the model as an MLflow pyfunc model NAME (empty: don't)")
    p.add_argument("--register-alias", default="latest", metavar="ALIAS",
                   help="alias of the new version (default latest, MLflow's newest version)")
    p = stage("analyze", "compute factors, Moran's I, deviances and enrichment of a train run")
    p.add_argument("--train-run-id", default="",
                   help="upstream train run (default: newest FINISHED one of this config)")
    p = stage("figures", "draw the figures of one analyze run, or compare several")
    p.add_argument("--analyze-run-ids", default="",
                   help="one or more analyze run IDs, comma- or space-separated "
                        "(default: newest FINISHED one of this config)")
    p = stage("tune", "Optuna study over lengthscale and inducing points; trials are train runs")
    p.add_argument("--n-trials", default="", metavar="N",
                   help="trials in the whole study, all workers together (default: tuning.n_trials)")
    p.add_argument("--storage", default="", metavar="URL",
                   help="Optuna storage, e.g. postgresql://user@host/db to share the study "
                        "among workers (default: tuning.storage, else sqlite <output_dir>/optuna.db)")
    p.add_argument("--study-name", default="",
                   help="default: tuning.study_name, else <name>-<hash of config and search space>")
    p.add_argument("--preprocess-run-id", default="",
                   help="upstream preprocess run (default: newest matching FINISHED run)")
    p = stage("main", "run preprocess -> train -> analyze -> figures, reusing finished stages")
    p.add_argument("--force", default="false", type=_boolean, metavar="{true,false}",
                   help="rerun every stage even when a matching finished run exists")
    return parser


def _boolean(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args, extra = parser.parse_known_args(argv)
    overrides = list(args.set) + _dotted_overrides(extra, parser)
    try:
        from sf_mlflow.config import load_config

        config = load_config(args.config, overrides)
        if args.stage == "preprocess":
            from sf_mlflow.stages.preprocess import run_preprocess

            run_preprocess(config)
        elif args.stage == "train":
            from sf_mlflow.stages.train import run_train

            run_train(config, preprocess_run_id=args.preprocess_run_id or None,
                      resume_from=args.resume_from or None,
                      register_as=args.register_as or None,
                      register_alias=args.register_alias or "latest")
        elif args.stage == "analyze":
            from sf_mlflow.stages.analyze import run_analyze

            run_analyze(config, train_run_id=args.train_run_id or None)
        elif args.stage == "figures":
            from sf_mlflow.stages.figures import run_figures

            run_figures(config, args.analyze_run_ids.replace(",", " ").split())
        elif args.stage == "tune":
            from sf_mlflow.stages.tune import parse_n_trials, run_tune

            run_tune(config, preprocess_run_id=args.preprocess_run_id or None,
                     n_trials=parse_n_trials(args.n_trials), storage=args.storage or None,
                     study_name=args.study_name or None)
        elif args.stage == "main":
            from sf_mlflow.stages.main import run_main

            run_main(config, force=args.force)
    except SfMlflowError as err:
        # User mistakes get one readable line, not a traceback.
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
