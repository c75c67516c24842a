"""`crowdseg <command> ...`: a thin layer over the pure entry points.

Commands that run an experiment take `<experiment.yaml> [key=value ...]`; the rest have their own
flags. A user-input problem (CrowdsegError) prints one line and exits with code 2.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Callable, Optional, Sequence

from crowdseg.errors import CrowdsegError

USAGE = """crowdseg <command> [args]

experiment commands (crowdseg <command> <experiment.yaml> [key=value ...]):
  fit        train; resumes from <run_dir>/checkpoints/last.ckpt when present
  validate   evaluate on the validation split
  test       evaluate on the test split
  predict    write predictions of the test split
  config     print the resolved configuration
  show       write a PNG grid of augmented training samples (--n 8)
  masks      generate DPMO / EDP-SAM instance masks for a dataset split

other commands:
  eval-loc   evaluate NWPU-format localization files (--gt FILE --pred FILE [--json])
  splits     write label-fraction split files (<dataset> --fractions 5 10 40 --seed S)
"""

# Commands with their own argument parser: "module:function" taking argv, returning an exit code.
RAW_COMMANDS = {
    "eval-loc": "crowdseg.metrics.eval_loc:main",
    "splits": "datamodules.splits:main",
}


def _resolve(target: str) -> Callable:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _experiment_parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"crowdseg {command}")
    parser.add_argument("experiment", help="experiment YAML file")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, applied last")
    if command == "show":
        parser.add_argument("--n", type=int, default=8, help="number of samples in the grid")
        parser.add_argument("--out", default=None, help="PNG path (default: <run_dir>/pictures/samples.png)")
    return parser


def run_experiment_command(command: str, argv: Sequence[str]) -> int:
    from crowdseg.config import load_config, to_yaml

    args = _experiment_parser(command).parse_intermixed_args(list(argv))
    cfg = load_config(args.experiment, args.overrides)
    if command == "config":
        print(to_yaml(cfg), end="")
        return 0
    if command == "fit":
        from crowdseg.train import train
        _report(train(cfg))
        return 0
    if command in ("validate", "test", "predict"):
        from crowdseg.train import evaluate
        _report(evaluate(cfg, command))
        return 0
    if command == "show":
        from crowdseg.show import show
        print(f"samples: {show(cfg, n=args.n, out=args.out)}")
        return 0
    if command == "masks":
        from crowdseg.dpmo.writer import run_masks
        _report(run_masks(cfg))
        return 0
    raise AssertionError(command)


def _report(result: dict) -> None:
    """Print where a run's results are, then its final metrics."""
    if not _is_rank_zero():
        return
    paths = {k: v for k, v in result.items() if isinstance(v, str)}
    metrics = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for key, value in paths.items():
        print(f"{key:>12}: {value}")
    if metrics:
        print(json.dumps(metrics, indent=2, sort_keys=True))
    if "val/mae" in metrics and "val/mae_mean_baseline" in metrics:
        mae, base = metrics["val/mae"], metrics["val/mae_mean_baseline"]
        change = f" ({abs(100 * (1 - mae / base)):.0f}% {'lower' if mae <= base else 'higher'})" if base > 0 else ""
        print(f"validation MAE {mae:.2f} vs. {base:.2f} for always predicting the training mean count{change}")


def _is_rank_zero() -> bool:
    from crowdseg.runs import is_global_zero
    return is_global_zero()


EXPERIMENT_COMMANDS = ("fit", "validate", "test", "predict", "config", "show", "masks")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    try:
        if command in EXPERIMENT_COMMANDS:
            return run_experiment_command(command, rest)
        if command in RAW_COMMANDS:
            return int(_resolve(RAW_COMMANDS[command])(rest) or 0)
        print(f"crowdseg: error: unknown command {command!r}\n\n{USAGE}", end="", file=sys.stderr)
        return 2
    except CrowdsegError as err:
        print(f"crowdseg: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("crowdseg: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
